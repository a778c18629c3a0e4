"""Compact JSON encoding, fast: orjson when it can, the stdlib when it cannot.

orjson encodes integers only up to 64 bits; amounts are arbitrary-precision, so a value
holding a larger integer falls back to the stdlib encoder (same output, slower). Decoding
always uses the stdlib: orjson *reads* integers beyond 64 bits as floats, which would
silently corrupt money.
"""

from __future__ import annotations

import json

import orjson

_stdlib = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dumps_json(value: object) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return _stdlib.encode(value).encode()


def dumps_text(value: object) -> str:
    return dumps_json(value).decode()
