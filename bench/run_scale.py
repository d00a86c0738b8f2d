"""The `scale` scenario: the same backlog drained by 1 supervisor × 2 workers and by 2 supervisors
× 1 worker (the median of `--repeat` each), the ratio judged against issue 5's 15 %."""

from __future__ import annotations

from bench.run_drain import spread


def run(bench) -> None:
    r = bench.r
    r.say("\n== scale: 1 supervisor × 2 workers vs 2 supervisors × 1 worker, same backlog")
    one = bench.drain_median("scale-1x2", supervisors=1, workers=2)
    r.add("scale_1x2", "drain, 1 supervisor × 2 workers", one.rate, "ev/s",
          r.against(one.rate, r.combined("sql_status_2p"), "status+broker") + spread(one))
    two = bench.drain_median("scale-2x1", supervisors=2, workers=1)
    r.add("scale_2x1", "drain, 2 supervisors × 1 worker", two.rate, "ev/s",
          r.against(two.rate, r.combined("sql_status_2p"), "status+broker") + spread(two))
    ratio = two.rate / one.rate
    r.add("scale_ratio", "  2×1 / 1×2", ratio, "x", "target within 15 % (0.85 … 1.15)")
    r.target("2 replicas × 1 within 15 % of 1 × 2 (issue 5)", abs(1 - ratio) <= 0.15, f"{ratio:.2f}")
