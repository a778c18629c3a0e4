"""A real Apache Kafka broker (KRaft, one combined broker/controller) run from its Maven
Central jars, for `streamledger kafka`, `streamledger dev` and the test suite.

* `ensure_jars()` copies the pinned jars of `kafka/pom.xml` into a cache outside git, once.
* `LocalKafka` formats a data dir, starts `java ... kafka.Kafka` on free loopback ports,
  waits until a client really gets metadata, and stops it (SIGTERM, then SIGKILL).

What was measured and what differs from the original recipe: docs/kafka.md.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

KAFKA_VERSION = "4.3.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
POM = REPO_ROOT / "kafka" / "pom.xml"
MIN_JAVA = 17
_MARKER = ".streamledger-complete"
_INSTALL_HINT = (
    "install a Java 17+ runtime and Maven, e.g. "
    "`apt-get install openjdk-17-jre-headless maven` (Debian/Ubuntu) or "
    "`brew install openjdk@17 maven` (macOS); or point KAFKA_BOOTSTRAP_SERVERS at an "
    "existing Kafka cluster instead"
)


class KafkaSetupError(RuntimeError):
    """The local broker cannot be fetched or started; the message says what to do."""


# --------------------------------------------------------------------------- jars


def default_cache_dir() -> Path:
    env = os.environ.get("STREAMLEDGER_KAFKA_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "streamledger" / f"kafka-{KAFKA_VERSION}" / "libs"


# What Kafka's own start scripts give the broker's JVM (kafka-run-class.sh,
# KAFKA_JVM_PERFORMANCE_OPTS): G1 aiming at 20 ms pauses (the JVM's default aim is 200 ms,
# which the produce -> committed latency feels directly).
KAFKA_JVM_OPTS = ("-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 "
                  "-XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true")


def find_java() -> str:
    """Path of a `java` that is version 17 or newer (JAVA_HOME first, then PATH)."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    found = shutil.which("java")
    if found:
        candidates.append(found)
    if not candidates:
        raise KafkaSetupError(f"`java` was not found (JAVA_HOME unset, none on PATH): {_INSTALL_HINT}")
    java = next((c for c in candidates if os.access(c, os.X_OK)), None)
    if java is None:
        raise KafkaSetupError(f"`java` is not executable ({candidates[0]}): {_INSTALL_HINT}")
    major = java_major_version(java)
    if major < MIN_JAVA:
        raise KafkaSetupError(
            f"{java} is Java {major}; Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+: {_INSTALL_HINT}"
        )
    return java


def java_major_version(java: str) -> int:
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30
        ).stderr
    except (OSError, subprocess.SubprocessError) as exc:
        raise KafkaSetupError(f"could not run `{java} -version` ({exc}): {_INSTALL_HINT}") from exc
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        raise KafkaSetupError(f"cannot read the Java version from `{java} -version`: {out.strip()!r}")
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major  # "1.8.0" -> 8


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def _jars_complete(libs: Path, digest: str) -> bool:
    marker = libs / _MARKER
    return marker.is_file() and marker.read_text().strip() == digest


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_NETWORK_HINTS = (
    "Could not transfer",
    "Unknown host",
    "UnknownHostException",
    "Connection refused",
    "Connect timed out",
    "Network is unreachable",
    "No route to host",
    "Could not resolve",
    "repo.maven.apache.org",
)


def jars_cached(cache_dir: str | Path | None = None) -> bool:
    """True when `ensure_jars(cache_dir)` would not need to fetch anything."""
    libs = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return POM.is_file() and _jars_complete(libs, _pom_digest())


def ensure_jars(cache_dir: str | Path | None = None) -> Path:
    """Return the directory holding the jars of Kafka 4.3.1, fetching them first if needed.

    The jars come from Maven Central through `mvn` and the pinned `kafka/pom.xml`. They are
    copied into a temporary sibling directory that is renamed into place and marked complete
    (the marker holds the POM's sha256) only after a successful copy, so a half-copied or
    stale directory is fetched again. `cache_dir` (or `$STREAMLEDGER_KAFKA_CACHE`) is the
    directory the jars go into; default `~/.cache/streamledger/kafka-4.3.1/libs`.
    """
    libs = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if not POM.is_file():
        raise KafkaSetupError(f"{POM} is missing: run from a streamledger source checkout")
    digest = _pom_digest()
    if _jars_complete(libs, digest):
        return libs
    find_java()  # Maven needs it too; say so before Maven does, more obscurely
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaSetupError(f"`mvn` (Apache Maven) was not found on PATH: {_INSTALL_HINT}")
    with _file_lock(libs.parent / f".{libs.name}.lock"):
        if _jars_complete(libs, digest):  # another process fetched them meanwhile
            return libs
        tmp = libs.parent / f".{libs.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            mvn, "-B", "-q", "-f", str(POM),
            "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies",
            f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise KafkaSetupError(
                "fetching the Kafka jars from Maven Central timed out after 15 min; "
                "check that https://repo.maven.apache.org/maven2 is reachable (proxy settings "
                "go in ~/.m2/settings.xml)"
            ) from exc
        output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or not any(tmp.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join(output.splitlines()[-25:])
            if any(h in output for h in _NETWORK_HINTS):
                what = (
                    "Maven Central (https://repo.maven.apache.org/maven2) can't be reached; "
                    "connect to the network or configure a mirror/proxy in ~/.m2/settings.xml"
                )
            else:
                what = "mvn failed"
            raise KafkaSetupError(
                f"could not fetch the Kafka {KAFKA_VERSION} jars: {what}.\n"
                f"command: {' '.join(cmd)}\n{tail}"
            )
        (tmp / _MARKER).write_text(digest + "\n")
        if libs.exists():
            shutil.rmtree(libs)
        libs.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(libs)
    return libs


# ------------------------------------------------------------------ cluster, ports


def new_cluster_id() -> str:
    """Kafka's `Uuid.randomUuid().toString()`: a v4 UUID as unpadded base64url (22 chars),
    re-rolled when it would start with '-' (the storage tool would read it as an option)."""
    while True:
        s = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not s.startswith("-"):
            return s


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` right now (all held open while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def default_data_dir() -> Path:
    """Where `streamledger kafka` / `streamledger dev` keep the broker's data."""
    return Path(os.environ.get("STREAMLEDGER_KAFKA_DATA") or REPO_ROOT / ".data" / "kafka")


LOG4J2_PROPERTIES = """\
status = warn
appender.f.type = RollingFile
appender.f.name = F
appender.f.fileName = ${sys:kafka.logs.dir}/server.log
appender.f.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.f.layout.type = PatternLayout
appender.f.layout.pattern = [%d] %p %m (%c)%n
appender.f.policies.type = Policies
appender.f.policies.size.type = SizeBasedTriggeringPolicy
appender.f.policies.size.size = 20MB
appender.f.strategy.type = DefaultRolloverStrategy
appender.f.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.f.ref = F
logger.req.name = kafka.request.logger
logger.req.level = WARN
"""


def server_properties(data_dir: Path, port: int, controller_port: int) -> dict[str, str]:
    """server.properties of a one-node combined broker/controller on 127.0.0.1."""
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir / "kraft"),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "auto.create.topics.enable": "true",
        # One node: the defaults (3 / 3 / 2) would make FindCoordinator and InitProducerId
        # fail forever.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Speed and footprint.
        "group.initial.rebalance.delay.ms": "0",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        # After a SIGKILL the controller keeps the dead incarnation's registration until its
        # session expires (DUPLICATE_BROKER_REGISTRATION): 9 s by default. Shorter here so a
        # crash-restart is ready in a few seconds.
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "4000",
        # 4.x rejects records stamped > 1 h in the future by default; tests use fixed clocks.
        "log.message.timestamp.after.max.ms": str(2**63 - 1),
    }


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return f"({path} not written)"
    return "\n".join(text.splitlines()[-lines:])


def _error_lines(path: Path, keep: int = 8) -> str:
    """The last ERROR/FATAL log lines (the cause usually precedes a long shutdown tail)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 512 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    hits = [ln[:600] for ln in text.splitlines() if "] ERROR " in ln or "] FATAL " in ln]
    return "\n".join(hits[-keep:])


def _set_pdeathsig() -> None:  # runs in the child between fork and exec (Linux only)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: TERM the JVM if we die
    except Exception:
        pass


# ------------------------------------------------------------------------ broker


class LocalKafka:
    """One Kafka 4.3.1 KRaft node (broker + controller) on 127.0.0.1.

    `data_dir=None` uses a fresh temporary directory, deleted by `close()` / leaving the
    `with` block; a given `data_dir` is kept and reused (formatted once, its cluster id
    re-read on later starts). `port` / `controller_port` default to free ports, chosen once
    and kept across `restart()`.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        heap: str | None = None,
        jars_dir: str | Path | None = None,
        overrides: dict[str, object] | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self._owns_data_dir = data_dir is None
        self.data_dir = Path(
            tempfile.mkdtemp(prefix="streamledger-kafka-") if data_dir is None else data_dir
        ).resolve()
        if port is None or controller_port is None:
            a, b, c = free_ports(3)
            picked = [p for p in (a, b, c) if p != port]
            port = port if port is not None else picked.pop(0)
            controller_port = controller_port if controller_port is not None else picked.pop(0)
        if port == controller_port:
            raise ValueError("port and controller_port must differ")
        self.port = port
        self.controller_port = controller_port
        self.heap = heap or os.environ.get("STREAMLEDGER_KAFKA_HEAP") or "512m"
        self._jars_dir = jars_dir
        self.overrides = {k: str(v) for k, v in (overrides or {}).items()}
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cluster_id: str | None = None
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen | None = None
        self._stdout_path = self.logs_dir / "stdout.log"
        self._lock = threading.RLock()

    # -- paths and addresses

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config_dir(self) -> Path:
        return self.data_dir / "config"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def server_log(self) -> Path:
        return self.logs_dir / "server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<LocalKafka {self.bootstrap_servers} {state} data={self.data_dir}>"

    # -- lifecycle

    def __enter__(self) -> LocalKafka:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> LocalKafka:
        with self._lock:
            if self.is_running():
                return self
            t0 = time.monotonic()
            libs = ensure_jars(self._jars_dir)
            self.timings["jars_s"] = time.monotonic() - t0
            java = find_java()
            self._write_config()
            t0 = time.monotonic()
            self._format(java, libs)
            self.timings["format_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            self._launch(java, libs)
            self._wait_ready()
            self.timings["start_to_ready_s"] = time.monotonic() - t0
            return self

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (controlled shutdown), then SIGKILL after `timeout` (default 30 s)."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or proc.poll() is not None:
                return
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            self.timings["stop_s"] = time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL the broker (a crash, for chaos tests); `start()` / `restart()` recover."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def restart(self, *, graceful: bool = True) -> LocalKafka:
        """Stop (SIGTERM, or SIGKILL when not `graceful`) and start the same broker: same
        ports, same data dir, same cluster id."""
        with self._lock:
            self.stop() if graceful else self.kill()
            return self.start()

    def close(self) -> None:
        """Stop, and delete the data dir if it was a temporary one."""
        self.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- internals

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        props = server_properties(self.data_dir, self.port, self.controller_port)
        props.update(self.overrides)
        text = "# written by streamledger.kafka_local; rewritten on every start\n"
        text += "".join(f"{k}={v}\n" for k, v in props.items())
        (self.config_dir / "server.properties").write_text(text)
        (self.config_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)

    def _jvm_base(self, java: str, libs: Path, heap: list[str]) -> list[str]:
        return [
            java,
            *heap,
            f"-Dlog4j2.configurationFile={self.config_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp",
            f"{libs}{os.sep}*",  # a single argv entry: Java expands the wildcard
        ]

    def _read_cluster_id(self) -> str | None:
        meta = self.data_dir / "kraft" / "meta.properties"
        if not meta.is_file():
            return None
        for line in meta.read_text().splitlines():
            if line.startswith("cluster.id="):
                return line.split("=", 1)[1].strip()
        return None

    def _format(self, java: str, libs: Path) -> None:
        existing = self._read_cluster_id()
        if existing:
            self.cluster_id = existing
            return
        self.cluster_id = new_cluster_id()
        cmd = self._jvm_base(java, libs, ["-Xmx256m"]) + [
            "kafka.tools.StorageTool", "format",
            "-t", self.cluster_id,
            "-c", str(self.config_dir / "server.properties"),
            "--ignore-formatted",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise KafkaSetupError(
                f"formatting the KRaft storage in {self.data_dir / 'kraft'} failed "
                f"(exit {proc.returncode}):\n{proc.stdout}{proc.stderr}\n{_tail(self.server_log)}"
            )

    def _launch(self, java: str, libs: Path) -> None:
        # The whole heap from the start, as Kafka's kafka-server-start.sh gives it (-Xms =
        # -Xmx): grown from a small -Xms, G1 kept the heap at ~144 MB under load and
        # paused the broker ~11 ms every 0.65 s at 1,000 tx/s; with the full heap, a
        # pause every few seconds (produce -> outcome p99 42-54 ms -> 27-38 ms, 4 runs
        # each). Pauses go to logs/gc.log.
        jvm = [f"-Xms{self.heap}", f"-Xmx{self.heap}",
               *os.environ.get("STREAMLEDGER_KAFKA_JVM_OPTS", KAFKA_JVM_OPTS).split(),
               f"-Xlog:gc:file={self.logs_dir / 'gc.log'}:time,uptime:filecount=2,filesize=10m"]
        cmd = self._jvm_base(java, libs, jvm) + [
            "kafka.Kafka",
            str(self.config_dir / "server.properties"),
        ]
        self._stdout_path = self.logs_dir / "stdout.log"
        out = open(self._stdout_path, "ab")
        try:
            on_main = threading.current_thread() is threading.main_thread()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Own process group: a terminal's Ctrl-C reaches us, and we stop the broker
                # in order. PDEATHSIG fires when the forking *thread* exits, so only use it
                # from the main thread.
                start_new_session=True,
                preexec_fn=_set_pdeathsig if (on_main and sys.platform == "linux") else None,
            )
        finally:
            out.close()

    def _failure(self, why: str) -> KafkaSetupError:
        return KafkaSetupError(
            f"Kafka {KAFKA_VERSION} on {self.bootstrap_servers} {why}.\n"
            f"--- errors in {self.server_log}:\n{_error_lines(self.server_log) or '(none)'}\n"
            f"--- tail of {self.server_log}:\n{_tail(self.server_log)}\n"
            f"--- tail of {self._stdout_path}:\n{_tail(self._stdout_path, 20)}"
        )

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.startup_timeout
        admin = None
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise self._failure(f"exited with code {code} while starting")
            if time.monotonic() > deadline:
                self.kill()
                raise self._failure(f"was not ready after {self.startup_timeout:.0f} s (killed)")
            # Cheap TCP probe first, so librdkafka is not left retrying a closed port.
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.1)
                continue
            if admin is None:
                admin = AdminClient(
                    {"bootstrap.servers": self.bootstrap_servers, "log_level": 0}
                )
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
            except Exception:
                pass
            time.sleep(0.1)
