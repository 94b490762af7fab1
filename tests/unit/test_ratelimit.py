"""Sliding-window rate limiter: exact counting, Retry-After, all-or-nothing, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.policy.ratelimit import Denied, Limit, RateLimiter


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_n_plus_first_request_in_window_is_denied_with_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    limit = Limit("l", requests=3, window_seconds=60)
    for _ in range(3):
        assert limiter.acquire([(limit, "alice")]) is None
        clock.now += 1
    denied = limiter.acquire([(limit, "alice")])
    assert denied == Denied("l", pytest.approx(57.0))
    assert denied.retry_after_header == "57"
    clock.now += 57  # the first request leaves the window exactly now
    assert limiter.acquire([(limit, "alice")]) is None
    assert limiter.acquire([(limit, "alice")]) is not None


def test_keys_are_counted_separately() -> None:
    limiter = RateLimiter(FakeClock())
    limit = Limit("l", requests=1, window_seconds=10)
    assert limiter.acquire([(limit, "alice")]) is None
    assert limiter.acquire([(limit, "bob")]) is None
    assert limiter.acquire([(limit, "alice")]) is not None


def test_denial_by_one_limit_consumes_nothing_from_the_others() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    small = Limit("small", requests=1, window_seconds=100)
    big = Limit("big", requests=2, window_seconds=100)
    assert limiter.acquire([(small, "k"), (big, "k")]) is None
    denied = limiter.acquire([(small, "k"), (big, "k")])
    assert denied is not None and denied.limit_id == "small"
    # `big` still has its second slot: the denied request was not counted against it.
    assert limiter.acquire([(big, "k")]) is None
    assert limiter.acquire([(big, "k")]) is not None


def test_longest_wait_is_reported_when_several_limits_deny() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    short = Limit("short", requests=1, window_seconds=5)
    long = Limit("long", requests=1, window_seconds=50)
    assert limiter.acquire([(short, "k"), (long, "k")]) is None
    denied = limiter.acquire([(short, "k"), (long, "k")])
    assert denied == Denied("long", 50.0)


def test_retry_after_header_is_at_least_one_second() -> None:
    assert Denied("l", 0.01).retry_after_header == "1"
    assert Denied("l", 1.2).retry_after_header == "2"


def test_sweep_forgets_idle_keys_and_full_table_refuses_new_keys() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock, max_keys=2)
    limit = Limit("l", requests=5, window_seconds=10)
    assert limiter.acquire([(limit, "a")]) is None
    assert limiter.acquire([(limit, "b")]) is None
    # Table full of live keys: a new key is refused rather than an old budget forgotten.
    assert limiter.acquire([(limit, "c")]) == Denied("l", 10)
    clock.now += 11
    assert limiter.acquire([(limit, "c")]) is None  # the sweep made room
    assert len(limiter) == 1


def test_limits_validate_their_numbers() -> None:
    with pytest.raises(ValueError):
        Limit("l", requests=0, window_seconds=1)
    with pytest.raises(ValueError):
        Limit("l", requests=1, window_seconds=0)


@settings(max_examples=200, deadline=None)
@given(
    requests=st.integers(1, 5),
    window=st.integers(1, 20),
    gaps=st.lists(st.integers(0, 8), min_size=1, max_size=60),
)
def test_admitted_requests_never_exceed_the_limit_in_any_window(
    requests: int, window: int, gaps: list[int]
) -> None:
    """The sliding-window invariant; a denial only when the window is really full, with the
    exact wait until a slot frees up."""
    clock = FakeClock(0.0)
    limiter = RateLimiter(clock)
    limit = Limit("l", requests=requests, window_seconds=window)
    admitted: list[float] = []
    for gap in gaps:
        clock.now += gap
        in_window = [t for t in admitted if t > clock.now - window]
        denied = limiter.acquire([(limit, "k")])
        if denied is None:
            assert len(in_window) < requests
            admitted.append(clock.now)
        else:
            assert len(in_window) == requests
            # Exactly when the oldest admitted request in the window leaves it.
            assert denied.retry_after == pytest.approx(in_window[0] + window - clock.now)
    for t in admitted:
        assert sum(1 for u in admitted if t <= u < t + window) <= requests
