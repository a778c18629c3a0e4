"""`streamledger verify FILE`: check a Formance-format log export."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--balances", "show_balances", is_flag=True, help="Print the recomputed balances as JSON.")
def verify(path: str, show_balances: bool) -> None:
    """Check a log export (one JSON log per line, or Formance's concatenated JSON stream):
    the hash chain entry by entry, ids in sequence, and balances recomputed from it."""
    from ledger.verify import negative_accounts, verify_log

    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with stream:
        try:
            logs = list(_read_json_stream(stream.read()))
        except ValueError as error:
            raise click.ClickException(f"{path} is not a JSON log stream: {error}") from None
    verdict = verify_log(logs)
    if show_balances:
        click.echo(json.dumps({f"{a} {asset}": b for (a, asset), b in sorted(verdict.balances.items())}))
    negatives = negative_accounts(verdict.balances)
    if verdict.ok and negatives:
        click.echo(f"note: {len(negatives)} non-world accounts are negative (forced overdrafts), e.g. {negatives[0]}")
    click.echo(verdict.summary())
    sys.exit(0 if verdict.ok else 1)


def _read_json_stream(text: str):
    """JSON values one after another: one per line (JSONL) or concatenated, as Formance's
    `logs/export` writes them."""
    decoder = json.JSONDecoder()
    index, end = 0, len(text)
    while True:
        while index < end and text[index].isspace():
            index += 1
        if index >= end:
            return
        value, index = decoder.raw_decode(text, index)
        yield value
