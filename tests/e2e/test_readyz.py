"""/readyz answers for the database and the broker now: it flips when the broker stops and back."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests import helpers


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_readyz_flips_with_the_broker(restartable_broker, start_tier):
    tier = start_tier(bootstrap=restartable_broker.bootstrap)
    port = tier.http_port()
    helpers.wait_for(lambda: readyz(port)[0] == 200, 30, "/readyz 200 with the broker up")
    assert readyz(port)[1] == {"status": "ready", "checks": {"database": True, "broker": True}}

    restartable_broker.stop()
    helpers.wait_for(lambda: readyz(port)[0] == 503, 30, "/readyz 503 with the broker stopped")
    assert readyz(port)[1]["checks"] == {"database": True, "broker": False}
    # Liveness is the file, not the broker: the pod is not restarted for a broker outage.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
        assert resp.status == 200

    restartable_broker.start()
    helpers.wait_for(lambda: readyz(port)[0] == 200, 60, "/readyz 200 once the broker is back")
    assert readyz(port)[1]["checks"] == {"database": True, "broker": True}
    assert tier.stop() == 0
