"""Time as integers: microseconds since the Unix epoch, UTC.

The core never reads a clock; callers pass `now` in. Formance stores dates with microsecond
precision and renders them as Go's RFC3339Nano in UTC, which trims trailing zeros of the
fraction (and drops it entirely when it is zero). The hash chain depends on that exact text.
"""

from __future__ import annotations

import datetime as _dt
import re
from functools import lru_cache

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|z|[+-]\d{2}:\d{2})$"
)


def format_rfc3339(micros: int) -> str:
    """Render like Go's `time.RFC3339Nano` for a UTC time of microsecond precision."""
    seconds, fraction = divmod(micros, 1_000_000)
    text = _format_seconds(seconds)
    if fraction:
        text += "." + f"{fraction:06d}".rstrip("0")
    return text + "Z"


@lru_cache(maxsize=4096)
def _format_seconds(seconds: int) -> str:
    # A batch stamps thousands of entries with the same few seconds: format each once.
    # Not strftime: glibc's %Y does not pad years below 1000, Go's layout does.
    m = _EPOCH + _dt.timedelta(seconds=seconds)
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"


@lru_cache(maxsize=4096)
def parse_rfc3339(text: str) -> int:
    """Parse an RFC 3339 date (any offset, up to nanoseconds) to UTC microseconds.

    Nanoseconds are rounded to the nearest microsecond, as Formance does (`Time.Round`).
    Raises ValueError with a readable message on anything else.
    """
    match = _RFC3339.match(text)
    if match is None:
        raise ValueError(f"'{text}' is not an RFC 3339 date (e.g. 2025-02-17T12:07:41.522336Z)")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        moment = _dt.datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second),
            tzinfo=_dt.timezone.utc,
        )
    except ValueError as error:
        raise ValueError(f"'{text}' is not a valid date: {error}") from None
    nanos = int((fraction or "0").ljust(9, "0"))
    micros = (nanos + 500) // 1000
    if offset not in ("Z", "z"):
        sign = 1 if offset[0] == "+" else -1
        micros -= sign * (int(offset[1:3]) * 3600 + int(offset[4:6]) * 60) * 1_000_000
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + micros
