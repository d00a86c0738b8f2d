"""The multiprocess metrics directory of a supervisor's process tree (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import os
import shutil
import tempfile


def prepare(configured: str) -> tuple[str, bool]:
    """The directory emptied (or made) and exported to the environment; returns it and whether it is
    of our own making (removed at exit; a configured one is the operator's).

    Must happen before prometheus_client is imported anywhere in this process tree.
    """
    path = configured or tempfile.mkdtemp(prefix="kaireon-metrics-")
    if os.path.isdir(path):
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                os.unlink(full)
            else:
                shutil.rmtree(full, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path, not configured
