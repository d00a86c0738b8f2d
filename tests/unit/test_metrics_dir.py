"""The supervisor clears only the metric files it owns (issue 26): in a configured
PROMETHEUS_MULTIPROC_DIR, prometheus-client's `*.db` files of earlier processes go, nothing else."""

from __future__ import annotations

import os

import pytest

from kaireon_pub.supervisor import metrics_dir

EARLIER = ("counter_123.db", "gauge_livesum_123.db", "gauge_livemax_9.db", "gauge_mostrecent_9.db",
           "histogram_4567.db", "summary_1.db", "gauge_all_worker-2.db")


@pytest.fixture(autouse=True)
def keep_environment():
    """prepare() exports the directory; the variable is put back as it was (absent, usually)."""
    saved = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    yield
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if saved is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved


def test_a_configured_directory_keeps_every_file_that_is_not_a_metric_file(tmp_path):
    for name in EARLIER:
        (tmp_path / name).write_bytes(b"\0" * 8)
    (tmp_path / "notes.txt").write_text("the operator's")
    (tmp_path / "app.db").write_text("an application's SQLite file")
    (tmp_path / "counter_1.db.bak").write_text("a backup")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "counter_77.db").write_bytes(b"\0")  # under a subdirectory: not ours
    outside = tmp_path.parent / f"{tmp_path.name}-target.db"
    outside.write_text("a file elsewhere")
    os.symlink(outside, tmp_path / "counter_55.db")

    path, owned = metrics_dir.prepare(str(tmp_path))

    assert (path, owned) == (str(tmp_path), False)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["app.db", "counter_1.db.bak", "counter_55.db", "notes.txt", "sub"]
    assert (sub / "counter_77.db").exists() and outside.read_text() == "a file elsewhere"
    assert (tmp_path / "notes.txt").read_text() == "the operator's"


def test_a_missing_configured_directory_is_made(tmp_path):
    path, owned = metrics_dir.prepare(str(tmp_path / "new" / "prom"))
    assert os.path.isdir(path) and owned is False


def test_without_a_configured_directory_a_fresh_one_is_ours(tmp_path):
    path, owned = metrics_dir.prepare("")
    try:
        assert owned is True and os.listdir(path) == []
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == path
    finally:
        os.rmdir(path)


def test_the_pattern_matches_what_prometheus_client_writes(tmp_path):
    """The files of a real multiprocess registry, written here, are all recognised."""
    import subprocess
    import sys

    code = ("from prometheus_client import Counter, Gauge, Histogram, Summary\n"
            "Counter('c', 'c').inc(); Histogram('h', 'h').observe(1); Summary('s', 's').observe(1)\n"
            "for mode in ('livesum', 'livemax', 'all', 'mostrecent', 'max', 'min', 'sum'):\n"
            "    Gauge('g_' + mode, 'g', multiprocess_mode=mode).set(1)\n")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) >= 5
    assert metrics_dir.metric_files(str(tmp_path)) == written
