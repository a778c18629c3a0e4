"""Formance v2 JSON shapes of ledgers, transactions, accounts: one renderer for all layers."""

from __future__ import annotations

from ledger.model import Transaction, Volumes, volumes_json
from ledger.state import AccountRecord, LedgerInfo
from ledger.timeutil import format_rfc3339


def ledger_json(info: LedgerInfo, ledger_id: int = 0) -> dict:
    return {
        "id": ledger_id,
        "name": info.name,
        "addedAt": format_rfc3339(info.added_at),
        "bucket": info.bucket,
        "metadata": info.metadata,
        "features": info.features,
    }


def _pre_commit(t: Transaction, post: dict[str, dict[str, Volumes]]) -> dict[str, dict[str, Volumes]]:
    """Volumes before the transaction: the post-commit ones minus its own postings."""
    pre = {
        account: {asset: Volumes(v.input, v.output) for asset, v in by_asset.items()}
        for account, by_asset in post.items()
    }
    for posting in reversed(t.postings):
        source = pre[posting.source][posting.asset]
        pre[posting.source][posting.asset] = Volumes(source.input, source.output - posting.amount)
        destination = pre[posting.destination][posting.asset]
        pre[posting.destination][posting.asset] = Volumes(destination.input - posting.amount, destination.output)
    return pre


def transaction_json(t: Transaction, effective: dict[str, dict[str, Volumes]] | None = None) -> dict:
    """`effective`: the transaction's current post-commit effective volumes, when kept."""
    post = t.post_commit_volumes
    pre = _pre_commit(t, post)
    body = {
        "id": t.id,
        "timestamp": format_rfc3339(t.timestamp),
        "insertedAt": format_rfc3339(t.inserted_at),
        "updatedAt": format_rfc3339(t.updated_at or t.inserted_at),
        "postings": [p.to_json() for p in t.postings],
        "metadata": t.metadata,
        "reverted": t.reverted,
        "revertedAt": None if t.reverted_at is None else format_rfc3339(t.reverted_at),
        "postCommitVolumes": volumes_json(post),
        "preCommitVolumes": volumes_json(pre),
    }
    if effective is not None:
        body["postCommitEffectiveVolumes"] = volumes_json(effective)
        body["preCommitEffectiveVolumes"] = volumes_json(_pre_commit(t, effective))
    if t.reference:
        body["reference"] = t.reference
    return body


def account_json(
    record: AccountRecord | None, address: str, volumes: dict[str, Volumes],
    effective: dict[str, Volumes] | None = None,
) -> dict:
    body: dict = {"address": address, "metadata": record.metadata if record else {}}
    if record is not None:
        body["firstUsage"] = format_rfc3339(record.first_usage)
        body["insertionDate"] = format_rfc3339(record.insertion_date)
        body["updatedAt"] = format_rfc3339(record.updated_at)
    body["volumes"] = {asset: v.to_json() for asset, v in sorted(volumes.items())}
    body["balances"] = {asset: v.balance for asset, v in sorted(volumes.items())}
    if effective is not None:
        body["effectiveVolumes"] = {asset: v.to_json() for asset, v in sorted(effective.items())}
    return body
