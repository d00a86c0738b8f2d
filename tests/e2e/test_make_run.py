"""`make run` (kaireon_pub.demo): what it prints for a second terminal works when pasted there.

The demo runs as `make run` runs it (its own embedded PostgreSQL and broker); the printed lines
run in a fresh bash with a bare environment (no DATABASE_URL, no venv on PATH) and another
working directory, as a second terminal would.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

READY_TIMEOUT = 180


class Demo:
    def __init__(self, run_dir: Path, cwd: Path):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OUTBOX_", "KAFKA_")) and k not in ("DATABASE_URL", "CRON_SECRET")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kaireon_pub.demo", "--rate", "50", "--workers", "1", "--run-dir", str(run_dir),
             # `make run BROKER=kafka` in the Kafka pass (tests/conftest.py)
             "--broker", os.environ.get("KAIREON_TEST_BROKER") or "tansu"],
            cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        self.run_dir = run_dir
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, deadline: float) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("timed out reading the demo's output:\n" + "\n".join(self.seen)) from None
        if line is None:
            raise AssertionError("the demo exited:\n" + "\n".join(self.seen))
        self.seen.append(line)
        return line

    def rest(self, timeout: float = 30) -> list[str]:
        """Every line until the demo's output ends."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(AssertionError):
            while True:
                self.next_line(deadline)
        return self.seen

    def paste_block(self, timeout: float) -> list[str]:
        """The indented lines after "ready. In a second terminal, paste:"."""
        deadline = time.monotonic() + timeout
        while not self.next_line(deadline).startswith("ready. In a second terminal"):
            pass
        block: list[str] = []
        while True:
            line = self.next_line(deadline)
            if line.startswith("  "):
                block.append(line.strip())
            elif block:
                return block

    def stop(self) -> int:
        """Ctrl-C, as a user would; the demo drains and stops its servers. Its own bounds: the tier
        30 s (then SIGKILL), the broker 5.5 s, PostgreSQL pg_ctl's 60 s; a stop past them all fails,
        naming what the demo printed (each step's time) and the tier's last log lines."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            tier_log = self.run_dir / "tier.log"
            tail = tier_log.read_text(errors="replace").splitlines()[-20:] if tier_log.exists() else []
            with contextlib.suppress(AssertionError):
                self.rest(1)
            raise AssertionError("the demo did not stop within 120 s of Ctrl-C; it printed:\n"
                                 + "\n".join(self.seen[-15:]) + "\nthe tier's log ends:\n" + "\n".join(tail)) from None
        finally:
            self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # A demo that died without its cleanup leaves the tier and PostgreSQL: stop them too.
        for line in self.seen:
            if line.startswith("tier starting (pid "):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.killpg(int(line.split("pid ")[1].split(")")[0]), signal.SIGKILL)
        pidfile = self.run_dir / "pgdata" / "postmaster.pid"
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGQUIT)


def second_terminal(lines: list[str], command: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """The export line and one command, in a new bash with a bare environment."""
    return subprocess.run(["bash", "--noprofile", "--norc", "-c", f"{lines[0]}\n{command}"],
                          env={"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                          cwd=home, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def demo(tmp_path):
    # A short path: the server's unix socket lives in the data directory (108-byte limit).
    run_dir = Path(f"/tmp/kaireon-demo-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    (tmp_path / "repo-cwd").mkdir()
    started = Demo(run_dir, tmp_path / "repo-cwd")
    yield started
    started.stop()
    started.reader.join(30)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.not_via_pgbouncer("`make run` starts its own PostgreSQL and tier, with no pooler: it would "
                               "run exactly as in the direct pass")
def test_make_run_prints_commands_that_work_in_a_second_terminal(demo, tmp_path):
    lines = demo.paste_block(READY_TIMEOUT)
    export, *commands = lines
    assert export.startswith("export PATH=") and " DATABASE_URL=" in export
    assert " KAFKA_BOOTSTRAP_SERVERS=" in export and " CRON_SECRET=" in export
    by_name = {c.split(" --")[0].split(" -")[0]: c for c in commands}
    assert set(by_name) >= {"kaireon-pub status", "kaireon-pub top", "curl", "kaireon-pub call-reaper"}
    home = tmp_path / "second-terminal"
    home.mkdir()

    status = second_terminal(lines, by_name["kaireon-pub status"], home)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("Backlog\n") and "Shards:" in status.stdout

    curl = second_terminal(lines, by_name["curl"], home)
    assert curl.returncode == 0, curl.stderr
    answer = json.loads(curl.stdout)
    assert answer["status"] == "ok" and "resetCount" in answer

    called = second_terminal(lines, by_name["kaireon-pub call-reaper"], home)
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["status"] == "ok"

    frame = second_terminal(lines, by_name["kaireon-pub top"] + " --once", home)
    assert frame.returncode == 0, frame.stderr
    assert frame.stdout.strip()

    assert demo.stop() == 0
    output = demo.rest()
    assert any(line.startswith("tier exit code 0 after ") and "; rows by status:" in line for line in output), output
    assert output[-1].startswith("stopped: broker in "), output
