from __future__ import annotations

import pytest

from streams.topics import ensure_topics
from tests.integration.stack import Stack


@pytest.fixture(scope="session")
def stack(kafka_bootstrap, tmp_path_factory):
    """One worker and the gateway, as separate processes, for the whole session."""
    ensure_topics(kafka_bootstrap, 8)
    running = Stack(kafka_bootstrap, tmp_path_factory.mktemp("stack"))
    running.start_worker("w1")
    try:
        running.start_gateway()
        running.create_ledger("warmup")
        yield running
    finally:
        running.stop()
