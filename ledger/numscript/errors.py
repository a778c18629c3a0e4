"""Errors of the Numscript parser and interpreter.

Each one subclasses the ledger's typed errors (`CompilationFailed`, `InterpreterRuntime`)
so the ledger maps it to a rejection code without knowing Numscript. Missing funds are
the ledger's own `InsufficientFunds` (code `INSUFFICIENT_FUND`), raised as is.
"""

from __future__ import annotations

from ledger.errors import CompilationFailed, InterpreterRuntime


class ParseError(CompilationFailed):
    """The source is not Numscript: a syntax error at a line and column (1-based)."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{line}:{column}: {message}", line=line, column=column)
        self.line = line
        self.column = column
        self.reason = message


class TypeCheckError(ParseError):
    """The source parses but an expression has the wrong type, or names an unknown variable
    or function."""


class SourceTooLarge(CompilationFailed):
    def __init__(self, size_bytes: int, size_bytes_max: int) -> None:
        super().__init__(
            f"script is {size_bytes} bytes, more than the {size_bytes_max} allowed",
            size_bytes=size_bytes,
            size_bytes_max=size_bytes_max,
        )


class RuntimeFailure(InterpreterRuntime):
    """Root of the Numscript runtime errors other than missing funds."""


class FeatureNotEnabled(RuntimeFailure):
    def __init__(self, flag: str) -> None:
        super().__init__(
            f"the script uses '{flag}', an experimental feature: enable it with "
            f'#![feature("{flag}")] or the ledger feature flags',
            flag=flag,
        )
        self.flag = flag


class MissingVariable(RuntimeFailure):
    def __init__(self, name: str) -> None:
        super().__init__(f"variable ${name} has no value: pass it in vars", name=name)
        self.name = name


class InvalidVariable(RuntimeFailure):
    def __init__(self, name: str, type_name: str, raw: str, reason: str) -> None:
        super().__init__(
            f"variable ${name} is not a valid {type_name}: {raw!r} ({reason})",
            name=name,
            type=type_name,
            value=raw,
        )


class MetadataNotFound(RuntimeFailure):
    def __init__(self, account: str, key: str) -> None:
        super().__init__(
            f"account '{account}' has no metadata '{key}'", account=account, key=key
        )


class NegativeAmount(RuntimeFailure):
    def __init__(self, amount: int, asset: str) -> None:
        super().__init__(
            f"cannot send or save a negative amount: [{asset} {amount}]",
            amount=amount,
            asset=asset,
        )
        self.amount = amount
        self.asset = asset


class NegativeBalance(RuntimeFailure):
    def __init__(self, account: str, asset: str, amount: int) -> None:
        super().__init__(
            f"balance({account}, {asset}) is negative ({amount})",
            account=account,
            asset=asset,
            amount=amount,
        )


class MismatchedAssets(RuntimeFailure):
    def __init__(self, expected: str, got: str) -> None:
        super().__init__(
            f"expected a monetary of {expected}, got one of {got}", expected=expected, got=got
        )


class InvalidAllotment(RuntimeFailure):
    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid allotment: {reason}")


class InvalidUnboundedInSendAll(RuntimeFailure):
    def __init__(self, account: str) -> None:
        super().__init__(
            f"cannot send all from '{account}': its overdraft is unbounded", account=account
        )


class AllotmentInSendAll(RuntimeFailure):
    def __init__(self) -> None:
        super().__init__("cannot send all through a source allotment")


class DivisionByZero(RuntimeFailure):
    def __init__(self) -> None:
        super().__init__("division by zero")


class InvalidValue(RuntimeFailure):
    """An account name, asset or color computed at run time that the ledger would refuse."""


class StepsExceeded(RuntimeFailure):
    def __init__(self, steps_max: int) -> None:
        super().__init__(
            f"script stopped after {steps_max} steps", steps_max=steps_max
        )
