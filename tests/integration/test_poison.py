"""Poison and bad input on ledger.requests: rejections with clear codes, nothing else lost."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from ledger.commands import CreateTransaction, Request
from ledger.model import Posting
from streams import codecs
from streams.topics import REJECTED, REQUESTS, partition_for, producer_config
from tests.integration.stack import http

pytestmark = pytest.mark.integration


def _outcomes(bootstrap: str, wanted: set[str], timeout: float = 60) -> dict[str, object]:
    """Rejections (by request id) for `wanted`, read from the start of ledger.rejected."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "isolation.level": "read_committed", "enable.auto.commit": False})
    metadata = consumer.list_topics(REJECTED, timeout=10)
    consumer.assign([TopicPartition(REJECTED, p, 0) for p in metadata.topics[REJECTED].partitions])
    found: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while wanted - set(found) and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=0.5):
                if message.error() is None:
                    rejection = codecs.decode_rejection(message.value())
                    if rejection.request_id in wanted:
                        found[rejection.request_id] = rejection
    finally:
        consumer.close()
    return found


def test_bad_records_are_rejected_and_the_worker_keeps_going(stack, kafka_bootstrap):
    ledger = f"p-{uuid.uuid4().hex[:8]}"
    stack.create_ledger(ledger)
    partition = partition_for(ledger.encode(), 8)
    producer = Producer(producer_config(kafka_bootstrap))

    def send(value: bytes, key: bytes = ledger.encode()) -> int:
        offsets = []
        producer.produce(REQUESTS, value, key, on_delivery=lambda e, m: offsets.append(m.offset()))
        producer.flush(10)
        return offsets[0]

    def request(request_id: str, ledger_name: str, amount: int) -> bytes:
        command = CreateTransaction(postings=(Posting("world", "a", amount, "USD"),))
        return codecs.encode_requests([Request(request_id, ledger_name, command, received_at=0)])

    not_avro = send(b"this is not avro")
    unknown_schema = send(b"\xc3\x01" + b"\x12" * 8 + b"\x00")
    # A valid record, but a field out of range: the worker validates like the gateway.
    schema = codecs.codec("RequestBatch")
    bad_amount = schema.encode({"requests": [{
        "request_id": "bad-amount-" + ledger, "ledger": ledger, "received_at": 0,
        "command": ("io.streamledger.CreateTransaction", {
            "postings": [{"source": "world", "destination": "a", "amount": "-5", "asset": "USD"}]})}]})
    send(bad_amount)
    ghost = next(f"ghost-{i}" for i in range(10_000) if partition_for(f"ghost-{i}".encode(), 8) == partition)
    send(request("no-ledger-" + ledger, ghost, 1), ghost.encode())
    wrong = next(f"x-{i}" for i in range(10_000) if partition_for(f"x-{i}".encode(), 8) != partition)
    send(request("wrong-partition-" + ledger, wrong, 1), ledger.encode())  # keyed as `ledger`
    send(request("good-" + ledger, ledger, 7))

    expected = {
        f"{REQUESTS}/{partition}/{not_avro}": "INVALID_RECORD",
        f"{REQUESTS}/{partition}/{unknown_schema}": "INVALID_RECORD",
        "bad-amount-" + ledger: "VALIDATION",
        "no-ledger-" + ledger: "LEDGER_NOT_FOUND",
        "wrong-partition-" + ledger: "VALIDATION",
    }
    found = _outcomes(kafka_bootstrap, set(expected))
    assert {request_id: r.code for request_id, r in found.items()} == expected
    assert "fingerprint" in found[f"{REQUESTS}/{partition}/{unknown_schema}"].message
    assert "murmur2" in found["wrong-partition-" + ledger].message
    # ... and the good request after all of them was applied.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        account = http("GET", f"{stack.url}/v2/{ledger}/accounts/a")
        if account.status == 200 and account.body["data"]["balances"] == {"USD": 7}:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the valid request was not applied: {account.body}")
