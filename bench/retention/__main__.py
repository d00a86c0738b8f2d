"""`python -m bench.retention [--old N] [--backlog N]`: `python -m bench retention` alone."""

from __future__ import annotations

import argparse

from bench.cli import main as bench_main


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.retention",
                                 description="The retention scenario alone: DELETE purge vs partition drops.")
    ap.add_argument("--old", type=int, default=1_000_000)
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--bootstrap", default=None)
    args = ap.parse_args()
    argv = ["retention", "--retention-old", str(args.old), "--backlog", str(args.backlog)]
    argv += ["--database-url", args.database_url] if args.database_url else []
    argv += ["--bootstrap", args.bootstrap] if args.bootstrap else []
    return bench_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
