"""`streamledger kafka` (run the local Kafka broker) and `streamledger topics` (create and
describe the ledger topics)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import click


def _bootstrap_default() -> str:
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


def _partitions_default() -> int:
    return int(os.environ.get("STREAMLEDGER_PARTITIONS", "8"))


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@click.command("kafka")
@click.option("--port", type=int, default=9092, show_default=True,
              help="Client (PLAINTEXT) port on 127.0.0.1.")
@click.option("--controller-port", type=int, default=None,
              help="KRaft controller port on 127.0.0.1 [default: a free port].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Broker data, kept across runs [default: $STREAMLEDGER_KAFKA_DATA or "
                   ".data/kafka in the repo].")
@click.option("--heap", default=None,
              help="JVM max heap, e.g. 512m [default: $STREAMLEDGER_KAFKA_HEAP or 512m].")
def kafka(port: int, controller_port: int | None, data_dir: Path | None, heap: str | None) -> None:
    """Run a local Apache Kafka 4.3.1 broker (KRaft, one node) until Ctrl-C / SIGTERM.

    The jars are fetched once with mvn into ~/.cache/streamledger (or
    $STREAMLEDGER_KAFKA_CACHE); the data dir is formatted on first use.
    """
    from streamledger.kafka_local import (
        KafkaSetupError,
        LocalKafka,
        default_data_dir,
        ensure_jars,
        jars_cached,
    )

    if _port_in_use(port):
        raise click.ClickException(
            f"127.0.0.1:{port} is already in use (another broker running?); pick --port"
        )
    data_dir = data_dir or default_data_dir()
    try:
        if not jars_cached():
            click.echo("fetching the Kafka jars with mvn (~44 MB from Maven Central, once)…",
                       err=True)
        ensure_jars()
        broker = LocalKafka(data_dir, port=port, controller_port=controller_port, heap=heap)
    except KafkaSetupError as exc:
        raise click.ClickException(str(exc)) from exc

    stopping = False

    def on_term(signum, frame):  # SIGTERM behaves like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            broker.start()
        except KafkaSetupError as exc:
            raise click.ClickException(str(exc)) from exc
        t = broker.timings
        click.echo(
            f"Kafka ready on {broker.bootstrap_servers} "
            f"(format {t.get('format_s', 0):.1f} s, start {t.get('start_to_ready_s', 0):.1f} s; "
            f"data {broker.data_dir}; log {broker.server_log})",
            err=True,
        )
        click.echo(broker.bootstrap_servers)
        sys.stdout.flush()
        while broker.is_running():
            time.sleep(0.5)
        raise click.ClickException(
            f"the broker exited unexpectedly; see {broker.server_log}"
        )
    except KeyboardInterrupt:
        stopping = True
    finally:
        if stopping or broker.is_running():
            click.echo("stopping Kafka…", err=True)
        # A second Ctrl-C while stopping must not orphan the JVM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            broker.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    click.echo("Kafka stopped.", err=True)


@click.group("topics")
def topics() -> None:
    """Create or describe the ledger topics (ledger.requests, ledger.committed, ledger.rejected)."""


_bootstrap_option = click.option(
    "--bootstrap-servers", "-b", default=_bootstrap_default, show_default="$KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092",
    help="Kafka bootstrap servers.",
)


@topics.command("create")
@_bootstrap_option
@click.option("--partitions", "-p", type=click.IntRange(min=1), default=_partitions_default,
              show_default="$STREAMLEDGER_PARTITIONS or 8",
              help="Partitions of each topic (the same for all three).")
@click.option("--replication-factor", type=int, default=-1, show_default=True,
              help="-1 uses the cluster's default.replication.factor.")
def create(bootstrap_servers: str, partitions: int, replication_factor: int) -> None:
    """Create the three topics (idempotent; fails if one exists with another partition count)."""
    from streams.topics import TopicMismatchError, ensure_topics

    try:
        counts = ensure_topics(bootstrap_servers, partitions,
                               replication_factor=replication_factor)
    except TopicMismatchError as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # KafkaException, timeouts: say where we tried
        raise click.ClickException(f"could not create topics on {bootstrap_servers}: {exc}") from exc
    for name, n in counts.items():
        click.echo(f"{name}\t{n} partitions")


@topics.command("describe")
@_bootstrap_option
def describe(bootstrap_servers: str) -> None:
    """Show each ledger topic's partition count (or 'missing')."""
    from streams.topics import describe_topics

    try:
        counts = describe_topics(bootstrap_servers)
    except Exception as exc:
        raise click.ClickException(f"could not reach Kafka at {bootstrap_servers}: {exc}") from exc
    for name, n in counts.items():
        click.echo(f"{name}\t{'missing' if n is None else f'{n} partitions'}")
    if len({n for n in counts.values()}) > 1:
        click.echo("warning: the topics do not all have the same partition count", err=True)


def register(main: click.Group) -> None:
    """Add `kafka` and `topics` to the `streamledger` command group."""
    main.add_command(kafka)
    main.add_command(topics)
