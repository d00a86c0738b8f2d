"""Compatibility re-export: tracing now lives in kaireon_pub.worker.kafka.tracing (the provider)
and kaireon_pub.worker.kafka.spans (the spans of a batch) (issue 24).

New code imports from those; this one goes once nothing imports it."""

from kaireon_pub.worker.kafka.spans import BatchTrace, _with_context, _written_context
from kaireon_pub.worker.kafka.tracing import Tracing, exporter_names, setup

__all__ = ["BatchTrace", "Tracing", "_with_context", "_written_context", "exporter_names", "setup"]
