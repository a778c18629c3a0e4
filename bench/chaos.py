"""The crash test: exactly-once effects while workers are kill -9'd and the broker restarts.

Starts its own Kafka (temp dir), the ledger topics, two workers in one consumer group and
the gateway; creates the ledgers; produces a paced, seeded stream of request batches
straight to `ledger.requests` (valid transfers, overdrafts, duplicate references, and
redelivered request ids — re-sent in the same or a later batch); meanwhile it kill -9s a
random worker every few seconds and restarts it, restarts the broker once, and leaves one
hanging transaction on a log partition (`bench/_hanging.py`: the failure seed 73 once met,
which the workers must find and abort). When every
distinct request id has an outcome (or after a bounded wait), `bench/verify_log.py` reads
the output topics and the served balances and judges. The last line printed is one JSON
verdict; the exit code is 1 when it is not ok.

    .venv/bin/python bench/chaos.py                 # full size: 100k requests, 12 kills
    .venv/bin/python bench/chaos.py --small         # a few thousand requests, 2 kills

The request stream is a function of --seed (ids, contents, order); kill and restart times
follow a seeded schedule too, but what they interrupt depends on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.verify_log import COMMITTED, REJECTED, verify  # noqa: E402
from ledger.commands import CreateLedger, CreateTransaction, Request  # noqa: E402
from ledger.model import Posting  # noqa: E402
from streams.codecs import encode_requests  # noqa: E402
from streams.topics import REQUESTS, ensure_topics, producer_config  # noqa: E402

ASSETS = ("USD/2", "EUR/2", "COIN")
NOTE = "a<b & c>d \u00e9\u2028"  # Go-escaped characters and non-ASCII inside the hashed payload


def say(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------ the stream


class Stream:
    """The seeded request stream. It keeps a model of each ledger (as if every request
    were applied in send order) only to choose funded sources and real overdrafts; the
    verifier has its own model and is the judge."""

    def __init__(self, seed: int, ledgers: int, accounts: int, batch_max: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.ledgers = [f"chaos{i:02d}" for i in range(ledgers)]
        # Names of different lengths ("users:7", "users:70", "users:700"): store prefix
        # scans must not mix them up.
        self.accounts = [f"users:{i}" for i in range(accounts)]
        self.batch_max = batch_max
        self.counter = 0
        self.balances = {l: {} for l in self.ledgers}  # ledger -> {(account, asset): int}
        self.funded = {l: [] for l in self.ledgers}  # accounts with money, per ledger
        self.funded_set = {l: set() for l in self.ledgers}
        self.references = {l: [] for l in self.ledgers}  # every reference sent
        self.taken = {l: set() for l in self.ledgers}  # references the model committed
        self.history = {l: deque(maxlen=2000) for l in self.ledgers}
        self.kinds: dict[str, int] = {}
        self.distinct: set[str] = set()

    def _id(self) -> str:
        self.counter += 1
        return f"s{self.seed}-{self.counter:07d}"

    def create_ledgers(self) -> list[tuple[str, list[Request]]]:
        out = []
        for ledger in self.ledgers:
            request = Request(f"s{self.seed}-create-{ledger}", ledger, CreateLedger(metadata={"chaos": "1"}),
                              received_at=_now())
            self.distinct.add(request.request_id)
            out.append((ledger, [request]))
        return out

    def batch(self) -> tuple[str, list[Request]]:
        ledger = self.rng.choice(self.ledgers)
        size = self.rng.randint(1, self.batch_max)
        requests: list[Request] = []
        while len(requests) < size:
            requests.append(self._one(ledger, requests))
        for request in requests:
            self.history[ledger].append(request)
        return ledger, requests

    def _count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def _one(self, ledger: str, current: list[Request]) -> Request:
        rng = self.rng
        roll = rng.random()
        history = self.history[ledger]
        if roll < 0.08 and (history or current):
            self._count("redelivery")
            if current and rng.random() < 0.25:
                return rng.choice(current)  # the same id twice in one batch
            return rng.choice(history) if history else rng.choice(current)
        funded = self.funded[ledger]
        if roll < 0.22 or len(funded) < 20:
            self._count("fund")
            account = rng.choice(self.accounts)
            postings = [("world", account, rng.randint(100, 100_000), rng.choice(ASSETS))]
        elif roll < 0.32:
            self._count("overdraft")
            source = rng.choice(funded)
            asset = rng.choice(ASSETS)
            have = self.balances[ledger].get((source, asset), 0)
            postings = [(source, self._other(source), have + rng.randint(1, 5_000), asset)]
        elif roll < 0.40:
            self._count("multi_posting")
            source = rng.choice(funded)
            asset = self._asset_of(ledger, source)
            have = self.balances[ledger].get((source, asset), 0)
            first = rng.randint(0, max(have // 2, 1))
            postings = [(source, self._other(source), first, asset),
                        (source, self._other(source), rng.randint(0, max(have - first, 1)), asset)]
            if rng.random() < 0.3:
                postings.append(("world", source, rng.randint(1, 1000), asset))
        else:
            self._count("transfer")
            source = rng.choice(funded)
            asset = self._asset_of(ledger, source)
            have = self.balances[ledger].get((source, asset), 0)
            postings = [(source, self._other(source), rng.randint(0, max(have, 0)), asset)]
        reference = None
        if rng.random() < 0.06 and self.references[ledger]:
            self._count("duplicate_reference")
            reference = rng.choice(self.references[ledger])
        elif rng.random() < 0.4:
            reference = f"ref-{ledger}-{self.counter + 1}"
            self.references[ledger].append(reference)
        metadata = {"note": NOTE, "n": str(self.counter + 1)} if rng.random() < 0.1 else {}
        account_metadata = {postings[0][1]: {"tier": rng.choice(["gold", "<silver>"])}} if rng.random() < 0.05 else {}
        command = CreateTransaction(
            postings=tuple(Posting(s, d, a, asset) for s, d, a, asset in postings),
            reference=reference, metadata=metadata, account_metadata=account_metadata)
        request = Request(self._id(), ledger, command, received_at=_now())
        self.distinct.add(request.request_id)
        self._apply(ledger, postings, reference)
        return request

    def _asset_of(self, ledger: str, account: str) -> str:
        held = [a for a in ASSETS if self.balances[ledger].get((account, a), 0) > 0]
        return self.rng.choice(held) if held else self.rng.choice(ASSETS)

    def _other(self, account: str) -> str:
        while True:
            other = self.rng.choice(self.accounts)
            if other != account:
                return other

    def _apply(self, ledger: str, postings: list, reference: str | None) -> None:
        if reference and reference in self.taken[ledger]:
            return
        balances = dict(self.balances[ledger])
        for source, destination, amount, asset in postings:
            if source != "world" and balances.get((source, asset), 0) < amount:
                return
            balances[(source, asset)] = balances.get((source, asset), 0) - amount
            balances[(destination, asset)] = balances.get((destination, asset), 0) + amount
        self.balances[ledger] = balances
        if reference:
            self.taken[ledger].add(reference)
        for _source, destination, _amount, _asset in postings:
            if destination not in self.funded_set[ledger]:
                self.funded_set[ledger].add(destination)
                self.funded[ledger].append(destination)


def _now() -> int:
    return int(time.time() * 1_000_000)


# ------------------------------------------------------------------------- processes


def _pdeathsig() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


class Processes:
    """The two workers and the gateway. Only the main thread spawns (PR_SET_PDEATHSIG
    fires when the spawning *thread* ends)."""

    def __init__(self, tmp: Path, bootstrap: str, app_id: str, partitions: int) -> None:
        from streamledger.kafka_local import free_ports

        self.tmp = tmp
        w1, w2, gw = free_ports(3)
        self.ports = {"w1": w1, "w2": w2}
        self.gateway_port = gw
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "STREAMLEDGER_APP_ID": app_id,
            "STREAMLEDGER_PARTITIONS": str(partitions),
            "STREAMLEDGER_SESSION_TIMEOUT_MS": "6000",
            "STREAMLEDGER_GATEWAY_PORT": str(gw),
            "STREAMLEDGER_WORKER_URL": f"http://127.0.0.1:{w1}",
            "STREAMLEDGER_ROCKSDB_BLOCK_CACHE_MB": "8",
            "STREAMLEDGER_ROCKSDB_WRITE_BUFFER_MB": "4",
            "PYTHONUNBUFFERED": "1",
        }
        self.workers: dict[str, subprocess.Popen | None] = {"w1": None, "w2": None}
        self.gateway: subprocess.Popen | None = None
        self.starts = {"w1": 0, "w2": 0}

    def _spawn(self, args: list[str], env: dict, log_name: str, banner: str) -> subprocess.Popen:
        path = self.tmp / f"{log_name}.log"
        with open(path, "ab") as log:
            log.write(f"\n===== chaos: {banner} at {time.strftime('%H:%M:%S')} ({time.time():.3f}) =====\n".encode())
            log.flush()
            return subprocess.Popen([sys.executable, "-m", "streamledger", *args], env=env, cwd=ROOT,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_pdeathsig)

    def start_worker(self, name: str) -> None:
        self.starts[name] += 1
        env = {**self.env, "STREAMLEDGER_WORKER_PORT": str(self.ports[name]),
               "STREAMLEDGER_WORKER_URL": f"http://127.0.0.1:{self.ports[name]}",
               "STREAMLEDGER_DATA_DIR": str(self.tmp / f"{name}-data")}
        self.workers[name] = self._spawn(["worker"], env, name, f"start #{self.starts[name]} of {name}")

    def kill_worker(self, name: str) -> int | None:
        process = self.workers.get(name)
        if process is None or process.poll() is not None:
            return None
        with open(self.tmp / f"{name}.log", "ab") as log:
            log.write(f"\n===== chaos: kill -9 {name} pid {process.pid} at {time.strftime('%H:%M:%S')} "
                      f"({time.time():.3f}) =====\n".encode())
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        self.workers[name] = None
        return process.pid

    def start_gateway(self, timeout: float = 90) -> None:
        self.gateway = self._spawn(["gateway"], self.env, "gateway", "start of the gateway")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gateway.poll() is not None:
                raise RuntimeError("the gateway exited:\n" + self.tail("gateway"))
            try:
                with urllib.request.urlopen(f"{self.url}/_healthcheck", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the gateway did not become healthy:\n" + self.tail("gateway"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.tmp / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_all(self) -> None:
        procs = [p for p in list(self.workers.values()) + [self.gateway] if p is not None]
        for process in procs:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in procs:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# ----------------------------------------------------------------------- the threads


class Producing(threading.Thread):
    """Produces the stream at a paced rate; survives the broker restart (librdkafka
    retries; a delivery that still fails is re-sent later: a redelivery by request id)."""

    def __init__(self, bootstrap: str, stream: Stream, total: int, rate: float) -> None:
        super().__init__(name="producer", daemon=True)
        from confluent_kafka import Producer

        config = producer_config(bootstrap, **{
            "linger.ms": 5, "compression.type": "lz4", "message.timeout.ms": 120_000,
            "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 512 * 1024,
        })
        config["log_level"] = 2  # the broker restart makes librdkafka log every refused connect
        self.producer = Producer(config)
        self.stream = stream
        self.total = total
        self.rate = rate
        self.sent_requests = 0
        self.sent_records = 0
        self.acked_records = 0
        self.failed_deliveries = 0
        self.resent_records = 0
        self.failed: deque = deque()
        self.done = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def _delivered(self, error, message) -> None:
        if error is None:
            self.acked_records += 1
        else:
            self.failed_deliveries += 1
            self.failed.append((message.key(), message.value()))

    def send(self, ledger: str, requests: list[Request]) -> None:
        self._produce(ledger.encode(), encode_requests(requests))
        self.sent_records += 1

    def _produce(self, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(REQUESTS, value, key, on_delivery=self._delivered)
                self.producer.poll(0)
                return
            except BufferError:
                self.producer.poll(0.1)

    def _resend_failed(self) -> None:
        while self.failed:
            key, value = self.failed.popleft()
            self._produce(key, value)
            self.resent_records += 1

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._resend_failed()
            remaining = self.producer.flush(min(5.0, max(0.1, deadline - time.monotonic())))
            if remaining == 0 and not self.failed:
                return True
        return False

    def run(self) -> None:
        try:
            started = time.monotonic()
            while self.sent_requests < self.total and not self.stop.is_set():
                ledger, requests = self.stream.batch()
                self.send(ledger, requests)
                self.sent_requests += len(requests)
                self._resend_failed()
                ahead = self.sent_requests / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            if not self.flush(600):
                raise RuntimeError("could not deliver every request within 600 s")
        except BaseException as error:  # noqa: BLE001 — reported by the main thread
            self.error = error
        finally:
            self.done.set()


class Outcomes(threading.Thread):
    """Tails ledger.committed and ledger.rejected (read_committed) for the request ids
    seen so far — only to know when the run is complete; the verifier re-reads all."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(name="outcomes", daemon=True)
        from confluent_kafka import Consumer

        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"chaos-tail-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "auto.offset.reset": "earliest", "log_level": 2,
        })
        self.seen: set[str] = set()
        self.records = 0
        self.stop = threading.Event()

    def run(self) -> None:
        self.consumer.subscribe([COMMITTED, REJECTED])
        try:
            while not self.stop.is_set():
                for message in self.consumer.consume(5000, timeout=0.5):
                    if message.error() is not None:
                        continue
                    self.records += 1
                    for key, value in message.headers() or []:
                        if key == "request_id" and value is not None:
                            self.seen.add(value.decode())
        finally:
            self.consumer.close()


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests to produce (redeliveries count)")
    parser.add_argument("--ledgers", type=int, default=16)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--kills", type=int, default=12, help="kill -9 a worker at least this many times")
    parser.add_argument("--kill-interval", type=float, default=5.0, help="mean seconds between kills")
    parser.add_argument("--broker-restarts", type=int, default=1, choices=(0, 1))
    parser.add_argument("--broker-restart-mode", choices=("kill", "graceful"), default="kill")
    parser.add_argument("--rate", type=float, default=0, help="requests/s (default: paced so production "
                        "spans the kill schedule)")
    parser.add_argument("--hanging-transactions", type=int, default=1, choices=(0, 1),
                        help="leave a hanging transaction on a random ledger.committed partition")
    parser.add_argument("--batch-max", type=int, default=40, help="requests per wire batch, at most")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--outcome-wait", type=float, default=300, help="seconds to wait for outcomes after production")
    parser.add_argument("--keep", action="store_true", help="keep logs and data even when the run passes")
    parser.add_argument("--small", action="store_true", help="preset: 3,000 requests, 2 kills, 1 broker restart")
    args = parser.parse_args(argv)
    if args.small:
        args.requests, args.kills, args.kill_interval, args.accounts = 3_000, 2, 5.0, 200
        args.batch_max = min(args.batch_max, 20)
        args.hanging_transactions = 0  # its detection alone takes half a minute; tests/integration/test_hanging.py
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="streamledger-chaos-"))
    duration = args.kills * args.kill_interval * 1.15 + 10
    rate = args.rate or max(50.0, args.requests / duration)
    say(f"chaos: {json.dumps({k: v for k, v in vars(args).items()})}")
    say(f"chaos: logs and data in {tmp}; producing at {rate:.0f} requests/s (~{args.requests / rate:.0f}s)")

    from streamledger.kafka_local import LocalKafka

    kafka = LocalKafka()
    processes: Processes | None = None
    producing: Producing | None = None
    outcomes: Outcomes | None = None
    kills = 0
    broker_restarts = 0
    incidents: list[dict] = []
    kill_log: list[dict] = []
    verdict: dict = {}
    try:
        kafka.start()
        bootstrap = kafka.bootstrap_servers
        ensure_topics(bootstrap, args.partitions)
        _wait_for_leaders(bootstrap)
        say(f"chaos: Kafka at {bootstrap} (data {kafka.data_dir})")
        app_id = f"chaos-{args.seed}-{uuid.uuid4().hex[:6]}"
        processes = Processes(tmp, bootstrap, app_id, args.partitions)
        processes.start_worker("w1")
        processes.start_worker("w2")
        processes.start_gateway()
        say(f"chaos: workers on ports {processes.ports}, gateway {processes.url}, app id {app_id}")

        stream = Stream(args.seed, args.ledgers, args.accounts, args.batch_max)
        outcomes = Outcomes(bootstrap)
        outcomes.start()
        producing = Producing(bootstrap, stream, args.requests, rate)
        for ledger, requests in stream.create_ledgers():
            producing.send(ledger, requests)
        producing.flush(60)
        deadline = time.monotonic() + 180
        while not stream.distinct <= outcomes.seen:
            _watch(processes, set(), incidents, t_start)
            if time.monotonic() > deadline:
                raise RuntimeError("the ledgers were not created within 180 s:\n" + processes.tail("w1") + "\n"
                                   + processes.tail("w2"))
            time.sleep(0.2)
        say(f"chaos: {args.ledgers} ledgers created after {time.monotonic() - t_start:.1f}s; starting the stream")

        # The orchestrator (this thread): kills, restarts, the broker restart, progress.
        krng = random.Random(args.seed * 7919 + 17)
        t0 = time.monotonic()
        next_kill = t0 + args.kill_interval * krng.uniform(0.6, 1.4)
        restarts_due: dict[str, float] = {}
        broker_at = krng.uniform(0.35, 0.6) * args.requests if args.broker_restarts else None
        hrng = random.Random(args.seed * 31 + 5)  # (its own: a seed's kill schedule stays as it was)
        hang_at = hrng.uniform(0.1, 0.3) * args.requests if args.hanging_transactions else None
        hanging: list = []
        next_progress = t0
        producing.start()
        expected_dead: set[str] = set()
        while True:
            now = time.monotonic()
            if producing.done.is_set() and kills >= args.kills and not restarts_due:
                break
            if (args.kills and now >= next_kill and kills < args.kills * 3
                    and not (producing.done.is_set() and kills >= args.kills)):
                name = krng.choice(["w1", "w2"])
                if name not in restarts_due:
                    pid = processes.kill_worker(name)
                    if pid is not None:
                        kills += 1
                        delay = krng.uniform(0.0, 2.0)
                        restarts_due[name] = now + delay
                        expected_dead.add(name)
                        kill_log.append({"t": round(now - t0, 1), "worker": name, "pid": pid})
                        say(f"[{now - t0:6.1f}s] kill -9 {name} (pid {pid}), kill #{kills}; restart in {delay:.1f}s")
                next_kill = now + args.kill_interval * krng.uniform(0.6, 1.4)
            for name, due in list(restarts_due.items()):
                if now >= due:
                    processes.start_worker(name)
                    expected_dead.discard(name)
                    del restarts_due[name]
                    say(f"[{now - t0:6.1f}s] restarted {name} (pid {processes.workers[name].pid})")
            if broker_at is not None and producing.sent_requests >= broker_at:
                broker_at = None
                say(f"[{now - t0:6.1f}s] restarting the broker ({args.broker_restart_mode}) ...")
                kafka.restart(graceful=args.broker_restart_mode == "graceful")
                broker_restarts += 1
                say(f"[{time.monotonic() - t0:6.1f}s] broker back after {time.monotonic() - now:.1f}s")
            if hang_at is not None and producing.sent_requests >= hang_at:
                hang_at = None
                partition = hrng.randrange(args.partitions)
                say(f"[{now - t0:6.1f}s] leaving a hanging transaction on {COMMITTED}[{partition}]")
                hanging.append(threading.Thread(target=_hang, args=(bootstrap, partition, incidents), daemon=True))
                hanging[-1].start()
            _watch(processes, expected_dead, incidents, t0)
            if now >= next_progress:
                next_progress = now + 5
                _progress(t0, producing, outcomes, stream, kills, broker_restarts)
            time.sleep(0.1)
        if producing.error is not None:
            raise RuntimeError(f"producing failed: {producing.error!r}")
        produce_s = time.monotonic() - t0
        say(f"chaos: production done after {produce_s:.1f}s ({producing.sent_requests} requests, "
            f"{len(stream.distinct)} distinct ids, {producing.sent_records} records); waiting for outcomes")

        deadline = time.monotonic() + args.outcome_wait
        next_progress = time.monotonic() + 5
        while not stream.distinct <= outcomes.seen and time.monotonic() < deadline:
            _watch(processes, expected_dead, incidents, t0)
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + 5
                _progress(t0, producing, outcomes, stream, kills, broker_restarts)
            time.sleep(0.2)
        waited = time.monotonic() - t0 - produce_s
        missing = len(stream.distinct - outcomes.seen)
        say(f"chaos: outcomes for {len(stream.distinct) - missing}/{len(stream.distinct)} request ids "
            f"{waited:.1f}s after production ended")
        outcomes.stop.set()

        for thread in hanging:
            thread.join(60)
        aborted = sum(_count_in_logs(tmp, "(hanging): aborted it").values())
        if hanging and not aborted:
            incidents.append({"kind": "hanging_transaction_not_aborted"})
        _wait_for_query_views(processes, stream.ledgers[0])
        verdict = verify(bootstrap, processes.url, set(stream.distinct), partitions=args.partitions, log=say)
        for incident in incidents:
            verdict["violations"].append(incident)
            verdict["violation_counts"][incident["kind"]] = verdict["violation_counts"].get(incident["kind"], 0) + 1
        if incidents:
            verdict["ok"] = False
        verdict["stats"].update({
            "kinds_generated": stream.kinds, "produced_records": producing.sent_records,
            "failed_deliveries_resent": producing.resent_records, "produce_s": round(produce_s, 1),
            "outcome_wait_s": round(waited, 1), "kills": kill_log,
            "worker_log_tracebacks": _count_in_logs(tmp, "Traceback"),
            "worker_log_exceptions": _exceptions_in_logs(tmp),
            "hanging_transactions": {"left": len(hanging), "aborted": aborted},
            "recoveries_replaying_log": _recoveries(tmp),
        })
        verdict = {"ok": verdict["ok"], "requests": producing.sent_requests,
                   "distinct_request_ids": len(stream.distinct), "kills": kills,
                   "broker_restarts": broker_restarts, "seed": args.seed,
                   "runtime_s": round(time.monotonic() - t_start, 1),
                   "violation_counts": verdict["violation_counts"],
                   "violations": verdict["violations"][:50], "stats": verdict["stats"]}
    except KeyboardInterrupt:
        verdict = {"ok": False, "requests": producing.sent_requests if producing else 0, "kills": kills,
                   "broker_restarts": broker_restarts, "violations": [{"kind": "interrupted"}]}
    except Exception as error:  # noqa: BLE001 — the run could not complete: a failing verdict
        import traceback

        traceback.print_exc()
        verdict = {"ok": False, "requests": producing.sent_requests if producing else 0, "kills": kills,
                   "broker_restarts": broker_restarts,
                   "violations": [{"kind": "run_failed", "error": f"{type(error).__name__}: {error}"[:2000]}]}
    finally:
        if producing is not None:
            producing.stop.set()
        if outcomes is not None:
            outcomes.stop.set()
        if processes is not None:
            processes.stop_all()
        if not verdict.get("ok") and kafka.logs_dir.is_dir():  # the broker's side of a failure
            shutil.copytree(kafka.logs_dir, tmp / "kafka-logs", dirs_exist_ok=True)
        kafka.close()
        if outcomes is not None:
            outcomes.join(10)
        if producing is not None and producing.is_alive():
            producing.join(10)
    # A traceback in a passing run is worth a look too: its logs are kept.
    tracebacks = sum((verdict.get("stats") or {}).get("worker_log_tracebacks", {}).values())
    keep = args.keep or not verdict.get("ok") or tracebacks > 0
    if keep:
        say(f"chaos: logs kept in {tmp} (w1.log, w2.log, gateway.log; kafka-logs/ when it failed)")
        verdict["logs"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(verdict, default=str), flush=True)
    return 0 if verdict.get("ok") else 1


def _watch(processes: Processes, expected_dead: set[str], incidents: list, t0: float) -> None:
    """A worker or the gateway that exits on its own is a bug: record it, restart it."""
    for name, process in processes.workers.items():
        if process is not None and process.poll() is not None and name not in expected_dead:
            code = process.returncode
            incidents.append({"kind": "worker_exited", "worker": name, "exit_code": code,
                              "t": round(time.monotonic() - t0, 1), "log_tail": processes.tail(name, 25)[-3000:]})
            say(f"[{time.monotonic() - t0:6.1f}s] {name} EXITED on its own (code {code}); restarting it")
            if sum(1 for i in incidents if i["kind"] == "worker_exited" and i["worker"] == name) >= 5:
                raise RuntimeError(f"{name} keeps exiting on its own:\n" + processes.tail(name, 40))
            processes.start_worker(name)
    if processes.gateway is not None and processes.gateway.poll() is not None:
        incidents.append({"kind": "gateway_exited", "exit_code": processes.gateway.returncode,
                          "log_tail": processes.tail("gateway", 25)[-3000:]})
        say("the gateway EXITED on its own; restarting it")
        processes.start_gateway()


def _progress(t0, producing: Producing, outcomes: Outcomes, stream: Stream, kills: int, restarts: int) -> None:
    say(f"[{time.monotonic() - t0:6.1f}s] produced {producing.sent_requests} requests "
        f"({producing.acked_records}/{producing.sent_records} records acked) · outcomes for "
        f"{len(outcomes.seen)}/{len(stream.distinct)} ids ({outcomes.records} records) · kills {kills} · "
        f"broker restarts {restarts}")


def _wait_for_leaders(bootstrap: str, timeout: float = 60) -> None:
    """Every partition of the ledger topics answers a watermark query: a deployment creates
    its topics long before starting processes, and we do not test topic creation here."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "chaos-probe", "log_level": 2})
    deadline = time.monotonic() + timeout
    try:
        metadata = consumer.list_topics(timeout=30)
        waiting = [TopicPartition(name, p) for name, topic in metadata.topics.items()
                   if name.startswith("ledger.") for p in topic.partitions]
        while waiting and time.monotonic() < deadline:
            still = []
            for tp in waiting:
                try:
                    consumer.get_watermark_offsets(tp, timeout=5, cached=False)
                except KafkaException:
                    still.append(tp)
            waiting = still
            if waiting:
                time.sleep(0.2)
    finally:
        consumer.close()


def _wait_for_query_views(processes: Processes, ledger: str, timeout: float = 120) -> None:
    """Both workers answer queries again (partitions assigned and recovered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{processes.url}/v2/{ledger}/accounts/world", timeout=10) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)


def _hang(bootstrap: str, partition: int, incidents: list) -> None:
    from bench._hanging import hang

    try:
        hang(bootstrap, COMMITTED, partition)
    except Exception as error:  # noqa: BLE001 — the run cannot show what it should
        incidents.append({"kind": "hanging_transaction_not_left", "error": f"{type(error).__name__}: {error}"})


def _recoveries(tmp: Path) -> dict:
    """How often a worker found its store behind the log on assignment (it replayed
    records): evidence that the kills landed between a Kafka commit and a store write, or
    that partitions moved to the other worker."""
    import re

    pattern = re.compile(r"partition \d+ ready: replayed (\d+) log records")
    counts = [int(n) for name in ("w1", "w2") if (tmp / f"{name}.log").exists()
              for n in pattern.findall((tmp / f"{name}.log").read_text(errors="replace"))]
    return {"assignments": len(counts), "with_replay": sum(1 for n in counts if n),
            "records_replayed": sum(counts)}


def _exceptions_in_logs(tmp: Path, most: int = 10) -> list[str]:
    """'<log>: <the exception line>' of each traceback in the logs (at most `most`)."""
    found = []
    for name in ("w1", "w2", "gateway"):
        path = tmp / f"{name}.log"
        if not path.exists():
            continue
        inside = False
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("Traceback"):
                inside = True
            elif inside and line and not line.startswith((" ", "\t")):
                if not line.startswith(("During handling", "The above exception")):
                    found.append(f"{name}: {line[:300]}")
                    inside = False
    return found[:most]


def _count_in_logs(tmp: Path, needle: str) -> dict[str, int]:
    out = {}
    for name in ("w1", "w2", "gateway"):
        path = tmp / f"{name}.log"
        if path.exists():
            out[name] = path.read_text(errors="replace").count(needle)
    return out


if __name__ == "__main__":
    sys.exit(main())
