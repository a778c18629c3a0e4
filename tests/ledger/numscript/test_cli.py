"""`streamledger numscript run | check | test`."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from streamledger.numscript_cli import numscript

SPECS = Path(__file__).resolve().parent / "specs"


def _invoke(*args):
    return CliRunner().invoke(numscript, [str(a) for a in args])


def test_run_prints_postings_and_metadata_as_json(tmp_path):
    script = tmp_path / "pay.num"
    script.write_text(
        'vars { monetary $amt }\nsend $amt (source = @alice destination = @bob)\nset_tx_meta("k", $amt)'
    )
    result = _invoke("run", script, "--vars", '{"amt": "USD/2 30"}', "--balances", '{"alice": {"USD/2": 100}}')
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "postings": [{"source": "alice", "destination": "bob", "amount": 30, "asset": "USD/2"}],
        "txMetadata": {"k": "USD/2 30"},
        "accountMetadata": {},
    }


def test_run_accepts_spec_style_balance_rows_metadata_and_features(tmp_path):
    script = tmp_path / "s.num"
    script.write_text('vars { account $d = meta(@a, "dest") }\nsend [COIN 1] (source = @a \\ "RED" destination = $d)')
    rows = json.dumps([{"account": "a", "asset": "COIN", "color": "RED", "amount": 1}])
    result = _invoke("run", script, "--balances", rows, "--metadata", '{"a": {"dest": "b"}}',
                     "--feature", "experimental-asset-colors")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["postings"][0]["asset"] == "COIN_RED"


def test_run_reports_errors_on_one_line_with_exit_status_1(tmp_path):
    script = tmp_path / "s.num"
    script.write_text("send [COIN 5] (source = @a destination = @b)")
    result = _invoke("run", script, "--balances", '{"a": {"COIN": 1}}')
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "INSUFFICIENT_FUND" in result.output and "Traceback" not in result.output


def test_run_rejects_bad_json_and_missing_files_without_a_traceback(tmp_path):
    script = tmp_path / "s.num"
    script.write_text("send [COIN 5] (source = @world destination = @b)")
    for args in (("--vars", "{nope"), ("--balances", '{"a": {"COIN": 1.5}}')):
        result = _invoke("run", script, *args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    result = _invoke("run", tmp_path / "absent.num")
    assert result.exit_code == 1 and "cannot read" in result.output


def test_check_reports_line_and_column(tmp_path):
    good, bad = tmp_path / "good.num", tmp_path / "bad.num"
    good.write_text("send [COIN 1] (source = @world destination = @b)")
    bad.write_text("send [COIN 1] (\n  source = @world\n  destination = @b @c\n)")
    assert _invoke("check", good).exit_code == 0
    result = _invoke("check", bad)
    assert result.exit_code == 1
    assert f"{bad}:3:20:" in result.output


def test_test_command_passes_our_own_spec_files():
    result = _invoke("test", SPECS)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].endswith("passed, 0 failed")


def test_test_command_lists_failures_and_exits_1(tmp_path):
    (tmp_path / "x.num").write_text("send [COIN 1] (source = @world destination = @b)")
    (tmp_path / "x.num.specs.json").write_text(json.dumps({"testCases": [
        {"it": "right", "expect.postings": [{"source": "world", "destination": "b", "amount": 1, "asset": "COIN"}]},
        {"it": "wrong", "expect.postings": []},
    ]}))
    (tmp_path / "lonely.num").write_text("this has no specs and is ignored")
    result = _invoke("test", tmp_path)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[-1] == "1 passed, 1 failed"
    assert len(lines) == 2 and "wrong" in lines[0] and "expect.postings" in lines[0]
