"""Behaviour of `execute`: how sources, destinations and statements move money."""

from __future__ import annotations

import pytest

from ledger import limits
from ledger.errors import InsufficientFunds, InterpreterRuntime
from ledger.numscript import Posting, StaticStore, execute, parse
from ledger.numscript.errors import (
    AllotmentInSendAll,
    DivisionByZero,
    FeatureNotEnabled,
    InvalidAllotment,
    InvalidUnboundedInSendAll,
    InvalidValue,
    InvalidVariable,
    MetadataNotFound,
    MismatchedAssets,
    MissingVariable,
    NegativeAmount,
    NegativeBalance,
    StepsExceeded,
)
from ledger.numscript.values import split_color
from tests.ledger.numscript.helpers import CountingStore, postings, run


def test_simple_send_moves_the_amount():
    result = run(
        "send [USD/2 100] (source = @alice destination = @bob)", {"alice": {"USD/2": 100}}
    )
    assert result.postings == [Posting("alice", "bob", 100, "USD/2")]
    assert result.tx_metadata == {} and result.account_metadata == {}


def test_insufficient_funds_carries_account_asset_needed_and_available():
    """The API turns these fields into a structured INSUFFICIENT_FUND error (Formance #1646)."""
    with pytest.raises(InsufficientFunds) as caught:
        run("send [USD/2 100] (source = @alice destination = @bob)", {"alice": {"USD/2": 60}})
    error = caught.value
    assert (error.account, error.asset, error.needed, error.available) == ("alice", "USD/2", 100, 60)
    assert error.code == "INSUFFICIENT_FUND"


def test_cascade_names_the_last_bounded_account_it_drew_from():
    with pytest.raises(InsufficientFunds) as caught:
        run("send [A 16] (source = {@a @b} destination = @c)", {"a": {"A": 3}, "b": {"A": 12}})
    assert (caught.value.account, caught.value.needed, caught.value.available) == ("b", 16, 15)


def test_world_is_unbounded_and_goes_negative_freely():
    result = run("send [COIN 10**0] (source = @world destination = @a)".replace("10**0", "7"))
    assert postings(result) == [("world", "a", 7, "COIN")]


def test_cascade_drains_sources_in_order():
    result = run(
        "send [USD/2 10] (source = {@a @b @c} destination = @d)",
        {"a": {"USD/2": 3}, "b": {"USD/2": 0}, "c": {"USD/2": 100}},
    )
    assert postings(result) == [("a", "d", 3, "USD/2"), ("c", "d", 7, "USD/2")]


def test_bounded_overdraft_never_exceeds_its_limit():
    result = run(
        "send [COIN 10] (source = {@s allowing overdraft up to [COIN 5] @world} destination = @d)",
        {"s": {"COIN": -2}},
    )
    assert postings(result) == [("s", "d", 3, "COIN"), ("world", "d", 7, "COIN")]


def test_unbounded_overdraft_sends_everything_asked():
    result = run("send [COIN 10] (source = @s allowing unbounded overdraft destination = @d)")
    assert postings(result) == [("s", "d", 10, "COIN")]


def test_send_all_takes_balance_plus_overdraft_and_never_a_negative_amount():
    result = run(
        "send [COIN *] (source = {@a allowing overdraft up to [COIN 5] @b} destination = @d)",
        {"a": {"COIN": 1}, "b": {"COIN": -4}},
    )
    assert postings(result) == [("a", "d", 6, "COIN")]


def test_send_all_from_an_unbounded_source_is_an_error():
    with pytest.raises(InvalidUnboundedInSendAll):
        run("send [COIN *] (source = @world destination = @d)")
    with pytest.raises(InvalidUnboundedInSendAll):
        run("send [COIN *] (source = @a allowing unbounded overdraft destination = @d)")


def test_send_all_through_a_source_allotment_is_an_error():
    with pytest.raises(AllotmentInSendAll):
        run("send [COIN *] (source = {1/2 from @a remaining from @b} destination = @d)")


def test_capped_source_takes_at_most_the_cap_and_a_negative_cap_as_zero():
    result = run(
        "send [COIN 100] (source = {max [COIN 40] from @a max [COIN -5] from @b @c} destination = @d)",
        {"a": {"COIN": 1000}, "b": {"COIN": 1000}, "c": {"COIN": 1000}},
    )
    assert postings(result) == [("a", "d", 40, "COIN"), ("c", "d", 60, "COIN")]


def test_cap_in_another_asset_is_an_error():
    with pytest.raises(MismatchedAssets):
        run("send [COIN 1] (source = max [GEM 1] from @world destination = @d)")


def test_destination_allotment_rounds_down_then_gives_leftovers_top_down():
    result = run("send [GEM 15] (source = @world destination = {80% to @a 8% to @b 12% to @c})")
    assert postings(result) == [("world", "a", 13, "GEM"), ("world", "b", 1, "GEM"), ("world", "c", 1, "GEM")]


def test_allotment_that_does_not_sum_to_one_is_an_error():
    with pytest.raises(InvalidAllotment, match="not 1"):
        run("send [A 10] (source = @world destination = {1/2 to @a 1/3 to @b})")
    with pytest.raises(InvalidAllotment, match="more than 1"):
        run("send [A 10] (source = @world destination = {1/2 to @a 2/3 to @b remaining kept})")


def test_allotment_portions_from_variables_are_checked_when_running():
    source = "vars { portion $p }\nsend [A 10] (source = @world destination = {$p to @a 1/2 to @b})"
    assert postings(run(source, variables={"p": "50%"})) == [("world", "a", 5, "A"), ("world", "b", 5, "A")]
    with pytest.raises(InvalidAllotment):
        run(source, variables={"p": "1/3"})


def test_division_by_zero_fails_at_run_time():
    with pytest.raises(DivisionByZero):
        run("vars { number $n }\nsend [A 1] (source = @world destination = {1/$n to @a remaining kept})", variables={"n": "0"})


def test_in_order_destination_fills_caps_then_remaining():
    result = run(
        "send [USD/2 100] (source = @world destination = {max [USD/2 10] to @a max [USD/2 12] kept remaining to @r})"
    )
    assert postings(result) == [("world", "a", 10, "USD/2"), ("world", "r", 78, "USD/2")]


def test_kept_funds_return_to_the_sender_balance():
    """`kept` is not a posting: the money never left, so a later send can spend it."""
    result = run(
        "send [A 10] (source = @a destination = {max [A 4] kept remaining to @b})\n"
        "send [A *] (source = @a destination = @c)",
        {"a": {"A": 10}},
    )
    assert postings(result) == [("a", "b", 6, "A"), ("a", "c", 4, "A")]


def test_balances_are_tracked_across_statements():
    with pytest.raises(InsufficientFunds):
        run(
            "send [COIN 50] (source = @a destination = @z)\nsend [COIN 50] (source = @a destination = @z)",
            {"a": {"COIN": 60}},
        )


def test_received_funds_are_spendable_later_without_rereading_the_store():
    result = run(
        "send [COIN 50] (source = @world destination = @a)\nsend [COIN 100] (source = @a destination = @b)",
        {"a": {"COIN": 50}},
    )
    assert postings(result)[-1] == ("a", "b", 100, "COIN")


def test_no_zero_amount_postings():
    result = run("send [GEM 2] (source = {@empty @world} destination = {90% to @a 10% to @b})")
    assert postings(result) == [("world", "a", 2, "GEM")]
    assert run("send [COIN 0] (source = @x destination = @y)").postings == []


def test_postings_are_not_merged_across_sends():
    result = run("send [A 1] (source = @world destination = @b)\nsend [A 1] (source = @world destination = @b)")
    assert postings(result) == [("world", "b", 1, "A"), ("world", "b", 1, "A")]


def test_negative_send_is_refused():
    with pytest.raises(NegativeAmount):
        run("send [A 1] - [A 2] (source = @world destination = @b)")


def test_save_sets_funds_aside_and_never_raises_a_balance():
    result = run(
        "save [USD 10] from @alice\nsend [USD 30] (source = {@alice @world} destination = @bob)",
        {"alice": {"USD": 20}},
    )
    assert postings(result) == [("alice", "bob", 10, "USD"), ("world", "bob", 20, "USD")]
    with pytest.raises(InsufficientFunds):
        run(
            "save [USD *] from @alice\nsend [USD 10] (source = @alice allowing overdraft up to [USD 30] destination = @w)",
            {"alice": {"USD": -100}},
        )


def test_metadata_values_are_stringified_like_formance():
    result = run(
        'set_tx_meta("portion", 12%)\nset_tx_meta("money", [USD/2 7])\n'
        'set_tx_meta("account", @users:1)\nset_tx_meta("n", 2 - 5)\n'
        'set_account_meta(@acc, "asset", COIN)'
    )
    assert result.tx_metadata == {"portion": "3/25", "money": "USD/2 7", "account": "users:1", "n": "-3"}
    assert result.account_metadata == {"acc": {"asset": "COIN"}}


def test_variables_are_parsed_from_strings_by_type():
    result = run(
        "vars { account $a\n monetary $m\n portion $p\n number $n\n string $s\n asset $x }\n"
        'set_tx_meta("a", $a)\nset_tx_meta("m", $m)\nset_tx_meta("p", $p)\n'
        'set_tx_meta("n", $n)\nset_tx_meta("s", $s)\nset_tx_meta("x", $x)',
        variables={"a": "users:001", "m": "USD/2 100", "p": "12.5%", "n": "-4", "s": "hi", "x": "EUR/2"},
    )
    assert result.tx_metadata == {"a": "users:001", "m": "USD/2 100", "p": "1/8", "n": "-4", "s": "hi", "x": "EUR/2"}


@pytest.mark.parametrize(
    "type_name, raw",
    [("account", "bad account"), ("monetary", "USD/2"), ("monetary", "usd 1"), ("portion", "101%"),
     ("portion", "1/0"), ("number", "1.5"), ("asset", "usd")],
)
def test_malformed_variables_are_rejected(type_name, raw):
    with pytest.raises(InvalidVariable):
        run(f"vars {{ {type_name} $v }}", variables={"v": raw})


def test_missing_variable_is_an_error():
    with pytest.raises(MissingVariable):
        run("vars { account $v }")


def test_meta_origin_is_parsed_as_the_declared_type():
    result = run(
        'vars { account $sale\n account $seller = meta($sale, "seller")\n portion $cut = meta($seller, "cut") }\n'
        "send [EUR/2 100] (source = $sale destination = {remaining to $seller $cut to @platform})",
        {"sales:1": {"EUR/2": 100}},
        {"sale": "sales:1"},
        {"sales:1": {"seller": "users:2"}, "users:2": {"cut": "12.5%"}},
    )
    assert postings(result) == [("sales:1", "users:2", 88, "EUR/2"), ("sales:1", "platform", 12, "EUR/2")]


def test_missing_metadata_is_an_error():
    with pytest.raises(MetadataNotFound):
        run('vars { account $a = meta(@x, "k") }')


def test_balance_origin_refuses_a_negative_balance():
    with pytest.raises(NegativeBalance):
        run("vars { monetary $b = balance(@a, COIN) }", {"a": {"COIN": -1}})


def test_experimental_features_must_be_enabled():
    """Flags come from the ledger's configuration or from the script's own pragma."""
    source = "send [COIN 1] (source = oneof {@world} destination = @b)"
    with pytest.raises(FeatureNotEnabled) as caught:
        run(source)
    assert caught.value.flag == "experimental-oneof"
    assert run(source, flags={"experimental-oneof"}).postings
    assert run('#![feature("experimental-oneof")]\n' + source).postings


def test_colored_source_reads_and_posts_the_colored_asset():
    result = run(
        'send [USD/2 5] (source = @a \\ "RED" destination = @b)',
        {"a": {"USD_RED/2": 5, "USD/2": 100}},
        flags={"experimental-asset-colors"},
    )
    assert postings(result) == [("a", "b", 5, "USD_RED/2")]
    assert split_color(result.postings[0].asset) == ("USD/2", "RED")


def test_invalid_color_is_an_error():
    with pytest.raises(InvalidValue):
        run('send [A 1] (source = @a \\ "red" destination = @b)', flags={"experimental-asset-colors"})


def test_interpolated_account_must_be_a_valid_address():
    source = "vars { string $s }\nsend [A 1] (source = @world destination = @users:$s)"
    flags = {"experimental-account-interpolation"}
    assert postings(run(source, variables={"s": "x1"}, flags=flags)) == [("world", "users:x1", 1, "A")]
    with pytest.raises(InvalidValue):
        run(source, variables={"s": "has space"}, flags=flags)


def test_oneof_destination_picks_the_first_clause_that_fits():
    result = run(
        "send [A 10] (source = @world destination = oneof {max [A 5] to @small max [A 50] to @big remaining to @rest})",
        flags={"experimental-oneof"},
    )
    assert postings(result) == [("world", "big", 10, "A")]


def test_scaling_converts_a_coarser_scale_through_the_swap_account():
    result = run(
        "send [EUR/2 2] (source = @src with scaling through @swap destination = @dest)",
        {"src": {"EUR": 100}},
        flags={"experimental-asset-scaling"},
    )
    assert postings(result) == [
        ("src", "swap", 1, "EUR"),
        ("swap", "src", 100, "EUR/2"),
        ("src", "dest", 2, "EUR/2"),
    ]


def test_literal_balances_are_read_in_one_batch_before_running():
    """TigerBeetle-style prefetch: one store round trip for the literal accounts."""
    store = CountingStore({"a": {"COIN": 10}, "b": {"COIN": 10}})
    program = parse(
        "send [COIN 5] (source = @a destination = @x)\n"
        "send [COIN 5] (source = {@b @a} destination = @y)\n"
        "send [COIN 1] (source = @world destination = @z)"
    )
    execute(program, {}, store)
    assert store.queries == [{"a": {"COIN"}, "b": {"COIN"}}]


def test_variable_accounts_are_read_in_one_batch_after_the_variables():
    store = CountingStore({"a": {"COIN": 10}})
    program = parse(
        "vars { account $s\n asset $x }\n"
        "send [$x 5] (source = $s destination = @y)\n"
        "send [COIN 5] (source = {@b $s} destination = @y)"
    )
    execute(program, {"s": "a", "x": "COIN"}, store)
    assert store.queries == [{"b": {"COIN"}}, {"a": {"COIN"}}]


def test_destinations_are_never_read():
    store = CountingStore()
    execute(parse("send [COIN 5] (source = @world destination = @d)"), {}, store)
    assert store.queries == []


def test_runaway_script_is_stopped_by_the_step_bound(monkeypatch):
    monkeypatch.setattr(limits, "numscript_steps_max", 50)
    source = "send [A 1] (source = {" + " @a" * 60 + " @world} destination = @b)"
    with pytest.raises(StepsExceeded):
        run(source)


def test_runtime_errors_are_interpreter_runtime_errors():
    """The ledger maps every non-funds failure to INTERPRETER_RUNTIME with one isinstance."""
    for error in (FeatureNotEnabled, MissingVariable, DivisionByZero, InvalidAllotment):
        assert issubclass(error, InterpreterRuntime)


def test_a_program_runs_many_times_with_independent_state():
    program = parse("send [A 5] (source = @a destination = @b)")
    store = StaticStore({"a": {"A": 5}})
    for _ in range(3):
        assert execute(program, {}, store).postings == [Posting("a", "b", 5, "A")]
