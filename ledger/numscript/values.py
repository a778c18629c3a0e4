"""Numscript run-time values, how they are read from strings and written to metadata.

Values are plain Python objects so the interpreter stays fast:

| Numscript type | Python value                               |
|----------------|--------------------------------------------|
| number         | `int`                                      |
| portion        | `fractions.Fraction`                       |
| monetary       | `Monetary(asset, amount)` (amount an int)   |
| account        | `str`, the address without `@`             |
| asset          | `str`, e.g. `USD/2`                        |
| string         | `str`                                      |

Accounts, assets and strings share `str` because every expression's type is known at
parse time (see `interpreter.Expr.check`); nothing at run time needs to tell them apart,
and postings then carry plain strings. Money is never a float.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import NamedTuple

from ledger import limits

ACCOUNT = "account"
ASSET = "asset"
MONETARY = "monetary"
NUMBER = "number"
PORTION = "portion"
STRING = "string"
TYPES = frozenset({ACCOUNT, ASSET, MONETARY, NUMBER, PORTION, STRING})


class Monetary(NamedTuple):
    asset: str
    amount: int

    def __str__(self) -> str:
        return f"{self.asset} {self.amount}"


account_pattern = re.compile(r"[a-zA-Z0-9_-]+(:[a-zA-Z0-9_-]+)*")
# Formance's asset rule (pkg/assets), plus any scale: `USD`, `USD/2`, `USD_RED/2`.
asset_pattern = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z]+)?(/[0-9]+)?")
color_pattern = re.compile(r"[A-Z]*")
_integer_pattern = re.compile(r"-?[0-9]+")
_percent_pattern = re.compile(r"([0-9]+)(?:\.([0-9]+))?%")
_fraction_pattern = re.compile(r"([0-9]+)\s*/\s*([0-9]+)")
_scale_pattern = re.compile(r"[0-9]+")


def to_metadata(value: object) -> str:
    """Stringify a value the way Formance writes it into metadata.

    `12%` becomes `3/25` (a portion is always written as a fraction, `1/1` for 100%),
    a monetary `USD/2 7`, an account its address without `@`.
    """
    if type(value) is Fraction:
        return f"{value.numerator}/{value.denominator}"
    return str(value)


def parse_integer(text: str) -> int | None:
    """An integer in base 10, or None when it is not one or has too many digits."""
    if not _integer_pattern.fullmatch(text) or len(text.lstrip("-")) > limits.amount_digits_max:
        return None
    return int(text)


def parse_percent(text: str) -> Fraction | None:
    """`12.5%` → 1/8, or None when `text` is not a percentage."""
    match = _percent_pattern.fullmatch(text)
    if match is None or len(text) > limits.amount_digits_max:
        return None
    whole, decimals = match.group(1), match.group(2) or ""
    return Fraction(int(whole + decimals), 100 * 10 ** len(decimals))


def parse_portion(text: str) -> Fraction:
    """Read a portion from `15%`, `12.5%` or `1/3`; it must lie in [0, 1].

    Raises ValueError with the reason otherwise.
    """
    portion = parse_percent(text)
    if portion is None:
        match = _fraction_pattern.fullmatch(text)
        if match is None or len(text) > limits.amount_digits_max:
            raise ValueError("expected a percentage like 15% or a fraction like 1/3")
        denominator = int(match.group(2))
        if denominator == 0:
            raise ValueError("the denominator is zero")
        portion = Fraction(int(match.group(1)), denominator)
    if portion > 1:
        raise ValueError("a portion must be between 0% and 100%")
    return portion


def parse_monetary(text: str) -> Monetary:
    """Read `USD/2 100` (asset, one space, integer amount). Raises ValueError."""
    asset, space, amount_text = text.partition(" ")
    if not space or not asset_pattern.fullmatch(asset):
        raise ValueError("expected an asset and an amount, like 'USD/2 100'")
    amount = parse_integer(amount_text)
    if amount is None:
        raise ValueError("the amount is not an integer")
    return Monetary(asset, amount)


def parse_typed(type_name: str, text: str) -> object:
    """Read a variable's string value as the declared type. Raises ValueError."""
    if type_name == ACCOUNT:
        if not account_pattern.fullmatch(text):
            raise ValueError("an account is segments of [a-zA-Z0-9_-] separated by ':'")
        return text
    if type_name == ASSET:
        if not asset_pattern.fullmatch(text):
            raise ValueError("an asset looks like USD or USD/2")
        return text
    if type_name == NUMBER:
        number = parse_integer(text)
        if number is None:
            raise ValueError("expected an integer")
        return number
    if type_name == MONETARY:
        return parse_monetary(text)
    if type_name == PORTION:
        return parse_portion(text)
    assert type_name == STRING, type_name
    return text


def colored(asset: str, color: str) -> str:
    """The ledger asset holding `color` units of `asset`: `USD/2` + `RED` → `USD_RED/2`.

    This is the key under which colored balances are stored and the asset colored postings
    carry, as in Formance's interpreter.
    """
    if not color:
        return asset
    base, slash, scale = asset.partition("/")
    return f"{base}_{color}{slash}{scale}"


def split_color(asset: str) -> tuple[str, str]:
    """Inverse of `colored`: `USD_RED/2` → (`USD/2`, `RED`); `USD/2` → (`USD/2`, ``)."""
    base, slash, scale = asset.partition("/")
    name, underscore, color = base.partition("_")
    if not underscore:
        return asset, ""
    return f"{name}{slash}{scale}", color


def split_scale(asset: str) -> tuple[str, int]:
    """`EUR/2` → (`EUR`, 2); `EUR` → (`EUR`, 0)."""
    base, slash, scale = asset.partition("/")
    if slash and _scale_pattern.fullmatch(scale):
        return base, int(scale)
    return base, 0


def scaled(base: str, scale: int) -> str:
    """Inverse of `split_scale`: (`EUR`, 0) → `EUR`; (`EUR`, 2) → `EUR/2`."""
    return base if scale == 0 else f"{base}/{scale}"
