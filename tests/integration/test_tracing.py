"""Traces of the publish (issue 17) with the SDK's in-memory exporter and the real broker: the
spans of one event link to the trace the application wrote, the record carries the event span's
context; tracing off imports nothing; an exporter or a hook that fails never breaks a publish."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka import spans, tracing
from kaireon_pub.worker.kafka.publisher import Publisher
from kaireon_pub.worker.rows import Row
from tests.helpers import TopicReader

ROOT = Path(__file__).resolve().parents[2]
APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
APP_TRACEPARENT = f"00-{APP_TRACE}-{APP_SPAN}-01"


def rows_for(topic: str, headers: list[dict[str, str]]) -> list[Row]:
    now = time.time()
    return [Row(i, topic, f"k{i}", f'{{"i": {i}}}'.encode(), json.dumps(h), "test.event", 0, 0, 1000 + i,
                now, "2026-11-28T00:00:00.000000Z")
            for i, h in enumerate(headers, start=1)]


def publish(broker, rows: list[Row], tracer: tracing.Tracing | None):
    settings = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap})

    async def run():
        publisher = Publisher(settings, client_id="test-tracing", tracing=tracer)
        try:
            return await publisher.publish(rows, True, time.monotonic() + 60, lambda: float("inf"))
        finally:
            await publisher.close()
    return asyncio.run(run())


def read_headers(broker, topic: str, n: int) -> dict[int, list[tuple[str, bytes]]]:
    reader = TopicReader(broker.bootstrap, topic)
    try:
        messages = reader.read_count(n, timeout=30)
    finally:
        reader.close()
    return {int(dict(m.headers())["event-id"]): m.headers() for m in messages}


@pytest.fixture
def memory():
    """A Tracing whose spans land in the SDK's in-memory exporter; spans() flushes and reads them."""
    exporter = InMemorySpanExporter()
    t = tracing.Tracing([exporter], slot=0)

    def spans():
        t.provider.force_flush()
        return exporter.get_finished_spans()
    t.spans = spans
    yield t
    t.provider.shutdown()


@pytest.mark.timeout(60)
def test_the_event_span_links_to_the_application_trace_and_the_record_carries_its_context(broker, topic, memory):
    rows = rows_for(topic, [{"traceparent": APP_TRACEPARENT, "tracestate": "app=1", "x": "y"}, {}])
    outcome = publish(broker, rows, memory)
    assert sorted(outcome.delivered) == [1, 2]

    spans = memory.spans()
    batch = next(s for s in spans if s.name == "send")
    events = {int(s.attributes["messaging.message.id"]): s for s in spans if s.name == f"send {topic}"}
    assert set(events) == {1, 2} and len(spans) == 3
    first = events[1]
    # The link: the trace and span the application wrote in traceparent.
    assert [(format(link.context.trace_id, "032x"), format(link.context.span_id, "016x")) for link in first.links] \
        == [(APP_TRACE, APP_SPAN)]
    assert first.kind is SpanKind.PRODUCER and batch.kind is SpanKind.CLIENT
    assert first.parent.span_id == batch.context.span_id and first.context.trace_id == batch.context.trace_id
    assert first.context.trace_id != int(APP_TRACE, 16)  # a link, not a child
    attrs = first.attributes
    assert attrs["messaging.system"] == "kafka" and attrs["messaging.destination.name"] == topic
    assert attrs["messaging.operation.type"] == "send" and attrs["kaireon.outbox.outcome"] == "delivered"
    assert attrs["messaging.destination.partition.id"].isdigit() and attrs["messaging.kafka.offset"] >= 0
    assert batch.attributes["messaging.batch.message_count"] == 2 and batch.attributes["kaireon.outbox.delivered"] == 2
    assert events[2].links == ()  # no traceparent in the row: no link

    # The records: the event span's context is their traceparent; the application's tracestate
    # (of the other trace) is gone; the other headers are untouched, in their order.
    headers = read_headers(broker, topic, 2)
    for event_id, span in events.items():
        values = [v for n, v in headers[event_id] if n == "traceparent"]
        ctx = span.context
        assert values == [f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()]
        assert ctx.trace_flags.sampled
    assert [n for n, _ in headers[1]] == ["event-id", "event-type", "created-at", "traceparent", "x"]
    assert [n for n, _ in headers[2]][-1] == "traceparent"


@pytest.mark.timeout(60)
def test_a_span_not_sampled_leaves_the_applications_headers_as_they_are(broker, topic, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    t = tracing.Tracing([exporter], slot=0)
    rows = rows_for(topic, [{"traceparent": APP_TRACEPARENT, "tracestate": "app=1"}, {}])
    assert t.batch(rows, "c") is None  # a batch the sampler dropped costs its events nothing more
    assert sorted(publish(broker, rows, t).delivered) == [1, 2]
    t.provider.force_flush()
    assert exporter.get_finished_spans() == ()
    headers = read_headers(broker, topic, 2)
    assert ("traceparent", APP_TRACEPARENT.encode()) in headers[1] and ("tracestate", b"app=1") in headers[1]
    assert "traceparent" not in dict(headers[2])
    t.provider.shutdown()


@pytest.mark.timeout(60)
def test_events_that_are_not_delivered_end_their_span_with_the_outcome(broker, topic, memory):
    # Row 2 is an invalid topic name, row 3's headers are not an object: both are refused before a
    # record exists (no event span); the batch span counts them all.
    rows = rows_for(topic, [{"traceparent": APP_TRACEPARENT}, {}, {}])
    rows[1] = rows[1]._replace(topic="bad topic!")
    rows[2] = rows[2]._replace(headers="[1]")
    outcome = publish(broker, rows, memory)
    assert outcome.delivered == [1] and set(outcome.rejected) == {2, 3}
    spans = {s.attributes.get("messaging.message.id"): s for s in memory.spans()}
    assert spans["1"].attributes["kaireon.outbox.outcome"] == "delivered"
    assert "2" not in spans and "3" not in spans
    batch = spans[None]
    assert (batch.attributes["kaireon.outbox.delivered"], batch.attributes["kaireon.outbox.rejected"]) == (1, 2)


class Failing(InMemorySpanExporter):
    def export(self, spans):
        raise ConnectionError("collector unreachable")


@pytest.mark.timeout(60)
def test_an_exporter_that_fails_is_logged_and_publishing_goes_on(broker, topic, caplog):
    t = tracing.Tracing([Failing()], slot=0)
    rows = rows_for(topic, [{"traceparent": APP_TRACEPARENT}])
    with caplog.at_level(logging.WARNING):
        assert publish(broker, rows, t).delivered == [1]
        t.provider.force_flush()
    failed = [r for r in caplog.records if getattr(r, "event", None) == "trace export failed"]
    assert failed and "collector unreachable" in failed[0].getMessage() and failed[0].errorId
    t.provider.shutdown()


@pytest.mark.timeout(60)
def test_a_tracing_hook_that_fails_never_breaks_a_publish(broker, topic, memory, monkeypatch, caplog):
    def broken(*_args, **_kwargs):
        raise RuntimeError("injected")
    monkeypatch.setattr(spans, "_traceparent", broken)  # where BatchTrace looks it up
    rows = rows_for(topic, [{"traceparent": APP_TRACEPARENT}, {}])
    with caplog.at_level(logging.ERROR):
        assert sorted(publish(broker, rows, memory).delivered) == [1, 2]
    assert any(getattr(r, "event", None) == "tracing failed" for r in caplog.records)
    headers = read_headers(broker, topic, 2)
    assert ("traceparent", APP_TRACEPARENT.encode()) in headers[1]  # left as the application wrote it
    # A tracer that cannot even start the batch span: no spans, the batch is published.
    monkeypatch.setattr(memory.tracer, "start_span", broken)
    assert publish(broker, rows_for(topic, [{}]), memory).delivered == [1]


def test_close_is_bounded_by_its_budget_when_an_exporter_hangs():
    class Hanging(InMemorySpanExporter):
        def export(self, spans):
            time.sleep(30)
    t = tracing.Tracing([Hanging()], slot=0)
    t.tracer.start_span("x").end()

    async def close():
        started = time.monotonic()
        flushed = await t.close(0.3)
        return flushed, time.monotonic() - started
    flushed, took = asyncio.run(close())
    assert flushed is False and took < 2


def test_close_exports_what_is_held():
    exporter = InMemorySpanExporter()
    t = tracing.Tracing([exporter], slot=0)
    t.tracer.start_span("held").end()
    assert asyncio.run(t.close(5)) is True
    assert [s.name for s in exporter.get_finished_spans()] == ["held"]


# ---- configuration: off, on, what the variables select ----------------------------------------

@pytest.mark.parametrize(("environ", "names"), [
    ({}, []),
    ({"OTEL_TRACES_EXPORTER": "none"}, []),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),  # an endpoint alone: still off
    ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp_proto_http"]),
    ({"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ["otlp_proto_grpc", "console"]),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, ["otlp_proto_http"]),
])
def test_exporter_names(environ, names):
    assert tracing.exporter_names(environ) == names


def test_an_exporter_that_is_not_installed_turns_traces_off_with_an_error_line(caplog):
    with caplog.at_level(logging.ERROR):
        assert tracing.setup({"OTEL_TRACES_EXPORTER": "zipkin"}, slot=0) is None
    line = next(r for r in caplog.records if getattr(r, "event", None) == "traces off")
    assert "no trace exporter named 'zipkin'" in line.getMessage() and line.errorId


def test_the_otlp_exporter_reads_its_own_variables(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "orders-outbox")
    t = tracing.setup({"OTEL_TRACES_EXPORTER": "otlp"}, slot=3)
    assert t is not None and t.names == ["otlp_proto_http"]
    assert t.provider.resource.attributes["service.name"] == "orders-outbox"
    assert t.provider.resource.attributes["kaireon.worker.slot"] == 3
    t.provider.shutdown()


def test_the_service_name_defaults_to_kaireon_pub(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    t = tracing.Tracing([InMemorySpanExporter()], slot=0)
    assert t.provider.resource.attributes["service.name"] == "kaireon-pub"
    t.provider.shutdown()


@pytest.mark.parametrize(("value", "valid"), [
    (APP_TRACEPARENT, True),
    (f" {APP_TRACEPARENT}\t", True),
    (f"00-{APP_TRACE}-{APP_SPAN}-00", True),  # not sampled by the application: still its trace
    (f"01-{APP_TRACE}-{APP_SPAN}-01-later-fields", True),  # a later version may add fields
    (f"00-{APP_TRACE}-{APP_SPAN}-01-more", False),
    (f"ff-{APP_TRACE}-{APP_SPAN}-01", False),
    (f"00-{'0' * 32}-{APP_SPAN}-01", False),
    (f"00-{APP_TRACE}-{'0' * 16}-01", False),
    (f"00-{APP_TRACE.upper()}-{APP_SPAN}-01", False),
    ("00-ab-cd-01", False),
    ("", False),
])
def test_the_written_traceparent_is_read_by_the_w3c_rules(value, valid):
    from opentelemetry import trace
    ctx = spans._written_context(trace, [("Traceparent", value.encode()), ("tracestate", b"app=1,b=2")])
    assert (ctx is not None) is valid
    if valid:
        assert (ctx.trace_id, ctx.span_id, ctx.is_remote) == (int(APP_TRACE, 16), int(APP_SPAN, 16), True)
        assert ctx.trace_state.to_header() == "app=1,b=2"


def test_the_context_headers_are_replaced_where_they_were():
    ours = [("traceparent", b"00-new")]
    assert spans._with_context([("a", b"1"), ("Traceparent", b"old"), ("b", b"2"), ("tracestate", b"s")], ours) \
        == [("a", b"1"), ("traceparent", b"00-new"), ("b", b"2")]
    assert spans._with_context([("a", b"1")], ours) == [("a", b"1"), ("traceparent", b"00-new")]


# ---- off: nothing imported, nothing changed ---------------------------------------------------

def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OUTBOX_", "KAFKA_"))}
    return {**env, **extra}


OFF_PROBE = """
    import sys
    import kaireon_pub.cli, kaireon_pub.worker.main, kaireon_pub.worker.loop  # what the supervisor imports
    from kaireon_pub.worker.kafka import tracing
    assert tracing.setup(__import__("os").environ, slot=0) is None
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    assert not loaded, loaded
    print("nothing imported")
"""


def test_off_nothing_of_opentelemetry_is_imported():
    done = run_python(OFF_PROBE, clean_env(OTEL_SERVICE_NAME="x", OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing imported" in done.stdout
    assert "opentelemetry" not in done.stderr  # -X importtime lists every module imported


def test_without_the_extra_traces_are_off_with_one_warning(tmp_path):
    # The extra "not installed": an `opentelemetry` package earlier on the path whose import fails.
    fake = tmp_path / "opentelemetry"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named opentelemetry (test)')\n")
    code = """
        import logging, sys
        from kaireon_pub import logs
        logs.configure()
        from kaireon_pub.worker.kafka import tracing
        assert tracing.setup({"OTEL_TRACES_EXPORTER": "console"}, slot=0) is None
        print("off")
    """
    done = run_python(code, clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "off"
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    warning = next(line for line in lines if line.get("event") == "traces off")
    assert warning["level"] == "WARNING" and "kaireon-pub[otel]" in warning["msg"] and warning["errorId"]
