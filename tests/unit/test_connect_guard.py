"""The guard of kaireon_pub/db/connect.py on psycopg's private pipeline internals (issue 26).

The pooled connection classes end a pipeline with `_exit_without_flush`, which replaces psycopg's
private `_exit_gen` and calls its `_enqueue_sync`, `_communicate_gen` and `_fetch_gen(flush=…)`.
A psycopg whose internals differ must be refused loudly, naming its version and what differs,
when a transaction-mode connection class is made; session mode does not use them."""

from __future__ import annotations

import psycopg
import pytest

from kaireon_pub.db import connect as c
from kaireon_pub.settings import Settings

BASE = {"DATABASE_URL": "postgresql://u@db/x", "KAFKA_BOOTSTRAP_SERVERS": "x:1"}
TRANSACTION = Settings.from_env({**BASE, "OUTBOX_POOL_MODE": "transaction"})
SESSION = Settings.from_env(BASE)


@pytest.fixture(autouse=True)
def _fresh_check():
    c.check_pipeline_internals.cache_clear()
    yield
    c.check_pipeline_internals.cache_clear()


def test_the_installed_psycopg_passes_and_the_pooled_classes_end_pipelines_without_the_flush():
    c.check_pipeline_internals()
    for asynchronous in (True, False):
        cls = c.connection_class(TRANSACTION, "worker-0.0123abcd", asynchronous=asynchronous)
        assert issubclass(cls, c.PooledAsyncConnection if asynchronous else c.PooledConnection)
    assert c._SyncEndedPipeline._exit_gen is c._exit_without_flush
    assert c._SyncEndedAsyncPipeline._exit_gen is c._exit_without_flush
    assert c.VERIFIED_PSYCOPG  # named in the error


def _no_flush_parameter(self):  # a _fetch_gen that lost its `flush` keyword
    yield from ()


def _exit_without_exit_gen(self, exc_type, exc_val, exc_tb):  # a __exit__ that no longer calls it
    self._conn.wait(self._finish_gen())


def _exit_gen_with_more(self):  # psycopg's own exit doing one thing more than the one replaced
    self._enqueue_sync()
    yield from self._communicate_gen()
    yield from self._fetch_gen(flush=True)
    self._something_new()


CHANGES = {
    "_fetch_gen gone": (psycopg._pipeline_base.BasePipeline, "_fetch_gen", None, "`_fetch_gen(flush=…)`"),
    "_enqueue_sync gone": (psycopg._pipeline_base.BasePipeline, "_enqueue_sync", None, "`_enqueue_sync()`"),
    "_fetch_gen without flush": (psycopg._pipeline_base.BasePipeline, "_fetch_gen", _no_flush_parameter,
                                 "`_fetch_gen(flush=…)`"),
    "__exit__ no longer calls _exit_gen": (psycopg.Pipeline, "__exit__", _exit_without_exit_gen, "call `_exit_gen()`"),
    "_exit_gen changed": (psycopg._pipeline_base.BasePipeline, "_exit_gen", _exit_gen_with_more, "its `_exit_gen` is"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_psycopg_whose_pipeline_differs_is_refused_naming_its_version_and_what(monkeypatch, change):
    owner, name, replacement, named = CHANGES[change]
    if replacement is None:
        monkeypatch.delattr(owner, name)
    else:
        monkeypatch.setattr(owner, name, replacement)
    monkeypatch.setattr(psycopg, "__version__", "3.9.0")
    for make in (c.check_pipeline_internals,
                 lambda: c.connection_class(TRANSACTION, "reaper", asynchronous=False),
                 lambda: c.async_connector(TRANSACTION, "worker-0.0123abcd", publisher=True)):
        with pytest.raises(RuntimeError) as raised:
            make()
        message = str(raised.value)
        assert "psycopg 3.9.0" in message
        assert c.VERIFIED_PSYCOPG in message
        assert named in message, message
        assert "_exit_without_flush" in message


def test_a_connection_that_no_longer_takes_its_pipeline_is_refused(monkeypatch):
    def pipeline(self):  # makes one of its own whatever `_pipeline` holds
        return psycopg.Pipeline(self)
    monkeypatch.setattr(psycopg.Connection, "pipeline", pipeline)
    with pytest.raises(RuntimeError, match=r"`pipeline\(\)` takes a connection's `_pipeline`"):
        c.check_pipeline_internals()


def test_session_mode_does_not_depend_on_them(monkeypatch):
    monkeypatch.delattr(psycopg._pipeline_base.BasePipeline, "_fetch_gen")
    assert c.connection_class(SESSION, "status", asynchronous=False) is psycopg.Connection
    assert c.connection_class(SESSION, "worker-0.0123abcd") is psycopg.AsyncConnection


def test_a_passing_check_is_made_once(monkeypatch):
    c.check_pipeline_internals()
    monkeypatch.delattr(psycopg._pipeline_base.BasePipeline, "_fetch_gen")
    c.check_pipeline_internals()  # cached: the tier checks at its first pooled connection class, not at each
