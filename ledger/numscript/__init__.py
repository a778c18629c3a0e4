"""Numscript: Formance's language for moving money, as a pure interpreter.

    program = parse(source)                       # once; cached, immutable, shareable
    result = execute(program, vars, store)        # per transaction
    result.postings, result.tx_metadata, result.account_metadata

`parse` raises a `ParseError` (a `CompilationFailed`, with `.line`/`.column`) on syntax and
type errors. `execute` raises `InsufficientFunds` when sources cannot cover a `send`, and
an `InterpreterRuntime` subclass (see `ledger.numscript.errors`) for anything else.

A colored posting (`@a \\ "RED"`, flag `experimental-asset-colors`) carries the colored
ledger asset, e.g. `COIN_RED` or `USD_RED/2`, which is also where its balance is read
from; `values.split_color` gives back (`COIN`, `RED`). Asset scaling (`with scaling
through`) emits ordinary postings in each scale's own asset (`EUR`, `EUR/2`).
"""

from ledger.numscript.interpreter import (
    FEATURE_FLAGS,
    ExecutionResult,
    Posting,
    Program,
    StaticStore,
    Store,
    execute,
)
from ledger.numscript.parser import parse

__all__ = [
    "FEATURE_FLAGS",
    "ExecutionResult",
    "Posting",
    "Program",
    "StaticStore",
    "Store",
    "execute",
    "parse",
]
