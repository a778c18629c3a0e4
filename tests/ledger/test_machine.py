"""Table-driven tests of the state machine's rules (Formance v2 behaviours)."""

from __future__ import annotations

import pytest

from ledger.commands import CreateLedger, Request, create_transaction_from_json
from ledger.errors import NoPostings, ValidationError
from ledger.machine import Committed, Rejected, Replayed, execute
from ledger.model import validate_address, validate_asset, validate_ledger_name
from ledger.state import HEAD, MemoryStore, Overlay
from tests.ledger.helpers import Ledger, posting


def test_funds_a_bank_account_from_world():
    ledger = Ledger()
    outcome = ledger.transfer(posting("world", "bank", 100))
    assert isinstance(outcome, Committed)
    assert outcome.entry.id == 1 and outcome.entry.data["transaction"]["id"] == 1
    assert ledger.balance("bank") == 100 and ledger.balance("world") == -100


def test_rejects_transaction_when_funds_are_insufficient():
    """Only `world` may go negative; the rejection says what was needed and available."""
    ledger = Ledger()
    ledger.transfer(posting("world", "alice", 30))
    outcome = ledger.transfer(posting("alice", "bob", 31))
    assert isinstance(outcome, Rejected) and outcome.code == "INSUFFICIENT_FUND"
    assert outcome.details == {"account": "alice", "asset": "USD/2", "needed": 31, "available": 30}
    assert ledger.balance("alice") == 30 and ledger.balance("bob") == 0


def test_checks_funds_posting_by_posting_within_a_transaction():
    """Balances are tracked across postings: a later posting may spend an earlier one."""
    ledger = Ledger()
    ok = ledger.transfer(posting("world", "a", 10), posting("a", "b", 10), posting("b", "c", 10))
    assert isinstance(ok, Committed)
    refused = ledger.transfer(posting("c", "d", 10), posting("c", "e", 1))
    assert isinstance(refused, Rejected) and refused.details["account"] == "c"
    assert ledger.balance("c") == 10


def test_force_allows_overdraft():
    ledger = Ledger()
    outcome = ledger.transfer(posting("alice", "bob", 5), force=True)
    assert isinstance(outcome, Committed)
    assert ledger.balance("alice") == -5


def test_duplicate_reference_is_a_conflict():
    ledger = Ledger()
    assert isinstance(ledger.transfer(posting("world", "a", 1), reference="ref-1"), Committed)
    outcome = ledger.transfer(posting("world", "a", 1), reference="ref-1")
    assert isinstance(outcome, Rejected) and outcome.code == "CONFLICT"
    assert ledger.balance("a") == 1


def test_writes_to_a_ledger_that_was_not_created_are_refused():
    store = MemoryStore()
    request = Request("r", "ghost", create_transaction_from_json({"postings": [posting("world", "a", 1)]}))
    outcome = execute(Overlay(store), request, 1)
    assert isinstance(outcome, Rejected) and outcome.code == "LEDGER_NOT_FOUND"


def test_creating_a_ledger_twice_is_refused():
    ledger = Ledger()
    outcome = ledger.run(CreateLedger())
    assert isinstance(outcome, Rejected) and outcome.code == "LEDGER_ALREADY_EXISTS"


def test_ids_are_gapless_from_one_and_rejections_consume_none():
    ledger = Ledger()
    ids = []
    for amount in (1, 10**6, 2, 3):
        outcome = ledger.transfer(posting("world" if amount != 10**6 else "nobody", "a", amount))
        if isinstance(outcome, Committed):
            ids.append((outcome.entry.id, outcome.entry.data["transaction"]["id"]))
    assert ids == [(1, 1), (2, 2), (3, 3)]


def test_a_redelivered_request_id_is_applied_once_and_answers_the_original_outcome():
    ledger = Ledger()
    first = ledger.transfer(posting("world", "a", 5))
    again = ledger.run(create_transaction_from_json({"postings": [posting("world", "a", 5)]}),
                       request_id=first.request_id)
    assert isinstance(again, Replayed) and not again.idempotency_hit
    assert again.original.log_id == first.entry.id
    assert ledger.balance("a") == 5


def test_a_redelivered_rejected_request_answers_the_original_rejection():
    ledger = Ledger()
    first = ledger.transfer(posting("a", "b", 5))
    again = ledger.run(create_transaction_from_json({"postings": [posting("a", "b", 5)]}),
                       request_id=first.request_id)
    assert isinstance(again, Replayed) and again.original.code == "INSUFFICIENT_FUND"


def test_idempotency_key_replays_the_original_and_refuses_a_different_input():
    ledger = Ledger()
    command = create_transaction_from_json({"postings": [posting("world", "a", 5)]})
    first = ledger.run(command, idempotency_key="k", idempotency_hash="h1")
    hit = ledger.run(command, idempotency_key="k", idempotency_hash="h1")
    assert isinstance(hit, Replayed) and hit.idempotency_hit and hit.original.log_id == first.entry.id
    mismatch = ledger.run(command, idempotency_key="k", idempotency_hash="h2")
    assert isinstance(mismatch, Rejected) and mismatch.code == "VALIDATION"
    assert ledger.balance("a") == 5


def test_dry_run_computes_without_consuming_ids_or_moving_money():
    ledger = Ledger()
    dry = ledger.run(create_transaction_from_json({"postings": [posting("world", "a", 5)]}), dry_run=True)
    assert isinstance(dry, Committed) and dry.entry.id == 1
    assert ledger.balance("a") == 0 and ledger.store.get((HEAD, "main")) is None
    real = ledger.transfer(posting("world", "a", 5))
    assert real.entry.id == 1


def test_log_entries_chain_their_hashes():
    ledger = Ledger()
    first = ledger.transfer(posting("world", "a", 1)).entry
    second = ledger.transfer(posting("world", "a", 1)).entry
    from ledger.hashchain import chain, entry_line, memento_of

    line = entry_line(second.type, memento_of(second.type, second.data), second.date)
    assert chain(first.hash, line) == second.hash


def test_post_commit_volumes_are_in_the_transaction():
    ledger = Ledger()
    ledger.transfer(posting("world", "a", 7))
    transaction = ledger.transfer(posting("a", "b", 3)).entry.data["transaction"]
    assert transaction["postCommitVolumes"]["a"]["USD/2"] == {"input": 7, "output": 3, "balance": 4}
    assert transaction["postCommitVolumes"]["b"]["USD/2"] == {"input": 3, "output": 0, "balance": 3}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"postings": []}, NoPostings),
        ({}, NoPostings),
        ({"postings": [posting("world", "a b", 1)]}, ValidationError),
        ({"postings": [posting("world", "a", -1)]}, ValidationError),
        ({"postings": [posting("world", "a", 1.5)]}, ValidationError),
        ({"postings": [posting("world", "a", True)]}, ValidationError),
        ({"postings": [posting("world", "a", 1, "usd")]}, ValidationError),
        ({"postings": [posting("world", "a", 1)], "timestamp": "nope"}, ValidationError),
        ({"postings": [posting("world", "a", 1)], "metadata": {"k": 1}}, ValidationError),
        ({"postings": [posting("world", "a", 1)], "script": {"plain": ""}}, ValidationError),
        ([1, 2], ValidationError),
    ],
)
def test_rejects_malformed_transaction_bodies(body, error):
    with pytest.raises(error):
        create_transaction_from_json(body)


@pytest.mark.parametrize("asset", ["USD", "USD/2", "EUR_STRIPE/2", "A1234567890123456", "COIN/123456"])
def test_accepts_formance_assets(asset):
    create_transaction_from_json({"postings": [posting("world", "a", 1, asset)]})


@pytest.mark.parametrize("validate, text", [
    (validate_address, "bank\n"), (validate_address, "bank:\n"), (validate_asset, "USD\n"),
    (validate_asset, "USD/\u0663"),  # an Arabic-Indic digit: Go's \d is ASCII only
    (validate_ledger_name, "main\n"),
])
def test_names_are_matched_whole_and_in_ascii(validate, text):
    with pytest.raises(ValidationError):
        validate(text)


def test_amounts_of_any_size_are_exact():
    ledger = Ledger()
    huge = 10**60 + 7
    ledger.transfer(posting("world", "a", huge))
    ledger.transfer(posting("a", "b", huge - 1))
    assert ledger.balance("a") == 1 and ledger.balance("world") == -huge


def _script(plain: str, **vars_: str) -> dict:
    return {"script": {"plain": plain, "vars": vars_}}


def test_a_numscript_transaction_moves_money_with_allotments():
    ledger = Ledger()
    ledger.transfer(posting("world", "users:001", 15, "GEM"))
    outcome = ledger.run(create_transaction_from_json(_script(
        "vars { account $rider }\n"
        "send [GEM 15] (source = $rider destination = { 80% to @users:002 8% to @a 12% to @b })",
        rider="users:001")))
    assert isinstance(outcome, Committed)
    postings = [(p["destination"], p["amount"]) for p in outcome.entry.data["transaction"]["postings"]]
    assert postings == [("users:002", 13), ("a", 1), ("b", 1)]
    assert ledger.balance("users:001", "GEM") == 0


def test_a_script_without_funds_is_insufficient_fund_with_details():
    ledger = Ledger()
    outcome = ledger.run(create_transaction_from_json(_script(
        "send [USD/2 100] (source = @alice destination = @bob)")))
    assert isinstance(outcome, Rejected) and outcome.code == "INSUFFICIENT_FUND"
    assert outcome.details["account"] == "alice" and outcome.details["needed"] == 100


def test_a_script_that_does_not_parse_is_refused_at_the_edge_with_its_position():
    from ledger.errors import CompilationFailed

    with pytest.raises(CompilationFailed) as caught:
        create_transaction_from_json(_script("send [USD/2 100] (source = "))
    assert caught.value.message.startswith("1:26")


def test_request_metadata_may_not_override_set_tx_meta():
    ledger = Ledger()
    script = 'set_tx_meta("k", "from-script")\nsend [USD 1] (source = @world destination = @a)'
    outcome = ledger.run(create_transaction_from_json({**_script(script), "metadata": {"k": "from-request"}}))
    assert isinstance(outcome, Rejected) and outcome.code == "METADATA_OVERRIDE"
    ok = ledger.run(create_transaction_from_json({**_script(script), "metadata": {"other": "x"}}))
    assert ok.entry.data["transaction"]["metadata"] == {"k": "from-script", "other": "x"}


def test_scripts_read_account_metadata_from_the_ledger():
    from ledger.commands import SaveMetadata

    ledger = Ledger()
    ledger.run(SaveMetadata("ACCOUNT", "sales:042", {"seller": "users:053"}))
    ledger.run(SaveMetadata("ACCOUNT", "users:053", {"commission": "12.5%"}))
    ledger.transfer(posting("world", "sales:042", 100, "EUR/2"))
    outcome = ledger.run(create_transaction_from_json(_script(
        "vars {\n account $sale\n account $seller = meta($sale, \"seller\")\n"
        " portion $commission = meta($seller, \"commission\")\n}\n"
        "send [EUR/2 100] (source = $sale destination = { remaining to $seller $commission to @platform })",
        sale="sales:042")))
    assert isinstance(outcome, Committed), outcome
    assert ledger.balance("users:053", "EUR/2") == 88 and ledger.balance("platform", "EUR/2") == 12


@pytest.mark.parametrize("where", ["metadata", "reference", "accountMetadata", "vars"])
def test_lone_surrogates_are_refused_at_the_edge(where):
    """JSON can carry "\\ud800", which no UTF-8 encoder downstream accepts: a poison pill."""
    body: dict = {"postings": [posting("world", "a", 1)]}
    if where == "metadata":
        body["metadata"] = {"k": "\ud800"}
    elif where == "reference":
        body["reference"] = "\udc00"
    elif where == "accountMetadata":
        body["accountMetadata"] = {"a": {"\ud800": "v"}}
    else:
        body = {"script": {"plain": "send [USD 1] (source = @world destination = @a)", "vars": {"x": "\ud800"}}}
    with pytest.raises(ValidationError):
        create_transaction_from_json(body)


def test_asset_scaling_reads_every_scale_the_account_holds():
    """`with scaling through` asks the ledger for every scale of an asset (`EUR/*`)."""
    ledger = Ledger()
    ledger.transfer(posting("world", "alice", 4, "EUR/2"), posting("world", "alice", 1, "EUR"))
    script = ('#![feature("experimental-asset-scaling")]\n'
              "send [EUR/2 104] (source = @alice with scaling through @swap destination = @bob)")
    outcome = ledger.run(create_transaction_from_json(_script(script)))
    assert isinstance(outcome, Committed), outcome
    assert ledger.balance("bob", "EUR/2") == 104
    assert ledger.balance("alice", "EUR") == 0 and ledger.balance("alice", "EUR/2") == 0
    too_much = ledger.run(create_transaction_from_json(_script(script)))
    assert isinstance(too_much, Rejected) and too_much.details["available"] == 0


def test_a_refusal_decided_before_execute_is_answered_once_per_request_id():
    """A poison record is redelivered after a crash like any request: its rejection must not
    appear twice in ledger.rejected."""
    from ledger.machine import refuse

    ledger = Ledger()
    overlay = Overlay(ledger.store)
    refusal = Rejected("ledger.requests/0/17", "main", "INVALID_RECORD", "not a request", {}, 5)
    assert refuse(overlay, refusal) is refusal
    again = refuse(overlay, refusal)
    assert isinstance(again, Replayed) and again.original.code == "INVALID_RECORD"
