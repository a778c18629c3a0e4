"""Properties of the core that must hold for every sequence of transfers."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ledger.hashchain import chain, entry_line, memento_of
from ledger.machine import Committed, Rejected, project_entry
from ledger.state import LOG, MemoryStore, Overlay
from tests.ledger.helpers import Ledger, posting

ACCOUNTS = ["world", "a", "b", "c", "users:1", "users:2"]
ASSETS = ["USD/2", "EUR", "COIN"]

postings = st.builds(
    posting,
    st.sampled_from(ACCOUNTS),
    st.sampled_from(ACCOUNTS),
    st.one_of(st.integers(0, 1_000), st.integers(0, 10**30)),
    st.sampled_from(ASSETS),
)
transactions = st.lists(postings, min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(transactions, st.booleans()), max_size=25))
def test_balances_sum_to_zero_per_asset_and_only_world_goes_negative(batch):
    """Double entry: every posting moves money, never creates it; without `force`, no
    account but `world` ever goes negative."""
    ledger = Ledger()
    forced = False
    for tx_postings, force in batch:
        if isinstance(ledger.transfer(*tx_postings, force=force), Committed) and force:
            forced = True
    totals: dict[str, int] = {}
    for (account, asset), balance in ledger.balances().items():
        totals[asset] = totals.get(asset, 0) + balance
        if account != "world" and not forced:
            assert balance >= 0, (account, asset, balance)
    assert all(total == 0 for total in totals.values()), totals


operations = st.one_of(
    st.tuples(st.just("transfer"), transactions, st.booleans(), st.one_of(st.none(), st.integers(0, 20))),
    st.tuples(st.just("revert"), st.integers(1, 10), st.booleans()),
    st.tuples(st.just("metadata"), st.sampled_from(ACCOUNTS), st.dictionaries(st.sampled_from("xyz"), st.text(max_size=3), max_size=2)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(operations, min_size=1, max_size=20))
def test_replaying_the_log_rebuilds_an_identical_store(batch):
    """Recovery projects log entries: a store rebuilt from the log alone equals the live one
    (except request records of rejections, which come from the rejection topic) — with
    reverts, metadata and back-dated transactions in the mix."""
    from ledger.commands import RevertTransaction, SaveMetadata
    from ledger.timeutil import format_rfc3339

    live = Ledger()
    for operation in batch:
        if operation[0] == "transfer":
            _, tx_postings, force, day = operation
            extra = {} if day is None else {"timestamp": format_rfc3339(1_700_000_000_000_000 + day * 86_400_000_000)}
            live.transfer(*tx_postings, force=force, **extra)
        elif operation[0] == "revert":
            live.run(RevertTransaction(operation[1], force=operation[2]))
        else:
            live.run(SaveMetadata("ACCOUNT", operation[1], operation[2]))
    rebuilt = MemoryStore()
    overlay = Overlay(rebuilt)
    entries = sorted(
        (value for key, value in live.store.data.items() if key[0] == LOG),
        key=lambda entry: entry.id,
    )
    for entry in entries:
        project_entry(overlay, entry)
    rebuilt.apply(overlay.writes())
    live_state = {k: v for k, v in live.store.data.items() if not _is_rejection_record(v)}
    assert rebuilt.data == live_state


def _is_rejection_record(value) -> bool:
    return getattr(value, "code", None) is not None


@settings(max_examples=30, deadline=None)
@given(st.lists(transactions, min_size=3, max_size=8), st.data())
def test_editing_any_entry_changes_every_later_hash(batch, data):
    ledger = Ledger()
    entries = []
    for tx_postings in batch:
        outcome = ledger.transfer(*tx_postings, force=True)
        assert isinstance(outcome, Committed)
        entries.append(outcome.entry)
    victim = data.draw(st.integers(0, len(entries) - 1))
    tampered = list(entries)
    transaction = dict(tampered[victim].data["transaction"])
    transaction["postings"] = [dict(p) for p in transaction["postings"]]
    transaction["postings"][0]["amount"] += 1
    tampered[victim] = dataclasses.replace(tampered[victim], data={**tampered[victim].data, "transaction": transaction})
    previous = None
    for index, entry in enumerate(tampered):
        previous = chain(previous, entry_line(entry.type, memento_of(entry.type, entry.data), entry.date))
        if index < victim:
            assert previous == entries[index].hash
        else:
            assert previous != entries[index].hash


class LedgerAgainstModel(RuleBasedStateMachine):
    """The ledger against a plain dict of balances: same accept/reject, same balances."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.model: dict[tuple[str, str], int] = {}
        self.references: set[str] = set()
        self.next_id = 1

    @rule(tx_postings=transactions, reference=st.one_of(st.none(), st.sampled_from(["r1", "r2", "r3"])))
    def transfer(self, tx_postings, reference):
        body = {"reference": reference} if reference else {}
        outcome = self.ledger.transfer(*tx_postings, **body)
        expected = dict(self.model)
        ok = reference not in self.references
        for p in tx_postings:
            if not ok:
                break
            source = (p["source"], p["asset"])
            if p["source"] != "world" and expected.get(source, 0) < p["amount"]:
                ok = False
                break
            expected[source] = expected.get(source, 0) - p["amount"]
            destination = (p["destination"], p["asset"])
            expected[destination] = expected.get(destination, 0) + p["amount"]
        if ok:
            assert isinstance(outcome, Committed), outcome
            assert outcome.entry.data["transaction"]["id"] == self.next_id
            self.next_id += 1
            self.model = expected
            if reference:
                self.references.add(reference)
        else:
            assert isinstance(outcome, Rejected)
            assert outcome.code == ("CONFLICT" if reference in self.references else "INSUFFICIENT_FUND")

    @invariant()
    def balances_match_the_model(self):
        actual = {k: v for k, v in self.ledger.balances().items()}
        for key in set(actual) | set(self.model):
            assert actual.get(key, 0) == self.model.get(key, 0), key


TestLedgerAgainstModel = LedgerAgainstModel.TestCase
TestLedgerAgainstModel.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)
