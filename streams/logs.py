"""Logging for every process: human-readable lines by default, JSON lines on request.

`STREAMLEDGER_LOG_FORMAT=json` gives one JSON object per line with `ts`, `level`,
`logger`, `message` and any `extra={...}` fields, for log pipelines.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import NoReturn

_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in body:
                body[key] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def handler() -> logging.Handler:
    stream = logging.StreamHandler()
    if os.environ.get("STREAMLEDGER_LOG_FORMAT", "text").lower() == "json":
        stream.setFormatter(JsonFormatter())
    else:
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    return stream


def exit_process(logger: logging.Logger, message: str, *args, exc_info: bool = False,
                 level: int = logging.CRITICAL, code: int = 70) -> NoReturn:
    """Log and exit at once, without unwinding: by default (critical, code 70) for a worker
    that must stop writing now (its offsets are not committed; a restart recovers from the
    log)."""
    logger.log(level, message, *args, exc_info=exc_info)
    logging.shutdown()
    os._exit(code)


def configure(level: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler()]
    root.setLevel(level.upper())


def configure_ours(level: str) -> None:
    """Only streamledger's own loggers (in the worker, faust owns the root logger): with the
    JSON format they get their own handler; otherwise they go through faust's."""
    if os.environ.get("STREAMLEDGER_LOG_FORMAT", "text").lower() != "json":
        return
    ours = logging.getLogger("streamledger")
    ours.handlers[:] = [handler()]
    ours.setLevel(level.upper())
    ours.propagate = False
