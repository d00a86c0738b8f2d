"""bench-smoke: the bench still runs end to end. It asserts no figure: timings on a shared
2-core machine are not test outcomes, only that every scenario ran and the summary was printed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker_agnostic("the bench chooses its own broker (Tansu unless --broker kafka)")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.not_via_pgbouncer("the bench starts its own PostgreSQL and tiers (its pgbouncer scenario "
                               "included), not the tests' tier: it would run exactly as in the direct pass")
def test_bench_quick_runs_every_scenario_and_prints_the_summary():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "KAFKA_"))}
    proc = subprocess.run([sys.executable, "-m", "bench", "all", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=150)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    summary = [line for line in out.splitlines() if line.startswith("SUMMARY ")]
    assert len(summary) == 1, out[-4000:]
    assert "failed=" not in summary[0] and "INTERRUPTED" not in summary[0]
    assert re.search(r"drain=[\d,]+/s", summary[0]), summary[0]
    assert re.search(r"ceil_status=[\d,]+/s", summary[0]), summary[0]
    assert re.search(r"p99=[\d.]+ms", summary[0]), summary[0]
    # debezium-write (issue 28), a tiny run inside `all --quick`: an attached table and enqueue() both wrote
    assert re.search(r"debezium/enqueue=[\d.]+ debezium_idiom/enqueue=[\d.]+", summary[0]), summary[0]
    assert "each captured once" in out, out[-4000:]
    assert "targets (issues 5 and 6):" in out
