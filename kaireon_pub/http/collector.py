"""The /metrics collector of a multiprocess tier."""

from __future__ import annotations

import glob
import os


class ScrapeSafeCollector:
    """prometheus-client's multiprocess merge, minus two races with processes that come and go.

    A worker that has just been forked creates its metrics file before it writes the file's
    header: read in that instant, the empty file made the whole scrape fail (HTTP 500, seen
    right after a respawn). A file removed between listing and reading (a dead process's live
    gauges) did the same. Empty files are skipped (they hold no sample yet); a vanished one
    means the listing is taken again.
    """

    def __init__(self, path: str):
        self.path = path

    def collect(self):
        from prometheus_client.multiprocess import MultiProcessCollector

        for _ in range(2):
            try:
                return MultiProcessCollector.merge(self._readable_files(), accumulate=True)
            except FileNotFoundError:
                continue
        return MultiProcessCollector.merge(self._readable_files(), accumulate=True)

    def _readable_files(self) -> list[str]:
        return [f for f in glob.glob(os.path.join(self.path, "*.db")) if _non_empty(f)]


def _non_empty(file: str) -> bool:
    try:
        return os.path.getsize(file) > 0
    except FileNotFoundError:
        return False
