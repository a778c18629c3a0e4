"""The gateway: Formance Ledger v2's HTTP API over the Kafka write path.

Writes are validated here (shape, addresses, assets, amounts), turned into a `Request`,
produced to `ledger.requests`, and answered with the outcome the owning worker publishes.
Reads are forwarded to the worker that owns the ledger's partition. Every route is served
under `/v2/…` and, for clients configured for a Formance stack gateway, `/api/ledger/v2/…`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid

import aiohttp
from aiohttp import web

from api.errors import ApiError, errors_middleware
from ledger import commands, limits
from ledger.commands import Request
from ledger.machine import Committed, Rejected
from ledger.model import validate_address, validate_ledger_name, validate_metadata, validate_text
from api.producer import Answer, RequestsClient
from streams.settings import Settings

log = logging.getLogger("streamledger.gateway")

SETTINGS = web.AppKey("settings", Settings)
CLIENT = web.AppKey("client", RequestsClient)
HTTP = web.AppKey("http", aiohttp.ClientSession)
VERSION = "0.1.0"


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    app = web.Application(middlewares=[errors_middleware], client_max_size=limits.http_body_bytes_max)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_kafka_client)
    app.cleanup_ctx.append(_http_session)
    routes = [
        ("GET", "/_info", info),
        ("GET", "", list_ledgers),
        ("GET", "/", list_ledgers),
        ("POST", "/{ledger}", create_ledger),
        ("GET", "/{ledger}", get_ledger),
        ("GET", "/{ledger}/_info", get_ledger_info),
        ("POST", "/{ledger}/transactions", create_transaction),
        ("GET", "/{ledger}/transactions", list_transactions),
        ("GET", "/{ledger}/transactions/{id}", get_transaction),
        ("POST", "/{ledger}/transactions/{id}/revert", revert_transaction),
        ("POST", "/{ledger}/transactions/{id}/metadata", save_transaction_metadata),
        ("DELETE", "/{ledger}/transactions/{id}/metadata/{key}", delete_transaction_metadata),
        ("GET", "/{ledger}/accounts/{address}", get_account),
        ("POST", "/{ledger}/accounts/{address}/metadata", save_account_metadata),
        ("DELETE", "/{ledger}/accounts/{address}/metadata/{key}", delete_account_metadata),
        ("GET", "/{ledger}/logs", list_logs),
    ]
    for prefix in ("/v2", "/api/ledger/v2"):
        for method, path, handler in routes:
            app.router.add_route(method, prefix + path, handler)
    app.router.add_get("/api/ledger/_/info", info)
    app.router.add_get("/_healthcheck", healthcheck)
    return app


async def _kafka_client(app: web.Application):
    client = RequestsClient(app[SETTINGS])
    await client.start()
    app[CLIENT] = client
    yield
    await client.stop()


async def _http_session(app: web.Application):
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    app[HTTP] = session
    yield
    await session.close()


# --- helpers ------------------------------------------------------------------------------


def _now_micros() -> int:
    return time.time_ns() // 1000


async def _json_body(request: web.Request) -> object:
    if not request.can_read_body:
        return None
    text = await request.text()
    return json.loads(text) if text.strip() else None


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("true", "1", "yes")


def _input_hash(*parts: object) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode())
    return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


async def _submit(request: web.Request, ledger: str, command, body: object) -> Answer:
    """Produce a command for `ledger` and wait for its outcome; 504 when none comes."""
    settings = request.app[SETTINGS]
    idempotency_key = request.headers.get("Idempotency-Key", "")
    if len(idempotency_key) > limits.idempotency_key_bytes_max:
        raise ApiError("VALIDATION", "Idempotency-Key is too long")
    envelope = Request(
        request_id=uuid.uuid4().hex,
        ledger=ledger,
        command=command,
        idempotency_key=idempotency_key,
        idempotency_hash=_input_hash(request.method, request.match_info.route.resource.canonical
                                     if request.match_info.route.resource else request.path,
                                     dict(request.query), body) if idempotency_key else "",
        dry_run=_flag(request, "dryRun"),
        received_at=_now_micros(),
    )
    timeout = settings.reply_timeout_ms / 1000
    try:
        return await request.app[CLIENT].submit(envelope, timeout)
    except asyncio.TimeoutError:
        raise ApiError(
            "TIMEOUT",
            f"no worker answered within {timeout:g}s; the request {envelope.request_id} may "
            "still be applied — retry with the same Idempotency-Key to get its outcome",
            status=504,
        ) from None
    except ConnectionError as error:
        raise ApiError("UNAVAILABLE", str(error), status=503) from None


def _committed(answer: Answer) -> Committed:
    """The committed outcome, or raise the rejection as the error it is."""
    outcome = answer.outcome
    if isinstance(outcome, Rejected):
        from ledger.errors import LedgerError

        error = LedgerError(outcome.message, **(outcome.details or {}))
        error.code = outcome.code
        raise error
    return outcome


def _respond(answer: Answer, body: object, status: int) -> web.Response:
    headers = {"Idempotency-Hit": "true"} if answer.idempotency_hit else None
    if body is None:
        return web.Response(status=204, headers=headers)
    return web.json_response({"data": body}, status=status, headers=headers)


async def _forward(request: web.Request, path: str, params: dict | None = None) -> dict:
    """GET a worker query view; the worker routes it to the ledger's owner.

    `STREAMLEDGER_WORKER_URL` may list several workers (comma-separated): a worker that is
    down, or a partition moving between workers (503), is retried on the next one for a
    few seconds before the client gets a 503.
    """
    settings = request.app[SETTINGS]
    urls = settings.worker_urls
    deadline = time.monotonic() + settings.query_retry_ms / 1000
    last_error = "no worker configured"
    while True:
        for base in urls:
            try:
                async with request.app[HTTP].get(base + path, params=params or {}) as response:
                    body = await response.json(content_type=None)
                    if response.status in (502, 503, 504) or (response.status >= 500 and "errorCode" not in body):
                        last_error = f"{base} answered {response.status}: {body}"
                        continue
                    if response.status >= 400:
                        raise ApiError(body.get("errorCode", "INTERNAL"), body.get("errorMessage", ""),
                                       status=response.status)
                    return body
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
                last_error = f"{base}: {error!r}"
        if time.monotonic() >= deadline:
            raise ApiError("UNAVAILABLE", f"no worker could answer ({last_error}); retry", status=503)
        await asyncio.sleep(0.2)


def _ledger_name(request: web.Request) -> str:
    return validate_ledger_name(request.match_info["ledger"])


# --- routes -------------------------------------------------------------------------------


async def healthcheck(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def info(request: web.Request) -> web.Response:
    return web.json_response({
        "server": "streamledger",
        "version": VERSION,
        "storage": {"driver": "kafka+rocksdb"},
        "features": {},
    })


async def list_ledgers(request: web.Request) -> web.Response:
    """Every worker lists the ledgers of its own partitions: ask each one and merge. Pages
    go by name, so ledgers created between two pages neither repeat nor shift one."""
    page_size = _page_size(request)
    cursor = request.query.get("cursor")
    after = _decode_cursor(cursor, str) if cursor else None
    settings = request.app[SETTINGS]
    rows: dict[str, dict] = {}
    reached = 0
    for base in settings.worker_urls:
        try:
            async with request.app[HTTP].get(base + "/ledgers") as response:
                if response.status == 200:
                    reached += 1
                    for row in (await response.json(content_type=None))["data"]:
                        rows[row["name"]] = row
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            continue
    if not reached:
        raise ApiError("UNAVAILABLE", "no worker reachable to list ledgers", status=503)
    names = sorted(rows)
    if after is not None:
        names = [name for name in names if name > after]
    data = [rows[name] for name in names[:page_size]]
    page: dict = {"pageSize": page_size, "hasMore": len(names) > page_size, "data": data}
    if page["hasMore"]:
        page["next"] = _encode_cursor(data[-1]["name"])
    return web.json_response({"cursor": page})


async def create_ledger(request: web.Request) -> web.Response:
    ledger = _ledger_name(request)
    body = await _json_body(request)
    command = commands.create_ledger_from_json(ledger, body)
    answer = await _submit(request, ledger, command, body)
    _committed(answer)
    return _respond(answer, None, 204)


async def get_ledger(request: web.Request) -> web.Response:
    ledger = _ledger_name(request)
    return web.json_response(await _forward(request, f"/ledger/{ledger}"))


async def get_ledger_info(request: web.Request) -> web.Response:
    """Formance lists its SQL migrations here; a store rebuilt from the log has none."""
    ledger = _ledger_name(request)
    await _forward(request, f"/ledger/{ledger}")  # LEDGER_NOT_FOUND for a ledger never created
    return web.json_response({"data": {"name": ledger, "storage": {"migrations": []}}})


async def create_transaction(request: web.Request) -> web.Response:
    ledger = _ledger_name(request)
    body = await _json_body(request)
    command = commands.create_transaction_from_json(body, force=_flag(request, "force"))
    answer = await _submit(request, ledger, command, body)
    return _respond(answer, _transaction_view(_committed(answer)), 200)


def _transaction_view(outcome: Committed) -> dict:
    transaction = dict(outcome.entry.data["transaction"])
    transaction.setdefault("revertedAt", None)
    transaction.setdefault("updatedAt", transaction.get("insertedAt"))
    return transaction


def _transaction_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit():
        raise ApiError("VALIDATION", f"transaction id {raw!r} must be a non-negative integer")
    return int(raw)


async def revert_transaction(request: web.Request) -> web.Response:
    ledger = _ledger_name(request)
    transaction_id = _transaction_id(request)
    body = await _json_body(request)
    metadata = validate_metadata((body or {}).get("metadata") if isinstance(body, dict) else None)
    command = commands.RevertTransaction(
        transaction_id, force=_flag(request, "force"),
        at_effective_date=_flag(request, "atEffectiveDate"), metadata=metadata,
    )
    answer = await _submit(request, ledger, command, body)
    return _respond(answer, _transaction_view(_committed(answer)), 201)


async def _metadata_write(request: web.Request, target_type: str, target_id, key: str | None) -> web.Response:
    ledger = _ledger_name(request)
    body = None
    if key is None:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError("VALIDATION", "the body must be an object of string values")
        command: object = commands.SaveMetadata(target_type, target_id, validate_metadata(body))
    else:
        command = commands.DeleteMetadata(target_type, target_id, validate_text(key, "metadata key"))
    answer = await _submit(request, ledger, command, body)
    _committed(answer)
    return _respond(answer, None, 204)


async def save_transaction_metadata(request: web.Request) -> web.Response:
    return await _metadata_write(request, "TRANSACTION", _transaction_id(request), None)


async def delete_transaction_metadata(request: web.Request) -> web.Response:
    return await _metadata_write(request, "TRANSACTION", _transaction_id(request), request.match_info["key"])


async def save_account_metadata(request: web.Request) -> web.Response:
    return await _metadata_write(request, "ACCOUNT", validate_address(request.match_info["address"]), None)


async def delete_account_metadata(request: web.Request) -> web.Response:
    return await _metadata_write(
        request, "ACCOUNT", validate_address(request.match_info["address"]), request.match_info["key"])


async def list_logs(request: web.Request) -> web.Response:
    return await _list_page(request, "logs")


async def get_transaction(request: web.Request) -> web.Response:
    ledger = _ledger_name(request)
    transaction_id = _transaction_id(request)
    return web.json_response(await _forward(request, f"/ledger/{ledger}/transactions/{transaction_id}"))


async def list_transactions(request: web.Request) -> web.Response:
    return await _list_page(request, "transactions")


async def _list_page(request: web.Request, resource: str) -> web.Response:
    """A newest-first page of a ledger's transactions or logs, with Formance's cursor."""
    ledger = _ledger_name(request)
    page_size = _page_size(request)
    cursor = request.query.get("cursor")
    params = {"pageSize": str(page_size)}
    if cursor:
        params["after"] = str(_decode_cursor(cursor))
    body = await _forward(request, f"/ledger/{ledger}/{resource}", params)
    rows = body["data"]
    page: dict = {"pageSize": page_size, "hasMore": body["hasMore"], "data": rows}
    if body["hasMore"] and rows:
        page["next"] = _encode_cursor(rows[-1]["id"])
    return web.json_response({"cursor": page})


def _page_size(request: web.Request) -> int:
    raw = request.query.get("pageSize", str(limits.page_size_default))
    if not raw.isdigit() or not 1 <= int(raw) <= limits.page_size_max:
        raise ApiError("VALIDATION", f"pageSize must be an integer from 1 to {limits.page_size_max}")
    return int(raw)


def _encode_cursor(after: int | str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, kind: type = int) -> int | str:
    """The position a cursor continues after: an id (`int`) or a ledger name (`str`)."""
    try:
        after = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["after"]
        if kind is int:
            return int(after)
        if isinstance(after, str):
            return after
    except (ValueError, KeyError, TypeError):
        pass
    raise ApiError("VALIDATION", "invalid cursor")


async def get_account(request: web.Request) -> web.Response:
    ledger = _ledger_name(request)
    address = validate_address(request.match_info["address"])
    params = {name: request.query[name] for name in ("pit", "expand") if name in request.query}
    return web.json_response(await _forward(request, f"/ledger/{ledger}/accounts/{address}", params))
