"""Who runs a replay run: the operator it is logged under, the process that holds the run (its
holder, `host:pid`), and a holder of this host that died (a killed run, whose hold is not waited out)."""

from __future__ import annotations

import getpass
import os
import socket

HOLD_S = 30  # a run's hold lasts this long without a renewal (another process may then resume it)


def own_holder() -> str:
    """This process as a run's holder: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def operator_name(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("USER"):
        return os.environ["USER"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_holder(holder: str | None) -> str | None:
    """`holder` when it is a process of this host that no longer exists (a killed run): its hold
    need not be waited out."""
    if not holder or ":" not in holder:
        return None
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    return None if _pid_alive(int(pid)) else holder
