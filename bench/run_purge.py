"""The `purge` scenario: the drain beside `--backlog` old published rows, with the retention purge
off, then on (retention 1 s, every 1 s; the median of `--repeat` each): the purge must not slow
the claim."""

from __future__ import annotations

from bench.run_drain import spread


def run(bench) -> None:
    r, p = bench.r, bench.plan
    old = p.backlog
    r.say(f"\n== purge: drain with {old:,} old published rows, "
          "retention purge off vs on (retention 1 s, every 1 s)")
    off = bench.drain_median("purge-off", published=old, OUTBOX_RETENTION_SECONDS="0")
    r.add("purge_off", "drain, purge off", off.rate, "ev/s",
          r.against(off.rate, r.combined("sql_status_2p"), "status+broker") + spread(off))
    on = bench.drain_median("purge-on", published=old,
                            OUTBOX_RETENTION_SECONDS="1", OUTBOX_PURGE_INTERVAL_SECONDS="1")
    if not on.purged:
        r.add("purge_on", "drain, purge on", on.rate, "ev/s",
              "purge not implemented (nothing purged during the drain)")
        r.add("purge_ratio", "  purge on / off", None, "x", "not implemented")
        r.target("purge does not slow the claim", None, "the tier purged nothing: not implemented yet")
        return
    ratio = on.rate / off.rate
    r.add("purge_on", "drain, purge on", on.rate, "ev/s",
          f"{on.purged:,.0f} rows purged during the drain" + spread(on))
    r.add("purge_ratio", "  purge on / off", ratio, "x", "target ≥ 0.90 (within noise)")
    r.target("purge does not slow the claim", ratio >= 0.9, f"{ratio:.2f} ({on.purged:,.0f} rows purged meanwhile)")
