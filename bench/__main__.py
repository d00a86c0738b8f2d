"""`python -m bench [scenario ...] [options]`."""

from bench.cli import main

raise SystemExit(main())
