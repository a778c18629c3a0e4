"""Stopping a worker.

A worker told to stop exits even when its broker is gone: faust's shutdown waits on the
broker (leaving the group, committing offsets); with the broker dead, a SIGTERM'd worker
never exited. STREAMLEDGER_SHUTDOWN_TIMEOUT_MS bounds the stop (own broker: the test
kills it). And a stop in the middle of a takeover waits for it and closes its store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import time
import uuid

import pytest

from bench._stack import WORKER_COMMAND, spawn
from streamledger.kafka_local import LocalKafka, free_ports
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.worker import Worker

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


def test_close_during_a_takeover_waits_for_it_and_closes_its_store(stack, kafka_bootstrap, tmp_path):
    # (`stack`: the suite's topics exist; the worker reads their log, writes nothing)
    """A stop (close()) while a partition is being caught up: the catch-up is waited for
    and its store closed, and the takeover ends quietly (no store left open, nothing
    scheduled on the executors close() shut down)."""
    settings = dataclasses.replace(
        Settings(bootstrap_servers=kafka_bootstrap), app_id=f"stop-{uuid.uuid4().hex[:6]}",
        data_dir=tmp_path, partitions=8)
    worker = Worker(settings, owns=lambda p: True)

    async def scenario() -> None:
        taking = asyncio.ensure_future(worker.attach(3))
        await asyncio.sleep(0.01)  # the takeover holds the partition's lock, catching up
        assert 3 not in worker.processors
        await worker.close()
        await asyncio.wait_for(taking, 10)
        assert worker.processors == {}
        await worker.attach(5)  # a late assignment opens nothing
        assert worker.processors == {}

    asyncio.run(scenario())
