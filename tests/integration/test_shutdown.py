"""A worker told to stop exits even when its broker is gone.

faust's shutdown waits on the broker (leaving the group, committing offsets): with the
broker dead, a SIGTERM'd worker never exited. STREAMLEDGER_SHUTDOWN_TIMEOUT_MS bounds the
stop. Own broker: this test kills it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest

from bench._stack import WORKER_COMMAND, spawn
from streamledger.kafka_local import LocalKafka, free_ports
from streams.topics import ensure_topics

pytestmark = pytest.mark.integration


def test_a_stopped_worker_exits_although_the_broker_is_gone(tmp_path):
    kafka = LocalKafka(tmp_path / "kafka")
    kafka.start()
    worker = None
    try:
        ensure_topics(kafka.bootstrap_servers, 8)
        log_path = tmp_path / "worker.log"
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "STREAMLEDGER_APP_ID": f"shutdown-{uuid.uuid4().hex[:6]}",
            "STREAMLEDGER_DATA_DIR": str(tmp_path / "data"),
            "STREAMLEDGER_WORKER_PORT": str(free_ports(1)[0]),
            "STREAMLEDGER_SHUTDOWN_TIMEOUT_MS": "5000",
            "PYTHONUNBUFFERED": "1",
        }
        worker = spawn(WORKER_COMMAND, env=env, log_path=log_path, cwd=tmp_path)
        deadline = time.monotonic() + 90
        while "fetching ledger.requests" not in log_path.read_text(errors="replace"):
            assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the worker never took its partitions"
            time.sleep(0.3)

        kafka.kill()  # the broker dies
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(60)  # without the bound: still running after minutes
        except subprocess.TimeoutExpired:
            raise AssertionError("the worker did not exit:\n" + log_path.read_text(errors="replace")[-3000:])
        assert code == 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(10)
        kafka.close()
