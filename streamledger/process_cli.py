"""`streamledger worker`, `gateway` and `dev`: the long-running processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click


def _logging(level: str) -> None:
    from streams.logs import configure

    configure(level)


def _bounded_malloc_arenas() -> None:
    """Re-exec once with MALLOC_ARENA_MAX set: glibc gives each busy thread its own malloc
    arena, and a worker's partition threads would hold freed memory in up to 16 of them.
    Set MALLOC_ARENA_MAX yourself to choose another value (or to skip the re-exec)."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    os.execve(sys.executable, list(sys.orig_argv), {**os.environ, "MALLOC_ARENA_MAX": "2"})


@click.command()
def worker() -> None:
    """Run a stream worker (consumes ledger.requests, owns some partitions)."""
    _bounded_malloc_arenas()
    from faust import Worker as FaustWorker

    from streams.settings import Settings
    from streams.worker import create_app

    settings = Settings()
    _logging(settings.log_level)
    _wait_for_topics(settings)
    logging.getLogger().handlers.clear()  # faust sets up its own logging from here on
    app = create_app(settings)
    from streams.logs import configure_ours

    configure_ours(settings.log_level)  # faust configures the root logger itself
    _tune_gc()

    class Worker(FaustWorker):
        def _schedule_shutdown(self, signal_) -> None:  # SIGTERM / SIGINT
            # faust's shutdown waits on the broker (leaving the group, committing), which
            # may be gone: measured, a worker whose broker had died never exited. Nothing
            # is lost by ending it: a round is committed with its offsets or read again.
            _exit_after(settings.shutdown_timeout_ms / 1000)
            super()._schedule_shutdown(signal_)

    try:
        Worker(app, loglevel=settings.log_level.upper(), quiet=True).execute_from_commandline()
    except SystemExit as exit_:
        # faust gives up if the broker vanishes while it starts (a broker restart): start
        # over in the same process (same pid for supervisors) instead of exiting.
        if exit_.code not in (0, None) and not app.streamledger_worker.started:
            logging.getLogger("streamledger.worker").warning("worker failed while starting; starting over in 2s")
            time.sleep(2)
            os.execve(sys.executable, list(sys.orig_argv), dict(os.environ))
        raise


def _exit_after(seconds: float) -> None:
    import threading

    from streams.logs import exit_process

    def expire() -> None:
        exit_process(logging.getLogger("streamledger.worker"), "still stopping after %.0fs (the broker "
                     "unreachable?); exiting now", seconds, level=logging.WARNING, code=0)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def _tune_gc() -> None:
    """Collect cyclic garbage far less often than CPython's default (every 700 net
    allocations). A round of 4,000 requests keeps ~200k objects alive until it commits
    and the store caches hold long-lived ones: a young
    collection scans every live young object, so it must not run inside every round.
    Measured (no-Kafka micro-benchmark, 4,000-request rounds): the default threshold took
    ~35% of the CPU; 100k still ran ~1 collection per round at ~60 ms each (~15 us per
    request); 1M: none in 40k requests. Nearly nothing we allocate is cyclic; reference
    counting frees it. The objects alive after start-up (modules, faust, schemas) are
    frozen out of collections. Pauses are in `streamledger_gc_pause_seconds`.
    """
    import gc

    from streams import metrics

    gc.collect()
    gc.freeze()
    gc.set_threshold(1_000_000, 50, 100)
    started: list[float] = []

    def timed(phase: str, info: dict) -> None:  # every pause is visible in the metrics
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            metrics.gc_pause_seconds.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    gc.callbacks.append(timed)


@click.command()
def gateway() -> None:
    """Run the HTTP gateway (Formance v2 API on :3068)."""
    from aiohttp import web

    from api.app import create_app
    from streams.settings import Settings

    settings = Settings()
    _logging(settings.log_level)
    web.run_app(
        create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
        print=lambda _: click.echo(f"gateway listening on http://{settings.gateway_host}:{settings.gateway_port}"),
    )


@click.command()
@click.option("--kafka-port", default=9092, show_default=True, help="Port of the local broker.")
def dev(kafka_port: int) -> None:
    """Everything on loopback: a local Kafka (unless KAFKA_BOOTSTRAP_SERVERS is set),
    one worker and the gateway. Ctrl-C stops them all."""
    from streams.settings import Settings
    from streams.topics import ensure_topics

    _logging("info")
    settings = Settings()
    # Checked first: a second `make dev` would otherwise find the first one's broker and
    # gateway answering, and report itself up while its own processes fail to bind.
    ports = [(settings.worker_host, settings.worker_port, "the worker's, STREAMLEDGER_WORKER_PORT"),
             (settings.gateway_host, settings.gateway_port, "the gateway's, STREAMLEDGER_GATEWAY_PORT")]
    if "KAFKA_BOOTSTRAP_SERVERS" not in os.environ:
        ports.insert(0, ("127.0.0.1", kafka_port, "Kafka's, --kafka-port"))
    taken = [f"{port} ({what})" for host, port, what in ports if not _port_free(host, port)]
    if taken:
        raise click.ClickException(
            f"port {', '.join(taken)} already in use: is another `make dev` running? "
            "Stop it, or choose other ports.")
    kafka = None
    env = dict(os.environ)
    if "KAFKA_BOOTSTRAP_SERVERS" not in os.environ:
        from streamledger.kafka_local import LocalKafka, default_data_dir

        kafka = LocalKafka(default_data_dir(), port=kafka_port)
        click.echo("starting Kafka (KRaft, one node) on 127.0.0.1:%d ..." % kafka_port)
        kafka.start()
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka.bootstrap_servers
    os.environ.update(env)
    settings = Settings()
    ensure_topics(settings.bootstrap_servers, settings.partitions)
    children: list[subprocess.Popen] = []
    stopping = False

    def stop(*_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for command in ("worker", "gateway"):
            children.append(subprocess.Popen([sys.executable, "-m", "streamledger", command], env=env))
        _wait_healthy(f"http://{settings.gateway_host}:{settings.gateway_port}/_healthcheck", children)
        base = f"http://{settings.gateway_host}:{settings.gateway_port}"
        click.echo(
            f"\nstreamledger is up.\n  gateway  {base}/v2   (Formance v2 API)\n"
            f"  worker   {settings.worker_url}/metrics\n  kafka    {settings.bootstrap_servers}\n\n"
            f"try:\n  curl -X POST {base}/v2/quickstart\n"
            f"  curl -X POST {base}/v2/quickstart/transactions -d "
            "'{\"postings\":[{\"source\":\"world\",\"destination\":\"bank\",\"amount\":100,\"asset\":\"USD\"}]}'\n"
            f"  curl {base}/v2/quickstart/accounts/bank\n\nCtrl-C stops everything.\n"
        )
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        if kafka is not None:
            kafka.stop()


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As servers bind: a port left in TIME_WAIT by a stopped run is free, a listener not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _wait_for_topics(settings, timeout: float = 180.0) -> None:
    """Create the topics, waiting for the broker: a worker started while Kafka restarts
    should come up when Kafka does, not exit."""
    from streams.topics import TopicMismatchError, ensure_topics

    log = logging.getLogger("streamledger.worker")
    deadline = time.monotonic() + timeout
    while True:
        try:
            ensure_topics(settings.bootstrap_servers, settings.partitions)
            return
        except TopicMismatchError as error:
            raise click.ClickException(str(error)) from None
        except Exception as error:  # noqa: BLE001 — the broker is down or still starting
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"Kafka at {settings.bootstrap_servers} is not reachable after {timeout:.0f}s: {error}"
                ) from None
            log.warning("waiting for Kafka at %s (%s)", settings.bootstrap_servers, error)
            time.sleep(2)


def _wait_healthy(url: str, children: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise click.ClickException("a process exited during start-up; see its log above")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise click.ClickException(f"the gateway did not become healthy at {url} in {timeout:.0f}s")


def register(main: click.Group) -> None:
    for command in (worker, gateway, dev):
        main.add_command(command)
