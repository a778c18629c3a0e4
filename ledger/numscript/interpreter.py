"""The Numscript interpreter: a tree of slotted nodes that type-check once and run many times.

`parser.py` builds the tree and calls `check` on it once, at parse time; `execute` runs it
against one snapshot of balances. Semantics follow Formance's interpreter
(formancehq/numscript `internal/interpreter`):

* Sources push *senders* onto a FIFO funds queue and subtract what they push from the
  balance they track; destinations pull from the queue and emit one posting per pulled
  chunk. Adjacent chunks of the same sender are merged on push, so a `send` emits one
  posting per (sender run, receiver); postings are never merged across statements and a
  zero amount is never posted.
* Balances are read from the store once per (account, asset) and then tracked across
  statements, so a later `send` sees the effects of earlier ones. Only accounts that can
  be drained are read: a destination's credit is kept as a pending delta and added if the
  account is read later.
* `world`, `allowing unbounded overdraft` and `with scaling through` swap accounts are
  unbounded; any other source gives at most `balance + overdraft` (never less than 0).

Nothing here does I/O or reads the clock: the store is the only input besides the
variables, and it is called with batched queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Mapping, NamedTuple, Protocol

from ledger import limits
from ledger.errors import InsufficientFunds, LedgerError
from ledger.numscript import values as v
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
    RuntimeFailure,
    StepsExceeded,
    TypeCheckError,
)
from ledger.numscript.values import Monetary

WORLD = "world"

FLAG_OVERDRAFT_FUNCTION = "experimental-overdraft-function"
FLAG_GET_ASSET_FUNCTION = "experimental-get-asset-function"
FLAG_GET_AMOUNT_FUNCTION = "experimental-get-amount-function"
FLAG_ONEOF = "experimental-oneof"
FLAG_ACCOUNT_INTERPOLATION = "experimental-account-interpolation"
FLAG_MID_SCRIPT_FUNCTION_CALL = "experimental-mid-script-function-call"
FLAG_ASSET_COLORS = "experimental-asset-colors"
FLAG_ASSET_SCALING = "experimental-asset-scaling"
FEATURE_FLAGS = frozenset(
    {
        FLAG_OVERDRAFT_FUNCTION,
        FLAG_GET_ASSET_FUNCTION,
        FLAG_GET_AMOUNT_FUNCTION,
        FLAG_ONEOF,
        FLAG_ACCOUNT_INTERPOLATION,
        FLAG_MID_SCRIPT_FUNCTION_CALL,
        FLAG_ASSET_COLORS,
        FLAG_ASSET_SCALING,
    }
)


# Public data types ---------------------------------------------------------------------


class Posting(NamedTuple):
    """One movement of `amount` units of `asset` from `source` to `destination`.

    A colored posting carries the colored ledger asset (`COIN_RED`, `USD_RED/2`): that is
    the key its balance lives under; `values.split_color` recovers (`COIN`, `RED`).
    """

    source: str
    destination: str
    amount: int
    asset: str


@dataclass(slots=True)
class ExecutionResult:
    postings: list[Posting]
    tx_metadata: dict[str, str] = field(default_factory=dict)
    # Only the metadata the script sets (`set_account_meta`), not the stored metadata.
    account_metadata: dict[str, dict[str, str]] = field(default_factory=dict)


class Store(Protocol):
    """What the interpreter reads: balances and account metadata, nothing else.

    `get_balances({account: {asset, …}})` returns `{account: {asset: balance}}`; a pair
    that is absent from the answer has a balance of 0. An asset written `EUR/*` asks for
    every scale of `EUR` the account holds (`EUR`, `EUR/1`, `EUR/2`, …); only scripts using
    `experimental-asset-scaling` send it, and a store that cannot enumerate may leave it
    out of the answer (scaling then sees only the scales it was asked about).
    """

    def get_balances(self, query: dict[str, set[str]]) -> dict[str, dict[str, int]]: ...

    def get_account_metadata(self, account: str) -> dict[str, str]: ...


class StaticStore:
    """An in-memory `Store` over plain dicts, for tests, the CLI and dry runs."""

    __slots__ = ("_balances", "_metadata")

    def __init__(
        self,
        balances: Mapping[str, Mapping[str, int]] | None = None,
        metadata: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self._balances = {account: dict(row) for account, row in (balances or {}).items()}
        self._metadata = {account: dict(row) for account, row in (metadata or {}).items()}

    def get_balances(self, query: dict[str, set[str]]) -> dict[str, dict[str, int]]:
        answer: dict[str, dict[str, int]] = {}
        for account, assets in query.items():
            held = self._balances.get(account)
            if not held:
                continue
            row: dict[str, int] = {}
            for asset in assets:
                if asset.endswith("/*"):
                    base = asset[:-2]
                    row.update((a, b) for a, b in held.items() if v.split_scale(a)[0] == base)
                elif asset in held:
                    row[asset] = held[asset]
            answer[account] = row
        return answer

    def get_account_metadata(self, account: str) -> dict[str, str]:
        return dict(self._metadata.get(account, {}))


# Run-time state -------------------------------------------------------------------------


class State:
    """Everything one execution reads and writes. Never shared between executions."""

    __slots__ = (
        "store",
        "vars",
        "balances",
        "deltas",
        "fetched_scales",
        "queue",
        "postings",
        "tx_metadata",
        "account_metadata",
        "asset",
        "steps_left",
        "blame",
    )

    def __init__(self, store: Store) -> None:
        self.store = store
        self.vars: dict[str, object] = {}
        # Current balance of every (account, asset) read from the store so far.
        self.balances: dict[tuple[str, str], int] = {}
        # Net credits to (account, asset) pairs not read yet (mostly destinations).
        self.deltas: dict[tuple[str, str], int] = {}
        self.fetched_scales: set[tuple[str, str]] = set()
        # The funds queue of the running `send`: [account, asset, amount] entries.
        self.queue: list[list] = []
        self.postings: list[Posting] = []
        self.tx_metadata: dict[str, str] = {}
        self.account_metadata: dict[str, dict[str, str]] = {}
        self.asset = ""  # the (uncolored) asset of the running statement
        self.steps_left = limits.numscript_steps_max
        # The last bounded account a source drew from, named in InsufficientFunds.
        self.blame = ""

    def step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise StepsExceeded(limits.numscript_steps_max)

    # Balances ---------------------------------------------------------------------------

    def prefetch(self, query: dict[str, set[str]]) -> None:
        """Read many balances in one store call; pairs already read are left alone."""
        answer = self.store.get_balances(query)
        balances = self.balances
        deltas = self.deltas
        for account, assets in query.items():
            row = answer.get(account) or {}
            for asset in assets:
                key = (account, asset)
                if key not in balances:
                    balances[key] = row.get(asset, 0) + deltas.pop(key, 0)

    def balance(self, account: str, asset: str) -> int:
        value = self.balances.get((account, asset))
        if value is None:
            self.prefetch({account: {asset}})
            value = self.balances[(account, asset)]
        return value

    def credit(self, account: str, asset: str, amount: int) -> None:
        key = (account, asset)
        balances = self.balances
        if key in balances:
            balances[key] += amount
        else:
            self.deltas[key] = self.deltas.get(key, 0) + amount

    def scales_of(self, account: str, base: str) -> dict[int, tuple[str, int]]:
        """Every scale of `base` held by `account`: scale → (asset, current balance)."""
        if (account, base) not in self.fetched_scales:
            self.fetched_scales.add((account, base))
            answer = self.store.get_balances({account: {base + "/*"}}).get(account) or {}
            for asset, amount in answer.items():
                key = (account, asset)
                if key not in self.balances:
                    self.balances[key] = amount + self.deltas.pop(key, 0)
            # A wildcard answer is complete: a pending credit of a scale it did not list
            # is the whole balance of that scale.
            for key in [k for k in self.deltas if k[0] == account]:
                if v.split_scale(key[1])[0] == base:
                    self.balances[key] = self.deltas.pop(key)
        scales: dict[int, tuple[str, int]] = {}
        for (held_by, asset), amount in self.balances.items():
            if held_by == account:
                asset_base, scale = v.split_scale(asset)
                if asset_base == base:
                    scales[scale] = (asset, amount)
        return scales

    # The funds queue ----------------------------------------------------------------------

    def push_sender(self, account: str, asset: str, amount: int) -> None:
        """Queue `amount` from `account` and take it off the account's balance."""
        if amount <= 0:
            return
        self.credit(account, asset, -amount)
        queue = self.queue
        if queue:
            last = queue[-1]
            if last[0] == account and last[1] == asset:
                last[2] += amount
                return
        queue.append([account, asset, amount])

    def push_receiver(self, account: str | None, amount: int) -> None:
        """Give `amount` from the head of the queue to `account` (None: `kept`, back to
        each sender)."""
        if amount <= 0:
            return
        queue = self.queue
        while amount > 0 and queue:
            sender, asset, available = head = queue[0]
            if available <= amount:
                del queue[0]
                taken = available
            else:
                head[2] = available - amount
                taken = amount
            amount -= taken
            if account is None:
                self.credit(sender, asset, taken)
            else:
                self.credit(account, asset, taken)
                self.postings.append(Posting(sender, account, taken, asset))

    def snapshot(self) -> tuple:
        return (
            dict(self.balances),
            dict(self.deltas),
            set(self.fetched_scales),
            [list(entry) for entry in self.queue],
            len(self.postings),
            self.blame,
        )

    def restore(self, snapshot: tuple) -> None:
        balances, deltas, fetched_scales, queue, postings_count, blame = snapshot
        self.balances = balances
        self.deltas = deltas
        self.fetched_scales = fetched_scales
        self.queue = queue
        del self.postings[postings_count:]
        self.blame = blame


# Compile-time context -----------------------------------------------------------------


class CheckContext:
    """What type-checking knows and collects: declared variables and features used."""

    __slots__ = ("var_types", "features", "query", "dynamic_query")

    def __init__(self) -> None:
        self.var_types: dict[str, str] = {}
        self.features: set[str] = set()
        # Balances to read before running, when account and asset are literals.
        self.query: dict[str, set[str]] = {}
        # (account, asset, color) expressions to evaluate and read once variables are known.
        self.dynamic_query: list[tuple[Expr, Expr, Expr | None]] = []


def _type_error(node: Node, message: str) -> TypeCheckError:
    return TypeCheckError(message, node.line, node.column)


# Expressions ------------------------------------------------------------------------------


class Node:
    __slots__ = ("line", "column")

    def at(self, line: int, column: int) -> Node:
        self.line = line
        self.column = column
        return self


class Expr(Node):
    __slots__ = ()
    # True when the node can be evaluated at parse time once its children are constants.
    foldable = False
    # True when evaluating the node reads nothing but variables (no store, no functions).
    pure = True

    def check(self, ctx: CheckContext) -> str:
        raise NotImplementedError

    def ev(self, st: State | None) -> object:
        raise NotImplementedError

    def children_constant(self) -> bool:
        return False


class Const(Expr):
    __slots__ = ("value", "type")

    def __init__(self, value: object, type_name: str) -> None:
        self.value = value
        self.type = type_name

    def check(self, ctx: CheckContext) -> str:
        return self.type

    def ev(self, st: State | None) -> object:
        return self.value


def checked(node: Expr, ctx: CheckContext, want: str | None = None) -> tuple[Expr, str]:
    """Type-check `node` (against `want`, if given) and fold it when it is constant."""
    type_name = node.check(ctx)
    if want is not None and type_name != want:
        raise _type_error(node, f"expected {want}, got {type_name}")
    if node.foldable and node.children_constant():
        try:
            value = node.ev(None)
        except RuntimeFailure:
            return node, type_name  # e.g. 1/0: fails when (and if) it runs, like Formance
        return Const(value, type_name).at(node.line, node.column), type_name
    return node, type_name


class Var(Expr):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def check(self, ctx: CheckContext) -> str:
        type_name = ctx.var_types.get(self.name)
        if type_name is None:
            raise _type_error(self, f"variable ${self.name} is not declared")
        return type_name

    def ev(self, st: State | None) -> object:
        return st.vars[self.name]  # type: ignore[union-attr]


class AccountLiteral(Expr):
    """`@users:$id:main`: an account with interpolated segments (literal ones are Consts)."""

    __slots__ = ("segments",)
    foldable = False

    def __init__(self, segments: list[str | Var]) -> None:
        self.segments = segments

    def check(self, ctx: CheckContext) -> str:
        ctx.features.add(FLAG_ACCOUNT_INTERPOLATION)
        for segment in self.segments:
            if isinstance(segment, Var):
                type_name = segment.check(ctx)
                if type_name not in (v.STRING, v.NUMBER, v.ACCOUNT):
                    raise _type_error(
                        segment, f"cannot interpolate a {type_name} into an account name"
                    )
        return v.ACCOUNT

    def ev(self, st: State | None) -> object:
        parts = [s if type(s) is str else v.to_metadata(s.ev(st)) for s in self.segments]
        name = ":".join(parts)
        if not v.account_pattern.fullmatch(name):
            raise InvalidValue(f"'{name}' is not a valid account name", account=name)
        return name


class Neg(Expr):
    __slots__ = ("operand", "pure")
    foldable = True

    def __init__(self, operand: Expr) -> None:
        self.operand = operand
        self.pure = True

    def children_constant(self) -> bool:
        return type(self.operand) is Const

    def check(self, ctx: CheckContext) -> str:
        self.operand, type_name = checked(self.operand, ctx)
        if type_name not in (v.NUMBER, v.MONETARY):
            raise _type_error(self, f"cannot negate a {type_name}")
        self.pure = self.operand.pure
        return type_name

    def ev(self, st: State | None) -> object:
        value = self.operand.ev(st)
        if type(value) is Monetary:
            return Monetary(value.asset, -value.amount)
        return -value  # type: ignore[operator]


class Infix(Expr):
    __slots__ = ("left", "right", "pure")
    foldable = True
    symbol = ""

    def __init__(self, left: Expr, right: Expr) -> None:
        self.left = left
        self.right = right
        self.pure = True

    def children_constant(self) -> bool:
        return type(self.left) is Const and type(self.right) is Const

    def check(self, ctx: CheckContext) -> str:
        self.left, left_type = checked(self.left, ctx)
        self.right, right_type = checked(self.right, ctx)
        self.pure = self.left.pure and self.right.pure
        allowed = (v.NUMBER,) if self.symbol == "/" else (v.NUMBER, v.MONETARY)
        if left_type != right_type or left_type not in allowed:
            raise _type_error(self, f"cannot compute {left_type} {self.symbol} {right_type}")
        return v.PORTION if self.symbol == "/" else left_type


class Add(Infix):
    __slots__ = ()
    symbol = "+"

    def ev(self, st: State | None) -> object:
        left = self.left.ev(st)
        right = self.right.ev(st)
        if type(left) is Monetary:
            if left.asset != right.asset:  # type: ignore[union-attr]
                raise MismatchedAssets(left.asset, right.asset)  # type: ignore[union-attr]
            return Monetary(left.asset, left.amount + right.amount)  # type: ignore[union-attr]
        return left + right  # type: ignore[operator]


class Sub(Infix):
    __slots__ = ()
    symbol = "-"

    def ev(self, st: State | None) -> object:
        left = self.left.ev(st)
        right = self.right.ev(st)
        if type(left) is Monetary:
            if left.asset != right.asset:  # type: ignore[union-attr]
                raise MismatchedAssets(left.asset, right.asset)  # type: ignore[union-attr]
            return Monetary(left.asset, left.amount - right.amount)  # type: ignore[union-attr]
        return left - right  # type: ignore[operator]


class Div(Infix):
    """`n / m` on numbers is a portion: `1/3`, `$num/$den`."""

    __slots__ = ()
    symbol = "/"

    def ev(self, st: State | None) -> object:
        denominator = self.right.ev(st)
        if denominator == 0:
            raise DivisionByZero()
        return Fraction(self.left.ev(st), denominator)  # type: ignore[arg-type]


class MonetaryLiteral(Expr):
    __slots__ = ("asset", "amount", "pure")
    foldable = True

    def __init__(self, asset: Expr, amount: Expr) -> None:
        self.asset = asset
        self.amount = amount
        self.pure = True

    def children_constant(self) -> bool:
        return type(self.asset) is Const and type(self.amount) is Const

    def check(self, ctx: CheckContext) -> str:
        self.asset, _ = checked(self.asset, ctx, v.ASSET)
        self.amount, _ = checked(self.amount, ctx, v.NUMBER)
        self.pure = self.asset.pure and self.amount.pure
        return v.MONETARY

    def ev(self, st: State | None) -> object:
        return Monetary(self.asset.ev(st), self.amount.ev(st))  # type: ignore[arg-type]


class AssetOf(Expr):
    """The asset of a monetary expression; used only to plan balance reads."""

    __slots__ = ("monetary", "pure")

    def __init__(self, monetary: Expr) -> None:
        self.monetary = monetary
        self.pure = monetary.pure

    def check(self, ctx: CheckContext) -> str:
        return v.ASSET

    def ev(self, st: State | None) -> object:
        return self.monetary.ev(st).asset  # type: ignore[attr-defined]


def _asset_of(amount: Expr) -> Expr:
    if type(amount) is Const:
        return Const(amount.value.asset, v.ASSET)  # type: ignore[attr-defined]
    if isinstance(amount, MonetaryLiteral):
        return amount.asset
    return AssetOf(amount)


# Functions: name → (parameter types, result type, feature flag needed or "").
FUNCTIONS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "meta": ((v.ACCOUNT, v.STRING), v.STRING, ""),
    "balance": ((v.ACCOUNT, v.ASSET), v.MONETARY, ""),
    "overdraft": ((v.ACCOUNT, v.ASSET), v.MONETARY, FLAG_OVERDRAFT_FUNCTION),
    "get_asset": ((v.MONETARY,), v.ASSET, FLAG_GET_ASSET_FUNCTION),
    "get_amount": ((v.MONETARY,), v.NUMBER, FLAG_GET_AMOUNT_FUNCTION),
}


class Call(Expr):
    """A function call. Outside a variable's origin it needs mid-script calls enabled."""

    __slots__ = ("name", "args", "is_origin")
    pure = False

    def __init__(self, name: str, args: list[Expr]) -> None:
        self.name = name
        self.args = args
        self.is_origin = False

    def check(self, ctx: CheckContext) -> str:
        signature = FUNCTIONS.get(self.name)
        if signature is None:
            raise _type_error(self, f"unknown function {self.name}()")
        parameters, result, flag = signature
        if len(self.args) != len(parameters):
            raise _type_error(
                self, f"{self.name}() takes {len(parameters)} arguments, got {len(self.args)}"
            )
        if flag:
            ctx.features.add(flag)
        if not self.is_origin:
            ctx.features.add(FLAG_MID_SCRIPT_FUNCTION_CALL)
        self.args = [checked(arg, ctx, want)[0] for arg, want in zip(self.args, parameters)]
        if self.name in ("balance", "overdraft"):
            account, asset = self.args
            if type(account) is Const and type(asset) is Const and account.value != WORLD:
                ctx.query.setdefault(account.value, set()).add(asset.value)  # type: ignore[arg-type]
        return result

    def ev(self, st: State | None) -> object:
        assert st is not None
        args = [arg.ev(st) for arg in self.args]
        name = self.name
        if name == "meta":
            account, key = args
            value = st.store.get_account_metadata(account).get(key)  # type: ignore[arg-type]
            if value is None:
                raise MetadataNotFound(account, key)  # type: ignore[arg-type]
            return value
        if name == "balance":
            account, asset = args
            amount = st.balance(account, asset)  # type: ignore[arg-type]
            if amount < 0:
                raise NegativeBalance(account, asset, amount)  # type: ignore[arg-type]
            return Monetary(asset, amount)  # type: ignore[arg-type]
        if name == "overdraft":
            account, asset = args
            amount = st.balance(account, asset)  # type: ignore[arg-type]
            return Monetary(asset, -amount if amount < 0 else 0)  # type: ignore[arg-type]
        if name == "get_asset":
            return args[0].asset  # type: ignore[attr-defined]
        assert name == "get_amount", name
        return args[0].amount  # type: ignore[attr-defined]


def _monetary_of(st: State, value: Monetary) -> int:
    """The amount of a cap or overdraft bound, which must be in the statement's asset."""
    if value.asset != st.asset:
        raise MismatchedAssets(st.asset, value.asset)
    return value.amount


def _colored_asset(st: State, color: Expr | None) -> str:
    if color is None:
        return st.asset
    name = color.ev(st)
    if not v.color_pattern.fullmatch(name):  # type: ignore[arg-type]
        raise InvalidValue(f"'{name}' is not a color: use capital letters only", color=name)
    return v.colored(st.asset, name)  # type: ignore[arg-type]


def _allot(st: State, amount: int, portions: list[Expr | None], fixed: list | None) -> list[int]:
    """Split `amount` by `portions` (None = `remaining`), the way Formance does.

    Each part is floor(amount × portion); the units left over are then given, one each,
    to the parts from the top down. `fixed` is the list of portions precomputed at parse
    time when they are all constants (or the error to raise).
    """
    if fixed is None:
        fixed = _portions(st, portions)
    if isinstance(fixed, LedgerError):
        raise fixed
    parts = [amount * p.numerator // p.denominator for p in fixed]
    left = amount - sum(parts)
    index = 0
    while left > 0:
        parts[index] += 1
        left -= 1
        index += 1
    return parts


def _portions(st: State | None, portions: list[Expr | None]) -> list[Fraction] | LedgerError:
    total = Fraction(0)
    values: list[Fraction] = []
    remaining_index = -1
    for index, portion in enumerate(portions):
        if portion is None:
            remaining_index = index
            values.append(Fraction(0))
            continue
        value = portion.ev(st)
        if value < 0:  # type: ignore[operator]
            return InvalidAllotment(f"portion {v.to_metadata(value)} is negative")
        total += value  # type: ignore[operator]
        values.append(value)  # type: ignore[arg-type]
    if remaining_index >= 0:
        if total > 1:
            return InvalidAllotment(f"portions sum to {v.to_metadata(total)}, more than 1")
        values[remaining_index] = 1 - total
    elif total != 1:
        return InvalidAllotment(f"portions sum to {v.to_metadata(total)}, not 1")
    return values


def _check_portions(
    ctx: CheckContext, node: Node, portions: list[Expr | None]
) -> tuple[list[Expr | None], list | LedgerError | None]:
    """Type-check allotment portions; precompute them when all are constants."""
    if sum(1 for p in portions if p is None) > 1:
        raise _type_error(node, "an allotment can have only one 'remaining'")
    checked_portions: list[Expr | None] = [
        None if p is None else checked(p, ctx, v.PORTION)[0] for p in portions
    ]
    if all(p is None or type(p) is Const for p in checked_portions):
        return checked_portions, _portions(None, checked_portions)
    return checked_portions, None


# Sources ------------------------------------------------------------------------------------


class Source(Node):
    __slots__ = ()

    def check(self, ctx: CheckContext, asset: Expr | None) -> None:
        """Type-check; `asset` is the statement's asset expression, for prefetching."""
        raise NotImplementedError

    def try_send(self, st: State, amount: int) -> int:
        """Queue up to `amount`; return what was queued."""
        raise NotImplementedError

    def send_all(self, st: State) -> int:
        """Queue everything this source can give; return it."""
        raise NotImplementedError


def _plan_read(ctx: CheckContext, account: Expr, asset: Expr | None, color: Expr | None) -> None:
    """Remember that (account, asset) will be read, to fetch it before running."""
    if asset is None:
        return
    if type(account) is Const and type(asset) is Const and (color is None or type(color) is Const):
        if account.value == WORLD:
            return
        key = asset.value if color is None else v.colored(asset.value, color.value)  # type: ignore[arg-type]
        ctx.query.setdefault(account.value, set()).add(key)  # type: ignore[arg-type]
    elif account.pure and asset.pure and (color is None or color.pure):
        ctx.dynamic_query.append((account, asset, color))


class AccountSource(Source):
    """`@a`, `@a allowing overdraft up to [A n]`, `@a allowing unbounded overdraft`,
    optionally colored `@a \\ "RED"`."""

    __slots__ = ("account", "color", "overdraft", "unbounded")

    def __init__(self, account: Expr, color: Expr | None, overdraft: Expr | None, unbounded: bool):
        self.account = account
        self.color = color
        self.overdraft = overdraft
        self.unbounded = unbounded

    def check(self, ctx: CheckContext, asset: Expr | None) -> None:
        self.account, _ = checked(self.account, ctx, v.ACCOUNT)
        if self.color is not None:
            ctx.features.add(FLAG_ASSET_COLORS)
            self.color, _ = checked(self.color, ctx, v.STRING)
        if self.overdraft is not None:
            self.overdraft, _ = checked(self.overdraft, ctx, v.MONETARY)
        if not self.unbounded:
            _plan_read(ctx, self.account, asset, self.color)

    def _overdraft(self, st: State) -> int:
        if self.overdraft is None:
            return 0
        limit = _monetary_of(st, self.overdraft.ev(st))  # type: ignore[arg-type]
        return limit if limit > 0 else 0  # a negative limit allows no overdraft

    def try_send(self, st: State, amount: int) -> int:
        st.step()
        account = self.account.ev(st)
        asset = st.asset if self.color is None else _colored_asset(st, self.color)
        if self.unbounded or account == WORLD:
            sent = amount
        else:
            overdraft = self._overdraft(st)
            available = st.balance(account, asset) + overdraft  # type: ignore[arg-type]
            sent = amount if amount < available else available
            if sent < 0:
                sent = 0
            st.blame = account  # type: ignore[assignment]
        st.push_sender(account, asset, sent)  # type: ignore[arg-type]
        return sent

    def send_all(self, st: State) -> int:
        st.step()
        account = self.account.ev(st)
        asset = st.asset if self.color is None else _colored_asset(st, self.color)
        if self.unbounded or account == WORLD:
            raise InvalidUnboundedInSendAll(account)  # type: ignore[arg-type]
        sent = st.balance(account, asset) + self._overdraft(st)  # type: ignore[arg-type]
        if sent < 0:
            sent = 0
        st.push_sender(account, asset, sent)  # type: ignore[arg-type]
        return sent


class ScalingSource(Source):
    """`@a with scaling through @swap`: before sending the statement's asset (say `EUR/2`),
    convert other scales `@a` holds (`EUR`, `EUR/1`, `EUR/3`, …) through `@swap`.

    Each conversion posts `@a → @swap` in the held scale and `@swap → @a` in the target
    scale (the swap account is unbounded). Units already in the target scale are used
    first; then finer scales (whole target units only), then coarser ones, nearest scale
    first; a coarser scale converts whole units, so it may convert more than needed (the
    surplus stays on `@a` in the target scale).
    """

    __slots__ = ("account", "swap")

    def __init__(self, account: Expr, swap: Expr) -> None:
        self.account = account
        self.swap = swap

    def check(self, ctx: CheckContext, asset: Expr | None) -> None:
        ctx.features.add(FLAG_ASSET_SCALING)
        self.account, _ = checked(self.account, ctx, v.ACCOUNT)
        self.swap, _ = checked(self.swap, ctx, v.ACCOUNT)

    def _convert(self, st: State, account: str, needed: int | None) -> None:
        swap = self.swap.ev(st)
        target = st.asset
        base, target_scale = v.split_scale(target)
        scales = st.scales_of(account, base)
        own = st.balance(account, target)
        left = None if needed is None else max(0, needed - max(0, own))
        for scale in sorted(scales, reverse=True):
            if scale == target_scale:
                continue
            if left == 0:
                break
            asset, held = scales[scale]
            if held <= 0:
                continue
            if scale > target_scale:  # finer: 10^d units make one target unit
                factor = 10 ** (scale - target_scale)
                units = held // factor if left is None else min(held // factor, left)
                given, received = units * factor, units
            else:  # coarser: one unit makes 10^d target units
                factor = 10 ** (target_scale - scale)
                given = held if left is None else min(held, -(-left // factor))
                received = given * factor
            if given == 0:
                continue
            st.credit(account, asset, -given)
            st.credit(swap, asset, given)  # type: ignore[arg-type]
            st.postings.append(Posting(account, swap, given, asset))  # type: ignore[arg-type]
            st.credit(swap, target, -received)  # type: ignore[arg-type]
            st.credit(account, target, received)
            st.postings.append(Posting(swap, account, received, target))  # type: ignore[arg-type]
            if left is not None:
                left = max(0, left - received)

    def try_send(self, st: State, amount: int) -> int:
        st.step()
        account = self.account.ev(st)
        self._convert(st, account, amount)  # type: ignore[arg-type]
        available = st.balance(account, st.asset)  # type: ignore[arg-type]
        sent = max(0, min(amount, available))
        st.blame = account  # type: ignore[assignment]
        st.push_sender(account, st.asset, sent)  # type: ignore[arg-type]
        return sent

    def send_all(self, st: State) -> int:
        st.step()
        account = self.account.ev(st)
        self._convert(st, account, None)  # type: ignore[arg-type]
        sent = max(0, st.balance(account, st.asset))  # type: ignore[arg-type]
        st.push_sender(account, st.asset, sent)  # type: ignore[arg-type]
        return sent


class InorderSource(Source):
    """`{ s1 s2 … }`: drain each source in turn."""

    __slots__ = ("sources",)

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    def check(self, ctx: CheckContext, asset: Expr | None) -> None:
        for source in self.sources:
            source.check(ctx, asset)

    def try_send(self, st: State, amount: int) -> int:
        st.step()
        left = amount
        for source in self.sources:
            left -= source.try_send(st, left)
        return amount - left

    def send_all(self, st: State) -> int:
        st.step()
        return sum(source.send_all(st) for source in self.sources)


class OneofSource(Source):
    """`oneof { s1 s2 … }`: the first source able to give the whole amount."""

    __slots__ = ("sources",)

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    def check(self, ctx: CheckContext, asset: Expr | None) -> None:
        ctx.features.add(FLAG_ONEOF)
        for source in self.sources:
            source.check(ctx, asset)

    def try_send(self, st: State, amount: int) -> int:
        st.step()
        for source in self.sources[:-1]:
            before = st.snapshot()
            if source.try_send(st, amount) == amount:
                return amount
            st.restore(before)
        return self.sources[-1].try_send(st, amount)

    def send_all(self, st: State) -> int:
        st.step()
        return self.sources[0].send_all(st)


class CappedSource(Source):
    """`max [A n] from s`: at most n (a negative cap is 0)."""

    __slots__ = ("cap", "source")

    def __init__(self, cap: Expr, source: Source) -> None:
        self.cap = cap
        self.source = source

    def check(self, ctx: CheckContext, asset: Expr | None) -> None:
        self.cap, _ = checked(self.cap, ctx, v.MONETARY)
        self.source.check(ctx, asset)

    def _cap(self, st: State) -> int:
        cap = _monetary_of(st, self.cap.ev(st))  # type: ignore[arg-type]
        return cap if cap > 0 else 0

    def try_send(self, st: State, amount: int) -> int:
        st.step()
        cap = self._cap(st)
        return self.source.try_send(st, amount if amount < cap else cap)

    def send_all(self, st: State) -> int:
        st.step()
        return self.source.try_send(st, self._cap(st))


class AllotmentSource(Source):
    """`{ 1/3 from s1  remaining from s2 }`: each part must be given in full by its source."""

    __slots__ = ("portions", "sources", "fixed")

    def __init__(self, portions: list[Expr | None], sources: list[Source]) -> None:
        self.portions = portions
        self.sources = sources
        self.fixed: list | LedgerError | None = None

    def check(self, ctx: CheckContext, asset: Expr | None) -> None:
        self.portions, self.fixed = _check_portions(ctx, self, self.portions)
        for source in self.sources:
            source.check(ctx, asset)

    def try_send(self, st: State, amount: int) -> int:
        st.step()
        parts = _allot(st, amount, self.portions, self.fixed)
        for source, part in zip(self.sources, parts):
            sent = source.try_send(st, part)
            if sent < part:
                raise InsufficientFunds(st.blame, st.asset, part, sent)
        return amount

    def send_all(self, st: State) -> int:
        raise AllotmentInSendAll()


# Destinations ---------------------------------------------------------------------------------


class Destination(Node):
    __slots__ = ()

    def check(self, ctx: CheckContext) -> None:
        raise NotImplementedError

    def receive(self, st: State, amount: int) -> None:
        raise NotImplementedError


# `kept` is written as None where a destination is expected: the funds go back to senders.
Target = Destination | None


def _receive(st: State, target: Target, amount: int) -> None:
    if target is None:
        st.push_receiver(None, amount)
    else:
        target.receive(st, amount)


class AccountDestination(Destination):
    __slots__ = ("account",)

    def __init__(self, account: Expr) -> None:
        self.account = account

    def check(self, ctx: CheckContext) -> None:
        self.account, _ = checked(self.account, ctx, v.ACCOUNT)

    def receive(self, st: State, amount: int) -> None:
        st.step()
        st.push_receiver(self.account.ev(st), amount)  # type: ignore[arg-type]


class AllotmentDestination(Destination):
    """`{ 80% to d1  remaining kept }`."""

    __slots__ = ("portions", "targets", "fixed")

    def __init__(self, portions: list[Expr | None], targets: list[Target]) -> None:
        self.portions = portions
        self.targets = targets
        self.fixed: list | LedgerError | None = None

    def check(self, ctx: CheckContext) -> None:
        self.portions, self.fixed = _check_portions(ctx, self, self.portions)
        for target in self.targets:
            if target is not None:
                target.check(ctx)

    def receive(self, st: State, amount: int) -> None:
        st.step()
        parts = _allot(st, amount, self.portions, self.fixed)
        for target, part in zip(self.targets, parts):
            _receive(st, target, part)


class InorderDestination(Destination):
    """`{ max [A 10] to d1  max [A 5] kept  remaining to d2 }`."""

    __slots__ = ("caps", "targets", "remaining")

    def __init__(self, caps: list[Expr], targets: list[Target], remaining: Target) -> None:
        self.caps = caps
        self.targets = targets
        self.remaining = remaining

    def check(self, ctx: CheckContext) -> None:
        self.caps = [checked(cap, ctx, v.MONETARY)[0] for cap in self.caps]
        for target in [*self.targets, self.remaining]:
            if target is not None:
                target.check(ctx)

    def receive(self, st: State, amount: int) -> None:
        st.step()
        left = amount
        for cap_expr, target in zip(self.caps, self.targets):
            cap = _monetary_of(st, cap_expr.ev(st))  # type: ignore[arg-type]
            if left == 0:
                break
            taken = max(0, min(cap, left))
            _receive(st, target, taken)
            left -= taken
        _receive(st, self.remaining, left)


class OneofDestination(InorderDestination):
    """`oneof { max [A 10] to d1 … remaining to d }`: the first clause whose cap covers
    the whole amount takes it all; otherwise `remaining` does."""

    __slots__ = ()

    def check(self, ctx: CheckContext) -> None:
        ctx.features.add(FLAG_ONEOF)
        super().check(ctx)

    def receive(self, st: State, amount: int) -> None:
        st.step()
        for cap_expr, target in zip(self.caps, self.targets):
            if _monetary_of(st, cap_expr.ev(st)) >= amount:  # type: ignore[arg-type]
                _receive(st, target, amount)
                return
        _receive(st, self.remaining, amount)


# Statements ------------------------------------------------------------------------------------


class Statement(Node):
    __slots__ = ()

    def check(self, ctx: CheckContext) -> None:
        raise NotImplementedError

    def run(self, st: State) -> None:
        raise NotImplementedError


class Send(Statement):
    """`send [A n] (…)` (amount set) or `send [A *] (…)` (asset set, amount None)."""

    __slots__ = ("amount", "asset", "source", "destination")

    def __init__(
        self, amount: Expr | None, asset: Expr | None, source: Source, destination: Destination
    ) -> None:
        self.amount = amount
        self.asset = asset
        self.source = source
        self.destination = destination

    def check(self, ctx: CheckContext) -> None:
        asset: Expr | None
        if self.amount is not None:
            self.amount, _ = checked(self.amount, ctx, v.MONETARY)
            asset = _asset_of(self.amount)
        else:
            self.asset, _ = checked(self.asset, ctx, v.ASSET)  # type: ignore[arg-type]
            asset = self.asset
        self.source.check(ctx, asset)
        self.destination.check(ctx)

    def run(self, st: State) -> None:
        st.step()
        if self.amount is None:
            st.asset = self.asset.ev(st)  # type: ignore[union-attr,assignment]
            sent = self.source.send_all(st)
            self.destination.receive(st, sent)
        else:
            asset, amount = self.amount.ev(st)  # type: ignore[misc]
            if amount < 0:
                raise NegativeAmount(amount, asset)
            st.asset = asset
            sent = self.source.try_send(st, amount)
            if sent < amount:
                raise InsufficientFunds(st.blame, asset, amount, sent)
            self.destination.receive(st, amount)
        assert not st.queue, "a send left funds in the queue"


class Save(Statement):
    """`save [A n] from @acc`: set funds aside so later sources cannot spend them."""

    __slots__ = ("amount", "asset", "account")

    def __init__(self, amount: Expr | None, asset: Expr | None, account: Expr) -> None:
        self.amount = amount
        self.asset = asset
        self.account = account

    def check(self, ctx: CheckContext) -> None:
        if self.amount is not None:
            self.amount, _ = checked(self.amount, ctx, v.MONETARY)
        else:
            self.asset, _ = checked(self.asset, ctx, v.ASSET)  # type: ignore[arg-type]
        self.account, _ = checked(self.account, ctx, v.ACCOUNT)
        asset = self.asset if self.amount is None else _asset_of(self.amount)
        _plan_read(ctx, self.account, asset, None)

    def run(self, st: State) -> None:
        st.step()
        if self.amount is None:
            asset, amount = self.asset.ev(st), None  # type: ignore[union-attr]
        else:
            asset, amount = self.amount.ev(st)  # type: ignore[misc]
            if amount < 0:
                raise NegativeAmount(amount, asset)
        account = self.account.ev(st)
        balance = st.balance(account, asset)  # type: ignore[arg-type]
        # Saving only ever lowers a positive balance, and never below zero.
        if balance > 0:
            saved = balance if amount is None or amount > balance else amount
            st.credit(account, asset, -saved)  # type: ignore[arg-type]


class SetTxMeta(Statement):
    __slots__ = ("key", "value")

    def __init__(self, key: Expr, value: Expr) -> None:
        self.key = key
        self.value = value

    def check(self, ctx: CheckContext) -> None:
        self.key, _ = checked(self.key, ctx, v.STRING)
        self.value, _ = checked(self.value, ctx)

    def run(self, st: State) -> None:
        st.step()
        st.tx_metadata[self.key.ev(st)] = v.to_metadata(self.value.ev(st))  # type: ignore[index]


class SetAccountMeta(Statement):
    __slots__ = ("account", "key", "value")

    def __init__(self, account: Expr, key: Expr, value: Expr) -> None:
        self.account = account
        self.key = key
        self.value = value

    def check(self, ctx: CheckContext) -> None:
        self.account, _ = checked(self.account, ctx, v.ACCOUNT)
        self.key, _ = checked(self.key, ctx, v.STRING)
        self.value, _ = checked(self.value, ctx)

    def run(self, st: State) -> None:
        st.step()
        account = self.account.ev(st)
        row = st.account_metadata.setdefault(account, {})
        row[self.key.ev(st)] = v.to_metadata(self.value.ev(st))  # type: ignore[index]


class VarDecl(Node):
    """`monetary $m`, `account $a = meta(@x, "k")`, `number $n = 1 + 2`."""

    __slots__ = ("name", "type", "origin", "from_meta")

    def __init__(self, type_name: str, name: str, origin: Expr | None) -> None:
        self.type = type_name
        self.name = name
        self.origin = origin
        self.from_meta = False

    def check(self, ctx: CheckContext) -> None:
        if self.name in ctx.var_types:
            raise _type_error(self, f"variable ${self.name} is declared twice")
        if self.origin is not None:
            if isinstance(self.origin, Call):
                self.origin.is_origin = True
                # meta() reads a string, then parses it as the declared type.
                self.from_meta = self.origin.name == "meta"
            else:
                ctx.features.add(FLAG_MID_SCRIPT_FUNCTION_CALL)
            self.origin, type_name = checked(self.origin, ctx)
            if not self.from_meta and type_name != self.type:
                raise _type_error(
                    self, f"${self.name} is a {self.type} but its value is a {type_name}"
                )
        ctx.var_types[self.name] = self.type

    def value(self, st: State, inputs: Mapping[str, str]) -> object:
        """The variable's value: the input if given (it overrides a default), else its
        origin."""
        raw = inputs.get(self.name)
        if raw is None:
            if self.origin is None:
                raise MissingVariable(self.name)
            if not self.from_meta:
                return self.origin.ev(st)
            raw = self.origin.ev(st)  # type: ignore[assignment]
        try:
            return v.parse_typed(self.type, raw)  # type: ignore[arg-type]
        except ValueError as error:
            raise InvalidVariable(self.name, self.type, raw, str(error)) from None  # type: ignore[arg-type]


# Programs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Program:
    """A parsed, type-checked script. Immutable and safe to share between threads/calls."""

    source: str
    var_decls: tuple[VarDecl, ...]
    statements: tuple[Statement, ...]
    # Experimental features the script uses, and those its `#![feature(…)]` enables.
    features_used: frozenset[str]
    features_enabled: frozenset[str]
    # Balances known before running: account → assets (read-only; copied per execution).
    query: tuple[tuple[str, frozenset[str]], ...]
    dynamic_query: tuple[tuple[Expr, Expr, Expr | None], ...]

    @property
    def variables(self) -> dict[str, str]:
        """Declared variables and their types, in declaration order."""
        return {decl.name: decl.type for decl in self.var_decls}


def execute(
    program: Program,
    vars: Mapping[str, str],
    store: Store,
    feature_flags: frozenset[str] = frozenset(),
) -> ExecutionResult:
    """Run `program` with the given variables against `store`.

    Raises `InsufficientFunds` when sources cannot give what a `send` needs, and a
    `RuntimeFailure` (an `InterpreterRuntime`) for any other failure; on error nothing is
    returned, so a partial result can never be applied.
    """
    missing = program.features_used - program.features_enabled - feature_flags
    if missing:
        raise FeatureNotEnabled(min(missing))
    st = State(store)
    if program.query:
        st.prefetch({account: set(assets) for account, assets in program.query})
    variables = st.vars
    for decl in program.var_decls:
        variables[decl.name] = decl.value(st, vars)
    if program.dynamic_query:
        _prefetch_dynamic(st, program.dynamic_query)
    try:
        for statement in program.statements:
            statement.run(st)
    except RecursionError:
        # Nesting is bounded at parse time; this only guards a caller with a deep stack.
        raise RuntimeFailure("script nested too deeply to run") from None
    return ExecutionResult(st.postings, st.tx_metadata, st.account_metadata)


def _prefetch_dynamic(st: State, items: tuple[tuple[Expr, Expr, Expr | None], ...]) -> None:
    """Read, in one batch, the balances whose account or asset comes from a variable."""
    query: dict[str, set[str]] = {}
    for account_expr, asset_expr, color_expr in items:
        try:
            account = account_expr.ev(st)
            asset = asset_expr.ev(st)
            if color_expr is not None:
                asset = v.colored(asset, color_expr.ev(st))  # type: ignore[arg-type]
        except LedgerError:
            continue  # the statement will raise it when (and if) it runs
        if account != WORLD and (account, asset) not in st.balances:
            query.setdefault(account, set()).add(asset)  # type: ignore[arg-type]
    if query:
        st.prefetch(query)
