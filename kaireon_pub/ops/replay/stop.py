"""`replay`'s signals: SIGINT/SIGTERM end a run after what is in flight, with their exit codes."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stop:
    """SIGINT/SIGTERM: finish what is in flight, save the cursor, stop. A second one stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[Stop]:
        for signum in EXIT_INTERRUPTED:
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
