"""`ledger/` is the pure domain: it must never import the stream or HTTP layers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"streams", "api", "streamledger", "faust", "aiohttp", "confluent_kafka", "rocksdict", "fastavro", "aiokafka"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_ledger_imports_nothing_from_streams_api_or_io_libraries():
    files = list((ROOT / "ledger").rglob("*.py"))
    assert files, "ledger/ has no modules?"
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN) for f in files}
    assert {f: names for f, names in offenders.items() if names} == {}


def test_the_import_check_would_catch_a_violation(tmp_path):
    """The check above must be able to fail."""
    bad = tmp_path / "bad.py"
    bad.write_text("from streams.codecs import codec\nimport api.app\n")
    assert _imports(bad) & FORBIDDEN == {"streams", "api"}
