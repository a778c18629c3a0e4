"""Properties of the interpreter that must hold for every input, not just the examples."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ledger.errors import InsufficientFunds
from ledger.numscript import StaticStore, execute, parse
from ledger.numscript.errors import ParseError
from ledger.numscript.values import parse_portion, to_metadata
from tests.ledger.numscript.helpers import postings

amounts = st.one_of(st.integers(0, 1_000), st.integers(0, 10**30))
portions = st.fractions(min_value=0, max_value=1, max_denominator=1_000)


@settings(max_examples=150, deadline=None)
@given(amounts, st.lists(portions, min_size=1, max_size=6))
def test_allotment_parts_sum_to_the_amount_and_stay_within_one_unit_of_the_share(amount, shares):
    """Allotments never create or lose a unit, and rounding moves each part by < 1 unit."""
    assume(sum(shares) <= 1)
    items = " ".join(f"{p.numerator}/{p.denominator} to @d{i}" for i, p in enumerate(shares))
    source = f"send [COIN {amount}] (source = @world destination = {{ {items} remaining to @rest }})"
    result = execute(parse(source), {}, StaticStore())
    received: dict[str, int] = {}
    for posting in result.postings:
        assert posting.amount > 0
        received[posting.destination] = received.get(posting.destination, 0) + posting.amount
    assert sum(received.values()) == amount
    for index, share in enumerate(shares):
        exact = amount * share
        assert exact - 1 < received.get(f"d{index}", 0) <= exact + 1


sources = st.lists(
    st.tuples(st.integers(-50, 200), st.one_of(st.none(), st.integers(-10, 100))),
    min_size=1,
    max_size=5,
)


def _cascade(accounts):
    items = []
    for index, (_, overdraft) in enumerate(accounts):
        limit = "" if overdraft is None else f" allowing overdraft up to [COIN {overdraft}]"
        items.append(f"@s{index}{limit}")
    return "{ " + " ".join(items) + " }"


@settings(max_examples=150, deadline=None)
@given(sources, st.integers(0, 600))
def test_exact_send_moves_exactly_the_amount_or_fails_and_respects_every_limit(accounts, amount):
    """Either the full amount moves, with no source below -its overdraft, or funds are missing
    and then the sources really could not cover it."""
    balances = {f"s{i}": {"COIN": balance} for i, (balance, _) in enumerate(accounts)}
    capacity = sum(max(0, b + max(0, o or 0)) for b, o in accounts)
    program = parse(f"send [COIN {amount}] (source = {_cascade(accounts)} destination = @dest)")
    try:
        result = execute(program, {}, StaticStore(balances))
    except InsufficientFunds as error:
        assert capacity < amount
        assert (error.needed, error.available) == (amount, capacity)
        return
    assert sum(p.amount for p in result.postings) == amount
    for index, (balance, overdraft) in enumerate(accounts):
        sent = sum(p.amount for p in result.postings if p.source == f"s{index}")
        assert sent == 0 or balance - sent >= -max(0, overdraft or 0)


@settings(max_examples=150, deadline=None)
@given(sources)
def test_send_all_drains_exactly_balance_plus_overdraft(accounts):
    balances = {f"s{i}": {"COIN": balance} for i, (balance, _) in enumerate(accounts)}
    program = parse(f"send [COIN *] (source = {_cascade(accounts)} destination = @dest)")
    result = execute(program, {}, StaticStore(balances))
    expected = sum(max(0, b + max(0, o or 0)) for b, o in accounts)
    assert sum(p.amount for p in result.postings) == expected
    # One posting per sender: adjacent chunks are merged, none is empty.
    assert len({p.source for p in result.postings}) == len(result.postings)


@settings(max_examples=100, deadline=None)
@given(sources, st.integers(0, 600))
def test_execution_is_deterministic(accounts, amount):
    """The ledger replays the log: the same script, vars and balances give the same result."""
    balances = {f"s{i}": {"COIN": balance} for i, (balance, _) in enumerate(accounts)}
    program = parse(f"send [COIN {amount}] (source = {{ {_cascade(accounts)} @world }} destination = @d)")
    first = execute(program, {}, StaticStore(balances))
    assert postings(first) == postings(execute(program, {}, StaticStore(balances)))


tokens = st.sampled_from(
    ["send", "save", "vars", "{", "}", "(", ")", "[", "]", "*", "+", "-", "/", "=", "source",
     "destination", "to", "from", "max", "remaining", "kept", "allowing", "overdraft", "up",
     "unbounded", "oneof", "@a", "@b:$x", "$x", "COIN", "USD/2", "10", "1/3", "50%", '"k"',
     "set_tx_meta", "balance", "meta", ",", "number", "account", "\\", "with", "scaling", "through"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(tokens, max_size=30))
def test_parse_either_succeeds_or_raises_a_compilation_failure(words):
    """No input crashes the parser with anything but a typed, positioned error."""
    try:
        parse(" ".join(words))
    except ParseError as error:
        assert error.line >= 1 and error.column >= 1


@given(portions)
def test_portion_metadata_round_trips(portion):
    """A portion written to metadata (`a/b`) reads back as the same portion."""
    assert parse_portion(to_metadata(portion)) == portion
    assert isinstance(parse_portion(to_metadata(portion)), Fraction)
