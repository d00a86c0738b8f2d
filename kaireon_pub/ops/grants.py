"""`kaireon-pub grants`: the statements that give a role what the tier's commands need, and no more.

The statements are the named blocks of db/grants.sql, for one role and the outbox's schema:
- `runtime`: the publisher tier (`run`, `reap`, the cron route, `requeue`): SELECT/UPDATE/DELETE on
  outbox_events, the lease and worker tables, reaper runs, the schema version; no DDL, no INSERT
  into the outbox;
- `readonly`: `status`, `check` and the KEDA PostgreSQL trigger: SELECT only;
- both, unless left out: membership of pg_read_all_stats, so that the claim horizon (runtime) and
  `status`/`check` (readonly) see how long another role's transaction has been open.
The owner (the role `migrate` runs as, which owns the tables and the partitions) needs no grant
from here. Nothing connects: the statements are printed, for psql or a migration tool.
"""

from __future__ import annotations

from psycopg import sql

from kaireon_pub.db.queries import load

G = load("grants.sql")
KINDS = ("runtime", "readonly")


def statements(role: str, kind: str, *, schema: str = "public", read_all_stats: bool = True) -> str:
    """The SQL text (statements ending in `;`, with their comments) for `role` as `kind`."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    if not role or not schema:
        raise ValueError("role and schema must not be empty")
    blocks = [G.grants_runtime if kind == "runtime" else G.grants_readonly]
    if read_all_stats:
        blocks.append(G.grants_read_all_stats)
    names = {"role": sql.Identifier(role), "schema": sql.Identifier(schema),
             "role_literal": sql.Literal(role), "schema_literal": sql.Literal(schema)}
    head = f"-- kaireon-pub grants --for {kind}: run as the owner of the outbox tables or a superuser\n"
    return head + "\n\n".join(sql.SQL(block).format(**names).as_string(None) + ";" for block in blocks) + "\n"
