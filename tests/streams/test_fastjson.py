"""The fast JSON path must write exactly what the stdlib writes, for any value."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from streams.fastjson import dumps_json

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(values)
def test_matches_the_stdlib_encoding_including_big_integers(value):
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert dumps_json(value) == expected.encode()
    assert json.loads(dumps_json(value)) == value


def test_integers_beyond_64_bits_survive():
    assert json.loads(dumps_json({"amount": 10**40})) == {"amount": 10**40}
