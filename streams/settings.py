"""Configuration from the environment: one prefix, a sensible default for everything.

The gateway and the worker read the same settings, so `make dev`, docker-compose and the
tests configure both the same way. The table in the README lists every variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _flag(name: str, default: bool = False) -> bool:
    """An on/off variable: off by default unless set to 1, true, yes or on; on by default
    (`default=True`) unless set to 0, false, no or off."""
    value = _env(name, "on" if default else "off").strip().lower()
    return value not in ("0", "false", "no", "off") if default else value in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str = field(default_factory=lambda: _env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    app_id: str = field(default_factory=lambda: _env("STREAMLEDGER_APP_ID", "streamledger"))
    partitions: int = field(default_factory=lambda: int(_env("STREAMLEDGER_PARTITIONS", "8")))
    data_dir: Path = field(default_factory=lambda: Path(_env("STREAMLEDGER_DATA_DIR", ".data")))
    worker_host: str = field(default_factory=lambda: _env("STREAMLEDGER_WORKER_HOST", "127.0.0.1"))
    # The host other workers and the gateway use to reach this worker (docker: its service name).
    worker_advertised_host: str = field(default_factory=lambda: _env(
        "STREAMLEDGER_WORKER_ADVERTISED_HOST", _env("STREAMLEDGER_WORKER_HOST", "127.0.0.1")))
    worker_port: int = field(default_factory=lambda: int(_env("STREAMLEDGER_WORKER_PORT", "6066")))
    # The worker's identity, stable across its restarts and unique in the group: its
    # transactional id (a restart fences and aborts what its previous incarnation left open).
    worker_id: str = field(default_factory=lambda: _env("STREAMLEDGER_WORKER_ID", "%s:%s" % (
        _env("STREAMLEDGER_WORKER_ADVERTISED_HOST", _env("STREAMLEDGER_WORKER_HOST", "127.0.0.1")),
        _env("STREAMLEDGER_WORKER_PORT", "6066"))))
    # Comma-separated: the gateway tries each in turn (any worker forwards to the owner).
    worker_url: str = field(default_factory=lambda: _env("STREAMLEDGER_WORKER_URL", "http://127.0.0.1:6066"))
    # Reads that find no worker able to answer (down, partition moving) retry this long.
    query_retry_ms: int = field(default_factory=lambda: int(_env("STREAMLEDGER_QUERY_RETRY_MS", "5000")))
    gateway_host: str = field(default_factory=lambda: _env("STREAMLEDGER_GATEWAY_HOST", "127.0.0.1"))
    gateway_port: int = field(default_factory=lambda: int(_env("STREAMLEDGER_GATEWAY_PORT", "3068")))
    reply_timeout_ms: int = field(default_factory=lambda: int(_env("STREAMLEDGER_REPLY_TIMEOUT_MS", "10000")))
    batch_requests_max: int = field(default_factory=lambda: int(_env("STREAMLEDGER_BATCH_MAX", "4000")))
    batch_linger_ms: int = field(default_factory=lambda: int(_env("STREAMLEDGER_BATCH_LINGER_MS", "0")))
    gateway_linger_ms: float = field(default_factory=lambda: float(_env("STREAMLEDGER_GATEWAY_LINGER_MS", "1")))
    # One block cache for all of a worker's partition stores.
    rocksdb_block_cache_mb: int = field(default_factory=lambda: int(_env("STREAMLEDGER_ROCKSDB_BLOCK_CACHE_MB", "64")))
    # Memtable per partition store; all of a worker's together are held to 4x this. 32, not
    # 16: with 8 stores sharing 64 MB each flushed ~8 MB files, and compacting them cost the
    # worker ~3 us more per request under sustained load (bench/throughput.py, alternated).
    rocksdb_write_buffer_mb: int = field(default_factory=lambda: int(_env("STREAMLEDGER_ROCKSDB_WRITE_BUFFER_MB", "32")))
    # Decoded hot values (balances, heads, accounts) kept in memory per partition store.
    store_cache_entries: int = field(default_factory=lambda: int(_env("STREAMLEDGER_STORE_CACHE_ENTRIES", "50000")))
    # Postings per Kafka transaction (a request may carry up to 1000 postings).
    batch_postings_max: int = field(default_factory=lambda: int(_env("STREAMLEDGER_BATCH_POSTINGS_MAX", "20000")))
    # A round (apply, Kafka transaction, store write) slower than this is logged with its steps.
    slow_round_ms: int = field(default_factory=lambda: int(_env("STREAMLEDGER_SLOW_ROUND_MS", "1000")))
    max_poll_interval_ms: int = field(default_factory=lambda: int(_env("STREAMLEDGER_MAX_POLL_INTERVAL_MS", "120000")))
    # Join the consumer group as a static member (KIP-345) with STREAMLEDGER_WORKER_ID as
    # its instance id: a restarted worker gets its partitions back at once, with no
    # rebalance; but a stopped one is not replaced before the session timeout.
    static_membership: bool = field(default_factory=lambda: _flag("STREAMLEDGER_STATIC_MEMBERSHIP"))
    # Keep warm copies of the partitions this worker does not own (caught up from the log
    # every few seconds): a takeover replays only the log's tail, at the cost of every
    # worker replaying the whole log.
    standby: bool = field(default_factory=lambda: _flag("STREAMLEDGER_STANDBY"))
    # A log partition of this worker whose last stable offset has not moved for this long,
    # below its high watermark (or a catch-up that has not), is checked for a hanging
    # transaction (streams/hanging.py). Past the broker's abort of a dead worker's
    # transaction (15 s, checked every 10 s), so the check rarely finds one still held.
    hanging_transaction_s: float = field(default_factory=lambda: float(_env("STREAMLEDGER_HANGING_TRANSACTION_S", "30")))
    session_timeout_ms: int = field(default_factory=lambda: int(_env("STREAMLEDGER_SESSION_TIMEOUT_MS", "10000")))
    # A worker told to stop (SIGTERM, Ctrl-C) exits after this long even if its shutdown
    # has not finished (e.g. the broker is gone).
    shutdown_timeout_ms: int = field(default_factory=lambda: int(_env("STREAMLEDGER_SHUTDOWN_TIMEOUT_MS", "30000")))
    # Experimental Numscript features enabled for every script, comma-separated
    # (e.g. "experimental-oneof,experimental-overdraft-function").
    numscript_flags: frozenset = field(default_factory=lambda: frozenset(
        flag.strip() for flag in _env("STREAMLEDGER_NUMSCRIPT_FLAGS", "").split(",") if flag.strip()))
    # The native fast path for simple transfers (native/, Rust). "off" sends every request
    # through the Python state machine, which it reproduces byte for byte.
    native: bool = field(default_factory=lambda: _flag("STREAMLEDGER_NATIVE", default=True))
    # Open the partition stores from Rust (native/src/store.rs) rather than with rocksdict:
    # the same RocksDB and files, read and written by the native path without Python
    # objects, and a round's store write off the GIL. "off": rocksdict (as without native/).
    native_store: bool = field(default_factory=lambda: _flag("STREAMLEDGER_NATIVE_STORE", default=True))
    # The native path's outcomes handed to librdkafka from Rust (native/src/kafka.rs), into
    # the same confluent-kafka producer and transaction, instead of one Producer.produce()
    # call per record. "off": Producer.produce (as without native/).
    native_produce: bool = field(default_factory=lambda: _flag("STREAMLEDGER_NATIVE_PRODUCE", default=True))
    log_level: str = field(default_factory=lambda: _env("STREAMLEDGER_LOG_LEVEL", "info"))

    @property
    def worker_urls(self) -> list[str]:
        """`worker_url` as a list, without trailing slashes."""
        return [url.strip().rstrip("/") for url in self.worker_url.split(",") if url.strip()]

    def describe(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}
