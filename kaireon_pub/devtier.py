"""A running tier for the tests and the bench (dev only, like devenv): `kaireon-pub run` as a
process, its environment, and the one definition of a tier whose workers share the shards.

`tests/helpers.py` re-exports these; `bench/tier.py` builds its supervisors on `Tier`. Nothing here
is imported by the tier itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import psycopg

SHARDS = 256  # as in kaireon_pub/worker/leases.py; not imported, so the bench needs none of the worker


def tier_env(db_url: str, bootstrap: str, run_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a `kaireon-pub run` process: the caller's, less its OUTBOX_*/KAFKA_*
    variables, plus the database, the broker, an ephemeral HTTP port and files under `run_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "KAFKA_"))}
    env.update(
        DATABASE_URL=db_url,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        OUTBOX_HTTP_PORT="0",
        OUTBOX_LIVENESS_FILE=str(run_dir / "alive"),
        PROMETHEUS_MULTIPROC_DIR=str(run_dir / "prom"),
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns a truthy value; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Tier:
    """`kaireon-pub run` as a real process (its own session); its JSON log lines go to a file."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kaireon_pub", "run"], env=env,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((line for line in self.logs() if predicate(line)), None)
        return wait_for(find, timeout, what)

    def logged_port(self) -> int | None:
        """The HTTP port from the "http listening" line, or None before it."""
        line = next((e for e in self.logs() if e.get("event") == "http listening"), None)
        return None if line is None else int(line["port"])

    def http_port(self, timeout: float = 30) -> int:
        line = self.wait_log(lambda e: e.get("event") == "http listening", timeout, "the http server")
        return int(line["port"])

    def worker_pids(self) -> dict[int, int]:
        """slot -> pid of the live worker, from the supervisor's spawn lines."""
        live: dict[int, int] = {}
        for line in self.logs():
            if line.get("event") == "worker spawned":
                live[line["slot"]] = line["workerPid"]
        return live

    def worker_ids(self) -> set[str]:
        """Every worker id this supervisor has spawned (the owner of its leases and claims)."""
        return {line["workerId"] for line in self.logs() if line.get("event") == "worker spawned"}

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """`sig` (a drain), its exit code within `timeout` s; whatever is left of it is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        else:
            # Workers die with their supervisor; make sure no orphan outlives the test.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def shard_shares(conn: psycopg.Connection) -> dict[str, int]:
    """Live leases per owner (worker id): shards whose lease has not expired."""
    return {str(owner): n for owner, n in conn.execute(
        "SELECT owner, count(*) FROM outbox_shard_leases WHERE owner IS NOT NULL "
        "AND expires_at > clock_timestamp() GROUP BY owner")}


def is_balanced(shares: dict[str, int], workers: int, of: Collection[str] | None = None) -> bool:
    """The workers share the shards: `workers` owners (exactly the ids `of`, when given), every
    shard held by a live lease (a shard has one row, so one owner), and none above the fair share
    ceil(256 / workers).

    Why this one: it is the state the lease keepers converge to, and stay in. A keeper releases
    what is above ceil(256 / live workers) and takes only free or expired shards below it, so a
    worker may stay a few short of 256 // workers when the count does not divide 256 (six workers:
    43 × 5 + 41). "Each exactly 256 // workers" never holds then; "each within one of the fair
    share" may not either; "every worker holds some shards" is true long before the split, while
    the first worker still holds nearly all. When `workers` divides 256 this is exactly 256 /
    workers each.
    """
    fair = math.ceil(SHARDS / workers)
    return (len(shares) == workers and sum(shares.values()) == SHARDS and max(shares.values()) <= fair
            and (of is None or set(shares) == set(of)))


def wait_balanced(db_url: str, workers: int, timeout: float = 30, *,
                  of: Callable[[], Collection[str]] | None = None, interval: float = 0.2) -> dict[str, int]:
    """Wait until `workers` workers share the shards (`is_balanced`); their shares. `of`: the ids
    that must be the owners, read again at each look (e.g. the workers of given tiers)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        def balanced() -> dict[str, int] | None:
            shares = shard_shares(conn)
            return shares if is_balanced(shares, workers, None if of is None else of()) else None
        what = f"the 256 shards shared by {workers} workers (at most {math.ceil(SHARDS / workers)} each)"
        try:
            return wait_for(balanced, timeout, what, interval)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; live leases per owner: {shard_shares(conn)}") from None
