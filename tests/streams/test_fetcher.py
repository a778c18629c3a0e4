"""The worker's request fetcher, against a stand-in consumer: which fetched records a round
may apply around (re)assignments and rewinds."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streams.settings import Settings
from streams.worker import RequestFetcher


class Message:
    def __init__(self, partition: int, offset: int, size: int = 7) -> None:
        self._partition, self._offset, self._size = partition, offset, size

    def error(self):
        return None

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"ledger"

    def value(self) -> bytes:
        return b"p" * self._size


class Consumer:
    """Hands out whatever `queued` holds; committed offsets from `committed_offsets`."""

    def __init__(self) -> None:
        self.queued: list[Message] = []
        self.committed_offsets: dict[int, int] = {}
        self.assigned: dict[int, int] = {}
        self.unavailable = False

    def consume(self, max_records: int, timeout: float) -> list[Message]:
        out, self.queued = self.queued[:max_records], self.queued[max_records:]
        return out

    def committed(self, partitions, timeout=None):
        if self.unavailable:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))
        return [TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(tp.partition, 0))
                for tp in partitions]

    def incremental_assign(self, partitions) -> None:
        for tp in partitions:
            self.assigned[tp.partition] = tp.offset

    def incremental_unassign(self, partitions) -> None:
        for tp in partitions:
            self.assigned.pop(tp.partition, None)


def _fetcher() -> tuple[RequestFetcher, Consumer]:
    fetcher = RequestFetcher(Settings(bootstrap_servers="127.0.0.1:1"))
    fetcher.consumer.close()
    fetcher.consumer = consumer = Consumer()  # type: ignore[assignment]
    return fetcher, consumer


def test_records_of_a_rewinding_partition_are_never_handed_out():
    fetcher, consumer = _fetcher()
    consumer.committed_offsets = {0: 5, 1: 0}
    assert fetcher.assign(0) == 5 and fetcher.assign(1) == 0
    generation = fetcher.generation[0]

    # A round of partition 0 was refused; reading it again from the committed offset
    # failed (the broker is away): its records fetched meanwhile lie past the dropped ones.
    fetcher.rewinding.add(0)
    consumer.unavailable = True
    try:
        fetcher.assign(0)
    except KafkaException:
        pass
    consumer.queued = [Message(0, 9), Message(1, 0), Message(0, 10)]
    taken = fetcher.take(10, 0)
    assert list(taken) == [1]  # partition 1 goes on
    assert not fetcher.current(0, generation)

    # Once it is read again from the committed offset, its records flow again.
    consumer.unavailable = False
    fetcher.assign(0)
    assert consumer.assigned[0] == 5 and 0 not in fetcher.rewinding
    consumer.queued = [Message(0, 5)]
    taken = fetcher.take(10, 0)
    assert [offset for offset, _key, _value in taken[0][1]] == [5]
    assert fetcher.current(0, taken[0][0])


def test_records_fetched_before_a_reassignment_are_stale():
    fetcher, consumer = _fetcher()
    fetcher.assign(0)
    before = fetcher.generation[0]
    fetcher.assign(0)
    assert not fetcher.current(0, before)
    assert fetcher.current(0, fetcher.generation[0])
    fetcher.unassign(0)
    consumer.queued = [Message(0, 0)]
    assert fetcher.take(10, 0) == {}


def test_a_take_is_bounded_in_bytes_and_loses_nothing():
    """Records of hundreds of requests each: a take stops after about TAKE_BYTES_MAX of
    them (one chunk past it at most), whatever the record count allows; the next takes go
    on from there, in order."""
    from streams.worker import _CONSUME_CHUNK

    fetcher, consumer = _fetcher()
    fetcher.assign(0)
    consumer.queued = [Message(0, offset, size=30_000) for offset in range(500)]
    offsets, takes = [], []
    while consumer.queued:
        taken = fetcher.take(4000, 0, max_bytes=1_000_000)
        takes.append(len(taken[0][1]))
        offsets += [offset for offset, _key, _value in taken[0][1]]
    assert offsets == list(range(500))
    assert max(takes) <= 1_000_000 // 30_000 + _CONSUME_CHUNK and len(takes) > 1
    # Small records (one request each): the record count bounds the take, over many chunks.
    consumer.queued = [Message(0, offset) for offset in range(500, 10_500)]
    taken = fetcher.take(4000, 0)
    assert [offset for offset, _key, _value in taken[0][1]] == list(range(500, 4500))
