"""How to leave a hanging transaction on a partition, for the crash test and the tests.

The way KIP-890 describes them arising: a transactional append its coordinator never
registered. With the broker's partition verification off for a moment, a raw Produce of a
transactional batch, under a producer id its coordinator holds in no transaction, lands on
the partition and pins its last stable offset until something writes its marker. Nothing
in Kafka ever will: `streams.hanging` is what finds and aborts it.
"""

from __future__ import annotations

import struct
import time
import uuid

from aiokafka.record.default_records import DefaultRecordBatchBuilder
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from ledger.commands import CreateLedger, Request
from ledger.machine import execute
from ledger.state import MemoryStore, Overlay
from streams import codecs, hanging


def leader_of(bootstrap: str, topic: str, partition: int) -> tuple[str, int]:
    return hanging.cluster(bootstrap, topic, partition)[0]


# What the hanging transaction holds: the creation of a ledger that must never appear.
NEVER = "never-hanging"


def created(ledger: str) -> bytes:
    """A ledger.committed record: the log entry creating `ledger`."""
    return codecs.encode_log_entry(execute(Overlay(MemoryStore()), Request(f"c-{ledger}", ledger, CreateLedger()), 1).entry)


def hang(bootstrap: str, topic: str, partition: int) -> None:
    """Leave a hanging transaction on `topic[partition]`: one log entry, creating NEVER."""
    leader = leader_of(bootstrap, topic, partition)
    _verification(bootstrap, False)
    try:
        _produce_unregistered(leader, topic, partition, f"ghost-{uuid.uuid4().hex[:8]}", created(NEVER))
    finally:
        _verification(bootstrap, True)


def _verification(bootstrap: str, enabled: bool) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 2})
    for broker in admin.list_topics(timeout=10).brokers:
        resource = ConfigResource(ConfigResource.Type.BROKER, str(broker), incremental_configs=[ConfigEntry(
            "transaction.partition.verification.enable", str(enabled).lower(),
            incremental_operation=AlterConfigOpType.SET)])
        for future in admin.incremental_alter_configs([resource]).values():
            future.result(30)  # (while `admin` lives: its futures die with it)


def _retrying(call, retriable: tuple[int, ...], what: str):
    deadline = time.monotonic() + 30
    while True:
        error, result = call()
        if error == 0:
            return result
        if error not in retriable or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: error {error}")
        time.sleep(0.2)


def _init_producer_id(address: tuple[str, int], transactional_id: str) -> tuple[int, int]:
    """InitProducerId v3 for `transactional_id`: its coordinator then holds it, Empty."""
    raw = transactional_id.encode()
    body = bytes([len(raw) + 1]) + raw + struct.pack(">iqh", 60_000, -1, -1) + b"\x00"

    def call():
        reader = hanging.request(address, (22, 3), body)
        reader.int32()
        error, producer_id, epoch = reader.int16(), reader.int64(), reader.int16()
        return error, (producer_id, epoch)

    # COORDINATOR_LOAD_IN_PROGRESS, NOT_COORDINATOR (no transaction log yet), CONCURRENT_TRANSACTIONS
    return _retrying(call, (14, 15, 16, 51), "InitProducerId")


def _produce_unregistered(address: tuple[str, int], topic: str, partition: int, transactional_id: str,
                          value: bytes) -> None:
    """A transactional batch appended without AddPartitionsToTxn (Produce v9, acks=-1)."""
    producer_id, epoch = _init_producer_id(address, transactional_id)
    batch = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=1, producer_id=producer_id,
                                      producer_epoch=epoch, base_sequence=0, batch_size=1 << 20)
    batch.append(0, timestamp=None, key=b"hanging", value=value, headers=[])
    records = bytes(batch.build())
    raw_id, raw_topic = transactional_id.encode(), topic.encode()
    body = (bytes([len(raw_id) + 1]) + raw_id + struct.pack(">hi", -1, 30_000)
            + b"\x02" + bytes([len(raw_topic) + 1]) + raw_topic
            + b"\x02" + struct.pack(">i", partition) + hanging.uvarint(len(records) + 1) + records + b"\x00"
            + b"\x00" + b"\x00")

    def call():
        reader = hanging.request(address, (0, 9), body)
        reader.uvarint()  # one topic
        reader.string()
        reader.uvarint()  # one partition
        reader.int32()
        return reader.int16(), None

    # INVALID_TXN_STATE: verification still on (a dynamic config takes a moment to apply)
    _retrying(call, (48,), "the unregistered transactional append")
