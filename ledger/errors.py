"""Typed errors of the ledger domain.

Every operating error a client can cause is a `LedgerError` carrying a stable `code`
(Formance's v2 `errorCode` vocabulary) and the data a caller needs to act on it. The API
maps codes to HTTP statuses in one table (`api/errors.py`); the worker turns them into
`Rejection` records. Programmer errors are `assert`s, never `LedgerError`s.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Root of every expected, client-caused failure of the ledger core."""

    code = "INTERNAL"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class ValidationError(LedgerError):
    code = "VALIDATION"


class NoPostings(LedgerError):
    code = "NO_POSTINGS"


class InsufficientFunds(LedgerError):
    code = "INSUFFICIENT_FUND"

    def __init__(self, account: str, asset: str, needed: int, available: int) -> None:
        super().__init__(
            f"account '{account}' has insufficient funds of {asset}: "
            f"needed {needed}, available {available}",
            account=account,
            asset=asset,
            needed=needed,
            available=available,
        )
        self.account = account
        self.asset = asset
        self.needed = needed
        self.available = available


class Conflict(LedgerError):
    code = "CONFLICT"


class NotFound(LedgerError):
    code = "NOT_FOUND"


class LedgerNotFound(LedgerError):
    code = "LEDGER_NOT_FOUND"


class LedgerAlreadyExists(LedgerError):
    code = "LEDGER_ALREADY_EXISTS"


class AlreadyReverted(LedgerError):
    code = "ALREADY_REVERT"


class MetadataOverride(LedgerError):
    code = "METADATA_OVERRIDE"


class CompilationFailed(LedgerError):
    """A Numscript program that does not parse or does not type-check."""

    code = "COMPILATION_FAILED"


class InterpreterRuntime(LedgerError):
    """A Numscript program that parsed but failed while running (other than funds)."""

    code = "INTERPRETER_RUNTIME"
