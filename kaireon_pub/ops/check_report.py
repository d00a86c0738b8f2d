"""What every check of `kaireon-pub check` shares: the report, the timeout of each probe, the
redaction of a detail, a setting read as an integer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kaireon_pub.redact import Redactor
from kaireon_pub.settings import DEFAULTS

TIMEOUT_SECONDS = 5


@dataclass
class Result:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    schema_missing: bool = False  # the schema is absent or older than the code: exit 5, not 1

    def add(self, name: str, status: str, detail: str) -> Result:
        result = Result(name, status, detail)
        self.results.append(result)
        return result

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == "fail"]

    def as_json(self) -> dict[str, Any]:
        return {"ok": not self.failed,
                "checks": [{"name": r.name, "status": r.status, "detail": r.detail} for r in self.results]}

    def render(self) -> str:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
        lines = [f"{marks[r.status]}  {r.name:<9} {r.detail}" for r in self.results]
        lines.append(f"check failed: {len(self.failed)} of {len(self.results)} checks failed"
                     if self.failed else f"check passed: {len(self.results)} checks")
        return "\n".join(lines)


def hide(text: str, secrets: list[str]) -> str:
    return Redactor(secrets).text(text)


def setting_int(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(str(env.get(name, DEFAULTS.get(name)) or "").strip())
    except ValueError:
        return None
