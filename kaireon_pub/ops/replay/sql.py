"""The named blocks of db/replay.sql, through the one loader (db/queries.py): `R.replay_rows` is SQL."""

from __future__ import annotations

from kaireon_pub.db.queries import load

R = load("replay.sql")
