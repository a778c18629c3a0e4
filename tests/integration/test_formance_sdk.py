"""Formance's own generated client (formance-sdk-python) against the gateway.

"Existing Formance clients work" is the promise; this holds it to the client users run,
for every route the gateway serves: the client validates each response against
Formance's OpenAPI models, so a shape that differs (a field's type, a status code) fails
here even where our own HTTP tests would read it happily.
"""

from __future__ import annotations

import uuid

import formance_sdk_python as sdk
import pytest
from formance_sdk_python.models.ledger import ErrorsV2ErrorResponse

pytestmark = pytest.mark.integration


@pytest.fixture
def client(stack):
    return sdk.SDK(server_url=stack.url).ledger.v2


@pytest.fixture
def ledger(client):
    name = f"sdk-{uuid.uuid4().hex[:10]}"
    client.create_ledger(request={"ledger": name, "v2_create_ledger_request": {"metadata": {"team": "payments"}}})
    return name


def post(client, ledger, body, **params):
    return client.create_transaction(
        request={"ledger": ledger, "v2_post_transaction": {"metadata": {}, **body}, **params}
    ).v2_create_transaction_response.data


def posting(source, destination, amount, asset="USD/2"):
    return {"source": source, "destination": destination, "amount": amount, "asset": asset}


def test_the_write_routes_through_formances_client(client, ledger):
    assert client.get_ledger(request={"ledger": ledger}).v2_get_ledger_response.data.metadata == {"team": "payments"}
    info = client.get_ledger_info(request={"ledger": ledger}).v2_ledger_info_response.data
    assert (info.name, info.storage.migrations) == (ledger, [])

    funded = post(client, ledger, {"postings": [posting("world", "users:001", 100)], "reference": "order-1",
                                   "metadata": {"order": "1"}})
    assert (funded.id, funded.reverted, funded.metadata) == (1, False, {"order": "1"})
    assert funded.post_commit_volumes["users:001"]["USD/2"].balance == 100

    # Amounts beyond 64 bits survive the client's models both ways.
    huge = post(client, ledger, {"postings": [posting("world", "users:002", 10**30, "COIN")]})
    assert huge.postings[0].amount == 10**30

    scripted = post(client, ledger, {"script": {
        "plain": "vars { monetary $m }\nsend $m (\n  source = @users:001\n  destination = @users:003\n)",
        "vars": {"m": "USD/2 40"},
    }})
    assert [(p.source, p.destination, p.amount) for p in scripted.postings] == [("users:001", "users:003", 40)]

    client.add_metadata_on_transaction(request={"ledger": ledger, "id": funded.id, "request_body": {"k": "v"}})
    client.add_metadata_to_account(request={"ledger": ledger, "address": "users:001", "request_body": {"kyc": "ok"}})
    account = client.get_account(request={"ledger": ledger, "address": "users:001", "expand": "volumes"}).v2_account_response.data
    assert account.metadata == {"kyc": "ok"}
    assert account.volumes["USD/2"].balance == 60

    reverted = client.revert_transaction(request={"ledger": ledger, "id": scripted.id}).v2_create_transaction_response.data
    assert [(p.source, p.destination, p.amount) for p in reverted.postings] == [("users:003", "users:001", 40)]
    fetched = client.get_transaction(request={"ledger": ledger, "id": funded.id}).v2_get_transaction_response.data
    assert fetched.metadata == {"order": "1", "k": "v"}

    listed = client.list_transactions(request={"ledger": ledger, "page_size": 10, "request_body": {}})
    assert [t.id for t in listed.v2_transactions_cursor_response.cursor.data] == [4, 3, 2, 1]
    logs = client.list_logs(request={"ledger": ledger, "request_body": {}}).v2_logs_cursor_response.cursor.data
    assert [log.type.value for log in logs] == ["REVERTED_TRANSACTION", "SET_METADATA", "SET_METADATA",
                                                "NEW_TRANSACTION", "NEW_TRANSACTION", "NEW_TRANSACTION"]
    assert all(log.hash for log in logs)


def test_errors_reach_formances_client_as_its_typed_errors(client, ledger):
    post(client, ledger, {"postings": [posting("world", "alice", 10)], "reference": "r-1"})

    with pytest.raises(ErrorsV2ErrorResponse) as refused:
        post(client, ledger, {"postings": [posting("alice", "bob", 11)]})
    assert refused.value.data.error_code.value == "INSUFFICIENT_FUND"
    assert refused.value.data.details  # a string, as Formance's schema has it

    with pytest.raises(ErrorsV2ErrorResponse) as conflict:
        post(client, ledger, {"postings": [posting("world", "alice", 1)], "reference": "r-1"})
    assert conflict.value.data.error_code.value == "CONFLICT"

    with pytest.raises(ErrorsV2ErrorResponse) as unknown:
        client.get_transaction(request={"ledger": f"nope-{uuid.uuid4().hex[:6]}", "id": 1})
    assert unknown.value.data.error_code.value == "LEDGER_NOT_FOUND"
