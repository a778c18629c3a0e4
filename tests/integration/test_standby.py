"""Warm standbys (STREAMLEDGER_STANDBY), driven without faust against the suite's broker:
a worker keeps caught-up stores of the partitions it does not own, takes one over with
only the log's tail to replay, and keeps a released partition warm instead of closing it.

The standby reads the suite's own ledger.committed / ledger.rejected (the session
worker's entries) and writes only under its own data dir and app id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest

from streams import processor as processor_module
from streams import worker as worker_module
from streams.processor import PartitionProcessor, log_watermarks, watermark_probe
from streams.settings import Settings
from streams.topics import partition_for
from streams.worker import Worker
from tests.integration.stack import http

pytestmark = pytest.mark.integration
P = 8


def test_standbys_stay_caught_up_and_make_a_takeover_replay_only_the_tail(stack, kafka_bootstrap, tmp_path, monkeypatch):
    # Something on the log of a known partition.
    ledger = f"standby-{uuid.uuid4().hex[:8]}"
    stack.create_ledger(ledger)
    reply = http("POST", f"{stack.url}/v2/{ledger}/transactions", {
        "postings": [{"source": "world", "destination": "users:1", "amount": 42, "asset": "USD"}]})
    assert reply.status == 200, reply.body
    partition = partition_for(ledger.encode(), P)

    monkeypatch.setattr(worker_module, "STANDBY_INTERVAL_S", 0.1)
    settings = dataclasses.replace(
        Settings(bootstrap_servers=kafka_bootstrap), app_id=f"standby-{uuid.uuid4().hex[:6]}",
        data_dir=tmp_path, partitions=P, standby=True)
    owned: set[int] = set()
    worker = Worker(settings, owns=lambda p: p in owned)
    worker.started = True

    async def scenario() -> None:
        keeper = asyncio.ensure_future(worker.keep_standbys())
        try:
            for _ in range(600):  # a standby of every partition, the ledger's balance in its own
                if len(worker.standbys) == P and await _balance(worker.standbys[partition].store, ledger, "users:1") == 42:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"standbys not caught up: {sorted(worker.standbys)}")
            standby = worker.standbys[partition]

            owned.add(partition)  # the group assigns it to us: the standby becomes the owner
            async with worker._lock(partition):  # noqa: SLF001 — wait out a catch-up in progress
                pass
            processor = await worker.processor(partition)
            assert processor is standby and partition not in worker.standbys
            assert processor.recovered_entries <= 5  # only what was logged since its last catch-up

            owned.discard(partition)  # revoked: kept warm, not closed
            await worker.release(partition)
            assert worker.standbys.get(partition) is processor
            assert (await _balance(processor.store, ledger, "users:1")) == 42
        finally:
            keeper.cancel()
            await worker.close()

    asyncio.run(scenario())


def test_close_while_standbys_are_kept_closes_them_all_and_ends_the_keeper(stack, kafka_bootstrap, tmp_path, monkeypatch):
    """faust calls close() (before shutdown) while keep_standbys still runs: the keeper
    must end without error and open nothing after it (the executor is gone then)."""
    monkeypatch.setattr(worker_module, "STANDBY_INTERVAL_S", 0.05)
    settings = dataclasses.replace(
        Settings(bootstrap_servers=kafka_bootstrap), app_id=f"standby-{uuid.uuid4().hex[:6]}",
        data_dir=tmp_path, partitions=P, standby=True)
    worker = Worker(settings, owns=lambda p: False)
    worker.started = True

    async def scenario() -> None:
        keeper = asyncio.ensure_future(worker.keep_standbys())
        for _ in range(600):
            if worker.standbys:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no standby was opened")
        await worker.close()
        await asyncio.wait_for(keeper, 10)  # ends by itself, and raises nothing
        assert worker.standbys == {}

    asyncio.run(scenario())


def test_a_standby_with_nothing_new_logged_reads_nothing(stack, kafka_bootstrap, tmp_path, monkeypatch):
    """A standby catches up every few seconds: when its topics' high watermarks have not
    moved since its last catch-up, it must not open a consumer to read them (a
    transactional partition ends with a marker, so "high > recorded position" always
    holds and cannot tell)."""
    ledger = f"standby-idle-{uuid.uuid4().hex[:8]}"
    stack.create_ledger(ledger)
    partition = partition_for(ledger.encode(), P)
    settings = dataclasses.replace(
        Settings(bootstrap_servers=kafka_bootstrap), app_id=f"standby-{uuid.uuid4().hex[:6]}",
        data_dir=tmp_path, partitions=P)
    processor = PartitionProcessor(settings, partition)
    probe = watermark_probe(settings)
    opened: list[str] = []

    class CountingConsumer(processor_module.Consumer):
        def __init__(self, config: dict) -> None:
            opened.append(config["isolation.level"])
            super().__init__(config)

    try:
        assert processor.recover(log_watermarks(probe, partition)) >= 1  # the ledger's creation
        monkeypatch.setattr(processor_module, "Consumer", CountingConsumer)

        assert processor.recover(log_watermarks(probe, partition)) == 0
        assert opened == []
        assert processor.recover() == 0  # probing by itself: a watermark probe, no reader
        assert opened == ["read_uncommitted"]

        reply = http("POST", f"{stack.url}/v2/{ledger}/transactions", {
            "postings": [{"source": "world", "destination": "users:1", "amount": 7, "asset": "USD"}]})
        assert reply.status == 200, reply.body
        opened.clear()
        assert processor.recover(log_watermarks(probe, partition)) >= 1  # the new entry
        assert opened == ["read_committed"]
        assert asyncio.run(_balance(processor.store, ledger, "users:1")) == 7
    finally:
        probe.close()
        processor.close()


async def _balance(store, ledger: str, account: str) -> int:
    from ledger.model import Volumes
    from ledger.state import VOLUMES

    volumes = store.get((VOLUMES, ledger, account, "USD")) or Volumes()
    return volumes.balance
