"""One partition's state: its RocksDB store, its recovery, and applying its requests.

A `PartitionProcessor` is the single serial writer of every ledger whose key hashes to its
partition. It applies a batch of request records to an overlay of its store and hands back
the outcomes to publish; the worker publishes the outcomes of every partition of a round
in one Kafka transaction (`streams/writer.py`) and only then writes each overlay to its
store, with the log positions it reflects. Everything here is blocking (RocksDB and
confluent-kafka calls); the faust worker runs it in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from ledger.errors import LedgerError, ValidationError
from ledger.machine import Committed, Rejected, Replayed, execute, project_entry, project_rejection, refuse
from ledger.model import LogEntry
from ledger.state import HEAD, LOG, Head, Overlay
from streams import codecs, hanging, metrics
from streams.settings import Settings
from streams.store import PartitionStore, rocksdb_options
from streams.topics import COMMITTED, REJECTED, REPLIES, REQUESTS, partition_for
from streams.writer import Emission

try:  # the native fast path, built from native/ by `make install` (needs cargo)
    import streamledger_native
except ImportError:  # pragma: no cover - every request then takes the Python path
    streamledger_native = None

log = logging.getLogger("streamledger.processor")


# Recovery writes its progress to the store every so many records, a record weighing as
# many as its postings (entries carry up to 1000): memory stays bounded, and a crash in the
# middle of a rebuild resumes from the last write.
_REPLAY_COMMIT_WEIGHT = 10_000
# Partitions catching up at once in one worker: one. Replay is Python-bound (one core under
# the GIL), so several at once only contend, while each holds an overlay and a fetch queue.
# Measured rebuilding 1M accounts (bench/recovery.py): 4 at once 33.6 s / 1,578 MiB peak
# RSS; 2 at once 38.0 s / 973 MiB; 1 at a time 26.1 s / 739 MiB.
_RECOVERIES = threading.BoundedSemaphore(1)
# Recovery gives up (and is retried) when the log's end does not come closer for this long:
# e.g. a transaction of a dead worker stays open until the broker aborts it (15 s). A
# transaction still open after STREAMLEDGER_HANGING_TRANSACTION_S is checked for hanging
# (`streams.hanging`) before that.
_REPLAY_STALL_SECONDS = 60


class CatchUpCancelled(Exception):
    """The partition was released (revoked, the worker closing) while it caught up."""


# The rejection code of a record on ledger.requests that is not a request batch at all.
INVALID_RECORD = "INVALID_RECORD"


class LogForked(Exception):
    """The committed log holds two different entries with one id: an operator must look."""


@dataclass
class BatchResult:
    committed: int = 0
    rejected: int = 0
    replayed: int = 0
    per_ledger: dict[str, list[int]] = field(default_factory=dict)  # ledger -> [applied, rejected]

    @property
    def requests(self) -> int:
        return self.committed + self.rejected + self.replayed

    def add(self, other: "BatchResult") -> None:
        self.committed += other.committed
        self.rejected += other.rejected
        self.replayed += other.replayed
        for ledger, (applied, rejected) in other.per_ledger.items():
            counts = self.per_ledger.setdefault(ledger, [0, 0])
            counts[0] += applied
            counts[1] += rejected


@dataclass
class Applied:
    """One partition's share of a round: its state changes (an overlay of the Python path,
    or a round of the native one) and what to publish (its `Emission`s, or the native
    round, which produces its own: `Writer.commit`)."""

    partition: int
    overlay: "Overlay | streamledger_native.Round"
    outcomes: "list[Emission] | streamledger_native.Round"
    result: BatchResult

    @property
    def emissions(self) -> list[Emission]:
        return self.outcomes if isinstance(self.outcomes, list) else self.outcomes.emissions


# A quiet partition's store is flushed at most this often (`flush_store`).
QUIET_FLUSH_EVERY_S = 1.0


class PartitionProcessor:
    def __init__(self, settings: Settings, partition: int) -> None:
        self.settings = settings
        self.partition = partition
        path = Path(settings.data_dir) / settings.app_id / f"partition-{partition:04d}"
        self.store = PartitionStore(
            path, rocksdb_options(settings.rocksdb_block_cache_mb, settings.rocksdb_write_buffer_mb, settings.native_store),
            settings.store_cache_entries,
        )
        self.engine = native_engine(settings, partition)
        # A committed native round whose writes wait to go to the store (`write_unstored`),
        # with the log positions they reflect; the lock orders its write with a query's or
        # a close's, which may come from another thread.
        self._unstored: tuple[object, dict[str, int]] | None = None
        # The round last handed to the store, whose write may still be in flight (a native
        # store writes on a thread of its own): the engine forgets its values once it
        # landed (`_settle_locked`).
        self._storing: object | None = None
        # Held around every call into the engine too: a query's thread may write the round
        # (`stored`) while a round's thread is inside the engine (PyO3 borrows).
        self._unstored_lock = threading.RLock()
        self._closed = False
        self._flushed_at = float("-inf")  # when `flush_store` last persisted the memtables
        self.recovered_entries = 0
        self._cancelled: threading.Event | None = None  # set: stop catching up (see `open`)
        # The writer epoch this store last caught up in (see `Writer.epoch`).
        self.epoch = 0
        # The high watermark each topic was last caught up to: the same high again means
        # nothing was logged since (a transactional partition ends with a marker, so its
        # high stays above the recorded position even when everything was replayed).
        self._reached: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------

    def open(self, epoch: int = 0, cancelled: threading.Event | None = None) -> None:
        """Catch the store up from the log before anything is applied.

        Reads ledger.committed and ledger.rejected (read_committed) from the positions the
        store recorded to their high watermarks, and projects what the store does not
        reflect yet; a transaction still open on them (a previous owner's) is waited for.
        Raises CatchUpCancelled soon after `cancelled` is set: a revocation waits for the
        partition, and with it the whole group's rebalance.
        """
        started = time.monotonic()
        self._cancelled = cancelled
        try:
            self.catch_up(epoch)
        finally:
            self._cancelled = None
        seconds = time.monotonic() - started
        log.info(
            "partition %d ready: replayed %d log records in %.2fs",
            self.partition, self.recovered_entries, seconds,
            extra={"partition": self.partition, "replayed": self.recovered_entries, "seconds": round(seconds, 3)},
        )

    def catch_up(self, epoch: int) -> None:
        self.recovered_entries = self.recover()
        self.epoch = epoch

    def close(self) -> None:
        with self._unstored_lock:
            if self._closed:
                return
            self._write_unstored_locked()
            self._closed = True
            self.store.close()

    def flush_store(self, every: float = QUIET_FLUSH_EVERY_S) -> None:
        """The partition is quiet: persist its store's memtables (the store keeps no
        write-ahead log, see streams/store.py), at most once per `every` seconds, so that a
        crash after a burst replays nothing of it, without a file per request when
        requests trickle in."""
        with self._unstored_lock:
            if self._closed:
                return
            self._write_unstored_locked()
            now = time.monotonic()
            if self.store.unflushed and now - self._flushed_at >= every:
                self.store.flush()
                self._flushed_at = now

    @property
    def has_unstored(self) -> bool:
        return self._unstored is not None or self._storing is not None

    def write_unstored(self, wait: bool = True) -> None:
        """Write the last committed native round to the store, if it is not there yet;
        `wait=False`: hand it to the store, whose write may go on meanwhile.

        `commit` leaves a native round's writes for later: the worker hands them to the
        store while the next round's records are on their way to the broker
        (`Writer.commit`'s `before_flush`), or when no round follows, instead of between
        two rounds; a native store writes them on a thread of its own while the worker
        goes on. Until they landed the engine answers from its cache for them. Anything
        else that reads or writes the store directly (the Python path, a catch-up, a query,
        closing) waits for them first. A crash before they landed leaves the store behind
        the log, as a crash right after a commit always could: recovery replays the rest
        from the recorded positions.
        """
        if self._unstored is not None or (wait and self._storing is not None):
            with self._unstored_lock:
                self._write_unstored_locked(wait)

    def _write_unstored_locked(self, wait: bool = True) -> None:
        if self._unstored is not None:
            round_, positions = self._unstored
            self._settle_locked()  # rounds land in order (positions only move forward)
            self.store.commit_native(round_, positions)
            self._unstored = None
            self._storing = round_
        if wait:
            self._settle_locked()

    def _settle_locked(self) -> None:
        if self._storing is not None:
            round_, self._storing = self._storing, None
            self.store.wait()
            self.engine.stored(round_)  # type: ignore[union-attr]

    # -- recovery ----------------------------------------------------------------------

    def recover(self, watermarks: dict[str, tuple[int, int]] | None = None) -> int:
        """Catch up from the log; -> records replayed. `watermarks` ({topic: (low, high)},
        read_uncommitted) may come from the caller's own probe (warm standbys probe every
        partition with one consumer); otherwise they are probed here."""
        self.write_unstored()
        if watermarks is None:
            probe = watermark_probe(self.settings)
            try:
                watermarks = log_watermarks(probe, self.partition)
            finally:
                probe.close()
        # A topic whose high is the one last caught up to logged nothing since: not read.
        moved = [topic for topic in (COMMITTED, REJECTED) if watermarks[topic][1] != self._reached.get(topic)]
        if not moved:
            return 0
        replayed = 0
        label = str(self.partition)
        metrics.recovering.labels(label).set(1)
        try:
            while not _RECOVERIES.acquire(timeout=0.1):  # (one at a time: see _RECOVERIES)
                self._check_cancelled()
            try:
                for topic in moved:
                    replayed += self._catch_up(topic, *watermarks[topic])
            finally:
                _RECOVERIES.release()
        finally:
            metrics.recovering.labels(label).set(0)
        return replayed

    def _check_cancelled(self) -> None:
        if self._cancelled is not None and self._cancelled.is_set():
            raise CatchUpCancelled(f"partition {self.partition} released while catching up")

    def _catch_up(self, topic: str, low: int, high: int) -> int:
        """Replay `topic` from the store's recorded position to its high watermark.

        The end is the high watermark (read_uncommitted), not the last stable offset: a
        transaction still open on the partition (a previous owner's, whose offsets the
        group may have accepted) is waited for until it commits (its entries are replayed)
        or aborts, so nothing committed after this catch-up can precede what we apply.
        Progress is written every `_REPLAY_COMMIT_WEIGHT` postings (state and position in
        one write batch, as always), so a rebuild's memory stays bounded and a crash in
        the middle of one resumes where it stopped.
        """
        start = self.store.position(topic) or 0
        partition = TopicPartition(topic, self.partition)
        if high <= start:
            return 0
        consumer = Consumer({
            **_consumer_common(self.settings),
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            # A log entry of a 1000-posting transaction is ~150 KB: bound what librdkafka
            # prefetches and what one consume() call hands over, or a rebuild holds
            # hundreds of megabytes of records at once.
            "queued.max.messages.kbytes": 16 * 1024,
            "fetch.max.bytes": 8 * 1024 * 1024,
        })
        count = 0
        label = str(self.partition)
        try:
            consumer.assign([TopicPartition(topic, self.partition, max(start, low))])
            overlay = Overlay(self.store)
            position = start
            pending = 0
            progress_at, last_fetched = time.monotonic(), -1
            checked_at: set[int] = set()  # where it was checked for a hanging transaction
            check_after = min(self.settings.hanging_transaction_s, _REPLAY_STALL_SECONDS / 2)
            finding: hanging.Finding | None = None
            while True:
                self._check_cancelled()
                for message in consumer.consume(200, timeout=0.05):
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise KafkaException(error)
                    pending += self._replay_record(overlay, topic, message.value())
                    position = message.offset() + 1
                    count += 1
                if pending >= _REPLAY_COMMIT_WEIGHT:
                    self._commit_overlay(overlay, {topic: position})
                    overlay, pending = Overlay(self.store), 0
                    metrics.recovery_replayed.labels(label).set(count)
                    log.info("partition %d: replayed %d records of %s", self.partition, count, topic,
                             extra={"partition": self.partition, "replayed": count, "topic": topic})
                # The end may be a transaction marker, which is never delivered: the
                # consumer's position moves past it once the transaction is resolved.
                fetched = consumer.position([partition])[0].offset
                if position >= high or fetched >= high:
                    # The recorded position stays just past the last record replayed, as
                    # the live path records it, so a rebuilt store equals the live one.
                    break
                now = time.monotonic()
                if fetched != last_fetched:
                    progress_at, last_fetched = now, fetched
                    continue
                at = fetched if fetched >= 0 else max(start, low)  # (nothing fetched yet: no position)
                if now - progress_at > check_after and at not in checked_at:
                    # A transaction that no coordinator will ever end (seen once in the
                    # crash test after a kill -9 of the broker) holds the partition forever:
                    # abort it if it is one, as `kafka-transactions.sh abort` would. Once
                    # per offset: one its coordinator holds is waited for, as before.
                    checked_at.add(at)
                    finding = hanging.abort_if_hanging(self.settings.bootstrap_servers, topic, self.partition, at)
                    log.warning("partition %d: %s", self.partition, finding.description,
                                extra={"partition": self.partition, "topic": topic, "at": at,
                                       "aborted": finding.aborted})
                    if finding.aborted:
                        progress_at = time.monotonic()
                        continue
                if now - progress_at > _REPLAY_STALL_SECONDS:
                    # Never hold the partition forever (a revocation waits for us): fail,
                    # and let the caller retry with backoff.
                    raise KafkaException(KafkaError(
                        KafkaError._TIMED_OUT,
                        f"recovery of {topic}[{self.partition}] made no progress for {_REPLAY_STALL_SECONDS}s "
                        f"(at {fetched}, end {high}): {finding.description if finding else 'not checked'}",
                    ))
            self._commit_overlay(overlay, {topic: max(position, start)})
            metrics.recovery_replayed.labels(label).set(count)
            self._reached[topic] = high
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

    def decode(self, payloads: list[tuple[int, bytes | None, bytes | None]], now: int) -> list[tuple[int, list]]:
        """(offset, requests or refusals) of each request record, in order; a record of
        simple transfers only is kept whole for the native path (a `Batch`)."""
        engine = self.engine
        decoded = []
        for offset, key, value in payloads:
            if engine is None:
                batch = None
            else:
                with self._unstored_lock:  # never beside `stored` from a query's thread
                    batch = engine.decode(key, value)
            decoded.append((offset, batch if batch is not None else self._decode(offset, key, value, now)))
        return decoded

    def apply(self, records: list[tuple[int, list]], now: int) -> Applied:
        """Apply a round's request records of this partition to an overlay of the store.

        Pure but for store reads. The worker then, in this order (check crash cases one
        by one):
          1. publishes the outcomes of every partition of the round, with the requests'
             offsets, in one Kafka transaction (a crash before its commit aborts it; the
             requests are redelivered and applied again from the unchanged store);
          2. writes each overlay and the log positions it reflects to RocksDB in one write
             batch (`commit`; a crash before this leaves the store behind the log, and
             recovery replays the missing entries from the recorded position).
        A request redelivered anyway (its offset commit lost in a rebalance, or produced
        twice) is recognised by its request id and answered with its first outcome.

        A round whose records were all decoded as simple transfers goes to the native
        engine, which applies all of it (same outcomes, same store bytes) or none of it;
        none, and anything else, is applied here.
        """
        path = "python"
        if self.engine is not None and all(type(items) is _Batch for _offset, items in records):
            with self._unstored_lock:
                round_ = self.engine.apply([items for _offset, items in records], now, self.store.reader)
            if round_ is not None:
                metrics.partition_rounds.labels("native").inc()
                result = BatchResult(round_.committed, round_.rejected, 0, round_.per_ledger)
                return Applied(self.partition, round_, round_, result)
            path = "fallback"
        metrics.partition_rounds.labels(path).inc()
        self.write_unstored()  # the Python path reads the store
        if self.engine is not None:  # some or all of it takes the Python path
            records = [(offset, self._decode(offset, items.key, items.payload, now) if type(items) is _Batch else items)
                       for offset, items in records]
        overlay = Overlay(self.store)
        result = BatchResult()
        emissions: list[Emission] = []
        flags = self.settings.numscript_flags
        for _offset, items in records:
            for request_or_rejection in items:
                if isinstance(request_or_rejection, Rejected):
                    outcome = refuse(overlay, request_or_rejection)
                else:
                    outcome = execute(overlay, request_or_rejection, now, flags)
                emissions.append(self._emission(overlay, outcome, result))
        return Applied(self.partition, overlay, emissions, result)

    def commit(self, applied: Applied, written: dict[tuple[str, int], int]) -> None:
        """Write a round's overlay once its transaction committed, with the positions of
        ledger.committed / ledger.rejected it reflects."""
        positions = {topic: written[(topic, self.partition)]
                     for topic in (COMMITTED, REJECTED) if (topic, self.partition) in written}
        with self._unstored_lock:
            # The previous round's first (positions only move forward); handed over, not
            # waited for, unless the Python path writes next.
            self._write_unstored_locked(wait=isinstance(applied.overlay, Overlay))
            if isinstance(applied.overlay, Overlay):
                self._commit_overlay(applied.overlay, positions)
            else:
                self._unstored = (applied.overlay, positions)
                if not self.engine.commit(applied.overlay):  # type: ignore[union-attr]
                    self._write_unstored_locked()  # the engine no longer holds its values: now

    def _commit_overlay(self, overlay: Overlay, positions: dict[str, int]) -> None:
        """Write what the Python path applied; the native path's values are then stale.
        (Its callers waited for the native rounds' writes first: `commit`, `recover`.)"""
        self.store.commit(overlay.writes(), positions)
        if self.engine is not None:
            with self._unstored_lock:
                self.engine.clear()

    def _emission(self, overlay: Overlay, outcome, result: BatchResult) -> Emission:
        if isinstance(outcome, Replayed):
            result.replayed += 1
            kind = codecs.REPLY_IDEMPOTENCY_HIT if outcome.idempotency_hit else codecs.REPLY_REDELIVERED
            value = codecs.encode_reply(outcome.request_id, outcome.ledger, kind, self._original(overlay, outcome))
            return Emission(REPLIES, self.partition, outcome.ledger.encode(), value, outcome.request_id)
        if outcome.dry_run:
            original = outcome.entry if isinstance(outcome, Committed) else outcome
            ledger = _ledger_of(outcome)
            value = codecs.encode_reply(outcome.request_id, ledger, codecs.REPLY_DRY_RUN, original)
            return Emission(REPLIES, self.partition, ledger.encode(), value, outcome.request_id)
        counts = result.per_ledger.setdefault(_ledger_of(outcome), [0, 0])
        if isinstance(outcome, Committed):
            result.committed += 1
            counts[0] += 1
            return Emission(COMMITTED, self.partition, outcome.entry.ledger.encode(),
                            codecs.encode_log_entry(outcome.entry), outcome.request_id)
        result.rejected += 1
        counts[1] += 1
        return Emission(REJECTED, self.partition, outcome.ledger.encode(),
                        codecs.encode_rejection(outcome), outcome.request_id)

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


def _consumer_common(settings: Settings) -> dict:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": f"{settings.app_id}-recovery",
        "enable.auto.commit": False,
        "socket.nagle.disable": True,
    }


def watermark_probe(settings: Settings) -> Consumer:
    """A consumer for `get_watermark_offsets` of the log topics: read_uncommitted, so the
    high watermark includes a transaction still open (a catch-up waits it out)."""
    return Consumer({**_consumer_common(settings), "isolation.level": "read_uncommitted"})


def log_watermarks(probe: Consumer, partition: int) -> dict[str, tuple[int, int]]:
    """{topic: (low, high) watermarks} of the partition's log topics."""
    return {topic: probe.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)
            for topic in (COMMITTED, REJECTED)}


def native_engine(settings: Settings, partition: int):
    """The partition's native fast path (`native/src/lib.rs`), or None: not built, or
    turned off with STREAMLEDGER_NATIVE=off."""
    if not settings.native or streamledger_native is None:
        return None
    return streamledger_native.Engine(
        partition, settings.partitions, codecs.codec("RequestBatch").header,
        codecs.codec("LogEntry").header, codecs.codec("Rejection").header, Emission,
        COMMITTED, REJECTED, settings.store_cache_entries,
    )


def log_native_status(settings: Settings) -> None:
    """Say at start whether simple transfers take the native path."""
    if streamledger_native is None:
        log.warning("the native fast path is not installed (native/, `make install` builds it): "
                    "every request takes the Python path, at ~4x the CPU")
    else:
        log.info("native fast path for simple transfers: %s", "on" if settings.native else "off (STREAMLEDGER_NATIVE)")


_Batch = streamledger_native.Batch if streamledger_native is not None else type("NoBatch", (), {})


def weight(items) -> tuple[int, int]:
    """(requests, postings) of a decoded record: what bounds a round."""
    if type(items) is _Batch:
        return len(items), items.postings
    return len(items), sum(_postings_of(item) for item in items)


def _postings_of(item) -> int:
    command = getattr(item, "command", None)
    postings = getattr(command, "postings", None)
    return len(postings) if postings else 1


@lru_cache(maxsize=65_536)
def _partition_of(ledger: str, partitions: int) -> int:
    return partition_for(ledger.encode(), partitions)


def _ledger_of(outcome: Committed | Rejected) -> str:
    return outcome.entry.ledger if isinstance(outcome, Committed) else outcome.ledger
