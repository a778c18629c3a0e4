"""The small store interface the state machine needs, and an in-memory overlay.

The core reads and writes typed values under tuple keys; `streams/store.py` lays them out
in RocksDB (one database per partition), and `MemoryStore` keeps them in a dict for tests.
Writes go into an `Overlay` first: the worker commits the overlay's writes to RocksDB only
after the Kafka transaction that published the batch's outcomes has committed.

Keys (first element is the kind):
    ("L", ledger)                  -> LedgerInfo
    ("H", ledger)                  -> Head
    ("V", ledger, account, asset)  -> Volumes
    ("A", ledger, account)         -> AccountRecord
    ("T", ledger, id)              -> Transaction
    ("R", ledger, reference)       -> transaction id
    ("I", ledger, key)             -> IdempotencyRecord
    ("Q", request_id)              -> RequestRecord (the outcome of every applied request)
    ("G", ledger, log_id)          -> LogEntry
    ("E", ledger, account, asset, moment) -> Volumes: effective volumes after the move of one
                                      transaction, ordered by effective date; `moment` is
                                      `effective_moment(timestamp, transaction id)` (bytes)

Only the last key segment may be an integer or bytes; every other segment is text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

LEDGER = "L"
HEAD = "H"
VOLUMES = "V"
ACCOUNT = "A"
TRANSACTION = "T"
REFERENCE = "R"
IDEMPOTENCY = "I"
REQUEST = "Q"
LOG = "G"
EFFECTIVE = "E"


def effective_moment(timestamp: int, transaction_id: int) -> bytes:
    """A move's position in effective-date order: by timestamp, then transaction id.

    16 bytes that sort as (timestamp, id) do, negative timestamps (before 1970) included.
    """
    return (timestamp + (1 << 63)).to_bytes(8, "big") + transaction_id.to_bytes(8, "big")

@dataclass(slots=True)
class LedgerInfo:
    name: str
    added_at: int
    bucket: str = "_default"
    metadata: dict[str, str] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Head:
    """Where a ledger's log stands: the last log id, its hash, the last transaction id."""

    last_log_id: int = 0
    last_hash: bytes | None = None
    last_transaction_id: int = 0
    last_date: int = 0
    # The latest effective timestamp of any transaction: a transaction at or after it is
    # the newest of every account it moves; one before it is back-dated.
    max_timestamp: int | None = None


@dataclass(slots=True)
class AccountRecord:
    address: str
    metadata: dict[str, str]
    first_usage: int
    insertion_date: int
    updated_at: int


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    input_hash: str
    request_id: str


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What became of a request: a log entry (ledger, log id) or a rejection."""

    ledger: str
    log_id: int | None = None
    code: str | None = None
    message: str | None = None
    details: dict | None = None
    date: int = 0


class Reader(Protocol):
    def get(self, key: tuple) -> object | None: ...

    def scan(self, prefix: tuple, start: bytes | None = None, reverse: bool = False) -> Iterator[tuple[bytes, object]]:
        """(last key segment, value) of the keys `prefix + (segment,)` in byte order of the
        segment, from `start` (inclusive) forwards, or backwards from it with `reverse`.
        Segments come back in their own type: text (e.g. assets) or bytes (moments)."""
        ...


class MemoryStore:
    """A dict-backed `Reader` whose `apply` takes an overlay's writes."""

    def __init__(self) -> None:
        self.data: dict[tuple, object] = {}

    def get(self, key: tuple) -> object | None:
        return self.data.get(key)

    def scan(self, prefix: tuple, start: bytes | None = None, reverse: bool = False):
        n = len(prefix)
        rows = sorted(
            ((key[n], value) for key, value in self.data.items() if len(key) == n + 1 and key[:n] == prefix),
            key=lambda row: _sort_key(row[0]),
        )
        return iter(_window(rows, start, reverse))

    def apply(self, writes: Iterable[tuple[tuple, object | None]]) -> None:
        for key, value in writes:
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


class Overlay:
    """Reads through to a base `Reader`; buffers writes until `writes()` is taken."""

    __slots__ = ("base", "_writes")

    def __init__(self, base: Reader) -> None:
        self.base = base
        self._writes: dict[tuple, object] = {}

    def get(self, key: tuple) -> object | None:
        writes = self._writes
        if key in writes:
            return writes[key]  # None: deleted in this overlay
        return self.base.get(key)

    def scan(self, prefix: tuple, start: bytes | None = None, reverse: bool = False):
        """The base's rows overlaid with this overlay's writes. Materialises the range:
        only back-dated transactions scan, and then only one account's moves."""
        n = len(prefix)
        rows = dict(self.base.scan(prefix, None, False))
        for key, value in self._writes.items():
            if len(key) == n + 1 and key[:n] == prefix:
                if value is None:
                    rows.pop(key[n], None)
                else:
                    rows[key[n]] = value
        return iter(_window(sorted(rows.items(), key=lambda row: _sort_key(row[0])), start, reverse))

    def put(self, key: tuple, value: object | None) -> None:
        """Write `value`, or delete the key when `value` is None."""
        self._writes[key] = value

    def write_count(self) -> int:
        return len(self._writes)

    def writes(self) -> list[tuple[tuple, object | None]]:
        return list(self._writes.items())

    def merge_into(self, parent: "Overlay") -> None:
        """Hand this overlay's writes to the overlay it reads through (a request succeeded)."""
        assert self.base is parent
        parent._writes.update(self._writes)


def _sort_key(segment: object) -> bytes:
    """Segments sort as the store's byte layout does: text as UTF-8, moments as bytes."""
    return segment.encode() if isinstance(segment, str) else segment  # type: ignore[return-value]


def _window(rows: list, start: bytes | str | None, reverse: bool) -> list:
    if start is None:
        return rows[::-1] if reverse else rows
    bound = _sort_key(start)
    if reverse:
        return [row for row in reversed(rows) if _sort_key(row[0]) <= bound]
    return [row for row in rows if _sort_key(row[0]) >= bound]
