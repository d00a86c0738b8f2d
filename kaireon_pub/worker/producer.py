"""Compatibility re-export: make_producer now lives in kaireon_pub.worker.kafka.producer (issue 24).

New code imports from there; this one goes once nothing imports it."""

from kaireon_pub.worker.kafka.producer import make_producer

__all__ = ["make_producer"]
