"""The worker's round machinery that needs no broker: group metadata bytes, round splits."""

from __future__ import annotations

import dataclasses

from confluent_kafka import Consumer

from streams.settings import Settings
from streams.worker import Worker
from streams.writer import group_metadata


def _librdkafka_metadata(**conf) -> bytes:
    consumer = Consumer({"bootstrap.servers": "127.0.0.1:1", "group.id": "ledger-app", **conf})
    try:
        return consumer.consumer_group_metadata()
    finally:
        consumer.close()


def test_group_metadata_is_what_librdkafka_serialises():
    # A consumer outside a generation: generation -1, no member id yet.
    assert group_metadata("ledger-app", -1, "") == _librdkafka_metadata()
    assert group_metadata("ledger-app", -1, "", "w-1") == _librdkafka_metadata(**{"group.instance.id": "w-1"})


def test_group_metadata_carries_generation_and_member():
    raw = group_metadata("g", 7, "faust-abc")
    assert raw.startswith(b"CGMDv2:")
    assert int.from_bytes(raw[7:11], "little", signed=True) == 7
    assert raw[11:].split(b"\0")[:2] == [b"g", b"faust-abc"]


def _worker(requests_max: int, postings_max: int) -> Worker:
    settings = dataclasses.replace(Settings(), batch_requests_max=requests_max, batch_postings_max=postings_max)
    return Worker(settings)


def _records(partition_sizes: dict[int, list[int]]):
    # decoded records: (offset, items); an item without postings weighs 1 posting
    return {p: [(offset, [object()] * n) for offset, n in enumerate(sizes)] for p, sizes in partition_sizes.items()}


def test_rounds_are_bounded_by_requests_and_never_split_a_record():
    worker = _worker(requests_max=10, postings_max=1000)
    rounds = list(worker._rounds(_records({0: [4, 4, 4], 1: [20, 1]})))
    assert [{p: [o for o, _ in recs] for p, recs in r.items()} for r in rounds] == [
        {0: [0, 1]},        # 8 requests; the third record would make 12
        {0: [2]},           # 4; the 20-request record does not fit with it
        {1: [0]},           # one record larger than the bound is a round of its own
        {1: [1]},
    ]
    # every record exactly once, in order per partition
    seen = [(p, o) for r in rounds for p, recs in r.items() for o, _ in recs]
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_rounds_are_bounded_by_postings():
    worker = _worker(requests_max=1000, postings_max=5)
    rounds = list(worker._rounds(_records({3: [2, 2, 2]})))
    assert [[o for o, _ in r[3]] for r in rounds] == [[0, 1], [2]]
