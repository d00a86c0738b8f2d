"""The `ceilings` scenario: the bare SQL claim loops (status and lock modes, from 1 or 2 processes,
no broker) and the bare produce loop, each once, then the combined SQL + broker ceilings that the
drains are compared with (kept in the report's `ceilings`). The loops themselves: bench/ceilings.py."""

from __future__ import annotations

from bench import backlog
from bench.ceilings import produce_ceiling, sql_ceiling
from bench.env import PARTITIONS


def run(bench) -> None:
    r, p = bench.r, bench.plan
    r.say(f"\n== ceilings: bare loops, batch {p.batch}, {p.ceiling_rows:,} rows each, no broker in the SQL ones,"
          f" synchronous_commit={p.tier_env['OUTBOX_SYNCHRONOUS_COMMIT']} as the tier's sessions")
    cpu_sql = None
    for kind, procs, key in (("status", 1, "sql_status_1p"), ("status", 2, "sql_status_2p"),
                             ("lock", 2, "sql_lock_2p"), ("lock-delete", 2, "sql_lock_delete_2p")):
        url = bench.s.fresh_database(f"ceil-{kind}")
        try:
            backlog.load(url, "bench-ceiling", p.ceiling_rows, notify=False)
            res = sql_ceiling(url, kind, procs, p.batch, p.tier_env["OUTBOX_SYNCHRONOUS_COMMIT"])
        finally:
            bench.s.drop_database(url)
        if res.rows != p.ceiling_rows:
            raise RuntimeError(f"{kind} ceiling loop moved {res.rows} of {p.ceiling_rows} rows")
        r.ceilings[key] = res.rate
        if key == "sql_status_2p":
            cpu_sql = res.cpu_per_1k
        r.add(key, f"SQL {kind} claim+mark, {procs} process{'es' if procs > 1 else ''}", res.rate, "ev/s",
              f"client CPU {res.cpu_per_1k:.3f} s/1k")
    topic = bench.s.fresh_topic("ceil-produce")
    try:
        res = produce_ceiling(bench.s.bootstrap, topic, p.produce_messages)
    finally:
        bench.s.drop_topic(topic)
    r.ceilings["produce"] = res.rate
    r.add("produce", f"produce loop, 1 process, {PARTITIONS} partitions, {bench.s.broker_name}", res.rate, "ev/s",
          f"client CPU {res.cpu_per_1k:.3f} s/1k")
    r.ceilings["cpu_per_1k"] = (cpu_sql or 0.0) + res.cpu_per_1k
    for name, key in (("status", "sql_status_2p"), ("lock", "sql_lock_2p"), ("lock+delete", "sql_lock_delete_2p")):
        r.add(f"ceil_{name}", f"combined {name} + broker ceiling (1/(1/sql+1/broker))",
              r.combined(key), "ev/s", "what a tier of 2 workers could reach on these cores")
