"""The faust worker: consumes `ledger.requests` in bounded batches, applies, emits.

faust gives us the consumer group (partition assignment, rebalances, offset commits) and
the web server with routing of queries to the worker that owns a ledger's partition. The
state lives in our own RocksDB stores (`streams/store.py`), written only after the Kafka
transaction that published a batch's outcomes has committed (see `PartitionProcessor`).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import faust
from faust.types import TP

from streams import metrics
from streams.processor import PartitionProcessor
from streams.settings import Settings
from streams.topics import REQUESTS

log = logging.getLogger("streamledger.worker")


class Worker:
    """The processors of the partitions this worker owns, and the loop that feeds them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processors: dict[int, PartitionProcessor] = {}
        self._ready: dict[int, asyncio.Future] = {}
        # One thread per partition at most; RocksDB and librdkafka release the GIL.
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="partition")

    async def processor(self, partition: int) -> PartitionProcessor:
        """The partition's processor, opened (fenced and recovered) on first use."""
        future = self._ready.get(partition)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._ready[partition] = future
            try:
                processor = await self._run(self._open, partition)
            except BaseException as error:
                del self._ready[partition]
                future.set_exception(error)
                future.exception()  # retrieved: the caller sees the raise below
                raise
            future.set_result(processor)
        return await asyncio.shield(future)

    def _open(self, partition: int) -> PartitionProcessor:
        processor = PartitionProcessor(self.settings, partition)
        processor.open()
        metrics.recovered_records.labels(str(partition)).set(processor.recovered_entries)
        self.processors[partition] = processor
        return processor

    async def release(self, partition: int) -> None:
        future = self._ready.pop(partition, None)
        processor = self.processors.pop(partition, None)
        if future is not None and not future.done():
            future.cancel()
        if processor is not None:
            await self._run(processor.close)

    async def process(self, partition: int, payloads: list) -> None:
        processor = await self.processor(partition)
        with metrics.batch_seconds.time():
            result = await self._run(processor.process, payloads)
        metrics.batch_requests.observe(result.committed + result.rejected + result.replayed)
        for ledger, (applied, rejected) in result.per_ledger.items():
            if applied:
                metrics.applied.labels(ledger).inc(applied)
            if rejected:
                metrics.rejected.labels(ledger).inc(rejected)

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def close(self) -> None:
        for partition in list(self.processors):
            await self.release(partition)
        self.executor.shutdown(wait=True)


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
        web_enabled=True,
        web_bind=settings.worker_host,
        web_host=settings.worker_advertised_host,
        web_port=settings.worker_port,
        canonical_url=f"http://{settings.worker_advertised_host}:{settings.worker_port}",
        stream_buffer_maxsize=max(4096, settings.batch_requests_max * 2),
        web_in_thread=False,
        logging_config=None,
    )
    worker = Worker(settings)
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
        # Recover in the background; the agent awaits the same future before it applies.
        for tp in assigned:
            if tp.topic == REQUESTS:
                asyncio.ensure_future(_recover(tp.partition))

    async def _recover(partition: int) -> None:
        try:
            await worker.processor(partition)
        except Exception:  # noqa: BLE001 — logged; the agent retries on first use
            log.exception("recovery of partition %d failed", partition)

    @app.agent(requests_topic)
    async def apply_requests(stream):
        linger = settings.batch_linger_ms / 1000
        async for events in stream.take_events(settings.batch_requests_max, within=linger):
            by_partition: dict[int, list] = {}
            for event in events:
                by_partition.setdefault(event.message.partition, []).append(event.message.value)
            for partition, payloads in by_partition.items():
                await worker.process(partition, payloads)

    @app.on_before_shutdown.connect
    async def _shutdown(app_: faust.App, **_kwargs) -> None:
        await worker.close()

    from streams import views

    views.register(app, worker, requests_topic)
    views.register_listing(app, worker)
    return app
