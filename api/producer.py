"""The gateway's side of `ledger.requests`: coalesce, produce, and wait for outcomes.

Requests for one ledger that arrive within a short linger are sent as one `RequestBatch`
record (faust's per-record cost is the ceiling of a worker, see DESIGN.md "Batching on
the wire"). Outcomes come back on `ledger.committed` / `ledger.rejected` / `ledger.replies`, read with
`read_committed` from the end by a consumer thread that matches the `request_id` header
against the requests this gateway is waiting for — no decoding of other gateways' records.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from ledger import limits
from ledger.commands import Request
from ledger.machine import Committed, Rejected
from streams import codecs
from streams.settings import Settings
from streams.topics import COMMITTED, REJECTED, REPLIES, REQUESTS, consume_available, producer_config

log = logging.getLogger("streamledger.gateway")


@dataclass(frozen=True)
class Answer:
    """The outcome of a request, and how it came: None (newly applied), or a reply kind
    (`DRY_RUN`, `IDEMPOTENCY_HIT`, `REDELIVERED`; see `streams.codecs`)."""

    outcome: Committed | Rejected
    kind: str | None = None

    @property
    def idempotency_hit(self) -> bool:
        return self.kind == codecs.REPLY_IDEMPOTENCY_HIT


class RequestsClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer = Producer(producer_config(
            settings.bootstrap_servers, **{"linger.ms": 0, "compression.type": "lz4"}))
        self._pending: dict[str, list[Request]] = {}
        self._pending_count = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._waiters: dict[str, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._poller: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._consume, name="replies", daemon=True)
        self._thread.start()
        self._poller = threading.Thread(target=self._poll_producer, name="producer", daemon=True)
        self._poller.start()
        # Writes are accepted only once the reply consumer is positioned at the end of
        # both topics: an outcome published before that would be missed.
        ready = await self._loop.run_in_executor(None, self._ready.wait, 60)
        if not ready:
            raise RuntimeError(f"could not reach Kafka at {self.settings.bootstrap_servers}")

    async def stop(self) -> None:
        self._stop.set()
        loop = asyncio.get_running_loop()
        for thread in (self._thread, self._poller):
            if thread is not None:
                await loop.run_in_executor(None, thread.join, 10)
        await loop.run_in_executor(None, self._producer.flush, 5)
        # Drop the producer now: a live librdkafka client keeps reconnecting (and logging)
        # to a broker that may be gone, until the interpreter exits.
        del self._producer

    # -- sending ---------------------------------------------------------------------

    async def submit(self, request: Request, timeout: float) -> "Answer":
        """Produce `request` and wait for its outcome. Raises TimeoutError."""
        assert self._loop is not None, "start() first"
        future = self._loop.create_future()
        self._waiters[request.request_id] = future
        pending = self._pending.setdefault(request.ledger, [])
        pending.append(request)
        self._pending_count += 1
        if len(pending) >= limits.requests_per_record_max:
            self._flush_ledger(request.ledger)
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_later(self.settings.gateway_linger_ms / 1000, self._flush)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.pop(request.request_id, None)

    def _flush(self) -> None:
        self._flush_handle = None
        for ledger in list(self._pending):
            self._flush_ledger(ledger)

    def _flush_ledger(self, ledger: str) -> None:
        requests = self._pending.pop(ledger, [])
        if not requests:
            return
        self._pending_count -= len(requests)
        payload = codecs.encode_requests(requests)
        try:
            self._producer.produce(REQUESTS, payload, ledger.encode(), on_delivery=self._delivered(requests))
        except BufferError:
            self._fail(requests, "the gateway's producer queue is full; retry later")
        except Exception as error:  # noqa: BLE001
            self._fail(requests, f"could not produce the request: {error}")

    def _delivered(self, requests: list[Request]):
        def callback(error, _message) -> None:
            if error is not None:
                log.error("request batch of %d not delivered: %s", len(requests), error)
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._fail, requests, f"Kafka refused the request: {error}")
        return callback

    def _fail(self, requests: list[Request], message: str) -> None:
        for request in requests:
            future = self._waiters.get(request.request_id)
            if future is not None and not future.done():
                future.set_exception(ConnectionError(message))

    def _poll_producer(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    # -- receiving -------------------------------------------------------------------

    def _consume(self) -> None:
        """Run the reply consumer until stopped, restarting it after any failure from the
        positions it had reached (a topic still electing leaders, a broker restart…)."""
        positions: dict[tuple[str, int], int] = {}
        while not self._stop.is_set():
            try:
                self._consume_until_stopped(positions)
            except Exception:  # noqa: BLE001 — logged, then the consumer starts over
                log.warning("reply consumer failed; restarting it", exc_info=True)
                self._stop.wait(1.0)

    def _consume_until_stopped(self, positions: dict[tuple[str, int], int]) -> None:
        consumer = Consumer({
            "bootstrap.servers": self.settings.bootstrap_servers,
            "group.id": f"{self.settings.app_id}-gateway-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            # A long poll: the broker answers as soon as an outcome is readable (for
            # read_committed, when the transaction's marker lands), so waiting longer costs no
            # latency, while a 5 ms poll cost the broker ~200 idle fetches a second per consumer.
            "fetch.wait.max.ms": 500,
            "socket.nagle.disable": True,
        })
        try:
            metadata = consumer.list_topics(timeout=30)
            assignment = []
            for topic in (COMMITTED, REJECTED, REPLIES):
                partitions = metadata.topics.get(topic)
                if partitions is None or partitions.error is not None:
                    raise RuntimeError(f"topic {topic} is missing; run `streamledger topics create`")
                for partition in partitions.partitions:
                    # Start at the concrete end offset: outcomes of requests produced
                    # before this gateway started are not ours to wait for.
                    start = positions.get((topic, partition))
                    if start is None:
                        _low, start = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
                        positions[(topic, partition)] = start
                    assignment.append(TopicPartition(topic, partition, start))
            consumer.assign(assignment)
            self._ready.set()
            while not self._stop.is_set():
                for message in consume_available(consumer, 1000, 0.1):
                    if message.error() is None:
                        positions[(message.topic(), message.partition())] = message.offset() + 1
                        self._dispatch(message)
                    elif message.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("reply consumer: %s", message.error())
        finally:
            consumer.close()

    def _dispatch(self, message) -> None:
        request_id = None
        for name, value in message.headers() or ():
            if name == "request_id":
                request_id = value.decode()
                break
        if request_id is None or request_id not in self._waiters:
            return
        kind = None
        try:
            topic = message.topic()
            if topic == COMMITTED:
                outcome: Committed | Rejected = Committed(request_id, codecs.decode_log_entry(message.value()))
            elif topic == REJECTED:
                outcome = codecs.decode_rejection(message.value())
            else:
                _request_id, _ledger, kind, original = codecs.decode_reply(message.value())
                outcome = original if isinstance(original, Rejected) else Committed(request_id, original)
        except codecs.CodecError as error:
            log.warning("undecodable outcome for %s: %s", request_id, error)
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._resolve, request_id, Answer(outcome, kind))

    def _resolve(self, request_id: str, answer: "Answer") -> None:
        future = self._waiters.get(request_id)
        if future is not None and not future.done():
            future.set_result(answer)
