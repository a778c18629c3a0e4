"""The `streamledger` command line: one entry point, one subcommand per process or tool."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """streamledger: a double-entry ledger on Kafka streams (Formance v2 API)."""


def _register() -> None:
    # Subcommands live beside the code they drive; importing them here keeps the CLI's
    # start-up cheap for the commands that need neither faust nor the broker.
    from streamledger import numscript_cli

    main.add_command(numscript_cli.numscript)
    from streamledger import kafka_cli
    kafka_cli.register(main)
    from streamledger import process_cli

    process_cli.register(main)
    from streamledger import verify_cli

    main.add_command(verify_cli.verify)


_register()

if __name__ == "__main__":
    main()
