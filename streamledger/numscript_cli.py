"""`streamledger numscript …`: run scripts and Formance spec files from the shell."""

import click


@click.group()
def numscript() -> None:
    """Run Numscript programs and spec files."""
