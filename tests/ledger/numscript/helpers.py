"""Shared helpers for the Numscript tests: run a script against in-memory balances."""

from __future__ import annotations

from ledger.numscript import ExecutionResult, StaticStore, execute, parse


class CountingStore(StaticStore):
    """A StaticStore that records every balance query, to test prefetching."""

    __slots__ = ("queries",)

    def __init__(self, balances=None, metadata=None) -> None:
        super().__init__(balances, metadata)
        self.queries: list[dict[str, set[str]]] = []

    def get_balances(self, query):
        self.queries.append({account: set(assets) for account, assets in query.items()})
        return super().get_balances(query)


def run(
    source: str,
    balances: dict[str, dict[str, int]] | None = None,
    variables: dict[str, str] | None = None,
    metadata: dict[str, dict[str, str]] | None = None,
    flags: frozenset[str] | set[str] = frozenset(),
) -> ExecutionResult:
    return execute(parse(source), variables or {}, StaticStore(balances, metadata), frozenset(flags))


def postings(result: ExecutionResult) -> list[tuple[str, str, int, str]]:
    return [(p.source, p.destination, p.amount, p.asset) for p in result.postings]
