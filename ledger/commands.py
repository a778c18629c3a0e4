"""Commands: the one envelope every write travels in, built once at the edge.

The gateway builds them from HTTP bodies, the worker from Avro records; both go through the
constructors here so a direct producer's request is validated exactly like an HTTP one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from ledger import limits
from ledger.errors import ValidationError
from ledger.model import (
    TARGET_ACCOUNT,
    TARGET_TRANSACTION,
    Posting,
    validate_address,
    validate_ledger_name,
    validate_metadata,
    validate_text,
)
from ledger.timeutil import parse_rfc3339


@dataclass(frozen=True, slots=True)
class CreateLedger:
    bucket: str = "_default"
    metadata: dict[str, str] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Script:
    plain: str
    vars: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CreateTransaction:
    postings: tuple[Posting, ...] | None = None
    script: Script | None = None
    reference: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    account_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    timestamp: int | None = None
    force: bool = False


@dataclass(frozen=True, slots=True)
class RevertTransaction:
    transaction_id: int
    force: bool = False
    at_effective_date: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SaveMetadata:
    target_type: str
    target_id: str | int
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class DeleteMetadata:
    target_type: str
    target_id: str | int
    key: str


Command = CreateLedger | CreateTransaction | RevertTransaction | SaveMetadata | DeleteMetadata


@dataclass(frozen=True, slots=True)
class Request:
    """A command addressed to one ledger, with everything needed to apply it once."""

    request_id: str
    ledger: str
    command: Command
    idempotency_key: str = ""
    idempotency_hash: str = ""
    dry_run: bool = False
    received_at: int = 0


def create_transaction_from_json(body: object, *, force: bool = False) -> CreateTransaction:
    """Validate a Formance v2 `POST /transactions` body into a command."""
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object")
    postings_raw, script_raw = body.get("postings"), body.get("script")
    if postings_raw is not None and script_raw is not None:
        raise ValidationError("give either postings or script, not both")
    postings = None
    script = None
    if script_raw is not None:
        script = _script_from_json(script_raw)
    else:
        if not isinstance(postings_raw, list) or not postings_raw:
            from ledger.errors import NoPostings

            raise NoPostings("the transaction has no postings (give postings or a script)")
        if len(postings_raw) > limits.postings_per_transaction_max:
            raise ValidationError(
                f"a transaction has at most {limits.postings_per_transaction_max} postings"
            )
        postings = tuple(Posting.from_json(raw) for raw in postings_raw)
    reference = body.get("reference") or None
    if reference is not None and (
        not isinstance(reference, str) or len(reference) > limits.reference_bytes_max
    ):
        raise ValidationError("reference must be a string of at most 1024 characters")
    if reference is not None:
        validate_text(reference, "reference")
    return CreateTransaction(
        postings=postings,
        script=script,
        reference=reference,
        metadata=validate_metadata(body.get("metadata")),
        account_metadata=_account_metadata_from_json(body.get("accountMetadata")),
        timestamp=_timestamp_from_json(body.get("timestamp")),
        force=bool(force or body.get("force") is True),
    )


@lru_cache(maxsize=1024)
def parse_script(source: str):
    """Parse a Numscript program once; programs are immutable and shared across requests.

    Raises `CompilationFailed` (with line and column) for a program that does not parse.
    """
    from ledger import numscript

    return numscript.parse(source)


def _script_from_json(raw: object) -> Script:
    if not isinstance(raw, dict) or not isinstance(raw.get("plain"), str):
        raise ValidationError("script must be an object with a 'plain' Numscript program")
    plain = validate_text(raw["plain"], "the script")
    if len(plain) > limits.numscript_source_bytes_max:
        raise ValidationError("the script is too large")
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        raise ValidationError("script.vars must be an object")
    # Formance accepts numbers and strings as var values and reads them as text.
    vars_text = {}
    for name, value in variables.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValidationError(f"script variable {name!r} must be a string")
        vars_text[validate_text(str(name), "a script variable name")] = validate_text(str(value), f"script variable {name!r}")
    parse_script(plain)  # refuse a program that does not compile at the edge
    return Script(plain=plain, vars=vars_text)


def _account_metadata_from_json(raw: object) -> dict[str, dict[str, str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValidationError("accountMetadata must be an object of address -> metadata")
    return {
        validate_address(address): validate_metadata(metadata, f"accountMetadata[{address}]")
        for address, metadata in raw.items()
    }


def _timestamp_from_json(raw: object) -> int | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ValidationError("timestamp must be an RFC 3339 date string")
    try:
        return parse_rfc3339(raw)
    except ValueError as error:
        raise ValidationError(str(error)) from None


def create_ledger_from_json(name: str, body: object) -> CreateLedger:
    validate_ledger_name(name)
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object")
    bucket = body.get("bucket") or "_default"
    if not isinstance(bucket, str):
        raise ValidationError("bucket must be a string")
    features = body.get("features") or {}
    if not isinstance(features, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in features.items()
    ):
        raise ValidationError("features must be an object of string values")
    return CreateLedger(
        bucket=bucket, metadata=validate_metadata(body.get("metadata")), features=features
    )


def metadata_target(target_type: str, target_id: object) -> str | int:
    if target_type == TARGET_ACCOUNT:
        return validate_address(target_id)
    if target_type == TARGET_TRANSACTION:
        if isinstance(target_id, bool) or not isinstance(target_id, int) or target_id < 0:
            raise ValidationError(f"transaction id {target_id!r} must be a non-negative integer")
        return target_id
    raise ValidationError(f"targetType must be ACCOUNT or TRANSACTION, not {target_type!r}")
