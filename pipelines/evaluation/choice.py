"""A multiple-choice task from held-out source: given the lines before it, pick the real next line of
a validation-split document among distractor lines of similar length taken from other documents.

The validation split holds documents training never saw; its packed sequences decode back to
their text (byte-level BPE is lossless) and split into documents at eos. Each choice is scored by
its log-likelihood after the context (`acc`) and by log-likelihood per byte (`acc_norm`, which does
not favour short lines); chance is 1 / choices.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from moe.model import MoETransformer
from pipelines.evaluation.config import ChoiceConfig
from pipelines.evaluation.scoring import continuation_logprobs


@dataclass
class Question:
    context: str
    choices: list[str]  # lines without their newline; the real one is choices[answer]
    answer: int


def held_out_documents(tokens_NT: torch.Tensor, mask_NT: torch.Tensor, tok: Tokenizer, eos_id: int | None
                       ) -> list[str]:
    """Text of the validation documents in consecutive packed rows (packing concatenates documents,
    each followed by eos, and cuts rows without overlap; padding is unmarked in the mask). The last
    piece may be cut by the end of the rows read, so it is left out."""
    flat = tokens_NT[mask_NT > 0].tolist()
    docs, cur = [], []
    for t in flat:
        if t == eos_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return [tok.decode(d) for d in docs if d]


def _lines(doc: str) -> list[str]:
    return doc.split("\n")


def build_questions(docs: list[str], cfg: ChoiceConfig) -> list[Question]:
    """Up to `cfg.questions` questions, deterministic for `cfg.seed`."""
    rng = random.Random(cfg.seed)
    per_doc = [_lines(d) for d in docs]
    pool = [(len(line.strip()), d, line) for d, lines in enumerate(per_doc) for line in lines
            if len(line.strip()) >= cfg.min_line_chars]
    pool.sort()
    sites = [(d, i) for d, lines in enumerate(per_doc) for i in range(cfg.context_lines, len(lines))
             if len(lines[i].strip()) >= cfg.min_line_chars and lines[i] not in lines[i - cfg.context_lines:i]]
    rng.shuffle(sites)
    questions = []
    for d, i in sites:
        if len(questions) >= cfg.questions:
            break
        real = per_doc[d][i]
        distractors = _distractors(pool, d, real, cfg.choices - 1, rng)
        if len(distractors) < cfg.choices - 1:
            continue
        choices = [real, *distractors]
        rng.shuffle(choices)
        questions.append(Question("\n".join(per_doc[d][i - cfg.context_lines:i]), choices, choices.index(real)))
    return questions


def _distractors(pool: list[tuple[int, int, str]], doc: int, real: str, n: int, rng: random.Random) -> list[str]:
    """`n` distinct lines from other documents, drawn among the 8n lines closest in length to `real`."""
    import bisect

    target = len(real.strip())
    at = bisect.bisect_left(pool, (target, -1, ""))
    near = pool[max(0, at - 4 * n):at + 4 * n]
    seen, out = {real.strip()}, []
    for _, d, line in rng.sample(near, len(near)):
        if d != doc and line.strip() not in seen:
            seen.add(line.strip())
            out.append(line)
            if len(out) == n:
                break
    return out


def _pair(tok: Tokenizer, context: str, line: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for the continuation "\\n" + line, split where encoding the
    context alone agrees with encoding the whole (else each part on its own)."""
    ctx = tok.encode(context).ids
    whole = tok.encode(context + "\n" + line).ids
    if whole[:len(ctx)] == ctx:
        return ctx, whole[len(ctx):]
    return ctx, tok.encode("\n" + line).ids


def run_choice(model: MoETransformer, tok: Tokenizer, questions: list[Question]) -> dict[str, float]:
    """acc (log-likelihood), acc_norm (per byte) and chance over the questions."""
    if not questions:
        return {}
    pairs = [_pair(tok, q.context, c) for q in questions for c in q.choices]
    limit = model.cfg.max_seq_len // 2
    pairs = [(ctx, cont[:limit]) for ctx, cont in pairs]
    scores = continuation_logprobs(model, pairs)
    correct = correct_norm = 0
    k = 0
    for q in questions:
        s = scores[k:k + len(q.choices)]
        per_byte = [v / max(1, len(("\n" + c).encode("utf-8"))) for v, c in zip(s, q.choices)]
        correct += int(max(range(len(s)), key=s.__getitem__) == q.answer)
        correct_norm += int(max(range(len(s)), key=per_byte.__getitem__) == q.answer)
        k += len(q.choices)
    n = len(questions)
    return {"choice/acc": correct / n, "choice/acc_norm": correct_norm / n,
            "choice/chance": sum(1 / len(q.choices) for q in questions) / n, "choice/questions": float(n)}
