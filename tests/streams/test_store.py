"""The RocksDB partition store: byte layout, atomic positions, and replay equivalence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ledger.commands import create_transaction_from_json
from ledger.model import Volumes
from ledger.state import HEAD, TRANSACTION, VOLUMES, Overlay
from streams.store import NativeStore, PartitionStore, StoreError, encode_key, rocksdb_options
from tests.ledger.helpers import Ledger, posting


@pytest.fixture(params=["native", "rocksdict"])
def store(tmp_path, request):
    """A partition store opened from Rust (the worker's default) or by rocksdict: every
    test that takes one runs on both."""
    if request.param == "native" and NativeStore is None:
        pytest.skip("native module not built")
    s = PartitionStore(tmp_path / "p0", rocksdb_options(8, 4, native=request.param == "native"))
    assert s.native == (request.param == "native")
    yield s
    s.close()


def test_integer_keys_sort_numerically():
    keys = [encode_key((TRANSACTION, "main", n)) for n in (1, 2, 255, 256, 70_000)]
    assert keys == sorted(keys)


def test_commit_writes_state_and_position_together(store):
    store.commit([((VOLUMES, "main", "a", "USD"), Volumes(10**30, 1))], {"ledger.committed": 7})
    assert store.get((VOLUMES, "main", "a", "USD")) == Volumes(10**30, 1)
    assert store.position("ledger.committed") == 7


def test_a_position_never_moves_backwards(store):
    store.commit([], {"ledger.committed": 7})
    with pytest.raises(StoreError):
        store.commit([], {"ledger.committed": 6})


def test_every_state_value_round_trips_through_rocksdb(store):
    """Run a ledger in memory, copy its state into RocksDB, read back identical values."""
    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10), reference="ref", metadata={"k": "<v>"},
                    accountMetadata={"a": {"tier": "gold"}})
    ledger.transfer(posting("a", "b", 20))  # a rejection: a request record with a code
    store.commit(list(ledger.store.data.items()), {})
    for key, value in ledger.store.data.items():
        assert store.get(key) == value, key


def _day(n: int) -> int:
    return 1_700_000_000_000_000 + n * 86_400_000_000


def _stored(store, entry) -> list:
    import json

    from ledger.state import LOG

    return json.loads(store._db.get(encode_key((LOG, entry.ledger, entry.id))))  # noqa: SLF001


def _reads_back_as_logged(store, entry) -> None:
    """Equal, and rendered alike: keys in the same order (the API shows the data as stored)."""
    import json

    from ledger.state import LOG

    read = store.get((LOG, entry.ledger, entry.id))
    assert read == entry
    assert json.dumps(read.data) == json.dumps(entry.data)


def test_a_new_transactions_log_entry_is_kept_by_reference_to_its_transaction(store):
    """Its data says again what the transaction record says: the store keeps the
    transaction's id and metadata as logged (marker 2), and reads the entry back whole."""
    from ledger.state import LOG
    from ledger.timeutil import format_rfc3339

    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10), posting("world", "b", 10**40, "EUR"),
                    reference='réf "<&>"', metadata={"k": "<v> ", "z": ""},
                    timestamp=format_rfc3339(_day(-5)))
    ledger.transfer(posting("a", "b", 3))  # no reference, no metadata, the ledger's date
    store.commit(list(ledger.store.data.items()), {})
    for log_id in (1, 2):
        entry = ledger.store.data[(LOG, "main", log_id)]
        transaction = entry.data["transaction"]
        stored = _stored(store, entry)
        assert stored[3] == [transaction["id"], transaction["metadata"]]
        assert stored[9:] == [2]
        _reads_back_as_logged(store, entry)
    assert len(store._db.get(encode_key((LOG, "main", 1)))) < 200  # noqa: SLF001


def test_a_log_entry_reads_back_as_logged_after_its_transaction_changed(store):
    """The transaction record's metadata, revertedAt and updatedAt change later; the log
    entry kept by reference still reads back as it was logged (its hash with it)."""
    from ledger.commands import DeleteMetadata, RevertTransaction, SaveMetadata
    from ledger.state import LOG

    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10), metadata={"k": "logged", "gone": "x"})
    ledger.run(SaveMetadata("TRANSACTION", 1, {"k": "changed", "new": "y"}))
    ledger.run(DeleteMetadata("TRANSACTION", 1, "gone"))
    ledger.run(RevertTransaction(1))
    store.commit(list(ledger.store.data.items()), {})
    transaction = store.get((TRANSACTION, "main", 1))
    assert transaction.metadata == {"k": "changed", "new": "y"} and transaction.reverted
    entry = ledger.store.data[(LOG, "main", 1)]
    assert entry.data["transaction"]["metadata"] == {"k": "logged", "gone": "x"}
    assert _stored(store, entry)[9:] == [2]
    _reads_back_as_logged(store, entry)
    for log_id in (2, 3, 4):  # metadata and revert entries: kept whole, read back whole
        other = ledger.store.data[(LOG, "main", log_id)]
        assert _stored(store, other)[9:] in ([], [1])
        _reads_back_as_logged(store, other)


def test_what_does_not_render_back_from_the_transaction_is_kept_whole(store):
    """A back-dated transaction's effective volumes differ from its post-commit ones (kept
    whole); with account metadata, the effective volumes are kept once (marker 1); a
    ledger without effective volumes keeps its entries by reference too (marker 3)."""
    from ledger.commands import CreateLedger
    from ledger.state import LOG
    from ledger.timeutil import format_rfc3339

    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10), timestamp=format_rfc3339(_day(-5)))
    ledger.transfer(posting("world", "a", 3), timestamp=format_rfc3339(_day(-9)))  # back-dated
    ledger.transfer(posting("world", "b", 4), accountMetadata={"b": {"tier": "gold"}})
    flat = Ledger("flat")
    flat.store = ledger.store
    flat.run(CreateLedger(features={"MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES": "DISABLED"}))
    flat.transfer(posting("world", "a", 1))
    store.commit(list(ledger.store.data.items()), {})
    back_dated, with_accounts = ledger.store.data[(LOG, "main", 2)], ledger.store.data[(LOG, "main", 3)]
    flat_entry = ledger.store.data[(LOG, "flat", 1)]
    assert "postCommitEffectiveVolumes" not in flat_entry.data["transaction"]
    expected = ((ledger.store.data[(LOG, "main", 1)], [2]), (back_dated, []), (with_accounts, [1]), (flat_entry, [3]))
    for entry, marker in expected:
        assert _stored(store, entry)[9:] == marker, entry.id
        _reads_back_as_logged(store, entry)
    transaction = _stored(store, back_dated)[3]["transaction"]
    assert transaction["postCommitEffectiveVolumes"] != transaction["postCommitVolumes"]
    assert "postCommitEffectiveVolumes" not in _stored(store, with_accounts)[3]["transaction"]


def test_a_log_entry_kept_by_reference_without_its_transaction_is_an_error(store):
    from ledger.state import LOG
    from streams.store import StoreError

    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10))
    entry = ledger.store.data[(LOG, "main", 1)]
    store.commit([((LOG, "main", 1), entry)], {})
    with pytest.raises(StoreError, match="transaction 1"):
        store.get((LOG, "main", 1))


def test_a_log_entry_stored_by_an_earlier_version_with_its_effective_volumes_left_out(store):
    """Stores of session 9's version hold entries whole but for the effective volumes."""
    import base64

    from ledger.state import LOG
    from streams.store import _dumps

    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10))
    entry = ledger.store.data[(LOG, "main", 1)]
    transaction = {k: v for k, v in entry.data["transaction"].items() if k != "postCommitEffectiveVolumes"}
    fields = [entry.ledger, entry.id, entry.type, {**entry.data, "transaction": transaction}, entry.date,
              entry.idempotency_key, entry.idempotency_hash, base64.b64encode(entry.hash).decode(),
              entry.request_id, 1]
    store._db.put(encode_key((LOG, "main", 1)), _dumps(fields))  # noqa: SLF001
    _reads_back_as_logged(store, entry)


def test_a_log_entry_stored_whole_by_an_earlier_version_reads_back_as_it_was(store):
    """Stores written before the effective volumes were kept once hold 9-field entries."""
    import base64
    import json

    from ledger.state import LOG
    from streams.store import _dumps

    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10))
    entry = ledger.store.data[(LOG, "main", 1)]
    whole = [entry.ledger, entry.id, entry.type, entry.data, entry.date, entry.idempotency_key,
             entry.idempotency_hash, base64.b64encode(entry.hash).decode(), entry.request_id]
    store._db.put(encode_key((LOG, "main", 1)), _dumps(whole))  # noqa: SLF001
    read = store.get((LOG, "main", 1))
    assert read == entry and json.dumps(read.data) == json.dumps(entry.data)


def test_the_state_machine_runs_on_rocksdb_like_on_memory(store):
    overlay = Overlay(store)
    from ledger.commands import CreateLedger, Request
    from ledger.machine import execute

    execute(overlay, Request("r1", "main", CreateLedger()), 1)
    execute(overlay, Request("r2", "main", create_transaction_from_json({"postings": [posting("world", "a", 5)]})), 2)
    store.commit(overlay.writes(), {"ledger.committed": 2})
    assert store.get((HEAD, "main")).last_log_id == 1
    scanned = [value.id for _key, value in store.scan_keys((TRANSACTION, "main"))]
    assert scanned == [1]


def test_back_dated_moves_scan_rocksdb_like_memory(store):
    """The same history applied on RocksDB and in memory leaves the same effective volumes:
    back-dated inserts read and rewrite later moves through the store's scans."""
    from ledger.commands import CreateLedger, Request
    from ledger.machine import execute
    from ledger.state import EFFECTIVE
    from ledger.timeutil import format_rfc3339

    history = [(5, "a", 10), (9, "a", 3), (1, "a", 7), (9, "b", 1), (3, "a", 2), (0, "b", 4)]
    memory = Ledger()
    overlay = Overlay(store)
    execute(overlay, Request("c", "main", CreateLedger()), 1)
    store.commit(overlay.writes(), {})
    for index, (day, account, amount) in enumerate(history):
        body = {"postings": [posting("world", account, amount)],
                "timestamp": format_rfc3339(1_700_000_000_000_000 + day * 86_400_000_000)}
        memory.transfer(*body["postings"], timestamp=body["timestamp"])
        overlay = Overlay(store)
        execute(overlay, Request(f"r{index}", "main", create_transaction_from_json(body)), 10 + index)
        store.commit(overlay.writes(), {})
    expected = {key: value for key, value in memory.store.data.items() if key[0] == EFFECTIVE}
    assert len(expected) == 2 * len(history)
    for key, value in expected.items():
        assert store.get(key) == value, key


def test_scan_returns_text_segments_for_assets_and_bytes_for_moments(store):
    store.commit([((VOLUMES, "main", "a", "EUR"), Volumes(1, 0)), ((VOLUMES, "main", "a", "EUR/2"), Volumes(2, 0)),
                  ((VOLUMES, "main", "ab", "EUR"), Volumes(3, 0))], {})
    assert list(store.scan((VOLUMES, "main", "a"))) == [("EUR", Volumes(1, 0)), ("EUR/2", Volumes(2, 0))]
    assert list(store.scan((VOLUMES, "main", "a"), "EUR/2", reverse=True))[0][0] == "EUR/2"


def test_replay_refuses_a_log_that_forked(tmp_path):
    """Two writers on one ledger (e.g. two app ids on the same topics) would leave two
    different entries under one id: recovery must stop loudly, not pick one silently."""
    import dataclasses as dc

    from ledger.commands import CreateLedger, Request
    from ledger.machine import execute
    from streams import codecs
    from streams.processor import LogForked, PartitionProcessor
    from streams.settings import Settings
    from streams.topics import COMMITTED

    settings = dc.replace(Settings(), data_dir=tmp_path)
    processor = PartitionProcessor(settings, 0)
    try:
        overlay = Overlay(processor.store)
        execute(overlay, Request("c", "main", CreateLedger()), 1)
        entry = execute(overlay, Request("t", "main", create_transaction_from_json(
            {"postings": [posting("world", "a", 5)]})), 2).entry
        processor.store.commit(overlay.writes(), {})
        same = codecs.encode_log_entry(entry)
        assert processor._replay_record(Overlay(processor.store), COMMITTED, same) == 1
        other = codecs.encode_log_entry(dc.replace(entry, hash=b"\x01" * 32))
        with pytest.raises(LogForked):
            processor._replay_record(Overlay(processor.store), COMMITTED, other)
    finally:
        processor.close()


class _CommitDuringRead:
    """A store's database whose next read of `key` returns, and then a round commits
    `commit` before the read's caller goes on: a query in the event loop's thread
    interleaved with a round's commit in another."""

    def __init__(self, store: PartitionStore, key: bytes, commit) -> None:
        self.db, self.key, self.commit = store._db, key, commit

    def get(self, key):
        value = self.db.get(key)
        if key == self.key and self.commit is not None:
            commit, self.commit = self.commit, None
            commit()
        return value

    def __getattr__(self, name):
        return getattr(self.db, name)


@pytest.mark.parametrize("native", [False, True])
def test_a_read_racing_a_commit_never_caches_the_old_value(store, native):
    if native and store.native:  # (a native store takes real rounds: see test_native.py)
        store.close()
        store = PartitionStore(store.path.parent / "rocksdict", rocksdb_options(8, 4, native=False))
    key = (VOLUMES, "main", "a", "USD")
    store.commit([(key, Volumes(1, 0))], {})
    store._cache.clear()

    def commit_newer():
        if native:  # what a native round does: raw writes, then the cache dropped
            class Round:
                def write_into(self, batch):
                    batch.put(encode_key(key), b"2,0")
            store.commit_native(Round(), {})
        else:
            store.commit([(key, Volumes(2, 0))], {})

    store._db = _CommitDuringRead(store, encode_key(key), commit_newer)
    assert store.get(key) == Volumes(1, 0)  # read before the commit landed
    assert store.get(key) == Volumes(2, 0)  # and not kept in the cache after it


_CRASH_AFTER_COMMIT = """
import os, sys
from pathlib import Path
from streams.store import PartitionStore, rocksdb_options
store = PartitionStore(Path(sys.argv[1]), rocksdb_options(8, 4))
store.commit([], {"ledger.committed": 7})
if sys.argv[2] == "flush":
    store.flush()
os._exit(0)  # as a kill -9 would: nothing closed
"""


@pytest.mark.parametrize("flushed", [True, False])
def test_without_a_wal_a_crash_keeps_only_what_was_flushed(tmp_path, flushed):
    """The store keeps no write-ahead log: a crash loses the memtables — data and
    positions together, so recovery replays from an older position — unless flushed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", _CRASH_AFTER_COMMIT, str(tmp_path / "db"), "flush" if flushed else "crash"],
                   cwd=root, check=True, timeout=60)
    store = PartitionStore(tmp_path / "db", rocksdb_options(8, 4))
    try:
        assert store.position("ledger.committed") == (7 if flushed else None)
    finally:
        store.close()


_TEXT = st.text(st.sampled_from(list('ab"\\<>&\x00\u2028é😀')), max_size=4)
_operations = st.one_of(
    st.tuples(st.just("transfer"),
              st.lists(st.tuples(st.sampled_from(["world", "a", "b"]), st.sampled_from(["a", "b", "c"]),
                                 st.one_of(st.integers(0, 100), st.just(10**40)), st.sampled_from(["USD", "EUR/2"])),
                       min_size=1, max_size=3),
              st.dictionaries(_TEXT, _TEXT, max_size=2),  # metadata
              st.one_of(st.none(), _TEXT),  # reference
              st.one_of(st.none(), st.integers(-5, 5)),  # timestamp, in days (back- or forward-dated)
              st.booleans()),  # account metadata
    st.tuples(st.just("revert"), st.integers(1, 6)),
    st.tuples(st.just("transaction metadata"), st.integers(1, 6), st.dictionaries(_TEXT, _TEXT, max_size=2)),
)


@hsettings(max_examples=80, deadline=None)
@given(st.lists(_operations, min_size=1, max_size=12), st.booleans())
def test_every_log_entry_reads_back_from_rocksdb_exactly(tmp_path_factory, operations, effective_volumes):
    """Whatever its shape, kept by reference or whole: every log entry reads back equal,
    its data rendered alike (the same JSON, keys in the same order), after any later
    change of its transaction."""
    from ledger.commands import CreateLedger, RevertTransaction, SaveMetadata
    from ledger.state import LOG
    from ledger.timeutil import format_rfc3339

    ledger = Ledger("flat")
    if not effective_volumes:
        ledger.run(CreateLedger(features={"MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES": "DISABLED"}))
        ledger.name = "flat2"
        ledger.run(CreateLedger(features={"MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES": "DISABLED"}))
    ledger.transfer(posting("world", "a", 100))  # at least one kept by reference
    for operation in operations:
        if operation[0] == "transfer":
            _, moves, metadata, reference, days, with_accounts = operation
            body: dict = {"metadata": metadata, "force": True}
            if reference:
                body["reference"] = reference
            if days is not None:
                body["timestamp"] = format_rfc3339(_day(days))
            if with_accounts:
                body["accountMetadata"] = {moves[0][1]: {"k": "v"}}
            ledger.transfer(*(posting(s, d, amount, asset) for s, d, amount, asset in moves), **body)
        elif operation[0] == "revert":
            ledger.run(RevertTransaction(operation[1], force=True))
        else:
            ledger.run(SaveMetadata("TRANSACTION", operation[1], operation[2]))
    store = PartitionStore(tmp_path_factory.mktemp("p"), rocksdb_options(8, 4))
    try:
        store.commit(list(ledger.store.data.items()), {})
        entries = [value for key, value in ledger.store.data.items() if key[0] == LOG]
        assert any(_stored(store, entry)[9:] in ([2], [3]) for entry in entries)
        for entry in entries:
            _reads_back_as_logged(store, entry)
    finally:
        store.close()


def test_a_store_says_its_format_and_a_newer_one_is_refused_clearly(tmp_path):
    """A store written by a newer version could hold what this one would misread: it
    refuses it, naming the way out; an older store (no format key) opens and is marked."""
    from streams.store import _FORMAT_KEY, STORE_FORMAT

    older = PartitionStore(tmp_path / "older", rocksdb_options(8, 4))
    older._db.delete(_FORMAT_KEY)  # noqa: SLF001 (as a session-9 store: no key)
    older.close()
    reopened = PartitionStore(tmp_path / "older", rocksdb_options(8, 4))
    assert reopened._db.get(_FORMAT_KEY) == str(STORE_FORMAT).encode()  # noqa: SLF001
    reopened.close()

    newer = PartitionStore(tmp_path / "newer", rocksdb_options(8, 4))
    newer._db.put(_FORMAT_KEY, str(STORE_FORMAT + 1).encode())  # noqa: SLF001
    newer.close()
    with pytest.raises(StoreError, match="newer streamledger .* delete this partition's folder"):
        PartitionStore(tmp_path / "newer", rocksdb_options(8, 4))
    again = None
    with pytest.raises(StoreError):  # the refusal released the database: refused again, not locked
        again = PartitionStore(tmp_path / "newer", rocksdb_options(8, 4))
    assert again is None


def test_both_bindings_open_a_store_with_the_same_compaction_trigger(store):
    """RocksDB records the options a database was opened with in its OPTIONS file: the
    level-0 trigger the worker tuned is what either binding actually opened it with."""
    from streams.store import L0_COMPACTION_TRIGGER

    options = max(store.path.glob("OPTIONS-*"), key=lambda p: int(p.name.split("-")[1])).read_text()
    assert f"level0_file_num_compaction_trigger={L0_COMPACTION_TRIGGER}\n" in options
    assert L0_COMPACTION_TRIGGER != 4  # RocksDB's default: the line above must not pass by chance


@pytest.mark.parametrize("flushed", [False, True])
def test_point_lookups_are_found_and_seeks_ignore_their_filter(tmp_path, flushed):
    """The native store filters lookups of claims (request ids, references, idempotency
    keys), volumes and accounts through a memtable Bloom filter keyed by the whole key
    (native/src/store.rs `point_lookups`). Lookups must still find every key, and a seek
    to a key that is not there, filtered or not, must land on the next key in byte order
    as without the filter."""
    if NativeStore is None:
        pytest.skip("native module not built")
    db = NativeStore(str(tmp_path / "p0"), 8, 4)
    present = [b"Q\x00r-1", b"Q\x00r-3", b"R\x00main\x00ref-1", b"I\x00main\x00key-1", b"T\x00main\x00x",
               b"V\x00main\x00a\x00USD", b"A\x00main\x00a"]
    for k in present:
        db.put(k, b"v:" + k)
    if flushed:
        db.flush()
    absent = [b"Q\x00r-2", b"Q\x00r-0", b"R\x00main\x00ref-2", b"I\x00main\x00key-0",
              b"V\x00main\x00a\x00EUR", b"V\x00main\x00b\x00USD", b"A\x00main\x00b", b"T\x00main\x00y"]
    assert db.get(present + absent) == [b"v:" + k for k in present] + [None] * len(absent)
    assert [db.get(k) for k in absent] == [None] * len(absent)
    ordered = sorted(present)
    for target in absent + present + [b"Q", b"Q\x00r-4", b"S"]:
        iterator = db.iter()
        iterator.seek(target)
        expected = next((k for k in ordered if k >= target), None)
        assert (iterator.key() if iterator.valid() else None) == expected, target
        iterator.seek_for_prev(target)
        expected = next((k for k in reversed(ordered) if k <= target), None)
        assert (iterator.key() if iterator.valid() else None) == expected, target
        del iterator
    options = max((tmp_path / "p0").glob("OPTIONS-*"), key=lambda p: int(p.name.split("-")[1])).read_text()
    assert "memtable_prefix_bloom_size_ratio=0.01" in options and "streamledger.point-lookups" in options
    db.close()
