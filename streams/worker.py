"""The faust worker: consumes `ledger.requests` in bounded batches, applies, emits.

faust gives us the consumer group (partition assignment, rebalances, offset commits) and
the web server with routing of queries to the worker that owns a ledger's partition. The
state lives in our own RocksDB stores (`streams/store.py`), written only after the Kafka
transaction that published a batch's outcomes has committed (see `PartitionProcessor`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import faust
from confluent_kafka import KafkaException
from faust.types import TP

from streams import metrics
from streams.processor import Fenced, PartitionProcessor
from streams.settings import Settings
from streams.topics import REQUESTS

log = logging.getLogger("streamledger.worker")


class NotOwned(Exception):
    """The consumer group does not (or no longer) assign this partition to this worker."""


class Worker:
    """The processors of the partitions this worker owns, and the loop that feeds them.

    Everything that opens, uses or closes a partition's processor holds that partition's
    lock: an open (fence + recovery) cannot interleave with a release on revocation, and a
    batch never runs on a processor being closed.
    """

    def __init__(self, settings: Settings, owns=lambda partition: True) -> None:
        self.settings = settings
        self.owns = owns  # does the consumer group still assign us this partition?
        self.processors: dict[int, PartitionProcessor] = {}
        self.started = False  # has the group ever assigned us partitions?
        self._locks: dict[int, asyncio.Lock] = {}
        # One thread per partition at most; RocksDB and librdkafka release the GIL.
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="partition")

    async def processor(self, partition: int) -> PartitionProcessor:
        """The partition's processor, opened (fenced and recovered) on first use."""
        processor = self.processors.get(partition)
        if processor is not None:
            return processor
        async with self._lock(partition):
            return await self._processor_locked(partition)

    async def _processor_locked(self, partition: int) -> PartitionProcessor:
        processor = self.processors.get(partition)
        if processor is not None:
            return processor
        # Opening initialises the partition's transactional producer, which fences the
        # current owner: only ever do it for a partition the group gave us.
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
            processor.open()
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
        """Close a partition's processor once no open or batch of it is running."""
        async with self._lock(partition):
            processor = self.processors.pop(partition, None)
            if processor is not None:
                await self._run(processor.close)

    async def process(self, partition: int, payloads: list) -> bool:
        """Apply a batch, retrying transient Kafka failures until it is in the log.

        A batch is never dropped while this worker owns the partition: its requests'
        offsets must not be committed before their outcomes are. If the partition moved
        to another worker meanwhile, the new owner gets the requests redelivered; returns
        False then, and the caller must keep faust from acknowledging them.
        """
        delay = 0.1
        while True:
            if not self.owns(partition):
                log.warning("partition %d is no longer ours; its owner will apply %d records", partition, len(payloads))
                return False
            try:
                async with self._lock(partition):
                    processor = await self._processor_locked(partition)
                    with metrics.batch_seconds.time():
                        result = await self._run(processor.process, payloads)
                break
            except NotOwned:
                continue  # re-checked at the top of the loop
            except Fenced as error:
                log.warning("%s; releasing the partition", error)
                await self.release(partition)
                return False
            except KafkaException as error:
                metrics.batch_retries.inc()
                log.warning("partition %d: batch failed (%s); retrying in %.1fs", partition, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        metrics.batch_requests.observe(result.committed + result.rejected + result.replayed)
        for ledger, (applied, rejected) in result.per_ledger.items():
            if applied:
                metrics.applied.labels(ledger).inc(applied)
            if rejected:
                metrics.rejected.labels(ledger).inc(rejected)
        return True

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def close(self) -> None:
        for partition in list(self.processors):
            await self.release(partition)
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

    worker = Worker(settings, owns)
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
                # Partitions are independent serial writers: overlap their Kafka round
                # trips (librdkafka and RocksDB release the GIL while they wait).
                partitions = list(by_partition)
                applied = await asyncio.gather(*(worker.process(p, by_partition[p]) for p in partitions))
                skipped = {p for p, done in zip(partitions, applied) if not done}
                if skipped:
                    _unacknowledge([e for e in events if e.message.partition in skipped])
                for partition, payloads in by_partition.items():
                    highwater = app.consumer.highwater(TP(REQUESTS, partition))
                    if highwater is not None:
                        metrics.consumer_lag.labels(str(partition)).set(max(0, highwater - payloads[-1][0] - 1))
            except Exception:
                # A bug or a store failure, never an operating error (those are outcomes
                # or retried). Crash now, before faust commits these requests' offsets:
                # the restarted worker recovers from the log and gets them redelivered.
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
