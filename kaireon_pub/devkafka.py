"""Apache Kafka's own broker for the tests, `make run BROKER=kafka` and the bench (dev only, like devenv).

The broker's runtime classpath (kafka_2.13 4.4.0 and the modules it runs with, log4j2 for its lines) is
resolved once by the machine's Maven from `devkafka.pom.xml` into ~/.m2; the ':'-separated list of jars
is kept in an ignored cache directory (`.cache/kafka/4.4.0/classpath.txt` in a checkout,
KAIREON_KAFKA_CACHE to choose another) and reused: nothing is fetched once it is there.

`KafkaCluster(n)` runs n nodes in KRaft combined mode (each a controller and a broker; the n controllers
are the static quorum), on free loopback ports, each a `java … kafka.Kafka server.properties` of its
own in a new session, with its storage formatted by Kafka's StorageTool. Every node has a PLAINTEXT
listener (`bootstrap`); with `sasl_ssl=True` a SASL_SSL listener too (`sasl_bootstrap`): SCRAM-SHA-512
over TLS, a CA and a broker certificate made by openssl, the SCRAM users added by StorageTool's
`format --add-scram` (Kafka's own tool). Each node's log is `node-<id>/server.log` in the work
directory, kept after `stop()`; the data directories are removed then.

One job past 300 lines (dev only): a Kafka node's whole life here, from its classpath and its
configuration to its stop, which the tests drive node by node.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kaireon_pub.devenv import free_port, wait_for_port

KAFKA_VERSION = "4.4.0"  # as devkafka.pom.xml's kafka.version
POM = Path(__file__).with_name("devkafka.pom.xml")
# The JVM of each node: a small heap (a node answering the e2e suite peaks near 200 MB of heap) and
# the serial collector, as fits a test broker on a machine of two cores.
JVM_OPTS = ["-Xms64m", "-Xmx384m", "-XX:+UseSerialGC", "-XX:-UsePerfData", "-Djava.awt.headless=true"]
START_TIMEOUT = 90.0  # a node answers in ~5 s on an idle machine; much longer on a loaded one
STOP_GRACE = 15.0  # SIGTERM, then SIGKILL: a controlled shutdown in a cluster takes a few seconds
SCRAM = "SCRAM-SHA-512"
MIN_JAVA = 17
LOG4J2 = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.request.logger
        level: WARN
      - name: org.apache.kafka.clients
        level: WARN
"""


def cache_dir() -> Path:
    """Where classpath.txt is kept: KAIREON_KAFKA_CACHE, else `.cache/kafka/<version>` of the checkout
    this module lies in, else ~/.cache/kaireon-pub/kafka/<version>."""
    chosen = os.environ.get("KAIREON_KAFKA_CACHE", "").strip()
    if chosen:
        return Path(chosen)
    root = Path(__file__).resolve().parents[1]
    base = root / ".cache" if (root / "pyproject.toml").exists() else Path.home() / ".cache" / "kaireon-pub"
    return base / "kafka" / KAFKA_VERSION


def _cached_classpath() -> str | None:
    """The cached classpath when every jar it names is still there."""
    try:
        text = (cache_dir() / "classpath.txt").read_text().strip()
    except OSError:
        return None
    jars = text.split(os.pathsep) if text else []
    if not jars or not all(os.path.isfile(jar) for jar in jars):
        return None
    return text


@functools.lru_cache(maxsize=1)
def _java_problem() -> str | None:
    java = shutil.which("java")
    if java is None:
        return "java is not installed (apt-get install default-jdk-headless; .ci/run installs it)"
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError) as e:
        return f"java -version failed: {e}"
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if found is None:
        return f"java -version said nothing readable: {out.strip()[:200]!r}"
    major = int(found.group(1)) if found.group(1) != "1" else int(found.group(2) or 0)
    if major < MIN_JAVA:
        return f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA} or later; java is {major}"
    return None


def unavailable() -> str | None:
    """None when a broker can be started here (java 17+, and the cached classpath or mvn to make
    it), else the reason, for a test's skip."""
    problem = _java_problem()
    if problem is not None:
        return problem
    if _cached_classpath() is None and shutil.which("mvn") is None:
        return ("Maven is not installed, and the Kafka classpath is not cached yet "
                "(apt-get install maven; .ci/run installs it)")
    return None


def classpath() -> str:
    """The broker's classpath: from the cache, else resolved once by mvn (a lock keeps concurrent
    callers, e.g. two test sessions, from resolving at once)."""
    cached = _cached_classpath()
    if cached is not None:
        return cached
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _cached_classpath()
        if cached is not None:
            return cached
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError(unavailable() or "mvn is not installed")
        partial = directory / f"classpath.txt.{os.getpid()}"
        done = subprocess.run(
            [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(POM), "validate",
             f"-Dclasspath.file={partial}"],
            capture_output=True, text=True, timeout=1800,
        )
        if done.returncode != 0 or not partial.exists():
            raise RuntimeError(f"mvn could not resolve Kafka {KAFKA_VERSION}'s classpath "
                               f"(exit {done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
        os.replace(partial, directory / "classpath.txt")
    cached = _cached_classpath()
    if cached is None:
        raise RuntimeError(f"mvn wrote a classpath naming missing jars: {directory / 'classpath.txt'}")
    return cached


def _random_cluster_id() -> str:
    """A Kafka Uuid in its text form (16 bytes, URL-safe base64, no padding), as `random-uuid` prints:
    never one that starts with '-' (Kafka's Uuid.randomUuid skips those too), which `kafka-storage
    format -t` would read as an option ("argument --cluster-id/-t: expected one argument")."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-1000:]}")


def make_tls(directory: Path) -> tuple[Path, Path]:
    """A CA (ca.pem) and a broker certificate for 127.0.0.1 and localhost signed by it; returns the CA's
    PEM and the broker's keystore (its unencrypted PKCS#8 key, its certificate, the CA), for Kafka's
    ssl.keystore.type=PEM."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "30", "-subj", "/CN=kaireon-pub test CA", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
             "-subj", "/CN=localhost", cwd=directory)
    (directory / "broker.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                          "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "broker.pem", "-days", "30", "-extfile", "broker.ext", cwd=directory)
    keystore = directory / "broker-keystore.pem"
    keystore.write_text("".join((directory / name).read_text() for name in ("broker.key", "broker.pem", "ca.pem")))
    return directory / "ca.pem", keystore


@dataclass
class _Node:
    node_id: int
    port: int
    controller_port: int
    sasl_port: int | None
    directory: Path
    process: subprocess.Popen | None = None
    log: object | None = field(default=None, repr=False)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def properties(self) -> Path:
        return self.directory / "server.properties"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class KafkaCluster:
    """n Kafka nodes in KRaft combined mode on loopback ports; started and answering on return."""

    def __init__(self, brokers: int = 1, *, sasl_ssl: bool = False, workdir: Path | None = None,
                 config: dict[str, str] | None = None):
        if brokers < 1:
            raise ValueError("brokers must be at least 1")
        self._classpath = classpath()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kaireon-kafka-")).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cluster_id = _random_cluster_id()
        self.sasl_ssl = sasl_ssl
        self._nodes: dict[int, _Node] = {}
        for node_id in range(1, brokers + 1):
            self._nodes[node_id] = _Node(
                node_id, free_port(), free_port(), free_port() if sasl_ssl else None,
                self.workdir / f"node-{node_id}")
        self.node_ids = sorted(self._nodes)
        self.bootstrap = ",".join(node.bootstrap for node in self._nodes.values())
        self.sasl_bootstrap = ""
        self.users: dict[str, str] = {}
        self.ca_file: Path | None = None
        self._keystore: Path | None = None
        if sasl_ssl:
            self.ca_file, self._keystore = make_tls(self.workdir / "tls")
            self.users = {"kaireon": secrets.token_urlsafe(12), "reader": secrets.token_urlsafe(12)}
            self.sasl_bootstrap = ",".join(f"127.0.0.1:{node.sasl_port}" for node in self._nodes.values())
        (self.workdir / "log4j2.yaml").write_text(LOG4J2)
        self._config = self._base_config(brokers) | dict(config or {})
        try:
            formats = [self._format(node) for node in self._nodes.values()]
            for node, proc in zip(self._nodes.values(), formats, strict=True):
                self._wait_format(node, proc)
            for node in self._nodes.values():
                self._spawn(node)
            for node in self._nodes.values():
                self._wait_answering(node, expect=set(self.node_ids))
        except BaseException:
            self.stop()
            raise

    # -- configuration ---------------------------------------------------------------------------

    def _base_config(self, brokers: int) -> dict[str, str]:
        replicas = str(min(3, brokers))
        isr = "2" if brokers >= 3 else "1"
        return {
            "auto.create.topics.enable": "true",
            "num.partitions": "4",  # as Tansu's auto-created topics, which the tests were written against
            "default.replication.factor": replicas,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": "5",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.hours": "24",
        }

    def _properties(self, node: _Node) -> str:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self._nodes.values())
        listeners = [f"PLAINTEXT://127.0.0.1:{node.port}", f"CONTROLLER://127.0.0.1:{node.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{node.port}"]
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.data),
        }
        if node.sasl_port is not None:
            listeners.append(f"SASL_SSL://127.0.0.1:{node.sasl_port}")
            advertised.append(f"SASL_SSL://127.0.0.1:{node.sasl_port}")
            protocols += ",SASL_SSL:SASL_SSL"
            props |= {
                "sasl.enabled.mechanisms": SCRAM,
                f"listener.name.sasl_ssl.{SCRAM.lower()}.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self._keystore),
            }
        props |= {"listeners": ",".join(listeners), "advertised.listeners": ",".join(advertised),
                  "listener.security.protocol.map": protocols}
        props |= self._config
        return "".join(f"{key}={value}\n" for key, value in props.items())

    def _java(self, main: str, *args: str) -> list[str]:
        return ["java", *JVM_OPTS, f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.yaml'}",
                "-cp", self._classpath, main, *args]

    # -- storage and processes -------------------------------------------------------------------

    def _format(self, node: _Node) -> subprocess.Popen:
        node.directory.mkdir(parents=True, exist_ok=True)
        node.properties.write_text(self._properties(node))
        args = ["format", "-t", self.cluster_id, "-c", str(node.properties), "--ignore-formatted"]
        for user, password in self.users.items():
            args += ["--add-scram", f"{SCRAM}=[name={user},password={password}]"]
        with open(node.directory / "format.log", "ab") as log:
            return subprocess.Popen(self._java("kafka.tools.StorageTool", *args),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_format(self, node: _Node, proc: subprocess.Popen) -> None:
        if proc.wait(120) != 0:
            tail = (node.directory / "format.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"formatting node {node.node_id}'s storage failed: {tail}")

    def _spawn(self, node: _Node) -> None:
        node.log = open(node.directory / "server.log", "ab")  # noqa: SIM115 - closed in _reap()
        node.process = subprocess.Popen(
            self._java("kafka.Kafka", str(node.properties)),
            stdout=node.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def _metadata_brokers(self, node: _Node) -> set[int]:
        """The brokers node's metadata lists (registered and unfenced)."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": node.bootstrap, "log_level": 0})
        return set(admin.list_topics(timeout=5).brokers)

    def _wait_answering(self, node: _Node, expect: set[int] | None = None) -> None:
        """Until the node answers a metadata request naming itself (and every node of `expect`)."""
        expect = expect or {node.node_id}
        deadline = time.monotonic() + START_TIMEOUT
        last = "not listening yet"
        while True:
            if node.process is None or node.process.poll() is not None:
                raise RuntimeError(f"Kafka node {node.node_id} exited before it answered "
                                   f"(see {node.directory / 'server.log'}): {self._log_tail(node)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"Kafka node {node.node_id} did not answer in {START_TIMEOUT} s ({last}); "
                                   f"see {node.directory / 'server.log'}")
            try:
                wait_for_port(node.port, timeout=min(1.0, remaining))
                seen = self._metadata_brokers(node)
                if expect <= seen:
                    return
                last = f"its metadata lists brokers {sorted(seen)}"
            except Exception as e:  # noqa: BLE001 - not answering yet: try again until the deadline
                last = str(e)
            time.sleep(0.2)

    def _log_tail(self, node: _Node) -> str:
        with contextlib.suppress(OSError):
            return (node.directory / "server.log").read_text(errors="replace")[-1500:]
        return ""

    def _reap(self, node: _Node, grace: float) -> None:
        if node.process is None:
            return
        try:
            node.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(30)
        node.process = None
        if node.log is not None:
            node.log.close()
            node.log = None

    def _signal(self, node: _Node, signum: int) -> None:
        if node.process is not None and node.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signum)

    def _node(self, node_id: int) -> _Node:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise ValueError(f"no node {node_id}: nodes are {self.node_ids}") from None

    # -- the API the tests use -------------------------------------------------------------------

    def sasl_client_config(self, user: str) -> dict[str, str]:
        """librdkafka settings that reach the SASL_SSL listeners as `user` (SCRAM-SHA-512, the CA)."""
        if not self.sasl_ssl:
            raise ValueError("this cluster has no SASL_SSL listener (KafkaCluster(sasl_ssl=True))")
        return {
            "bootstrap.servers": self.sasl_bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanisms": SCRAM,
            "sasl.username": user,
            "sasl.password": self.users[user],
            "ssl.ca.location": str(self.ca_file),
        }

    def kill_node(self, node_id: int) -> None:
        """SIGKILL, and reaped."""
        node = self._node(node_id)
        self._signal(node, signal.SIGKILL)
        self._reap(node, 30)

    def stop_node(self, node_id: int) -> None:
        """SIGTERM (a controlled shutdown), SIGKILL after STOP_GRACE seconds."""
        node = self._node(node_id)
        self._signal(node, signal.SIGTERM)
        self._reap(node, STOP_GRACE)

    def start_node(self, node_id: int) -> None:
        """Starts a stopped node on its ports with its data, and waits until it answers."""
        node = self._node(node_id)
        if node.process is not None and node.process.poll() is None:
            raise RuntimeError(f"node {node_id} is running (pid {node.process.pid})")
        self._reap(node, 0)
        if not node.data.exists():
            self._wait_format(node, self._format(node))
        self._spawn(node)
        self._wait_answering(node)

    def restart_node(self, node_id: int, *, wipe: bool = False) -> None:
        """stop_node, then start_node; with wipe, its data is removed and its storage formatted again
        (same cluster id and SCRAM users): a single node comes back empty."""
        self.stop_node(node_id)
        if wipe:
            shutil.rmtree(self._node(node_id).data, ignore_errors=True)
        self.start_node(node_id)

    def pid(self, node_id: int) -> int:
        node = self._node(node_id)
        if node.process is None:
            raise RuntimeError(f"node {node_id} is not running")
        return node.process.pid

    def running(self) -> list[int]:
        return [n.node_id for n in self._nodes.values() if n.process is not None and n.process.poll() is None]

    def leader_of(self, topic: str, partition: int) -> int:
        """The node id that leads the partition, as a running node's metadata says (-1: none)."""
        from confluent_kafka.admin import AdminClient

        live = ",".join(self._nodes[i].bootstrap for i in self.running()) or self.bootstrap
        md = AdminClient({"bootstrap.servers": live, "log_level": 0}).list_topics(topic, timeout=10)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            raise LookupError(f"topic {topic!r}: {meta.error if meta else 'unknown'}")
        if partition not in meta.partitions:
            raise LookupError(f"topic {topic!r} has no partition {partition}")
        return meta.partitions[partition].leader

    def stop(self) -> None:
        """Every node: SIGTERM at once, SIGKILL after STOP_GRACE; data removed, logs kept."""
        for node in self._nodes.values():
            self._signal(node, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for node in self._nodes.values():
            self._reap(node, max(0.0, deadline - time.monotonic()))
        for node in self._nodes.values():
            shutil.rmtree(node.data, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class KafkaBroker:
    """One Kafka node with devenv.Broker's surface (`bootstrap`, `port`, `process`, `start()`, `stop()`,
    `restart()`), for the tests and tools written against Tansu. As Tansu's, a node started again comes
    back empty on the same port: `start()` after `stop()` wipes and formats its storage again (same
    cluster id), unless `keep_data=True`. `cluster` is the KafkaCluster underneath."""

    def __init__(self, workdir: Path | None = None, *, config: dict[str, str] | None = None,
                 keep_data: bool = False):
        self.cluster = KafkaCluster(1, workdir=workdir, config=config)
        self.keep_data = keep_data
        self.bootstrap = self.cluster.bootstrap
        self.port = self.cluster._nodes[1].port
        self.workdir = self.cluster.workdir

    @property
    def process(self) -> subprocess.Popen | None:
        return self.cluster._nodes[1].process

    def stop(self) -> None:
        self.cluster.stop_node(1)

    def start(self) -> None:
        if not self.keep_data:
            shutil.rmtree(self.cluster._nodes[1].data, ignore_errors=True)
        self.cluster.start_node(1)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.cluster.stop()


def main() -> None:
    """`python -m kaireon_pub.devkafka` (make kafka-classpath): resolves the classpath now, or says why not."""
    reason = unavailable()
    if reason is not None:
        print(f"SKIPPED Apache Kafka's classpath: {reason}")
        return
    jars = classpath().split(os.pathsep)
    print(f"Apache Kafka {KAFKA_VERSION}: {len(jars)} jars ({cache_dir() / 'classpath.txt'})")


if __name__ == "__main__":
    main()
