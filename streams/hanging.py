"""Find, and abort, a *hanging* transaction on a partition of the ledger's logs.

A transaction is hanging when a partition holds its records but no transaction coordinator
will ever write its marker: the coordinator has no ongoing transaction of that producer
including the partition (KIP-664; KIP-890 makes them rarer, not impossible). Its records
pin the partition's last stable offset, so a read_committed reader - a worker catching its
store up - never gets past it, and the ledgers of that partition stop.

The cure is Kafka's own (`kafka-transactions.sh find-hanging` / `abort`): describe the
partition's producers (DescribeProducers), ask every coordinator about the one whose
transaction starts where the partition is stuck (ListTransactions, DescribeTransactions),
and only when none is still resolving it, write the abort marker to the partition leader
(WriteTxnMarkers, what `Admin.abortTransaction` sends). A transaction some coordinator
still holds open on the partition, or still commits, is never touched: aborting it at
one partition would break its atomicity. Nothing is aborted when any step fails.

librdkafka (so confluent-kafka) has none of these four requests, hence the small client
below: one request per connection, flexible versions only, nothing else of the protocol.
"""

from __future__ import annotations

import itertools
import socket
import struct
import time
from dataclasses import dataclass

from confluent_kafka import IsolationLevel, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from streams import metrics

_DESCRIBE_PRODUCERS = (61, 0)
_LIST_TRANSACTIONS = (66, 0)
_DESCRIBE_TRANSACTIONS = (65, 0)
_WRITE_TXN_MARKERS = (27, 1)

# Coordinator states in which a transaction may still write a marker to its partitions.
_UNRESOLVED = frozenset({"Ongoing", "PrepareCommit", "PrepareAbort", "PrepareEpochFence"})

_TIMEOUT_S = 10.0
_correlation = itertools.count(1)


class ProtocolError(Exception):
    pass


# -- the wire: flexible (KIP-482) encodings ---------------------------------------------


def uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return uvarint(len(raw) + 1) + raw


def _array(items: list[bytes]) -> bytes:
    return uvarint(len(items) + 1) + b"".join(items)


def _one_partition(topic: str, partition: int) -> bytes:
    """The topics array of a request about one partition: [topic, [partition]]."""
    return _array([_string(topic) + _array([struct.pack(">i", partition)]) + _NO_TAGS])


_NO_TAGS = b"\x00"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ProtocolError("response truncated")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def int16(self) -> int:
        return struct.unpack(">h", self.take(2))[0]

    def int32(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def int64(self) -> int:
        return struct.unpack(">q", self.take(8))[0]

    def uvarint(self) -> int:
        n = shift = 0
        while True:
            byte = self.take(1)[0]
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return n

    def string(self) -> str | None:
        n = self.uvarint() - 1
        return None if n < 0 else self.take(n).decode()

    def array(self, item) -> list:
        return [item(self) for _ in range(max(self.uvarint() - 1, 0))]

    def tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self.take(self.uvarint())


def request(address: tuple[str, int], api: tuple[int, int], body: bytes, timeout: float = _TIMEOUT_S) -> _Reader:
    """Send one flexible-version request (header v2) and return its response body."""
    correlation = next(_correlation)
    client_id = b"streamledger"
    header = struct.pack(">hhih", api[0], api[1], correlation, len(client_id)) + client_id + _NO_TAGS
    message = header + body
    with socket.create_connection(address, timeout) as connection:
        connection.settimeout(timeout)
        connection.sendall(struct.pack(">i", len(message)) + message)
        size = struct.unpack(">i", _receive(connection, 4))[0]
        reader = _Reader(_receive(connection, size))
    if reader.int32() != correlation:
        raise ProtocolError("response to another request")
    reader.tags()  # response header v1
    return reader


def _receive(connection: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = connection.recv(n - len(data))
        if not chunk:  # a broker closes the connection on a request it does not support
            raise ProtocolError("the broker closed the connection")
        data += chunk
    return bytes(data)


# -- the four requests ------------------------------------------------------------------


@dataclass(frozen=True)
class OpenTransaction:
    """A producer's transaction open on a partition, as its leader describes it."""

    producer_id: int
    producer_epoch: int
    coordinator_epoch: int
    start_offset: int
    last_timestamp_ms: int


def describe_producers(leader: tuple[str, int], topic: str, partition: int) -> list[OpenTransaction]:
    """The transactions open on `topic[partition]` (DescribeProducers at its leader)."""
    reader = request(leader, _DESCRIBE_PRODUCERS, _one_partition(topic, partition) + _NO_TAGS)
    reader.int32()  # throttle
    found: list[OpenTransaction] = []

    def producer(r: _Reader) -> None:
        producer_id, epoch, _sequence, timestamp, coordinator_epoch, start = (
            r.int64(), r.int32(), r.int32(), r.int64(), r.int32(), r.int64())
        r.tags()
        if start >= 0:
            found.append(OpenTransaction(producer_id, epoch, coordinator_epoch, start, timestamp))

    def partition_(r: _Reader) -> None:
        r.int32()
        error, message = r.int16(), r.string()
        if error:
            raise ProtocolError(f"DescribeProducers: error {error} ({message})")
        r.array(producer)
        r.tags()

    def topic_(r: _Reader) -> None:
        r.string()
        r.array(partition_)
        r.tags()

    reader.array(topic_)
    return found


@dataclass(frozen=True)
class CoordinatorView:
    """What a transaction coordinator holds for a transactional id."""

    transactional_id: str
    state: str
    producer_id: int
    producer_epoch: int
    partitions: frozenset[tuple[str, int]]


def coordinator_views(brokers: list[tuple[str, int]], producer_id: int) -> list[CoordinatorView]:
    """Every coordinator's transaction of `producer_id` (ListTransactions on each broker,
    then DescribeTransactions where it was listed)."""
    views: list[CoordinatorView] = []
    for broker in brokers:
        body = _array([]) + _array([struct.pack(">q", producer_id)]) + _NO_TAGS
        reader = request(broker, _LIST_TRANSACTIONS, body)
        reader.int32()
        error = reader.int16()
        if error:
            raise ProtocolError(f"ListTransactions: error {error}")
        reader.array(lambda r: r.string())  # unknown state filters

        def listed(r: _Reader) -> str:
            transactional_id = r.string()
            r.int64()
            r.string()
            r.tags()
            return transactional_id

        ids = [tid for tid in reader.array(listed) if tid is not None]
        if ids:
            views.extend(_describe_transactions(broker, ids))
    return views


def _describe_transactions(broker: tuple[str, int], transactional_ids: list[str]) -> list[CoordinatorView]:
    reader = request(broker, _DESCRIBE_TRANSACTIONS, _array([_string(t) for t in transactional_ids]) + _NO_TAGS)
    reader.int32()

    def topic_(r: _Reader) -> list[tuple[str, int]]:
        name = r.string() or ""
        partitions = r.array(lambda q: q.int32())
        r.tags()
        return [(name, p) for p in partitions]

    def state(r: _Reader) -> CoordinatorView:
        error, transactional_id, state_ = r.int16(), r.string(), r.string()
        r.int32()  # timeout
        r.int64()  # start time
        producer_id, epoch = r.int64(), r.int16()
        partitions = frozenset(tp for tps in r.array(topic_) for tp in tps)
        r.tags()
        if error:
            raise ProtocolError(f"DescribeTransactions {transactional_id}: error {error}")
        return CoordinatorView(transactional_id or "", state_ or "", producer_id, epoch, partitions)

    return reader.array(state)


def write_abort_marker(leader: tuple[str, int], topic: str, partition: int, open_: OpenTransaction) -> None:
    """End `open_` on `topic[partition]` with an abort marker (WriteTxnMarkers at its leader)."""
    marker = (struct.pack(">qh", open_.producer_id, open_.producer_epoch) + b"\x00"  # abort
              + _one_partition(topic, partition)
              + struct.pack(">i", max(open_.coordinator_epoch, 0)) + _NO_TAGS)
    reader = request(leader, _WRITE_TXN_MARKERS, _array([marker]) + _NO_TAGS)
    errors: list[int] = []

    def partition_(r: _Reader) -> None:
        r.int32()
        errors.append(r.int16())
        r.tags()

    def topic_(r: _Reader) -> None:
        r.string()
        r.array(partition_)
        r.tags()

    def marker_(r: _Reader) -> None:
        r.int64()
        r.array(topic_)
        r.tags()

    reader.array(marker_)
    if not errors or any(errors):
        raise ProtocolError(f"WriteTxnMarkers: errors {errors}")


# -- the decision -----------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    aborted: bool
    description: str


def cluster(bootstrap: str, topic: str, partition: int) -> tuple[tuple[str, int], list[tuple[str, int]]]:
    """The (host, port) of `topic[partition]`'s leader, and of every broker."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 2})
    metadata = admin.list_topics(topic, timeout=_TIMEOUT_S)
    brokers = {b.id: (b.host, b.port) for b in metadata.brokers.values()}
    return brokers[metadata.topics[topic].partitions[partition].leader], sorted(brokers.values())


def abort_if_hanging(bootstrap: str, topic: str, partition: int, stuck_at: int) -> Finding:
    """Abort the transaction that keeps a read_committed reader of `topic[partition]`
    from passing `stuck_at` (the earliest open one starting there or before: a catch-up
    starting past it waits on it just the same) if it is hanging; -> what was found (for
    the logs) and whether it was aborted (counted in the worker's metrics)."""
    try:
        leader, brokers = cluster(bootstrap, topic, partition)
        open_ = [t for t in describe_producers(leader, topic, partition) if t.start_offset <= stuck_at]
        if not open_:
            return Finding(False, f"no transaction open at {topic}[{partition}]@{stuck_at} or before")
        found = min(open_, key=lambda t: t.start_offset)
        what = (f"producer {found.producer_id} (epoch {found.producer_epoch}) has a transaction open at "
                f"{topic}[{partition}]@{found.start_offset}")
        holding = [v for v in coordinator_views(brokers, found.producer_id)
                   if v.state in _UNRESOLVED and (topic, partition) in v.partitions]
        if holding:
            view = holding[0]
            return Finding(False, f"{what}; its coordinator still holds it ({view.transactional_id!r}: "
                                  f"{view.state}, epoch {view.producer_epoch}): left to it")
        write_abort_marker(leader, topic, partition, found)
        metrics.hanging_transactions_aborted.inc()
        return Finding(True, f"{what} that no coordinator will ever end (hanging): aborted it")
    except Exception as error:  # noqa: BLE001 — a broker down, a request unsupported: never abort on doubt
        return Finding(False, f"could not check {topic}[{partition}]@{stuck_at} for a hanging transaction: "
                              f"{type(error).__name__}: {error}")


class StableOffsetWatch:
    """Watches the last stable offsets of a worker's own log partitions: one that stays
    below its high watermark, unmoved, for `after_s` is checked for a hanging transaction
    (`abort_if_hanging`). A catch-up notices one by itself; this is for the partitions a
    worker owns and writes, which it never reads back - yet the gateway's replies and
    every read_committed consumer downstream stop at that offset."""

    def __init__(self, bootstrap: str, topics: tuple[str, ...], after_s: float) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.after_s = after_s
        self._admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 2})
        self._pinned: dict[tuple[str, int], tuple[int, float]] = {}  # -> (stable offset, since)

    def check(self, partitions: list[int]) -> list[tuple[str, int, int, Finding]]:
        """-> (topic, partition, stuck offset, finding) of each partition found pinned."""
        wanted = [TopicPartition(topic, p) for topic in self.topics for p in partitions]
        if not wanted:
            self._pinned.clear()
            return []
        stable = self._offsets(wanted, IsolationLevel.READ_COMMITTED)
        high = self._offsets(wanted, IsolationLevel.READ_UNCOMMITTED)
        now = time.monotonic()
        self._pinned = {key: seen for key, seen in self._pinned.items() if key in stable}
        findings = []
        for key, offset in stable.items():
            if key not in high or offset >= high[key]:
                self._pinned.pop(key, None)
                continue
            seen = self._pinned.get(key)
            if seen is None or seen[0] != offset:
                self._pinned[key] = (offset, now)
            elif now - seen[1] >= self.after_s:
                findings.append((*key, offset, abort_if_hanging(self.bootstrap, key[0], key[1], offset)))
                self._pinned[key] = (offset, now)  # checked again a whole window later
        return findings

    def _offsets(self, wanted: list[TopicPartition], isolation: IsolationLevel) -> dict[tuple[str, int], int]:
        futures = self._admin.list_offsets({tp: OffsetSpec.latest() for tp in wanted},
                                           isolation_level=isolation, request_timeout=_TIMEOUT_S)
        offsets = {}
        for tp, future in futures.items():
            try:
                offsets[(tp.topic, tp.partition)] = future.result().offset
            except Exception:  # noqa: BLE001 — a partition without a leader now: next time
                pass
        return offsets
