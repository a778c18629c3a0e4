"""Formance's Numscript spec files (`X.num.specs.json`), checked without any I/O.

`check_specs(source, specs)` runs every test case of one parsed spec document against the
script text and says, per case, whether it passed and which expectations differed. The
format is Formance's `specs.schema.json`: file-level `balances`, `variables`, `metadata`,
`featureFlags`, overridden or extended per case, and the expectations `expect.postings`,
`expect.txMetadata`, `expect.metadata` (the account metadata the script sets),
`expect.endBalances`, `expect.endBalances.include`, `expect.movements`,
`expect.error.missingFunds` and `expect.error.negativeAmount`.

Colored rows (`"asset": "COIN", "color": "RED"`) stand for the ledger asset `COIN_RED`,
which is how balances are stored and postings are emitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ledger.errors import InsufficientFunds, LedgerError
from ledger.numscript import values as v
from ledger.numscript.errors import NegativeAmount
from ledger.numscript.interpreter import ExecutionResult, StaticStore, execute
from ledger.numscript.parser import parse

BalanceKey = tuple[str, str]  # (account, ledger asset)


@dataclass(frozen=True, slots=True)
class CaseResult:
    it: str
    passed: bool
    skipped: bool = False
    # One sentence per expectation that did not hold.
    failures: tuple[str, ...] = ()


class SpecFormatError(ValueError):
    """The spec document does not follow specs.schema.json."""


def check_specs(source: str, specs: Mapping[str, Any]) -> list[CaseResult]:
    """Run every test case of `specs` against the script `source`."""
    cases = specs.get("testCases")
    if not isinstance(cases, list):
        raise SpecFormatError("a spec file needs a 'testCases' list")
    try:
        program = parse(source)
    except LedgerError as error:
        return [CaseResult(_name(case), False, failures=(f"script: {error}",)) for case in cases]
    focused = any(case.get("focus") for case in cases)
    results = []
    for case in cases:
        if case.get("skip") or (focused and not case.get("focus")):
            results.append(CaseResult(_name(case), False, skipped=True))
            continue
        failures = _check_case(program, specs, case)
        results.append(CaseResult(_name(case), not failures, failures=tuple(failures)))
    return results


def _name(case: Mapping[str, Any]) -> str:
    return str(case.get("it", "?"))


def _check_case(program, specs: Mapping[str, Any], case: Mapping[str, Any]) -> list[str]:
    balances = {**balance_rows(specs.get("balances", [])), **balance_rows(case.get("balances", []))}
    variables = {**specs.get("variables", {}), **case.get("variables", {})}
    metadata = _merge_metadata(specs.get("metadata", {}), case.get("metadata", {}))
    flags = frozenset(specs.get("featureFlags", [])) | frozenset(case.get("featureFlags", []))
    store_balances: dict[str, dict[str, int]] = {}
    for (account, asset), amount in balances.items():
        store_balances.setdefault(account, {})[asset] = amount
    try:
        result = execute(program, variables, StaticStore(store_balances, metadata), flags)
    except LedgerError as error:
        return _check_error(case, error)
    return _check_result(case, balances, result)


def _check_error(case: Mapping[str, Any], error: LedgerError) -> list[str]:
    if case.get("expect.error.missingFunds") and isinstance(error, InsufficientFunds):
        return []
    if case.get("expect.error.negativeAmount") and isinstance(error, NegativeAmount):
        return []
    return [f"unexpected error {error.code}: {error}"]


def _check_result(
    case: Mapping[str, Any], initial: dict[BalanceKey, int], result: ExecutionResult
) -> list[str]:
    failures = []
    for name in ("missingFunds", "negativeAmount"):
        if case.get(f"expect.error.{name}"):
            failures.append(f"expect.error.{name}: expected the error, the script succeeded")
    got_postings = [
        (str(p.source), str(p.destination), p.amount, p.asset) for p in result.postings
    ]
    if "expect.postings" in case:
        expected = [_posting(row) for row in case["expect.postings"]]
        if expected != got_postings:
            failures.append(
                f"expect.postings: expected {_show(expected)}, got {_show(got_postings)}"
            )
    if "expect.txMetadata" in case and case["expect.txMetadata"] != result.tx_metadata:
        failures.append(
            f"expect.txMetadata: expected {case['expect.txMetadata']}, got {result.tx_metadata}"
        )
    if "expect.metadata" in case and case["expect.metadata"] != result.account_metadata:
        failures.append(
            f"expect.metadata: expected {case['expect.metadata']}, got {result.account_metadata}"
        )
    end = end_balances(initial, got_postings)
    if "expect.endBalances" in case:
        expected_end = balance_rows(case["expect.endBalances"])
        if expected_end != end:
            failures.append(f"expect.endBalances: {_diff(expected_end, end)}")
    if "expect.endBalances.include" in case:
        expected_end = balance_rows(case["expect.endBalances.include"])
        subset = {key: end.get(key, 0) for key in expected_end}
        if expected_end != subset:
            failures.append(f"expect.endBalances.include: {_diff(expected_end, subset)}")
    if "expect.movements" in case:
        expected_moves = _movement_rows(case["expect.movements"])
        got_moves = movements(got_postings)
        if expected_moves != got_moves:
            failures.append(f"expect.movements: {_diff(expected_moves, got_moves)}")
    return failures


def _amount(row: Mapping[str, Any]) -> int:
    amount = row.get("amount")
    if isinstance(amount, float) and amount.is_integer():
        return int(amount)  # JSON writers may print 1e3; money itself stays an int
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise SpecFormatError(f"amount must be an integer: {row!r}")
    return amount


def _asset(row: Mapping[str, Any]) -> str:
    return v.colored(str(row["asset"]), str(row.get("color") or ""))


def balance_rows(rows: list[Mapping[str, Any]]) -> dict[BalanceKey, int]:
    """Balance rows → {(account, ledger asset): amount}; a later row wins."""
    return {(str(row["account"]), _asset(row)): _amount(row) for row in rows}


def _posting(row: Mapping[str, Any]) -> tuple[str, str, int, str]:
    return (str(row["source"]), str(row["destination"]), _amount(row), _asset(row))


def _movement_rows(rows: list[Mapping[str, Any]]) -> dict[tuple[str, str, str], int]:
    return {(str(r["source"]), str(r["destination"]), _asset(r)): _amount(r) for r in rows}


def movements(postings: list[tuple[str, str, int, str]]) -> dict[tuple[str, str, str], int]:
    """Total moved per (source, destination, asset)."""
    moved: dict[tuple[str, str, str], int] = {}
    for source, destination, amount, asset in postings:
        key = (source, destination, asset)
        moved[key] = moved.get(key, 0) + amount
    return moved


def end_balances(
    initial: dict[BalanceKey, int], postings: list[tuple[str, str, int, str]]
) -> dict[BalanceKey, int]:
    """Initial balances with the postings applied (every account they touch appears)."""
    end = dict(initial)
    for source, destination, amount, asset in postings:
        end[(source, asset)] = end.get((source, asset), 0) - amount
        end[(destination, asset)] = end.get((destination, asset), 0) + amount
    return end


def _merge_metadata(
    base: Mapping[str, Mapping[str, str]], override: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, str]]:
    merged = {account: dict(row) for account, row in base.items()}
    for account, row in override.items():
        merged.setdefault(account, {}).update(row)
    return merged


def _show(postings: list[tuple[str, str, int, str]]) -> str:
    return "[" + ", ".join(f"{s}->{d} {a} {asset}" for s, d, a, asset in postings) + "]"


def _diff(expected: Mapping, got: Mapping) -> str:
    parts = []
    for key in sorted(set(expected) | set(got), key=repr):
        if expected.get(key) != got.get(key):
            parts.append(f"{'/'.join(key)} expected {expected.get(key)}, got {got.get(key)}")
    return "; ".join(parts)
