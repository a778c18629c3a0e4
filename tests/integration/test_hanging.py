"""A hanging transaction on a ledger log: found and aborted, and only when it is hanging.

A hanging transaction is made the way KIP-890 describes them arising: a transactional
append the coordinator never registered. With the broker's partition verification off for
a moment, a raw Produce of a transactional batch under a producer id that its coordinator
holds in no transaction lands on the partition and pins its last stable offset forever.
A catch-up stuck on it finds it and aborts it (`streams.hanging`), then replays what was
committed after it; so does a running worker whose own partition's log it pins (the
gateway's replies wait behind it). A transaction its coordinator still holds open on the
partition is left alone.

Own topic names (uuid), so the suite's worker never sees these records.
"""

from __future__ import annotations

import dataclasses
import struct
import time
import uuid

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

import streams.processor as processor_module
from ledger.commands import CreateLedger, Request
from ledger.machine import execute
from ledger.state import LEDGER, MemoryStore, Overlay
from streams import codecs, hanging
from streams.processor import PartitionProcessor, watermark_probe
from streams.settings import Settings
from streams.topics import COMMITTED, partition_for, producer_config
from tests.integration.stack import http

pytestmark = pytest.mark.integration


def _entry(ledger: str) -> bytes:
    return codecs.encode_log_entry(execute(Overlay(MemoryStore()), Request(f"c-{ledger}", ledger, CreateLedger()), 1).entry)


def _leader(bootstrap: str, topic: str) -> tuple[str, int]:
    return _leader_of(bootstrap, topic, 0)


def _leader_of(bootstrap: str, topic: str, partition: int) -> tuple[str, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(topic, timeout=10)
    broker = metadata.brokers[metadata.topics[topic].partitions[partition].leader]
    return broker.host, broker.port


def _verification(bootstrap: str, enabled: bool) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    broker = str(next(iter(admin.list_topics(timeout=10).brokers)))
    resource = ConfigResource(ConfigResource.Type.BROKER, broker, incremental_configs=[ConfigEntry(
        "transaction.partition.verification.enable", str(enabled).lower(),
        incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)  # (while `admin` lives: its futures die with it)


def _init_producer_id(address: tuple[str, int], transactional_id: str) -> tuple[int, int]:
    """InitProducerId v3 for `transactional_id`: its coordinator then holds it, Empty."""
    raw = transactional_id.encode()
    body = bytes([len(raw) + 1]) + raw + struct.pack(">iqh", 60_000, -1, -1) + b"\x00"
    deadline = time.monotonic() + 30
    while True:
        reader = hanging.request(address, (22, 3), body)
        reader.int32()
        error, producer_id, epoch = reader.int16(), reader.int64(), reader.int16()
        if error == 0:
            return producer_id, epoch
        assert error in (15, 16, 51) and time.monotonic() < deadline, f"InitProducerId: error {error}"  # (loading)
        time.sleep(0.2)


def _produce_unregistered(address: tuple[str, int], topic: str, transactional_id: str, value: bytes,
                          partition: int = 0) -> None:
    """A transactional batch appended without AddPartitionsToTxn (Produce v9, acks=-1)."""
    producer_id, epoch = _init_producer_id(address, transactional_id)
    batch = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=1, producer_id=producer_id,
                                      producer_epoch=epoch, base_sequence=0, batch_size=1 << 20)
    batch.append(0, timestamp=None, key=b"hanging", value=value, headers=[])
    records = bytes(batch.build())
    raw_id, raw_topic = transactional_id.encode(), topic.encode()
    body = (bytes([len(raw_id) + 1]) + raw_id + struct.pack(">hi", -1, 30_000)
            + b"\x02" + bytes([len(raw_topic) + 1]) + raw_topic
            + b"\x02" + struct.pack(">i", partition) + hanging._uvarint(len(records) + 1) + records + b"\x00"
            + b"\x00" + b"\x00")
    deadline = time.monotonic() + 30
    while True:
        reader = hanging.request(address, (0, 9), body)
        reader.uvarint()  # one topic
        reader.string()
        reader.uvarint()  # one partition
        reader.int32()
        error = reader.int16()
        if error == 0:
            return
        # INVALID_TXN_STATE: verification is still on (a dynamic config takes a moment).
        assert error == 48 and time.monotonic() < deadline, f"the unregistered append was refused: error {error}"
        time.sleep(0.2)


def _hang(bootstrap: str, topic: str, partition: int = 0) -> None:
    """Leave a hanging transaction on `topic[partition]`."""
    leader = _leader_of(bootstrap, topic, partition)
    _verification(bootstrap, False)
    try:
        _produce_unregistered(leader, topic, f"ghost-{uuid.uuid4().hex[:8]}", _entry("never"), partition)
    finally:
        _verification(bootstrap, True)


def _new_topic(bootstrap: str) -> str:
    topic = f"hang-log-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(30)
    return topic


def _catch_up(settings: Settings, topic: str) -> tuple[PartitionProcessor, int]:
    probe = watermark_probe(settings)
    try:
        low, high = probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
    finally:
        probe.close()
    processor = PartitionProcessor(settings, 0)
    try:
        return processor, processor._catch_up(topic, low, high)
    except BaseException:
        processor.close()
        raise


def test_a_hanging_transaction_is_aborted_and_the_catch_up_goes_on(kafka_bootstrap, tmp_path, monkeypatch):
    topic = _new_topic(kafka_bootstrap)
    leader = _leader(kafka_bootstrap, topic)
    later = Producer(producer_config(kafka_bootstrap, transactional_id=f"later-{uuid.uuid4().hex[:8]}"))
    later.init_transactions(30)  # (and the broker's transaction coordinator is up)
    _hang(kafka_bootstrap, topic)
    [open_] = hanging.describe_producers(leader, topic, 0)
    assert open_.start_offset == 0
    # A later owner's transaction commits behind it: unreadable until the hanging one ends.
    later.begin_transaction()
    later.produce(topic, _entry("after"), b"after", partition=0)
    later.commit_transaction(30)

    monkeypatch.setattr(processor_module, "_REPLAY_STALL_SECONDS", 2)
    settings = dataclasses.replace(Settings(), bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    processor, replayed = _catch_up(settings, topic)
    try:
        assert replayed == 1
        assert processor.store.get((LEDGER, "after")) is not None
        assert processor.store.get((LEDGER, "never")) is None
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
    owner.produce(topic, _entry("slow"), b"slow", partition=0)
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
    leader = _leader_of(stack.bootstrap, COMMITTED, partition)
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
