"""Bitemporality: effective volumes follow effective dates, even when back-dated."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.commands import RevertTransaction
from ledger.model import Volumes
from ledger.state import EFFECTIVE, TRANSACTION, effective_moment
from ledger.timeutil import format_rfc3339
from tests.ledger.helpers import Ledger, posting

DAY = 86_400_000_000


def _at(day: int) -> str:
    return format_rfc3339(1_700_000_000_000_000 + day * DAY)


def test_a_back_dated_transaction_updates_the_effective_volumes_of_later_moves():
    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10), timestamp=_at(10))
    later = ledger.transfer(posting("world", "a", 5), timestamp=_at(20)).entry.data["transaction"]
    assert later["postCommitEffectiveVolumes"]["a"]["USD/2"] == {"input": 15, "output": 0, "balance": 15}
    back = ledger.transfer(posting("world", "a", 100), timestamp=_at(1)).entry.data["transaction"]
    # Inserted before both: its own effective volumes see only itself...
    assert back["postCommitEffectiveVolumes"]["a"]["USD/2"]["input"] == 100
    # ...while its insertion-order volumes see everything inserted before it.
    assert back["postCommitVolumes"]["a"]["USD/2"]["input"] == 115
    # And the later moves now include it.
    moment = effective_moment(ledger.store.get((TRANSACTION, "main", 2)).timestamp, 2)
    assert ledger.store.get((EFFECTIVE, "main", "a", "USD/2", moment)) == Volumes(115, 0)


def test_revert_at_effective_date_is_back_dated():
    ledger = Ledger()
    ledger.transfer(posting("world", "a", 10), timestamp=_at(1))
    ledger.transfer(posting("world", "a", 1), timestamp=_at(5))
    revert = ledger.run(RevertTransaction(1, at_effective_date=True)).entry.data["transaction"]
    assert revert["postCommitEffectiveVolumes"]["a"]["USD/2"] == {"input": 10, "output": 10, "balance": 0}


def test_effective_volumes_can_be_disabled_per_ledger():
    from ledger.commands import CreateLedger

    ledger = Ledger(name="main")
    ledger.name = "plain"
    ledger.run(CreateLedger(features={"MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES": "DISABLED"}))
    outcome = ledger.transfer(posting("world", "a", 1))
    assert "postCommitEffectiveVolumes" not in outcome.entry.data["transaction"]
    assert not any(key[0] == EFFECTIVE and key[1] == "plain" for key in ledger.store.data)


moves = st.lists(
    st.tuples(st.integers(0, 30), st.sampled_from(["a", "b"]), st.integers(1, 100)), min_size=1, max_size=15
)


@settings(max_examples=80, deadline=None)
@given(moves)
def test_every_effective_record_is_the_sum_of_moves_at_or_before_it(history):
    """Brute force against the definition, whatever order the effective dates arrive in."""
    ledger = Ledger()
    applied = []  # (timestamp, transaction id, account, amount)
    for day, account, amount in history:
        entry = ledger.transfer(posting("world", account, amount), timestamp=_at(day)).entry
        timestamp = ledger.store.get((TRANSACTION, "main", entry.data["transaction"]["id"])).timestamp
        applied.append((timestamp, entry.data["transaction"]["id"], account, amount))
    for timestamp, transaction_id, account, _ in applied:
        moment = effective_moment(timestamp, transaction_id)
        expected = sum(a for t, i, acc, a in applied
                       if acc == account and effective_moment(t, i) <= moment)
        assert ledger.store.get((EFFECTIVE, "main", account, "USD/2", moment)) == Volumes(expected, 0)
        world_total = sum(a for t, i, _acc, a in applied if effective_moment(t, i) <= moment)
        assert ledger.store.get((EFFECTIVE, "main", "world", "USD/2", moment)) == Volumes(0, world_total)
