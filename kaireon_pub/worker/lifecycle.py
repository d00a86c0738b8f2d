"""The worker's side tasks, watched, and the one periodic-loop skeleton they share.

`TaskSet` starts named tasks beside the claim loop and watches each: a task that raises is logged
(`side task died`, with an `errorId`), counted, and then, as its start chose, either restarted
after a back-off or the worker is asked to stop. `every()` is the loop of the periodic chores:
one pass, a pause that the pass (or its failure) chooses, until the worker stops.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable

from kaireon_pub import metrics
from kaireon_pub.errors import new_error_id

log = logging.getLogger("kaireon_pub.worker")

RESTART_FIRST_S = 1.0  # the first restart's back-off; doubled after each death, up to RESTART_MAX_S
RESTART_MAX_S = 60.0  # also: a task that ran this long before it died starts from RESTART_FIRST_S again


async def every(once: Callable[[], Awaitable[float | None]], stopping: Callable[[], bool], *,
                on_error: Callable[[Exception], float] | None = None) -> None:
    """Run `once()` until `stopping()`. `once` returns the seconds to pause before the next pass, or
    None when its job is done for good (e.g. no partitions on a plain table). An exception from a
    pass goes to `on_error`, which logs it and returns the pause; without `on_error` it ends the
    loop (a `TaskSet` reports it)."""
    while not stopping():
        try:
            delay = await once()
        except Exception as exc:
            if on_error is None:
                raise
            delay = on_error(exc)
        if delay is None:
            return
        await asyncio.sleep(delay)


class TaskSet:
    """Named side tasks, each watched.

    A task started with `restart=True` is a chore whose state lives outside it (a gauge refresh, a
    purge pass, the broker watch): when it raises, it is logged and started again after a back-off
    (1 s, doubling to 60 s). One started with `restart=False` is one the worker must not run
    without (the lease keeper: its death would leave renewals to chance): when it raises, it is
    logged and `on_fatal(name)` asks the worker to stop; the drain releases its shards and the
    supervisor starts a fresh worker. A task that returns has finished its job and is not restarted.
    `deaths` counts the deaths of each task. `stop()` cancels them all, the last started first.
    """

    def __init__(self, on_fatal: Callable[[str], None], *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.on_fatal = on_fatal
        self.tasks: dict[str, asyncio.Task] = {}
        self.deaths: collections.Counter[str] = collections.Counter()
        self._sleep = sleep
        self._clock = clock

    def start(self, name: str, run: Callable[[], Awaitable[None]], *, restart: bool = True) -> asyncio.Task:
        metrics.SIDE_TASK_DEATHS.labels(name)  # the series exists at 0: a first death shows as an increase
        task = asyncio.create_task(self._watch(name, run, restart), name=name)
        self.tasks[name] = task
        return task

    async def _watch(self, name: str, run: Callable[[], Awaitable[None]], restart: bool) -> None:
        delay = RESTART_FIRST_S
        while True:
            started = self._clock()
            try:
                await run()
                return
            except Exception as exc:  # noqa: BLE001 - a side task's death is logged with an id and acted on
                self.deaths[name] += 1
                metrics.SIDE_TASK_DEATHS.labels(name).inc()
                if self._clock() - started >= RESTART_MAX_S:
                    delay = RESTART_FIRST_S
                fields = {"event": "side task died", "task": name, "errorId": new_error_id(),
                          "deaths": self.deaths[name], "isTransient": restart}
                if not restart:
                    log.error(f"side task {name} died: {type(exc).__name__}: {exc}; stopping the worker",
                              exc_info=exc, extra=fields)
                    self.on_fatal(name)
                    return
                log.error(f"side task {name} died: {type(exc).__name__}: {exc}; restarting it",
                          exc_info=exc, extra={**fields, "restartInSeconds": delay})
            await self._sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for task in reversed(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
