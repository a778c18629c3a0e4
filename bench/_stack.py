"""The stack a benchmark runs against: a broker, the ledger topics, one worker process.

`Stack` starts a `LocalKafka` in a temp dir (unless `KAFKA_BOOTSTRAP_SERVERS` is set), the
three ledger topics, and ONE `streamledger worker` subprocess with a fresh temp data dir,
a free web port and a unique app id. `close()` stops everything it started, in order
(worker first, then the broker), and is safe to call twice; every wait is bounded.

Children are started in their own session (a terminal's Ctrl-C reaches only us, and we stop
them in order) with PR_SET_PDEATHSIG, so a SIGKILL of the bench does not leave orphans.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _pdeathsig() -> None:  # between fork and exec, Linux only
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


# `streamledger worker`, launched through `-c` so that its command line does not contain
# "streamledger worker": other sessions on a shared box stop their own workers with broad
# `pkill -f` patterns, which SIGKILLed a bench worker mid-run.
WORKER_COMMAND = [sys.executable, "-c",
                  "import sys; sys.argv[0] = 'streamledger'; from streamledger.cli import main; main()", "worker"]


def spawn(cmd: list[str], *, env: dict | None = None, log_path: Path | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """A child in its own session that dies with us (SIGTERM on parent death)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pdeathsig if sys.platform == "linux" else None,
        )
    finally:
        if log_path:
            out.close()


def stop_process(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM the child (by pid), wait, then SIGKILL. Never a broad kill."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def produce(producer, topic: str, value: bytes, key: bytes, *, backoff: float = 0.05, **kwargs) -> None:
    """Produce one record, waiting for room when the producer's local queue is full."""
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            break
        except BufferError:
            producer.poll(backoff)
    producer.poll(0)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a live process in MiB (None once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.M)
    return round(int(m.group(1)) / 1024, 1) if m else None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a live process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stack:
    def __init__(self, partitions: int = 8, *, spawn_worker: bool = True, log=print) -> None:
        self.partitions = partitions
        self.spawn_worker = spawn_worker
        self.log = log
        self.run_id = uuid.uuid4().hex[:8]
        self.app_id = f"bench-{self.run_id}"
        self.kafka = None
        self.bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        self.worker: subprocess.Popen | None = None
        self.worker_port: int | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="streamledger-bench-"))
        self.worker_log = self.tmp / "worker.log"
        self.timings: dict[str, float] = {}

    # -- lifecycle

    def start(self) -> "Stack":
        from streams.topics import ensure_topics

        t0 = time.monotonic()
        if not self.bootstrap:
            from streamledger.kafka_local import LocalKafka, ensure_jars

            ensure_jars()
            self.kafka = LocalKafka(self.tmp / "kafka")
            self.log(f"starting Kafka in {self.kafka.data_dir} ...")
            self.kafka.start()
            self.bootstrap = self.kafka.bootstrap_servers
        self.timings["kafka_start_s"] = round(time.monotonic() - t0, 2)
        ensure_topics(self.bootstrap, self.partitions)
        if self.spawn_worker:
            self._start_worker()
        return self

    def _start_worker(self) -> None:
        from streamledger.kafka_local import free_ports

        # The same port, so the same worker id (STREAMLEDGER_WORKER_ID defaults to host:port),
        # across restarts: as a supervisor restarts a worker, which then fences and aborts
        # what its previous incarnation left open at once.
        if self.worker_port is None:
            self.worker_port = free_ports(1)[0]
        env = dict(os.environ)
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMLEDGER_DATA_DIR": str(self.tmp / "worker-data"),
            "STREAMLEDGER_WORKER_PORT": str(self.worker_port),
            "STREAMLEDGER_WORKER_URL": f"http://127.0.0.1:{self.worker_port}",
            "STREAMLEDGER_APP_ID": self.app_id,
            "STREAMLEDGER_PARTITIONS": str(self.partitions),
            "PYTHONUNBUFFERED": "1",
        })
        self.log(f"starting worker: {' '.join(WORKER_COMMAND)} (app id {self.app_id}, port {self.worker_port}, "
                 f"log {self.worker_log})")
        self.worker = spawn(WORKER_COMMAND, env=env, log_path=self.worker_log, cwd=self.tmp)

    def check_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is not None:
            raise RuntimeError(
                f"the worker exited with code {self.worker.returncode}; last lines of "
                f"{self.worker_log}:\n{self.worker_log_tail()}"
            )

    def worker_log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.worker_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no worker log)"

    def close(self, keep_logs: bool = False) -> None:
        t0 = time.monotonic()
        try:
            stop_process(self.worker, 30)
        finally:
            self.worker = None
            try:
                if self.kafka is not None:
                    self.kafka.stop()
            finally:
                self.kafka = None
                # BENCH_KEEP_LOGS=1 keeps the temp dir (worker and broker logs) of a good run too.
                if not keep_logs and os.environ.get("BENCH_KEEP_LOGS") != "1":
                    shutil.rmtree(self.tmp, ignore_errors=True)
        self.timings["teardown_s"] = round(time.monotonic() - t0, 2)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close(keep_logs=exc[0] is not None)

    # -- worker observations

    @property
    def worker_pid(self) -> int | None:
        return self.worker.pid if self.worker is not None else None

    @property
    def broker_pid(self) -> int | None:
        """The broker's JVM when this stack started it (None with KAFKA_BOOTSTRAP_SERVERS)."""
        return self.kafka.pid if self.kafka is not None else None

    def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """The worker's Prometheus counters/histogram sums, {name{labels}: value} (empty on
        failure: metrics are an extra, never a reason to fail a run)."""
        if self.worker_port is None:
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.worker_port}/metrics", timeout=timeout) as r:
                text = r.read().decode()
        except Exception as error:  # noqa: BLE001
            self.log(f"(worker /metrics not read: {error!r})")
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
        return out
