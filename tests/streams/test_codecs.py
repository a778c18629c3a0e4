"""Avro single-object codecs: round trips, self-description, and refusal of foreign bytes."""

from __future__ import annotations

import io
import json

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.commands import (
    CreateLedger, CreateTransaction, DeleteMetadata, Request, RevertTransaction, SaveMetadata, Script,
)
from ledger.errors import ValidationError
from ledger.machine import Rejected
from ledger.model import LogEntry, Posting
from streams import codecs

addresses = st.from_regex(r"\A[a-z0-9_-]{1,8}(:[a-z0-9_-]{1,8}){0,2}\Z")
assets = st.from_regex(r"\A[A-Z][A-Z0-9]{0,5}(/[0-9]{1,2})?\Z")
text = st.text(max_size=20)
metadata = st.dictionaries(text, text, max_size=3)

create_transactions = st.builds(
    CreateTransaction,
    postings=st.lists(
        st.builds(Posting, addresses, addresses, st.integers(0, 10**50), assets), min_size=1, max_size=4
    ).map(tuple),
    reference=st.one_of(st.none(), st.text(min_size=1, max_size=10)),
    metadata=metadata,
    account_metadata=st.dictionaries(addresses, metadata, max_size=2),
    timestamp=st.one_of(st.none(), st.integers(0, 2**52)),
    force=st.booleans(),
)
commands = st.one_of(
    create_transactions,
    st.builds(CreateTransaction, script=st.builds(
        Script, st.sampled_from(["send [USD 1] (source = @world destination = @a)",
                                 "vars { account $a }\nsend [EUR/2 *] (source = $a destination = @b)"]),
        st.dictionaries(text, text, max_size=2))),
    st.builds(CreateLedger, metadata=metadata),
    st.builds(RevertTransaction, st.integers(0, 2**40), st.booleans(), st.booleans(), metadata),
    st.builds(SaveMetadata, st.just("ACCOUNT"), addresses, metadata),
    st.builds(DeleteMetadata, st.just("TRANSACTION"), st.integers(0, 2**40), text),
)
requests = st.builds(
    Request, st.uuids().map(lambda u: u.hex), st.just("main"), commands, text, text, st.booleans(),
    st.integers(0, 2**52),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(requests, min_size=1, max_size=5))
def test_request_batches_round_trip(batch):
    decoded = [codecs.request_from_record(r) for r in codecs.decode_requests(codecs.encode_requests(batch))]
    assert decoded == batch


def test_records_are_single_object_encoded_with_the_schema_fingerprint():
    payload = codecs.encode_requests([Request("r", "main", CreateLedger(), received_at=1)])
    schema = codecs.codec("RequestBatch")
    assert payload[:2] == b"\xc3\x01" and payload[2:10] == schema.fingerprint
    # A plain fastavro reader with the .avsc file decodes the body: the files are the contract.
    raw = json.loads((codecs.SCHEMAS_DIR / "RequestBatch.avsc").read_text())
    body = fastavro.schemaless_reader(io.BytesIO(payload[10:]), fastavro.parse_schema(raw), None)
    assert body["requests"][0]["request_id"] == "r"


@pytest.mark.parametrize(
    "payload",
    [b"", b"not avro at all", b"\xc3\x01" + b"\x00" * 8 + b"\x02", None],
)
def test_foreign_bytes_are_refused_with_a_codec_error(payload):
    with pytest.raises(codecs.CodecError):
        codecs.decode_requests(payload)


def test_truncated_body_is_refused():
    payload = codecs.encode_requests([Request("r", "main", CreateLedger(), received_at=1)])
    with pytest.raises(codecs.CodecError):
        codecs.decode_requests(payload[:-3])


def test_an_amount_out_of_range_from_a_direct_producer_is_a_validation_error():
    schema = codecs.codec("RequestBatch")
    record = {"requests": [{
        "request_id": "r", "ledger": "main", "received_at": 0,
        "command": ("io.streamledger.CreateTransaction", {
            "postings": [{"source": "world", "destination": "a", "amount": "-5", "asset": "USD"}]}),
    }]}
    decoded = codecs.decode_requests(schema.encode(record))
    with pytest.raises(ValidationError):
        codecs.request_from_record(decoded[0])


def test_a_script_that_does_not_compile_from_a_direct_producer_is_compilation_failed():
    from ledger.errors import CompilationFailed

    schema = codecs.codec("RequestBatch")
    record = {"requests": [{
        "request_id": "r", "ledger": "main", "received_at": 0,
        "command": ("io.streamledger.CreateTransaction", {"script": {"plain": "send [", "vars": {}}}),
    }]}
    with pytest.raises(CompilationFailed):
        codecs.request_from_record(codecs.decode_requests(schema.encode(record))[0])


def test_log_entries_and_rejections_round_trip():
    entry = LogEntry("main", 3, "NEW_TRANSACTION", {"transaction": {"postings": [], "amount": 10**40}},
                     123, "ik", "h", b"\x01" * 32, "req")
    assert codecs.decode_log_entry(codecs.encode_log_entry(entry)) == entry
    rejection = Rejected("req", "main", "INSUFFICIENT_FUND", "no", {"needed": 5}, 99)
    assert codecs.decode_rejection(codecs.encode_rejection(rejection)) == rejection
