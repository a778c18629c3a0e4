"""Run the real processes (workers, gateway) against the suite's Kafka broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from streamledger.kafka_local import free_ports

ROOT = Path(__file__).resolve().parents[2]


def committed_records(bootstrap: str, topic: str, partition: int = 0, timeout: float = 20) -> list:
    """Every record of a topic's partition a read_committed reader sees, to its end."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "isolation.level": "read_committed", "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, partition, 0)])
    records = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                if message.error().code() == KafkaError._PARTITION_EOF:
                    break
                raise AssertionError(message.error())
            records.append(message)
    finally:
        consumer.close()
    return records


@dataclass
class Response:
    status: int
    body: object
    headers: dict


def http(method: str, url: str, body: object = None, headers: dict | None = None, timeout: float = 30) -> Response:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return Response(response.status, json.loads(raw) if raw else None, dict(response.headers))
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Response(error.code, parsed, dict(error.headers))


@dataclass
class Stack:
    """Worker and gateway processes sharing one configuration (like `make dev`)."""

    bootstrap: str
    data_dir: Path
    app_id: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:8]}")
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    gateway: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)
    worker_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gateway_port, first_worker_port = free_ports(2)
        self.gateway_port = gateway_port
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMLEDGER_APP_ID": self.app_id,
            "STREAMLEDGER_GATEWAY_PORT": str(gateway_port),
            "STREAMLEDGER_WORKER_URL": f"http://127.0.0.1:{first_worker_port}",
            "STREAMLEDGER_SESSION_TIMEOUT_MS": "6000",
            "STREAMLEDGER_REPLY_TIMEOUT_MS": "20000",
            "STREAMLEDGER_ROCKSDB_BLOCK_CACHE_MB": "8",
            "STREAMLEDGER_ROCKSDB_WRITE_BUFFER_MB": "4",
            "STREAMLEDGER_HANGING_TRANSACTION_S": "4",  # tests/integration/test_hanging.py
        }
        self._first_worker_port = first_worker_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start_worker(self, name: str = "w1") -> subprocess.Popen:
        port = self.worker_ports.get(name) or (self._first_worker_port if not self.worker_ports else free_ports(1)[0])
        self.worker_ports[name] = port
        env = {**self.env, "STREAMLEDGER_WORKER_PORT": str(port),
               "STREAMLEDGER_DATA_DIR": str(self.data_dir / name)}
        log = open(self.data_dir / f"{name}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "streamledger", "worker"], env=env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
        self.workers[name] = process
        return process

    def start_gateway(self) -> None:
        log = open(self.data_dir / "gateway.log", "ab")
        self.gateway = subprocess.Popen([sys.executable, "-m", "streamledger", "gateway"], env=self.env,
                                        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.gateway.poll() is not None:
                raise RuntimeError("gateway exited:\n" + self.log("gateway"))
            try:
                if http("GET", self.url + "/_healthcheck", timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError("gateway not healthy:\n" + self.log("gateway"))

    def create_ledger(self, name: str, timeout: float = 90) -> None:
        """Create a ledger, waiting out the worker's first partition assignment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = http("POST", f"{self.url}/v2/{name}")
            if response.status in (204, 400):
                return
            time.sleep(0.5)
        raise RuntimeError(f"could not create ledger {name}:\n" + self.log("w1"))

    def log(self, name: str) -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        processes = list(self.workers.values()) + ([self.gateway] if self.gateway else [])
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
