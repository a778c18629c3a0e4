"""One partition's writer: its RocksDB store, its transactional producer, its recovery.

A `PartitionProcessor` is the single serial writer of every ledger whose key hashes to its
partition. Everything here is blocking (confluent-kafka and RocksDB calls); the faust
worker runs it in a thread so the event loop keeps serving queries and heartbeats.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from ledger.errors import LedgerError, ValidationError
from ledger.machine import Committed, Rejected, Replayed, execute, project_entry, project_rejection, refuse
from ledger.model import LogEntry
from ledger.state import HEAD, LOG, Head, Overlay
from streams import codecs, metrics
from streams.settings import Settings
from streams.store import PartitionStore, rocksdb_options
from streams.topics import COMMITTED, REJECTED, REPLIES, REQUESTS, partition_for, producer_config

log = logging.getLogger("streamledger.processor")


# Recovery writes its progress to the store every so many records, a record weighing as
# many as its postings (entries carry up to 1000): memory stays bounded, and a crash in the
# middle of a rebuild resumes from the last write.
_REPLAY_COMMIT_WEIGHT = 20_000
_REPLAY_STALL_SECONDS = 60

# The rejection code of a record on ledger.requests that is not a request batch at all.
INVALID_RECORD = "INVALID_RECORD"


class LogForked(Exception):
    """The committed log holds two different entries with one id: an operator must look."""


class Fenced(Exception):
    """Another worker took this partition over (its producer fenced ours): stop writing."""


@dataclass
class BatchResult:
    committed: int = 0
    rejected: int = 0
    replayed: int = 0
    per_ledger: dict[str, list[int]] = field(default_factory=dict)  # ledger -> [applied, rejected]


class PartitionProcessor:
    def __init__(self, settings: Settings, partition: int, clock=time.time) -> None:
        self.settings = settings
        self.partition = partition
        self._clock = clock
        path = Path(settings.data_dir) / settings.app_id / f"partition-{partition:04d}"
        self.store = PartitionStore(
            path, rocksdb_options(settings.rocksdb_block_cache_mb, settings.rocksdb_write_buffer_mb),
            settings.store_cache_entries,
        )
        # Two transactional producers per partition, used in turn: back to back, one
        # producer's next transaction waits for the broker to finish writing the previous
        # one's markers (librdkafka retries CONCURRENT_TRANSACTIONS after ~20 ms); in turn,
        # that wait overlaps the other's transaction. Measured on this broker: p90 commit
        # 22-30 ms with one producer, 3-6 ms with two. Both are fenced and re-initialised
        # together, so they behave as one writer.
        self.transactional_ids = (f"{settings.app_id}-ledger-{partition}", f"{settings.app_id}-ledger-{partition}-b")
        self._producers: tuple[Producer, Producer] | None = None
        self._turn = 0
        self.recovered_entries = 0

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Fence the previous owner, then catch the store up from the log.

        1. init_transactions() with this partition's transactional ids: any producer of a
           previous owner (a zombie) is fenced, and its open transaction aborted.
        2. Read ledger.committed and ledger.rejected (read_committed) from the positions
           the store recorded, and project what the store does not reflect yet.
        Only then does the worker apply new requests of this partition.
        """
        started = time.monotonic()
        self._ensure_producer()
        seconds = time.monotonic() - started
        log.info(
            "partition %d ready: replayed %d log records in %.2fs",
            self.partition, self.recovered_entries, seconds,
            extra={"partition": self.partition, "replayed": self.recovered_entries, "seconds": round(seconds, 3)},
        )

    def close(self) -> None:
        if self._producers is not None:
            for producer in self._producers:
                producer.flush(5)
            self._producers = None
        self.store.close()

    def _new_producer(self, transactional_id: str) -> Producer:
        producer = Producer(producer_config(
            self.settings.bootstrap_servers,
            **{
                "transactional.id": transactional_id,
                "linger.ms": 0,
                "compression.type": "lz4",
                "transaction.timeout.ms": 60_000,
            },
        ))
        producer.init_transactions(30)
        return producer

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> int:
        replayed = 0
        label = str(self.partition)
        metrics.recovering.labels(label).set(1)
        try:
            for topic in (COMMITTED, REJECTED):
                replayed += self._catch_up(topic)
        finally:
            metrics.recovering.labels(label).set(0)
        return replayed

    def _catch_up(self, topic: str) -> int:
        """Replay `topic` from the store's recorded position to its end.

        Progress is written every `_REPLAY_COMMIT_WEIGHT` postings (state and position in
        one write batch, as always), so a rebuild's memory stays bounded and a crash in
        the middle of one resumes where it stopped.
        """
        start = self.store.position(topic) or 0
        consumer = Consumer({
            "bootstrap.servers": self.settings.bootstrap_servers,
            "group.id": f"{self.settings.app_id}-recovery",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "socket.nagle.disable": True,
            # A log entry of a 1000-posting transaction is ~150 KB: bound what librdkafka
            # prefetches and what one consume() call hands over, or a rebuild holds
            # hundreds of megabytes of records at once.
            "queued.max.messages.kbytes": 16 * 1024,
            "fetch.max.bytes": 8 * 1024 * 1024,
        })
        count = 0
        label = str(self.partition)
        try:
            partition = TopicPartition(topic, self.partition)
            low, high = consumer.get_watermark_offsets(partition, timeout=10)
            if high <= start:
                return 0
            consumer.assign([TopicPartition(topic, self.partition, max(start, low))])
            overlay = Overlay(self.store)
            position = start
            pending = 0
            progress_at, last_fetched = time.monotonic(), -1
            while position < high:
                done = False
                for message in consumer.consume(200, timeout=0.05):
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            done = True
                            continue
                        raise KafkaException(error)
                    pending += self._replay_record(overlay, topic, message.value())
                    position = message.offset() + 1
                    count += 1
                if pending >= _REPLAY_COMMIT_WEIGHT:
                    self.store.commit(overlay.writes(), {topic: position})
                    overlay, pending = Overlay(self.store), 0
                    metrics.recovery_replayed.labels(label).set(count)
                    log.info("partition %d: replayed %d records of %s", self.partition, count, topic,
                             extra={"partition": self.partition, "replayed": count, "topic": topic})
                # The end may be a transaction marker, which is never delivered: the
                # consumer's position moves past it, or the partition reports its end.
                fetched = consumer.position([partition])[0].offset
                if done or fetched >= high:
                    # The recorded position stays just past the last record replayed, as
                    # the live path records it, so a rebuilt store equals the live one.
                    break
                now = time.monotonic()
                if fetched != last_fetched:
                    progress_at, last_fetched = now, fetched
                elif now - progress_at > _REPLAY_STALL_SECONDS:
                    # Never hold the partition forever (a revocation waits for us): fail,
                    # and let the caller retry with backoff.
                    raise KafkaException(KafkaError(
                        KafkaError._TIMED_OUT,
                        f"recovery of {topic}[{self.partition}] made no progress for {_REPLAY_STALL_SECONDS}s",
                    ))
            self.store.commit(overlay.writes(), {topic: max(position, start)})
            metrics.recovery_replayed.labels(label).set(count)
        finally:
            consumer.close()
        return count

    def _replay_record(self, overlay: Overlay, topic: str, payload: bytes) -> int:
        """Project one record of the log or of the rejections; -> its weight (postings)."""
        if topic == REJECTED:
            project_rejection(overlay, codecs.decode_rejection(payload))
            return 1
        entry = codecs.decode_log_entry(payload)
        head = overlay.get((HEAD, entry.ledger)) or Head()
        if entry.id > 0 and entry.id <= head.last_log_id:  # type: ignore[union-attr]
            known = overlay.get((LOG, entry.ledger, entry.id))
            if known is not None and known.hash != entry.hash:  # type: ignore[union-attr]
                raise LogForked(
                    f"ledger '{entry.ledger}' has two different entries with id {entry.id} in "
                    f"{COMMITTED}: something else writes this ledger's log (another "
                    "STREAMLEDGER_APP_ID consuming the same ledger.requests?). Refusing to go on."
                )
            return 1  # already reflected
        project_entry(overlay, entry)
        transaction = entry.data.get("transaction")
        return max(1, len(transaction["postings"])) if transaction else 1

    # -- the write path ----------------------------------------------------------------

    def process(self, payloads: list[tuple[int, bytes | None, bytes | None]]) -> BatchResult:
        """Apply a batch of `ledger.requests` record values and emit their outcomes.

        The order of a commit (check crash cases one by one):
          1. apply every request to an in-memory overlay of the store (pure, no I/O
             but store reads);
          2. begin a Kafka transaction; produce log entries to ledger.committed,
             rejections to ledger.rejected, other answers to ledger.replies;
          3. commit the Kafka transaction (flushes; a crash before this aborts it, and
             the requests are redelivered and applied again from the unchanged store);
          4. write the overlay and the new log positions to RocksDB in one write batch
             (a crash before this leaves the store behind the log; recovery replays the
             missing entries from the recorded position);
          5. faust commits the consumer offsets of the requests later (a crash before
             that redelivers requests, which are recognised by request id).
        """
        now = int(self._clock() * 1_000_000)
        decoded = [item for offset, key, value in payloads for item in self._decode(offset, key, value, now)]
        result = BatchResult()
        # Records carry up to thousands of requests each, and requests up to a thousand
        # postings: bound each Kafka transaction (and the overlay's memory) by requests
        # and by postings, not by records.
        chunk: list = []
        postings = 0
        for item in decoded:
            weight = _postings_of(item)
            if chunk and (len(chunk) >= self.settings.batch_requests_max
                          or postings + weight > self.settings.batch_postings_max):
                self._apply_and_commit(chunk, now, result)
                chunk, postings = [], 0
            chunk.append(item)
            postings += weight
        if chunk:
            self._apply_and_commit(chunk, now, result)
        return result

    def _apply_and_commit(self, requests: list, now: int, result: BatchResult) -> None:
        self._ensure_producer()  # before applying: a new producer epoch catches up first
        overlay = Overlay(self.store)
        emissions: list[tuple[str, str, bytes, str]] = []  # topic, ledger, value, request id
        flags = self.settings.numscript_flags
        for request_or_rejection in requests:
            if isinstance(request_or_rejection, Rejected):
                outcome = refuse(overlay, request_or_rejection)
            else:
                outcome = execute(overlay, request_or_rejection, now, flags)
            emissions.append(self._emission(overlay, outcome, result))
        positions = self._emit(emissions)
        self.store.commit(overlay.writes(), positions)

    def _emission(self, overlay: Overlay, outcome, result: BatchResult) -> tuple[str, str, bytes, str]:
        if isinstance(outcome, Replayed):
            result.replayed += 1
            kind = codecs.REPLY_IDEMPOTENCY_HIT if outcome.idempotency_hit else codecs.REPLY_REDELIVERED
            value = codecs.encode_reply(outcome.request_id, outcome.ledger, kind, self._original(overlay, outcome))
            return REPLIES, outcome.ledger, value, outcome.request_id
        if outcome.dry_run:
            original = outcome.entry if isinstance(outcome, Committed) else outcome
            ledger = _ledger_of(outcome)
            value = codecs.encode_reply(outcome.request_id, ledger, codecs.REPLY_DRY_RUN, original)
            return REPLIES, ledger, value, outcome.request_id
        counts = result.per_ledger.setdefault(_ledger_of(outcome), [0, 0])
        if isinstance(outcome, Committed):
            result.committed += 1
            counts[0] += 1
            return COMMITTED, outcome.entry.ledger, codecs.encode_log_entry(outcome.entry), outcome.request_id
        result.rejected += 1
        counts[1] += 1
        return REJECTED, outcome.ledger, codecs.encode_rejection(outcome), outcome.request_id

    @staticmethod
    def _original(overlay: Overlay, replayed: Replayed) -> LogEntry | Rejected:
        record = replayed.original
        if record.log_id is not None:
            entry = overlay.get((LOG, record.ledger, record.log_id))
            assert isinstance(entry, LogEntry), f"log entry {record.ledger}/{record.log_id} missing"
            return entry
        return Rejected(replayed.request_id, record.ledger, record.code or "INTERNAL",
                        record.message or "", record.details or {}, record.date)

    def _decode(self, offset: int, key: bytes | None, payload: bytes | None, now: int) -> list:
        """Requests of one record; a record that is not a request batch becomes one
        rejection named after its position (it has no request id of its own), so the
        producer can find it, and a redelivery of it is recognised like any request."""
        try:
            records = codecs.decode_requests(payload)  # type: ignore[arg-type]
        except codecs.CodecError as error:
            log.warning("partition %d offset %d: not a request batch: %s", self.partition, offset, error)
            ledger = (key or b"").decode("utf-8", errors="replace")
            return [Rejected(
                f"{REQUESTS}/{self.partition}/{offset}", ledger, INVALID_RECORD,
                f"record at {REQUESTS} partition {self.partition} offset {offset} is not a "
                f"RequestBatch in Avro single-object encoding: {error}",
                {"partition": self.partition, "offset": offset}, now,
            )]
        decoded: list = []
        for record in records:
            try:
                owner = _partition_of(record["ledger"], self.settings.partitions)
                if owner != self.partition:
                    raise ValidationError(
                        f"request for ledger '{record['ledger']}' arrived on partition "
                        f"{self.partition}, but the ledger belongs to partition {owner}: "
                        "producers must key by ledger name with the murmur2 partitioner"
                    )
                decoded.append(codecs.request_from_record(record))
            except LedgerError as error:
                decoded.append(Rejected(
                    record["request_id"], record["ledger"], error.code, error.message,
                    {}, now,
                ))
        return decoded

    def _emit(self, emissions: list[tuple[str, str, bytes, str]]) -> dict[str, int]:
        """Produce the batch's records in one Kafka transaction; -> next offset per topic."""
        if not emissions:
            return {}
        assert self._producers is not None, "a batch is applied only with caught-up producers"
        producer = self._producers[self._turn]
        self._turn ^= 1
        offsets: dict[str, int] = {}

        def delivered(error, message) -> None:
            if error is None:
                topic = message.topic()
                offsets[topic] = max(offsets.get(topic, 0), message.offset() + 1)

        try:
            producer.begin_transaction()
            for topic, ledger, value, request_id in emissions:
                record = dict(topic=topic, value=value, key=ledger.encode(), partition=self.partition,
                              on_delivery=delivered, headers=[("request_id", request_id.encode())])
                try:
                    producer.produce(**record)
                except BufferError:  # the local queue is full: let deliveries drain, retry
                    producer.poll(0.1)
                    producer.produce(**record)
            producer.commit_transaction(60)  # flushes, and serves the delivery callbacks
            producer.poll(0)
        except KafkaException as exception:
            error = exception.args[0] if exception.args else None
            if isinstance(error, KafkaError) and error.fatal():
                # Fenced: a newer owner initialised our transactional ids. Re-initialising
                # would fence it back (two zombies fighting), so this processor stops here.
                self._producers = None
                raise Fenced(f"partition {self.partition}: {error}") from exception
            # Anything else (a timeout, a broker restart, an abortable error): this batch
            # is not in the log. Abort, start over with a new producer (a late commit or
            # abort of the old transaction must not land on a later one), and let the
            # caller retry the batch from the unchanged store.
            self._reset_producers(producer)
            raise
        offsets.pop(REPLIES, None)  # replies are not replayed: no position to keep
        return offsets

    def _reset_producers(self, failed: Producer) -> None:
        """Abort the open transaction and drop both producers; new ones are created (and
        the store caught up) lazily by the next batch, so a broker that is down makes the
        retry wait, not this call."""
        self._producers = None
        try:
            failed.abort_transaction(10)
        except KafkaException as error:
            log.warning("partition %d: abort failed (%s); re-initialising", self.partition, error)

    def _ensure_producer(self) -> None:
        """The partition's producers; new ones fence every older one, and then the store
        catches up from the log before anything is applied.

        The invariant that keeps the log gapless under zombies: each producer epoch writes
        only after reading everything committed before it was initialised. A previous
        owner (or this worker's own producers before a reset) can commit nothing after
        that initialisation, so what we apply starts from the log's true head. A stale
        worker that re-initialises may steal the partition back for a moment, but it too
        catches up first: the cost is availability, never a fork. Both transactional ids
        are always initialised together: an owner holding either could still commit.
        """
        if self._producers is None:
            producers = tuple(self._new_producer(tid) for tid in self.transactional_ids)
            self.recovered_entries = self.recover()
            self._producers = producers  # type: ignore[assignment]
            self._turn = 0


def _postings_of(item) -> int:
    command = getattr(item, "command", None)
    postings = getattr(command, "postings", None)
    return len(postings) if postings else 1


@lru_cache(maxsize=65_536)
def _partition_of(ledger: str, partitions: int) -> int:
    return partition_for(ledger.encode(), partitions)


def _ledger_of(outcome: Committed | Rejected) -> str:
    return outcome.entry.ledger if isinstance(outcome, Committed) else outcome.ledger
