"""Connections of the tier's own sessions (the application's connections are its own).

Two pool modes (OUTBOX_POOL_MODE):

- `session` (the default): DATABASE_URL reaches PostgreSQL, or a pooler that gives each client a
  server session of its own. The session settings travel as libpq startup parameters
  (`options=-c …`, `application_name`) and hold for the life of the connection.
- `transaction`: DATABASE_URL is a transaction pooler (PgBouncer `pool_mode=transaction`). A
  client holds a server connection only for one transaction, and the next transaction may run on
  a server connection another client used last. So: no `options` startup parameter (PgBouncer
  refuses it: "unsupported startup parameter"), no server-side prepared statements
  (`prepare_threshold=None`: PgBouncer 1.18 cannot route them), and the settings the tier relies
  on — statement_timeout, idle_in_transaction_session_timeout, synchronous_commit and the session
  name the claim horizon knows the workers by — are set with `set_config(…, is_local => true)`
  inside every transaction of the tier, where they end with the transaction and can never be left
  on a server connection the pooler hands to an application client next. An autocommit statement
  gets them in the same implicit transaction, sent in one pipeline with the statement (one round
  trip); an explicit transaction right after its BEGIN. The startup application_name is
  `kaireon-pub:pooled`, which the horizon does not exclude: PgBouncer 1.18 gives a client that
  sends no application_name the name the server connection was opened with, so a worker's name
  must never be a server connection's session-level name (see the README, "Through PgBouncer").

LISTEN needs a session of its own: in transaction mode it goes to OUTBOX_LISTEN_DATABASE_URL (the
server itself), or the workers poll. `migrate` holds a session-level advisory lock, so in
transaction mode it runs on OUTBOX_LISTEN_DATABASE_URL too, and refuses to run without it.
Partition maintenance runs `DETACH PARTITION … CONCURRENTLY`, which cannot run inside a
transaction block, and an autocommit statement of a pooled connection shares its implicit
transaction with the settings: in transaction mode it runs on OUTBOX_LISTEN_DATABASE_URL when it
is set (`connect(…, direct=True)`); without it partitions are still made ahead, none is dropped.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.generators import send

from kaireon_pub.settings import Settings

APPLICATION_NAME = "kaireon-pub"
# The startup name of every connection to a transaction pooler: it must not match the horizon's
# `kaireon-pub:worker-%`, since PgBouncer may pass a server connection's startup name on to an
# application client that sends none.
POOLED_SESSION_NAME = f"{APPLICATION_NAME}:pooled"
CONNECT_TIMEOUT_S = 5
# Roles whose sessions need session-level state the pooler cannot keep (advisory locks).
SESSION_ROLES = frozenset({"migrate"})


def transaction_pooling(settings: Settings) -> bool:
    return settings.pool_mode == "transaction"


def session_settings(settings: Settings, role: str, *, publisher: bool = False,
                     statement_timeout_ms: int | None = None) -> dict[str, str]:
    """The server settings of one of the tier's sessions, application_name included."""
    timeout = settings.statement_timeout_ms if statement_timeout_ms is None else statement_timeout_ms
    values = {
        "statement_timeout": str(timeout),
        # A stopped worker in lock mode must not hold its row locks (its claim) for ever.
        "idle_in_transaction_session_timeout": str(settings.message_timeout_ms
                                                   + settings.shutdown_drain_timeout_ms + 5000),
    }
    if publisher:
        # A claim, mark or lease write lost in a database crash puts a row back one step, which
        # costs at most a duplicate publish (at-least-once); not waiting for the WAL flush takes
        # two fsyncs off every batch. Operator commands (requeue, reap) keep the server default.
        values["synchronous_commit"] = settings.synchronous_commit
    values["application_name"] = f"{APPLICATION_NAME}:{role}"
    return values


def session_options(settings: Settings, role: str, *, publisher: bool = False,
                    statement_timeout_ms: int | None = None) -> dict[str, object]:
    """libpq/psycopg keyword arguments of a connection to DATABASE_URL for `role`.

    `publisher=True` for a worker's own sessions, whose every write can be redone;
    `statement_timeout_ms` overrides OUTBOX_STATEMENT_TIMEOUT_MS (the lease keeper's is short).
    In transaction mode the settings are not startup parameters: the connection class made by
    `connection_class()` applies them in every transaction."""
    values = session_settings(settings, role, publisher=publisher, statement_timeout_ms=statement_timeout_ms)
    if transaction_pooling(settings):
        return {"application_name": POOLED_SESSION_NAME, "connect_timeout": CONNECT_TIMEOUT_S,
                "prepare_threshold": None}
    name = values.pop("application_name")
    options = " ".join(f"-c {key}={value}" for key, value in values.items())
    return {"application_name": name, "options": options, "connect_timeout": CONNECT_TIMEOUT_S}


def _local_settings_statement(values: dict[str, str]) -> sql.Composed:
    return sql.SQL("SELECT {}").format(sql.SQL(", ").join(
        sql.SQL("set_config({}, {}, true)").format(sql.Literal(k), sql.Literal(v)) for k, v in values.items()))


# `_exit_without_flush` replaces a private method of psycopg's pipeline and calls three more, and
# the pooled classes set a connection's private `_pipeline`: read and tested with these versions
# (the same pipeline code), refused by check_pipeline_internals when psycopg's differ.
VERIFIED_PSYCOPG = "3.2.13 to 3.3.9"


def _names(function: Any) -> frozenset[str]:
    """The names a function's code uses (the function under a decorator's wrapper)."""
    return frozenset(inspect.unwrap(function).__code__.co_names)


@functools.cache
def check_pipeline_internals() -> None:
    """Raise RuntimeError, naming the installed psycopg and what differs, unless its pipeline is the one
    `_exit_without_flush` was written for; connection_class calls it in transaction mode only."""
    pipes, calls = (psycopg.Pipeline, psycopg.AsyncPipeline), {"_enqueue_sync", "_communicate_gen", "_fetch_gen"}
    inits = lambda cls: frozenset().union(*(_names(k.__init__) for k in cls.__mro__[:-1] if "__init__" in vars(k)))  # noqa: E731
    checks = {
        "Pipeline.__exit__ and AsyncPipeline.__aexit__ call `_exit_gen()`":
            lambda: "_exit_gen" in _names(psycopg.Pipeline.__exit__) & _names(psycopg.AsyncPipeline.__aexit__),
        "its `_exit_gen` is `_enqueue_sync()`, `_communicate_gen()`, `_fetch_gen(flush=True)`":
            lambda: all(_names(p._exit_gen) == calls for p in pipes),
        "a pipeline has `_enqueue_sync()`, `_communicate_gen()` and `_fetch_gen(flush=…)`":
            lambda: all(callable(getattr(p, name, None)) for p in pipes for name in calls)
            and all("flush" in inspect.signature(p._fetch_gen).parameters for p in pipes),
        "a pipeline keeps `pgconn` and `command_queue`":
            lambda: all({"pgconn", "command_queue"} <= inits(p) for p in pipes),
        "`pipeline()` takes a connection's `_pipeline` when set": lambda: all(
            "_pipeline" in _names(c.pipeline) & inits(c) for c in (psycopg.Connection, psycopg.AsyncConnection)),
    }
    failed = []
    for what, holds in checks.items():
        with suppress(AttributeError, TypeError, ValueError):
            if holds():
                continue
        failed.append(what)
    if failed:
        raise RuntimeError(
            f"psycopg {psycopg.__version__} is not one OUTBOX_POOL_MODE=transaction was verified with "
            f"({VERIFIED_PSYCOPG}): kaireon_pub/db/connect.py replaces a private method of its pipeline (so "
            "that a transaction pooler does not hold a server connection for an idle client, issue 26), and "
            f"this one differs: not {'; not '.join(failed)}. Install a verified psycopg, or check _exit_without_flush "
            "against this one's pipeline code and extend VERIFIED_PSYCOPG")


def _exit_without_flush(pipeline: Any) -> Any:
    """psycopg's pipeline exit (3.3's `_exit_gen`), minus the Flush it sends after the closing
    Sync when replies are still unread: PgBouncer 1.18 hands that Flush to the server connection,
    which never answers it, and keeps the server with this client ("active", not ready) until the
    client's next statement, so an idle tier pinned server connections the applications needed.
    After a Sync the server flushes its output anyway; the Flush is kept only when the Sync could
    not be sent."""
    try:
        pipeline._enqueue_sync()
        yield from pipeline._communicate_gen()
        # The send loop stops with libpq's output buffer maybe still holding the statement's tail
        # and the Sync (a statement of a few MB); the Flush message pushed them out too, so send
        # them without one: the server would wait for them while we wait for its reply.
        yield from send(pipeline.pgconn)
    finally:
        yield from pipeline._fetch_gen(flush=bool(pipeline.command_queue))


class _SyncEndedPipeline(psycopg.Pipeline):
    _exit_gen = _exit_without_flush


class _SyncEndedAsyncPipeline(psycopg.AsyncPipeline):
    _exit_gen = _exit_without_flush


class PooledConnection(psycopg.Connection):
    """A connection through a transaction pooler: the session settings in every transaction."""

    local_settings: sql.Composed = _local_settings_statement({})

    def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None,
                binary: bool = False) -> psycopg.Cursor:
        if self.info.transaction_status != pq.TransactionStatus.IDLE or self._pipeline is not None:
            return super().execute(query, params, prepare=prepare, binary=binary)
        if not self.autocommit:
            super().execute(self.local_settings)  # psycopg sends BEGIN first
            return super().execute(query, params, prepare=prepare, binary=binary)
        self._pipeline = _SyncEndedPipeline(self)  # taken by pipeline(), which makes one only when there is none
        with self.pipeline():  # one implicit transaction, one round trip
            super().execute(self.local_settings)
            cur = super().execute(query, params, prepare=prepare, binary=binary)
        return cur

    @contextmanager
    def transaction(self, savepoint_name: str | None = None,
                    force_rollback: bool = False) -> Iterator[psycopg.Transaction]:
        outermost = self.info.transaction_status == pq.TransactionStatus.IDLE
        with super().transaction(savepoint_name, force_rollback) as tx:
            if outermost:
                super().execute(self.local_settings)
            yield tx


class PooledAsyncConnection(psycopg.AsyncConnection):
    """The asyncio twin of PooledConnection (the workers' pool, lease keeper and probes)."""

    local_settings: sql.Composed = _local_settings_statement({})

    async def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None,
                      binary: bool = False) -> psycopg.AsyncCursor:
        if self.info.transaction_status != pq.TransactionStatus.IDLE or self._pipeline is not None:
            return await super().execute(query, params, prepare=prepare, binary=binary)
        if not self.autocommit:
            await super().execute(self.local_settings)
            return await super().execute(query, params, prepare=prepare, binary=binary)
        self._pipeline = _SyncEndedAsyncPipeline(self)  # taken by pipeline(), as above
        async with self.pipeline():
            await super().execute(self.local_settings)
            cur = await super().execute(query, params, prepare=prepare, binary=binary)
        return cur

    @asynccontextmanager
    async def transaction(self, savepoint_name: str | None = None,
                          force_rollback: bool = False) -> Any:
        outermost = self.info.transaction_status == pq.TransactionStatus.IDLE
        async with super().transaction(savepoint_name, force_rollback) as tx:
            if outermost:
                await super().execute(self.local_settings)
            yield tx


def connection_class(settings: Settings, role: str, *, publisher: bool = False,
                     statement_timeout_ms: int | None = None, asynchronous: bool = True) -> type:
    """psycopg's connection class in session mode; in transaction mode one that re-applies this
    role's settings in every transaction."""
    if not transaction_pooling(settings):
        return psycopg.AsyncConnection if asynchronous else psycopg.Connection
    check_pipeline_internals()
    base = PooledAsyncConnection if asynchronous else PooledConnection
    values = session_settings(settings, role, publisher=publisher, statement_timeout_ms=statement_timeout_ms)
    return type(base.__name__, (base,), {"local_settings": _local_settings_statement(values)})


def async_connector(settings: Settings, role: str, *, publisher: bool = False,
                    statement_timeout_ms: int | None = None,
                    ) -> Callable[[], Awaitable[psycopg.AsyncConnection]]:
    """A function that opens one of `role`'s connections to DATABASE_URL."""
    cls = connection_class(settings, role, publisher=publisher, statement_timeout_ms=statement_timeout_ms)
    kwargs = session_options(settings, role, publisher=publisher, statement_timeout_ms=statement_timeout_ms)

    async def connect() -> psycopg.AsyncConnection:
        return await cls.connect(settings.database_url, autocommit=True, **kwargs)
    return connect


def listen_url(settings: Settings) -> str | None:
    """Where LISTEN goes: OUTBOX_LISTEN_DATABASE_URL, else DATABASE_URL in session mode; None in
    transaction mode without one (the workers poll)."""
    if settings.listen_database_url:
        return settings.listen_database_url
    return None if transaction_pooling(settings) else settings.database_url


def listen_connector(settings: Settings, role: str) -> Callable[[], Awaitable[psycopg.AsyncConnection]] | None:
    """The LISTEN connection: a plain session to the server (never through a transaction pooler),
    or None for polling."""
    url = listen_url(settings)
    if url is None:
        return None
    values = session_settings(settings, role)
    name = values.pop("application_name")
    options = " ".join(f"-c {key}={value}" for key, value in values.items())

    async def connect() -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, application_name=name,
                                                     options=options, connect_timeout=CONNECT_TIMEOUT_S)
    return connect


def connect(settings: Settings, role: str, *, autocommit: bool = True, direct: bool = False) -> psycopg.Connection:
    """One of `role`'s synchronous connections. In transaction mode, on OUTBOX_LISTEN_DATABASE_URL
    for a role of SESSION_ROLES (refused without it), and for `direct` when it is set."""
    if transaction_pooling(settings) and (role in SESSION_ROLES or (direct and settings.listen_database_url)):
        if not settings.listen_database_url:
            # A psycopg error, so that the command reports it as it reports a refused connection.
            raise psycopg.OperationalError(
                f"OUTBOX_LISTEN_DATABASE_URL is not set while OUTBOX_POOL_MODE=transaction: `{role}` holds a "
                "session-level advisory lock, which a transaction pooler cannot keep; set it to a connection "
                "string of the server itself (not the pooler)")
        values = session_settings(settings, role)
        name = values.pop("application_name")
        options = " ".join(f"-c {key}={value}" for key, value in values.items())
        return psycopg.connect(settings.listen_database_url, autocommit=autocommit, application_name=name,
                               options=options, connect_timeout=CONNECT_TIMEOUT_S)
    cls = connection_class(settings, role, asynchronous=False)
    return cls.connect(settings.database_url, autocommit=autocommit, **session_options(settings, role))


def probe_options(settings: Settings, role: str, timeout_s: int) -> dict[str, object]:
    """Keyword arguments of a one-statement probe (readiness, check) to DATABASE_URL."""
    if transaction_pooling(settings):
        return {"application_name": POOLED_SESSION_NAME, "connect_timeout": timeout_s, "prepare_threshold": None}
    return {"application_name": f"{APPLICATION_NAME}:{role}", "connect_timeout": timeout_s,
            "options": f"-c statement_timeout={timeout_s * 1000}"}
