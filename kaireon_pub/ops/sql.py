"""The named blocks of db/ops_queries.sql, through the one loader (db/queries.py): `OPS.pending_heads` is SQL."""

from __future__ import annotations

from kaireon_pub.db.queries import load

OPS = load("ops_queries.sql")
