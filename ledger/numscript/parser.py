"""Numscript source → a checked, immutable `Program`.

Three passes, all at parse time so that `execute` only runs:
1. lark (LALR(1), `grammar.lark`) reads the text into a tree;
2. `_Builder` turns the tree into interpreter nodes, telling apart the shapes the grammar
   merges (allotment vs in-order destinations);
3. `check` types every expression, folds constants, collects the experimental features
   used and the balances to read before running.

Errors in any pass are `ParseError`s (a `CompilationFailed`) with a 1-based line and column.
"""

from __future__ import annotations

import functools
import importlib.resources

import lark
from lark import Token, Transformer, v_args

from ledger import limits
from ledger.numscript import interpreter as ir
from ledger.numscript import values as v
from ledger.numscript.errors import ParseError, SourceTooLarge, TypeCheckError


@functools.cache
def _lark() -> lark.Lark:
    grammar = importlib.resources.files("ledger.numscript").joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True)


def parse(source: str) -> ir.Program:
    """Parse and check a script. Cached: the same text returns the same `Program`."""
    size_bytes = len(source.encode("utf-8"))
    if size_bytes > limits.numscript_source_bytes_max:
        raise SourceTooLarge(size_bytes, limits.numscript_source_bytes_max)
    return _parse_cached(source)


@functools.lru_cache(maxsize=1024)
def _parse_cached(source: str) -> ir.Program:
    try:
        tree = _lark().parse(source)
        pragmas, var_decls, statements = _Builder().transform(tree)
    except lark.exceptions.VisitError as error:
        if isinstance(error.orig_exc, ParseError):
            raise error.orig_exc from None
        if isinstance(error.orig_exc, RecursionError):
            raise ParseError("script nested too deeply", 1, 1) from None
        raise
    except lark.exceptions.UnexpectedInput as error:
        raise _syntax_error(source, error) from None
    except RecursionError:
        raise ParseError("script nested too deeply", 1, 1) from None
    return _check(source, pragmas, var_decls, statements)


def _check(
    source: str, pragmas: list[str], var_decls: list[ir.VarDecl], statements: list[ir.Statement]
) -> ir.Program:
    ctx = ir.CheckContext()
    try:
        for decl in var_decls:
            decl.check(ctx)
        for statement in statements:
            statement.check(ctx)
    except RecursionError:
        raise ParseError("script nested too deeply", 1, 1) from None
    return ir.Program(
        source=source,
        var_decls=tuple(var_decls),
        statements=tuple(statements),
        features_used=frozenset(ctx.features),
        features_enabled=frozenset(pragmas),
        query=tuple(
            (account, frozenset(assets)) for account, assets in sorted(ctx.query.items())
        ),
        dynamic_query=tuple(ctx.dynamic_query),
    )


def _syntax_error(source: str, error: lark.exceptions.UnexpectedInput) -> ParseError:
    line, column = getattr(error, "line", -1), getattr(error, "column", -1)
    if isinstance(error, lark.exceptions.UnexpectedEOF) or line < 1:
        lines = source.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
        return ParseError(f"unexpected end of script{_expected(error)}", line, column)
    if isinstance(error, lark.exceptions.UnexpectedCharacters):
        return ParseError(f"unexpected character {error.char!r}", line, column)
    token = getattr(error, "token", None)
    if token is not None and token.type == "$END":
        return ParseError(f"unexpected end of script{_expected(error)}", line, column)
    return ParseError(f"unexpected {str(token)!r}{_expected(error)}", line, column)


def _expected(error: lark.exceptions.UnexpectedInput) -> str:
    # `accepts` includes keywords that the lexer folds into IDENTIFIER in `expected`.
    names = (
        getattr(error, "accepts", None)
        or getattr(error, "expected", None)
        or getattr(error, "allowed", None)
        or ()
    )
    shown = []
    for name in sorted(names):
        try:
            pattern = _lark().get_terminal(name).pattern
        except KeyError:
            continue
        if isinstance(pattern, lark.lexer.PatternStr):
            shown.append(repr(pattern.value))
        else:
            shown.append(name.lower())
    if "$END" in names:
        shown.append("end of script")
    return f", expected one of: {', '.join(shown)}" if shown else ""


class _Item:
    """One `{ … }` destination clause before we know which kind of block it is in."""

    __slots__ = ("is_max", "value", "target", "line", "column")

    def __init__(self, is_max: bool, value, target, meta) -> None:
        self.is_max = is_max
        self.value = value  # cap (max), portion, or None for `remaining`
        self.target = target
        self.line = meta.line
        self.column = meta.column


_REMAINING = object()
_KEPT = object()


def _target(target) -> ir.Destination | None:
    return None if target is _KEPT else target


@v_args(meta=True)
class _Builder(Transformer):
    """lark tree → interpreter nodes, bottom-up."""

    # Terminals -------------------------------------------------------------------------

    @v_args(meta=False)
    def VARIABLE(self, token: Token) -> ir.Expr:
        return ir.Var(token[1:]).at(token.line, token.column)

    @v_args(meta=False)
    def ACCOUNT(self, token: Token) -> ir.Expr:
        segments: list = [
            ir.Var(s[1:]).at(token.line, token.column) if s.startswith("$") else s
            for s in token[1:].split(":")
        ]
        if all(type(s) is str for s in segments):
            return ir.Const(token[1:], v.ACCOUNT).at(token.line, token.column)
        return ir.AccountLiteral(segments).at(token.line, token.column)

    @v_args(meta=False)
    def ASSET(self, token: Token) -> ir.Expr:
        return ir.Const(str(token), v.ASSET).at(token.line, token.column)

    @v_args(meta=False)
    def STRING(self, token: Token) -> ir.Expr:
        text = token[1:-1].replace('\\"', '"')
        return ir.Const(text, v.STRING).at(token.line, token.column)

    @v_args(meta=False)
    def NUMBER(self, token: Token) -> ir.Expr:
        digits = token.replace("_", "")
        if len(digits) > limits.amount_digits_max:
            raise ParseError(
                f"number has more than {limits.amount_digits_max} digits",
                token.line,
                token.column,
            )
        return ir.Const(int(digits), v.NUMBER).at(token.line, token.column)

    @v_args(meta=False)
    def PERCENT(self, token: Token) -> ir.Expr:
        portion = v.parse_percent(str(token))
        if portion is None:
            raise ParseError("percentage is too long", token.line, token.column)
        return ir.Const(portion, v.PORTION).at(token.line, token.column)

    # Program structure -------------------------------------------------------------------

    def start(self, meta, children):
        pragmas: list[str] = []
        var_decls: list[ir.VarDecl] = []
        statements: list[ir.Statement] = []
        for child in children:
            if isinstance(child, tuple):
                pragmas.extend(child)
            elif isinstance(child, list):
                var_decls = child
            else:
                statements.append(child)
        return pragmas, var_decls, statements

    def pragma(self, meta, children):
        # Like Formance, a pragma may name any flag: an unknown one enables nothing, and a
        # misspelt one shows up as FeatureNotEnabled for the feature actually used.
        return tuple(child.value for child in children)  # STRING tokens are Consts by now

    def vars_block(self, meta, children):
        return list(children)

    def var_decl(self, meta, children):
        type_token, variable, *origin = children
        return ir.VarDecl(str(type_token), variable.name, origin[0] if origin else None).at(
            meta.line, meta.column
        )

    def send(self, meta, children):
        sent, source, destination = children
        if isinstance(sent, tuple):
            return ir.Send(None, sent[1], source, destination).at(meta.line, meta.column)
        return ir.Send(sent, None, source, destination).at(meta.line, meta.column)

    def sent_all(self, meta, children):
        return ("all", children[0])

    def save(self, meta, children):
        sent, account = children
        if isinstance(sent, tuple):
            return ir.Save(None, sent[1], account).at(meta.line, meta.column)
        return ir.Save(sent, None, account).at(meta.line, meta.column)

    def fn_statement(self, meta, children):
        name, args = str(children[0]), children[1]
        if name == "set_tx_meta" and len(args) == 2:
            return ir.SetTxMeta(*args).at(meta.line, meta.column)
        if name == "set_account_meta" and len(args) == 3:
            return ir.SetAccountMeta(*args).at(meta.line, meta.column)
        if name in ("set_tx_meta", "set_account_meta"):
            count = 2 if name == "set_tx_meta" else 3
            raise TypeCheckError(
                f"{name}() takes {count} arguments, got {len(args)}", meta.line, meta.column
            )
        raise TypeCheckError(
            f"unknown statement {name}(): use send, save, set_tx_meta or set_account_meta",
            meta.line,
            meta.column,
        )

    # Sources ------------------------------------------------------------------------------

    def src_account(self, meta, children):
        account, *color = children
        return ir.AccountSource(account, color[0] if color else None, None, False).at(
            meta.line, meta.column
        )

    def src_unbounded(self, meta, children):
        account, *color = children
        return ir.AccountSource(account, color[0] if color else None, None, True).at(
            meta.line, meta.column
        )

    def src_bounded(self, meta, children):
        account, *color, limit = children
        return ir.AccountSource(account, color[0] if color else None, limit, False).at(
            meta.line, meta.column
        )

    def color(self, meta, children):
        return children[0]

    def src_scaling(self, meta, children):
        return ir.ScalingSource(*children).at(meta.line, meta.column)

    def src_allotment(self, meta, children):
        portions = [None if p is _REMAINING else p for p, _ in children]
        return ir.AllotmentSource(portions, [s for _, s in children]).at(meta.line, meta.column)

    def allot_src_item(self, meta, children):
        return tuple(children)

    def remaining(self, meta, children):
        return _REMAINING

    def src_inorder(self, meta, children):
        return ir.InorderSource(list(children)).at(meta.line, meta.column)

    def src_oneof(self, meta, children):
        return ir.OneofSource(list(children)).at(meta.line, meta.column)

    def src_capped(self, meta, children):
        return ir.CappedSource(*children).at(meta.line, meta.column)

    # Destinations -------------------------------------------------------------------------

    def dest_account(self, meta, children):
        return ir.AccountDestination(children[0]).at(meta.line, meta.column)

    def to_destination(self, meta, children):
        return children[0]

    def kept(self, meta, children):
        return _KEPT

    def dest_portion_item(self, meta, children):
        portion, target = children
        return _Item(False, None if portion is _REMAINING else portion, target, meta)

    def dest_max_item(self, meta, children):
        return _Item(True, children[0], children[1], meta)

    def dest_block(self, meta, items):
        if not any(item.is_max for item in items):
            portions = [item.value for item in items]
            targets = [_target(item.target) for item in items]
            return ir.AllotmentDestination(portions, targets).at(meta.line, meta.column)
        return self._inorder(ir.InorderDestination, meta, items)

    def dest_oneof(self, meta, items):
        return self._inorder(ir.OneofDestination, meta, items)

    def _inorder(self, kind, meta, items):
        *clauses, last = items
        for item in clauses:
            if not item.is_max:
                raise ParseError(
                    "only 'max … to' clauses can come before 'remaining' here; "
                    "portions and 'max' clauses cannot be mixed",
                    item.line,
                    item.column,
                )
        if last.is_max or last.value is not None:
            raise ParseError(
                "this destination must end with a 'remaining' clause", last.line, last.column
            )
        return kind(
            [item.value for item in clauses],
            [_target(item.target) for item in clauses],
            _target(last.target),
        ).at(meta.line, meta.column)

    # Expressions --------------------------------------------------------------------------

    def add(self, meta, children):
        return ir.Add(*children).at(meta.line, meta.column)

    def sub(self, meta, children):
        return ir.Sub(*children).at(meta.line, meta.column)

    def div(self, meta, children):
        return ir.Div(*children).at(meta.line, meta.column)

    def neg(self, meta, children):
        return ir.Neg(children[0]).at(meta.line, meta.column)

    def variable(self, meta, children):
        return children[0]

    asset_literal = string_literal = account_literal = variable
    number_literal = percent_literal = variable

    def monetary_literal(self, meta, children):
        return ir.MonetaryLiteral(*children).at(meta.line, meta.column)

    def call(self, meta, children):
        return ir.Call(str(children[0]), children[1]).at(meta.line, meta.column)

    def arguments(self, meta, children):
        return list(children)

