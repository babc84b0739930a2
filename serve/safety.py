"""Content filter: block lists and regular expressions applied to request text (input) and to
generated text (output).

Input that matches is refused with a 400 `content_policy_violation`; output that matches ends
the choice with `finish_reason: "content_filter"`, cut before the match. Block words match whole
words case-insensitively; regexes are Python `re.search` patterns as written.

No leak while streaming: `ContentFilter.max_match_chars` is the longest text any rule can match
(a block word's length plus its word-boundary context; a regex's maximum width, lookarounds
counted), and a streamed sequence holds back that many trailing characters until it
ends (`moe.generate.Sequence(text_hold=...)`), so a blocked phrase split across tokens never
reaches the client, not even its first characters. A regex without a bound (`+`, `*`, `{n,}`)
could match any length: with one, streamed output is held back whole until the choice ends.
"""

from __future__ import annotations

import re
import re._parser as sre_parse  # the stdlib's own pattern parser: a regex's maximum match width
from dataclasses import dataclass

from serve.config import SafetyConfig, SafetyRules


@dataclass
class Violation:
    start: int
    rule: str


class ContentFilter:
    """One side's rules, compiled once."""

    def __init__(self, rules: SafetyRules) -> None:
        self.patterns: list[tuple[re.Pattern[str], str]] = []
        for word in rules.block_words:
            if word.strip():
                self.patterns.append(
                    (re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE), f"block word {word!r}"))
        for pattern in rules.regexes:
            self.patterns.append((re.compile(pattern), f"regex {pattern!r}"))
        self.max_match_chars = max((_max_width(p) for p, _ in self.patterns), default=0, key=_unbounded_last)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def find(self, text: str) -> Violation | None:
        """The earliest match of any rule, or None."""
        best: Violation | None = None
        for pattern, rule in self.patterns:
            m = pattern.search(text)
            if m and (best is None or m.start() < best.start):
                best = Violation(m.start(), rule)
        return best

    def first_blocked(self, text: str) -> int | None:
        """Where the blocked text begins (the generation check `moe.generate.Sequence` takes)."""
        v = self.find(text)
        return None if v is None else v.start


def _max_width(pattern: re.Pattern[str]) -> int | None:
    """The most characters a match of `pattern` can span, its lookaround context included (the
    parser counts a lookahead/lookbehind as width 0, so their widths are added); None: no bound."""
    widths = [sre_parse.parse(pattern.pattern, pattern.flags).getwidth()[1]]
    widths += [sre_parse.parse(m.group(1)).getwidth()[1] for m in re.finditer(r"\(\?<?[=!](.*?)\)", pattern.pattern)
               if _parses(m.group(1))]
    total = sum(widths)
    return None if any(w >= sre_parse.MAXREPEAT for w in widths) else total


def _parses(text: str) -> bool:
    try:
        sre_parse.parse(text)
    except re.error:
        return False
    return True


def _unbounded_last(width: int | None) -> float:
    return float("inf") if width is None else width


class SafetyPolicy:
    def __init__(self, cfg: SafetyConfig) -> None:
        self.input = ContentFilter(cfg.input)
        self.output = ContentFilter(cfg.output)

    def check_input(self, texts: list[str]) -> Violation | None:
        if not self.input:
            return None
        for text in texts:
            v = self.input.find(text)
            if v is not None:
                return v
        return None
