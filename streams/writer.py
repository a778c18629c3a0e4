"""The worker's transactional writer: one Kafka transaction per round of applied requests.

Every round (the requests of one take of the consumer, across all the partitions it
touched) is published in ONE transaction: the outcomes (log entries, rejections, replies)
*and* the consumer offsets of the requests they answer (`send_offsets_to_transaction`).
That is Kafka's exactly-once consume-transform-produce (KIP-447, "EOS v2"): a request's
outcome and its offset commit land together or not at all.

Fencing. A worker that lost partitions in a rebalance but does not know yet (a zombie:
paused, cut off) must not append to their logs. The offsets in its transaction carry the
consumer group generation and member id it consumed under (`group_metadata`); the group
coordinator refuses them once the group moved on (UNKNOWN_MEMBER_ID, ILLEGAL_GENERATION,
REBALANCE_IN_PROGRESS), and the whole transaction aborts. Records are flushed to the
partition leaders *before* the offsets are sent, so a transaction whose offsets were
accepted is already visible as open on every partition it writes: the new owner, which
catches its store up to the high watermark (read_committed), waits for it to be resolved
before it applies anything (see `PartitionProcessor._catch_up`). The transactional id is
the worker's own (`STREAMLEDGER_WORKER_ID`), so a restarted worker aborts what its
previous incarnation left open; a crashed worker's open transaction is aborted by the
broker after `transaction.timeout.ms`.

Measured on the 2-core box (bench/throughput.py, docs in README): one transaction for all
partitions of a take costs ~1.7 ms of client CPU against ~1.15 ms *per partition* with a
transaction per partition, which is what bounded the worker at low rates.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from ledger import limits
from streams.logs import exit_process
from streams.topics import REPLIES, REQUESTS, producer_config

log = logging.getLogger("streamledger.writer")

# What the group coordinator answers a transaction of a member it no longer knows in that
# generation: the partitions may have moved, so the transaction must not commit.
_GROUP_MOVED = frozenset({
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.FENCED_INSTANCE_ID,
})

# librdkafka 2.16 can block in send_offsets_to_transaction forever (its own timeout
# ignored) after the broker restarted ungracefully: AddOffsetsToTxn succeeds, the
# TxnOffsetCommit is never sent. A new producer works. So the call runs in a helper thread
# bounded by this; when it does not return, the producer is abandoned (never touched or
# freed again: its thread is still inside it) and new ones fence it.
_SEND_OFFSETS_TIMEOUT_S = 10.0

# A transaction that has not ended after this long is stuck somewhere no timeout reaches
# (every call in it is bounded well below): the worker exits, so its partitions move to a
# live worker and a restart fences what it left open. faust's max.poll.interval does not
# cover rounds, which run beside its consumer.
_STUCK_TRANSACTION_S = 180.0

# A transaction open longer than this is aborted by the broker: it bounds how long a new
# owner waits for the transaction of a worker that died in the middle of one.
TRANSACTION_TIMEOUT_MS = 15_000


class GroupMoved(Exception):
    """The consumer group has a newer generation: this round's transaction was aborted and
    its requests will be redelivered to whoever owns their partitions now."""


class Fenced(Exception):
    """Another process initialised this worker's transactional id: two workers run with
    one STREAMLEDGER_WORKER_ID, or this one is a zombie. It must stop writing."""


class _Abandoned(Exception):
    pass


def group_metadata(group_id: str, generation: int, member_id: str, instance_id: str | None = None) -> bytes:
    """librdkafka's serialised consumer group metadata (`rd_kafka_consumer_group_metadata_write`,
    format "CGMDv2"), built from the generation of faust's own (aiokafka) consumer, so the
    transaction's offsets are checked against the group that assigned the partitions."""
    head = b"CGMDv2:" + struct.pack("=i", generation) + group_id.encode() + b"\0" + member_id.encode() + b"\0"
    return head + (b"\x01" if instance_id is None else b"\x00" + instance_id.encode() + b"\0")


@dataclass(slots=True)
class Emission:
    topic: str
    partition: int
    key: bytes
    value: bytes
    request_id: str


def _native_kafka():
    """The native module's binding to confluent-kafka's librdkafka, or None."""
    try:
        import streamledger_native
    except ImportError:
        return None
    try:
        return streamledger_native.Kafka()
    except (RuntimeError, AttributeError) as error:  # (AttributeError: a build without it)
        log.warning("%s; producing through Producer.produce", error)
        return None


class Writer:
    """Two transactional producers of one worker, used in turn.

    Back to back, a producer's next transaction waits for the broker to finish writing the
    previous one's markers (librdkafka retries CONCURRENT_TRANSACTIONS after ~20 ms); in
    turn, that wait overlaps the other's transaction. Both ids are initialised together
    (each fences its own previous incarnation), so they act as one writer.

    `epoch` grows each time the producers are (re)created: a partition must catch its store
    up from the log after the epoch it last caught up in, before it applies (the outcome of
    a transaction that failed midway is only known from the log).
    """

    def __init__(self, bootstrap: str, transactional_id: str, native_produce: bool = True) -> None:
        self.bootstrap = bootstrap
        # Native rounds' records handed to librdkafka from Rust (`native/src/kafka.rs`), or
        # None: each one through Producer.produce.
        self._kafka = _native_kafka() if native_produce else None
        self.transactional_ids = (f"{transactional_id}-a", f"{transactional_id}-b")
        self._producers: tuple[Producer, Producer] | None = None
        self._turn = 0
        self.epoch = 0
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="send-offsets")
        self._abandoned: list[Producer] = []  # stuck in librdkafka: kept alive, never used
        self._began: float | None = None  # perf_counter() when the open transaction began
        # Seconds spent in the last transaction's steps: produce, flush, offsets, commit.
        self.timings: dict[str, float] = {}
        self._watchdog: threading.Thread | None = None

    def ensure(self) -> int:
        """Create (and initialise) the producers if needed; -> the current epoch."""
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="txn-watchdog", daemon=True)
            self._watchdog.start()
        if self._producers is None:
            self._producers = tuple(self._new_producer(tid) for tid in self.transactional_ids)  # type: ignore[assignment]
            self._turn = 0
            self.epoch += 1
        return self.epoch

    def _new_producer(self, transactional_id: str) -> Producer:
        producer = Producer(producer_config(
            self.bootstrap,
            **{
                "transactional.id": transactional_id,
                "linger.ms": 0,
                "compression.type": "lz4",
                "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
                # A log entry may outgrow Kafka's default 1 MB (see TOPIC_CONFIGS).
                "message.max.bytes": limits.log_record_bytes_max,
            },
        ))
        try:
            producer.init_transactions(30)
        except KafkaException:
            producer.flush(0)
            raise
        if self._kafka is not None:
            try:
                self._kafka.check(producer)
            except RuntimeError as error:
                log.warning("%s; producing through Producer.produce", error)
                self._kafka = None
        return producer

    def commit(self, emissions: list[Emission] | Iterable, offsets: dict[int, int],
               metadata: bytes, before_flush: Callable[[], None] | None = None) -> dict[tuple[str, int], int]:
        """Publish `emissions` and commit the request `offsets` ({partition: next offset})
        in one transaction; -> the next offset of every (topic, partition) written.

        `emissions` is a list, or an iterable of lists or native rounds (which hand their
        records to librdkafka themselves) pulled while the transaction is open: the worker
        applies a round partition by partition as the writer asks, so the broker takes in
        one partition's records while the next is applied. An exception
        raised by the iterable aborts the transaction and propagates. `before_flush` runs
        once every record is handed to librdkafka, while they travel to the broker (the
        worker writes the previous round's store then); an exception from it aborts too.

        Raises GroupMoved (aborted: the group moved on), Fenced (stop), or KafkaException
        (aborted, producers dropped: the caller catches up and retries).
        """
        assert self._producers is not None, "ensure() first"
        producer = self._producers[self._turn]
        self._turn ^= 1
        written: dict[tuple[str, int], int] = {}

        def delivered(error, message) -> None:
            if error is None:
                written[(message.topic(), message.partition())] = message.offset() + 1

        chunks = [emissions] if isinstance(emissions, list) else emissions
        self._began = started = time.perf_counter()
        timings = self.timings = {}
        try:
            producer.begin_transaction()
            for chunk in chunks:
                if not isinstance(chunk, list):  # a native round
                    if self._kafka is not None:
                        self._produce_native(producer, chunk)
                        chunk = chunk.last_emissions()
                    else:
                        chunk = chunk.emissions
                self._produce(producer, chunk, delivered)
            timings["produce"] = (mark := time.perf_counter()) - started
            if before_flush is not None:
                before_flush()
                timings["before_flush"] = -mark + (mark := time.perf_counter())
            # Every record on its partition leader before the offsets go: see the module doc.
            remaining = producer.flush(30)
            if remaining:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"{remaining} records not delivered"))
            timings["flush"] = -mark + (mark := time.perf_counter())
            if offsets:
                self._send_offsets(producer, [TopicPartition(REQUESTS, p, o) for p, o in offsets.items()], metadata)
            timings["offsets"] = -mark + (mark := time.perf_counter())
            producer.commit_transaction(30)
            timings["commit"] = time.perf_counter() - mark
        except _Abandoned:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "send_offsets_to_transaction hung")) from None
        except KafkaException as exception:
            error = exception.args[0] if exception.args else None
            if isinstance(error, KafkaError) and error.fatal():
                self._producers = None
                raise Fenced(str(error)) from exception
            if isinstance(error, KafkaError) and error.code() in _GROUP_MOVED:
                self._abort(producer)
                raise GroupMoved(str(error)) from exception
            # A timeout, a broker restart: this round is not in the log, or its outcome is
            # unknown. Abort, drop the producers (a late commit or abort of the old
            # transaction must not land on a later one), and let the caller catch up and
            # retry with new ones.
            self._abort(producer)
            self._producers = None
            raise
        except Exception:  # from `emissions` (applying a round): nothing of it may commit
            self._abort(producer)
            raise
        finally:
            self._began = None
        return {key: offset for key, offset in written.items() if key[0] != REPLIES}

    @staticmethod
    def _produce(producer: Producer, emissions: list[Emission], delivered) -> None:
        # The offsets written are what the stores record: the last record of each (topic,
        # partition) tells them (a partition's records are acknowledged in order), so only
        # those carry a delivery callback (~2 us less per record).
        produce = producer.produce
        last_indexes = set({(e.topic, e.partition): i for i, e in enumerate(emissions)}.values())
        for i, e in enumerate(emissions):
            callback = delivered if i in last_indexes else None
            headers = [("request_id", e.request_id.encode())]
            try:
                produce(e.topic, e.value, e.key, e.partition, on_delivery=callback, headers=headers)
            except BufferError:  # the local queue is full: let deliveries drain, retry
                producer.poll(0.1)
                produce(e.topic, e.value, e.key, e.partition, on_delivery=callback, headers=headers)

    def _produce_native(self, producer: Producer, round_) -> None:
        """Every record of a native round but the last of each topic, from Rust; the lasts
        are the caller's (`Round.last_emissions`), with a delivery callback."""
        at = 0
        while True:
            at, error = round_.produce(self._kafka, producer, at)
            if error is None:
                return
            code, text = error
            if code != KafkaError._QUEUE_FULL:
                raise KafkaException(KafkaError(code, text))
            producer.poll(0.1)  # the local queue is full: let deliveries drain, go on

    def _watch(self) -> None:
        while True:
            time.sleep(5)
            began = self._began
            if began is not None and time.perf_counter() - began > _STUCK_TRANSACTION_S:
                exit_process(log, "a Kafka transaction has not ended after %.0fs; exiting so the partitions "
                             "move on (a restart fences it)", _STUCK_TRANSACTION_S)

    def _send_offsets(self, producer: Producer, offsets: list[TopicPartition], metadata: bytes) -> None:
        future = self._helper.submit(producer.send_offsets_to_transaction, offsets, metadata, _SEND_OFFSETS_TIMEOUT_S)
        try:
            future.result(_SEND_OFFSETS_TIMEOUT_S + 5)
        except FutureTimeout:
            log.warning("send_offsets_to_transaction did not return in %.0fs: abandoning the producer "
                        "(a librdkafka hang after a broker restart); new producers fence it",
                        _SEND_OFFSETS_TIMEOUT_S + 5)
            self._abandoned.extend(self._producers or ())
            self._producers = None
            self._helper.shutdown(wait=False)
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="send-offsets")
            raise _Abandoned() from None

    @staticmethod
    def _abort(producer: Producer) -> None:
        try:
            producer.abort_transaction(10)
        except KafkaException as error:
            log.warning("abort failed (%s)", error)

    def close(self) -> None:
        if self._producers is not None:
            for producer in self._producers:
                producer.flush(5)
            self._producers = None
        self._helper.shutdown(wait=False)
