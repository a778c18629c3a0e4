"""Small builders for core tests: requests and a ledger driven through `execute`."""

from __future__ import annotations

import itertools

from ledger.commands import CreateLedger, Request, create_transaction_from_json
from ledger.machine import execute
from ledger.model import Volumes
from ledger.state import VOLUMES, MemoryStore, Overlay

_ids = itertools.count(1)


def posting(source: str, destination: str, amount: int, asset: str = "USD/2") -> dict:
    return {"source": source, "destination": destination, "amount": amount, "asset": asset}


class Ledger:
    """A ledger on an in-memory store; every call commits its overlay like the worker."""

    def __init__(self, name: str = "main", start: int = 1_700_000_000_000_000) -> None:
        self.name = name
        self.store = MemoryStore()
        self.now = start
        outcome = self.run(CreateLedger())
        assert outcome.__class__.__name__ == "Committed", outcome

    def run(self, command, *, request_id: str | None = None, idempotency_key: str = "",
            idempotency_hash: str = "", dry_run: bool = False):
        self.now += 1_000
        overlay = Overlay(self.store)
        request = Request(
            request_id=request_id or f"r{next(_ids)}", ledger=self.name, command=command,
            idempotency_key=idempotency_key, idempotency_hash=idempotency_hash,
            dry_run=dry_run, received_at=self.now,
        )
        outcome = execute(overlay, request, self.now)
        self.store.apply(overlay.writes())
        return outcome

    def transfer(self, *postings: dict, **body):
        return self.run(create_transaction_from_json({"postings": list(postings), **body}))

    def balance(self, account: str, asset: str = "USD/2") -> int:
        volumes = self.store.get((VOLUMES, self.name, account, asset)) or Volumes()
        return volumes.balance  # type: ignore[union-attr]

    def balances(self) -> dict[tuple[str, str], int]:
        return {
            (key[2], key[3]): value.balance  # type: ignore[union-attr]
            for key, value in self.store.data.items()
            if key[0] == VOLUMES and key[1] == self.name
        }
