"""The log hash chain must be byte-compatible with Formance Ledger v2."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ledger import gojson
from ledger.hashchain import chain, entry_line, memento_of
from ledger.timeutil import format_rfc3339, parse_rfc3339

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared/conformance/formance/logs-v2.1-hashchain.jsonl"


@pytest.mark.skipif(not GOLDEN.exists(), reason=f"golden vector not found at {GOLDEN} (../shared is absent)")
def test_reproduces_formance_golden_hash_chain_byte_for_byte():
    """Five real chained logs exported by Formance: every hash must come out identical."""
    previous = None
    lines = GOLDEN.read_text().splitlines()
    assert len(lines) == 5
    for raw in lines:
        log = json.loads(raw)
        line = entry_line(log["type"], memento_of(log["type"], log["data"]), parse_rfc3339(log["date"]), log["idempotencyKey"])
        previous = chain(previous, line)
        assert base64.b64encode(previous).decode() == log["hash"]


def test_first_entry_has_no_previous_hash_prefix():
    line = entry_line("NEW_TRANSACTION", {"a": 1}, 0)
    assert chain(None, line) != chain(b"\x00" * 32, line)


def test_entry_line_has_formance_key_order_with_id_zero_and_null_hash():
    line = entry_line("SET_METADATA", {"targetType": "ACCOUNT"}, 1_000_000, "ik")
    assert line == (
        '{"type":"SET_METADATA","data":{"targetType":"ACCOUNT"},'
        '"date":"1970-01-01T00:00:01Z","idempotencyKey":"ik","id":0,"hash":null}'
    )


def test_go_json_escapes_html_characters_and_keeps_unicode():
    """Go's encoder escapes <, >, & and U+2028; a different escape changes every later hash."""
    assert gojson.dumps({"k": "<a&b>\u2028é"}) == '{"k":"\\u003ca\\u0026b\\u003e\\u2028é"}'
    assert gojson.dumps(10**40) == "1" + "0" * 40


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1_739_794_061_522_336, "2025-02-17T12:07:41.522336Z"),
        (1_739_794_061_500_000, "2025-02-17T12:07:41.5Z"),
        (1_739_794_061_000_010, "2025-02-17T12:07:41.00001Z"),
    ],
)
def test_dates_render_like_go_rfc3339nano(micros, text):
    assert format_rfc3339(micros) == text
    assert parse_rfc3339(text) == micros


def test_parse_accepts_offsets_and_rounds_nanoseconds():
    assert parse_rfc3339("2025-02-17T13:07:41.5223364+01:00") == parse_rfc3339("2025-02-17T12:07:41.522336Z")
    assert parse_rfc3339("2025-02-17T12:07:41.5223366Z") == parse_rfc3339("2025-02-17T12:07:41.522337Z")


@pytest.mark.parametrize("bad", ["", "2025-02-17", "2025-13-01T00:00:00Z", "yesterday"])
def test_parse_rejects_non_rfc3339(bad):
    with pytest.raises(ValueError):
        parse_rfc3339(bad)


def test_years_before_1000_are_zero_padded_like_go():
    assert format_rfc3339(parse_rfc3339("0001-01-01T00:00:00Z")) == "0001-01-01T00:00:00Z"
    assert format_rfc3339(parse_rfc3339("0999-12-31T23:59:59.5Z")) == "0999-12-31T23:59:59.5Z"
