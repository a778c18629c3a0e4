"""The nouns of the ledger: postings, transactions, log entries, and their grammars.

Amounts are Python `int` in minor units, of any size. Dates are `int` microseconds (UTC).
Records that cross the state machine are small slotted dataclasses; their Formance JSON
shapes are built by the `*_json` helpers here so every layer renders them the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from ledger import limits
from ledger.errors import ValidationError

# Matched whole (`fullmatch`): `$` would also accept a trailing newline. ASCII digits only,
# as Go's `\d` (Python's takes any script's digits).
ADDRESS_PATTERN = re.compile(r"[a-zA-Z0-9_-]+(:[a-zA-Z0-9_-]+)*")
ASSET_PATTERN = re.compile(r"[A-Z][A-Z0-9]{0,16}(_[A-Z]{1,16})?(/[0-9]{1,6})?")
LEDGER_NAME_PATTERN = re.compile(r"[0-9a-zA-Z_-]{1,63}")
LEDGER_NAMES_RESERVED = frozenset({"_", "_info", "_healthcheck"})
WORLD = "world"

# Log entry types. The first four are Formance's; `CREATED_LEDGER` is ours: ledgers are
# created through the same ordered write path, so the worker that owns a ledger's
# partition learns of it in order. It carries log id 0 and is not part of the hash chain.
NEW_TRANSACTION = "NEW_TRANSACTION"
SET_METADATA = "SET_METADATA"
DELETE_METADATA = "DELETE_METADATA"
REVERTED_TRANSACTION = "REVERTED_TRANSACTION"
CREATED_LEDGER = "CREATED_LEDGER"
LOG_TYPES_CHAINED = frozenset({NEW_TRANSACTION, SET_METADATA, DELETE_METADATA, REVERTED_TRANSACTION})

TARGET_ACCOUNT = "ACCOUNT"
TARGET_TRANSACTION = "TRANSACTION"


def validate_address(address: object, what: str = "address") -> str:
    if isinstance(address, str) and _is_address(address):
        return address
    raise ValidationError(
        f"{what} {address!r} is not a valid account address "
        "(segments of [a-zA-Z0-9_-] separated by ':')"
    )


@lru_cache(maxsize=65_536)
def _is_address(address: str) -> bool:
    # Addresses repeat across requests: remember the verdict of the last few thousand.
    return len(address) <= limits.address_bytes_max and ADDRESS_PATTERN.fullmatch(address) is not None


@lru_cache(maxsize=4096)
def _is_asset(asset: str) -> bool:
    return ASSET_PATTERN.fullmatch(asset) is not None


def validate_asset(asset: object) -> str:
    if not isinstance(asset, str) or not _is_asset(asset):
        raise ValidationError(
            f"asset {asset!r} is not a valid asset (e.g. USD, USD/2, EUR_STRIPE/2)"
        )
    return asset


def validate_amount(amount: object) -> int:
    # bool is an int in Python; a JSON `true` is never an amount.
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ValidationError(f"amount {amount!r} must be an integer in minor units")
    if amount < 0:
        raise ValidationError(f"amount {amount} must not be negative")
    if len(str(amount)) > limits.amount_digits_max:
        raise ValidationError(f"amount has more than {limits.amount_digits_max} digits")
    return amount


def validate_ledger_name(name: object) -> str:
    if not isinstance(name, str) or LEDGER_NAME_PATTERN.fullmatch(name) is None or (
        name in LEDGER_NAMES_RESERVED
    ):
        raise ValidationError(
            f"ledger name {name!r} must be 1-63 characters of [0-9a-zA-Z_-] and not reserved"
        )
    return name


def validate_text(value: str, what: str) -> str:
    """Strings must be valid Unicode text: JSON can smuggle in lone surrogates ("\\ud800")
    that no UTF-8 encoder (Avro, RocksDB, Kafka) accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{what} is not valid Unicode text (lone surrogate)") from None
    return value


def validate_metadata(metadata: object, what: str = "metadata") -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValidationError(f"{what} must be an object of string values")
    if len(metadata) > limits.metadata_entries_max:
        raise ValidationError(f"{what} has more than {limits.metadata_entries_max} entries")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValidationError(f"{what} values must be strings (key {key!r})")
        if len(key) > limits.metadata_key_bytes_max or len(value) > limits.metadata_value_bytes_max:
            raise ValidationError(f"{what} entry {key!r} is too large")
        validate_text(key, what)
        validate_text(value, what)
    return metadata


@dataclass(frozen=True, slots=True)
class Posting:
    source: str
    destination: str
    amount: int
    asset: str

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "destination": self.destination,
            "amount": self.amount,
            "asset": self.asset,
        }

    @staticmethod
    def from_json(raw: object) -> "Posting":
        if not isinstance(raw, dict):
            raise ValidationError("a posting must be an object with source, destination, amount, asset")
        return Posting(
            source=validate_address(raw.get("source"), "source"),
            destination=validate_address(raw.get("destination"), "destination"),
            amount=validate_amount(raw.get("amount")),
            asset=validate_asset(raw.get("asset")),
        )


@dataclass(frozen=True, slots=True)
class Volumes:
    input: int = 0
    output: int = 0

    @property
    def balance(self) -> int:
        return self.input - self.output

    def to_json(self) -> dict:
        return {"input": self.input, "output": self.output, "balance": self.input - self.output}


@dataclass(slots=True)
class Transaction:
    """A committed transaction as the store keeps it and the API shows it."""

    id: int
    postings: list[Posting]
    metadata: dict[str, str]
    timestamp: int
    inserted_at: int
    reference: str | None = None
    reverted_at: int | None = None
    updated_at: int | None = None
    # {account: {asset: Volumes}} after this transaction, in insertion order.
    post_commit_volumes: dict[str, dict[str, Volumes]] = field(default_factory=dict)

    @property
    def reverted(self) -> bool:
        return self.reverted_at is not None


def volumes_json(volumes: dict[str, dict[str, Volumes]]) -> dict:
    return {
        account: {asset: v.to_json() for asset, v in by_asset.items()}
        for account, by_asset in volumes.items()
    }


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of a ledger's immutable log, as published on `ledger.committed`.

    `data` is the Formance-shaped payload (a dict ready for JSON); its memento
    (`ledger.hashchain.memento_of`) is what is hashed. `id` is per ledger, gapless from 1 (0 for `CREATED_LEDGER`).
    """

    ledger: str
    id: int
    type: str
    data: dict
    date: int
    idempotency_key: str
    idempotency_hash: str
    hash: bytes
    request_id: str
