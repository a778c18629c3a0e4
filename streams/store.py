"""RocksDB state stores: one database per assigned partition, opened from Rust by the
native module (`native/src/store.rs`) or, without it, by rocksdict.

The core reads typed values under tuple keys (see `ledger/state.py`); this module lays
them out as bytes. Keys: a kind letter, then `\\x00`-separated UTF-8 segments, integers as
8-byte big-endian so RocksDB's byte order is numeric order (a range scan over
`T\\x00<ledger>\\x00` walks transactions by id). Values: compact JSON per kind, except
volumes ("input,output" in decimal: the hottest value, arbitrary precision).

`commit` writes a batch of state changes *and* the topic positions they reflect in one
RocksDB write batch, so the store and its recorded position never disagree.

No write-ahead log (as Kafka Streams runs RocksDB): the log topics are the durable copy.
A crash loses what was still in the memtables — data and positions together, since a
flush persists a prefix of the writes — and recovery replays it from the recorded
positions. That bounds the replay by the memtables' size (the write-buffer manager's
4 x STREAMLEDGER_ROCKSDB_WRITE_BUFFER_MB), and the worker flushes a store when its
partition goes quiet (`flush`) and on close. Measured: the WAL's copy into the page
cache and its checksums were ~4 us of ~27 us of the worker's CPU per uniform request.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from functools import lru_cache

from streams.fastjson import dumps_json
from pathlib import Path

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteBufferManager, WriteOptions

try:  # the worker's native module (native/, `make install`): RocksDB opened from Rust
    from streamledger_native import Store as NativeStore
    from streamledger_native import StoreBatch as NativeBatch
except ImportError:  # pragma: no cover - rocksdict then opens the stores
    NativeStore = NativeBatch = None

from ledger.machine import Rejected  # noqa: F401  (kept for type context)
from ledger.machine import _transaction_payload
from ledger.model import NEW_TRANSACTION, LogEntry, Posting, Transaction, Volumes, volumes_json
from ledger.state import (
    ACCOUNT, EFFECTIVE, HEAD, IDEMPOTENCY, LEDGER, LOG, REFERENCE, REQUEST, TRANSACTION, VOLUMES,
    AccountRecord, Head, IdempotencyRecord, LedgerInfo, RequestRecord,
)
from ledger.timeutil import format_rfc3339, parse_rfc3339

_SEP = b"\x00"
_MISSING = object()
_CACHED_KINDS = frozenset({VOLUMES, HEAD, ACCOUNT, LEDGER})
_POSITION_PREFIX = b"\xffpos\x00"
# The store's layout version. 1: up to session 9 (no key); 2: log entries of new
# transactions kept by reference to their transaction records (`stored_log_fields`).
# A store says the highest version that ever wrote to it; this code reads every version
# up to its own, and refuses a newer one instead of misreading it.
STORE_FORMAT = 2
_FORMAT_KEY = b"\xffformat"


class StoreError(Exception):
    pass


def encode_key(key: tuple) -> bytes:
    last = key[-1]
    kind = type(last)
    if kind is str:  # the common case: every segment is text
        return "\x00".join(key).encode()
    if kind is int:  # transaction and log ids: the only integer segment is the last
        return "\x00".join(key[:-1]).encode() + _SEP + last.to_bytes(8, "big")
    if kind is bytes:  # an effective moment (ledger.state.effective_moment)
        return "\x00".join(key[:-1]).encode() + _SEP + last
    raise TypeError(f"a key's last segment is text, an int or bytes, not {kind.__name__}: {key!r}")


def _dumps(value: object) -> bytes:
    return dumps_json(value)


def encode_value(kind: str, value: object) -> bytes:
    if kind == VOLUMES or kind == EFFECTIVE:
        return b"%d,%d" % (value.input, value.output)  # type: ignore[union-attr]
    if kind == HEAD:
        h: Head = value  # type: ignore[assignment]
        return _dumps([h.last_log_id, base64.b64encode(h.last_hash or b"").decode(),
                       h.last_transaction_id, h.last_date, h.last_hash is None, h.max_timestamp])
    if kind == REFERENCE:
        return str(value).encode()
    if kind == LEDGER:
        i: LedgerInfo = value  # type: ignore[assignment]
        return _dumps([i.name, i.added_at, i.bucket, i.metadata, i.features])
    if kind == ACCOUNT:
        a: AccountRecord = value  # type: ignore[assignment]
        return _dumps([a.address, a.metadata, a.first_usage, a.insertion_date, a.updated_at])
    if kind == TRANSACTION:
        return _dumps(transaction_to_record(value))  # type: ignore[arg-type]
    if kind == IDEMPOTENCY:
        r: IdempotencyRecord = value  # type: ignore[assignment]
        return _dumps([r.input_hash, r.request_id])
    if kind == REQUEST:
        q: RequestRecord = value  # type: ignore[assignment]
        return _dumps([q.ledger, q.log_id, q.code, q.message, q.details, q.date])
    if kind == LOG:
        return _dumps(stored_log_fields(value))  # type: ignore[arg-type]
    raise AssertionError(f"unknown key kind {kind!r}")


def decode_value(kind: str, raw: bytes, read=None) -> object:
    """`read` (raw key -> raw value or None): the store, for a log entry kept by
    reference to its transaction (`stored_log_fields`)."""
    if kind == VOLUMES or kind == EFFECTIVE:
        input_text, output_text = raw.split(b",")
        return Volumes(int(input_text), int(output_text))
    if kind == REFERENCE:
        return int(raw)
    v = json.loads(raw)
    if kind == HEAD:
        return Head(v[0], None if v[4] else base64.b64decode(v[1]), v[2], v[3], v[5] if len(v) > 5 else None)
    if kind == LEDGER:
        return LedgerInfo(name=v[0], added_at=v[1], bucket=v[2], metadata=v[3], features=v[4])
    if kind == ACCOUNT:
        return AccountRecord(v[0], v[1], v[2], v[3], v[4])
    if kind == TRANSACTION:
        return transaction_from_record(v)
    if kind == IDEMPOTENCY:
        return IdempotencyRecord(v[0], v[1])
    if kind == REQUEST:
        return RequestRecord(ledger=v[0], log_id=v[1], code=v[2], message=v[3], details=v[4], date=v[5])
    if kind == LOG:
        marker = v[9] if len(v) > 9 else 0
        if marker == _EFFECTIVE_LEFT_OUT:
            transaction = v[3]["transaction"]
            transaction[_EFFECTIVE_VOLUMES] = transaction[_POST_COMMIT_VOLUMES]
        elif marker in (_BY_REFERENCE, _BY_REFERENCE_NO_EFFECTIVE):
            transaction_id, metadata = v[3]
            record = None if read is None else read(encode_key((TRANSACTION, v[0], transaction_id)))
            if record is None:
                raise StoreError(f"log entry {v[0]}/{v[1]} is kept by reference to transaction "
                                 f"{transaction_id}, which the store lacks")
            v[3] = _logged_data(json.loads(record), metadata, marker == _BY_REFERENCE)
        return LogEntry(v[0], v[1], v[2], v[3], v[4], v[5], v[6], base64.b64decode(v[7]), v[8])
    raise AssertionError(f"unknown key kind {kind!r}")


_POST_COMMIT_VOLUMES = "postCommitVolumes"
_EFFECTIVE_VOLUMES = "postCommitEffectiveVolumes"
# The 10th field of a stored log entry, when there is one: how its data is kept.
_EFFECTIVE_LEFT_OUT = 1  # whole, but for the effective volumes (`stored_log_data`)
_BY_REFERENCE = 2  # as [transaction id, metadata], effective volumes = post-commit ones
_BY_REFERENCE_NO_EFFECTIVE = 3  # the same, for a ledger that keeps no effective volumes


def stored_log_fields(e: LogEntry) -> list:
    """A log entry as the store keeps it: a JSON array of its fields, the data last
    but one; a 10th field says how the data is kept, when not whole.

    A new transaction's data (~480 of the ~910 bytes a transfer wrote to the store) says
    again what its transaction record says: its postings, dates, reference and
    post-commit volumes, under (T, ledger, id), written in the same batch and never
    changed in those fields (a revert or a metadata change rewrites only the record's
    metadata, revertedAt and updatedAt). Such data is kept as [transaction id, metadata
    as logged] and rendered back from the record on reading (`_logged_data`): entries
    of ~130 bytes. Only data that renders back byte for byte is kept so (`_by_reference`);
    anything else (account metadata, a back-dated transaction's own effective volumes,
    other log types) whole. Measured without Kafka (`bench/engine.py`, four alternated
    pairs): RocksDB's background work 4.8-5.8 -> 2.2-3.0 us per request.
    """
    fields = [e.ledger, e.id, e.type, e.data, e.date, e.idempotency_key,
              e.idempotency_hash, base64.b64encode(e.hash).decode(), e.request_id]
    by_reference = _by_reference(e) if e.type == NEW_TRANSACTION else None
    if by_reference is not None:
        fields[3], marker = by_reference
        fields.append(marker)
        return fields
    data, shared = stored_log_data(e.data)
    if shared:
        fields[3] = data
        fields.append(_EFFECTIVE_LEFT_OUT)
    return fields


# The shapes of a new transaction's data that `_logged_data` renders back, key by key.
_DATA_KEYS = ["transaction", "accountMetadata"]
_SHAPES = {
    tuple(keys): effective
    for effective in (False, True)
    for reference in (False, True)
    for keys in [["postings", "metadata", "timestamp", "id", "reverted", *(["reference"] if reference else []),
                  _POST_COMMIT_VOLUMES, "insertedAt", *([_EFFECTIVE_VOLUMES] if effective else [])]]
}
_POSTING_KEYS = list(Posting("", "", 0, "").to_json())
_VOLUMES_KEYS = list(Volumes().to_json())


def _by_reference(e: LogEntry) -> tuple[list, int] | None:
    """(data as kept, marker) when `_logged_data` renders the data back exactly from the
    transaction record `project_entry` writes with it, else None. Checked by shape (keys
    and their order, dates as their text, balances) rather than by rendering: a rebuild
    projects entries of up to 1000 postings, and rendering one to compare cost ~2.7 ms."""
    data = e.data
    if type(data) is not dict or list(data) != _DATA_KEYS or data["accountMetadata"]:
        return None
    transaction = data["transaction"]
    effective = _SHAPES.get(tuple(transaction)) if type(transaction) is dict else None
    if effective is None:
        return None
    post = transaction[_POST_COMMIT_VOLUMES]
    try:
        if (transaction["reverted"] is not False or type(transaction["id"]) is not int
                or type(transaction["metadata"]) is not dict
                or ("reference" in transaction and not transaction["reference"])
                or transaction["insertedAt"] != format_rfc3339(e.date)
                or _formatted_again(transaction["timestamp"]) != transaction["timestamp"]
                or (effective and transaction[_EFFECTIVE_VOLUMES] is not post and transaction[_EFFECTIVE_VOLUMES] != post)
                or any(type(p) is not dict or list(p) != _POSTING_KEYS for p in transaction["postings"])
                or any(type(v) is not dict or list(v) != _VOLUMES_KEYS or v["balance"] != v["input"] - v["output"]
                       for by_asset in post.values() for v in by_asset.values())):
            return None
    except (TypeError, ValueError, AttributeError):
        return None
    return [transaction["id"], transaction["metadata"]], _BY_REFERENCE if effective else _BY_REFERENCE_NO_EFFECTIVE


@lru_cache(maxsize=4096)
def _formatted_again(text: str) -> str | None:
    """A date's text as the record's integer renders it back (a round's transactions
    mostly share a few dates)."""
    try:
        return format_rfc3339(parse_rfc3339(text))
    except (TypeError, ValueError):
        return None


def _logged_data(record: list, metadata: dict, effective: bool) -> dict:
    """A new transaction's log data, from its stored record (`transaction_to_record`) and
    its metadata as logged, built by what built it: `_transaction_payload` (as
    `_create_transaction` calls it), then what `_project_transaction` adds."""
    t = transaction_from_record(record)
    transaction = _transaction_payload(t.id, t.postings, metadata, t.timestamp, t.reference)
    volumes = volumes_json(t.post_commit_volumes)
    transaction[_POST_COMMIT_VOLUMES] = volumes
    transaction["insertedAt"] = format_rfc3339(t.inserted_at)
    if effective:
        transaction[_EFFECTIVE_VOLUMES] = volumes
    return {"transaction": transaction, "accountMetadata": {}}


def stored_log_data(data: object) -> tuple[object, bool]:
    """A log entry's data as the store keeps it; -> (data, whether its transaction's
    effective volumes were left out).

    A transaction not back-dated carries its post-commit volumes twice, as
    `postCommitVolumes` and as `postCommitEffectiveVolumes` (its last key): ~130 of the
    ~670 bytes of a one-posting entry, the largest value a request writes. The store
    keeps them once (`decode_value` puts the key back, last, as it was); the log on
    ledger.committed carries both. Measured without Kafka (`bench/engine.py`, four
    alternated pairs): 19.4 -> 18.2 us of process CPU per request.
    """
    transaction = data.get("transaction") if isinstance(data, dict) else None
    if (not isinstance(transaction, dict) or _POST_COMMIT_VOLUMES not in transaction
            or next(reversed(transaction)) != _EFFECTIVE_VOLUMES):
        return data, False
    effective, post = transaction[_EFFECTIVE_VOLUMES], transaction[_POST_COMMIT_VOLUMES]
    if effective is not post and effective != post:  # (the state machine's are one object)
        return data, False
    kept = dict(transaction)
    del kept[_EFFECTIVE_VOLUMES]
    return {**data, "transaction": kept}, True


def transaction_to_record(t: Transaction) -> list:
    return [
        t.id, [[p.source, p.destination, p.amount, p.asset] for p in t.postings], t.metadata,
        t.timestamp, t.inserted_at, t.reference, t.reverted_at, t.updated_at,
        {a: {asset: [v.input, v.output] for asset, v in by.items()}
         for a, by in t.post_commit_volumes.items()},
    ]


def transaction_from_record(v: list) -> Transaction:
    return Transaction(
        id=v[0], postings=[Posting(*p) for p in v[1]], metadata=v[2], timestamp=v[3],
        inserted_at=v[4], reference=v[5], reverted_at=v[6], updated_at=v[7],
        post_commit_volumes={a: {asset: Volumes(*io) for asset, io in by.items()}
                             for a, by in v[8].items()},
    )


@dataclass(frozen=True)
class StoreOptions:
    """How big a partition store's RocksDB memory is (see `rocksdb_options`)."""

    block_cache_mb: int
    write_buffer_mb: int
    # Open the store from Rust (`streamledger_native.Store`) when the module is built.
    native: bool = True


@lru_cache(maxsize=None)
def _shared(block_cache_mb: int, write_buffers_mb: int) -> tuple[Cache, WriteBufferManager]:
    """One block cache and one memtable budget for every partition database of a worker:
    sizes per database would multiply with the number of partitions a worker owns."""
    return (
        Cache(block_cache_mb * 1024 * 1024),
        WriteBufferManager(write_buffers_mb * 1024 * 1024, False),
    )


def rocksdb_options(block_cache_mb: int, write_buffer_mb: int, native: bool = True) -> StoreOptions:
    """Explicit, small, shared RocksDB memory (faust's defaults are a 2 GiB cache and
    3x64 MiB buffers *per partition database*): `block_cache_mb` is one LRU cache for the
    whole worker; each database's memtable is `write_buffer_mb`, and all memtables
    together are held to 4x that by a shared write-buffer manager (flushes come sooner).
    The native module makes the same options (native/src/store.rs)."""
    return StoreOptions(block_cache_mb, write_buffer_mb, native)


# Level-0 files before a compaction into the base level (RocksDB's default 4; the native
# store's `L0_COMPACTION_TRIGGER`, which says why and what it measured).
L0_COMPACTION_TRIGGER = 8


def _rocksdict_options(block_cache_mb: int, write_buffer_mb: int) -> Options:
    cache, buffers = _shared(block_cache_mb, 4 * write_buffer_mb)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(write_buffer_mb * 1024 * 1024)
    options.set_max_write_buffer_number(2)
    options.set_level_zero_file_num_compaction_trigger(L0_COMPACTION_TRIGGER)
    options.set_write_buffer_manager(buffers)
    table = BlockBasedOptions()
    table.set_block_cache(cache)
    table.set_bloom_filter(10, False)
    options.set_block_based_table_factory(table)
    return options


class PartitionStore:
    """The state of one partition: every ledger whose key hashes to it."""

    def __init__(self, path: Path, options: StoreOptions, cache_entries_max: int = 50_000) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Opened from Rust when the native module is built: the native path then reads
        # and writes it without Python objects, and writes a round without the GIL while
        # the next one is applied (`commit_native`). Else rocksdict, with the same options.
        self.native = options.native and NativeStore is not None
        if self.native:
            self._db = NativeStore(str(path), options.block_cache_mb, options.write_buffer_mb)
        else:
            self._db = Rdict(str(path), _rocksdict_options(options.block_cache_mb, options.write_buffer_mb))
            no_wal = WriteOptions()
            no_wal.disable_wal = True
            self._db.set_write_options(no_wal)  # every write, batches included (see the module doc)
        self._writing = False  # a native round's write may be in flight (`commit_native`)
        self._check_format()
        self._unflushed = False  # written since the last flush
        # Decoded values of the small, hot kinds (balances, heads, accounts, ledgers),
        # read through and written through on commit; other kinds (transactions, log
        # entries of up to 1000 postings) are never cached, so never stale nor large.
        # Bounded by entry count; cleared wholesale when full, which costs one round of
        # RocksDB reads and keeps the hot path free of LRU bookkeeping. Values are
        # immutable once stored (the core copies before changing).
        self._cache: dict[tuple, object] = {}
        self._cache_entries_max = cache_entries_max
        # Counts commits. Queries read from the event loop's thread while a round commits
        # in another: a value read before a commit's write must not stay in the cache after
        # the commit updated it, so `get` drops what it cached if a commit wrote since it
        # started reading. A commit writes, counts, then updates the cache.
        self._commits = 0

    def _check_format(self) -> None:
        raw = self._db.get(_FORMAT_KEY)
        found = 1 if raw is None else int(raw)
        if found > STORE_FORMAT:
            self._db.close()
            raise StoreError(
                f"the store in {self.path} was written by a newer streamledger (store format {found}, "
                f"this version reads up to {STORE_FORMAT}): run that version, or delete this "
                "partition's folder and let the worker rebuild it from the log")
        if found < STORE_FORMAT:
            self._db.put(_FORMAT_KEY, str(STORE_FORMAT).encode())

    def get(self, key: tuple) -> object | None:
        cache = self._cache
        value = cache.get(key, _MISSING)
        if value is not _MISSING:
            return value
        commits = self._commits
        raw = self._db.get(encode_key(key))
        value = None if raw is None else decode_value(key[0], raw, self._db.get)
        if value is not None and key[0] in _CACHED_KINDS:
            if len(cache) >= self._cache_entries_max:
                cache.clear()
            cache[key] = value
            if commits != self._commits:  # a commit came in between: its update may be lost
                cache.pop(key, None)
        return value

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """Raw values of raw keys, in one RocksDB multi-get."""
        return self._db.get(keys)

    @property
    def reader(self):
        """What the native engine reads the store through: the native store itself, or
        the multi-get of rocksdict's."""
        return self._db if self.native else self._db.get

    def position(self, topic: str) -> int | None:
        self.wait()
        raw = self._db.get(_POSITION_PREFIX + topic.encode())
        return None if raw is None else int(raw)

    def commit(self, writes: list[tuple[tuple, object | None]], positions: dict[str, int]) -> None:
        """Write state changes and the positions they reflect atomically.

        A position never moves backwards: that would mean re-applying log entries the
        store already reflects, so it is a bug, and raises.
        """
        self.wait()
        # Each value encoded and handed over as it is made: a list of a replay's ~60,000
        # encoded pairs held at once fragmented the heap (a rebuild peaked at ~2.4 GB
        # instead of ~670 MB).
        batch = NativeBatch() if self.native else WriteBatch(raw_mode=True)
        for key, value in writes:
            encoded = encode_key(key)
            if value is None:
                batch.delete(encoded)
            else:
                batch.put(encoded, encode_value(key[0], value))
        for key, value in self._position_writes(positions):
            batch.put(key, value)
        self._db.write(batch)
        self._unflushed = True
        self._commits += 1
        cache = self._cache
        if len(cache) + len(writes) > self._cache_entries_max:
            cache.clear()
        for key, value in writes:
            kind = key[0]
            if value is None:
                cache.pop(key, None)
            elif kind in _CACHED_KINDS:
                cache[key] = value

    def commit_native(self, round_, positions: dict[str, int]) -> None:
        """`commit` of a native round (`streamledger_native.Round`): its writes are bytes
        already. The decoded values cached here may be stale after it: all dropped.

        A native store writes it on a thread of its own, without the GIL, and this returns
        at once: `wait` (and every other write, a flush, a close) waits for it. Until then
        reads may or may not see it; the native engine answers from its own cache for
        every value in it (`Engine.commit`), and queries wait (`Worker.store_for_query`).
        Measured: the write was ~1.4 us, building rocksdict's batch ~1.2 us per request,
        on the round's thread."""
        self.wait()
        extra = self._position_writes(positions)
        if self.native:
            self._db.write_round(round_, extra)
            self._writing = True
        else:
            batch = WriteBatch(raw_mode=True)
            round_.write_into(batch)
            for key, value in extra:
                batch.put(key, value)
            self._db.write(batch)
        self._unflushed = True
        self._commits += 1
        self._cache.clear()

    def wait(self) -> None:
        """The round `commit_native` handed over is in the store (raises what its write
        failed with)."""
        if self._writing:
            self._writing = False
            self._db.wait()
            # What a query cached while the write was in flight may be the older value.
            self._commits += 1
            self._cache.clear()

    def _position_writes(self, positions: dict[str, int]) -> list[tuple[bytes, bytes]]:
        writes = []
        for topic, offset in positions.items():
            current = self.position(topic)
            if current is not None and offset < current:
                raise StoreError(f"position of {topic} would move back from {current} to {offset}")
            writes.append((_POSITION_PREFIX + topic.encode(), str(offset).encode()))
        return writes

    def scan(self, prefix: tuple, start: bytes | None = None, reverse: bool = False):
        """The core's `Reader.scan`: (last key segment, value) under `prefix`."""
        raw_prefix = encode_key(prefix) + _SEP
        skip = len(raw_prefix)
        raw_start = None if start is None else raw_prefix + (start.encode() if isinstance(start, str) else start)
        text = prefix[0] != EFFECTIVE  # moments are bytes; every other last segment is text
        for key, value in self._scan_raw(prefix[0], raw_prefix, raw_start, reverse):
            yield (key[skip:].decode() if text else key[skip:]), value

    def scan_keys(self, prefix: tuple, *, start: tuple | None = None, reverse: bool = False):
        """Yield (key bytes, decoded value) for every key under `prefix`, in key order."""
        raw_prefix = encode_key(prefix) + (_SEP if len(prefix) > 1 else b"")
        raw_start = None if start is None else encode_key(start)
        return self._scan_raw(prefix[0], raw_prefix, raw_start, reverse)

    def _scan_raw(self, kind: str, raw_prefix: bytes, raw_start: bytes | None, reverse: bool):
        iterator = self._db.iter()
        if reverse:
            iterator.seek_for_prev(raw_prefix + b"\xff" * 32 if raw_start is None else raw_start)
        else:
            iterator.seek(raw_prefix if raw_start is None else raw_start)
        while iterator.valid():
            key = iterator.key()
            if not key.startswith(raw_prefix):
                break
            yield key, decode_value(kind, iterator.value(), self._db.get)
            if reverse:
                iterator.prev()
            else:
                iterator.next()

    @property
    def unflushed(self) -> bool:
        return self._unflushed

    def flush(self) -> None:
        """Persist the memtables (a crash after this replays nothing before it)."""
        self.wait()
        if self._unflushed:
            self._unflushed = False
            self._db.flush()

    def close(self) -> None:
        self.flush()
        self._db.close()
