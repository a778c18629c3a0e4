"""The ledger's topics, their creation, and Java-compatible partitioning.

All three topics have the same partition count and are keyed by ledger name, so a ledger's
requests, log entries and rejections share a partition number. Every producer must place
keys exactly as Java's default partitioner does (murmur2): librdkafka's default
(`consistent_random`, CRC32) does not, so always build producer configs with
`producer_config()`.
"""

from __future__ import annotations

import logging
import time

from ledger import limits

log = logging.getLogger("streamledger.topics")

REQUESTS = "ledger.requests"
COMMITTED = "ledger.committed"
REJECTED = "ledger.rejected"
# Answers that are not log entries nor rejections: dry runs, idempotency hits, and the
# original outcome re-published for a redelivered request id. Not a source of truth.
REPLIES = "ledger.replies"
ALL_TOPICS = (REQUESTS, COMMITTED, REJECTED, REPLIES)

# The outcome topics take records of up to `ledger.limits.log_record_bytes_max` (a log
# entry of a large transaction outgrows Kafka's default 1 MB); `ensure_topics` raises it
# on such topics created before.
_OUTCOME_RECORDS = {"max.message.bytes": str(limits.log_record_bytes_max)}
# The committed log is the database and rejections are part of the dedupe state a store is
# rebuilt from: neither may ever expire. Replies are only for waiting callers.
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    REQUESTS: {},
    COMMITTED: {"retention.ms": "-1", "retention.bytes": "-1", **_OUTCOME_RECORDS},
    REJECTED: {"retention.ms": "-1", "retention.bytes": "-1", **_OUTCOME_RECORDS},
    REPLIES: {"retention.ms": str(24 * 3600 * 1000), **_OUTCOME_RECORDS},
}

PARTITIONER = "murmur2_random"  # librdkafka's name for Java's murmur2 (null keys: random)


class TopicMismatchError(RuntimeError):
    """A ledger topic exists with a partition count other than the one asked for."""


# -------------------------------------------------------------------- partitioning


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2` (MurmurHash2, seed 0x9747b28c) as a signed 32-bit int."""
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    n4 = length & ~3
    for i in range(0, n4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[n4 + 2] << 16
    if rest >= 2:
        h ^= data[n4 + 1] << 8
    if rest >= 1:
        h ^= data[n4]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Java's default partitioner (and librdkafka's `murmur2_random`) picks
    for a non-null `key`: `toPositive(murmur2(key)) % partitions`."""
    if key is None:
        raise ValueError("partition_for needs a key: null keys are spread at random")
    if partitions <= 0:
        raise ValueError(f"partitions must be positive, got {partitions}")
    return (murmur2(bytes(key)) & 0x7FFFFFFF) % partitions


# ---------------------------------------------------------------------- consuming


def consume_available(consumer, max_messages: int, timeout: float) -> list:
    """Wait up to `timeout` s for one message, then add what is already fetched (up to
    `max_messages` in all) without waiting more.

    librdkafka's `consume(n, timeout)` returns only when n messages arrived or the timeout
    expired: at a low rate every message sat out the timeout (measured: a reply consumer
    on `consume(1000, timeout=0.1)` added ~50 ms on average to every answer).
    """
    first = consumer.poll(timeout)
    if first is None:
        return []
    if max_messages <= 1:
        return [first]
    return [first, *consumer.consume(max_messages - 1, 0)]


# ------------------------------------------------------------------------ configs

# confluent-kafka's own (Python-side) settings keep their underscores.
_PY_KEYS = frozenset(
    {"error_cb", "throttle_cb", "stats_cb", "oauth_cb", "on_delivery", "on_commit", "logger"}
)


def _conf_key(name: str) -> str:
    return name if "." in name or name in _PY_KEYS else name.replace("_", ".")


def producer_config(bootstrap: str, **extra: object) -> dict:
    """A confluent-kafka producer config: Java-compatible murmur2 partitioning (always),
    `acks=all`, idempotence on, Nagle off.

    Extra settings may be given with librdkafka's dotted names (`**{"linger.ms": 1}`) or as
    keywords with underscores for dots (`linger_ms=1`, `transactional_id="..."`). The
    partitioner cannot be changed: records of one ledger must land where every other
    producer and faust's router put them.
    """
    conf: dict = {
        "bootstrap.servers": bootstrap,
        "partitioner": PARTITIONER,
        "acks": "all",
        "enable.idempotence": True,
        # Nagle's algorithm against delayed ACKs held every transaction commit ~25 ms on
        # loopback (measured: 28 ms → 3.5 ms median per commit with it off).
        "socket.nagle.disable": True,
    }
    for name, value in extra.items():
        key = _conf_key(name)
        if key == "partitioner" and value != PARTITIONER:
            raise ValueError(
                f"partitioner must stay {PARTITIONER!r} (Java-compatible murmur2), got {value!r}"
            )
        conf[key] = value
    return conf


# ------------------------------------------------------------------------- topics


def ensure_topics(
    bootstrap: str,
    partitions: int = 8,
    *,
    replication_factor: int = -1,
    config: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> dict[str, int]:
    """Create the ledger topics with `partitions` partitions each, idempotently.

    Topics that already exist with the same count are left alone; one that exists with a
    different count raises `TopicMismatchError` (partitioning by ledger would break).
    `replication_factor=-1` means the cluster's `default.replication.factor`.
    Returns {topic: partition count}.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    existing = _partition_counts(admin, timeout)
    missing = [t for t in ALL_TOPICS if t not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(t, num_partitions=partitions, replication_factor=replication_factor,
                         config={**TOPIC_CONFIGS[t], **(config or {})})
                for t in missing
            ],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for topic, fut in futures.items():
            try:
                fut.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    # Metadata can lag a moment behind CreateTopics: wait until all are visible.
    while True:
        counts = _partition_counts(admin, max(1.0, deadline - time.monotonic()))
        if all(counts.get(t) for t in ALL_TOPICS):
            break
        if time.monotonic() > deadline:
            absent = [t for t in ALL_TOPICS if not counts.get(t)]
            raise TimeoutError(f"topics {absent} not visible on {bootstrap} after {timeout} s")
        time.sleep(0.1)
    wrong = {t: counts[t] for t in ALL_TOPICS if counts[t] != partitions}
    if wrong:
        raise TopicMismatchError(
            f"ledger topics must all have {partitions} partitions, but on {bootstrap} "
            + ", ".join(f"{t} has {n}" for t, n in wrong.items())
            + ". Use the existing count (STREAMLEDGER_PARTITIONS) or recreate the topics; "
            "changing it would move ledgers to other partitions."
        )
    _raise_record_limits(admin, {t: TOPIC_CONFIGS[t]["max.message.bytes"] for t in ALL_TOPICS
                                 if t in existing and "max.message.bytes" in TOPIC_CONFIGS[t]}, timeout)
    return {t: counts[t] for t in ALL_TOPICS}


def _raise_record_limits(admin, wanted: dict[str, str], timeout: float) -> None:
    """Give topics created before their record limit was configured ({topic:
    max.message.bytes}, from `TOPIC_CONFIGS`) at least that limit: a log entry above it
    would fail its round forever."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    if not wanted:
        return
    try:
        described = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in wanted],
                                           request_timeout=timeout)
        low = [resource.name for resource, future in described.items()
               if int(future.result()["max.message.bytes"].value) < int(wanted[resource.name])]
        if not low:
            return
        altered = admin.incremental_alter_configs([ConfigResource(ResourceType.TOPIC, t, incremental_configs=[
            ConfigEntry("max.message.bytes", wanted[t], incremental_operation=AlterConfigOpType.SET)]) for t in low])
        for future in altered.values():
            future.result()
        log.info("raised max.message.bytes of %s", ", ".join(f"{t} to {wanted[t]}" for t in low))
    except KafkaException as error:
        log.warning("could not raise max.message.bytes of %s (%s): a log entry above a topic's limit "
                    "would stop its partition; set it by hand", wanted, error)


def describe_topics(bootstrap: str, timeout: float = 10.0) -> dict[str, int | None]:
    """{topic: partition count, or None when missing} for the three ledger topics."""
    from confluent_kafka.admin import AdminClient

    counts = _partition_counts(AdminClient({"bootstrap.servers": bootstrap}), timeout)
    return {t: counts.get(t) for t in ALL_TOPICS}


def _partition_counts(admin, timeout: float) -> dict[str, int]:
    md = admin.list_topics(timeout=timeout)
    return {
        name: len(t.partitions)
        for name, t in md.topics.items()
        if t.error is None and name in ALL_TOPICS
    }
