"""The one SQL loader: the named blocks of a .sql file of kaireon_pub.db, read once, includes expanded.

`Q.claim_batch` is the SQL text of that block of queries.sql; `load("ops_queries.sql")` (the
operator tools' `OPS`) and `load("partitions.sql")` (`P`) go through the same parser and the
same `{{name}}` includes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import resources
from types import SimpleNamespace

_HEADER = re.compile(r"^-- (?P<name>[a-z_]+): (?P<doc>.+)$")


def parse(text: str, source: str = "queries.sql") -> dict[str, str]:
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _HEADER.match(line)
        if match:
            name = match["name"]
            if name in blocks:
                raise ValueError(f"{source} defines {name!r} twice")
            current = blocks[name] = []
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip().rstrip(";") for name, lines in blocks.items()}


_INCLUDE = re.compile(r"\{\{([a-z_]+)\}\}")


def expand(blocks: dict[str, str], source: str = "queries.sql") -> dict[str, str]:
    """`{{name}}` in a block stands for the text of block `name`, itself expanded (one shared
    selection, one place)."""
    done: dict[str, str] = {}

    def text(name: str, including: tuple[str, ...]) -> str:
        if name in including:
            raise ValueError(f"{source}: {' -> '.join(including + (name,))} includes itself")
        if name not in done:
            done[name] = _INCLUDE.sub(lambda m: text(m.group(1), including + (name,)), blocks[name])
        return done[name]

    return {name: text(name, ()) for name in blocks}


def read(filename: str) -> dict[str, str]:
    """The blocks of `filename` (a file of kaireon_pub.db), each with its includes expanded."""
    return expand(parse(resources.files("kaireon_pub.db").joinpath(filename).read_text(), filename), filename)


def load(filename: str) -> SimpleNamespace:
    """`read(filename)` as attributes: `load("queries.sql").claim_batch`."""
    return SimpleNamespace(**read(filename))


QUERIES = read("queries.sql")
Q = SimpleNamespace(**QUERIES)


def int_array(values: Iterable[int]) -> str:
    """Integers as one PostgreSQL array literal, '{1,2,3}', for a parameter its statement casts
    (`%(ids)s::bigint[]`, `%(cursor_xids)s::text[]::xid8[]`).

    For the big lists of the hot statements (the claim's per-shard cursors, the ids a mark
    settles): formatted by str() and join() in C, where psycopg would dump a list element by
    element in Python (and, as text, search each one for characters to quote)."""
    return "{" + ",".join(map(str, values)) + "}"
