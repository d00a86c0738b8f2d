"""Traces end to end (issue 17): `kaireon-pub run` with OTEL_TRACES_EXPORTER=console prints the
spans of an event on the worker's stdout, one JSON object a line, linked to the trace the
application wrote; the tier's own log stays JSON lines on stderr; without the extra, nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from kaireon_pub import enqueue
from tests.helpers import TopicReader, status_counts, wait_for

APP_TRACE = "0af7651916cd43dd8448eb211c80319c"
APP_SPAN = "b7ad6b7169203331"
APP_TRACEPARENT = f"00-{APP_TRACE}-{APP_SPAN}-01"


class Run:
    """`kaireon-pub run` with its stdout and stderr apart (helpers.Tier merges them)."""

    def __init__(self, env: dict[str, str], tmp_path: Path):
        self.out_path, self.err_path = tmp_path / "stdout", tmp_path / "stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "kaireon_pub", "run"], env=env,
                                         stdout=out, stderr=err, start_new_session=True)

    def logs(self) -> list[dict]:
        return [json.loads(line) for line in self.err_path.read_text().splitlines() if line.strip()]

    def stdout_lines(self) -> list[str]:
        return [line for line in self.out_path.read_text().splitlines() if line.strip()]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def run(tmp_path):
    started: list[Run] = []

    def start(env: dict[str, str]) -> Run:
        started.append(Run(env, tmp_path))
        return started[-1]
    yield start
    for r in started:
        r.kill()


def enqueue_two(db_url: str, topic: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as conn:
        traced = enqueue(conn, topic=topic, key="o-1", payload={"n": 1},
                         headers={"traceparent": APP_TRACEPARENT, "tracestate": "app=1"})
        plain = enqueue(conn, topic=topic, key="o-2", payload={"n": 2})
        conn.commit()
    return traced, plain


def read_records(reader: TopicReader, n: int) -> dict[int, dict[str, bytes]]:
    messages = reader.read_count(n, timeout=60)
    return {int(dict(m.headers())["event-id"]): dict(m.headers()) for m in messages}


def otel_env(tier_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in tier_env.items() if not k.startswith("OTEL_")}
    return {**env, **extra}


@pytest.mark.timeout(120)
def test_console_spans_link_to_the_application_trace(db_url, topic, tier_env, run, topic_reader):
    traced, plain = enqueue_two(db_url, topic)
    tier = run(otel_env(tier_env, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="orders-outbox"))
    records = read_records(topic_reader(topic), 2)
    wait_for(lambda: status_counts(db_url) == {"published": 2}, 30, "both published")
    assert tier.stop() == 0  # the drain flushes the spans still held

    # stderr: the tier's log, every line a JSON object, the traces' own lines among them.
    logs = tier.logs()
    assert any(line.get("event") == "traces on" and line.get("exporters") == ["console"] for line in logs)
    assert any(line.get("event") == "traces flushed" for line in logs)
    # stdout: the spans, one JSON object a line.
    spans = [json.loads(line) for line in tier.stdout_lines()]
    events = {s["attributes"]["messaging.message.id"]: s for s in spans if s["name"] == f"send {topic}"}
    assert set(events) == {str(traced), str(plain)}
    span = events[str(traced)]
    assert span["kind"] == "SpanKind.PRODUCER"
    assert [link["context"]["trace_id"] for link in span["links"]] == [f"0x{APP_TRACE}"]
    assert [link["context"]["span_id"] for link in span["links"]] == [f"0x{APP_SPAN}"]
    assert span["attributes"]["messaging.system"] == "kafka"
    assert span["attributes"]["messaging.destination.name"] == topic
    assert span["resource"]["attributes"]["service.name"] == "orders-outbox"
    batch = next(s for s in spans if s["name"] == "send" and s["context"]["span_id"] == span["parent_id"])
    assert batch["attributes"]["kaireon.outbox.delivered"] >= 1

    # The records carry the event span's context as their traceparent; the application's
    # tracestate went with its trace.
    for event_id in (traced, plain):
        context = events[str(event_id)]["context"]
        _, trace_id, span_id, _ = records[event_id]["traceparent"].decode().split("-")
        assert (f"0x{trace_id}", f"0x{span_id}") == (context["trace_id"], context["span_id"])
    assert "tracestate" not in records[traced]


@pytest.mark.timeout(120)
def test_without_the_extra_the_tier_publishes_as_before(db_url, topic, tier_env, run, topic_reader, tmp_path):
    # The extra "not installed": an `opentelemetry` package first on the path whose import fails.
    fake = tmp_path / "fake" / "opentelemetry"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named opentelemetry (test)')\n")
    traced, plain = enqueue_two(db_url, topic)
    tier = run(otel_env(tier_env, OTEL_TRACES_EXPORTER="console", PYTHONPATH=str(fake.parent)))
    records = read_records(topic_reader(topic), 2)
    wait_for(lambda: status_counts(db_url) == {"published": 2}, 30, "both published")
    assert tier.stop() == 0
    assert records[traced]["traceparent"] == APP_TRACEPARENT.encode()  # exactly as written
    assert records[traced]["tracestate"] == b"app=1"
    assert "traceparent" not in records[plain]
    assert tier.stdout_lines() == []
    off = [line for line in tier.logs() if line.get("event") == "traces off"]
    assert off and off[0]["level"] == "WARNING" and "kaireon-pub[otel]" in off[0]["msg"]


@pytest.mark.timeout(120)
def test_an_unreachable_collector_is_logged_and_the_drain_stays_within_its_budget(db_url, topic, tier_env, run,
                                                                                   topic_reader):
    traced, plain = enqueue_two(db_url, topic)
    tier = run(otel_env(tier_env, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
                        OTEL_BSP_SCHEDULE_DELAY="100"))
    records = read_records(topic_reader(topic), 2)
    wait_for(lambda: status_counts(db_url) == {"published": 2}, 30, "both published")
    assert "traceparent" in records[plain]  # the spans exist; only their export fails
    # The exporter retries for OTEL_EXPORTER_OTLP_TIMEOUT (10 s); the drain waits for it 5 s at most.
    wait_for(lambda: any(line.get("level") == "WARNING" and "opentelemetry" in line.get("logger", "")
                         for line in tier.logs()), 30, "the exporter's warning")
    started = time.monotonic()
    assert tier.stop() == 0
    assert time.monotonic() - started < 10
    logs = tier.logs()  # every line JSON, the exporter's own among them
    warned = [line for line in logs if line.get("level") == "WARNING" and "opentelemetry" in line.get("logger", "")]
    assert warned and all(line.get("errorId") for line in warned)
    assert any(line.get("event") in ("traces flushed", "trace flush timeout") for line in logs)
