"""The worker process's entry point, run in the child right after fork().

Everything that owns threads or sockets (the uvloop event loop, the connection pool, the
librdkafka producer) is created here, never in the supervisor. The modules are imported by the
supervisor before it forks (an import creates neither), so a new worker does not import them again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid

import uvloop

from kaireon_pub import logs
from kaireon_pub.errors import ConfigError, ExitCode, new_error_id
from kaireon_pub.settings import Settings
from kaireon_pub.supervisor.heartbeat import beater
from kaireon_pub.worker.loop import Worker

log = logging.getLogger("kaireon_pub.worker")


def worker_main(settings: Settings, slot: int, worker_id: uuid.UUID, heartbeat_fd: int,
                dead_worker_ids: list[uuid.UUID]) -> int:
    logs.set_role(f"worker-{slot}")
    # The supervisor's handlers are inherited through fork(); the worker installs its own.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which forwards TERM

    worker = Worker(settings, slot, worker_id, beater(heartbeat_fd), dead_worker_ids)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
        log.info("worker started", extra={"event": "worker started", "slot": slot, "workerId": str(worker_id)})
        return await worker.run()

    try:
        return uvloop.run(main())
    except ConfigError as exc:
        log.error(f"invalid configuration: {exc}", extra={
            "event": "config invalid", "errorId": new_error_id(), "variable": exc.variable,
            "problem": exc.problem, "accepted": exc.accepted})
        return ExitCode.CONFIG
    except Exception:  # noqa: BLE001 - a crash is logged with an id and a distinct code
        log.exception("worker crashed", extra={"event": "worker crashed", "errorId": new_error_id()})
        return ExitCode.CRASH
