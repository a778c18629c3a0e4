"""Reverts and metadata, as Formance v2 defines them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.commands import DeleteMetadata, RevertTransaction, SaveMetadata
from ledger.machine import REVERTS_METADATA_KEY, Committed, Rejected
from ledger.state import ACCOUNT, TRANSACTION
from tests.ledger.helpers import Ledger, posting


def test_revert_posts_the_reverse_postings_in_reverse_order():
    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10), posting("a", "b", 4))
    outcome = ledger.run(RevertTransaction(1))
    assert isinstance(outcome, Committed) and outcome.entry.type == "REVERTED_TRANSACTION"
    transaction = outcome.entry.data["transaction"]
    assert [(p["source"], p["destination"], p["amount"]) for p in transaction["postings"]] == [
        ("b", "a", 4), ("a", "world", 10)]
    assert transaction["metadata"][REVERTS_METADATA_KEY] == "1"
    assert transaction["id"] == 2
    assert ledger.balance("a") == 0 and ledger.balance("b") == 0 and ledger.balance("world") == 0
    assert ledger.store.get((TRANSACTION, "main", 1)).reverted


def test_a_second_revert_is_already_revert():
    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10))
    ledger.run(RevertTransaction(1))
    outcome = ledger.run(RevertTransaction(1))
    assert isinstance(outcome, Rejected) and outcome.code == "ALREADY_REVERT"


def test_reverting_an_unknown_transaction_is_not_found():
    outcome = Ledger().run(RevertTransaction(42))
    assert isinstance(outcome, Rejected) and outcome.code == "NOT_FOUND"


def test_revert_needs_funds_unless_forced():
    """The money may have moved on: reverting would overdraw the destination."""
    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10))
    ledger.transfer(posting("a", "b", 10))
    refused = ledger.run(RevertTransaction(1))
    assert isinstance(refused, Rejected) and refused.code == "INSUFFICIENT_FUND"
    forced = ledger.run(RevertTransaction(1, force=True))
    assert isinstance(forced, Committed)
    assert ledger.balance("a") == -10


def test_revert_at_effective_date_keeps_the_original_timestamp():
    ledger = Ledger()
    original = ledger.transfer(posting("world", "a", 1), timestamp="2020-01-01T00:00:00Z").entry
    revert = ledger.run(RevertTransaction(1, at_effective_date=True)).entry
    assert revert.data["transaction"]["timestamp"] == original.data["transaction"]["timestamp"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 50)), min_size=1, max_size=8))
def test_reverting_every_transaction_in_reverse_order_restores_all_balances(moves):
    ledger = Ledger()
    committed = []
    for account, amount in moves:
        outcome = ledger.transfer(posting("world", account, amount), posting(account, "pool", amount // 2))
        committed.append(outcome.entry.data["transaction"]["id"])
    for transaction_id in reversed(committed):
        assert isinstance(ledger.run(RevertTransaction(transaction_id)), Committed)
    assert all(balance == 0 for balance in ledger.balances().values())


def test_account_metadata_is_upserted_and_deleted_with_log_entries():
    ledger = Ledger()
    saved = ledger.run(SaveMetadata("ACCOUNT", "users:1", {"tier": "gold", "x": "1"}))
    assert saved.entry.type == "SET_METADATA"
    assert saved.entry.data == {"targetType": "ACCOUNT", "targetId": "users:1", "metadata": {"tier": "gold", "x": "1"}}
    ledger.run(SaveMetadata("ACCOUNT", "users:1", {"tier": "platinum"}))
    deleted = ledger.run(DeleteMetadata("ACCOUNT", "users:1", "x"))
    assert deleted.entry.type == "DELETE_METADATA" and deleted.entry.id == 3
    assert ledger.store.get((ACCOUNT, "main", "users:1")).metadata == {"tier": "platinum"}


def test_transaction_metadata_needs_the_transaction():
    ledger = Ledger()
    missing = ledger.run(SaveMetadata("TRANSACTION", 7, {"k": "v"}))
    assert isinstance(missing, Rejected) and missing.code == "NOT_FOUND"
    ledger.transfer(posting("world", "a", 1), metadata={"keep": "1"})
    ledger.run(SaveMetadata("TRANSACTION", 1, {"k": "v"}))
    assert ledger.store.get((TRANSACTION, "main", 1)).metadata == {"keep": "1", "k": "v"}
    absent_key = ledger.run(DeleteMetadata("TRANSACTION", 1, "nope"))
    assert isinstance(absent_key, Rejected) and absent_key.code == "NOT_FOUND"
    assert isinstance(ledger.run(DeleteMetadata("TRANSACTION", 1, "k")), Committed)
    assert ledger.store.get((TRANSACTION, "main", 1)).metadata == {"keep": "1"}
