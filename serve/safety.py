"""Content filter: block lists and regular expressions applied to request text (input) and to
generated text (output).

Input that matches is refused with a 400 `content_policy_violation`; output that matches ends
the choice with `finish_reason: "content_filter"`, cut before the match. Block words match whole
words case-insensitively; regexes are Python `re.search` patterns as written.
"""

from __future__ import annotations

import re
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
