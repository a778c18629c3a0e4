"""The crash test, small: workers kill -9'd and the broker restarted under a stream of
requests, then the independent verifier (bench/verify_log.py) judges the output topics.

The verifier is tested first on hand-built logs, so we know it can fail: a gap, a bad
hash, a duplicate or missing request id, a served balance that differs from the log, an
outcome its model did not predict.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from bench import verify_log as vl

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = ROOT.parent / "shared" / "conformance" / "formance" / "logs-v2.1-hashchain.jsonl"
P = 8
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds


# --------------------------------------------------------------- hand-built topic records


class Log:
    """Builds ledger.committed / ledger.rejected / ledger.requests records of one ledger,
    hashed with the verifier's own chain (tests then tamper with them)."""

    def __init__(self, ledger: str = "books") -> None:
        self.ledger = ledger
        self.partition = vl.murmur2_partition(ledger.encode(), P)
        self.committed: list[vl.Rec] = []
        self.rejected: list[vl.Rec] = []
        self.requests: list[vl.Rec] = []
        self.previous: bytes | None = None
        self.next_id = 1
        self.date = T0
        self.create("create")

    def _rec(self, topic: str, records: list, value: dict) -> vl.Rec:
        rec = vl.Rec(topic, self.partition, len(records), self.ledger.encode(),
                     {} if topic == vl.REQUESTS else {"request_id": value["request_id"]}, value)
        records.append(rec)
        return rec

    def request(self, request_id: str, command: tuple) -> None:
        self._rec(vl.REQUESTS, self.requests, {"requests": [{
            "request_id": request_id, "ledger": self.ledger, "command": command,
            "idempotency_key": "", "idempotency_hash": "", "dry_run": False, "received_at": T0, "reply_to": ""}]})

    def create(self, request_id: str) -> None:
        self.request(request_id, ("io.streamledger.CreateLedger", {"bucket": "_default", "metadata": {}, "features": {}}))
        self._rec(vl.COMMITTED, self.committed, {
            "ledger": self.ledger, "id": 0, "type": "CREATED_LEDGER", "data": {"name": self.ledger}, "date": T0,
            "idempotency_key": "", "idempotency_hash": "", "hash": b"", "request_id": request_id})

    def tx(self, request_id: str, postings: list[tuple], reference: str | None = None,
           metadata: dict | None = None, send: bool = True) -> dict:
        if send:
            self.request(request_id, ("io.streamledger.CreateTransaction", {
                "postings": [{"source": s, "destination": d, "amount": str(a), "asset": asset}
                             for s, d, a, asset in postings],
                "script": None, "reference": reference, "metadata": metadata or {}, "account_metadata": {},
                "timestamp": None, "force": False}))
        self.date += 1_500
        transaction = {"postings": [{"source": s, "destination": d, "amount": a, "asset": asset}
                                    for s, d, a, asset in postings],
                       "metadata": metadata or {}, "timestamp": vl.rfc3339_micros(self.date),
                       "id": self.next_id, "reverted": False}
        if reference:
            transaction["reference"] = reference
        data = {"transaction": transaction, "accountMetadata": {}}
        digest = vl.chain_hash(self.previous, vl.entry_line("NEW_TRANSACTION", data, vl.rfc3339_micros(self.date)))
        self.previous = digest
        value = {"ledger": self.ledger, "id": self.next_id, "type": "NEW_TRANSACTION", "data": data,
                 "date": self.date, "idempotency_key": "", "idempotency_hash": "", "hash": digest,
                 "request_id": request_id}
        self.next_id += 1
        self._rec(vl.COMMITTED, self.committed, value)
        return value

    def reject(self, request_id: str, code: str, postings: list[tuple], reference: str | None = None) -> None:
        self.request(request_id, ("io.streamledger.CreateTransaction", {
            "postings": [{"source": s, "destination": d, "amount": str(a), "asset": asset} for s, d, a, asset in postings],
            "script": None, "reference": reference, "metadata": {}, "account_metadata": {}, "timestamp": None,
            "force": False}))
        self._rec(vl.REJECTED, self.rejected, {"request_id": request_id, "ledger": self.ledger, "code": code,
                                               "message": code, "details": "{}", "date": self.date})

    def served(self) -> dict:
        """What a correct gateway serves: balances and volumes from the log."""
        volumes: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for rec in self.committed:
            for p in (rec.value["data"].get("transaction") or {}).get("postings", []):
                volumes[p["source"]][p["asset"]][1] += p["amount"]
                volumes[p["destination"]][p["asset"]][0] += p["amount"]
        return {(self.ledger, account): {
            "balances": {asset: i - o for asset, (i, o) in assets.items()},
            "volumes": {asset: {"input": i, "output": o, "balance": i - o} for asset, (i, o) in assets.items()}}
            for account, assets in volumes.items()}

    def ids(self) -> set[str]:
        return {r.value["request_id"] for r in self.committed + self.rejected}

    def check(self, **overrides) -> dict:
        arguments = dict(partitions=P, expected_request_ids=self.ids(), requests=self.requests, served=self.served())
        arguments.update(overrides)
        return vl.check(self.committed, self.rejected, **arguments)


def healthy() -> Log:
    log = Log()
    log.tx("r1", [("world", "users:1", 1_000, "USD/2")], reference="pay-1")
    log.tx("r2", [("users:1", "users:10", 400, "USD/2")], metadata={"note": "a<b & c>d é"})
    log.reject("r3", "INSUFFICIENT_FUND", [("users:10", "users:1", 401, "USD/2")])
    log.reject("r4", "CONFLICT", [("world", "users:2", 5, "USD/2")], reference="pay-1")
    log.tx("r5", [("users:1", "users:2", 100, "USD/2"), ("users:1", "users:3", 500, "USD/2")])
    return log


# ------------------------------------------------------------------------ the verifier


@pytest.mark.skipif(not CONFORMANCE.exists(), reason="shared conformance logs not present")
def test_the_verifiers_hash_is_formances():
    previous = None
    for line in CONFORMANCE.read_text().splitlines():
        log = json.loads(line)
        previous = vl.chain_hash(previous, vl.entry_line(log["type"], log["data"], log["date"], log["idempotencyKey"]))
        assert base64.b64encode(previous).decode() == log["hash"]


def test_the_verifiers_hash_agrees_with_the_worker_on_escapes_and_metadata():
    from ledger import hashchain

    data = {"transaction": {"postings": [{"source": "world", "destination": "users:1", "amount": 10**30, "asset": "USD/2"}],
                            "metadata": {"z": "1", "a": "<&>\u2028é"}, "timestamp": "2026-01-01T00:00:00.1Z",
                            "reference": "r&1", "id": 7, "reverted": False},
            "accountMetadata": {"users:1": {"b": "2", "a": ">"}}}
    ours = vl.chain_hash(b"x" * 32, vl.entry_line("NEW_TRANSACTION", data, vl.rfc3339_micros(T0 + 120), "ik<"))
    line = hashchain.entry_line("NEW_TRANSACTION", hashchain.memento_of("NEW_TRANSACTION", data), T0 + 120, "ik<")
    assert ours == hashchain.chain(b"x" * 32, line)


def test_the_verifier_decodes_what_the_worker_encodes():
    from ledger.model import LogEntry
    from streams import codecs

    entry = healthy().committed[2].value
    payload = codecs.encode_log_entry(LogEntry(**{**entry}))
    assert vl.decode_value(vl.COMMITTED, payload) == entry


def test_a_healthy_log_passes():
    verdict = healthy().check()
    assert verdict["ok"], verdict["violations"]
    assert verdict["stats"]["model_checked"] == 6
    assert verdict["stats"]["accounts_compared"] == 5


def test_a_gap_in_log_ids_is_reported():
    log = healthy()
    del log.committed[2]  # log id 2 (r2) is gone; r5 (id 3) was chained from it
    counts = log.check(expected_request_ids=log.ids() | {"r2"})["violation_counts"]
    assert counts["log_id_gap"] == 1
    assert counts["bad_hash"] == 1
    assert counts["missing_outcome"] == 1


def test_a_bad_hash_is_reported():
    log = healthy()
    log.committed[2].value["hash"] = bytes(32)
    verdict = log.check()
    # id 2's hash is wrong, and id 3 (chained from the stored hash of id 2) no longer matches
    assert verdict["violation_counts"] == {"bad_hash": 2}
    assert [v["id"] for v in verdict["violations"]] == [2, 3]


def test_a_changed_payload_breaks_the_chain_and_the_balances():
    log = healthy()
    served = log.served()
    log.committed[1].value["data"]["transaction"]["postings"][0]["amount"] = 999  # rewritten history
    counts = log.check(served=served)["violation_counts"]
    assert counts["bad_hash"] == 1
    assert counts["balance_mismatch"] >= 2


def test_a_duplicate_request_id_is_reported():
    log = healthy()
    log.tx("r1", [("world", "users:1", 1_000, "USD/2")], send=False)  # the redelivered r1 applied twice
    log.rejected.append(vl.Rec(vl.REJECTED, log.partition, 99, b"books", {"request_id": "r2"},
                               {"request_id": "r2", "ledger": "books", "code": "CONFLICT", "message": "",
                                "details": "{}", "date": T0}))
    verdict = log.check()
    assert verdict["violation_counts"]["duplicate_outcome"] == 2
    assert {v["request_id"] for v in verdict["violations"] if v["kind"] == "duplicate_outcome"} == {"r1", "r2"}


def test_missing_and_unexpected_request_ids_are_reported():
    log = healthy()
    counts = log.check(expected_request_ids=(log.ids() - {"r4"}) | {"r9"})["violation_counts"]
    assert counts == {"missing_outcome": 1, "unexpected_outcome": 1}


def test_served_balances_must_equal_the_log():
    log = healthy()
    served = log.served()
    served[("books", "users:2")]["balances"]["USD/2"] += 1
    served[("books", "users:3")] = {"error": "HTTP 503"}
    counts = log.check(served=served)["violation_counts"]
    assert counts["balance_mismatch"] == 1
    assert counts["balance_fetch_failed"] == 1
    assert counts["nonzero_sum_served"] == 1


def test_an_overdraft_or_a_reused_reference_that_committed_is_reported():
    log = healthy()
    log.tx("r6", [("users:2", "users:1", 101, "USD/2")])  # users:2 holds 100
    log.tx("r7", [("world", "users:2", 5, "USD/2")], reference="pay-1")  # pay-1 already committed
    verdict = log.check()
    counts = verdict["violation_counts"]
    assert counts["negative_balance_in_log"] == 1
    assert counts["duplicate_reference_committed"] == 1
    mismatches = {v["request_id"]: v["expected"] for v in verdict["violations"] if v["kind"] == "outcome_mismatch"}
    assert mismatches == {"r6": "INSUFFICIENT_FUND"}  # the model stops judging the ledger after one


def test_a_reordered_log_is_reported():
    log = Log()
    log.tx("a", [("world", "users:1", 1, "COIN")])
    log.tx("b", [("world", "users:2", 1, "COIN")])
    log.requests[1], log.requests[2] = log.requests[2], log.requests[1]  # b was requested first
    counts = log.check()["violation_counts"]
    assert counts == {"log_order_mismatch": 2}


def test_records_on_the_wrong_partition_or_with_a_wrong_header_are_reported():
    log = healthy()
    log.committed[1].partition = (log.partition + 1) % P
    log.rejected[0].headers = {}
    counts = log.check(requests=None)["violation_counts"]
    assert counts == {"wrong_partition": 1, "header_mismatch": 1}


# ------------------------------------------------------------------------- the chaos run


@pytest.mark.integration
def test_chaos_small_run_is_exactly_once():
    """A few thousand requests, two kill -9s of a worker, one broker crash-restart, on a
    broker of its own; every check of the verifier must pass."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--small", "--seed", "7"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    lines = run.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{run.stderr[-4000:]}"
    verdict = json.loads(lines[-1])
    report = json.dumps({k: verdict.get(k) for k in ("violation_counts", "violations", "logs")}, indent=1)[:8000]
    assert verdict["ok"], f"chaos verdict not ok:\n{report}\n--- output tail:\n" + "\n".join(lines[-30:])
    assert run.returncode == 0
    assert verdict["requests"] >= 3000
    assert verdict["kills"] >= 2
    assert verdict["broker_restarts"] == 1
    assert verdict["stats"]["missing"] == 0
    assert verdict["stats"]["model_checked"] == verdict["distinct_request_ids"]
