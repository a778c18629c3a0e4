"""`verify`: the hash chain and balances of a Formance-format log export."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ledger.commands import RevertTransaction, SaveMetadata
from ledger.state import LOG
from ledger.timeutil import format_rfc3339
from ledger.verify import verify_log
from streamledger.cli import main
from tests.ledger.helpers import Ledger, posting

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared/conformance/formance/logs-v2.1-hashchain.jsonl"


def _export(ledger: Ledger) -> list[dict]:
    entries = sorted((v for k, v in ledger.store.data.items() if k[0] == LOG and k[2] > 0), key=lambda e: e.id)
    return [{"id": e.id, "type": e.type, "data": e.data, "date": format_rfc3339(e.date),
             "idempotencyKey": e.idempotency_key, "hash": base64.b64encode(e.hash).decode()} for e in entries]


def _busy_ledger() -> Ledger:
    ledger = Ledger()
    ledger.transfer(posting("world", "a", 100), metadata={"k": "<&>"})
    ledger.transfer(posting("a", "b", 30))
    ledger.run(SaveMetadata("ACCOUNT", "a", {"tier": "gold"}))
    ledger.run(RevertTransaction(2))
    return ledger


def test_our_own_log_verifies_with_every_entry_type():
    verdict = verify_log(_export(_busy_ledger()))
    assert verdict.ok and verdict.entries == 4
    assert verdict.balances[("a", "USD/2")] == 100


@pytest.mark.parametrize("field", ["amount", "date", "metadata", "hash", "id"])
def test_any_edit_is_reported_at_the_edited_entry(field):
    logs = _export(_busy_ledger())
    victim = logs[1]
    if field == "amount":
        victim["data"]["transaction"]["postings"][0]["amount"] += 1
    elif field == "date":
        victim["date"] = "2001-01-01T00:00:00Z"
    elif field == "metadata":
        victim["data"]["transaction"]["metadata"] = {"x": "y"}
    elif field == "hash":
        victim["hash"] = base64.b64encode(b"\0" * 32).decode()
    else:
        victim["id"] = 7
    verdict = verify_log(logs)
    assert not verdict.ok and verdict.broken_id == victim["id"]


def test_cli_prints_ok_and_exits_zero(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(log) for log in _export(_busy_ledger())))
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 0 and result.output.strip().endswith("OK 4 entries")


def test_cli_reports_the_first_broken_entry_and_exits_one(tmp_path):
    logs = _export(_busy_ledger())
    logs[2]["data"]["metadata"]["tier"] = "platinum"
    path = tmp_path / "log.json"
    path.write_text("".join(json.dumps(log) for log in logs))  # concatenated, as Formance exports
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1 and "BROKEN at entry 3" in result.output


def test_cli_refuses_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "log.json"
    path.write_text("not json")
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1 and "not a JSON log stream" in result.output


@pytest.mark.skipif(not GOLDEN.exists(), reason=f"golden vector not found at {GOLDEN} (../shared is absent)")
def test_cli_verifies_formance_golden_export():
    result = CliRunner().invoke(main, ["verify", str(GOLDEN)])
    assert result.exit_code == 0 and result.output.strip().endswith("OK 5 entries")
