"""`kaireon-pub top` in a real terminal (tmux) against a running tier under load."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid

import pytest

from tests import helpers

pytestmark = pytest.mark.broker_agnostic("`top` reads the tier's metrics, not the broker")


@pytest.fixture
def tmux():
    """A tmux server of the test's own (private socket), killed at teardown."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux): cannot run `top` in a real terminal")
    socket = f"kaireon-top-{uuid.uuid4().hex[:8]}"

    def run(*args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(["tmux", "-L", socket, *args], env=env, capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout

    yield run
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=10)


def events_per_second(screen: str) -> float | None:
    match = re.search(r"^events/s\s+([\d,.]+)", screen, re.MULTILINE)
    return float(match.group(1).replace(",", "")) if match else None


def test_top_shows_throughput_under_load(db_url, topic, start_tier, tmux):
    tier = start_tier(OUTBOX_WORKERS="2")
    env = tier.env
    port = tier.http_port()
    command = f"{sys.executable} -m kaireon_pub top --url http://127.0.0.1:{port}/metrics --interval 0.5"
    with helpers.Load(db_url, topic):
        tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "40", command, env=env)

        def busy_screen() -> str | None:
            screen = tmux("capture-pane", "-p", "-t", "top")
            return screen if (events_per_second(screen) or 0) > 0 else None

        screen = helpers.wait_for(busy_screen, 60, "top to show a non-zero events/s")
    assert "kaireon-pub top" in screen
    assert re.search(r"^workers alive\s+2\b", screen, re.MULTILINE), screen
    assert re.search(r"^readiness\s+ready\s+broker up\s+database up", screen, re.MULTILINE), screen
    assert re.search(r"^age at publish\s+p50 <= [\d.]+ s\s+p99 <= [\d.]+ s", screen, re.MULTILINE), screen
    assert "pending by shard group" in screen
    tier.stop()


def test_top_once_reports_an_unreachable_tier(tmp_path):
    done = helpers.run_cli("top", "--url", "http://127.0.0.1:1/metrics", "--once", "--interval", "0.1",
                           env=helpers.tier_env("", "", tmp_path))
    assert done.returncode == 1
    assert "cannot scrape http://127.0.0.1:1/metrics" in done.stdout
