"""Parsing and checking: errors carry positions, programs are immutable and cached."""

from __future__ import annotations

import re

import pytest

from ledger import limits
from ledger.errors import CompilationFailed
from ledger.numscript import parse
from ledger.numscript.errors import ParseError, SourceTooLarge, TypeCheckError


def test_syntax_error_reports_line_and_column():
    """An operator reading `check` output must be able to jump to the offending token."""
    with pytest.raises(ParseError) as caught:
        parse("send [COIN 1] (\n  source = @a\n  destinaton = @b\n)")
    assert (caught.value.line, caught.value.column) == (3, 3)
    assert isinstance(caught.value, CompilationFailed)
    assert "'destinaton'" in caught.value.reason


def test_unexpected_end_of_script_points_at_the_end():
    with pytest.raises(ParseError) as caught:
        parse("send [COIN 1] (\n  source = @a\n  destination = @b")
    assert caught.value.line == 3
    assert "end of script" in caught.value.reason


def test_unexpected_character_is_a_parse_error():
    with pytest.raises(ParseError) as caught:
        parse("send [COIN 1] (source = @a destination = @b) ?")
    assert (caught.value.line, caught.value.column) == (1, 46)


def test_undeclared_variable_is_rejected_at_parse_time():
    """Type errors are compilation errors, so the ledger rejects the script before running."""
    with pytest.raises(TypeCheckError) as caught:
        parse("send [COIN 1] (\n  source = $nope\n  destination = @b\n)")
    assert (caught.value.line, caught.value.column) == (2, 12)


@pytest.mark.parametrize(
    "source, message",
    [
        ("vars { number $n }\nsend [COIN 1] (source = $n destination = @b)", "expected account"),
        ("send 12 (source = @a destination = @b)", "expected monetary"),
        ('set_tx_meta("k", 1 + [COIN 1])', "number + monetary"),
        ('set_tx_meta("k", "a" / 2)', "string / number"),
        ("send [COIN 1] (source = @a destination = {@b to @c remaining kept})", "expected portion"),
        ('set_tx_meta("k", nope(1))', "unknown function"),
        ('set_tx_meta("k", balance(@a))', "takes 2 arguments"),
        ("vars { number $n\n number $n }", "declared twice"),
        ('vars { number $n = balance(@a, COIN) }', "is a number but its value is a monetary"),
        ('launch_rockets()', "unknown statement"),
    ],
)
def test_type_errors_are_compilation_failures(source, message):
    with pytest.raises(TypeCheckError, match=re.escape(message)):
        parse(source)


def test_two_remaining_clauses_are_rejected():
    with pytest.raises(TypeCheckError, match="only one 'remaining'"):
        parse("send [A 1] (source = @world destination = {remaining to @a remaining to @b})")


def test_max_clauses_cannot_mix_with_portions():
    """`{ max … 50% … }` is neither an allotment nor an in-order destination."""
    with pytest.raises(ParseError, match="cannot be mixed") as caught:
        parse("send [A 1] (source = @world destination = {\n max [A 1] to @a\n 50% to @b\n remaining kept })")
    assert caught.value.line == 3


def test_unknown_feature_in_pragma_enables_nothing():
    """Formance accepts any flag name; a misspelt one surfaces as FeatureNotEnabled."""
    program = parse('#![feature("experimental-onef")]\nsend [A 1] (source = oneof {@world} destination = @b)')
    assert program.features_enabled == {"experimental-onef"}
    assert program.features_used == {"experimental-oneof"}


def test_source_larger_than_the_bound_is_rejected():
    """Bounded input: a huge script is refused before lark ever sees it."""
    with pytest.raises(SourceTooLarge):
        parse("/" * (limits.numscript_source_bytes_max + 1))


def test_absurdly_nested_script_is_a_parse_error_not_a_crash():
    source = "send [A 1] (source = " + "{" * 5000 + "@world" + "}" * 5000 + " destination = @b)"
    with pytest.raises(ParseError, match="nested too deeply"):
        parse(source)


def test_number_literal_digits_are_bounded():
    with pytest.raises(ParseError, match="digits"):
        parse(f"send [A {'9' * (limits.amount_digits_max + 1)}] (source = @world destination = @b)")


def test_parse_is_cached_and_programs_are_immutable():
    """The ledger parses a script once and shares the Program between transactions."""
    source = "send [COIN 1] (source = @world destination = @b)"
    program = parse(source)
    assert parse(source) is program
    with pytest.raises(AttributeError):
        program.statements = ()  # type: ignore[misc]


def test_comments_underscores_and_percent_literals_parse():
    program = parse(
        "/* block\n comment */ send [EUR 10_000] ( // line comment\n"
        " source = @world destination = { 0.19% to @a remaining kept })"
    )
    assert len(program.statements) == 1


def test_program_lists_variables_features_and_literal_balance_reads():
    program = parse(
        '#![feature("experimental-oneof")]\n'
        "vars { account $src\n monetary $m = balance(@reserve, USD/2) }\n"
        "send [USD/2 10] (source = oneof { @a $src } destination = @b)"
    )
    assert program.variables == {"src": "account", "m": "monetary"}
    assert program.features_used == {"experimental-oneof"}
    assert program.features_enabled == {"experimental-oneof"}
    assert dict(program.query) == {"a": {"USD/2"}, "reserve": {"USD/2"}}


def test_world_is_never_prefetched():
    """`world` is unbounded: reading its balance would only lock a hot row for nothing."""
    program = parse("send [COIN 1] (source = {@world @a} destination = @b)")
    assert dict(program.query) == {"a": {"COIN"}}
