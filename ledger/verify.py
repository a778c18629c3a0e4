"""Check a ledger's log on its own: the hash chain entry by entry, and money conserved.

Input is Formance's log shape (`{"id","type","data","date","idempotencyKey","hash"}`,
hash in base64), so an export from Formance and one from streamledger check the same way.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Iterable

from ledger.hashchain import chain, entry_line, memento_of
from ledger.model import NEW_TRANSACTION, REVERTED_TRANSACTION, WORLD
from ledger.timeutil import parse_rfc3339


@dataclass
class Verdict:
    ok: bool
    entries: int
    broken_id: int | None = None
    reason: str = ""
    balances: dict[tuple[str, str], int] = field(default_factory=dict)

    def summary(self) -> str:
        if self.ok:
            return f"OK {self.entries} entries"
        return f"BROKEN at entry {self.broken_id}: {self.reason}"


def verify_log(logs: Iterable[dict]) -> Verdict:
    previous: bytes | None = None
    balances: dict[tuple[str, str], int] = {}
    count = 0
    last_id: int | None = None
    for log in logs:
        log_id = log.get("id")
        try:
            line = entry_line(
                log["type"], memento_of(log["type"], log["data"]), parse_rfc3339(log["date"]),
                log.get("idempotencyKey") or "", log.get("schemaVersion"),
            )
        except (KeyError, TypeError, ValueError) as error:
            return Verdict(False, count, log_id, f"malformed entry ({error!r})", balances)
        if last_id is not None and log_id != last_id + 1:
            return Verdict(False, count, log_id, f"id {log_id} does not follow {last_id}", balances)
        expected = chain(previous, line)
        stored = log.get("hash")
        if stored != base64.b64encode(expected).decode():
            return Verdict(False, count, log_id,
                           f"hash {stored} does not match the recomputed {base64.b64encode(expected).decode()}",
                           balances)
        previous, last_id = expected, log_id
        count += 1
        if log["type"] in (NEW_TRANSACTION, REVERTED_TRANSACTION):
            for posting in log["data"]["transaction"]["postings"]:
                amount = posting["amount"]
                source = (posting["source"], posting["asset"])
                destination = (posting["destination"], posting["asset"])
                balances[source] = balances.get(source, 0) - amount
                balances[destination] = balances.get(destination, 0) + amount
    totals: dict[str, int] = {}
    for (_account, asset), balance in balances.items():
        totals[asset] = totals.get(asset, 0) + balance
    unbalanced = {asset: total for asset, total in totals.items() if total != 0}
    if unbalanced:
        return Verdict(False, count, last_id, f"balances do not sum to zero: {unbalanced}", balances)
    return Verdict(True, count, None, "", balances)


def negative_accounts(balances: dict[tuple[str, str], int]) -> list[tuple[str, str, int]]:
    """Accounts other than `world` below zero (possible only through `force`)."""
    return sorted((a, asset, b) for (a, asset), b in balances.items() if b < 0 and a != WORLD)
