"""Traces of the publish: OpenTelemetry spans per batch and per event (the optional `otel` extra).

Off unless `OTEL_TRACES_EXPORTER` names an exporter (and `OTEL_SDK_DISABLED` is not `true`): then,
and only then, `setup()` imports the SDK, in the worker after fork(). Off, or without the extra,
nothing of OpenTelemetry is imported and the publisher's only extra work is a `None` check.

What the tier emits, with the messaging semantic conventions:
- one span per published batch, `send` (kind CLIENT: its context goes on no record), with the
  batch's size and outcome counts;
- one span per event whose record was built, `send <topic>` (kind PRODUCER), a child of the batch
  span, from `produce()` to the event's delivery report (or the end of the batch for an event
  that was not confirmed), with `messaging.system=kafka`, `messaging.destination.name`,
  `messaging.message.id` (the event id), the partition and offset once delivered;
- the event span **links** to the context of the `traceparent` the application stored with the
  row (the trace the event was written in), and its own context is the record's `traceparent`.

Why a link, not a child: the publish happens seconds to hours after the application's request
ended (a backlog, an outage, a retry), one batch carries events of many traces, and one event can
be published more than once (a retry, a duplicate after a takeover). As children, those spans
would stretch the application's trace to the publish time and re-open it at every attempt; as
links, the tier's traces stay its own (sampled by its own sampler) and every publish attempt is
one click away from the application's trace, and back.

What wins on the record: when the event span is recorded (sampled), its context replaces the
row's `traceparent` (and drops the row's `tracestate`, which belongs to that trace), so a consumer
continues from the publish, and from there, through the link, reaches the application's trace.
When the span is not sampled, or tracing is off, the row's headers pass exactly as they are.

The batch is the unit of sampling (its span is a root): a batch the sampler drops costs one
sampling decision and nothing per event; a recorded event span costs the Python SDK's span (tens
of microseconds of CPU), hence a ratio sampler at high rates (README, Traces).

The SDK reads the rest of its configuration itself: `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` (the resource; `service.name` defaults to `kaireon-pub`), the sampler
(`OTEL_TRACES_SAMPLER`, `_ARG`), the batch processor (`OTEL_BSP_*`), the OTLP exporter's endpoint,
headers, timeout and so on (`OTEL_EXPORTER_OTLP_*`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from kaireon_pub.errors import new_error_id
from kaireon_pub.worker.publisher import BatchOutcome, classify, describe
from kaireon_pub.worker.rows import Row

log = logging.getLogger("kaireon_pub.worker.tracing")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
EXPORTERS_GROUP = "opentelemetry_traces_exporter"  # the entry points the exporter packages register
OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
DEFAULT_SERVICE_NAME = "kaireon-pub"
LOG_EVERY_S = 30.0  # at most one line per this many seconds for a failure that repeats
OUTCOME_BY_KIND = {"permanent": "rejected", "retry": "retry"}  # every other kind: released
# W3C Trace Context's traceparent: version-trace_id-parent_id-flags (a later version may add fields).
TRACEPARENT_FORMAT = re.compile(r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^ \t]*)?[ \t]*")


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names; empty when tracing is off.

    Unset means off here (the specification's default is `otlp`): installing the extra, or a
    platform that injects OTEL_EXPORTER_OTLP_ENDPOINT into every pod, must not start exporting.
    `otlp` is the OTLP exporter of OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL,
    `http/protobuf` by default (the specification's default; the SDK's own would be grpc, which
    the extra does not install)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    names = [n for n in names if n.lower() != "none"]
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    return [OTLP_BY_PROTOCOL.get(protocol, f"otlp ({protocol})") if n == "otlp" else n for n in names]


def setup(environ: Mapping[str, str], *, slot: int) -> Tracing | None:
    """The worker's tracer provider, or None (off, the extra missing, an exporter that cannot be
    made: each but the first logged once). Call in the worker, after fork(); never raises."""
    names = exporter_names(environ)
    if not names:
        return None
    try:
        return Tracing([_make_exporter(name) for name in names], slot=slot, names=names)
    except ImportError as exc:
        log.warning(f"OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed "
                    f"(pip install 'kaireon-pub[otel]'): no traces ({exc})", extra={
                        "event": "traces off", "errorId": new_error_id(), "variable": "OTEL_TRACES_EXPORTER"})
    except Exception as exc:  # noqa: BLE001 - a tracing setup that fails must not stop the publishing
        log.error(f"traces off: cannot set up OTEL_TRACES_EXPORTER={','.join(names)}: "
                  f"{type(exc).__name__}: {exc}", extra={
                      "event": "traces off", "errorId": new_error_id(), "variable": "OTEL_TRACES_EXPORTER"})
    return None


class _Throttle:
    """Logs a repeating failure at most once per LOG_EVERY_S, with how many were not logged."""

    def __init__(self, event: str):
        self.event = event
        self.lock = threading.Lock()
        self.last = float("-inf")
        self.quiet = 0

    def log(self, level: int, text: str) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last < LOG_EVERY_S:
                self.quiet += 1
                return
            self.last, quiet, self.quiet = now, self.quiet, 0
        log.log(level, text, extra={"event": self.event, "errorId": new_error_id(), "notLogged": quiet})


class Tracing:
    """One worker's tracer provider, its exporters and the tier's tracer."""

    def __init__(self, exporters: list[Any], *, slot: int, names: list[str] | None = None):
        # Imported here, not at module level: off, none of this is loaded.
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from kaireon_pub import __version__

        self._trace = trace
        self.export_failures = _Throttle("trace export failed")
        self.hook_failures = _Throttle("tracing failed")
        names = names or [type(e).__name__ for e in exporters]
        resource = Resource.create({"service.version": __version__, "kaireon.worker.slot": slot})
        if resource.attributes.get("service.name", "").startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
        # shutdown_on_exit=False: the worker shuts it down at the drain, within the budget; an
        # atexit hook could wait for an exporter longer than that.
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for exporter in exporters:
            self.provider.add_span_processor(BatchSpanProcessor(_guarded(exporter, self.export_failures)))
        self.tracer = self.provider.get_tracer("kaireon_pub", __version__)
        self.names = names
        log.info(f"traces on: {','.join(names)}", extra={
            "event": "traces on", "exporters": names, "serviceName": resource.attributes.get("service.name")})

    def batch(self, rows: list[Row], client_id: str) -> BatchTrace | None:
        """The spans of one batch (event loop thread); None when the sampler dropped the batch
        (then none of its events costs more than a None check) or when that fails (logged)."""
        try:
            spans = BatchTrace(self, rows, client_id)
            return spans if spans.span.is_recording() else None
        except Exception as exc:  # noqa: BLE001 - tracing never breaks a publish
            self.hook_failures.log(logging.ERROR, f"tracing failed: {type(exc).__name__}: {exc}")
            return None

    def _shutdown(self) -> None:
        try:
            self.provider.shutdown()  # every processor exports what it holds, then stops
        except Exception as exc:  # noqa: BLE001 - a failing exporter is logged, never raised
            self.export_failures.log(logging.WARNING, f"trace shutdown failed: {type(exc).__name__}: {exc}")

    async def close(self, budget_s: float) -> bool:
        """Export the spans still held and stop, within `budget_s`; False when the budget ran out
        (the spans still held are dropped with the process). The shutdown runs on a daemon
        thread of its own: an exporter stuck on a collector cannot hold the worker's exit."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            self._shutdown()
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

        threading.Thread(target=run, name="trace-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, budget_s)
        except TimeoutError:
            log.warning(f"traces not flushed within {budget_s:.1f} s; the spans still held are dropped",
                        extra={"event": "trace flush timeout", "errorId": new_error_id(), "budgetSeconds": budget_s})
            return False
        log.info("traces flushed", extra={"event": "traces flushed"})
        return True


class BatchTrace:
    """The spans of one batch: the batch span, and one span per event handed to librdkafka.

    `event()` runs on the event loop before the event's produce(), `reported()` on the delivery
    thread under the batch's lock (ending the event's span at its delivery report), `end()` on the
    event loop once the batch is closed (no report can come any more): it ends the rest."""

    __slots__ = ("_t", "span", "_parent", "_events", "_base")

    def __init__(self, tracing: Tracing, rows: list[Row], client_id: str):
        trace = tracing._trace
        self._t = tracing
        self._base = {"messaging.system": "kafka", "messaging.operation.name": "send",
                      "messaging.operation.type": "send"}
        self.span = tracing.tracer.start_span("send", kind=trace.SpanKind.CLIENT, attributes={
            **self._base, "messaging.client.id": client_id, "messaging.batch.message_count": len(rows)})
        self._parent = trace.set_span_in_context(self.span)
        self._events: dict[int, Any] = {}

    def event(self, row: Row, headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Start the event's span; the record's headers with its context as `traceparent`."""
        t = self._t
        try:
            trace = t._trace
            links = None
            written = _written_context(trace, headers)
            if written is not None:
                links = [trace.Link(written)]
            attributes = {**self._base, "messaging.destination.name": row.topic, "messaging.message.id": str(row.id)}
            if row.payload is None:
                attributes["messaging.kafka.message.tombstone"] = True
            if row.attempts:
                attributes["kaireon.outbox.attempts"] = row.attempts
            span = t.tracer.start_span(f"send {row.topic}", context=self._parent, kind=trace.SpanKind.PRODUCER,
                                       links=links, attributes=attributes)
            self._events[row.id] = span
            ctx = span.get_span_context()
            if not ctx.trace_flags.sampled:
                return headers  # not recorded: the application's context stays the record's
            ours = [(TRACEPARENT, _traceparent(ctx))]
            if ctx.trace_state:
                ours.append((TRACESTATE, ctx.trace_state.to_header().encode()))
            return _with_context(headers, ours)
        except Exception as exc:  # noqa: BLE001 - tracing never breaks a publish
            t.hook_failures.log(logging.ERROR, f"tracing failed: {type(exc).__name__}: {exc}")
            return headers

    def reported(self, event_id: int, err: Any, msg: Any) -> None:
        """The event's delivery report (delivery thread): its span ends now."""
        span = self._events.pop(event_id, None)
        if span is None:
            return
        try:
            if err is None:
                span.set_attribute("kaireon.outbox.outcome", "delivered")
                span.set_attribute("messaging.destination.partition.id", str(msg.partition()))
                span.set_attribute("messaging.kafka.offset", msg.offset())
            else:
                self._failed(span, OUTCOME_BY_KIND.get(classify(err), "released"), err.name(), describe(err))
            span.end()
        except Exception as exc:  # noqa: BLE001 - tracing never breaks a publish
            self._t.hook_failures.log(logging.ERROR, f"tracing failed: {type(exc).__name__}: {exc}")

    def end(self, out: BatchOutcome) -> None:
        """The batch's outcome: end the event spans no report ended, then the batch span."""
        try:
            for event_id, span in self._events.items():
                if event_id in out.rejected:
                    self._failed(span, "rejected", "rejected", out.rejected[event_id])
                elif event_id in out.retry:
                    self._failed(span, "retry", "retry", out.retry[event_id])
                else:
                    reason = out.producer_error or out.systemic_error or out.transient_error or "released"
                    self._failed(span, "released", "released", reason)
                span.end()
            self._events.clear()
            span = self.span
            for name, value in (("delivered", len(out.delivered)), ("rejected", len(out.rejected)),
                                ("retry", len(out.retry)), ("released", len(out.released)),
                                ("unconfirmed", out.unconfirmed)):
                span.set_attribute(f"kaireon.outbox.{name}", value)
            error = out.producer_error or out.systemic_error or out.transient_error
            if error:
                span.set_attribute("error.type", "producer" if out.producer_error else
                                   "systemic" if out.systemic_error else "transient")
                span.set_status(self._t._trace.Status(self._t._trace.StatusCode.ERROR, error))
            span.end()
        except Exception as exc:  # noqa: BLE001 - tracing never breaks a publish
            self._t.hook_failures.log(logging.ERROR, f"tracing failed: {type(exc).__name__}: {exc}")

    def _failed(self, span: Any, outcome: str, error_type: str, text: str) -> None:
        trace = self._t._trace
        span.set_attribute("kaireon.outbox.outcome", outcome)
        span.set_attribute("error.type", error_type)
        span.set_status(trace.Status(trace.StatusCode.ERROR, text))


def _written_context(trace: Any, headers: list[tuple[str, bytes]]) -> Any:
    """The SpanContext of the row's traceparent (and tracestate), or None when it has no valid one.

    W3C Trace Context's rules: version ff is invalid, version 00 has exactly four fields, neither
    id may be all zeros; header names are matched in any case."""
    parent = state = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == TRACEPARENT:
            parent = value
        elif lowered == TRACESTATE:
            state = value
    if parent is None:
        return None
    match = TRACEPARENT_FORMAT.fullmatch(parent.decode("latin-1"))
    if match is None:
        return None
    version, trace_id, span_id, flags, more = match.groups()
    if version == "ff" or (version == "00" and more):
        return None
    trace_id, span_id = int(trace_id, 16), int(span_id, 16)
    if not trace_id or not span_id:
        return None
    trace_state = trace.TraceState.from_header([state.decode("latin-1")]) if state else None
    return trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(int(flags, 16)),
                             trace_state=trace_state)


def _traceparent(ctx: Any) -> bytes:
    """A span's context as a traceparent header value."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()


def _with_context(headers: list[tuple[str, bytes]], ours: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """`headers` with the trace context headers (any case) replaced by `ours`, where the first of
    them was (else at the end)."""
    kept: list[tuple[str, bytes]] = []
    at = None
    for name, value in headers:
        if name.lower() in (TRACEPARENT, TRACESTATE):
            at = len(kept) if at is None else at
        else:
            kept.append((name, value))
    at = len(kept) if at is None else at
    return kept[:at] + ours + kept[at:]


def _make_exporter(name: str) -> Any:
    """The span exporter an OTEL_TRACES_EXPORTER name stands for, from the entry points the
    exporter packages register (`console` from the SDK, `otlp_proto_http` from the extra...)."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # One span per line on stdout: the tier's own log lines are JSON on stderr, one a line.
        return ConsoleSpanExporter(out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + os.linesep)
    from importlib.metadata import entry_points

    found = list(entry_points(group=EXPORTERS_GROUP, name=name))
    if not found:
        hint = " (pip install opentelemetry-exporter-otlp-proto-grpc)" if name == "otlp_proto_grpc" else ""
        raise LookupError(f"no trace exporter named {name!r} is installed{hint}")
    return found[0].load()()  # the exporter reads its own OTEL_EXPORTER_* variables


def _guarded(exporter: Any, failures: _Throttle) -> Any:
    """The exporter, with its failures logged (throttled) as the tier's own lines, never raised."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Guarded(SpanExporter):
        def export(self, spans):  # noqa: ANN001, ANN202
            try:
                result = exporter.export(spans)
            except Exception as exc:  # noqa: BLE001 - an exporter failure is logged, not raised
                failures.log(logging.WARNING, f"trace export failed ({len(spans)} spans dropped): "
                                              f"{type(exc).__name__}: {exc}")
                return SpanExportResult.FAILURE
            if result is not SpanExportResult.SUCCESS:
                failures.log(logging.WARNING, f"trace export failed ({len(spans)} spans dropped)")
            return result

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return exporter.force_flush(timeout_millis)

    return Guarded()
