"""Per-key limits with a fake clock: requests and tokens per sliding minute, concurrent
generations, Retry-After values, and that keys do not share a budget."""

from __future__ import annotations

from medserve.server.auth.limits import RateLimiter
from medserve.server.auth.principal import Limits, Principal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key(key_id: str, **limits: int) -> Principal:
    return Principal(key_id, key_id, frozenset({"chat"}), Limits(**limits))


def test_requests_per_minute_slide_and_name_the_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    key = _key("a", rpm=3)
    for _ in range(3):
        assert limiter.admit(key, stream=False) is None
        clock.now += 10
    exceeded = limiter.admit(key, stream=False)
    assert exceeded is not None and exceeded.limit == "requests"
    assert exceeded.retry_after_s == 30  # the first request leaves the window at t+60
    clock.now += 29
    assert limiter.admit(key, stream=False) is not None  # refused ones are not counted
    clock.now += 1.5
    assert limiter.admit(key, stream=False) is None
    assert limiter.admit(_key("b", rpm=3), stream=False) is None  # another key's budget


def test_tokens_are_charged_after_the_response_and_block_the_next_request() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    key = _key("a", tpm=100)
    assert limiter.admit(key, stream=False) is None
    limiter.finish(key, stream=False, tokens=60)
    clock.now += 20
    assert limiter.admit(key, stream=False) is None  # 60 < 100: admitted
    limiter.finish(key, stream=False, tokens=70)  # the request may overshoot: 130
    clock.now += 5
    exceeded = limiter.admit(key, stream=False)
    assert exceeded is not None and exceeded.limit == "tokens"
    assert exceeded.retry_after_s == 35  # the first 60 leave at t+60 -> 70 < 100
    clock.now += 35
    assert limiter.admit(key, stream=False) is None


def test_concurrent_generations_are_capped_and_released() -> None:
    limiter = RateLimiter(Clock())
    key = _key("a", max_streams=2)
    assert limiter.admit(key, stream=True) is None
    assert limiter.admit(key, stream=True) is None
    exceeded = limiter.admit(key, stream=True)
    assert exceeded is not None and exceeded.limit == "streams" and exceeded.retry_after_s >= 1
    assert limiter.admit(key, stream=False) is None  # non-generation routes are not capped
    limiter.finish(key, stream=True, tokens=0)
    assert limiter.admit(key, stream=True) is None


def test_zero_means_unlimited() -> None:
    limiter = RateLimiter(Clock())
    key = _key("a")
    for _ in range(1000):
        assert limiter.admit(key, stream=True) is None
        limiter.finish(key, stream=True, tokens=10_000)
