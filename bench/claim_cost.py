"""What reading the payload costs the claim, per 1,000 rows, before and after payload bytes.

`python -m bench.claim_cost [--rows 100000] [--batch 1000] [--rounds 30]`: one database, the
drain's rows (~300 B, 1,000 keys) written twice, once as an older writer wrote them (jsonb
`payload`) and once as enqueue() writes them now (`payload_bytes`, the same bytes), then the
payload columns of batches of `--batch` rows fetched with psycopg, as the claim's SELECT list
reads them, and timed client-side (server work, transfer and decoding together):

- before: `payload::text` of jsonb rows (the claim up to migration 0002);
- after, rows enqueue() writes: `coalesce(payload_bytes, convert_to(payload::text, 'UTF8'))`;
- after, rows written before the migration: the same expression on jsonb rows;
- the operators' view: `payload_json` of outbox_events_json (outbox_json() on every row), which
  the claim never reads.

Prints the median milliseconds per batch of each and its ratio to "before".
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg

from bench.backlog import KEYS, load
from kaireon_pub.db.migrate import migrate
from kaireon_pub.devenv import Postgres

_LEGACY = """
INSERT INTO outbox_events (topic, partition_key, payload, event_type)
SELECT 'legacy', partition_key, convert_from(payload_bytes, 'UTF8')::jsonb, event_type
FROM outbox_events WHERE topic = 'new' ORDER BY id
"""

READS = {
    "before: payload::text, jsonb rows": ("legacy", "e.payload::text"),
    "after: rows enqueue() writes": ("new", "coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8'))"),
    "after: rows written before 0003": ("legacy", "coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8'))"),
    "view payload_json (not in the claim)": ("new", "coalesce(e.payload, outbox_json(e.payload_bytes))"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    server = Postgres()
    name = f"kaireon_claim_cost_{uuid.uuid4().hex[:8]}"
    try:
        url = server.create_database(name)
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn)
        load(url, "new", args.rows, notify=False)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_LEGACY)
            conn.execute("VACUUM ANALYZE outbox_events")
            same = conn.execute(
                """SELECT count(*) FROM outbox_events n JOIN outbox_events o
                   ON o.topic = 'legacy' AND n.topic = 'new' AND o.id = n.id + %s
                   WHERE n.payload_bytes = convert_to(o.payload::text, 'UTF8')""", (args.rows,)).fetchone()[0]
            bounds = {t: conn.execute("SELECT min(id), max(id) FROM outbox_events WHERE topic = %s", (t,)).fetchone()
                      for t in ("new", "legacy")}
            timings: dict[str, list[float]] = {label: [] for label in READS}
            for round_ in range(args.rounds):
                for label, (topic, expression) in READS.items():
                    lo, hi = bounds[topic]
                    start = lo + (round_ * args.batch) % max(1, hi - lo - args.batch)
                    query = (f"SELECT e.id, {expression} FROM outbox_events e "
                             "WHERE e.id >= %s AND e.id < %s ORDER BY e.id")
                    began = time.perf_counter()
                    rows = conn.execute(query, (start, start + args.batch)).fetchall()
                    timings[label].append(time.perf_counter() - began)
                    assert len(rows) == args.batch
        print(f"{args.rows:,} rows of each kind ({KEYS:,} keys); {same:,} pairs publish identical bytes; "
              f"median of {args.rounds} batches of {args.batch:,}:")
        base = statistics.median(timings[next(iter(READS))])
        for label, values in timings.items():
            median = statistics.median(values)
            print(f"  {label:40s} {median * 1000:7.2f} ms per batch  ({median / base:.2f} x before)")
    finally:
        server.drop_database(name)
        server.stop()


if __name__ == "__main__":
    main()
