"""The output content filter while streaming: a blocked phrase split across tokens never reaches
the client, not even its first characters (serve/safety.py's hold-back, moe.generate.Sequence)."""

from __future__ import annotations

import pytest

from moe.generate import FINISH_FILTER, FINISH_LENGTH, SamplingParams, Sequence
from serve.config import SafetyRules
from serve.safety import ContentFilter

PIECES = ["Hello ", "wor", "ld, the ", "se", "cr", "et", " plan", " is", " here"]


def stream(rules: SafetyRules, pieces: list[str] = PIECES) -> tuple[list[str], Sequence]:
    """Feed the pieces one token at a time; return what `take_text` hands out after each."""
    flt = ContentFilter(rules)
    seq = Sequence([0], SamplingParams(max_tokens=len(pieces)), detokenize=lambda ids: "".join(pieces[i] for i in ids),
                   text_check=flt.first_blocked, text_hold=flt.max_match_chars)
    chunks = []
    for token in range(len(pieces)):
        seq.append(token, None, 1000)
        chunks.append(seq.take_text())
        if seq.done:
            break
    return chunks, seq


@pytest.mark.parametrize("rules", [SafetyRules(block_words=["secret plan"]),
                                   SafetyRules(regexes=[r"s\s*e\s?cret"]),
                                   SafetyRules(regexes=[r"[sS]ecret(?= plan)"])],
                         ids=["block-word", "regex", "regex-lookahead"])
def test_a_blocked_phrase_split_across_tokens_never_leaks(rules):
    chunks, seq = stream(rules)
    assert seq.finish_reason == FINISH_FILTER
    assert "".join(chunks) == "Hello world, the " == seq.text
    for i in range(len(chunks)):  # at no point did any prefix of "secret" go out
        assert "s" not in "".join(chunks[:i + 1]).removeprefix("Hello world, the")


def test_the_hold_back_is_the_longest_match_and_all_text_arrives_in_the_end():
    flt = ContentFilter(SafetyRules(block_words=["secret plan", "nope"], regexes=["x[0-9]{3}"]))
    assert flt.max_match_chars == len("secret plan") + 2  # the word-boundary context on both sides
    chunks, seq = stream(SafetyRules(block_words=["forbidden"]))
    assert seq.finish_reason == FINISH_LENGTH and "".join(chunks) == "".join(PIECES)
    assert chunks[1] == ""  # "Hello wor" is shorter than the 11-character hold
    assert "".join(chunks[:3]) == "Hello world, the "[:-11]


def test_an_unbounded_regex_holds_the_stream_until_the_choice_ends():
    assert ContentFilter(SafetyRules(regexes=[r"plan\d+"])).max_match_chars is None
    chunks, seq = stream(SafetyRules(regexes=[r"plan\d+"]))
    assert chunks[:-1] == [""] * (len(PIECES) - 1) and chunks[-1] == "".join(PIECES)
    chunks, seq = stream(SafetyRules(regexes=[r"se.*plan"]))
    assert seq.finish_reason == FINISH_FILTER and chunks == [""] * 6 + ["Hello world, the "]


def test_no_filter_holds_nothing():
    chunks, _ = stream(SafetyRules())
    assert chunks == PIECES
