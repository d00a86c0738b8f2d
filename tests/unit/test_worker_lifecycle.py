"""TaskSet and every() without services: a side task that dies is logged with an errorId, counted
and restarted after a back-off, or stops the worker; the periodic loop's pauses, its end and its
errors."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kaireon_pub import metrics
from kaireon_pub.worker import lifecycle
from kaireon_pub.worker.lifecycle import TaskSet, every


def died(caplog) -> list:
    return [r for r in caplog.records if getattr(r, "event", None) == "side task died"]


def test_a_restartable_task_that_dies_is_logged_counted_and_restarted_after_a_backoff(caplog):
    pauses: list[float] = []
    fatal: list[str] = []
    runs = 0

    async def sleep(delay: float) -> None:
        pauses.append(delay)

    async def chore() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError(f"bug {runs}")  # recovers on its fourth run, then ends

    async def main() -> TaskSet:
        tasks = TaskSet(fatal.append, sleep=sleep)
        await tasks.start("gauges", chore)
        return tasks

    before = metrics.SIDE_TASK_DEATHS.labels("gauges")._value.get()
    tasks = asyncio.run(main())
    assert runs == 4 and tasks.deaths["gauges"] == 3 and fatal == []
    assert metrics.SIDE_TASK_DEATHS.labels("gauges")._value.get() - before == 3  # kaireon_outbox_side_task_deaths_total
    assert pauses == [1.0, 2.0, 4.0]
    lines = died(caplog)
    assert [(r.task, r.deaths, r.restartInSeconds, r.isTransient) for r in lines] == [
        ("gauges", 1, 1.0, True), ("gauges", 2, 2.0, True), ("gauges", 3, 4.0, True)]
    assert all(r.errorId and r.levelno == logging.ERROR and r.exc_info for r in lines)
    assert len({r.errorId for r in lines}) == 3 and "bug 1" in lines[0].getMessage()


def test_a_task_the_worker_must_not_run_without_stops_the_worker(caplog):
    fatal: list[str] = []

    async def keeper() -> None:
        raise RuntimeError("bug")

    async def main() -> TaskSet:
        tasks = TaskSet(fatal.append)
        await tasks.start("lease-keeper", keeper, restart=False)
        return tasks

    tasks = asyncio.run(main())
    assert fatal == ["lease-keeper"] and tasks.deaths["lease-keeper"] == 1
    (line,) = died(caplog)
    assert line.task == "lease-keeper" and line.errorId and line.isTransient is False
    assert "stopping the worker" in line.getMessage()


def test_a_task_that_lived_long_restarts_after_the_first_backoff_again(monkeypatch):
    now = [0.0]
    pauses: list[float] = []
    runs = 0

    async def sleep(delay: float) -> None:
        pauses.append(delay)

    async def chore() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            now[0] += lifecycle.RESTART_MAX_S  # ran a long time before this death
        if runs <= 3:
            raise RuntimeError("bug")

    async def main() -> None:
        await TaskSet(lambda _name: None, sleep=sleep, clock=lambda: now[0]).start("purge", chore)

    asyncio.run(main())
    assert pauses == [1.0, 2.0, 1.0]


def test_stop_cancels_every_task():
    async def main() -> list[asyncio.Task]:
        tasks = TaskSet(lambda _name: None)
        forever = [tasks.start(name, lambda: asyncio.sleep(3600)) for name in ("a", "b")]
        await asyncio.sleep(0)
        await tasks.stop()
        return forever

    assert all(t.cancelled() for t in asyncio.run(main()))


def test_every_pauses_as_each_pass_says_and_ends_on_none_or_stop(monkeypatch):
    pauses: list[float] = []

    async def sleep(delay: float) -> None:
        pauses.append(delay)

    monkeypatch.setattr(lifecycle.asyncio, "sleep", sleep)
    answers = [0.5, 2.0, None, 9.0]

    async def once():
        return answers.pop(0)

    asyncio.run(every(once, lambda: False))
    assert pauses == [0.5, 2.0] and answers == [9.0]
    passes = []

    async def counted():
        passes.append(1)
        return 1.0

    asyncio.run(every(counted, lambda: len(passes) >= 2))
    assert len(passes) == 2


def test_every_hands_a_failed_pass_to_on_error_or_raises_without_one(monkeypatch):
    pauses: list[float] = []

    async def sleep(delay: float) -> None:
        pauses.append(delay)

    monkeypatch.setattr(lifecycle.asyncio, "sleep", sleep)
    results = [ValueError("x"), 1.0, None]

    async def once():
        r = results.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    errors: list[Exception] = []
    asyncio.run(every(once, lambda: False, on_error=lambda exc: errors.append(exc) or 7.0))
    assert pauses == [7.0, 1.0] and isinstance(errors[0], ValueError)

    async def broken():
        raise ValueError("bug")

    with pytest.raises(ValueError):
        asyncio.run(every(broken, lambda: False))
