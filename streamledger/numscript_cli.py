"""`streamledger numscript …`: run scripts and Formance spec files from the shell.

All file reading happens here; the interpreter and the spec checker (`ledger.numscript`)
are pure. Every failure is one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ledger.errors import LedgerError
from ledger.numscript import StaticStore, execute, parse
from ledger.numscript.errors import ParseError
from ledger.numscript.specs import SpecFormatError, balance_rows, check_specs

_SPECS_SUFFIX = ".specs.json"


@click.group()
def numscript() -> None:
    """Run Numscript programs and spec files."""


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise click.ClickException(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise click.ClickException(f"{path} is not UTF-8 text") from None


def _json_option(value: str | None, name: str, default: Any) -> Any:
    """Inline JSON, or `@path` to read it from a file."""
    if value is None:
        return default
    text = _read_text(value[1:]) if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise click.ClickException(f"--{name} is not valid JSON: {error}") from None


def _balances(raw: Any) -> dict[str, dict[str, int]]:
    """`{"acc": {"USD/2": 100}}`, or Formance's rows `[{"account", "asset", "amount"}]`."""
    try:
        if isinstance(raw, list):
            rows = balance_rows(raw)
            balances: dict[str, dict[str, int]] = {}
            for (account, asset), amount in rows.items():
                balances.setdefault(account, {})[asset] = amount
            return balances
        if isinstance(raw, dict) and all(isinstance(row, dict) for row in raw.values()):
            for account, row in raw.items():
                for asset, amount in row.items():
                    if not isinstance(amount, int) or isinstance(amount, bool):
                        raise SpecFormatError(f"balance of {account} {asset} is not an integer")
            return raw
    except (SpecFormatError, KeyError, TypeError) as error:
        raise click.ClickException(f"--balances: {error}") from None
    raise click.ClickException('--balances must look like {"account": {"ASSET": 100}}')


def _string_map(raw: Any, name: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise click.ClickException(f"--{name} must be a JSON object")
    # Numbers are accepted for convenience and passed as their decimal text.
    return {
        str(key): json.dumps(value) if isinstance(value, int) else str(value)
        for key, value in raw.items()
    }


@numscript.command()
@click.argument("file")
@click.option("--vars", "vars_json", help='Variables as JSON, e.g. {"amt": "USD/2 100"}.')
@click.option("--balances", "balances_json", help='{"acc": {"USD/2": 100}} or spec rows.')
@click.option("--metadata", "metadata_json", help='Account metadata: {"acc": {"k": "v"}}.')
@click.option("--feature", "features", multiple=True, help="Enable an experimental feature.")
def run(
    file: str,
    vars_json: str | None,
    balances_json: str | None,
    metadata_json: str | None,
    features: tuple[str, ...],
) -> None:
    """Run FILE and print its postings and metadata as JSON."""
    source = _read_text(file)
    variables = _string_map(_json_option(vars_json, "vars", {}), "vars")
    balances = _balances(_json_option(balances_json, "balances", {}))
    raw_metadata = _json_option(metadata_json, "metadata", {})
    if not isinstance(raw_metadata, dict):
        raise click.ClickException("--metadata must be a JSON object")
    metadata = {account: _string_map(row, "metadata") for account, row in raw_metadata.items()}
    try:
        result = execute(
            parse(source), variables, StaticStore(balances, metadata), frozenset(features)
        )
    except ParseError as error:
        raise click.ClickException(f"{file}:{error.line}:{error.column}: {error.reason}") from None
    except LedgerError as error:
        raise click.ClickException(f"{error.code}: {error}") from None
    output = {
        "postings": [
            {
                "source": str(p.source),
                "destination": str(p.destination),
                "amount": p.amount,
                "asset": p.asset,
            }
            for p in result.postings
        ],
        "txMetadata": result.tx_metadata,
        "accountMetadata": result.account_metadata,
    }
    click.echo(json.dumps(output))


@numscript.command()
@click.argument("files", nargs=-1, required=True)
def check(files: tuple[str, ...]) -> None:
    """Parse and type-check FILES; report errors as FILE:LINE:COLUMN: message."""
    failed = False
    for file in files:
        try:
            parse(_read_text(file))
        except ParseError as error:
            click.echo(f"{file}:{error.line}:{error.column}: {error.reason}", err=True)
            failed = True
        except LedgerError as error:
            click.echo(f"{file}: {error}", err=True)
            failed = True
        else:
            click.echo(f"{file}: ok")
    if failed:
        raise SystemExit(1)


def _spec_pairs(roots: tuple[str, ...]) -> list[tuple[Path, Path]]:
    pairs = []
    for root in roots:
        path = Path(root)
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = sorted(path.rglob("*.num"))
        else:
            raise click.ClickException(f"{root}: no such file or directory")
        for script in candidates:
            specs = script.with_name(script.name + _SPECS_SUFFIX)
            if script.is_file() and specs.is_file():
                pairs.append((script, specs))
    return pairs


@numscript.command()
@click.argument("roots", nargs=-1, required=True)
def test(roots: tuple[str, ...]) -> None:
    """Run every X.num beside an X.num.specs.json below ROOTS (Formance's format)."""
    passed = failed = skipped = 0
    for script, specs_path in _spec_pairs(roots):
        try:
            specs = json.loads(_read_text(str(specs_path)))
            results = check_specs(_read_text(str(script)), specs)
        except (json.JSONDecodeError, SpecFormatError, KeyError, TypeError, AttributeError) as error:
            click.echo(f"FAIL {specs_path}: not a valid spec file ({error})")
            failed += 1
            continue
        for result in results:
            if result.skipped:
                skipped += 1
                click.echo(f"SKIP {script} :: {result.it}")
            elif result.passed:
                passed += 1
            else:
                failed += 1
                click.echo(f"FAIL {script} :: {result.it} :: {' | '.join(result.failures)}")
    click.echo(f"{passed} passed, {failed} failed")
    # Like Formance's runner, `skip` and `focus` are for debugging: they fail the run.
    if failed or skipped:
        raise SystemExit(1)
