"""The supervisor: forks the workers and the HTTP process, watches them, drains them.

It owns no threads, no sockets and no database connection, so fork() is always safe. Signal
handlers only enqueue the signal; the main loop dispatches it. Every half second the loop reaps
exited children (respawning with back-off), kills workers whose heartbeat is older than
OUTBOX_WORKER_TIMEOUT_SECONDS, and touches the liveness file only while every worker is fresh.

Beside it: both ends of the heartbeat (heartbeat.py), what is kept about each child and the HTTP
process's spawn, respawn and stop (children.py), the metrics directory (metrics_dir.py).
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import time
import uuid

from kaireon_pub import logs
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.redact import redacted_producer_config
from kaireon_pub.settings import Settings
from kaireon_pub.supervisor import liveness, metrics_dir, preflight
from kaireon_pub.supervisor.children import (
    MAX_BOOT_FAILURES,
    Child,
    HttpChild,
    SlotState,
    send_signal,
)
from kaireon_pub.supervisor.heartbeat import Heartbeat

log = logging.getLogger("kaireon_pub.supervisor")

BOOT_WINDOW_S = 10.0  # a worker that dies sooner than this without a heartbeat failed to boot
KILL_GRACE_S = 2.0  # between TERM and KILL for a hung worker


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
        self.http = HttpChild(settings)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # ---- setup ------------------------------------------------------------------------------

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
        self.metrics_dir, self.owns_metrics_dir = metrics_dir.prepare(self.settings.prometheus_multiproc_dir)
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
        self.http.spawn(self._in_child)
        for slot in self.slots:
            self.spawn_worker(slot)
        while True:
            self._sleep(self.http.wait_before_next_stop(0.5))
            self._dispatch_signals()
            self.reap_children()
            if self.stopping:
                if not self._workers() and self.http.pid is None:
                    break
                if not self._workers() and self.http.pid is not None:
                    self.http.stop()
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

    def _in_child(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        for child in self.children.values():
            child.heartbeat.close()

    def reap_children(self) -> None:
        self.http.read_port()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            self.metrics_dead(pid)
            if pid == self.http.pid:
                self.http.pid = None
                if not self.stopping and self.http.exited(code):
                    self.handle_stop(0, exit_code=ExitCode.WORKER_BOOT)
                continue
            child = self.children.pop(pid, None)
            if child is None:
                continue
            child.heartbeat.close()
            self._worker_exited(child, code)

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
        if self.http.due(now):
            self.http.spawn(self._in_child)

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
        if self.http.pid is not None:
            self._signal(self.http.pid, sig)

    _signal = staticmethod(send_signal)

