"""How long are a leaving worker's partitions down, without and with warm standbys?

    .venv/bin/python bench/failover.py            # 1,000,000 accounts
    .venv/bin/python bench/failover.py --quick    # 50,000 accounts, a smoke run
    .venv/bin/python bench/failover.py --kill     # worker 1 killed (kill -9) instead of stopped

Twice in one run — STREAMLEDGER_STANDBY off, then on — each on a fresh local Kafka:

1. load      — worker 1 alone; --ledgers ledgers, --accounts accounts funded as in
               bench/recovery.py (transactions of --postings postings).
2. join      — worker 2 joins the group and takes about half the partitions (it replays
               them from the log: its data dir is empty). With standbys, each worker then
               keeps a caught-up copy of the partitions the other owns; the bench waits
               until worker 2 logged its standbys ready.
3. failover  — worker 1 is stopped (SIGTERM: it leaves the group at once, so no session
               timeout to wait out; with --kill, kill -9: the group waits out its session
               first), and one probe transaction per ledger is produced right away.
               `failover_s` = stop -> the last probe's outcome, all from worker 2;
               `replayed_records` = what worker 2 replayed to take worker 1's partitions.

Prints its parameters first and a single JSON object as its last line. No thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from confluent_kafka import Producer  # noqa: E402

from bench._stack import WORKER_COMMAND, spawn, stop_process  # noqa: E402
from bench.recovery import ASSET, READY, Outcomes, coalesce, funding_transactions, now_micros, produce  # noqa: E402
from ledger.commands import CreateLedger, CreateTransaction, Request  # noqa: E402
from ledger.limits import postings_per_transaction_max  # noqa: E402
from ledger.model import Posting  # noqa: E402
from streamledger.kafka_local import LocalKafka, free_ports  # noqa: E402
from streams.topics import ensure_topics, producer_config  # noqa: E402


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Workers:
    def __init__(self, tmp: Path, bootstrap: str, app_id: str, partitions: int, standby: bool) -> None:
        self.tmp, self.bootstrap, self.app_id, self.partitions = tmp, bootstrap, app_id, partitions
        self.standby = standby
        self.ports = dict(zip(("w1", "w2"), free_ports(2)))
        self.processes: dict = {}

    def log_path(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start(self, name: str) -> None:
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMLEDGER_APP_ID": self.app_id,
            "STREAMLEDGER_PARTITIONS": str(self.partitions),
            "STREAMLEDGER_DATA_DIR": str(self.tmp / f"{name}-data"),
            "STREAMLEDGER_WORKER_PORT": str(self.ports[name]),
            "STREAMLEDGER_STANDBY": "true" if self.standby else "false",
            "PYTHONUNBUFFERED": "1",
        }
        self.processes[name] = spawn(WORKER_COMMAND, env=env, log_path=self.log_path(name), cwd=self.tmp)

    def check(self) -> None:
        for name, process in self.processes.items():
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {process.returncode}; see {self.log_path(name)}")

    def stop(self, name: str) -> None:
        stop_process(self.processes.get(name), 60)
        self.processes[name] = None

    def kill(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None:
            process.kill()  # SIGKILL: no LeaveGroup, no cleanup
            process.wait(30)
        self.processes[name] = None

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def text(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""


def wait_for(condition, timeout: float, workers: Workers, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        workers.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f} s")
        time.sleep(0.2)


def one_run(args, standby: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="streamledger-failover-"))
    run = uuid.uuid4().hex[:8]
    ledgers = [f"fo-{run}-{i:02d}" for i in range(args.ledgers)]
    kafka = LocalKafka(tmp / "kafka")
    kafka.start()
    workers = Workers(tmp, kafka.bootstrap_servers, f"failover-{run}", args.partitions, standby)
    outcomes = None
    try:
        ensure_topics(kafka.bootstrap_servers, args.partitions)
        outcomes = Outcomes(kafka.bootstrap_servers, args.partitions).start()
        producer = Producer(producer_config(kafka.bootstrap_servers, **{
            "linger.ms": 5, "compression.type": "lz4", "message.max.bytes": 1_000_000}))

        # 1. load, worker 1 alone
        workers.start("w1")
        creates = [Request(f"{run}-create-{i:02d}", ledger, CreateLedger(), received_at=now_micros())
                   for i, ledger in enumerate(ledgers)]
        produce(producer, coalesce(creates, 1))
        outcomes.wait([r.request_id for r in creates], args.timeout, workers.check)
        transactions = funding_transactions(run, args.accounts, args.postings, ledgers)
        t0 = time.monotonic()
        produce(producer, coalesce(transactions, args.wire_batch))
        outcomes.wait([r.request_id for r in transactions], args.timeout, workers.check)
        log(f"[standby={standby}] load: {len(transactions)} transactions in {time.monotonic() - t0:.1f} s")

        # 2. worker 2 joins and takes half the partitions
        w1_before = len(workers.text("w1"))
        workers.start("w2")

        def ready(name: str, since: int = 0) -> set[int]:
            return {int(m[0]) for m in READY.findall(workers.text(name)[since:])}

        # Every partition ready again after the join, on one worker or the other.
        wait_for(lambda: ready("w2") and ready("w1", w1_before) | ready("w2") == set(range(args.partitions)),
                 args.timeout, workers, "the partitions were not all taken after worker 2 joined")
        others = ready("w1", w1_before) - ready("w2")
        if standby:
            def warm() -> bool:
                text = workers.text("w2")
                return all(f"standby of partition {p}: replayed" in text for p in others)
            t1 = time.monotonic()
            wait_for(warm, args.timeout, workers, "worker 2's standbys were not ready")
            log(f"[standby={standby}] worker 2's standbys of {sorted(others)} ready in {time.monotonic() - t1:.1f} s")
        time.sleep(2 * 2.0)  # a standby round more (the log moved on while they caught up)

        # 3. worker 1 leaves (or dies); one probe per ledger at once
        before = workers.text("w2")
        stopped = time.monotonic()
        (workers.kill if args.kill else workers.stop)("w1")
        probes = [Request(f"{run}-probe-{i:02d}", ledger, CreateTransaction(
            postings=(Posting("world", "probe", 1, ASSET),)), received_at=now_micros())
            for i, ledger in enumerate(ledgers)]
        produce(producer, coalesce(probes, 1))
        failover = outcomes.wait([r.request_id for r in probes], args.timeout, workers.check) - stopped
        after = workers.text("w2")[len(before):]
        readies = READY.findall(after)
        result = {
            "failover_s": round(failover, 2),
            "partitions_taken_over": sorted(int(m[0]) for m in readies),
            "replayed_records": sum(int(m[1]) for m in readies),
            "recovery_logged_s_max": max((float(m[2]) for m in readies), default=0.0),
        }
        log(f"[standby={standby}] failover: {result}")
        return result
    finally:
        if outcomes is not None:
            outcomes.stop()
        workers.close()
        kafka.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--ledgers", type=int, default=16)
    parser.add_argument("--postings", type=int, default=postings_per_transaction_max)
    parser.add_argument("--wire-batch", type=int, default=8)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--kill", action="store_true", help="kill -9 worker 1 instead of SIGTERM")
    parser.add_argument("--quick", action="store_true", help="50,000 accounts")
    args = parser.parse_args(argv)
    if args.quick:
        args.accounts = 50_000
    print("parameters: " + json.dumps(vars(args)), flush=True)
    result: dict = {"accounts": args.accounts, "ledgers": args.ledgers, "partitions": args.partitions,
                    "worker_1_stopped_by": "SIGKILL" if args.kill else "SIGTERM"}
    for standby in (False, True):
        result["with_standby" if standby else "without_standby"] = one_run(args, standby)
    result["machine"] = {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
