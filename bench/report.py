"""Figures as they are measured, each with its ratio to a same-run ceiling or to its target, and
the one-line summary printed at the end of every run, interrupted or not."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class Figure:
    key: str
    label: str
    value: float | None
    unit: str
    against: str = ""  # "0.83 × status ceiling (33,100/s)" or a note such as "not implemented"


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "ev/s":
        return f"{value:,.0f} ev/s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "MB":
        return f"{value:.0f} MB"
    if unit == "s/1k":
        return f"{value:.3f} CPU-s/1k"
    if unit == "x":
        return f"{value:.2f}×"
    if unit == "s":
        return f"{value:.1f} s"
    return f"{value:g}{unit}"


class Report:
    def __init__(self, out=sys.stdout):
        self.out = out
        self.figures: dict[str, Figure] = {}
        self.ceilings: dict[str, float] = {}
        self.notes: list[str] = []
        self.targets: list[tuple[str, str, str]] = []  # (target, verdict, detail)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def add(self, key: str, label: str, value: float | None, unit: str, against: str = "") -> None:
        self.figures[key] = Figure(key, label, value, unit, against)
        self.say(f"  {label:<52} {fmt(value, unit):>16}   {against}")

    def value(self, key: str) -> float | None:
        fig = self.figures.get(key)
        return None if fig is None else fig.value

    # ---- ceilings ------------------------------------------------------------------------

    def combined(self, sql_key: str) -> float | None:
        """Database and broker share the same cores: 1 / (1/L_sql + 1/L_broker) (LIMITS.md §4)."""
        sql, broker = self.ceilings.get(sql_key), self.ceilings.get("produce")
        if not sql or not broker:
            return None
        return 1 / (1 / sql + 1 / broker)

    def against(self, value: float | None, ceiling: float | None, name: str) -> str:
        if value is None or not ceiling:
            return f"(no {name} ceiling measured in this run)"
        return f"{value / ceiling:.2f} × {name} ceiling ({ceiling:,.0f}/s)"

    # ---- targets ---------------------------------------------------------------------------

    def target(self, name: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if ok is None else ("MET" if ok else "MISSED")
        self.targets.append((name, verdict, detail))

    def print_targets(self) -> None:
        if not self.targets:
            return
        self.say("\ntargets (issues 5 and 6):")
        for name, verdict, detail in self.targets:
            self.say(f"  [{verdict:^6}] {name}: {detail}")

    def summary(self, interrupted: bool = False, failed: list[str] | None = None) -> str:
        parts = []

        def part(name: str, key: str, unit: str = "") -> None:
            fig = self.figures.get(key)
            if fig is None:
                return
            if fig.value is None:
                parts.append(f"{name}={fig.against.split(';')[0].replace(' ', '-') or 'n/a'}")
            elif unit == "ev/s":
                parts.append(f"{name}={fig.value:,.0f}/s")
            elif unit == "x":
                parts.append(f"{name}={fig.value:.2f}")
            elif unit == "ms":
                parts.append(f"{name}={fig.value:.1f}ms")
            elif unit == "MB":
                parts.append(f"{name}={fig.value:.0f}MB")
            else:
                parts.append(f"{name}={fig.value:.3f}")

        for name, sql_key in (("ceil_status", "sql_status_2p"), ("ceil_lock", "sql_lock_2p"),
                              ("ceil_produce", "produce")):
            if sql_key in self.ceilings:
                parts.append(f"{name}={self.ceilings[sql_key]:,.0f}/s")
        part("drain", "drain", "ev/s")
        part("drain/ceil", "drain_ratio", "x")
        part("1M/100k", "big_ratio", "x")
        part("cold/warm", "cold_ratio", "x")
        part("cold/warm@1M", "cold_ratio_big", "x")
        part("first_publish", "first_publish", "ms")
        part("p99", "latency_p99", "ms")
        part("cpu/1k", "drain_cpu", "")
        part("rss", "peak_rss", "MB")
        part("lock/status", "lock_ratio", "x")
        part("purge/nopurge", "purge_ratio", "x")
        part("retention_drop/delete", "ret_ratio", "x")
        part("2x1/1x2", "scale_ratio", "x")
        part("debezium/enqueue", "dbz_attached_1", "x")
        part("debezium_idiom/enqueue", "dbz_idiom_1", "x")
        if not parts:
            parts.append("nothing measured")
        tail = []
        if interrupted:
            tail.append("INTERRUPTED")
        if failed:
            tail.append("failed=" + ",".join(failed))
        return "SUMMARY " + " ".join(parts + tail)
