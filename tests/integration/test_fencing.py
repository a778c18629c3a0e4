"""The two halves of zombie fencing with one transaction per round, against the broker.

(i)  A round whose offsets carry a group generation the group has left behind is refused
     by the group coordinator: `Writer.commit` raises GroupMoved and nothing of the round
     is visible to a read_committed reader; the same round with the current member's
     metadata commits.
(ii) A new owner's catch-up runs to the high watermark: a transaction left open on the
     partition (records flushed, not yet committed) is waited for — its entries are
     replayed if it commits, skipped if it aborts — instead of being overtaken.

Own topic names (uuid), so the suite's worker never sees these records.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from ledger.commands import CreateLedger, Request
from ledger.machine import execute
from ledger.state import LEDGER, MemoryStore, Overlay
from streams import codecs
from streams.processor import CatchUpCancelled, PartitionProcessor, watermark_probe
from streams.settings import Settings
from streams.topics import producer_config
from streams.writer import Emission, GroupMoved, Writer
from tests.integration.stack import committed_records

pytestmark = pytest.mark.integration


def _topics(bootstrap: str, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, 1, 1) for name in names]).values():
        future.result(30)


def _visible(bootstrap: str, topic: str) -> list[bytes]:
    return [message.value() for message in committed_records(bootstrap, topic)]


def _member(bootstrap: str, group: str, topic: str, **conf) -> Consumer:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "session.timeout.ms": 6000, **conf})
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment():
        consumer.poll(0.2)
        assert time.monotonic() < deadline, "no assignment"
    return consumer


def test_a_round_with_a_stale_generation_is_refused_and_invisible(kafka_bootstrap, monkeypatch):
    requests, outcomes = f"fence-in-{uuid.uuid4().hex[:8]}", f"fence-out-{uuid.uuid4().hex[:8]}"
    _topics(kafka_bootstrap, requests, outcomes)
    monkeypatch.setattr("streams.writer.REQUESTS", requests)
    group = f"fence-{uuid.uuid4().hex[:8]}"
    # The zombie-to-be: a member that stops polling and is dropped from the group.
    zombie = _member(kafka_bootstrap, group, requests, **{"max.poll.interval.ms": 6000})
    stale = zombie.consumer_group_metadata()
    successor = _member(kafka_bootstrap, group, requests)  # joins; the zombie never polls again
    deadline = time.monotonic() + 40
    while successor.consumer_group_metadata()[7:11] == stale[7:11]:  # generation bytes
        successor.poll(0.2)
        assert time.monotonic() < deadline, "the group did not move on"

    writer = Writer(kafka_bootstrap, f"fence-{uuid.uuid4().hex[:8]}")
    try:
        writer.ensure()
        round_ = [Emission(outcomes, 0, b"k", b"from the zombie", "r1")]
        with pytest.raises(GroupMoved):
            writer.commit(round_, {0: 1}, stale)
        assert _visible(kafka_bootstrap, outcomes) == []
        # The same writer, with the member the group knows now, commits.
        writer.commit([Emission(outcomes, 0, b"k", b"from the owner", "r2")], {0: 1},
                      successor.consumer_group_metadata())
        assert _visible(kafka_bootstrap, outcomes) == [b"from the owner"]
    finally:
        writer.close()
        successor.close()
        _close_within(zombie, 30)


def test_a_round_that_fails_while_applied_is_aborted(kafka_bootstrap, monkeypatch):
    """The worker applies a round partition by partition while its transaction is open
    (the writer pulls the outcomes): an error in the middle aborts the transaction, and
    what was produced before it never becomes visible."""
    requests, outcomes = f"fail-in-{uuid.uuid4().hex[:8]}", f"fail-out-{uuid.uuid4().hex[:8]}"
    _topics(kafka_bootstrap, requests, outcomes)
    monkeypatch.setattr("streams.writer.REQUESTS", requests)
    member = _member(kafka_bootstrap, f"fail-{uuid.uuid4().hex[:8]}", requests)
    writer = Writer(kafka_bootstrap, f"fail-{uuid.uuid4().hex[:8]}")
    # read_uncommitted: its high watermark counts records of open transactions.
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": uuid.uuid4().hex,
                      "isolation.level": "read_uncommitted"})

    def high() -> int:
        return probe.get_watermark_offsets(TopicPartition(outcomes, 0), timeout=5, cached=False)[1]

    def failing_round():
        yield [Emission(outcomes, 0, b"k", b"applied first", "r1")]
        deadline = time.monotonic() + 20
        while high() < 1:  # the first partition's record is on the broker, in the transaction
            assert time.monotonic() < deadline, "the record never reached the broker"
            time.sleep(0.05)
        raise ZeroDivisionError("the second partition's apply failed")

    try:
        writer.ensure()
        with pytest.raises(ZeroDivisionError):
            writer.commit(failing_round(), {0: 1}, member.consumer_group_metadata())
        # Its abort marker follows its record (the coordinator writes it just after the
        # abort returns); a transaction left open would get one only when it times out.
        deadline = time.monotonic() + 10
        while high() < 2:
            assert time.monotonic() < deadline, "the transaction was left open (no abort marker)"
            time.sleep(0.05)
        writer.commit(iter([[Emission(outcomes, 0, b"k", b"the retry", "r1")]]), {0: 1},
                      member.consumer_group_metadata())
        assert _visible(kafka_bootstrap, outcomes) == [b"the retry"]
    finally:
        probe.close()
        writer.close()
        member.close()


def _close_within(consumer: Consumer, seconds: float) -> None:
    """Close a consumer, but never hang the suite on it: librdkafka's close of a member the
    group dropped (max.poll.interval exceeded) blocked once for minutes in a CI run."""
    closer = threading.Thread(target=consumer.close, name="close-zombie", daemon=True)
    closer.start()
    closer.join(seconds)


def _left_open(bootstrap: str, ledger: str) -> tuple[str, Producer]:
    """A new topic with a transaction open on it (a ledger's creation, flushed to the
    leader, not committed), and the producer holding it."""
    topic = f"fence-log-{uuid.uuid4().hex[:8]}"
    _topics(bootstrap, topic)
    entry = execute(Overlay(MemoryStore()), Request("c-1", ledger, CreateLedger()), 1).entry
    producer = Producer(producer_config(bootstrap, transactional_id=f"{ledger}-{uuid.uuid4().hex[:8]}"))
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, codecs.encode_log_entry(entry), ledger.encode(), partition=0)
    assert producer.flush(30) == 0  # on the leader, the transaction still open
    return topic, producer


@pytest.mark.parametrize("resolution", ["commit", "abort"])
def test_catch_up_waits_for_a_transaction_left_open(kafka_bootstrap, tmp_path, resolution):
    topic, previous_owner = _left_open(kafka_bootstrap, "fenced")
    delay = 3.0

    def resolve() -> None:
        time.sleep(delay)
        if resolution == "commit":
            previous_owner.commit_transaction(30)
        else:
            previous_owner.abort_transaction(30)

    settings = dataclasses.replace(Settings(), bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    processor = PartitionProcessor(settings, 0)
    resolver = threading.Thread(target=resolve)
    try:
        started = time.monotonic()
        resolver.start()
        probe = watermark_probe(settings)  # the end a catch-up waits for
        try:
            low, high = probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
        finally:
            probe.close()
        replayed = processor._catch_up(topic, low, high)
        waited = time.monotonic() - started
        assert waited >= delay - 0.5, f"the catch-up overtook an open transaction ({waited:.2f}s)"
        if resolution == "commit":
            assert replayed == 1
            assert processor.store.get((LEDGER, "fenced")) is not None
        else:
            assert replayed == 0
            assert processor.store.get((LEDGER, "fenced")) is None
    finally:
        resolver.join()
        processor.close()


def test_a_catch_up_waiting_on_an_open_transaction_stops_when_released(kafka_bootstrap, tmp_path):
    """A revocation does not wait out a catch-up held by an open transaction (up to a
    minute): the group's whole rebalance would wait with it."""
    topic, owner = _left_open(kafka_bootstrap, "held")  # until the test aborts it

    settings = dataclasses.replace(Settings(), bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    processor = PartitionProcessor(settings, 0)
    cancelled = threading.Event()
    outcome: list[BaseException | int] = []

    def catch_up() -> None:
        processor._cancelled = cancelled  # as `open(epoch, cancelled)` sets it
        probe = watermark_probe(settings)
        try:
            low, high = probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
        finally:
            probe.close()
        try:
            outcome.append(processor._catch_up(topic, low, high))
        except BaseException as error:  # noqa: BLE001 — what the test looks at
            outcome.append(error)

    catching_up = threading.Thread(target=catch_up)
    try:
        catching_up.start()
        time.sleep(2)
        assert not outcome, f"the catch-up overtook an open transaction: {outcome}"
        released = time.monotonic()
        cancelled.set()
        catching_up.join(10)
        assert not catching_up.is_alive() and time.monotonic() - released < 2
        assert len(outcome) == 1 and isinstance(outcome[0], CatchUpCancelled), outcome
    finally:
        owner.abort_transaction(30)
        catching_up.join(10)
        processor.close()
