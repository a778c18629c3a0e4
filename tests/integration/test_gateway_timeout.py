"""A request the worker does not answer in time is a 504 with a clear message, not a hang."""

from __future__ import annotations

import dataclasses

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from streams.settings import Settings

pytestmark = pytest.mark.integration


async def test_an_unanswered_request_is_a_504_with_a_clear_message(kafka_bootstrap, stack):
    # The worker lingers at least a few milliseconds per batch: 1 ms is never enough.
    settings = dataclasses.replace(Settings(), bootstrap_servers=kafka_bootstrap, reply_timeout_ms=1,
                                   worker_url=stack.env["STREAMLEDGER_WORKER_URL"])
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post("/v2/warmup/transactions", json={
            "postings": [{"source": "world", "destination": "a", "amount": 1, "asset": "USD"}]})
        assert response.status == 504
        body = await response.json()
        assert body["errorCode"] == "TIMEOUT"
        assert "Idempotency-Key" in body["errorMessage"]


async def test_an_unreachable_worker_is_a_503_for_reads(kafka_bootstrap):
    settings = dataclasses.replace(Settings(), bootstrap_servers=kafka_bootstrap,
                                   worker_url="http://127.0.0.1:9", query_retry_ms=300)
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.get("/v2/warmup/accounts/a")
        assert response.status == 503
        assert (await response.json())["errorCode"] == "UNAVAILABLE"
