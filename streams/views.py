"""Query views on the worker's web server: reads served from the owning worker's store.

Each view is routed by ledger name with faust's `topic_route` on `ledger.requests`: a query
that reaches a worker which does not own the ledger's partition is forwarded to the owner.
Views take only the path and query string (faust forwards neither bodies nor methods other
than the original), and answer JSON in Formance's shapes; the gateway wraps them.
"""

from __future__ import annotations

import faust
from faust.web import Request, Response, View
from faust.web.exceptions import ServiceUnavailable
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ledger import render
from ledger.state import ACCOUNT, EFFECTIVE, LEDGER, LOG, TRANSACTION, VOLUMES, AccountRecord, effective_moment
from ledger.timeutil import parse_rfc3339
from streams.codecs import log_entry_json
from streams.fastjson import dumps_json
from streams.topics import partition_for


def _effective(store, ledger: str, transaction) -> dict | None:
    """A transaction's post-commit effective volumes as they stand now (back-dated
    transactions inserted after it may have changed them), or None when not kept."""
    moment = effective_moment(transaction.timestamp, transaction.id)
    effective: dict = {}
    for posting in transaction.postings:
        for account in (posting.source, posting.destination):
            volumes = store.get((EFFECTIVE, ledger, account, posting.asset, moment))
            if volumes is None:
                return None
            effective.setdefault(account, {})[posting.asset] = volumes
    return effective


def _effective_at(store, ledger: str, address: str, assets, pit: int | None) -> dict:
    """Effective volumes per asset of an account as of `pit` (now when None)."""
    start = effective_moment(pit, (1 << 64) - 1) if pit is not None else None
    result = {}
    for asset in assets:
        for _moment, volumes in store.scan((EFFECTIVE, ledger, address, asset), start, reverse=True):
            result[asset] = volumes
            break
    return result


def _newest_first(store, prefix: tuple, request: Request, lowest_id: int = 0) -> tuple[list, bool]:
    """A page of values keyed by id under `prefix`, by id descending, strictly below the
    `after` query parameter; -> (rows, whether more follow)."""
    page_size = int(request.query.get("pageSize", "15"))
    after = request.query.get("after")
    if after is not None and int(after) <= lowest_id:
        return [], False
    start = prefix + (int(after) - 1,) if after is not None else None
    rows = []
    for _key, value in store.scan_keys(prefix, start=start, reverse=True):
        if value.id < lowest_id:
            break
        rows.append(value)
        if len(rows) > page_size:
            break
    return rows[:page_size], len(rows) > page_size


def _json(view: View, body: dict, status: int = 200) -> Response:
    # Not view.json(): faust encodes with orjson when it is installed, and orjson refuses
    # integers beyond 64 bits — amounts are arbitrary-precision.
    return view.bytes(dumps_json(body), content_type="application/json", status=status)


def register(app: faust.App, worker, requests_topic) -> None:
    settings = app.streamledger_settings  # type: ignore[attr-defined]

    async def store_for(ledger: str):
        partition = partition_for(ledger.encode(), settings.partitions)
        store = await worker.store_for_query(partition)
        if store is None:
            raise ServiceUnavailable(
                f"ledger '{ledger}' is on partition {partition}, which is moving between workers; retry"
            )
        return store

    def not_found(view: View, code: str, message: str) -> Response:
        return _json(view, {"errorCode": code, "errorMessage": message}, status=404)

    @app.page("/ledger/{ledger}")
    class LedgerView(View):
        @app.topic_route(requests_topic, match_info="ledger")
        async def get(self, request: Request, ledger: str) -> Response:
            store = await store_for(ledger)
            info = store.get((LEDGER, ledger))
            if info is None:
                return not_found(self, "LEDGER_NOT_FOUND", f"ledger '{ledger}' not found")
            return _json(self, {"data": render.ledger_json(info)})

    @app.page("/ledger/{ledger}/transactions/{id}")
    class TransactionView(View):
        @app.topic_route(requests_topic, match_info="ledger")
        async def get(self, request: Request, ledger: str, id: str) -> Response:  # noqa: A002
            store = await store_for(ledger)
            if store.get((LEDGER, ledger)) is None:
                return not_found(self, "LEDGER_NOT_FOUND", f"ledger '{ledger}' not found")
            transaction = store.get((TRANSACTION, ledger, int(id))) if id.isdigit() else None
            if transaction is None:
                return not_found(self, "NOT_FOUND", f"transaction {id} not found")
            return _json(self, {"data": render.transaction_json(transaction, _effective(store, ledger, transaction))})

    @app.page("/ledger/{ledger}/transactions")
    class TransactionsView(View):
        @app.topic_route(requests_topic, match_info="ledger")
        async def get(self, request: Request, ledger: str) -> Response:
            store = await store_for(ledger)
            if store.get((LEDGER, ledger)) is None:
                return not_found(self, "LEDGER_NOT_FOUND", f"ledger '{ledger}' not found")
            rows, has_more = _newest_first(store, (TRANSACTION, ledger), request)
            return _json(self, {
                "data": [render.transaction_json(t, _effective(store, ledger, t)) for t in rows],
                "hasMore": has_more,
            })

    @app.page("/ledger/{ledger}/logs")
    class LogsView(View):
        @app.topic_route(requests_topic, match_info="ledger")
        async def get(self, request: Request, ledger: str) -> Response:
            store = await store_for(ledger)
            if store.get((LEDGER, ledger)) is None:
                return not_found(self, "LEDGER_NOT_FOUND", f"ledger '{ledger}' not found")
            # Id 0, the ledger's creation, is not one of Formance's log entries.
            rows, has_more = _newest_first(store, (LOG, ledger), request, lowest_id=1)
            return _json(self, {"data": [log_entry_json(entry) for entry in rows], "hasMore": has_more})

    @app.page("/ledger/{ledger}/accounts/{address}")
    class AccountView(View):
        @app.topic_route(requests_topic, match_info="ledger")
        async def get(self, request: Request, ledger: str, address: str) -> Response:
            store = await store_for(ledger)
            if store.get((LEDGER, ledger)) is None:
                return not_found(self, "LEDGER_NOT_FOUND", f"ledger '{ledger}' not found")
            record = store.get((ACCOUNT, ledger, address))
            volumes = dict(store.scan((VOLUMES, ledger, address)))  # asset -> volumes
            assert record is None or isinstance(record, AccountRecord)
            pit_text = request.query.get("pit")
            pit = None
            if pit_text:
                try:
                    pit = parse_rfc3339(pit_text)
                except ValueError as error:
                    return _json(self, {"errorCode": "VALIDATION", "errorMessage": str(error)}, status=400)
            effective = None
            if pit is not None or "effectiveVolumes" in request.query.get("expand", ""):
                effective = _effective_at(store, ledger, address, volumes.keys(), pit)
            return _json(self, {"data": render.account_json(record, address, volumes, effective)})

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])


def register_listing(app: faust.App, worker) -> None:
    """`/ledgers`: the ledgers of every partition this worker owns."""

    @app.page("/ledgers")
    class LedgersView(View):
        async def get(self, request: Request) -> Response:
            rows = []
            for processor in list(worker.processors.values()):
                for _key, info in processor.store.scan_keys((LEDGER,)):
                    rows.append(render.ledger_json(info))
            rows.sort(key=lambda row: row["name"])
            return _json(self, {"data": rows})
