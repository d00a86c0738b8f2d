"""The librdkafka producer: made from the settings, served by a delivery thread, recreated when
broken, disposed of off the event loop.

A delivery thread serves librdkafka (`poll`) all the time, busy or idle. Delivery reports resolve
the batch on the event loop, so the worker's other tasks (the lease keeper, the broker watch)
run while a batch waits for the broker, and librdkafka's log and error callbacks are delivered
within a fraction of a second even when no batch is in flight.

A producer whose own state is wrong (errors.py: fenced, fatal, an unexpected exception from the
client) is marked broken: every waiting batch gives up, and the worker recreates it.

A topic the broker does not have and will not create (auto-creation off, or refused) fails its
own events, not the batch they are in: librdkafka waits `topic.metadata.propagation.max.ms` from the
topic's first produce() before it calls the topic missing, and meanwhile holds that topic's records,
so the batch that holds one waits with every other key in it (the default 30 s outlives the batch's
message.timeout.ms: its records time out, a transient error, batch after batch). The tier sets 1 s:
then the first records fail with UNKNOWN_TOPIC_OR_PART within about a second and later produce()s
raise _UNKNOWN_TOPIC at once, both per-event retries (errors.py: attempts + 1 and a back-off, then
`failed`); once the topic is created, librdkafka finds it within a second or so. Chosen over a topic
list of our own learnt from metadata: the metadata does not say whether the broker would create a
topic it lacks (Tansu and Kafka's default do), so only librdkafka's produce-time lookup can tell a
missing topic from one about to be created, and it does so without a request per row. The cost: a
topic created moments ago that a broker does not know yet within that second (KRaft spreads a new
topic in milliseconds) has its first events retried once, with a back-off, not lost.

A fresh producer is warmed before its first batch (`warm_up`): one metadata request for each
topic it has not been asked about, made by the application before the batch's first produce(). The
idempotent producer cannot send before it has a producer id, and librdkafka asks for one only from
a broker it is connected to, trying again on a 500 ms timer; against Tansu, whose first metadata
answer already names every topic, a fresh producer opened no connection of its own before that
timer: its first record was delivered 1,005 ms after its creation (5 of 5), 57-60 ms with
list_topics(topic) just before the produce() (6 of 6), 57 ms with idempotence off (bench/RESULTS.md,
"The Tansu cold-start regression"). The broker watch's list_topics() did this by chance until it
became a DescribeCluster on an admin client of its own. Never a request for every topic (the
watch's reason), once per topic per producer (again after a recreate), bounded, and a warm-up that
fails or times out does not fail the batch: the produce() then looks the topic up itself.

`make_producer` alone uses no metrics and no threads of our own: the supervisor's configuration
probe uses it in a child before any worker exists.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Producer

from kaireon_pub.errors import ConfigError
from kaireon_pub.logs import librdkafka_logger
from kaireon_pub.settings import PRODUCER_DEFAULTS, Settings, kafka_env_name
from kaireon_pub.worker.kafka.errors import describe
from kaireon_pub.worker.kafka.records import PoisonRow, check_topic

if TYPE_CHECKING:
    from kaireon_pub.worker.kafka.delivery import Batch
    from kaireon_pub.worker.rows import Row

log = logging.getLogger("kaireon_pub.worker.publisher")  # the name of the module these lines came from

POLL_SLICE_S = 0.1  # the delivery thread's poll timeout: how late a stop of the thread may be
# How long librdkafka waits, from a topic's first produce(), before it takes a topic the broker
# does not know for missing (librdkafka's default: 30 s). Until then the topic's records wait in the
# client, and with them the end of every batch that holds one (module docstring). An operator's
# KAFKA_TOPIC_METADATA_PROPAGATION_MAX_MS wins.
TOPIC_PROPAGATION_MS = "1000"
PRODUCER_ONLY = frozenset(PRODUCER_DEFAULTS)  # not given to the broker watch's admin client
WARM_UP_TIMEOUT_S = 1.0  # the longest a batch waits for the metadata of its topics new to the producer
WARMED_KEPT = 10_000  # topics a producer was warmed for (forgotten beyond this: warmed again)


def make_producer(settings: Settings, client_id: str,
                  on_error: Callable[[KafkaError], None] | None = None) -> Producer:
    """A producer from the settings; an invalid librdkafka property raises ConfigError naming its
    KAFKA_ variable."""
    config: dict[str, Any] = dict(settings.producer_config)
    config.setdefault("client.id", client_id)
    config.setdefault("topic.metadata.propagation.max.ms", TOPIC_PROPAGATION_MS)
    if on_error is not None:
        config["error_cb"] = on_error
    config["logger"] = librdkafka_logger()
    try:
        return Producer(config)
    except KafkaException as exc:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        match = re.search(r'property: "([a-z0-9._]+)"', str(exc)) or re.search(r'"([a-z0-9._]+)"', str(exc))
        if err is not None and err.code() == KafkaError._INVALID_ARG and match:
            raise ConfigError(kafka_env_name(match.group(1)), err.str(),
                              "a librdkafka producer property and value") from None
        raise


# The broker refuses this client: the same settings will be refused again (librdkafka reports it
# through the error callback; the delivery reports only say _MSG_TIMED_OUT).
REFUSALS = frozenset({KafkaError._AUTHENTICATION, KafkaError._SSL})


class ServedProducer:
    """One librdkafka producer, the thread that serves it, and whether it must be recreated.

    The Publisher is one (a subclass, so that its per-row loop reads `self.producer` and
    `self.broken` as plain attributes)."""

    def __init__(self, settings: Settings, client_id: str):
        self.settings = settings
        self.client_id = client_id
        self.broken: str | None = None  # why the producer must be recreated, once it must
        self.broken_cause: str | None = None
        # The broker's last refusal of this client (SASL credentials, a TLS certificate), until a
        # delivery shows the connection works: an operator must act (worker/health.py).
        self.refusal: str | None = None
        self.refusal_at = 0.0  # time.monotonic() of the last refusal
        self._open: set[Batch] = set()  # the batches waiting for their reports: woken when broken
        self._watch: Any = None  # the broker watch's admin client (fetch_cluster_id)
        self._start()

    def _start(self) -> None:
        self.broken = None
        self.broken_cause = None
        self.producer = make_producer(self.settings, self.client_id, self._on_error)
        self._warmed: set[str] = set()  # the topics this producer was asked about (warm_up)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(self.producer, self._stop),
                                        name=f"{self.client_id}-delivery", daemon=True)
        self._thread.start()

    def _serve(self, producer: Producer, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                producer.poll(POLL_SLICE_S)
            except Exception as exc:  # noqa: BLE001 - a client that raises here is recreated
                self.mark_broken(f"poll raised {type(exc).__name__}: {exc}", "exception")
                return

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (delivery thread)."""
        if err.fatal():
            level = logging.ERROR
            self.mark_broken(describe(err), "fatal")
        elif err.code() in REFUSALS:
            level = logging.ERROR
            self.refusal, self.refusal_at = describe(err), time.monotonic()
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            level = logging.WARNING
        else:
            # librdkafka's own log line (kaireon_pub.librdkafka) already reports each connection
            # failure; ours would say it twice.
            level = logging.DEBUG
        log.log(level, f"librdkafka error: {describe(err)}",
                extra={"event": "kafka error", "kafkaError": err.name(), "fatal": err.fatal()})

    def mark_broken(self, reason: str, cause: str) -> None:
        """Thread-safe: the producer must be recreated; every waiting batch gives up now."""
        if self.broken is None:
            self.broken = reason
            self.broken_cause = cause
        for batch in list(self._open):
            batch.wake()

    async def recreate(self) -> None:
        """A new producer and delivery thread; the old ones are disposed of off the event loop."""
        old, stop, thread = [self.producer], self._stop, self._thread
        stop.set()
        self._start()
        # The list is the last reference: _dispose takes the producer out of it, so that librdkafka's
        # destroy (it joins the client's threads, and can block) runs in the worker thread too.
        await asyncio.to_thread(_dispose, old, thread)

    async def close(self) -> None:
        self._stop.set()
        await asyncio.to_thread(_dispose, [self.producer], self._thread)

    async def warm_up(self, rows: Iterable[Row], limit: float) -> None:
        """Before a batch's first produce(): ask the producer for the metadata of each topic of `rows`
        it was not asked about yet, one topic per request, in a thread, until `limit` (monotonic) and
        WARM_UP_TIMEOUT_S at most (module docstring). Never raises; a topic is asked about once per
        producer, whether its answer came in time or not."""
        topics = {row.topic for row in rows}
        warmed = self._warmed
        if topics <= warmed:
            return
        new = [topic for topic in topics - warmed if _legal(topic)]  # an illegal name is rejected per row
        if len(warmed) + len(topics) > WARMED_KEPT:
            warmed.clear()
        warmed.update(topics)
        if new:
            deadline = min(limit, time.monotonic() + WARM_UP_TIMEOUT_S)
            await asyncio.to_thread(_ask_metadata, self.producer, new, deadline)

    def queue_depth(self) -> int:
        return len(self.producer)

    def fetch_cluster_id(self, timeout: float) -> str | None:
        """The cluster id the broker reports now (blocking: call in a thread). A metadata request
        for no topic (DescribeCluster), on an admin client of this publisher's own made on first use:
        the producer's list_topics() asks for every topic of the cluster (thousands, every 5 s in
        every worker), and Producer.cluster_id() only reads librdkafka's cache (it sends nothing, so
        it would not notice a broker that is down)."""
        if self._watch is None:
            from confluent_kafka.admin import AdminClient

            config: dict[str, Any] = {k: v for k, v in self.settings.producer_config.items()
                                      if k not in PRODUCER_ONLY}  # idempotence would ask for a producer id
            config["client.id"] = f"{self.client_id}-watch"
            config["logger"] = librdkafka_logger()
            self._watch = AdminClient(config)
        try:
            return self._watch.describe_cluster(request_timeout=timeout).result(timeout).cluster_id
        finally:
            self._watch.poll(0)  # hands librdkafka's queued log lines to our logger


def _legal(topic: str) -> bool:
    try:
        check_topic(topic, set())
    except PoisonRow:
        return False
    return True


def _ask_metadata(producer: Producer, topics: list[str], deadline: float) -> None:
    """One metadata request per topic (never one for all topics), until `deadline` (runs in a thread)."""
    for topic in topics:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.debug("topic metadata warm-up: out of time", extra={"event": "warm-up timeout", "topic": topic})
            return
        try:
            producer.list_topics(topic, timeout=remaining)
        except Exception as exc:  # noqa: BLE001 - the produce() looks the topic up itself
            log.debug(f"topic metadata warm-up failed: {type(exc).__name__}: {exc}",
                      extra={"event": "warm-up failed", "topic": topic})


def _dispose(held: list[Producer], thread: threading.Thread) -> None:
    """Stop serving an old producer and let it go (runs in a worker thread: it may block). `held`
    holds it; when that was its last reference, the producer is destroyed here, not on the loop."""
    thread.join(POLL_SLICE_S * 20)
    producer = held.pop()
    try:
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.flush(0)
    except Exception:  # noqa: BLE001, S110 - a broken client is dropped whatever it says
        pass
    del producer  # librdkafka's destroy, in this thread
