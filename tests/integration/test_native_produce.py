"""A native round's records produced from Rust (native/src/kafka.rs) into the writer's
confluent-kafka producer, against the broker: a read_committed reader must see exactly
what `Producer.produce` of the same round's emissions would have published (topic,
partition, order, key, value, request_id header), the offsets the writer reports must be
the stores' positions, a full local queue must be waited out, and a record librdkafka
refuses must abort the whole transaction.

Own topic names (uuid), so the suite's worker never sees these records.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from ledger.commands import CreateLedger, CreateTransaction, Request
from ledger.model import Posting
from streams import codecs, processor as processor_module
from streams import writer as writer_module
from streams.processor import PartitionProcessor, streamledger_native
from streams.settings import Settings
from streams.writer import Writer
from tests.integration.stack import committed_records

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(streamledger_native is None, reason="native path not built"),
]

NOW = 1_763_800_000_000_000


@pytest.fixture
def topics(kafka_bootstrap, monkeypatch):
    """(committed, rejected): the names the native engine produces to, for this test."""
    names = (f"native-committed-{uuid.uuid4().hex[:8]}", f"native-rejected-{uuid.uuid4().hex[:8]}")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(name, 1, 1) for name in names]).values():
        future.result(30)
    monkeypatch.setattr(processor_module, "COMMITTED", names[0])
    monkeypatch.setattr(processor_module, "REJECTED", names[1])
    return names


def _native_round(tmp_path, transfers: list[Request]):
    """A partition processor of one partition with ledger "main", and the `Applied` of a
    native round of `transfers`."""
    processor = PartitionProcessor(Settings(data_dir=tmp_path, partitions=1), 0)
    created = processor.apply(processor.decode([(0, b"main", codecs.encode_requests(
        [Request("create", "main", CreateLedger(), received_at=NOW)]))], NOW), NOW)
    processor.commit(created, {})
    applied = processor.apply(processor.decode([(1, b"main", codecs.encode_requests(transfers))], NOW), NOW)
    assert not isinstance(applied.outcomes, list), "not a native round"
    return processor, applied


def _transfers(n: int, **fields) -> list[Request]:
    """`n` transfers: every third from an account without funds (rejected), the rest from
    world."""
    return [Request(f"req-{i}", "main", CreateTransaction(postings=(
        Posting("broke" if i % 3 == 2 else "world", f"users:{i}", 100 + i, "USD"),), **fields), received_at=NOW)
        for i in range(n)]


def _read(bootstrap: str, topic: str) -> list[tuple[bytes, bytes, bytes]]:
    """(key, value, request_id header) of every committed record of the topic's partition 0."""
    return [(m.key(), m.value(), dict(m.headers())["request_id"]) for m in committed_records(bootstrap, topic)]


@pytest.mark.parametrize("native_produce", [True, False])
def test_a_native_round_publishes_what_its_emissions_say(kafka_bootstrap, topics, tmp_path, monkeypatch,
                                                        native_produce):
    # A local queue of 7 messages: the round of 60 fills it again and again, so producing
    # from Rust stops at the full queue, polls, and goes on from where it stopped.
    config = writer_module.producer_config
    monkeypatch.setattr(writer_module, "producer_config",
                        lambda *args, **kw: {**config(*args, **kw), "queue.buffering.max.messages": 7})
    processor, applied = _native_round(tmp_path, _transfers(60))
    expected = {topic: [(e.key, e.value, e.request_id.encode()) for e in applied.emissions if e.topic == topic]
                for topic in topics}
    assert len(expected[topics[0]]) == 40 and len(expected[topics[1]]) == 20
    writer = Writer(kafka_bootstrap, f"native-{uuid.uuid4().hex[:8]}", native_produce=native_produce)
    try:
        writer.ensure()
        assert (writer._kafka is not None) == native_produce  # noqa: SLF001 — which path ran
        written = writer.commit(iter([applied.outcomes]), {}, b"")
    finally:
        writer.close()
        processor.close()
    assert written == {(topics[0], 0): 40, (topics[1], 0): 20}
    for topic in topics:
        assert _read(kafka_bootstrap, topic) == expected[topic]


def test_a_record_librdkafka_refuses_aborts_the_round(kafka_bootstrap, topics, tmp_path, monkeypatch):
    """A log entry above the producer's message.max.bytes: librdkafka refuses it in
    rd_kafka_produceva; the writer raises, and nothing of the round becomes visible."""
    config = writer_module.producer_config
    monkeypatch.setattr(writer_module, "producer_config",
                        lambda *args, **kw: {**config(*args, **kw), "message.max.bytes": 2000})
    transfers = _transfers(6)
    transfers[3] = Request("big", "main", CreateTransaction(
        postings=(Posting("world", "users:big", 1, "USD"),), metadata={"note": "x" * 3000}), received_at=NOW)
    processor, applied = _native_round(tmp_path, transfers)
    writer = Writer(kafka_bootstrap, f"native-{uuid.uuid4().hex[:8]}")
    try:
        writer.ensure()
        assert writer._kafka is not None  # noqa: SLF001
        with pytest.raises(KafkaException) as raised:
            writer.commit(iter([applied.outcomes]), {}, b"")
        assert raised.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
        # Dropped (the caller catches up and retries with new producers), and the first
        # records, produced before the refused one, were aborted with the transaction.
        assert writer._producers is None  # noqa: SLF001
    finally:
        writer.close()
        processor.close()
    assert _read(kafka_bootstrap, topics[0]) == []
