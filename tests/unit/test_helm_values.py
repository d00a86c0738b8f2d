"""docs/deploying.md's tables of chart values against helm/kaireon-pub/values.yaml.

Every documented key exists in values.yaml with the documented default (a default written as one
`literal` is read as YAML and compared; one written in words is allowed only for a mapping or a
list, e.g. resources), every value is documented, and every key the schema accepts at its root is
named in the document.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kaireon-pub"
DOC = ROOT / "docs" / "deploying.md"
MISSING = object()


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def documented_rows(text: str) -> dict[str, str]:
    """{key: default cell} of every table row of the "### Values" section."""
    section = text.split("\n### Values\n", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| `([A-Za-z0-9_.]+)` \| (.*?) \| .*\|", line)
        if match:
            assert match[1] not in rows, f"{match[1]} is documented twice"
            rows[match[1]] = match[2].strip()
    return rows


def lookup(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def leaves(node: dict, prefix: str = ""):
    """Every key of values.yaml; a mapping documented as a whole (its own row) is one leaf."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict) and value:
            yield from leaves(value, path + ".")


def default_matches(cell: str, value) -> bool:
    literal = re.fullmatch(r"`([^`]*)`", cell)
    if literal is None:
        # Words: only for what a table cell cannot hold as one literal.
        return isinstance(value, (dict, list)) and bool(value)
    return yaml.safe_load(literal[1]) == value


ROWS = documented_rows(DOC.read_text())


def test_the_tables_are_found():
    assert len(ROWS) > 100 and "outboxPublisher.enabled" in ROWS and "networkPolicy.enabled" in ROWS


@pytest.mark.parametrize("key", sorted(ROWS))
def test_every_documented_key_exists_with_the_documented_default(key):
    value = lookup(values(), key)
    assert value is not MISSING, f"docs/deploying.md documents {key}, which values.yaml does not have"
    assert default_matches(ROWS[key], value), f"{key}: documented default {ROWS[key]}, values.yaml has {value!r}"


def test_every_value_is_documented():
    """A value is documented by its own row, or by the row of a mapping holding it (resources)."""
    undocumented = [key for key in leaves(values())
                    if not any(key == row or key.startswith(row + ".") for row in ROWS)
                    and not any(row.startswith(key + ".") for row in ROWS)]
    assert not undocumented, f"docs/deploying.md's values tables lack {undocumented}"
    top = set(values())
    assert top <= {row.split(".", 1)[0] for row in ROWS}, top - {row.split(".", 1)[0] for row in ROWS}


def test_every_root_key_the_schema_accepts_is_named_in_the_document():
    """global and enabled are not values of this chart but a parent chart's: named in prose."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    text = DOC.read_text()
    assert [key for key in schema["properties"] if f"`{key}`" not in text and f"`{key}." not in text] == []


def test_the_checks_catch_what_they_are_for():
    """Controls: a wrong default, a missing key, words for a scalar."""
    tree = {"a": {"b": 1, "c": {"x": 1}, "d": ""}}
    assert default_matches("`1`", lookup(tree, "a.b")) and not default_matches("`2`", lookup(tree, "a.b"))
    assert default_matches('`""`', lookup(tree, "a.d")) and not default_matches("empty", lookup(tree, "a.d"))
    assert default_matches("x is 1", lookup(tree, "a.c"))
    assert lookup(tree, "a.e") is MISSING and lookup(tree, "a.b.c") is MISSING
    row = "| `a.b` | `1` | What it does. |"
    assert documented_rows(f"x\n### Values\n\n| Value | Default | Effect |\n{row}\n### Next\n| `z` | `1` | |") \
        == {"a.b": "`1`"}
