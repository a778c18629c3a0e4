"""bench/engine.py: the no-Kafka measure of the ledger's own work runs, and both paths
reach the same outcomes for the same requests."""

import json

from bench import engine


def _run(capsys, *extra: str) -> dict:
    assert engine.main(["--requests", "3000", "--partitions", "4", "--settle-seconds", "0", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_native_and_python_paths_reach_the_same_outcomes(capsys):
    native = _run(capsys)
    python = _run(capsys, "--python")
    assert (native["path"], python["path"]) == ("native", "python")
    assert native["committed"] + native["rejected"] == 3000
    assert native["rejected"] > 0  # some user-to-user transfers lack funds
    assert (native["committed"], native["rejected"]) == (python["committed"], python["rejected"])
    assert native["round_thread_wall_us_per_request"] > 0
    assert set(native["us_per_request"]) == {"decode", "apply", "store"}
