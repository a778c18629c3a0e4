"""The log hash chain, byte-compatible with Formance Ledger v2 (`Log.ComputeHash`).

    hash_n = sha256( ('"' + base64(hash_{n-1}) + '"\\n' if n > first else '') + line + '\\n' )

`line` is Go's JSON of {type, data: memento, date, idempotencyKey, id: 0, hash: null}
[+ schemaVersion]. `id` is always 0 and `hash` always null, so the chain does not depend
on how ids were allocated.
"""

from __future__ import annotations

import base64
import hashlib

from ledger import gojson
from ledger.timeutil import format_rfc3339


def entry_line(
    log_type: str,
    memento: dict,
    date: int,
    idempotency_key: str = "",
    schema_version: str | None = None,
) -> str:
    # One encoder call for the whole line: dicts keep insertion order, which is Go's
    # struct field order here.
    line = {
        "type": log_type,
        "data": memento,
        "date": format_rfc3339(date),
        "idempotencyKey": idempotency_key or "",
        "id": 0,
        "hash": None,
    }
    if schema_version:
        line["schemaVersion"] = schema_version
    return gojson.dumps(line)


def chain(previous: bytes | None, line: str) -> bytes:
    digest = hashlib.sha256()
    if previous is not None:
        digest.update(b'"' + base64.b64encode(previous) + b'"\n')
    digest.update(line.encode("utf-8"))
    digest.update(b"\n")
    return digest.digest()


def memento_of(log_type: str, data: dict) -> dict:
    """The hashed payload of a Formance-shaped log `data` (as exported by Formance)."""
    from ledger.model import DELETE_METADATA, NEW_TRANSACTION, REVERTED_TRANSACTION, SET_METADATA

    if log_type == NEW_TRANSACTION:
        return {
            "transaction": _transaction_memento(data["transaction"]),
            "accountMetadata": _sorted_nested(data.get("accountMetadata") or {}),
        }
    if log_type == REVERTED_TRANSACTION:
        reverted = data.get("revertedTransaction") or {}
        reverted_id = data.get("revertedTransactionID", reverted.get("id"))
        return {
            "revertedTransactionID": reverted_id,
            "transaction": _transaction_memento(data["transaction"]),
        }
    if log_type == SET_METADATA:
        return {
            "targetType": data["targetType"],
            "targetId": data["targetId"],
            "metadata": gojson.sorted_map(data.get("metadata") or {}),
        }
    if log_type == DELETE_METADATA:
        return {"targetType": data["targetType"], "targetId": data["targetId"], "key": data["key"]}
    return data


def _transaction_memento(transaction: dict) -> dict:
    body: dict = {
        "postings": [
            {
                "source": p["source"],
                "destination": p["destination"],
                "amount": p["amount"],
                "asset": p["asset"],
            }
            for p in transaction.get("postings") or []
        ],
        "metadata": gojson.sorted_map(transaction.get("metadata") or {}),
        "timestamp": transaction["timestamp"],
    }
    if transaction.get("reference"):
        body["reference"] = transaction["reference"]
    body["id"] = transaction.get("id", 0)
    body["reverted"] = False
    return body


def _sorted_nested(mapping: dict) -> dict:
    return {key: gojson.sorted_map(mapping[key]) for key in sorted(mapping)}
