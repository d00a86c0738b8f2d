"""The named blocks of db/ops_queries.sql, parsed like queries.sql: `OPS.pending_heads` is SQL."""

from __future__ import annotations

from importlib import resources
from types import SimpleNamespace

from kaireon_pub.db.queries import parse

OPS = SimpleNamespace(**parse(resources.files("kaireon_pub.db").joinpath("ops_queries.sql").read_text()))
