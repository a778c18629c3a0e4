"""Avro codecs for every topic, in Avro *single-object encoding*.

Each record value is `C3 01` + the 8-byte CRC-64-AVRO fingerprint of the writer schema's
canonical form (little-endian, as Java's Avro writes it) + the Avro binary body. Any
consumer can tell which schema wrote a record without a schema registry: the `.avsc` files
in `schemas/` are the contract, and their fingerprints are printed by
`streamledger topics describe`. Java's `BinaryMessageDecoder` and fastavro both read it.

Amounts travel as decimal strings in requests (Avro has no arbitrary-precision integer) and
as JSON integers inside `LogEntry.data` (Formance's log payload, which consumers already
parse as JSON).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from functools import lru_cache
from pathlib import Path

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from streams.fastjson import dumps_text

from ledger import commands as c
from ledger.errors import ValidationError
from ledger.machine import Rejected
from ledger import limits
from ledger.model import LogEntry, Posting, validate_address, validate_amount, validate_asset, validate_ledger_name
from ledger.timeutil import format_rfc3339

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
MAGIC = b"\xc3\x01"
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_NAMESPACE = "io.streamledger."


class CodecError(Exception):
    """A record that is not one of ours: not Avro single-object, or an unknown schema."""


class Codec:
    """One schema: encode dicts, decode bytes (checking the fingerprint)."""

    def __init__(self, name: str) -> None:
        raw = json.loads((SCHEMAS_DIR / f"{name}.avsc").read_text())
        self.name = name
        self.schema = fastavro.parse_schema(raw)
        self.fingerprint = bytes.fromhex(
            fingerprint(to_parsing_canonical_form(self.schema), "CRC-64-AVRO")
        )
        self.header = MAGIC + self.fingerprint

    def encode(self, record: dict) -> bytes:
        buffer = io.BytesIO()
        buffer.write(self.header)
        fastavro.schemaless_writer(buffer, self.schema, record)
        return buffer.getvalue()

    def decode(self, payload: bytes) -> dict:
        if payload is None or payload[:2] != MAGIC:
            raise CodecError(f"not an Avro single-object encoded {self.name} (bad magic bytes)")
        if payload[2:10] != self.fingerprint:
            raise CodecError(
                f"unknown schema fingerprint {payload[2:10].hex()} for {self.name} "
                f"(expected {self.fingerprint.hex()})"
            )
        try:
            return fastavro.schemaless_reader(
                io.BytesIO(payload[10:]), self.schema, None,
                return_record_name=True, return_record_name_override=True,
            )
        except Exception as error:  # fastavro raises assorted errors on truncated input
            raise CodecError(f"malformed {self.name} record: {error}") from None


@lru_cache(maxsize=None)
def codec(name: str) -> Codec:
    return Codec(name)


def _micros(value: object) -> int:
    if isinstance(value, _dt.datetime):
        delta = value - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    assert isinstance(value, int)
    return value


# --- requests ---------------------------------------------------------------------------


def encode_requests(requests: list[c.Request]) -> bytes:
    return codec("RequestBatch").encode({"requests": [_request_record(r) for r in requests]})


def decode_requests(payload: bytes) -> list[dict]:
    """Decode a batch into raw records; `request_from_record` validates each one."""
    return codec("RequestBatch").decode(payload)["requests"]


def _request_record(request: c.Request) -> dict:
    return {
        "request_id": request.request_id,
        "ledger": request.ledger,
        "command": _command_record(request.command),
        "idempotency_key": request.idempotency_key,
        "idempotency_hash": request.idempotency_hash,
        "dry_run": request.dry_run,
        "received_at": request.received_at,
        "reply_to": "",
    }


def _command_record(command: c.Command) -> tuple[str, dict]:
    if isinstance(command, c.CreateTransaction):
        return (_NAMESPACE + "CreateTransaction", {
            "postings": None if command.postings is None else [
                {"source": p.source, "destination": p.destination,
                 "amount": str(p.amount), "asset": p.asset}
                for p in command.postings
            ],
            "script": None if command.script is None else {
                "plain": command.script.plain, "vars": dict(command.script.vars)},
            "reference": command.reference,
            "metadata": dict(command.metadata),
            "account_metadata": {k: dict(v) for k, v in command.account_metadata.items()},
            "timestamp": command.timestamp,
            "force": command.force,
        })
    if isinstance(command, c.CreateLedger):
        return (_NAMESPACE + "CreateLedger", {
            "bucket": command.bucket, "metadata": dict(command.metadata),
            "features": dict(command.features)})
    if isinstance(command, c.RevertTransaction):
        return (_NAMESPACE + "RevertTransaction", {
            "transaction_id": command.transaction_id, "force": command.force,
            "at_effective_date": command.at_effective_date, "metadata": dict(command.metadata)})
    if isinstance(command, c.SaveMetadata):
        return (_NAMESPACE + "SaveMetadata", {
            "target_type": command.target_type, "target_id": str(command.target_id),
            "metadata": dict(command.metadata)})
    if isinstance(command, c.DeleteMetadata):
        return (_NAMESPACE + "DeleteMetadata", {
            "target_type": command.target_type, "target_id": str(command.target_id),
            "key": command.key})
    raise AssertionError(f"no record for {command!r}")


def request_from_record(record: dict) -> c.Request:
    """Validate a decoded request record like the gateway validates HTTP input.

    Raises `ValidationError` for a field out of range; the caller rejects that request.
    """
    name, body = record["command"]
    if not record["request_id"] or len(record["request_id"]) > 256:
        raise ValidationError("request_id must be 1 to 256 characters")
    return c.Request(
        request_id=record["request_id"],
        ledger=validate_ledger_name(record["ledger"]),
        command=_command_from_record(name.removeprefix(_NAMESPACE), body),
        idempotency_key=record["idempotency_key"],
        idempotency_hash=record["idempotency_hash"],
        dry_run=record["dry_run"],
        received_at=_micros(record["received_at"]),
    )


def _command_from_record(name: str, body: dict) -> c.Command:
    if name == "CreateTransaction":
        simple = _simple_transfer(body)
        if simple is not None:
            return simple
        postings = body["postings"]
        raw = {
            "postings": None if postings is None else [
                {**p, "amount": _amount(p["amount"])} for p in postings],
            "script": body["script"],
            "reference": body["reference"],
            "metadata": body["metadata"],
            "accountMetadata": body["account_metadata"],
        }
        if postings is None:
            raw.pop("postings")
        if body["script"] is None:
            raw.pop("script")
        command = c.create_transaction_from_json(raw, force=body["force"])
        timestamp = body["timestamp"]
        if timestamp is not None:
            from dataclasses import replace

            command = replace(command, timestamp=_micros(timestamp))
        return command
    if name == "CreateLedger":
        return c.CreateLedger(bucket=body["bucket"], metadata=body["metadata"], features=body["features"])
    if name == "RevertTransaction":
        return c.RevertTransaction(
            transaction_id=body["transaction_id"], force=body["force"],
            at_effective_date=body["at_effective_date"], metadata=body["metadata"])
    if name in ("SaveMetadata", "DeleteMetadata"):
        target_id: object = body["target_id"]
        if body["target_type"] == "TRANSACTION":
            if not str(target_id).isdigit():
                raise ValidationError(f"transaction id {target_id!r} must be an integer")
            target_id = int(str(target_id))
        target = c.metadata_target(body["target_type"], target_id)
        if name == "SaveMetadata":
            return c.SaveMetadata(body["target_type"], target, body["metadata"])
        return c.DeleteMetadata(body["target_type"], target, body["key"])
    raise ValidationError(f"unknown command {name}")


def _simple_transfer(body: dict) -> c.CreateTransaction | None:
    """The common case — postings, no script, no metadata — validated without building the
    JSON-shaped dict the general path goes through. Same checks, same errors."""
    postings = body["postings"]
    if (
        postings is None or body["script"] is not None or body["metadata"] or body["account_metadata"]
        or body["reference"] is not None or not 0 < len(postings) <= limits.postings_per_transaction_max
    ):
        return None
    built = []
    for p in postings:
        built.append(Posting(
            validate_address(p["source"], "source"), validate_address(p["destination"], "destination"),
            _amount(p["amount"]), validate_asset(p["asset"]),
        ))
    timestamp = body["timestamp"]
    return c.CreateTransaction(
        postings=tuple(built), timestamp=None if timestamp is None else _micros(timestamp), force=body["force"],
    )


def _amount(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValidationError(f"amount {text!r} must be a non-negative integer in decimal digits")
    return validate_amount(int(text))


# --- log entries and rejections ---------------------------------------------------------


def encode_log_entry(entry: LogEntry) -> bytes:
    return codec("LogEntry").encode({
        "ledger": entry.ledger,
        "id": entry.id,
        "type": entry.type,
        "data": dumps_text(entry.data),
        "date": entry.date,
        "idempotency_key": entry.idempotency_key,
        "idempotency_hash": entry.idempotency_hash,
        "hash": entry.hash,
        "request_id": entry.request_id,
    })


def decode_log_entry(payload: bytes) -> LogEntry:
    record = codec("LogEntry").decode(payload)
    return LogEntry(
        ledger=record["ledger"], id=record["id"], type=record["type"],
        data=json.loads(record["data"]), date=_micros(record["date"]),
        idempotency_key=record["idempotency_key"], idempotency_hash=record["idempotency_hash"],
        hash=record["hash"], request_id=record["request_id"],
    )


def encode_rejection(rejection: Rejected) -> bytes:
    return codec("Rejection").encode({
        "request_id": rejection.request_id,
        "ledger": rejection.ledger,
        "code": rejection.code,
        "message": rejection.message,
        "details": json.dumps(rejection.details, separators=(",", ":")),
        "date": rejection.date,
    })


def decode_rejection(payload: bytes) -> Rejected:
    record = codec("Rejection").decode(payload)
    return Rejected(
        request_id=record["request_id"], ledger=record["ledger"], code=record["code"],
        message=record["message"], details=json.loads(record["details"] or "{}"),
        date=_micros(record["date"]),
    )


def log_entry_json(entry: LogEntry) -> dict:
    """A log entry as Formance v2's API shows it (hash in base64)."""
    import base64

    return {
        "id": entry.id,
        "type": entry.type,
        "data": entry.data,
        "date": format_rfc3339(entry.date),
        "idempotencyKey": entry.idempotency_key,
        "hash": base64.b64encode(entry.hash).decode(),
    }


# --- replies ----------------------------------------------------------------------------

REPLY_DRY_RUN = "DRY_RUN"
REPLY_IDEMPOTENCY_HIT = "IDEMPOTENCY_HIT"
REPLY_REDELIVERED = "REDELIVERED"


def encode_reply(request_id: str, ledger: str, kind: str, outcome: "LogEntry | Rejected") -> bytes:
    is_entry = isinstance(outcome, LogEntry)
    return codec("Reply").encode({
        "request_id": request_id,
        "ledger": ledger,
        "kind": kind,
        "log_entry": encode_log_entry(outcome) if is_entry else None,
        "rejection": None if is_entry else encode_rejection(outcome),
    })


def decode_reply(payload: bytes) -> tuple[str, str, str, "LogEntry | Rejected"]:
    """-> (request_id, ledger, kind, the log entry or rejection it answers with)."""
    record = codec("Reply").decode(payload)
    if record["log_entry"] is not None:
        outcome: LogEntry | Rejected = decode_log_entry(record["log_entry"])
    else:
        outcome = decode_rejection(record["rejection"])
    return record["request_id"], record["ledger"], record["kind"], outcome
