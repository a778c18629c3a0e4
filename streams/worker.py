"""The faust worker: reads `ledger.requests` in bounded takes, applies them in rounds, emits.

faust gives us the consumer group (partition assignment, rebalances) and the web server
with routing of queries to the worker that owns a ledger's partition. The records
themselves are fetched by librdkafka (`RequestFetcher`) for the partitions faust's group
assigned us; faust's own fetching of them is paused, and faust never commits their
offsets. The state lives in our own RocksDB stores (`streams/store.py`), written only
after the Kafka transaction that published a round's outcomes *and committed its
requests' offsets* (`streams/writer.py`) has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import faust
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from faust.types import TP

from streams import metrics
from streams.hanging import StableOffsetWatch
from streams.logs import exit_process
from streams.processor import (
    Applied, BatchResult, CatchUpCancelled, PartitionProcessor, log_native_status, log_watermarks, watermark_probe, weight,
)
from streams.settings import Settings
from streams.topics import COMMITTED, REJECTED, REPLIES, REQUESTS
from streams.writer import Fenced, GroupMoved, Writer, group_metadata

log = logging.getLogger("streamledger.worker")


# How often a warm standby catches up from the log (STREAMLEDGER_STANDBY).
STANDBY_INTERVAL_S = 2.0


class NotOwned(Exception):
    """The consumer group does not (or no longer) assign this partition to this worker."""


class _Backoff:
    """Waits between retries of a step that failed with a transient Kafka error: doubling
    from `first` up to 5 s, each retry counted and logged."""

    def __init__(self, first: float) -> None:
        self.delay = first

    async def wait(self, step: str, error: BaseException) -> None:
        metrics.batch_retries.inc()
        log.warning("%s failed (%s); retrying in %.1fs", step, error, self.delay)
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, 5.0)


# A take (the requests decoded and applied before the next fetch) stops after about this
# many bytes of records, whatever `STREAMLEDGER_BATCH_MAX` allows in records: a record may
# hold hundreds of requests, and a take of thousands of such records (the whole prefetch
# queue under a backlog) held ~300 MB of decoded requests at once (peak RSS 830 MB in
# 600k-request bench phases). ~60 bytes a transfer: some 60,000 requests, many rounds.
TAKE_BYTES_MAX = 4 * 1024 * 1024
# Records asked of librdkafka at a time, up to a take's bounds (so a take goes past
# TAKE_BYTES_MAX by at most this many records).
_CONSUME_CHUNK = 64


class RequestFetcher:
    """Reads ledger.requests for the worker with librdkafka, for the partitions the group
    (faust's consumer) assigned it.

    faust keeps the group membership, the partition assignment and the routing of
    queries; its own fetching of ledger.requests is paused. Measured at 1,000
    single-request records/s: faust's path (aiokafka fetch and parse in Python, then its
    stream and event machinery) cost ~360 µs of CPU per record, against the few µs of
    librdkafka's `consume`.

    A partition is assigned here only once its store has caught up, from the group's
    committed offset read with `isolation.level=read_committed`, so librdkafka waits for
    offsets that a still-open transaction would commit (KIP-447's stable offsets).
    """

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer({
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": settings.app_id,  # faust's group: its committed offsets; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "socket.nagle.disable": True,
            "fetch.wait.max.ms": 100,
            "queued.max.messages.kbytes": 32 * 1024,
        })
        self.assigned: set[int] = set()
        # Bumped at each (re)assignment: records fetched under an older one are stale (the
        # new assignment reads them again from the committed offset).
        self.generation: dict[int, int] = {}
        # Partitions none of whose fetched records may be applied until they are read
        # again from the committed offset (`Worker.rewind`); `assign` clears them.
        self.rewinding: set[int] = set()
        # consume() blocks: one thread of its own, so rounds and recoveries never wait on it;
        # (un)assignments run on it too, between two consumes.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch")

    def assign(self, partition: int) -> int:
        """Start reading `partition` from the group's committed offset; -> that offset."""
        tp = TopicPartition(REQUESTS, partition)
        committed = self.consumer.committed([tp], timeout=30)[0]
        if committed.error is not None:
            raise KafkaException(committed.error)
        offset = committed.offset if committed.offset >= 0 else OFFSET_BEGINNING
        if partition in self.assigned:
            self.consumer.incremental_unassign([tp])
        self.generation[partition] = self.generation.get(partition, 0) + 1
        self.consumer.incremental_assign([TopicPartition(REQUESTS, partition, offset)])
        self.assigned.add(partition)
        self.rewinding.discard(partition)
        return offset

    def unassign(self, partition: int) -> None:
        if partition in self.assigned:
            self.assigned.discard(partition)
            self.generation[partition] = self.generation.get(partition, 0) + 1
            self.consumer.incremental_unassign([TopicPartition(REQUESTS, partition)])

    def take(self, max_records: int, linger: float, max_bytes: int = TAKE_BYTES_MAX) -> dict[int, tuple[int, list]]:
        """Up to `max_records` records and about `max_bytes` of them, waiting at most
        `linger` s; -> {partition: (assignment generation, records)}."""
        generation = dict(self.generation)
        by_partition: dict[int, tuple[int, list]] = {}
        taken = size = 0
        while taken < max_records and size < max_bytes:
            ask = min(max_records - taken, _CONSUME_CHUNK)
            messages = self.consumer.consume(ask, linger if taken == 0 else 0)
            taken += len(messages)
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.warning("fetching %s: %s", REQUESTS, error)
                    continue
                partition = message.partition()
                if (partition not in self.assigned or partition in self.rewinding
                        or generation.get(partition) != self.generation.get(partition)):
                    continue  # fetched under an assignment since replaced, or to be read again
                entry = by_partition.get(partition)
                if entry is None:
                    entry = by_partition[partition] = (generation[partition], [])
                value = message.value()
                size += len(value) if value is not None else 0
                entry[1].append((message.offset(), message.key(), value))
            if len(messages) < ask:  # nothing more fetched yet
                break
        return by_partition

    def current(self, partition: int, generation: int | None) -> bool:
        return (partition in self.assigned and partition not in self.rewinding
                and self.generation.get(partition) == generation)

    def lag(self, partition: int, next_offset: int) -> int | None:
        try:
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(REQUESTS, partition), cached=True)
        except KafkaException:
            return None
        return None if high < 0 else max(0, high - next_offset)



class Worker:
    """The processors of the partitions this worker owns, its writer, and the rounds.

    Everything that opens, uses or closes a partition's processor holds that partition's
    lock: an open (recovery) cannot interleave with a release on revocation, and a round
    never runs on a processor being closed. A round holds the locks of all its partitions
    (taken in partition order).
    """

    def __init__(self, settings: Settings, owns=lambda partition: True, group=lambda: None) -> None:
        self.settings = settings
        self.owns = owns  # does the consumer group still assign us this partition?
        self.group = group  # -> the consumer's group metadata (bytes), None outside a generation
        self.processors: dict[int, PartitionProcessor] = {}
        self.standbys: dict[int, PartitionProcessor] = {}  # warm copies of partitions not ours
        self._standby_probe: Consumer | None = None  # their high watermarks, every partition
        self.started = False  # has the group ever assigned us partitions?
        self.closing = False  # close() has begun: nothing new is opened
        self._locks: dict[int, asyncio.Lock] = {}
        # Partitions catching up right now (`_open`), each with the event that stops it.
        self._opening: dict[int, threading.Event] = {}
        self.writer = Writer(settings.bootstrap_servers, f"{settings.app_id}-worker-{settings.worker_id}",
                             settings.native_produce)
        self.fetcher: RequestFetcher | None = None  # set by create_app (tests drive process())
        # Rounds run one at a time; recoveries of newly assigned partitions beside them.
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="partition")

    async def processor(self, partition: int) -> PartitionProcessor:
        """The partition's processor, opened (caught up) on first use."""
        processor = self.processors.get(partition)
        if processor is not None:
            return processor
        async with self._lock(partition):
            return await self._processor_locked(partition)

    async def _processor_locked(self, partition: int) -> PartitionProcessor:
        processor = self.processors.get(partition)
        if processor is not None:
            return processor
        if self.closing:
            raise NotOwned(f"partition {partition}: this worker is closing")
        if not self.owns(partition):
            raise NotOwned(f"partition {partition} is not assigned to this worker")
        # A warm standby of it (STREAMLEDGER_STANDBY) only has the log's tail to catch up.
        processor = await self._run(self._open, partition, self.standbys.pop(partition, None))
        self.processors[partition] = processor
        return processor

    async def store_for_query(self, partition: int):
        """The partition's store for a read, or None when this worker does not own it.
        The last committed round's writes are in it (a client reads what it was answered)."""
        try:
            processor = await self.processor(partition)
        except NotOwned:
            return None
        if processor.has_unstored:
            await self._run(processor.write_unstored)
        return processor.store

    def write_unstored(self) -> None:
        """Hand every partition's last committed round to its store, not waiting for the
        writes (see `PartitionProcessor.write_unstored`)."""
        for processor in list(self.processors.values()):
            processor.write_unstored(wait=False)

    async def quiet(self) -> None:
        """Nothing to apply for a while: persist the stores' memtables (see
        `PartitionProcessor.flush_store`)."""
        for processor in list(self.processors.values()):
            await self._run(processor.flush_store)

    def _open(self, partition: int, processor: PartitionProcessor | None = None) -> PartitionProcessor:
        processor = processor or PartitionProcessor(self.settings, partition)
        cancelled = self._opening[partition] = threading.Event()
        try:
            processor.open(self.writer.epoch, cancelled)
        except BaseException as error:
            processor.close()  # release the RocksDB lock so a retry can open it again
            if isinstance(error, CatchUpCancelled):
                raise NotOwned(str(error)) from None
            raise
        finally:
            if self._opening.get(partition) is cancelled:
                del self._opening[partition]
        metrics.recovered_records.labels(str(partition)).set(processor.recovered_entries)
        return processor

    def _lock(self, partition: int) -> asyncio.Lock:
        lock = self._locks.get(partition)
        if lock is None:
            lock = self._locks[partition] = asyncio.Lock()
        return lock

    async def release(self, partition: int) -> None:
        """Stop fetching a partition and close its processor once no open or round of it
        is running; a catch-up of it (an open) is stopped, not waited out: the group's
        rebalance waits for this (a catch-up held by an open transaction once stalled
        every partition of the group for a minute)."""
        catching_up = self._opening.get(partition)
        if catching_up is not None:
            catching_up.set()
        async with self._lock(partition):
            # (Un)assignments of a partition happen under its lock: no hop to the fetch
            # thread, which may be waiting out a take, for a partition it does not fetch.
            if self.fetcher is not None and partition in self.fetcher.assigned:
                await self._fetching(self.fetcher.unassign, partition)
            processor = self.processors.pop(partition, None)
            if processor is not None:
                if self.settings.standby:  # kept warm, in case it comes back
                    self.standbys[partition] = processor
                else:
                    await self._run(processor.close)

    async def keep_standbys(self) -> None:
        """Warm standbys (STREAMLEDGER_STANDBY): keep a store of every partition this worker
        does not own caught up from the log, every few seconds, so that taking one over
        (its owner failed or left) replays only what was logged since. Costs the replay of
        the whole log in every worker, one partition at a time beside the rounds.

        One consumer probes every partition's high watermarks; a standby whose topics have
        not moved since its last catch-up is not read at all."""
        while not self.closing:
            await asyncio.sleep(STANDBY_INTERVAL_S)
            if not self.started or self.closing:
                continue
            if self._standby_probe is None:  # closed by close(), once nothing uses it
                self._standby_probe = await self._run(watermark_probe, self.settings)
            for partition in range(self.settings.partitions):
                if partition in self.processors or self.owns(partition):
                    continue
                async with self._lock(partition):
                    # close() takes each standby's lock: none is opened again after it began.
                    if self.closing:
                        return
                    if partition in self.processors or self.owns(partition):
                        continue
                    await self._keep_standby(self._standby_probe, partition)

    async def _keep_standby(self, probe, partition: int) -> None:
        standby = self.standbys.get(partition)
        first = standby is None
        started = time.monotonic()
        try:
            watermarks = await self._run(log_watermarks, probe, partition)
            if first:
                standby = self.standbys[partition] = await self._run(PartitionProcessor, self.settings, partition)
            replayed = await self._run(standby.recover, watermarks)
        except KafkaException as error:
            log.warning("standby of partition %d: catching up failed (%s)", partition, error)
            return
        seconds = time.monotonic() - started
        (log.info if first else log.debug)(
            "standby of partition %d: replayed %d log records in %.2fs", partition, replayed, seconds,
            extra={"partition": partition, "replayed": replayed, "seconds": round(seconds, 3)})

    async def rewind(self, partitions) -> None:
        """Read partitions still ours again from their committed offsets (their fetched
        records were not applied: a round the group refused). Until that succeeds, none of
        their fetched records is applied (`RequestFetcher.rewinding`): records past ones
        that were dropped must never commit their offsets."""
        for partition in sorted(partitions):
            async with self._lock(partition):
                if self.fetcher is not None and partition in self.fetcher.assigned and self.owns(partition):
                    self.fetcher.rewinding.add(partition)
                    try:
                        await self._fetching(self.fetcher.assign, partition)
                    except KafkaException as error:
                        log.warning("partition %d: reading it again from the committed offset failed (%s); "
                                    "retrying", partition, error)
                        asyncio.ensure_future(self.attach(partition))  # retried while ours

    async def attach(self, partition: int) -> None:
        """A partition the group assigned us: catch its store up, then fetch its requests
        from the committed offset. Retried until done or the partition is gone again."""
        backoff = _Backoff(0.5)
        while True:
            try:
                async with self._lock(partition):
                    await self._processor_locked(partition)
                    if self.fetcher is not None:
                        offset = await self._fetching(self.fetcher.assign, partition)
                        log.info("partition %d: fetching %s from offset %d", partition, REQUESTS, offset,
                                 extra={"partition": partition, "offset": offset})
                return
            except NotOwned:
                return  # revoked again before its turn
            except KafkaException as error:  # a LogForked propagates: the operator must look
                await backoff.wait(f"partition {partition}: taking it over", error)

    async def process(self, by_partition: dict[int, list], current=lambda partition: True) -> tuple[dict[int, int], set[int]]:
        """Apply a take's request records, partition by partition, in rounds.

        -> ({partition: next offset committed}, partitions skipped). A round is retried
        after transient Kafka failures while this worker owns its partitions: a request is
        never dropped while ours. Partitions that moved to another worker, were
        reassigned since their records were fetched (`current`), or whose round the group
        refused (GroupMoved) are skipped: their requests are read again from the committed
        offset, by their owner.
        """
        skipped = {p for p in by_partition if not self.owns(p)}
        partitions = sorted(set(by_partition) - skipped)
        committed: dict[int, int] = {}
        async with contextlib.AsyncExitStack() as held:
            for partition in partitions:
                await held.enter_async_context(self._lock(partition))
            processors: dict[int, PartitionProcessor] = {}
            for partition in partitions:
                if not current(partition):  # fetched before a reassignment: read again since
                    skipped.add(partition)
                    continue
                processor = await self._open_retrying(partition)
                if processor is None:
                    skipped.add(partition)
                else:
                    processors[partition] = processor
            now = int(time.time() * 1_000_000)
            decoded = await self._run(
                lambda: {p: processor.decode(by_partition[p], now) for p, processor in processors.items()})
            for round_ in self._rounds(decoded):
                done = await self._round(processors, round_, now, skipped)
                if done is None:  # the group moved on: nothing more of this take is ours
                    skipped.update(processors)  # (some may have committed earlier rounds)
                    break
                committed.update(done)
        return committed, skipped

    async def _open_retrying(self, partition: int) -> PartitionProcessor | None:
        backoff = _Backoff(0.1)
        while True:
            try:
                return await self._processor_locked(partition)
            except NotOwned:
                return None
            except KafkaException as error:
                await backoff.wait(f"partition {partition}: recovery", error)

    def _rounds(self, decoded: dict[int, list[tuple[int, list]]]):
        """Split a take into rounds of at most STREAMLEDGER_BATCH_MAX requests and
        STREAMLEDGER_BATCH_POSTINGS_MAX postings (a record is never split; one larger than
        the bounds is a round of its own). -> [{partition: records}]"""
        requests_max, postings_max = self.settings.batch_requests_max, self.settings.batch_postings_max
        current: dict[int, list] = {}
        requests = postings = 0
        for partition, records in decoded.items():
            for record in records:
                n, w = weight(record[1])
                if current and (requests + n > requests_max or postings + w > postings_max):
                    yield current
                    current, requests, postings = {}, 0, 0
                current.setdefault(partition, []).append(record)
                requests += n
                postings += w
        if current:
            yield current

    async def _round(self, processors, round_: dict[int, list], now: int, skipped: set[int]) -> dict[int, int] | None:
        """One round: apply, one transaction, store writes. -> offsets committed, or None."""
        backoff = _Backoff(0.1)
        while True:
            for partition in [p for p in round_ if not self.owns(p)]:
                log.warning("partition %d is no longer ours; its owner will apply its requests", partition)
                del round_[partition]
                skipped.add(partition)
            metadata = self.group()
            if not round_:
                return {}
            if metadata is None:
                return None
            offsets = {p: records[-1][0] + 1 for p, records in round_.items()}
            try:
                with metrics.batch_seconds.time():
                    result = await self._run(
                        self._apply_round, [(processors[p], round_[p]) for p in round_], offsets, now, metadata)
                break
            except GroupMoved as error:
                log.warning("the consumer group moved on (%s): the round was aborted; its requests "
                            "go to the partitions' owners", error)
                return None
            except KafkaException as error:
                await backoff.wait("round", error)
        metrics.batch_requests.observe(result.requests)
        for ledger, (applied, rejected) in result.per_ledger.items():
            if applied:
                metrics.applied.labels(ledger).inc(applied)
            if rejected:
                metrics.rejected.labels(ledger).inc(rejected)
        return offsets

    def _apply_round(self, work: list[tuple[PartitionProcessor, list]], offsets: dict[int, int], now: int,
                     metadata: bytes) -> BatchResult:
        """Apply `work` and commit it with the requests' `offsets` ({partition: next offset})."""
        epoch = self.writer.ensure()
        for processor, _records in work:
            if processor.epoch != epoch:  # a new writer: what the old one left is in the log
                processor.catch_up(epoch)
        started = time.perf_counter()
        applied: list[Applied] = []
        applying = 0.0

        def outcomes():
            # Pulled by the writer inside the open transaction: each partition's records
            # go to the broker while the next partition is applied.
            nonlocal applying
            for processor, records in work:
                began = time.perf_counter()
                applied.append(processor.apply(records, now))
                applying += time.perf_counter() - began
                yield applied[-1].outcomes

        written = self.writer.commit(outcomes(), offsets, metadata, before_flush=self.write_unstored)
        committed_at = time.perf_counter()
        metrics.apply_seconds.observe(applying)
        metrics.commit_seconds.observe(committed_at - started - applying)
        result = BatchResult()
        for (processor, _records), a in zip(work, applied):
            processor.commit(a, written)
            result.add(a.result)
        ended = time.perf_counter()
        if ended - started > self.settings.slow_round_ms / 1000:
            steps = {"apply": applying, **self.writer.timings, "store": ended - committed_at}
            steps["produce"] -= applying  # the writer's produce step ran the applies
            log.info("slow round: %d requests in %.0f ms (%s)", result.requests, (ended - started) * 1000,
                     ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in steps.items()),
                     extra={"requests": result.requests, **{f"{name}_ms": round(seconds * 1000, 2)
                                                    for name, seconds in steps.items()}})
        return result

    async def _fetching(self, function, *args):
        """Run on the fetcher's own thread: an (un)assignment never happens in the middle of
        a `consume`, so every record a take returns belongs to the assignment it saw."""
        return await asyncio.get_running_loop().run_in_executor(self.fetcher.executor, function, *args)

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def close(self) -> None:
        self.closing = True
        # Every partition, under its lock: one being taken over right now (not among the
        # processors yet) is waited for and closed too, and none is opened after this.
        for partition in range(self.settings.partitions):
            await self.release(partition)
        for partition in range(self.settings.partitions):  # incl. one keep_standbys is opening
            async with self._lock(partition):
                standby = self.standbys.pop(partition, None)
                if standby is not None:
                    await self._run(standby.close)
        await self._run(self.writer.close)
        if self.fetcher is not None:
            await self._fetching(self.fetcher.consumer.close)
            self.fetcher.executor.shutdown(wait=False)
        self.executor.shutdown(wait=True)
        if self._standby_probe is not None:  # after the executor: no call of it in flight
            self._standby_probe.close()
            self._standby_probe = None


def _unacknowledge(events) -> None:
    """Keep faust from ever committing offsets of ledger.requests: the round's transaction
    commits them. take_events acknowledges every event of a batch when the batch's body
    returns; marking the messages as already acknowledged turns that ack into a no-op, so
    nothing faust fetched before its fetching was paused enters its commit bookkeeping.
    """
    for event in events:
        message = event.message
        message.acked = True
        event.app.consumer._unacked_messages.discard(message)  # noqa: SLF001 (faust internals)


def _take(fetcher: RequestFetcher, max_records: int, linger: float, idle=lambda: None) -> dict[int, tuple[int, list]]:
    """Wait (up to 0.5 s) for the first record, then add what is already fetched, or
    what arrives within `linger` s (STREAMLEDGER_BATCH_LINGER_MS). The default, 0, batches
    by itself: whatever arrived while the previous round ran is the next round. Measured
    at 1,000 tx/s against a 5 ms linger: p50 the same, p90/p99 lower (92/153 vs 96/273 ms,
    102/176 vs 133/273 ms in two pairs of runs). `idle` runs before any wait (the worker
    writes its last round's store then)."""
    first = fetcher.take(1, 0)
    if not first:
        idle()
        first = fetcher.take(1, 0.5)
    if not first or max_records <= 1:
        return first
    for partition, (generation, records) in fetcher.take(max_records - 1, linger).items():
        known = first.get(partition)
        if known is None:
            first[partition] = (generation, records)
        elif known[0] == generation:
            known[1].extend(records)
    return first


def create_app(settings: Settings | None = None) -> faust.App:
    settings = settings or Settings()
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)  # faust's mkdir has no parents=True
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap_servers}",
        store="memory://",
        # faust's own data folder (it keeps no tables here; default: ./{app_id}-data)
        datadir=str(settings.data_dir / "faust"),
        autodiscover=False,
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        # faust refuses a session timeout above its request timeout (default 90 s).
        broker_request_timeout=max(90.0, settings.session_timeout_ms / 1000 + 10),
        broker_heartbeat_interval=0.5,
        consumer_group_instance_id=settings.worker_id if settings.static_membership else None,
        # faust's consumer leaves the group when its loop is stuck this long (aiokafka's
        # default is 5 minutes). Rounds run beside it: a stuck transaction is the
        # writer's watchdog's business (streams/writer.py).
        broker_max_poll_interval=settings.max_poll_interval_ms / 1000,
        web_enabled=True,
        web_bind=settings.worker_host,
        web_host=settings.worker_advertised_host,
        web_port=settings.worker_port,
        canonical_url=f"http://{settings.worker_advertised_host}:{settings.worker_port}",
        stream_buffer_maxsize=max(4096, settings.batch_requests_max * 2),
        # faust's livelock check expects its own fetches of every assigned partition; ours
        # are librdkafka's (faust's are paused), so after this long it logged an ERROR for
        # each partition every few seconds, forever. Liveness is watched elsewhere (the
        # transaction watchdog, streamledger_consumer_lag).
        stream_processing_timeout=365 * 24 * 3600.0,
        web_in_thread=False,
        logging_config=None,
    )
    def owns(partition: int) -> bool:
        try:
            return TP(REQUESTS, partition) in app.consumer.assignment()
        except Exception:  # noqa: BLE001 — consumer not started yet: not ours yet
            return False

    def group() -> bytes | None:
        """The group metadata of faust's consumer, for the round's transactional offsets."""
        try:
            coordinator = app.consumer._thread._ensure_consumer()._coordinator  # noqa: SLF001 (faust/aiokafka internals)
        except Exception:  # noqa: BLE001 — consumer not started yet
            return None
        generation, member = coordinator.generation, coordinator.member_id
        if generation is None or generation < 0 or not member:
            return None
        return group_metadata(coordinator.group_id, generation, member, coordinator._group_instance_id)  # noqa: SLF001

    worker = Worker(settings, owns, group)
    app.streamledger_worker = worker  # type: ignore[attr-defined]
    app.streamledger_settings = settings  # type: ignore[attr-defined]
    requests_topic = app.topic(
        REQUESTS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=settings.partitions,
    )
    app.streamledger_requests_topic = requests_topic  # type: ignore[attr-defined]

    fetcher = worker.fetcher = RequestFetcher(settings)

    def pause_faust_fetching(tps: set[TP]) -> None:
        """faust's consumer keeps the group and the assignment; librdkafka fetches."""
        from aiokafka.structs import TopicPartition as AioTP

        consumer = app.consumer._thread._ensure_consumer()  # noqa: SLF001 (faust internals)
        assigned = consumer.assignment()
        consumer.pause(*[AioTP(tp.topic, tp.partition) for tp in tps if AioTP(tp.topic, tp.partition) in assigned])

    @app.on_partitions_revoked.connect
    async def _revoked(app_: faust.App, revoked: set[TP], **_kwargs) -> None:
        for tp in revoked:
            if tp.topic == REQUESTS:
                await worker.release(tp.partition)

    @app.on_partitions_assigned.connect
    async def _assigned(app_: faust.App, assigned: set[TP], **_kwargs) -> None:
        worker.started = True
        ours = {tp for tp in assigned if tp.topic == REQUESTS}
        pause_faust_fetching(ours)
        # Catch up and start fetching in the background: a rebalance must not wait for a
        # long recovery (the round loop only ever sees partitions already attached).
        for tp in ours:
            asyncio.ensure_future(_attach(tp.partition))

    async def _attach(partition: int) -> None:
        try:
            await worker.attach(partition)
        except Exception:  # LogForked or a bug: the operator must look
            exit_process(log, "taking over partition %d failed; exiting", partition, exc_info=True)

    @app.agent(requests_topic)
    async def requests_membership(stream):
        """Subscribes faust's consumer to ledger.requests (membership, assignment, query
        routing). Its fetching is paused on assignment; a record fetched before that is
        left alone — never acknowledged, so faust never commits an offset — and read
        again by the fetcher from the committed offset."""
        async for events in stream.take_events(1000, within=1.0):
            _unacknowledge(events)

    @app.task
    async def rounds() -> None:
        log_native_status(settings)  # here: faust's logging is set up once its tasks run
        loop = asyncio.get_running_loop()
        linger = settings.batch_linger_ms / 1000
        while True:
            if not fetcher.assigned:
                await asyncio.sleep(0.05)
                continue
            try:
                # Waiting for requests, the worker writes its last round's store, and after
                # half a second without any it flushes the stores (`quiet`).
                by_partition = await loop.run_in_executor(
                    fetcher.executor, _take, fetcher, settings.batch_requests_max, linger, worker.write_unstored)
                if not by_partition:
                    await worker.quiet()
                    continue
                generations = {p: generation for p, (generation, _records) in by_partition.items()}
                committed, skipped = await worker.process(
                    {p: records for p, (_generation, records) in by_partition.items()},
                    current=lambda p: fetcher.current(p, generations[p]))
                # Skipped partitions moved to another worker, or their round was refused:
                # whoever owns them reads them again from the committed offset.
                if skipped:
                    await worker.rewind(skipped)
                for partition, offset in committed.items():
                    lag = fetcher.lag(partition, offset)
                    if lag is not None:
                        metrics.consumer_lag.labels(str(partition)).set(lag)
            except Fenced as error:
                exit_process(log, "this worker's transactional id was taken over (%s): another process "
                             "runs with STREAMLEDGER_WORKER_ID=%s? exiting", error, settings.worker_id)
            except Exception:
                if worker.closing:  # shutting down: the fetcher and the executors are going
                    return
                # A bug or a store failure, never an operating error (those are outcomes
                # or retried). Crash now: the restarted worker recovers from the log and
                # reads the requests after the last committed offsets again.
                exit_process(log, "unexpected failure applying a round; exiting", exc_info=True)

    @app.task
    async def watch_stable_offsets() -> None:
        """The logs of this worker's partitions, for a transaction no coordinator ends."""
        loop = asyncio.get_running_loop()
        watch = StableOffsetWatch(settings.bootstrap_servers, (COMMITTED, REJECTED, REPLIES),
                                  settings.hanging_transaction_s)
        while not worker.closing:
            await asyncio.sleep(max(0.5, settings.hanging_transaction_s / 4))
            try:
                findings = await loop.run_in_executor(None, watch.check, sorted(fetcher.assigned))
            except Exception as error:  # noqa: BLE001 — the broker away: next time
                log.info("checking the logs' stable offsets failed (%s)", error)
                continue
            for topic, partition, at, finding in findings:
                log.warning("%s[%d] stuck at %d for %.0fs: %s", topic, partition, at, settings.hanging_transaction_s,
                            finding.description, extra={"partition": partition, "topic": topic, "at": at,
                                                        "aborted": finding.aborted})

    if settings.standby:
        app.task(worker.keep_standbys)

    @app.on_before_shutdown.connect
    async def _shutdown(app_: faust.App, **_kwargs) -> None:
        await worker.close()

    from streams import views

    views.register(app, worker, requests_topic)
    views.register_listing(app, worker)
    return app
