"""`replay --rate`: the token bucket (kaireon_pub/ops/replay/limiter.py), on a fake clock (no services)."""

from __future__ import annotations

import pytest

from kaireon_pub.ops.replay import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        assert seconds > 0
        self.waits.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("rate", [0.5, 7, 500, 20_000])
def test_n_takes_last_n_minus_one_over_the_rate(rate):
    clock = FakeClock()
    bucket = TokenBucket(rate, clock=clock, wait=clock.wait)
    n = 2500 if rate >= 500 else 20
    for _ in range(n):
        bucket.take()
    assert clock.now - 1000.0 == pytest.approx((n - 1) / rate, rel=1e-6)


def test_a_pause_is_made_up_by_a_burst_of_at_most_a_tenth_of_a_second():
    clock = FakeClock()
    bucket = TokenBucket(500, clock=clock, wait=clock.wait)
    bucket.take()
    clock.now += 5.0  # the caller was busy (a page read, a save): the bucket fills to its capacity only
    for _ in range(50):
        bucket.take()
    assert clock.waits == []  # 50 tokens (0.1 s of 500/s) taken at once
    bucket.take()
    assert clock.waits and sum(clock.waits) == pytest.approx(1 / 500)


def test_the_average_holds_within_a_few_percent_when_the_caller_is_slow_now_and_then():
    clock = FakeClock()
    bucket = TokenBucket(500, clock=clock, wait=clock.wait)
    for i in range(2500):
        bucket.take()
        if i % 200 == 0:
            clock.now += 0.03  # a stall shorter than the burst: made up, the average kept
    measured = 2499 / (clock.now - 1000.0)
    assert measured / 500 == pytest.approx(1.0, abs=0.03)


def test_a_given_burst_and_a_rate_below_one():
    clock = FakeClock()
    bucket = TokenBucket(0.5, burst=3, clock=clock, wait=clock.wait)
    assert bucket.capacity == 3
    clock.now += 100
    for _ in range(3):
        bucket.take()
    assert clock.waits == []
    bucket.take()
    assert sum(clock.waits) == pytest.approx(2.0)
    assert TokenBucket(0.5, clock=clock, wait=clock.wait).capacity == 1  # at least one token


def test_a_rate_must_be_positive():
    with pytest.raises(ValueError):
        TokenBucket(0)
