"""Per-key limits in-process (serve/limits.py): the token-bucket rate with its burst and Retry-After,
concurrent requests held until released, independent keys or clients, the API keys file and the
config checks. The same limits over real HTTP: tests/serve/test_api.py."""

from __future__ import annotations

import pytest

from moe.config import ConfigError
from serve.config import load_config
from serve.limits import KeyLimiter, KeyLimits, load_api_keys
from serve.openai.protocol import APIError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rate_allows_a_burst_then_refills_at_the_rate():
    clock, limits = Clock(), KeyLimits(requests_per_minute=30, burst=3)
    lim = KeyLimiter(clock)
    for _ in range(3):
        lim.acquire("key:a", limits)()
    with pytest.raises(APIError) as err:
        lim.acquire("key:a", limits)
    e = err.value
    assert e.status == 429 and e.code == "rate_limit_exceeded" and e.headers == {"Retry-After": "2"}
    assert "30 requests per minute" in e.message
    lim.acquire("client:10.0.0.2", limits)()  # another client has its own bucket
    clock.t += 2.0  # 30/min: one request every 2 s
    lim.acquire("key:a", limits)()
    with pytest.raises(APIError):
        lim.acquire("key:a", limits)
    clock.t += 60.0  # a long pause refills only up to the burst
    for _ in range(3):
        lim.acquire("key:a", limits)()
    with pytest.raises(APIError):
        lim.acquire("key:a", limits)


def test_concurrent_requests_are_held_until_released():
    lim, limits = KeyLimiter(Clock()), KeyLimits(max_concurrent=2)
    r1, r2 = lim.acquire("k", limits), lim.acquire("k", limits)
    with pytest.raises(APIError) as err:
        lim.acquire("k", limits)
    assert err.value.headers == {"Retry-After": "1"} and "2 in flight" in err.value.message
    r1()
    r1()  # releasing twice frees one slot only
    r3 = lim.acquire("k", limits)
    with pytest.raises(APIError):
        lim.acquire("k", limits)
    r2(), r3()
    assert lim.in_flight == {}
    unlimited = KeyLimits()
    releases = [lim.acquire("k", unlimited) for _ in range(100)]
    assert lim.in_flight["k"] == 100 and not lim.buckets
    for r in releases:
        r()


def test_api_keys_file(tmp_path):
    defaults = KeyLimits(requests_per_minute=60, burst=5)
    f = tmp_path / "keys"
    f.write_text("# keys\nsk-a\n\nsk-b requests_per_minute=6 max_concurrent=2  # tight\n")
    assert load_api_keys(f, defaults) == {"sk-a": defaults,
                                          "sk-b": KeyLimits(requests_per_minute=6, burst=5, max_concurrent=2)}
    for text, fragment in [("sk-a rpm=3\n", "'rpm=3' is not name=value"), ("sk-a burst=x\n", "burst='x'"),
                           ("sk-a burst=0\n", "burst=0 must be >= 1"), ("sk-a\nsk-a\n", ":2: this key is already"),
                           ("# nothing\n", "lists no key")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=None) as err:
            load_api_keys(f, defaults)
        assert fragment in str(err.value)


@pytest.mark.parametrize("override, fragment", [
    ("ingress.limits.requests_per_minute=-1", "ingress.limits.requests_per_minute=-1.0 must be >= 0"),
    ("ingress.limits.burst=0", "ingress.limits.burst=0"),
    ("ingress.limits.max_concurrent=-2", "ingress.limits.max_concurrent=-2"),
    ("ingress.limits.tokens_per_minute=-5", "ingress.limits.tokens_per_minute=-5.0"),
    ("ingress.max_body_bytes=10", "ingress.max_body_bytes=10"),
    ("ingress.api_keys_file=/nonexistent/keys.txt", "ingress.api_keys_file='/nonexistent/keys.txt' does not exist"),
])
def test_limit_config_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert fragment in str(err.value)


def test_limits_compose_from_conf():
    cfg = load_config(["ingress.limits.requests_per_minute=120", "ingress.limits.max_concurrent=4"])
    assert cfg.ingress.limits.key_limits() == KeyLimits(requests_per_minute=120, burst=10, max_concurrent=4)
    assert load_config().ingress.limits.key_limits() == KeyLimits()  # off by default


def test_token_budget_is_charged_after_and_refills():
    clock, limits = Clock(), KeyLimits(tokens_per_minute=120)
    lim = KeyLimiter(clock)
    lim.acquire("k", limits)()
    lim.charge("k", limits, 100)
    lim.acquire("k", limits)()  # 20 left: admitted, and may go into debt
    lim.charge("k", limits, 50)
    with pytest.raises(APIError) as err:
        lim.acquire("k", limits)
    e = err.value
    assert e.status == 429 and e.type == "tokens" and e.headers == {"Retry-After": "16"}  # (30 + 1) / 2 per s
    clock.t += 16
    lim.acquire("k", limits)()
    lim.acquire("other", limits)()  # budgets are per key
