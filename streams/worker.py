"""The faust worker: consumes `ledger.requests` in bounded batches, applies, emits.

faust gives us the consumer group (partition assignment, rebalances) and the web server
with routing of queries to the worker that owns a ledger's partition. The state lives in
our own RocksDB stores (`streams/store.py`), written only after the Kafka transaction that
published a round's outcomes *and committed its requests' offsets* (`streams/writer.py`)
has committed; faust itself never commits offsets of ledger.requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import faust
from confluent_kafka import KafkaException
from faust.types import TP

from streams import metrics
from streams.processor import BatchResult, PartitionProcessor, weight
from streams.settings import Settings
from streams.topics import REQUESTS
from streams.writer import Fenced, GroupMoved, Writer, group_metadata

log = logging.getLogger("streamledger.worker")


class NotOwned(Exception):
    """The consumer group does not (or no longer) assign this partition to this worker."""


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
        self.started = False  # has the group ever assigned us partitions?
        self._locks: dict[int, asyncio.Lock] = {}
        self.writer = Writer(settings.bootstrap_servers, f"{settings.app_id}-worker-{settings.worker_id}")
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
        if not self.owns(partition):
            raise NotOwned(f"partition {partition} is not assigned to this worker")
        processor = await self._run(self._open, partition)
        self.processors[partition] = processor
        return processor

    async def store_for_query(self, partition: int):
        """The partition's store for a read, or None when this worker does not own it."""
        try:
            return (await self.processor(partition)).store
        except NotOwned:
            return None

    def _open(self, partition: int) -> PartitionProcessor:
        processor = PartitionProcessor(self.settings, partition)
        try:
            processor.open(self.writer.epoch)
        except BaseException:
            processor.close()  # release the RocksDB lock so a retry can open it again
            raise
        metrics.recovered_records.labels(str(partition)).set(processor.recovered_entries)
        return processor

    def _lock(self, partition: int) -> asyncio.Lock:
        lock = self._locks.get(partition)
        if lock is None:
            lock = self._locks[partition] = asyncio.Lock()
        return lock

    async def release(self, partition: int) -> None:
        """Close a partition's processor once no open or round of it is running."""
        async with self._lock(partition):
            processor = self.processors.pop(partition, None)
            if processor is not None:
                await self._run(processor.close)

    async def process(self, by_partition: dict[int, list]) -> tuple[dict[int, int], set[int]]:
        """Apply a take's request records, partition by partition, in rounds.

        -> ({partition: next offset committed}, partitions skipped). A round is retried
        after transient Kafka failures while this worker owns its partitions: a request is
        never dropped while ours. Partitions that moved to another worker (or a round the
        group refused: GroupMoved) are skipped; their requests are redelivered to their
        owner from the last committed offset, and the caller must keep faust from
        acknowledging them.
        """
        skipped = {p for p in by_partition if not self.owns(p)}
        partitions = sorted(set(by_partition) - skipped)
        committed: dict[int, int] = {}
        async with contextlib.AsyncExitStack() as held:
            for partition in partitions:
                await held.enter_async_context(self._lock(partition))
            processors: dict[int, PartitionProcessor] = {}
            for partition in partitions:
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
                    skipped.update(p for p in processors if p not in committed)
                    break
                committed.update(done)
        return committed, skipped

    async def _open_retrying(self, partition: int) -> PartitionProcessor | None:
        delay = 0.1
        while True:
            try:
                return await self._processor_locked(partition)
            except NotOwned:
                return None
            except KafkaException as error:
                metrics.batch_retries.inc()
                log.warning("partition %d: recovery failed (%s); retrying in %.1fs", partition, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

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
        delay = 0.1
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
            try:
                with metrics.batch_seconds.time():
                    result = await self._run(self._apply_round, [(processors[p], round_[p]) for p in round_], now, metadata)
                break
            except GroupMoved as error:
                log.warning("the consumer group moved on (%s): the round was aborted; its requests "
                            "go to the partitions' owners", error)
                return None
            except KafkaException as error:
                metrics.batch_retries.inc()
                log.warning("round failed (%s); retrying in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        metrics.batch_requests.observe(result.committed + result.rejected + result.replayed)
        for ledger, (applied, rejected) in result.per_ledger.items():
            if applied:
                metrics.applied.labels(ledger).inc(applied)
            if rejected:
                metrics.rejected.labels(ledger).inc(rejected)
        return {p: records[-1][0] + 1 for p, records in round_.items()}

    def _apply_round(self, work: list[tuple[PartitionProcessor, list]], now: int, metadata: bytes) -> BatchResult:
        epoch = self.writer.ensure()
        for processor, _records in work:
            if processor.epoch != epoch:  # a new writer: what the old one left is in the log
                processor.catch_up(epoch)
        started = time.perf_counter()
        applied = [processor.apply(records, now) for processor, records in work]
        metrics.apply_seconds.observe(time.perf_counter() - started)
        started = time.perf_counter()
        written = self.writer.commit(
            [e for a in applied for e in a.emissions], {a.partition: a.next_offset for a in applied}, metadata)
        metrics.commit_seconds.observe(time.perf_counter() - started)
        result = BatchResult()
        for (processor, _records), a in zip(work, applied):
            processor.commit(a, written)
            result.add(a.result)
        return result

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def close(self) -> None:
        for partition in list(self.processors):
            await self.release(partition)
        await self._run(self.writer.close)
        self.executor.shutdown(wait=True)


def _unacknowledge(events) -> None:
    """Keep faust from ever committing offsets of requests this worker did not apply.

    take_events acknowledges every event of a batch when the batch's body returns. For a
    partition that moved away mid-batch, that acknowledgement would linger in faust's
    bookkeeping and could be committed if the partition came back here — past requests
    nobody applied. Marking the messages as already acknowledged turns faust's ack into a
    no-op; the new owner gets them redelivered from the last committed offset.
    """
    for event in events:
        message = event.message
        message.acked = True
        event.app.consumer._unacked_messages.discard(message)  # noqa: SLF001 (faust internals)


def create_app(settings: Settings | None = None) -> faust.App:
    settings = settings or Settings()
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap_servers}",
        store="memory://",
        autodiscover=False,
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=0.5,
        # A worker whose agent is stuck this long leaves the group, so its partitions move
        # on (aiokafka's default is 5 minutes). Recovery of a large store fits well within.
        broker_max_poll_interval=settings.max_poll_interval_ms / 1000,
        web_enabled=True,
        web_bind=settings.worker_host,
        web_host=settings.worker_advertised_host,
        web_port=settings.worker_port,
        canonical_url=f"http://{settings.worker_advertised_host}:{settings.worker_port}",
        stream_buffer_maxsize=max(4096, settings.batch_requests_max * 2),
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

    def note_committed(offsets: dict[int, int]) -> None:
        """Tell faust these offsets are committed (by our transactions): it commits only
        offsets beyond them, and acknowledged requests never go beyond, so faust never
        commits ledger.requests itself (a late commit of its own could move one back)."""
        committed = app.consumer._committed_offset  # noqa: SLF001 (faust internals)
        for partition, offset in offsets.items():
            tp = TP(REQUESTS, partition)
            current = committed.get(tp)
            if current is None or offset > current:
                committed[tp] = offset

    worker = Worker(settings, owns, group)
    app.streamledger_worker = worker  # type: ignore[attr-defined]
    app.streamledger_settings = settings  # type: ignore[attr-defined]
    requests_topic = app.topic(
        REQUESTS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=settings.partitions,
    )
    app.streamledger_requests_topic = requests_topic  # type: ignore[attr-defined]

    @app.on_partitions_revoked.connect
    async def _revoked(app_: faust.App, revoked: set[TP], **_kwargs) -> None:
        for tp in revoked:
            if tp.topic == REQUESTS:
                await worker.release(tp.partition)

    @app.on_partitions_assigned.connect
    async def _assigned(app_: faust.App, assigned: set[TP], **_kwargs) -> None:
        # Recover in the background; the agent awaits the same lock before it applies.
        worker.started = True
        for tp in assigned:
            if tp.topic == REQUESTS:
                asyncio.ensure_future(_recover(tp.partition))

    async def _recover(partition: int) -> None:
        try:
            await worker.processor(partition)
        except NotOwned:
            pass  # revoked again before its turn: nothing to recover
        except Exception:  # noqa: BLE001 — logged; the agent retries on first use
            log.exception("recovery of partition %d failed", partition)

    @app.agent(requests_topic)
    async def apply_requests(stream):
        linger = settings.batch_linger_ms / 1000
        async for events in stream.take_events(settings.batch_requests_max, within=linger):
            by_partition: dict[int, list] = {}
            for event in events:
                message = event.message
                by_partition.setdefault(message.partition, []).append((message.offset, message.key, message.value))
            try:
                committed, skipped = await worker.process(by_partition)
                note_committed(committed)
                # Requests of partitions skipped, or of rounds the group refused, were not
                # applied: their owner gets them redelivered from the committed offsets.
                unapplied = [e for e in events if e.message.partition in skipped
                             or e.message.offset >= committed.get(e.message.partition, 0)]
                if unapplied:
                    _unacknowledge(unapplied)
                for partition, payloads in by_partition.items():
                    highwater = app.consumer.highwater(TP(REQUESTS, partition))
                    if highwater is not None:
                        metrics.consumer_lag.labels(str(partition)).set(max(0, highwater - payloads[-1][0] - 1))
            except Fenced as error:
                log.critical("this worker's transactional id was taken over (%s): another process runs "
                             "with STREAMLEDGER_WORKER_ID=%s? exiting", error, settings.worker_id)
                logging.shutdown()
                os._exit(70)
            except Exception:
                # A bug or a store failure, never an operating error (those are outcomes
                # or retried). Crash now: the restarted worker recovers from the log and
                # gets the requests after the last committed offsets redelivered.
                log.critical("unexpected failure applying a batch; exiting", exc_info=True)
                logging.shutdown()
                os._exit(70)

    @app.on_before_shutdown.connect
    async def _shutdown(app_: faust.App, **_kwargs) -> None:
        await worker.close()

    from streams import views

    views.register(app, worker, requests_topic)
    views.register_listing(app, worker)
    return app
