"""What the supervisor keeps about its children: a worker (`Child`, `SlotState`) and the HTTP process
(`HttpChild`: forked with a pipe for its port, respawned with back-off, stopped in bounded time)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kaireon_pub import logs
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.settings import Settings
from kaireon_pub.supervisor.heartbeat import Heartbeat

log = logging.getLogger("kaireon_pub.supervisor")

MAX_BOOT_FAILURES = 5  # in a row, per slot (or of the HTTP process), before the supervisor gives up (exit 4)
# At stop, between the HTTP child's first TERM and its KILL: the child is gone within a second of
# its signal (issue 25, case 8). An HTTP child stops in a few ms when it can run its handler.
HTTP_STOP_GRACE_S = 0.7


@dataclass
class Child:
    slot: int
    pid: int
    worker_id: uuid.UUID
    heartbeat: Heartbeat
    started: float
    kill_at: float | None = None

    @property
    def beat_seen(self) -> bool:
        return self.heartbeat.seen


@dataclass
class SlotState:
    boot_failures: int = 0
    respawn_at: float = 0.0
    backoff: float = 0.1
    dead_worker_ids: list[uuid.UUID] = field(default_factory=list)


def send_signal(pid: int, sig: int) -> None:
    """os.kill, except that a child already gone is not an error."""
    try:
        os.kill(pid, sig)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


class HttpChild:
    """The HTTP process of a supervisor: `pid` while it runs, `port` once it listens."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic,
                 signal_fn: Callable[[int, int], None] = send_signal):
        self.settings = settings
        self.clock = clock  # the tests' fake clock and fake kill; time.monotonic and send_signal
        self.signal_fn = signal_fn
        self.pid: int | None = None
        self.kill_at: float | None = None  # at stop: when the HTTP child gets SIGKILL
        self.respawn_at = 0.0
        self.failures = 0
        self.port: int | None = None
        self.port_pipe: int | None = None

    def spawn(self, in_child: Callable[[], None]) -> None:
        """Fork it; `in_child` undoes the supervisor's state in the child first."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = ExitCode.CRASH
            try:
                in_child()
                logs.set_role("http")
                os.close(read_fd)
                from kaireon_pub.http.server import http_child_main

                code = http_child_main(self.settings, write_fd)
            except BaseException:  # noqa: BLE001
                logging.getLogger("kaireon_pub.http").exception(
                    "http server failed", extra={"errorId": new_error_id(), "event": "http crashed"})
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(write_fd)
        self.pid = pid
        self.port_pipe = read_fd
        os.set_blocking(read_fd, False)

    def due(self, now: float) -> bool:
        """Not running, and its respawn back-off is over."""
        return self.pid is None and now >= self.respawn_at

    def stop(self) -> None:
        """SIGTERM to the HTTP child (again on each pass), then SIGKILL if it has not exited
        HTTP_STOP_GRACE_S after the first: it holds nothing a drain must wait for (a reaper run
        cut short rolls back), and a child that cannot run its handler must not hold the
        supervisor until the drain budget ends. The supervisor's loop sleeps at most
        `wait_before_next_stop()`, so the KILL is not late by a pass."""
        now = self.clock()
        if self.kill_at is None:
            self.kill_at = now + HTTP_STOP_GRACE_S
            log.info("stopping the http server", extra={
                "event": "http stopping", "httpPid": self.pid, "graceSeconds": HTTP_STOP_GRACE_S})
        elif self.kill_at == float("inf"):
            return  # killed: only its reaping is left
        elif now >= self.kill_at:
            log.error("http server did not stop after its signal; killing it", extra={
                "event": "http kill", "errorId": new_error_id(), "httpPid": self.pid,
                "graceSeconds": HTTP_STOP_GRACE_S})
            self.signal_fn(self.pid, signal.SIGKILL)
            self.kill_at = float("inf")
            return
        self.signal_fn(self.pid, signal.SIGTERM)

    def wait_before_next_stop(self, longest: float) -> float:
        """How long the supervisor may sleep before its next pass: `longest`, or less when the
        HTTP child's KILL is due sooner."""
        if self.pid is None or self.kill_at is None or self.kill_at == float("inf"):
            return longest
        return max(0.0, min(longest, self.kill_at - self.clock()))

    def read_port(self) -> None:
        if self.port_pipe is None:
            return
        try:
            data = os.read(self.port_pipe, 64)
        except BlockingIOError:
            return
        if data.strip():
            self.port = int(data.split()[0])
            self.failures = 0
            log.info(f"http server listening on port {self.port}",
                     extra={"event": "http listening", "port": self.port})
        os.close(self.port_pipe)
        self.port_pipe = None

    def exited(self, code: int) -> bool:
        """It exited outside a stop: respawn it after a back-off; True when it failed too often
        (the tier stops, exit 4)."""
        error_id = new_error_id()
        self.failures += 1
        if self.failures >= MAX_BOOT_FAILURES:
            log.critical("http server failed to start again and again (port taken?); stopping the tier",
                         extra={"event": "boot failed", "errorId": error_id, "exitCode": code,
                                "port": self.settings.http_port})
            return True
        delay = min(0.5 * 2 ** self.failures, 10.0)
        log.error("http server exited; respawning", extra={
            "event": "http exited", "exitCode": code, "errorId": error_id, "respawnInSeconds": delay})
        self.respawn_at = time.monotonic() + delay
        return False
