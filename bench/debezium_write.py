"""The `debezium-write` scenario (issue 28): what the application's transaction costs when its event
goes through a Debezium outbox table attached by `kaireon-pub attach`, against writing
`outbox_events` directly, in one run, on one database.

The table is Debezium's outbox example (id uuid, aggregatetype, aggregateid, type, payload jsonb,
with its primary key), attached with the router's defaults (kaireon_pub.ops.debezium.attach). One
client connection writes, one transaction after another, in the forms

- enqueue:    `kaireon_pub.enqueue()`, one INSERT INTO outbox_events (and its pg_notify) per event:
              what an application of this tier writes;
- attached:   one INSERT INTO the attached table per event; its trigger writes the outbox_events row;
- idiom:      per event, the INSERT and then the DELETE of that row (Debezium's insert-then-delete
              idiom: the table stays empty);
- unattached: the same INSERT into an identical table without the trigger, for reference: the
              write an application already makes for Debezium (here with this server's wal_level,
              not the `logical` Debezium needs), so that attached − unattached is the trigger's own;

each as transactions of 1 event and of 10. The forms alternate in rounds (the order rotated every
round), so a change in the machine's background load falls on every form alike. The tier is not
running: nothing claims or publishes, the rows stay pending; what is measured is the write alone.
synchronous_commit is the server's default for an application's session (printed; `on` for the
embedded server), not the tier's OUTBOX_SYNCHRONOUS_COMMIT.

Per form: the transaction's latency (BEGIN → COMMIT returned, as the application sees it) p50 and
p99, the transactions and events per second of the one client, the server backend's CPU per
transaction (psutil, when the server runs on this machine), and the ratio of each form to enqueue,
the median of the per-round ratios (with their range) beside the ratio of the pooled medians.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import psycopg
from psycopg.types.json import Jsonb

from bench.backlog import KEYS
from kaireon_pub import enqueue
from kaireon_pub.ops import debezium

SCHEMA = "inventory"
ATTACHED = f"{SCHEMA}.outboxevent"
UNATTACHED = f"{SCHEMA}.outboxevent_unattached"
# Debezium's "Basic outbox table" (outbox-event-router.adoc), with its primary key.
TABLE_DDL = """
CREATE TABLE {table} (
    id            uuid                   NOT NULL PRIMARY KEY,
    aggregatetype character varying(255) NOT NULL,
    aggregateid   character varying(255) NOT NULL,
    type          character varying(255) NOT NULL,
    payload       jsonb
)"""
INSERT = ("INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload)"
          " VALUES (%s, 'order', %s, 'OrderCreated', %s)")
DELETE = "DELETE FROM {table} WHERE id = %s"
TOPIC = "outbox.event.order"  # where the attachment routes aggregatetype 'order', so enqueue writes there too
SIZES = (1, 10)
PER_ROUND = 100  # one-event transactions of a form per round (ten-event: half): rounds of ~0.1 s, so the
# forms alternate faster than the background load of a shared machine drifts
WARMUP = 100  # transactions per form before the first round (plans prepared, caches warm): not counted
FORMS = {
    "enqueue": "(a) enqueue() into outbox_events",
    "attached": "(b) INSERT into the attached table",
    "idiom": "(c) INSERT + DELETE, attached table",
    "unattached": "(d) INSERT, the table unattached",
}


@dataclass
class Form:
    name: str
    size: int
    latencies: list[float] = field(default_factory=list)  # seconds per transaction
    rounds: list[float] = field(default_factory=list)  # the median latency of each round
    server_cpu: float = 0.0  # the backend's CPU seconds over the counted transactions

    def p(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def _payload(n: int) -> dict[str, object]:
    """~300 B of JSON like the drain's events (hex digests, so nothing compresses it to nothing)."""
    return {"n": n, "aggregate": f"agg-{n % KEYS}", "data": uuid.uuid5(uuid.NAMESPACE_OID, str(n)).hex * 8}


def _writer(conn: psycopg.Connection, form: str) -> Callable[[int], None]:
    """One event written in the open transaction, as that form writes it."""
    if form == "enqueue":
        return lambda n: enqueue(conn, topic=TOPIC, key=f"agg-{n % KEYS}", payload=_payload(n),
                                 event_type="OrderCreated")
    table = UNATTACHED if form == "unattached" else ATTACHED
    insert, delete = INSERT.format(table=table), DELETE.format(table=table)

    def write(n: int) -> None:
        event_id = uuid.uuid4()
        conn.execute(insert, (event_id, f"agg-{n % KEYS}", Jsonb(_payload(n))))
        if form == "idiom":
            conn.execute(delete, (event_id,))

    return write


def _prepare(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        for table in (ATTACHED, UNATTACHED):
            conn.execute(TABLE_DDL.format(table=table))
        debezium.attach(conn, ATTACHED, debezium.Mapping())


def _session(conn: psycopg.Connection) -> dict[str, str]:
    return {name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("synchronous_commit", "fsync", "wal_level", "server_version")}


def rounds_for(transactions: int) -> int:
    return max(2, transactions // PER_ROUND)


def measure(url: str, transactions: int, warmup: int = WARMUP,
            say: Callable[[str], None] = print) -> tuple[dict[tuple[str, int], Form], dict[str, object]]:
    """Every form at every size, `transactions` one-event transactions per form in all (ten-event:
    half as many), in alternating rounds. Returns the forms and what the run checked."""
    _prepare(url)
    rounds = rounds_for(transactions)
    per_round = {1: max(1, transactions // rounds), 10: max(1, transactions // 2 // rounds)}
    forms = {(name, size): Form(name, size) for size in SIZES for name in FORMS}
    order = list(forms)
    seq = 0
    with psycopg.connect(url, autocommit=True) as conn:
        session = _session(conn)
        backend = _backend(conn)
        writers = {name: _writer(conn, name) for name in FORMS}

        def run(form: Form, count: int) -> list[float]:
            nonlocal seq
            write, out = writers[form.name], []
            for _ in range(count):
                started = time.perf_counter()
                with conn.transaction():
                    for _ in range(form.size):
                        seq += 1
                        write(seq)
                out.append(time.perf_counter() - started)
            return out

        for form in forms.values():
            run(form, max(1, warmup // form.size))
        for i in range(rounds):
            shift = i % len(order)
            for key in order[shift:] + order[:shift]:
                form = forms[key]
                cpu0 = _cpu(backend)
                done = run(form, per_round[form.size])
                form.server_cpu += _cpu(backend) - cpu0
                form.latencies += done
                form.rounds.append(statistics.median(done))
            if (i + 1) % max(1, rounds // 4) == 0 or i + 1 == rounds:
                say(f"    round {i + 1}/{rounds} done")
        counts = conn.execute(f"SELECT (SELECT count(*) FROM outbox_events), (SELECT count(*) FROM {ATTACHED}),"
                              f" (SELECT count(*) FROM {UNATTACHED})").fetchone()
    expect = {name: sum(max(1, warmup // s) * s + per_round[s] * rounds * s for s in SIZES) for name in FORMS}
    want = (expect["enqueue"] + expect["attached"] + expect["idiom"], expect["attached"], expect["unattached"])
    if tuple(counts) != want:
        raise RuntimeError(f"rows (outbox_events, attached, unattached) {tuple(counts)}, expected {want}: "
                           "the attachment did not capture each row exactly once")
    return forms, {**session, "server_cpu": backend is not None, "events": counts[0]}


def _backend(conn: psycopg.Connection) -> psutil.Process | None:
    """The server process serving this connection, when it runs on this machine (else None)."""
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    try:
        proc = psutil.Process(pid)
        return proc if "postgres" in proc.name() or "postgres" in " ".join(proc.cmdline()[:1]) else None
    except (psutil.Error, OSError):
        return None


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


def table(forms: dict[tuple[str, int], Form], server_cpu: bool) -> list[str]:
    """The result as a Markdown table: one line per form and size, ratios to enqueue at that size."""
    lines = ["| form | events/tx | transactions | p50 ms | p99 ms | tx/s | events/s | server CPU µs/tx "
             "| p50 / (a): median of rounds (p25–p75) | mean / (a) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for size in SIZES:
        base = forms[("enqueue", size)]
        for name, label in FORMS.items():
            f = forms[(name, size)]
            n, total = len(f.latencies), sum(f.latencies)
            ratio = "1" if name == "enqueue" else "{:.2f} ({:.2f}–{:.2f})".format(*paired(f, base))
            cpu = f"{f.server_cpu / n * 1e6:,.0f}" if server_cpu else "n/a"
            lines.append(f"| {label} | {size} | {n:,} | {f.p(0.5) * 1000:.2f} | {f.p(0.99) * 1000:.2f} "
                         f"| {n / total:,.0f} | {n * size / total:,.0f} | {cpu} | {ratio} "
                         f"| {total / n / (sum(base.latencies) / len(base.latencies)):.2f} |")
    return lines


def paired(form: Form, base: Form) -> tuple[float, float, float]:
    """The form's median latency over enqueue's, round by round: the median of those ratios, and
    their p25 and p75 (the middle half, not the extremes of a shared machine)."""
    xs = sorted(a / b for a, b in zip(form.rounds, base.rounds, strict=True))
    return statistics.median(xs), xs[len(xs) // 4], xs[min(len(xs) - 1, 3 * len(xs) // 4)]


def run(bench) -> None:
    """The scenario in `python -m bench`: a fresh database of the run, no tier, no broker used."""
    r, n = bench.r, bench.plan.write_transactions
    rounds = rounds_for(n)
    r.say(f"\n== debezium-write: the application's transaction writing its event(s) through an attached Debezium"
          f" outbox table vs enqueue() into outbox_events; one client, {rounds} alternating rounds, {n:,} one-event"
          f" and {n // 2:,} ten-event transactions per form; the tier NOT running (the write cost alone)")
    url = bench.s.fresh_database("debezium-write")
    try:
        forms, seen = measure(url, n, warmup=WARMUP if n >= 1000 else 10, say=r.say)
    finally:
        bench.s.drop_database(url)
    r.say(f"  the application's session: synchronous_commit={seen['synchronous_commit']} (the server's default,"
          f" not the tier's setting), fsync={seen['fsync']}, wal_level={seen['wal_level']};"
          f" {seen['events']:,} events written to outbox_events, each captured once")
    for line in table(forms, bool(seen["server_cpu"])):
        r.say("  " + line)
    for size in SIZES:
        base = forms[("enqueue", size)]
        for name in ("attached", "idiom"):
            f = forms[(name, size)]
            ratio, low, high = paired(f, base)
            r.add(f"dbz_{name}_{size}", f"  {FORMS[name][:3]} {name} / enqueue, {size} event{'s' * (size > 1)}/tx",
                  ratio, "x", f"median of the rounds' p50 ratios (p25–p75 {low:.2f}–{high:.2f}); pooled p50s "
                  f"{f.p(0.5) * 1000:.2f} ms against {base.p(0.5) * 1000:.2f} ms")
