"""`replay --rate`: the token bucket that caps a run's events per second."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """At most `rate` takes per second on average, bursts of at most `burst` (default: a tenth of a
    second's worth, at least 1). Starts with one token, so n takes last (n - 1) / rate seconds.
    `wait(seconds)` is how it waits (the replay serves the producer meanwhile)."""

    def __init__(self, rate: float, *, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], object] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate / 10)
        self.tokens = 1.0
        self.clock = clock
        self.wait = wait
        self.last = clock()

    def take(self) -> None:
        while True:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1 - 1e-9:  # a rounding error's worth short is a whole token
                self.tokens = max(0.0, self.tokens - 1)
                return
            self.wait((1 - self.tokens) / self.rate)

