"""Traces of the publish: the tracer provider and its exporters (the optional `otel` extra);
spans.py makes the spans of each batch and event.

Off unless `OTEL_TRACES_EXPORTER` names an exporter (and `OTEL_SDK_DISABLED` is not `true`): then,
and only then, `setup()` imports the SDK, in the worker after fork(). Off, or without the extra,
nothing of OpenTelemetry is imported and the publisher's only extra work is a `None` check.

The SDK reads the rest of its configuration itself: `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` (the resource; `service.name` defaults to `kaireon-pub`), the sampler
(`OTEL_TRACES_SAMPLER`, `_ARG`), the batch processor (`OTEL_BSP_*`), the OTLP exporter's endpoint,
headers, timeout and so on (`OTEL_EXPORTER_OTLP_*`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from kaireon_pub.errors import new_error_id
from kaireon_pub.worker.kafka.spans import BatchTrace
from kaireon_pub.worker.rows import Row

log = logging.getLogger("kaireon_pub.worker.tracing")  # the name of the module these lines came from

EXPORTERS_GROUP = "opentelemetry_traces_exporter"  # the entry points the exporter packages register
OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
DEFAULT_SERVICE_NAME = "kaireon-pub"
LOG_EVERY_S = 30.0  # at most one line per this many seconds for a failure that repeats


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
