"""A hanging transaction on a ledger log: found and aborted, and only when it is hanging.

A hanging transaction is made as KIP-890 describes them arising (`bench._hanging`): a
transactional append its coordinator never registered, which pins the partition's last
stable offset forever. A catch-up stuck on it finds it and aborts it (`streams.hanging`), then replays what was
committed after it; so does a running worker whose own partition's log it pins (the
gateway's replies wait behind it). A transaction its coordinator still holds open on the
partition is left alone.

Own topic names (uuid), so the suite's worker never sees these records.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import streams.processor as processor_module
from bench._hanging import NEVER, created, hang, leader_of
from ledger.state import LEDGER
from streams import hanging
from streams.processor import PartitionProcessor, watermark_probe
from streams.settings import Settings
from streams.topics import COMMITTED, partition_for, producer_config
from tests.integration.stack import http

pytestmark = pytest.mark.integration


def _leader(bootstrap: str, topic: str) -> tuple[str, int]:
    return leader_of(bootstrap, topic, 0)


def _hang(bootstrap: str, topic: str, partition: int = 0) -> None:
    hang(bootstrap, topic, partition)


def _new_topic(bootstrap: str) -> str:
    topic = f"hang-log-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(30)
    return topic


def _catch_up(settings: Settings, topic: str, position: int | None = None) -> tuple[PartitionProcessor, int]:
    probe = watermark_probe(settings)
    try:
        low, high = probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
    finally:
        probe.close()
    processor = PartitionProcessor(settings, 0)
    try:
        if position is not None:  # as if it had applied what comes before itself
            processor.store.commit([], {topic: position})
        return processor, processor._catch_up(topic, low, high)
    except BaseException:
        processor.close()
        raise


@pytest.mark.parametrize("store_at", ["before", "past"])
def test_a_hanging_transaction_is_aborted_and_the_catch_up_goes_on(kafka_bootstrap, tmp_path, monkeypatch, store_at):
    """The store recorded a position before the hanging transaction, or past it (its
    owner applied what it wrote after it: the reader waits on it all the same)."""
    topic = _new_topic(kafka_bootstrap)
    leader = _leader(kafka_bootstrap, topic)
    later = Producer(producer_config(kafka_bootstrap, transactional_id=f"later-{uuid.uuid4().hex[:8]}"))
    later.init_transactions(30)  # (and the broker's transaction coordinator is up)
    _hang(kafka_bootstrap, topic)
    [open_] = hanging.describe_producers(leader, topic, 0)
    assert open_.start_offset == 0
    # Later owners' transactions commit behind it: unreadable until the hanging one ends.
    for name in ("applied", "after"):
        later.begin_transaction()
        later.produce(topic, created(name), name.encode(), partition=0)
        later.commit_transaction(30)  # at 1 and 3, their markers at 2 and 4

    monkeypatch.setattr(processor_module, "_REPLAY_STALL_SECONDS", 2)
    settings = dataclasses.replace(Settings(), bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    processor, replayed = _catch_up(settings, topic, position=2 if store_at == "past" else None)
    try:
        assert replayed == (1 if store_at == "past" else 2)
        assert processor.store.get((LEDGER, "after")) is not None
        assert (processor.store.get((LEDGER, "applied")) is None) == (store_at == "past")
        assert processor.store.get((LEDGER, NEVER)) is None
        assert hanging.describe_producers(leader, topic, 0) == []
    finally:
        processor.close()


def test_a_transaction_its_coordinator_holds_is_left_alone(kafka_bootstrap, tmp_path, monkeypatch):
    topic = _new_topic(kafka_bootstrap)
    leader = _leader(kafka_bootstrap, topic)
    owner = Producer(producer_config(kafka_bootstrap, transactional_id=f"slow-{uuid.uuid4().hex[:8]}",
                                     **{"transaction.timeout.ms": 120_000}))
    owner.init_transactions(30)
    owner.begin_transaction()
    owner.produce(topic, created("slow"), b"slow", partition=0)
    assert owner.flush(30) == 0  # on the leader, its transaction open at its coordinator

    finding = hanging.abort_if_hanging(kafka_bootstrap, topic, 0, 0)
    assert not finding.aborted and "still holds it" in finding.description and "Ongoing" in finding.description

    monkeypatch.setattr(processor_module, "_REPLAY_STALL_SECONDS", 2)
    settings = dataclasses.replace(Settings(), bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    with pytest.raises(Exception, match="still holds it"):
        _catch_up(settings, topic)
    # Untouched: it still commits, and its entry is then replayed.
    owner.commit_transaction(30)
    processor, replayed = _catch_up(settings, topic)
    try:
        assert replayed == 1 and processor.store.get((LEDGER, "slow")) is not None
    finally:
        processor.close()


def test_a_running_worker_aborts_a_hanging_transaction_on_its_own_log(stack):
    """The suite's worker checks its partitions' stable offsets every second
    (STREAMLEDGER_HANGING_TRANSACTION_S=4 in tests/integration/stack.py)."""
    name = f"hang-{uuid.uuid4().hex[:8]}"
    stack.create_ledger(name)
    partition = partition_for(name.encode(), 8)
    _hang(stack.bootstrap, COMMITTED, partition)
    leader = leader_of(stack.bootstrap, COMMITTED, partition)
    assert hanging.describe_producers(leader, COMMITTED, partition), "no transaction left open"
    # Its answer is committed behind the hanging transaction: the gateway sees it once that
    # one is aborted (the reply timeout is 20 s; the watch needs ~4-6 s).
    started = time.monotonic()
    response = http("POST", f"{stack.url}/v2/{name}/transactions",
                    {"postings": [{"source": "world", "destination": "a", "amount": 5, "asset": "USD"}]})
    assert response.status == 200, (response.status, response.body, stack.log("w1")[-2000:])
    assert time.monotonic() - started >= 2, "answered while the log was pinned"
    assert hanging.describe_producers(leader, COMMITTED, partition) == []
    assert "(hanging): aborted it" in stack.log("w1")
