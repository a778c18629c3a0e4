"""The real Kafka 4.3.1 broker the suite starts: topics, transactions (confluent-kafka and
aiokafka, faust's client), Java-compatible partitioning, and restarts."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams import topics
from streams.topics import murmur2, partition_for, producer_config

# ---------------------------------------------------------------- helpers


def _new_topic(bootstrap: str, partitions: int = 1) -> str:
    name = f"test.{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the future
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[
        name
    ].result()
    return name


def _consume_all(bootstrap: str, topic: str, *, isolation: str = "read_committed",
                 expect: int = 1, idle: float = 0.5, timeout: float = 20.0) -> list:
    """Every record of `topic` from the start (assigned, no group join): stops `idle` s
    after the last record once at least `expect` records arrived, or at `timeout`."""
    from confluent_kafka import OFFSET_BEGINNING

    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"g-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "isolation.level": isolation,
    })
    n = len(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, i, OFFSET_BEGINNING) for i in range(n)])
    out: list = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.1)
            if m is None:
                if len(out) >= expect and time.monotonic() - last > idle:
                    break
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(m.error())
            out.append(m)
            last = time.monotonic()
    finally:
        c.close()
    return out


# ------------------------------------------------------ pure (no broker needed)


def test_murmur2_matches_kafka_utils_test_vectors():
    # org.apache.kafka.common.utils.UtilsTest#testMurmur2
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for key, expected in cases.items():
        assert murmur2(key) == expected, key


def test_producer_config_always_murmur2():
    conf = producer_config("h:1", linger_ms=2, **{"batch.num.messages": 10})
    assert conf["partitioner"] == "murmur2_random"
    assert conf["acks"] == "all" and conf["enable.idempotence"] is True
    assert conf["linger.ms"] == 2 and conf["batch.num.messages"] == 10
    with pytest.raises(ValueError):
        producer_config("h:1", partitioner="consistent_random")


# ------------------------------------------------------------ on the broker


@pytest.mark.integration
def test_ensure_topics_is_idempotent_with_8_partitions(kafka_bootstrap):
    first = topics.ensure_topics(kafka_bootstrap, partitions=8)
    again = topics.ensure_topics(kafka_bootstrap, partitions=8)
    assert first == again == {t: 8 for t in topics.ALL_TOPICS}
    assert topics.describe_topics(kafka_bootstrap) == first
    with pytest.raises(topics.TopicMismatchError, match="8"):
        topics.ensure_topics(kafka_bootstrap, partitions=4)


@pytest.mark.integration
def test_outcome_topics_take_large_log_entries_even_when_created_before(kafka_bootstrap):
    """New outcome topics are created with max.message.bytes at the log's record bound; one
    created before with Kafka's default (an older streamledger) is raised to it."""
    import uuid

    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

    from ledger import limits

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})

    def limit(topic: str) -> int:
        [future] = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
        return int(future.result(30)["max.message.bytes"].value)

    topics.ensure_topics(kafka_bootstrap, partitions=8)
    for topic in (topics.COMMITTED, topics.REJECTED, topics.REPLIES):
        assert limit(topic) == limits.log_record_bytes_max
    old = f"old-outcomes-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(old, 1, 1)])[old].result(30)
    assert limit(old) < limits.log_record_bytes_max
    wanted = {old: str(limits.log_record_bytes_max)}
    topics._raise_record_limits(admin, wanted, 30)  # noqa: SLF001
    assert limit(old) == limits.log_record_bytes_max
    topics._raise_record_limits(admin, wanted, 30)  # noqa: SLF001 — already there: nothing to do


@pytest.mark.integration
def test_future_timestamps_are_accepted(kafka_bootstrap):
    # Kafka 4.x rejects records stamped > 1 h ahead unless log.message.timestamp.after.max.ms
    # is lifted; tests with fixed or future clocks rely on the lift.
    topic = _new_topic(kafka_bootstrap)
    future_ms = int(time.time() * 1000) + 2 * 24 * 3600 * 1000
    errors: list = []
    p = Producer(producer_config(kafka_bootstrap))
    p.produce(topic, key=b"k", value=b"v", timestamp=future_ms,
              on_delivery=lambda err, msg: errors.append(err))
    assert p.flush(20) == 0
    assert errors == [None]
    (m,) = _consume_all(kafka_bootstrap, topic, expect=1)
    assert m.timestamp()[1] == future_ms


@pytest.mark.integration
def test_consume_available_does_not_wait_out_its_timeout(kafka_bootstrap):
    """librdkafka's consume(n, timeout) holds a lone message until n arrived or the timeout
    expired; consume_available hands it over at once, with whatever else is fetched."""
    topic = _new_topic(kafka_bootstrap)
    producer = Producer(producer_config(kafka_bootstrap, linger_ms=0))
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}",
                         "fetch.wait.max.ms": 10})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        for value in (b"a", b"b", b"c"):
            producer.produce(topic, value, partition=0)
        producer.flush(10)
        got: list = []
        deadline = time.monotonic() + 20
        while len(got) < 3 and time.monotonic() < deadline:
            got += [m.value() for m in topics.consume_available(consumer, 1000, 0.5) if m.error() is None]
        assert got == [b"a", b"b", b"c"]
        timeout = 20.0
        started = time.monotonic()
        assert topics.consume_available(consumer, 1000, 0.2) == []  # nothing there: waits, returns empty
        producer.produce(topic, b"d", partition=0)
        producer.flush(10)
        late = topics.consume_available(consumer, 1000, timeout)
        assert [m.value() for m in late] == [b"d"]
        # Returned with the message, not at the timeout (consume(1000, 20) would take 20 s).
        assert time.monotonic() - started < timeout / 2
    finally:
        consumer.close()


@pytest.mark.integration
def test_confluent_transactions_read_committed(kafka_bootstrap):
    topic = _new_topic(kafka_bootstrap)
    p = Producer(producer_config(kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex}"))
    p.init_transactions(30)
    p.begin_transaction()
    for i in range(3):
        p.produce(topic, key=b"l1", value=b"committed-%d" % i)
    p.commit_transaction(30)
    p.begin_transaction()
    for i in range(2):
        p.produce(topic, key=b"l1", value=b"aborted-%d" % i)
    p.flush(10)  # the aborted records really reach the log before the abort marker
    p.abort_transaction(30)
    p.begin_transaction()
    p.produce(topic, key=b"l1", value=b"committed-3")
    p.commit_transaction(30)

    committed = [m.value() for m in _consume_all(kafka_bootstrap, topic, expect=4)]
    assert committed == [b"committed-0", b"committed-1", b"committed-2", b"committed-3"]
    uncommitted = [m.value() for m in _consume_all(kafka_bootstrap, topic,
                                                   isolation="read_uncommitted", expect=6)]
    assert b"aborted-0" in uncommitted and b"aborted-1" in uncommitted


@pytest.mark.integration
async def test_aiokafka_consume_and_transactional_send_offsets(kafka_bootstrap):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition as ATP

    src = _new_topic(kafka_bootstrap)
    dst = _new_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"

    plain = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await plain.start()
    try:
        for i in range(5):
            await plain.send_and_wait(src, b"in-%d" % i, key=b"ledger-a")
    finally:
        await plain.stop()

    consumer = AIOKafkaConsumer(
        src, bootstrap_servers=kafka_bootstrap, group_id=group,
        auto_offset_reset="earliest", enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    tx = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap,
                          transactional_id=f"atx-{uuid.uuid4().hex}")
    await tx.start()
    try:
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 5 and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                got.extend(records)
        assert [r.value for r in got] == [b"in-%d" % i for i in range(5)]

        # consume-transform-produce: outputs and the input offsets in one transaction
        async with tx.transaction():
            for r in got:
                await tx.send(dst, r.value.replace(b"in", b"out"), key=r.key)
            await tx.send_offsets_to_transaction({ATP(src, 0): got[-1].offset + 1}, group)
        # an aborted transaction leaves neither records nor offsets
        await tx.begin_transaction()
        await tx.send(dst, b"never", key=b"ledger-a")
        await tx.send_offsets_to_transaction({ATP(src, 0): 999}, group)
        await tx.abort_transaction()

        assert await consumer.committed(ATP(src, 0)) == 5
    finally:
        await tx.stop()
        await consumer.stop()

    reader = AIOKafkaConsumer(dst, bootstrap_servers=kafka_bootstrap,
                              auto_offset_reset="earliest", isolation_level="read_committed")
    await reader.start()
    try:
        out = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            batch = await reader.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(r.value for r in records)
            if len(out) >= 5 and not batch:
                break
    finally:
        await reader.stop()
    assert out == [b"out-%d" % i for i in range(5)]


@pytest.mark.integration
async def test_partition_placement_matches_partition_for(kafka_bootstrap):
    from aiokafka import AIOKafkaProducer

    keys = [b"", b"a", b"default", b"ledger-\xc3\xa9"] + [b"ledger-%d" % i for i in range(200)]
    for partitions in (8, 5):
        topic = _new_topic(kafka_bootstrap, partitions)
        placed: dict[bytes, int] = {}

        def on_delivery(err, msg):
            assert err is None, err
            placed[msg.key()] = msg.partition()

        p = Producer(producer_config(kafka_bootstrap, linger_ms=5))
        for k in keys:
            p.produce(topic, key=k, value=b"v", on_delivery=on_delivery)
        assert p.flush(30) == 0
        assert placed == {k: partition_for(k, partitions) for k in keys}
        assert len(set(placed.values())) == partitions  # all partitions used: a real check

        # aiokafka's (faust's) default partitioner agrees too
        ap = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await ap.start()
        try:
            for k in keys[:50]:
                md = await ap.send_and_wait(topic, b"v", key=k)
                assert md.partition == partition_for(k, partitions), k
        finally:
            await ap.stop()


@pytest.mark.integration
def test_the_broker_runs_with_its_whole_heap_and_logs_its_gc_pauses(kafka_broker):
    """As Kafka's start script runs it: -Xms = -Xmx (a heap grown from a small -Xms stayed
    small under load, and young-GC pauses came every 0.65 s), G1 with Kafka's pause goal."""
    argv = Path(f"/proc/{kafka_broker.pid}/cmdline").read_bytes().split(b"\0")
    heap = kafka_broker.heap.encode()
    assert b"-Xms" + heap in argv and b"-Xmx" + heap in argv
    assert b"-XX:MaxGCPauseMillis=20" in argv
    gc_log = kafka_broker.logs_dir / "gc.log"
    assert gc_log.is_file() and "Using G1" in gc_log.read_text()


@pytest.mark.integration
def test_restart_keeps_data_and_clients_continue(kafka_broker):
    bootstrap = kafka_broker.bootstrap_servers
    topic = _new_topic(bootstrap, 2)
    p = Producer(producer_config(bootstrap, linger_ms=1, message_timeout_ms=60000))
    for i in range(10):
        p.produce(topic, key=b"k%d" % (i % 3), value=b"before-%d" % i)
    assert p.flush(30) == 0

    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
    })
    c.subscribe([topic])
    seen: list[bytes] = []

    def drain(until: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(seen) < until and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is not None and not m.error():
                seen.append(m.value())
                c.commit(m, asynchronous=False)

    try:
        drain(10, 20)
        assert len(seen) == 10
        port = kafka_broker.port
        kafka_broker.restart()
        assert kafka_broker.is_running() and kafka_broker.port == port

        # the same producer and consumer carry on
        for i in range(10):
            p.produce(topic, key=b"k%d" % (i % 3), value=b"after-%d" % i)
        assert p.flush(60) == 0
        drain(20, 40)
    finally:
        c.close()
    assert sorted(seen) == sorted([b"before-%d" % i for i in range(10)]
                                  + [b"after-%d" % i for i in range(10)])
    # nothing was lost and nothing duplicated (idempotent producer, committed offsets)
    assert len(_consume_all(bootstrap, topic, expect=20)) == 20


@pytest.mark.integration
def test_crash_restart_then_transactions_work(kafka_broker):
    bootstrap = kafka_broker.bootstrap_servers
    topic = _new_topic(bootstrap)
    txid = f"crash-{uuid.uuid4().hex}"
    p = Producer(producer_config(bootstrap, transactional_id=txid))
    p.init_transactions(30)
    p.begin_transaction()
    p.produce(topic, key=b"l", value=b"before")
    p.commit_transaction(30)
    p.begin_transaction()
    p.produce(topic, key=b"l", value=b"in-flight")
    p.flush(10)

    kafka_broker.restart(graceful=False)  # SIGKILL mid-transaction

    # a new owner of the transactional id fences the old one and aborts its open transaction
    p2 = Producer(producer_config(bootstrap, transactional_id=txid))
    p2.init_transactions(60)
    p2.begin_transaction()
    p2.produce(topic, key=b"l", value=b"after")
    p2.commit_transaction(60)
    values = [m.value() for m in _consume_all(bootstrap, topic, expect=2)]
    assert values == [b"before", b"after"]
