"""How long migration 0003 (payload bytes) takes, on an empty table and on a table of N rows.

`python -m bench.migration [--rows 1000000] [--database-url URL]`: a fresh database migrated up to
0002, N rows of the drain's shape (~300 B jsonb payloads, 1,000 keys) written and VACUUMed, then
0003 applied alone and timed; then the bytes the claim publishes for every row are compared
with what it published before the migration (payload::text), and the result printed.
"""

from __future__ import annotations

import argparse
import time
import uuid

import psycopg

from bench.backlog import KEYS
from kaireon_pub.db.migrate import available, migrate

# The drain's backlog as an older writer made it: jsonb payloads.
_LEGACY_INSERT = """
INSERT INTO outbox_events (topic, partition_key, payload, event_type)
SELECT 'migration-bench', 'agg-' || (g %% %(keys)s),
       jsonb_build_object('n', g, 'aggregate', 'agg-' || (g %% %(keys)s), 'data',
           md5(g::text) || md5((g + 1)::text) || md5((g + 2)::text) || md5((g + 3)::text) ||
           md5((g + 4)::text) || md5((g + 5)::text) || md5((g + 6)::text) || md5((g + 7)::text)),
       'bench.event'
FROM generate_series(1, %(n)s::bigint) g
"""


def measure_rewrite(url: str, rows: int) -> float:
    """For comparison: seconds of the in-place alternative, ALTER COLUMN payload TYPE bytea."""
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, migrations=[m for m in available() if m.version < 3])
        conn.execute(_LEGACY_INSERT, {"keys": KEYS, "n": rows})
        conn.execute("VACUUM ANALYZE outbox_events")
        started = time.perf_counter()
        conn.execute("ALTER TABLE outbox_events ALTER COLUMN payload DROP NOT NULL, "
                     "ALTER COLUMN payload TYPE bytea USING convert_to(payload::text, 'UTF8')")
        return time.perf_counter() - started


def measure(url: str, rows: int) -> float:
    """Seconds to apply 0003 to a table of `rows` rows written before it."""
    before, target = [m for m in available() if m.version < 3], [m for m in available() if m.version == 3]
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, migrations=before)
        if rows:
            conn.execute(_LEGACY_INSERT, {"keys": KEYS, "n": rows})
            conn.execute("VACUUM ANALYZE outbox_events")
            conn.execute("CREATE TABLE published_before AS"
                         " SELECT id, convert_to(payload::text, 'UTF8') AS v FROM outbox_events")
        started = time.perf_counter()
        migrate(conn, migrations=target)
        seconds = time.perf_counter() - started
        if rows:
            differ = conn.execute(
                """SELECT count(*) FROM outbox_events e JOIN published_before b USING (id)
                   WHERE coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8')) IS DISTINCT FROM b.v"""
            ).fetchone()[0]
            if differ:
                raise SystemExit(f"{differ} rows would publish other bytes after the migration")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--compare-rewrite", action="store_true",
                        help="also time ALTER COLUMN payload TYPE bytea (a table rewrite) on --rows rows")
    parser.add_argument("--database-url", default=None, help="a server whose role has CREATEDB; default: embedded")
    args = parser.parse_args()
    from kaireon_pub.devenv import Postgres

    server = None if args.database_url else Postgres()
    try:
        runs = [(0, measure), (args.rows, measure)] + ([(args.rows, measure_rewrite)] if args.compare_rewrite else [])
        for n, how in runs:
            name = f"kaireon_mig_bench_{uuid.uuid4().hex[:8]}"
            if server is not None:
                url = server.create_database(name)
            else:
                with psycopg.connect(args.database_url, autocommit=True) as admin:
                    admin.execute(f'CREATE DATABASE "{name}"')
                url = psycopg.conninfo.make_conninfo(args.database_url, dbname=name)
            try:
                seconds = how(url, n)
            finally:
                if server is not None:
                    server.drop_database(name)
                else:
                    with psycopg.connect(args.database_url, autocommit=True) as admin:
                        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            what = "ALTER COLUMN payload TYPE bytea (not used)" if how is measure_rewrite else "migration 0003"
            checked = "; every row publishes the same bytes" if how is measure else ""
            per_million = f" ({seconds * 1000 * 1_000_000 / n:.1f} ms per million rows{checked})" if n else ""
            print(f"{what} on {n:,} rows: {seconds * 1000:.1f} ms{per_million}", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
