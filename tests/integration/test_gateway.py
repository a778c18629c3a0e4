"""HTTP → ledger.requests → worker → ledger.committed → HTTP, on the real broker."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.integration.stack import http

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(stack):
    name = f"l-{uuid.uuid4().hex[:10]}"
    stack.create_ledger(name)
    return name


def tx(source, destination, amount, asset="USD/2", **extra):
    return {"postings": [{"source": source, "destination": destination, "amount": amount, "asset": asset}], **extra}


def test_a_transaction_round_trips_and_balances_read_back(stack, ledger):
    created = http("POST", f"{stack.url}/v2/{ledger}/transactions", tx("world", "bank", 100, "USD"))
    assert created.status == 200, created.body
    transaction = created.body["data"]
    assert transaction["id"] == 1
    assert transaction["postings"] == [{"source": "world", "destination": "bank", "amount": 100, "asset": "USD"}]
    assert transaction["postCommitVolumes"]["bank"]["USD"] == {"input": 100, "output": 0, "balance": 100}

    account = http("GET", f"{stack.url}/v2/{ledger}/accounts/bank")
    assert account.status == 200
    assert account.body["data"]["balances"] == {"USD": 100}
    assert account.body["data"]["volumes"]["USD"] == {"input": 100, "output": 0, "balance": 100}

    fetched = http("GET", f"{stack.url}/v2/{ledger}/transactions/1")
    assert fetched.status == 200 and fetched.body["data"]["postings"] == transaction["postings"]

    listed = http("GET", f"{stack.url}/v2/{ledger}/transactions")
    assert [t["id"] for t in listed.body["cursor"]["data"]] == [1]


def test_insufficient_funds_is_a_400_with_details(stack, ledger):
    http("POST", f"{stack.url}/v2/{ledger}/transactions", tx("world", "alice", 10))
    refused = http("POST", f"{stack.url}/v2/{ledger}/transactions", tx("alice", "bob", 11))
    assert refused.status == 400
    assert refused.body["errorCode"] == "INSUFFICIENT_FUND"
    # A string, as Formance's V2ErrorResponse has it (its generated clients refuse an object).
    assert isinstance(refused.body["details"], str)
    assert json.loads(refused.body["details"]) == {"account": "alice", "asset": "USD/2", "needed": 11, "available": 10}
    assert http("GET", f"{stack.url}/v2/{ledger}/accounts/alice").body["data"]["balances"] == {"USD/2": 10}


def test_a_duplicate_reference_is_a_409_conflict(stack, ledger):
    first = http("POST", f"{stack.url}/v2/{ledger}/transactions", tx("world", "a", 1, reference="order-1"))
    assert first.status == 200
    again = http("POST", f"{stack.url}/v2/{ledger}/transactions", tx("world", "a", 1, reference="order-1"))
    assert again.status == 409 and again.body["errorCode"] == "CONFLICT"


def test_writes_to_an_unknown_ledger_are_404(stack):
    response = http("POST", f"{stack.url}/v2/never-created-{uuid.uuid4().hex[:6]}/transactions", tx("world", "a", 1))
    assert response.status == 404 and response.body["errorCode"] == "LEDGER_NOT_FOUND"


def test_creating_an_existing_ledger_is_refused(stack, ledger):
    response = http("POST", f"{stack.url}/v2/{ledger}")
    assert response.status == 400 and response.body["errorCode"] == "LEDGER_ALREADY_EXISTS"


def test_ledger_info_and_listing(stack, ledger):
    info = http("GET", f"{stack.url}/v2/{ledger}")
    assert info.status == 200 and info.body["data"]["name"] == ledger
    names = [row["name"] for row in http("GET", f"{stack.url}/v2?pageSize=1000").body["cursor"]["data"]]
    assert ledger in names


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        {"postings": [{"source": "world", "destination": "a b", "amount": 1, "asset": "USD"}]},
        {"postings": [{"source": "world", "destination": "a", "amount": -1, "asset": "USD"}]},
        {"postings": [{"source": "world", "destination": "a", "amount": 1, "asset": "usd"}]},
        {"postings": []},
    ],
)
def test_bad_input_is_a_400_never_a_500(stack, ledger, body):
    response = http("POST", f"{stack.url}/v2/{ledger}/transactions", body)
    assert response.status == 400
    assert response.body["errorCode"] in ("VALIDATION", "NO_POSTINGS")


def test_the_same_routes_answer_under_the_stack_gateway_prefix(stack, ledger):
    created = http("POST", f"{stack.url}/api/ledger/v2/{ledger}/transactions", tx("world", "x", 3))
    assert created.status == 200
    assert http("GET", f"{stack.url}/api/ledger/v2/{ledger}/accounts/x").body["data"]["balances"] == {"USD/2": 3}
    assert http("GET", f"{stack.url}/api/ledger/_/info").status == 200
    assert http("GET", f"{stack.url}/v2/_info").status == 200


def test_unknown_transaction_is_404(stack, ledger):
    response = http("GET", f"{stack.url}/v2/{ledger}/transactions/999")
    assert response.status == 404 and response.body["errorCode"] == "NOT_FOUND"


def test_big_amounts_are_exact_end_to_end(stack, ledger):
    amount = 10**38 + 1
    created = http("POST", f"{stack.url}/v2/{ledger}/transactions", tx("world", "whale", amount))
    assert created.status == 200
    assert http("GET", f"{stack.url}/v2/{ledger}/accounts/whale").body["data"]["balances"] == {"USD/2": amount}


def test_worker_exposes_prometheus_metrics(stack, ledger):
    http("POST", f"{stack.url}/v2/{ledger}/transactions", tx("world", "m", 1))
    import urllib.request

    with urllib.request.urlopen(stack.env["STREAMLEDGER_WORKER_URL"] + "/metrics", timeout=10) as response:
        text = response.read().decode()
    # Two requests applied on this ledger: its creation and the transfer.
    assert f'streamledger_applied_total{{ledger="{ledger}"}} 2.0' in text
    for name in ("streamledger_batch_seconds", "streamledger_consumer_lag", "streamledger_recovered_records",
                 "streamledger_batch_requests"):
        assert name in text, name
    # The transfer took the native fast path (the ledger's creation the Python one).
    native = [line for line in text.splitlines() if line.startswith('streamledger_partition_rounds_total{path="native"}')]
    assert native and float(native[0].split()[-1]) >= 1, text


def test_transactions_and_logs_page_with_cursors(stack, ledger):
    for amount in (1, 2, 3):
        http("POST", f"{stack.url}/v2/{ledger}/transactions", tx("world", "p", amount))
    for resource in ("transactions", "logs"):
        first = http("GET", f"{stack.url}/v2/{ledger}/{resource}?pageSize=2").body["cursor"]
        assert [row["id"] for row in first["data"]] == [3, 2] and first["hasMore"]
        second = http("GET", f"{stack.url}/v2/{ledger}/{resource}?pageSize=2&cursor={first['next']}").body["cursor"]
        assert [row["id"] for row in second["data"]] == [1] and not second["hasMore"]
    bad = http("GET", f"{stack.url}/v2/{ledger}/transactions?cursor=%%%")
    assert bad.status == 400 and bad.body["errorCode"] == "VALIDATION"
    assert http("GET", f"{stack.url}/v2/{ledger}/transactions?pageSize=5000").status == 400


def test_ledgers_are_listed_in_pages(stack):
    prefix = f"page-{uuid.uuid4().hex[:6]}"
    for i in range(3):
        stack.create_ledger(f"{prefix}-{i}")
    seen, cursor, pages = [], None, 0
    while True:
        url = f"{stack.url}/v2?pageSize=2" + (f"&cursor={cursor}" if cursor else "")
        page = http("GET", url).body["cursor"]
        assert page["pageSize"] == 2 and len(page["data"]) <= 2
        seen += [row["name"] for row in page["data"]]
        pages += 1
        if not page["hasMore"]:
            assert "next" not in page
            break
        cursor = page["next"]
    assert seen == sorted(set(seen)) and pages == (len(seen) + 1) // 2
    assert [f"{prefix}-{i}" for i in range(3)] == [name for name in seen if name.startswith(prefix)]
    assert http("GET", f"{stack.url}/v2?pageSize=0").body["errorCode"] == "VALIDATION"
    assert http("GET", f"{stack.url}/v2?cursor=not-a-cursor").status == 400
