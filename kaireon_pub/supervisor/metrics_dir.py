"""The multiprocess metrics directory of a supervisor's process tree (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import os
import re
import tempfile

# The files prometheus-client's multiprocess mode writes: `<type>_<process id>.db`, a gauge's type
# with its mode (counter_12.db, gauge_livesum_12.db, histogram_12.db). Only these are ours to remove.
METRIC_FILE = re.compile(r"(?:counter|histogram|summary|gauge_[a-z]+)_[^/]+\.db")


def prepare(configured: str) -> tuple[str, bool]:
    """The directory cleared of earlier processes' metric files (or made) and exported to the
    environment; returns it and whether it is of our own making (removed at exit; a configured one
    is the operator's).

    In a configured directory only prometheus-client's own files are removed (`METRIC_FILE`, regular
    files at its top level): an operator who points PROMETHEUS_MULTIPROC_DIR at a shared or mistaken
    directory loses nothing else, no other file, no subdirectory, nothing a symlink points to.

    Must happen before prometheus_client is imported anywhere in this process tree.
    """
    path = configured or tempfile.mkdtemp(prefix="kaireon-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in metric_files(path):
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path, not configured


def metric_files(path: str) -> list[str]:
    """The names of prometheus-client's metric files at the top of `path`."""
    found = []
    with os.scandir(path) as entries:
        for entry in entries:
            if METRIC_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                found.append(entry.name)
    return sorted(found)
