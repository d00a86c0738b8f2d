"""The supervisor: forks the workers and the HTTP process, watches them, drains them.

It owns no threads, no sockets and no database connection, so fork() is always safe. Signal
handlers only enqueue the signal; the main loop dispatches it. Every half second the loop reaps
exited children (respawning with back-off), kills workers whose heartbeat is older than
OUTBOX_WORKER_TIMEOUT_SECONDS, and touches the liveness file only while every worker is fresh.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from kaireon_pub import logs
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.redact import redacted_producer_config
from kaireon_pub.settings import Settings
from kaireon_pub.supervisor import liveness, preflight
from kaireon_pub.supervisor.heartbeat import Heartbeat

log = logging.getLogger("kaireon_pub.supervisor")

BOOT_WINDOW_S = 10.0  # a worker that dies sooner than this without a heartbeat failed to boot
MAX_BOOT_FAILURES = 5  # in a row, per slot, before the supervisor gives up (exit 4)
KILL_GRACE_S = 2.0  # between TERM and KILL for a hung worker
HTTP_STOP_GRACE_S = 1.5  # at stop, between the HTTP child's TERM and KILL


@dataclass
class Child:
    slot: int  # -1 for the HTTP process
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


class Arbiter:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGQUIT)

    def __init__(self, settings: Settings):
        self.settings = settings
        self.children: dict[int, Child] = {}
        self.slots = {slot: SlotState() for slot in range(settings.workers)}
        self.signal_queue: list[int] = []
        self.stopping = False
        self.killed = False
        self.stop_deadline = float("inf")
        self.exit_code = ExitCode.OK
        self.http_pid: int | None = None
        self.http_kill_at: float | None = None  # at stop: when the HTTP child gets SIGKILL
        self.http_respawn_at = 0.0
        self.http_failures = 0
        self.http_port: int | None = None
        self.http_port_pipe: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # ---- setup ------------------------------------------------------------------------------

    def _prepare_metrics_dir(self) -> None:
        # Must happen before prometheus_client is imported anywhere in this process tree.
        # A directory of our own making is removed at exit; a configured one is the operator's.
        self.owns_metrics_dir = not self.settings.prometheus_multiproc_dir
        path = self.settings.prometheus_multiproc_dir or tempfile.mkdtemp(prefix="kaireon-metrics-")
        if os.path.isdir(path):
            for name in os.listdir(path):
                full = os.path.join(path, name)
                if os.path.isfile(full):
                    os.unlink(full)
                else:
                    shutil.rmtree(full, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        self.metrics_dir = path

    def _install_signals(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._enqueue_signal)

    def _enqueue_signal(self, signum: int, _frame: object) -> None:
        # No logging here: just queue it and wake the loop.
        self.signal_queue.append(signum)
        try:
            os.write(self._wake_w, b".")
        except OSError:
            pass

    # ---- main loop -----------------------------------------------------------------------------

    def run(self) -> int:
        logs.set_role("supervisor")
        problem = preflight.check_producer_config(self.settings)
        if problem is not None:
            # Before any child exists: a bad configuration never starts half a tier.
            log.error(f"invalid configuration: {problem}", extra={
                "event": "config invalid", "errorId": new_error_id(), "variable": problem.variable,
                "problem": problem.problem, "accepted": problem.accepted})
            return ExitCode.CONFIG
        self._prepare_metrics_dir()
        from kaireon_pub import metrics

        # What every worker imports (uvloop, psycopg_pool, librdkafka's binding, the worker's own
        # modules), imported once here and shared by fork(): importing creates no thread and no
        # socket, and a worker goes straight to its first lease round instead of every child
        # importing the same modules at once on the same cores (0.1 s idle, far more when loaded).
        from kaireon_pub.worker import main as _worker_main  # noqa: F401

        self.metrics = metrics
        self._install_signals()
        log.info("supervisor starting", extra={
            "event": "supervisor started", "workers": self.settings.workers,
            "metricsDir": self.metrics_dir, "producer": redacted_producer_config(self.settings.producer_config)})
        self._spawn_http()
        for slot in self.slots:
            self.spawn_worker(slot)
        while True:
            self._sleep(0.5)
            self._dispatch_signals()
            self.reap_children()
            if self.stopping:
                if not self._workers() and self.http_pid is None:
                    break
                if not self._workers() and self.http_pid is not None:
                    self._stop_http()
                if time.monotonic() >= self.stop_deadline and not self.killed:
                    self.killed = True
                    self.kill_all(signal.SIGKILL)
                continue
            self.murder_hung_workers()
            self.spawn_missing()
            self.update_liveness()
        log.info("supervisor stopped", extra={"event": "supervisor stopped", "exitCode": self.exit_code})
        if self.owns_metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return self.exit_code

    def _sleep(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
            if ready:
                while os.read(self._wake_r, 4096) == 4096:
                    pass
        except InterruptedError:
            pass

    def _dispatch_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self.handle_stop(signum)

    def handle_stop(self, signum: int, exit_code: int | None = None) -> None:
        if exit_code is not None and self.exit_code == ExitCode.OK:
            self.exit_code = exit_code
        now = time.monotonic()
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = now + self.settings.shutdown_drain_timeout_ms / 1000
            log.info("draining: workers stop claiming and finish their batch", extra={
                "event": "drain started", "signal": signal.Signals(signum).name if signum else None,
                "drainBudgetMs": self.settings.shutdown_drain_timeout_ms})
        else:
            # A second signal shortens the drain.
            self.stop_deadline = min(self.stop_deadline, now + 2.0)
            log.info("second stop signal: shortening the drain", extra={"event": "drain shortened"})
        for child in self._workers():
            self._signal(child.pid, signal.SIGTERM)

    # ---- children -------------------------------------------------------------------------------

    def _workers(self) -> list[Child]:
        return [c for c in self.children.values() if c.slot >= 0]

    def spawn_worker(self, slot: int) -> None:
        state = self.slots[slot]
        worker_id = uuid.uuid4()
        heartbeat = Heartbeat()
        dead = list(state.dead_worker_ids)
        pid = os.fork()
        if pid == 0:
            code = ExitCode.CRASH
            try:
                self._in_child()
                logs.set_role(f"worker-{slot}")
                from kaireon_pub.worker.main import worker_main

                code = worker_main(self.settings, slot, worker_id, heartbeat.fileno(), dead)
            except BaseException:  # noqa: BLE001 - the child must never return into the supervisor
                logging.getLogger("kaireon_pub.worker").exception(
                    "worker failed", extra={"errorId": new_error_id(), "event": "worker crashed"})
            finally:
                logging.shutdown()
                os._exit(code)
        state.dead_worker_ids = []
        self.children[pid] = Child(slot, pid, worker_id, heartbeat, time.monotonic())
        log.info("worker spawned", extra={"event": "worker spawned", "slot": slot, "workerPid": pid,
                                          "workerId": str(worker_id)})

    def _spawn_http(self) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = ExitCode.CRASH
            try:
                self._in_child()
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
        self.http_pid = pid
        self.http_port_pipe = read_fd
        os.set_blocking(read_fd, False)

    def _in_child(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        for child in self.children.values():
            child.heartbeat.close()

    def _stop_http(self) -> None:
        """SIGTERM to the HTTP child (again on each pass), then SIGKILL if it has not exited
        HTTP_STOP_GRACE_S after the first: it holds nothing a drain must wait for (a reaper run
        cut short rolls back), and a child that cannot run its handler must not hold the
        supervisor until the drain budget ends."""
        now = time.monotonic()
        if self.http_kill_at is None:
            self.http_kill_at = now + HTTP_STOP_GRACE_S
        elif now >= self.http_kill_at:
            log.error("http server did not stop after its signal; killing it", extra={
                "event": "http kill", "errorId": new_error_id(), "httpPid": self.http_pid,
                "graceSeconds": HTTP_STOP_GRACE_S})
            self._signal(self.http_pid, signal.SIGKILL)
            self.http_kill_at = float("inf")
            return
        self._signal(self.http_pid, signal.SIGTERM)

    def _read_http_port(self) -> None:
        if self.http_port_pipe is None:
            return
        try:
            data = os.read(self.http_port_pipe, 64)
        except BlockingIOError:
            return
        if data.strip():
            self.http_port = int(data.split()[0])
            self.http_failures = 0
            log.info(f"http server listening on port {self.http_port}",
                     extra={"event": "http listening", "port": self.http_port})
        os.close(self.http_port_pipe)
        self.http_port_pipe = None

    def reap_children(self) -> None:
        self._read_http_port()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            self.metrics_dead(pid)
            if pid == self.http_pid:
                self.http_pid = None
                if not self.stopping:
                    self._http_exited(code)
                continue
            child = self.children.pop(pid, None)
            if child is None:
                continue
            child.heartbeat.close()
            self._worker_exited(child, code)

    def _http_exited(self, code: int) -> None:
        error_id = new_error_id()
        self.http_failures += 1
        if self.http_failures >= MAX_BOOT_FAILURES:
            log.critical("http server failed to start again and again (port taken?); stopping the tier",
                         extra={"event": "boot failed", "errorId": error_id, "exitCode": code,
                                "port": self.settings.http_port})
            self.handle_stop(0, exit_code=ExitCode.WORKER_BOOT)
            return
        delay = min(0.5 * 2 ** self.http_failures, 10.0)
        log.error("http server exited; respawning", extra={
            "event": "http exited", "exitCode": code, "errorId": error_id, "respawnInSeconds": delay})
        self.http_respawn_at = time.monotonic() + delay

    def metrics_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.metrics_dir)

    def _worker_exited(self, child: Child, code: int) -> None:
        state = self.slots[child.slot]
        fields = {"slot": child.slot, "workerPid": child.pid, "exitCode": code, "workerId": str(child.worker_id)}
        if self.stopping:
            log.info("worker exited", extra={"event": "worker exited", **fields})
            return
        error_id = new_error_id()
        if code in (ExitCode.CONFIG, ExitCode.NON_TRANSIENT):
            log.error("worker exited with a fatal code; stopping the tier", extra={
                "event": "worker fatal", "errorId": error_id, **fields})
            self.handle_stop(0, exit_code=code)
            return
        booted = child.beat_seen or time.monotonic() - child.started > BOOT_WINDOW_S
        state.boot_failures = 0 if booted else state.boot_failures + 1
        state.dead_worker_ids.append(child.worker_id)
        if state.boot_failures >= MAX_BOOT_FAILURES:
            log.critical(
                f"worker slot {child.slot} failed to boot {state.boot_failures} times in a row; stopping the tier",
                extra={"event": "boot failed", "errorId": error_id, **fields})
            self.handle_stop(0, exit_code=ExitCode.WORKER_BOOT)
            return
        lived = time.monotonic() - child.started
        state.backoff = 0.1 if lived > 30 else min(state.backoff * 2, 10.0)
        state.respawn_at = time.monotonic() + state.backoff
        reason = "crash" if code != 0 else "exit"
        if code == -signal.SIGKILL or code == -signal.SIGTERM:
            reason = "killed"
        self.metrics.WORKER_RESTARTS.labels(reason).inc()
        log.error("worker exited; respawning", extra={
            "event": "worker exited", "errorId": error_id, "respawnInSeconds": round(state.backoff, 2), **fields})

    def spawn_missing(self) -> None:
        now = time.monotonic()
        occupied = {c.slot for c in self._workers()}
        for slot, state in self.slots.items():
            if slot not in occupied and now >= state.respawn_at:
                self.spawn_worker(slot)
        if self.http_pid is None and now >= self.http_respawn_at:
            self._spawn_http()

    def murder_hung_workers(self) -> None:
        now = time.monotonic()
        for child in self._workers():
            if child.kill_at is not None:
                if now >= child.kill_at:
                    self._signal(child.pid, signal.SIGKILL)
                continue
            age = child.heartbeat.age()
            limit = self.settings.worker_timeout_seconds
            if not child.beat_seen:
                limit = max(limit, BOOT_WINDOW_S * 3)
            if age > limit:
                log.error("worker heartbeat is stale; killing it", extra={
                    "event": "worker hung", "errorId": new_error_id(), "slot": child.slot,
                    "workerPid": child.pid, "heartbeatAgeSeconds": round(age, 1)})
                self.metrics.WORKER_RESTARTS.labels("hung").inc()
                self._signal(child.pid, signal.SIGTERM)
                child.kill_at = now + KILL_GRACE_S

    def update_liveness(self) -> None:
        workers = self._workers()
        fresh = [c for c in workers
                 if c.kill_at is None and c.heartbeat.age() <= self.settings.worker_timeout_seconds
                 and c.beat_seen]
        self.metrics.WORKERS_ALIVE.set(len(fresh))
        if len(fresh) == len(self.slots):
            liveness.touch(self.settings.liveness_file)

    def kill_all(self, sig: int) -> None:
        for child in self._workers():
            log.warning("drain deadline reached; killing worker", extra={
                "event": "drain deadline", "slot": child.slot, "workerPid": child.pid})
            self._signal(child.pid, sig)
        if self.http_pid is not None:
            self._signal(self.http_pid, sig)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

