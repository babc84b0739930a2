"""Per-key request limits, enforced in the ingress (serve/api.py) before a request reaches a model
replica, so one client cannot starve the others.

- `KeyLimits`: a request rate (a token bucket: `requests_per_minute`, refilled continuously, holding
  at most `burst` requests), `max_concurrent` requests in flight, and a token budget
  (`tokens_per_minute`: prompt + completion tokens of finished requests are charged afterwards, so
  a key may go into debt by one request; while in debt its requests are refused); 0 turns each off.
- `load_api_keys(path, defaults)`: the API keys file, one key per line with optional overrides,
  `sk-abc requests_per_minute=60 burst=5 max_concurrent=2 tokens_per_minute=20000`; blank lines and `#` comments are skipped.
- `KeyLimiter.acquire(who, limits)`: a release function, or `APIError` 429 in OpenAI's shape
  (`code: rate_limit_exceeded`) with `Retry-After` in seconds. `who` is the API key, or the
  client's address when the server takes no key. The state lives in each ingress replica, so with
  `ingress.num_replicas` > 1 a key gets that many times its limits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from moe.config import ConfigError
from serve.openai.protocol import APIError


@dataclass(frozen=True)
class KeyLimits:
    requests_per_minute: float = 0.0  # 0: no rate limit
    burst: int = 10  # requests a key may send back to back before the rate applies (bucket size)
    max_concurrent: int = 0  # requests in flight at once; 0: no limit
    tokens_per_minute: float = 0.0  # prompt + completion tokens; 0: no budget

    def check(self, where: str) -> KeyLimits:
        if not (math.isfinite(self.requests_per_minute) and self.requests_per_minute >= 0):
            raise ConfigError(f"{where}requests_per_minute={self.requests_per_minute} must be >= 0 (0: no limit).")
        if self.burst < 1:
            raise ConfigError(f"{where}burst={self.burst} must be >= 1.")
        if self.max_concurrent < 0:
            raise ConfigError(f"{where}max_concurrent={self.max_concurrent} must be >= 0 (0: no limit).")
        if not (math.isfinite(self.tokens_per_minute) and self.tokens_per_minute >= 0):
            raise ConfigError(f"{where}tokens_per_minute={self.tokens_per_minute} must be >= 0 (0: no budget).")
        return self


def _parse_key_line(line: str, where: str, defaults: KeyLimits) -> tuple[str, KeyLimits]:
    key, *options = line.split()
    types = {f.name: (float if f.name.endswith("per_minute") else int) for f in fields(KeyLimits)}
    values: dict[str, float | int] = {}
    for opt in options:
        name, eq, value = opt.partition("=")
        if name not in types or not eq:
            raise ConfigError(f"{where}: {opt!r} is not name=value with name one of {sorted(types)}.")
        try:
            values[name] = types[name](value)
        except ValueError as err:
            raise ConfigError(f"{where}: {name}={value!r} is not a number.") from err
    return key, replace(defaults, **values).check(f"{where}: ")


def load_api_keys(path: str | Path, defaults: KeyLimits) -> dict[str, KeyLimits]:
    """The keys in an API keys file with each key's limits (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ingress.api_keys_file={str(path)!r} does not exist (one API key per line).")
    keys: dict[str, KeyLimits] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            key, limits = _parse_key_line(line, f"{p}:{n}", defaults)
            if key in keys:
                raise ConfigError(f"{p}:{n}: this key is already listed on an earlier line.")
            keys[key] = limits
    if not keys:
        raise ConfigError(f"ingress.api_keys_file={str(path)!r} lists no key.")
    return keys


def rate_limited(message: str, retry_after_s: float, kind: str = "requests") -> APIError:
    """OpenAI's 429: type "requests" or "tokens", code rate_limit_exceeded, and Retry-After."""
    seconds = max(1, math.ceil(retry_after_s))
    return APIError(429, f"{message} Please try again in {seconds}s.", kind, code="rate_limit_exceeded",
                    headers={"Retry-After": str(seconds)})


class KeyLimiter:
    """The request rate and in-flight count of each key (or client) in one ingress replica."""

    MAX_TRACKED = 10_000  # idle clients' full buckets are dropped beyond this many

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # who -> (requests left, at time)
        self.tokens: dict[str, tuple[float, float]] = {}  # who -> (tokens left, may be negative; at time)
        self.in_flight: dict[str, int] = {}

    def acquire(self, who: str, limits: KeyLimits) -> Callable[[], None]:
        """Count one request of `who` (raises a 429 when over a limit); call the result when it ends."""
        busy = self.in_flight.get(who, 0)
        if limits.max_concurrent and busy >= limits.max_concurrent:
            raise rate_limited(f"Too many concurrent requests: this key may have {limits.max_concurrent} "
                               "in flight at once.", 1)
        if limits.tokens_per_minute > 0:
            self._check_tokens(who, limits)
        if limits.requests_per_minute > 0:
            self._take(who, limits)
        self.in_flight[who] = busy + 1
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                left = self.in_flight.get(who, 1) - 1
                if left > 0:
                    self.in_flight[who] = left
                else:
                    self.in_flight.pop(who, None)
        return release

    def _take(self, who: str, limits: KeyLimits) -> None:
        now, rate = self.clock(), limits.requests_per_minute / 60.0
        left, at = self.buckets.get(who, (float(limits.burst), now))
        left = min(float(limits.burst), left + (now - at) * rate)
        if left < 1.0:
            raise rate_limited(f"Rate limit reached: this key may send {limits.requests_per_minute:g} requests per "
                               f"minute (bursts of {limits.burst}).", (1.0 - left) / rate)
        self.buckets[who] = (left - 1.0, now)
        if len(self.buckets) > self.MAX_TRACKED:
            self._prune(now, rate, limits.burst)

    def charge(self, who: str, limits: KeyLimits, n_tokens: int) -> None:
        """Subtract a finished request's tokens from `who`'s budget."""
        if limits.tokens_per_minute > 0 and n_tokens > 0:
            self.tokens[who] = (self._tokens_left(who, limits) - n_tokens, self.clock())

    def _tokens_left(self, who: str, limits: KeyLimits) -> float:
        now, cap = self.clock(), limits.tokens_per_minute
        left, at = self.tokens.get(who, (cap, now))
        return min(cap, left + (now - at) * cap / 60.0)

    def _check_tokens(self, who: str, limits: KeyLimits) -> None:
        left = self._tokens_left(who, limits)
        if left < 1.0:
            raise rate_limited(f"Token budget used up: this key may use {limits.tokens_per_minute:g} tokens per "
                               "minute (prompt and completion).", (1.0 - left) * 60.0 / limits.tokens_per_minute,
                               "tokens")

    def _prune(self, now: float, rate: float, burst: int) -> None:
        self.buckets = {w: (left, at) for w, (left, at) in self.buckets.items() if left + (now - at) * rate < burst}
