"""The named blocks of db/audit.sql (`AUDIT.locate_row`), and a row of theirs as the worker's Row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kaireon_pub.db.queries import load
from kaireon_pub.worker.rows import Row

AUDIT = load("audit.sql")
ROW_COLUMNS = len(Row._fields)  # audit_row_columns: the first columns of every statement that includes it


def as_row(values: Sequence[Any]) -> Row:
    """The Row that audit_row_columns' leading columns describe (the rest: the statement's own)."""
    return Row(*values[:ROW_COLUMNS])
