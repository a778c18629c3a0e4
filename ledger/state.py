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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

LEDGER = "L"
HEAD = "H"
VOLUMES = "V"
ACCOUNT = "A"
TRANSACTION = "T"
REFERENCE = "R"
IDEMPOTENCY = "I"
REQUEST = "Q"
LOG = "G"

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


class MemoryStore:
    """A dict-backed `Reader` whose `apply` takes an overlay's writes."""

    def __init__(self) -> None:
        self.data: dict[tuple, object] = {}

    def get(self, key: tuple) -> object | None:
        return self.data.get(key)

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

    def put(self, key: tuple, value: object | None) -> None:
        """Write `value`, or delete the key when `value` is None."""
        self._writes[key] = value

    def writes(self) -> list[tuple[tuple, object | None]]:
        return list(self._writes.items())

    def merge_into(self, parent: "Overlay") -> None:
        """Hand this overlay's writes to the overlay it reads through (a request succeeded)."""
        assert self.base is parent
        parent._writes.update(self._writes)
