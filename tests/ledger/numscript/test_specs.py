"""The spec checker: it must be able to fail, and say why."""

from __future__ import annotations

import pytest

from ledger.numscript.specs import SpecFormatError, check_specs, end_balances, movements

SEND = "send [COIN 10] (source = @a destination = @b)"
BALANCES = [{"account": "a", "asset": "COIN", "amount": 10}]


def _one(source, case, **file_level):
    return check_specs(source, {"testCases": [case], **file_level})[0]


def test_passing_case_passes():
    result = _one(SEND, {"it": "ok", "balances": BALANCES,
                         "expect.postings": [{"source": "a", "destination": "b", "amount": 10, "asset": "COIN"}]})
    assert result.passed and result.failures == ()


def test_wrong_postings_fail_with_both_sides_shown():
    result = _one(SEND, {"it": "x", "balances": BALANCES,
                         "expect.postings": [{"source": "a", "destination": "c", "amount": 10, "asset": "COIN"}]})
    assert not result.passed
    assert result.failures[0].startswith("expect.postings: expected [a->c 10 COIN], got [a->b 10 COIN]")


def test_expected_error_that_does_not_happen_fails():
    result = _one(SEND, {"it": "x", "balances": BALANCES, "expect.error.missingFunds": True})
    assert not result.passed and "expect.error.missingFunds" in result.failures[0]


def test_unexpected_error_fails_with_its_code():
    result = _one(SEND, {"it": "x", "expect.postings": []})
    assert not result.passed and "INSUFFICIENT_FUND" in result.failures[0]


def test_parse_error_fails_every_case():
    results = check_specs("send (", {"testCases": [{"it": "a"}, {"it": "b"}]})
    assert [r.passed for r in results] == [False, False]
    assert results[0].failures[0].startswith("script: 1:")


def test_case_balances_override_file_balances_and_flags_merge():
    result = _one(
        'send [COIN 10] (source = @a \\ "RED" destination = @b)',
        {"it": "x", "balances": [{"account": "a", "asset": "COIN", "color": "RED", "amount": 10}],
         "expect.postings": [{"source": "a", "destination": "b", "amount": 10, "asset": "COIN", "color": "RED"}]},
        balances=[{"account": "a", "asset": "COIN", "color": "RED", "amount": 1}],
        featureFlags=["experimental-asset-colors"],
    )
    assert result.passed, result.failures


def test_end_balances_and_movements_are_checked():
    case = {"it": "x", "balances": BALANCES,
            "expect.endBalances": [{"account": "a", "asset": "COIN", "amount": 0},
                                   {"account": "b", "asset": "COIN", "amount": 9}],
            "expect.movements": [{"source": "a", "destination": "b", "asset": "COIN", "amount": 10}]}
    result = _one(SEND, case)
    assert not result.passed
    assert result.failures == ("expect.endBalances: b/COIN expected 9, got 10",)


def test_end_balances_include_only_looks_at_listed_rows():
    result = _one(SEND, {"it": "x", "balances": BALANCES,
                         "expect.endBalances.include": [{"account": "b", "asset": "COIN", "amount": 10},
                                                        {"account": "nobody", "asset": "COIN", "amount": 0}]})
    assert result.passed, result.failures


def test_skipped_cases_are_reported_as_skipped():
    results = check_specs(SEND, {"testCases": [{"it": "a", "skip": True}, {"it": "b", "balances": BALANCES}]})
    assert results[0].skipped and results[1].passed


def test_malformed_spec_documents_are_rejected():
    with pytest.raises(SpecFormatError):
        check_specs(SEND, {})
    with pytest.raises(SpecFormatError):
        _one(SEND, {"it": "x", "balances": [{"account": "a", "asset": "COIN", "amount": 1.5}]})


def test_end_balances_and_movements_helpers():
    moves = [("a", "b", 3, "X"), ("a", "b", 2, "X"), ("b", "a", 1, "X")]
    assert movements(moves) == {("a", "b", "X"): 5, ("b", "a", "X"): 1}
    assert end_balances({("a", "X"): 10}, moves) == {("a", "X"): 6, ("b", "X"): 4}
