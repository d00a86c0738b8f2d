"""audit.sql reads a row as the claim does: the value and key bytes the tier produced."""

from __future__ import annotations

import re

from kaireon_pub.db.queries import QUERIES, read
from kaireon_pub.worker.rows import Row


def select_list(text: str) -> list[str]:
    """The expressions of a SELECT list, split at top-level commas, whitespace folded."""
    text = re.sub(r"--[^\n]*", "", text)
    parts, depth, current = [], 0, []
    for char in text:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += char == "("
        depth -= char == ")"
        current.append(char)
    parts.append("".join(current))
    return [" ".join(part.split()) for part in parts if part.strip()]


def test_the_audits_row_columns_are_the_claims_expressions_in_rows_order():
    audit = select_list(read("audit.sql")["audit_row_columns"])
    scan = QUERIES["claim_shard_scan"]
    claim = select_list(scan[scan.index("SELECT") + len("SELECT"):scan.index("(NOT %(relaxed)s")])
    assert audit == claim
    assert [expr.split(" AS ")[-1].removeprefix("e.") for expr in audit] == [
        "id", "topic", "partition_key", "payload", "headers", "event_type", "attempts", "shard", "xid",
        "created_epoch", "created_iso", "binary_headers", "key_bytes"]
    assert len(audit) == len(Row._fields)


def test_every_audit_statement_is_a_read():
    for name, text in read("audit.sql").items():
        assert not re.search(r"\b(UPDATE|INSERT|DELETE|FOR UPDATE|LOCK)\b", text), name
