"""Both ends of a worker's heartbeat, gunicorn's way: an unlinked temporary file per worker.

The supervisor makes it before the fork (`Heartbeat()`); the worker beats through its descriptor
(`beater(fd)`: toggling the file's mode bumps its ctime, no write, no path); the supervisor reads
the age by fstat() (`Heartbeat.age()`), and learns that the worker has beaten at least once
(`seen`): before that the worker is still booting.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable


class Heartbeat:
    """The supervisor's end: the file, its age, whether the worker has beaten yet."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="kaireon-hb-")
        self.baseline_ctime = os.fstat(self.file.fileno()).st_ctime
        self.seen = False

    def fileno(self) -> int:
        return self.file.fileno()

    def age(self) -> float:
        """Seconds since the last beat (since the file was made, before the first one)."""
        ctime = os.fstat(self.file.fileno()).st_ctime
        if ctime != self.baseline_ctime:
            self.seen = True
        return time.time() - ctime

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass


def beater(fd: int) -> Callable[[], None]:
    """The worker's end: a function that beats the heartbeat whose descriptor is `fd`."""
    mode = 0

    def beat() -> None:
        nonlocal mode
        # Toggling the mode updates ctime, which the supervisor reads by fstat().
        mode ^= 1
        os.fchmod(fd, mode)

    return beat
