"""Loads the named blocks of queries.sql once; `Q.claim_batch` is the SQL text of that block."""

from __future__ import annotations

import re
from importlib import resources
from types import SimpleNamespace

import psycopg
from psycopg.types.array import ListBinaryDumper

_HEADER = re.compile(r"^-- (?P<name>[a-z_]+): (?P<doc>.+)$")


def parse(text: str) -> dict[str, str]:
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _HEADER.match(line)
        if match:
            name = match["name"]
            if name in blocks:
                raise ValueError(f"queries.sql defines {name!r} twice")
            current = blocks[name] = []
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip().rstrip(";") for name, lines in blocks.items()}


_INCLUDE = re.compile(r"\{\{([a-z_]+)\}\}")


def expand(blocks: dict[str, str]) -> dict[str, str]:
    """`{{name}}` in a block stands for the text of block `name` (one shared selection, one place)."""
    return {name: _INCLUDE.sub(lambda m: blocks[m.group(1)], sql) for name, sql in blocks.items()}


QUERIES = expand(parse(resources.files("kaireon_pub.db").joinpath("queries.sql").read_text()))
Q = SimpleNamespace(**QUERIES)


class BinaryArray(list):
    """A list parameter sent as a binary array: no text formatting and quoting of each element.

    For the big lists of the hot statements (the claim's per-shard cursors, the ids a mark
    settles): the statement's casts (`::bigint[]`, `::text[]::xid8[]`) apply as to a text array.
    Its elements must all be of one type (ints, or strs)."""


psycopg.adapters.register_dumper(BinaryArray, ListBinaryDumper)
