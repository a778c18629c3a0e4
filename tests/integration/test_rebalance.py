"""Two workers in one group share partitions; joining and leaving moves them without loss
or duplication, and reads follow the ledgers to their new owner."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from confluent_kafka import Consumer, TopicPartition

from streams import codecs
from streams.topics import COMMITTED, REJECTED, ensure_topics
from streamledger.kafka_local import free_ports
from tests.integration.stack import Stack, http

pytestmark = pytest.mark.integration

LEDGERS = [f"rb{i}" for i in range(8)]


def _send_round(stack: Stack, round_name: str, per_ledger: int = 5) -> dict[str, int]:
    """Transfers on every ledger through the gateway; every one must be answered 200."""
    def one(args):
        ledger, index = args
        body = {"postings": [{"source": "world", "destination": f"u{index % 3}", "amount": 1, "asset": "USD"}],
                "reference": f"{round_name}-{index}"}
        deadline = time.monotonic() + 60
        while True:
            response = http("POST", f"{stack.url}/v2/{ledger}-{stack.app_id}/transactions", body)
            if response.status == 200:
                return ledger
            if response.status == 409:  # a retry after a 504 whose first try did commit
                return ledger
            assert response.status in (503, 504), response.body
            assert time.monotonic() < deadline, f"{ledger}: still {response.status}"
            time.sleep(0.5)

    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(one, [(ledger, i) for ledger in LEDGERS for i in range(per_ledger)]))
    return {ledger: done.count(ledger) for ledger in LEDGERS}


def _log(bootstrap: str, ledgers: set[str]) -> dict[str, list]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    metadata = consumer.list_topics(COMMITTED, timeout=10)
    partitions = list(metadata.topics[COMMITTED].partitions)
    consumer.assign([TopicPartition(COMMITTED, p, 0) for p in partitions])
    entries: dict[str, list] = {}
    at_end: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.5):
                if message.error() is not None:
                    at_end.add(message.partition())
                    continue
                entry = codecs.decode_log_entry(message.value())
                if entry.ledger in ledgers:
                    entries.setdefault(entry.ledger, []).append(entry)
    finally:
        consumer.close()
    return entries


@pytest.fixture(scope="module")
def own_kafka():
    """A broker of this module's own: the suite's shared broker has the session's worker
    consuming ledger.requests in another consumer group, which would apply these ledgers'
    requests too — two independent writers, two forks of each ledger's log."""
    from streamledger.kafka_local import LocalKafka

    with LocalKafka() as broker:
        yield broker.bootstrap_servers


def test_workers_joining_and_leaving_move_partitions_without_loss_or_duplication(own_kafka, tmp_path):
    kafka_bootstrap = own_kafka
    ensure_topics(kafka_bootstrap, 8)
    stack = Stack(kafka_bootstrap, tmp_path)
    second_port = free_ports(1)[0]
    stack.env["STREAMLEDGER_WORKER_URL"] += f",http://127.0.0.1:{second_port}"
    stack.worker_ports["w2"] = second_port
    stack.start_worker("w1")
    try:
        stack.start_gateway()
        for ledger in LEDGERS:
            stack.create_ledger(f"{ledger}-{stack.app_id}")
        _send_round(stack, "one-worker")

        stack.start_worker("w2")  # joins: about half the partitions move to it
        deadline = time.monotonic() + 90
        while "ready: replayed" not in stack.log("w2"):
            assert time.monotonic() < deadline, "the joining worker took no partition:\n" + stack.log("w2")
            time.sleep(0.5)
        _send_round(stack, "two-workers")

        stack.workers["w1"].terminate()  # leaves gracefully: w2 takes everything
        stack.workers["w1"].wait(30)
        _send_round(stack, "after-leave")

        names = {f"{ledger}-{stack.app_id}" for ledger in LEDGERS}
        log = _log(kafka_bootstrap, names)
        for name in names:
            transactions = [e for e in log[name] if e.type == "NEW_TRANSACTION"]
            ids = [e.id for e in log[name] if e.id > 0]
            assert ids == list(range(1, len(ids) + 1)), f"{name}: log ids {ids}"
            references = [e.data["transaction"]["reference"] for e in transactions]
            assert len(references) == len(set(references)) == 15, f"{name}: {references}"
            request_ids = [e.request_id for e in log[name]]
            assert len(request_ids) == len(set(request_ids))
            # Reads follow the ledger to its new owner.
            account = http("GET", f"{stack.url}/v2/{name}/accounts/world").body["data"]
            assert account["balances"] == {"USD": -15}
        listed = {row["name"] for row in http("GET", f"{stack.url}/v2?pageSize=1000").body["cursor"]["data"]}
        assert names <= listed
    finally:
        stack.stop()
