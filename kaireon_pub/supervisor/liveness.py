"""The liveness file: touched by the supervisor while every worker's heartbeat is fresh."""

from __future__ import annotations

import os
import time


def touch(path: str) -> None:
    try:
        os.utime(path, None)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a"):
            pass


def file_age(path: str) -> float | None:
    """Seconds since the file was last touched, or None when it does not exist."""
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except FileNotFoundError:
        return None
