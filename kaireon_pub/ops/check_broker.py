"""`kaireon-pub check`'s broker checks: reachable, and the topics named or of pending events exist
(or the broker creates them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kaireon_pub import logs
from kaireon_pub.ops.check_report import TIMEOUT_SECONDS, Report, hide
from kaireon_pub.settings import PRODUCER_DEFAULTS

# Producer-only settings an admin client does not need (idempotence would request a producer id).
_ADMIN_EXCLUDED = frozenset(PRODUCER_DEFAULTS) - {"bootstrap.servers"}


def check_broker_and_topics(report: Report, kafka: Mapping[str, str], secrets: list[str],
                             named: tuple[str, ...], pending: list[str], auto_create: bool | None) -> None:
    bootstrap = str(kafka.get("bootstrap.servers") or "").strip()
    if not bootstrap:
        report.add("broker", "fail", "KAFKA_BOOTSTRAP_SERVERS is not set")
        report.add("topics", "skip", "broker not configured")
        return
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from kaireon_pub.worker.kafka.errors import describe
    from kaireon_pub.worker.kafka.producer import REFUSALS

    refusals: list[str] = []

    def on_error(err: Any) -> None:
        if err.code() in REFUSALS:
            refusals.append(describe(err))

    config: dict[str, object] = {k: v for k, v in kafka.items() if k not in _ADMIN_EXCLUDED}
    config["logger"] = logs.librdkafka_logger()
    config["error_cb"] = on_error
    admin = None
    try:
        admin = AdminClient(config)
        # No topic named: a metadata request for every topic, which never auto-creates one.
        metadata = admin.list_topics(timeout=TIMEOUT_SECONDS)
    except (KafkaException, ValueError, TypeError) as exc:
        if admin is not None:
            admin.poll(0)  # serves the error callback: the broker's refusal, if it refused us
        if refusals:
            # A timeout or a transport failure says less than the broker's reason for refusing us.
            report.add("broker", "fail", f"refused at {bootstrap}: {hide(refusals[-1], secrets)}")
        else:
            report.add("broker", "fail", f"unreachable at {bootstrap}: {hide(str(exc), secrets)}")
        report.add("topics", "skip", "broker unreachable")
        return
    existing = {name for name, t in metadata.topics.items() if t.error is None}
    report.add("broker", "ok", f"reachable at {bootstrap} (brokers: {len(metadata.brokers)}, topics: {len(existing)})")

    wanted = {t: "of pending events" for t in pending} | {t: "named by --topic" for t in named}
    missing = sorted(t for t in wanted if t not in existing)
    if not wanted:
        report.add("topics", "ok", "no topic named and no pending events")
        return
    if not missing:
        report.add("topics", "ok", f"{len(wanted)} topics exist: " + ", ".join(sorted(wanted)))
        return
    source = "--no-auto-create" if auto_create is False else "--auto-create" if auto_create else ""
    if auto_create is None:
        auto_create, source = _broker_auto_create(admin, metadata)
    listed = ", ".join(f"{t} ({wanted[t]})" for t in missing)
    if auto_create is False:
        report.add("topics", "fail", f"missing: {listed}; auto-creation is off ({source}): "
                                     "create them, or events to them fail as unknown topics")
    elif auto_create is True:
        report.add("topics", "ok", f"missing: {listed}; the broker creates them on first use ({source})")
    else:
        report.add("topics", "warn", f"missing: {listed}; whether the broker auto-creates topics is unknown "
                                     "(pass --no-auto-create or --auto-create to decide)")


def _broker_auto_create(admin: Any, metadata: Any) -> tuple[bool | None, str]:
    """The brokers' auto.create.topics.enable, when they answer DescribeConfigs."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    try:
        broker_id = next(iter(metadata.brokers))
        futures = admin.describe_configs([ConfigResource(ResourceType.BROKER, str(broker_id))],
                                         request_timeout=TIMEOUT_SECONDS)
        (future,) = futures.values()
        entry = future.result(timeout=TIMEOUT_SECONDS).get("auto.create.topics.enable")
    except Exception:  # noqa: BLE001 - brokers that do not answer leave the question open
        return None, "the broker did not say"
    if entry is None or entry.value is None:
        return None, "the broker did not say"
    return entry.value.strip().lower() == "true", f"broker auto.create.topics.enable={entry.value}"
