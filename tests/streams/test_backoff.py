"""The worker's retry waits: doubling, bounded, counted and logged."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException

from streams import metrics, worker


async def test_waits_double_up_to_five_seconds_and_each_retry_is_counted(monkeypatch, caplog):
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(worker.asyncio, "sleep", sleep)
    retries_before = metrics.batch_retries._value.get()
    backoff = worker._Backoff(0.5)
    error = KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))
    with caplog.at_level(logging.WARNING, logger="streamledger.worker"):
        for _ in range(6):
            await backoff.wait("partition 3: taking it over", error)
    assert slept == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert metrics.batch_retries._value.get() - retries_before == 6
    assert "partition 3: taking it over failed" in caplog.records[0].getMessage()
    assert "retrying in 0.5s" in caplog.records[0].getMessage()
