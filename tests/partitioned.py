"""pytest plugin: run any test module against a partitioned outbox (`-p tests.partitioned`).

The session's template database is then migrated with OUTBOX_PARTITIONING=hourly (the partitioned
flavour of the migrations, partitions made from the current hour ahead), so every test database
made from it has a partitioned outbox_events:

    .venv/bin/python -m pytest -p tests.partitioned tests/integration/test_claim.py tests/e2e/test_publish.py
"""

from __future__ import annotations


def pytest_configure(config) -> None:
    from kaireon_pub.db import migrate

    migrate.migrate.__kwdefaults__["partitioning"] = "hourly"
