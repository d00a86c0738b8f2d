"""The e2e tests' fixtures, on the harness in tests/helpers.py: a tier started against the test's
database and broker, and readers of a topic that are closed whatever the test's outcome.

The services themselves (`pg`, `db_url`, `broker`, `run_tier`, …) are tests/conftest.py's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests import helpers
from tests.roles import Roles, TierDatabase


@pytest.fixture
def start_tier(request, tmp_path, run_tier):
    """Factory: start_tier(**env) runs `kaireon-pub run` with helpers.tier_env plus `env`, against
    the test's `db_url` and the session's `broker` unless `db_url=`/`bootstrap=` name others.
    `name=` gives the tier a directory of its own under tmp_path (several tiers in one test).
    Every tier is killed at teardown (run_tier)."""
    def start(*, name: str | None = None, db_url: str | None = None, bootstrap: str | None = None,
              **env: str) -> helpers.Tier:
        db_url = db_url or request.getfixturevalue("db_url")
        bootstrap = bootstrap or request.getfixturevalue("broker").bootstrap
        run_dir = tmp_path
        if name is not None:
            run_dir = tmp_path / name
            run_dir.mkdir(exist_ok=True)
        return run_tier(helpers.tier_env(db_url, bootstrap, run_dir, **env), name=name or "tier")
    return start


@pytest.fixture
def topic_reader(request) -> Iterator[object]:
    """Factory: topic_reader(topic) reads `topic` on the session's broker (or on `bootstrap=`) from
    the beginning; every reader is closed at teardown, also when the test failed."""
    with contextlib.ExitStack() as readers:
        def open_reader(topic: str, bootstrap: str | None = None) -> helpers.TopicReader:
            bootstrap = bootstrap or request.getfixturevalue("broker").bootstrap
            return readers.enter_context(helpers.TopicReader(bootstrap, topic))
        yield open_reader


@pytest.fixture
def tier_role() -> str:
    """The role the test's tier runs as: the superuser, unless the test parametrizes `tier_role`
    (tests.roles.TIER_ROLES: "superuser", "runtime")."""
    return "superuser"


@pytest.fixture
def tier_db(request, tier_role) -> Iterator[TierDatabase]:
    """The test's outbox database for `tier_role`: `db_url` for the superuser; for "runtime", a
    database of fresh roles (tests/roles.py: migrated by its owner, the runtime and read-only roles
    given `kaireon-pub grants --no-read-all-stats`), dropped at the end. Request it before a fixture
    that must be undone while the database exists (a prepared transaction keeps it from being dropped)."""
    if tier_role == "superuser":
        yield TierDatabase.single(request.getfixturevalue("db_url"))
        return
    assert tier_role == "runtime", tier_role
    with Roles(request.getfixturevalue("pg")).create(read_all_stats=False) as roles:
        yield roles.tier_database()
