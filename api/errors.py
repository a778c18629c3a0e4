"""One table from error codes to HTTP statuses, and the middleware that applies it.

Every error body is Formance's `{"errorCode", "errorMessage"}` (+ `details` when there
are any, a string of JSON as Formance's schema has it). A client mistake is never a 500;
an unexpected failure is a 500 with a generic message and a logged id the operator can
search for.
"""

from __future__ import annotations

import json
import logging
import uuid

from aiohttp import web

from ledger.errors import LedgerError

log = logging.getLogger("streamledger.gateway")

STATUS_BY_CODE = {
    "VALIDATION": 400,
    "INSUFFICIENT_FUND": 400,
    "NO_POSTINGS": 400,
    "COMPILATION_FAILED": 400,
    "INTERPRETER_PARSE": 400,
    "INTERPRETER_RUNTIME": 400,
    "METADATA_OVERRIDE": 400,
    "ALREADY_REVERT": 400,
    "LEDGER_ALREADY_EXISTS": 400,
    "IMPORT": 400,
    "CONFLICT": 409,
    "NOT_FOUND": 404,
    "LEDGER_NOT_FOUND": 404,
    "BULK_SIZE_EXCEEDED": 413,
    "TIMEOUT": 504,
    "UNAVAILABLE": 503,
    "INTERNAL": 500,
}


def error_response(code: str, message: str, details: dict | None = None, status: int | None = None) -> web.Response:
    body: dict = {"errorCode": code, "errorMessage": message}
    if details:
        # Formance's `details` is a string (V2ErrorResponse in its OpenAPI): generated
        # clients (formance-sdk-python) refuse an object there, and so lose the error code.
        # The structured details travel as compact JSON text (amounts stay exact integers).
        body["details"] = json.dumps(details, separators=(",", ":"), ensure_ascii=False)
    return web.json_response(body, status=status or STATUS_BY_CODE.get(code, 400))


class ApiError(Exception):
    """An error the gateway itself answers (timeouts, unavailable workers)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except LedgerError as error:
        return error_response(error.code, error.message, error.details or None)
    except ApiError as error:
        return error_response(error.code, error.message, status=error.status)
    except json.JSONDecodeError as error:
        return error_response("VALIDATION", f"the body is not valid JSON: {error}")
    except web.HTTPException as error:
        if error.status == 404:
            return error_response("NOT_FOUND", f"no route for {request.method} {request.path}")
        if error.status == 405:
            return error_response("VALIDATION", f"method {request.method} not allowed on {request.path}", status=405)
        if error.status == 413:
            return error_response("VALIDATION", "the request body is too large", status=413)
        raise
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception("unexpected error %s on %s %s", incident, request.method, request.path)
        return error_response("INTERNAL", f"internal error (incident {incident})", status=500)
