"""How fast is a worker back to processing after a restart, and after losing its disk?

    .venv/bin/python bench/recovery.py            # 1,000,000 accounts
    .venv/bin/python bench/recovery.py --quick    # 50,000 accounts, a smoke run

Starts its own stack (bench/_stack.py: a LocalKafka in a temp dir, the ledger topics, ONE
worker subprocess with a fresh data dir, a free port and a unique app id), then:

1. load     — creates --ledgers ledgers and funds --accounts distinct accounts, each once,
              with transactions of --postings postings `world -> acct:<n>` (the ledger of
              transaction i is i mod --ledgers), coalesced per ledger into wire records of
              --wire-batch transactions (as the gateway coalesces); waits until every one
              is committed (ledger.committed, read_committed, matched by the request_id
              header). `peak_rss_mb_load` is the worker's VmHWM at that point.
2. restart  — `kill -9` the worker, start it again on the same data dir, and right away
              produce one probe transaction per ledger. `restart_to_processing_s` is
              process start -> the LAST probe's outcome (every partition is back), with the
              records it logged as replayed ("partition N ready: replayed K ...") and the
              times at which the log lines of recovery appeared (the breakdown).
   graceful — the same after a SIGTERM (the worker leaves the consumer group, so no session
              timeout to wait out): `graceful_restart_to_processing_s`.
   stale    — unless --no-stale: the store is put back to a copy taken (worker stopped)
              after the first half of the load, so it is behind the log by the second
              half, as after a crash between the Kafka commit and the store write, only
              bigger: the restart replays from the recorded positions
              (`stale_restart_to_processing_s`, `stale_replayed_records`).
3. rebuild  — stop the worker, delete its data dir, start it: the store is rebuilt from
              the log alone. `rebuild_to_processing_s`, `rebuild_replayed_records`.

Prints its parameters first and a single JSON object as its last line. No thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition  # noqa: E402

from bench._stack import Stack, cpu_seconds, peak_rss_mb, stop_process  # noqa: E402
from bench._stack import produce as produce_one  # noqa: E402
from ledger.commands import CreateLedger, CreateTransaction, Request  # noqa: E402
from ledger.limits import postings_per_transaction_max, record_bytes_max  # noqa: E402
from ledger.model import Posting  # noqa: E402
from streams import codecs  # noqa: E402
from streams.topics import COMMITTED, REJECTED, REQUESTS, producer_config  # noqa: E402

ASSET = "USD"
READY = re.compile(r"partition (\d+) ready: replayed (\d+) log records in ([\d.]+)s")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def now_micros() -> int:
    return time.time_ns() // 1000


# ---------------------------------------------------------------------- outcomes


class Outcomes:
    """A consumer thread over ledger.committed and ledger.rejected (read_committed), from
    their end when started: request id -> (rejected?, monotonic arrival time)."""

    def __init__(self, bootstrap: str, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.seen: dict[str, tuple[bool, float]] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outcomes", daemon=True)

    def start(self, timeout: float = 60.0) -> "Outcomes":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the outcome consumer was not positioned in time")
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"bench-recovery-outcomes-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 10,
        })
        try:
            assignment = []
            for topic in (COMMITTED, REJECTED):
                for p in range(self.partitions):
                    deadline = time.monotonic() + 30
                    while True:
                        try:
                            high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                            break
                        except KafkaException:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.2)
                    assignment.append(TopicPartition(topic, p, high))
            consumer.assign(assignment)
            self._ready.set()
            while not self._stop.is_set():
                messages = consumer.consume(1000, timeout=0.05)
                if not messages:
                    continue
                now = time.monotonic()
                arrived = []
                for m in messages:
                    if m.error() is not None:
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            log("outcome consumer:", m.error())
                        continue
                    for name, value in m.headers() or ():
                        if name == "request_id":
                            arrived.append((value.decode(), m.topic() == REJECTED))
                            break
                with self.changed:
                    for request_id, rejected in arrived:
                        self.seen.setdefault(request_id, (rejected, now))
                    self.changed.notify_all()
        except BaseException as error:  # noqa: BLE001 — surfaced by wait()
            self.error = error
            self._ready.set()
        finally:
            consumer.close()

    def wait(self, ids: list[str], timeout: float, check=lambda: None, progress=None) -> float:
        """Wait until every id has an outcome; -> the monotonic time the last one arrived."""
        deadline = time.monotonic() + timeout
        pending = set(ids)
        last_report = time.monotonic()
        while True:
            with self.changed:
                pending = {i for i in pending if i not in self.seen}
                if not pending:
                    return max(self.seen[i][1] for i in ids)
                self.changed.wait(0.2)
            if self.error:
                raise RuntimeError(f"outcome consumer failed: {self.error!r}")
            check()
            now = time.monotonic()
            if progress and now - last_report > 10:
                progress(len(ids) - len(pending), len(ids))
                last_report = now
            if now > deadline:
                raise TimeoutError(f"{len(pending)}/{len(ids)} outcomes missing after {timeout:.0f} s")

    def rejected(self, ids: list[str]) -> list[str]:
        with self.lock:
            return [i for i in ids if self.seen.get(i, (False, 0))[0]]


# ---------------------------------------------------------------------- requests


def produce(producer: Producer, records: list[tuple[bytes, bytes]], timeout: float = 300.0) -> None:
    for key, value in records:
        produce_one(producer, REQUESTS, value, key)
    remaining = producer.flush(timeout)
    if remaining:
        raise TimeoutError(f"{remaining} request records not delivered after {timeout} s")


def funding_transactions(run: str, accounts: int, postings: int, ledgers: list[str],
                         first: int = 0) -> list[Request]:
    """Transactions funding accounts [first, accounts) from `world`, `postings` at a time."""
    out = []
    for i, start in enumerate(range(first, accounts, postings), start=first // postings):
        ledger = ledgers[i % len(ledgers)]
        out.append(Request(
            f"{run}-fund-{i:07d}", ledger,
            CreateTransaction(postings=tuple(
                Posting("world", f"acct:{n}", 100, ASSET) for n in range(start, min(start + postings, accounts))
            )),
            received_at=now_micros(),
        ))
    return out


def coalesce(requests: list[Request], wire_batch: int) -> list[tuple[bytes, bytes]]:
    """Group requests per ledger into RequestBatch records of up to `wire_batch` requests,
    in arrival order (split further if a record would exceed the record size bound)."""
    pending: dict[str, list[Request]] = {}
    records: list[tuple[bytes, bytes]] = []

    def flush(batch: list[Request]) -> None:
        value = codecs.encode_requests(batch)
        if len(value) > record_bytes_max and len(batch) > 1:
            half = len(batch) // 2
            flush(batch[:half])
            flush(batch[half:])
            return
        records.append((batch[0].ledger.encode(), value))

    for request in requests:
        batch = pending.setdefault(request.ledger, [])
        batch.append(request)
        if len(batch) >= wire_batch:
            flush(batch)
            pending[request.ledger] = []
    for batch in pending.values():
        if batch:
            flush(batch)
    return records


# ---------------------------------------------------------------------- the worker


class WorkerLog:
    """The worker's log file from a given offset: recovery lines with their arrival times."""

    def __init__(self, path: Path, started: float) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.started = started
        self.ready: dict[int, tuple[int, float, float]] = {}  # partition -> (replayed, s logged, seen at)
        self.timeline: list[tuple[float, str]] = []
        self._buffer = b""

    NOTABLE = re.compile(r"ready: replayed|\[\^Worker\]: (Starting|Ready)|Recovery\]: Starting|Elected|"
                         r"Revoking previously|Executing _on_partitions_assigned")

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        self.offset += len(data)
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        seen_at = round(time.monotonic() - self.started, 2)
        for raw in lines:
            line = raw.decode(errors="replace")
            m = READY.search(line)
            if m:
                self.ready[int(m.group(1))] = (int(m.group(2)), float(m.group(3)), seen_at)
            if self.NOTABLE.search(line) and len(self.timeline) < 60:
                self.timeline.append((seen_at, line.strip()[-160:]))

    @property
    def replayed(self) -> int:
        return sum(r[0] for r in self.ready.values())


def rss_mb(stack: Stack) -> float | None:
    return peak_rss_mb(stack.worker_pid) if stack.worker_pid else None


def kill9(stack: Stack) -> None:
    proc = stack.worker
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)  # this worker's pid only, never a pattern
        proc.wait(30)
    stack.worker = None


def graceful_stop(stack: Stack) -> None:
    stop_process(stack.worker, 60)
    stack.worker = None


def back_to_processing(stack: Stack, outcomes: Outcomes, producer: Producer, ledgers: list[str],
                       run: str, label: str, timeout: float) -> dict:
    """Start the worker, produce one probe transaction per ledger at once, and wait until
    every probe has its outcome. Timings are from the worker process's start."""
    worker_log = WorkerLog(stack.worker_log, time.monotonic())
    started = time.monotonic()
    stack._start_worker()
    spawned = time.monotonic() - started
    probes = [
        Request(f"{run}-{label}-probe-{i:02d}", ledger,
                CreateTransaction(postings=(Posting("world", f"probe:{label}", 1, ASSET),)),
                received_at=now_micros())
        for i, ledger in enumerate(ledgers)
    ]
    produce(producer, coalesce(probes, 1))

    def check() -> None:
        worker_log.poll()
        stack.check_worker()

    ids = [p.request_id for p in probes]
    first_probe = None
    deadline = time.monotonic() + timeout
    while first_probe is None:
        with outcomes.lock:
            arrived = [outcomes.seen[i][1] for i in ids if i in outcomes.seen]
        if arrived:
            first_probe = min(arrived)
            break
        check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: no probe answered after {timeout:.0f} s:\n{stack.worker_log_tail()}")
        time.sleep(0.02)
    last_probe = outcomes.wait(ids, max(1.0, deadline - time.monotonic()), check)
    # the last "ready" lines may still be in the pipe
    for _ in range(20):
        worker_log.poll()
        if len(worker_log.ready) >= stack.partitions:
            break
        time.sleep(0.1)
    rejected = outcomes.rejected(ids)
    if rejected:
        raise RuntimeError(f"{label}: probes rejected: {rejected}")
    ready_seen = [r[2] for r in worker_log.ready.values()]
    result = {
        "to_processing_s": round(last_probe - started, 2),
        "first_probe_s": round(first_probe - started, 2),
        "spawn_s": round(spawned, 3),
        "partitions_ready": len(worker_log.ready),
        "first_partition_ready_seen_s": min(ready_seen) if ready_seen else None,
        "last_partition_ready_seen_s": max(ready_seen) if ready_seen else None,
        "recovery_logged_s_max": max((r[1] for r in worker_log.ready.values()), default=None),
        "recovery_logged_s_sum": round(sum(r[1] for r in worker_log.ready.values()), 2),
        "replayed_records": worker_log.replayed,
        "replayed_by_partition": {p: r[0] for p, r in sorted(worker_log.ready.items())},
        "peak_rss_mb": rss_mb(stack),
        "cpu_s": round(cpu_seconds(stack.worker_pid) or 0, 1),
    }
    metrics = stack.metrics()
    recovered = {k: v for k, v in metrics.items() if k.startswith("streamledger_recovered_records")}
    result["metrics_recovered_records"] = int(sum(recovered.values())) if recovered else None
    if not worker_log.ready and recovered:  # the log format changed: the metric says the same
        result["replayed_records"] = result["metrics_recovered_records"]
    log(f"{label}: back to processing {result['to_processing_s']} s after process start "
        f"(first probe {result['first_probe_s']} s); replayed {result['replayed_records']} records "
        f"(recovery logged {result['recovery_logged_s_sum']} s in total); peak RSS {result['peak_rss_mb']} MiB")
    for at, line in worker_log.timeline:
        log(f"    +{at:7.2f}s  {line}")
    return result


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--ledgers", type=int, default=16)
    parser.add_argument("--postings", type=int, default=postings_per_transaction_max,
                        help="postings per funding transaction (<= %(default)s)")
    parser.add_argument("--wire-batch", type=int, default=8, help="transactions per request record")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--session-timeout-ms", type=int, default=None,
                        help="the worker's consumer session timeout (default: the worker's own)")
    parser.add_argument("--no-stale", action="store_true", help="skip the stale-store restart")
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound on each wait, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, stores)")
    parser.add_argument("--quick", action="store_true", help="50,000 accounts")
    args = parser.parse_args(argv)
    if args.quick:
        args.accounts = 50_000
    if not 1 <= args.postings <= postings_per_transaction_max:
        parser.error(f"--postings must be 1..{postings_per_transaction_max}")
    if args.session_timeout_ms:
        os.environ["STREAMLEDGER_SESSION_TIMEOUT_MS"] = str(args.session_timeout_ms)

    params = {
        "accounts": args.accounts, "ledgers": args.ledgers, "postings_per_transaction": args.postings,
        "wire_batch": args.wire_batch, "partitions": args.partitions,
        "session_timeout_ms": os.environ.get("STREAMLEDGER_SESSION_TIMEOUT_MS", "(worker default)"),
        "block_cache_mb": os.environ.get("STREAMLEDGER_ROCKSDB_BLOCK_CACHE_MB", "(worker default)"),
        "write_buffer_mb": os.environ.get("STREAMLEDGER_ROCKSDB_WRITE_BUFFER_MB", "(worker default)"),
        "stale": not args.no_stale,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    print("parameters: " + json.dumps(params), flush=True)

    run = uuid.uuid4().hex[:8]
    ledgers = [f"rec-{run}-{i:02d}" for i in range(args.ledgers)]
    result: dict = {"accounts": args.accounts, "ledgers": args.ledgers}
    bench_started = time.monotonic()
    stack = Stack(args.partitions, log=log)
    failed = True
    outcomes = None
    try:
        stack.start()
        outcomes = Outcomes(stack.bootstrap, args.partitions).start()
        producer = Producer(producer_config(stack.bootstrap, **{
            "linger.ms": 5, "compression.type": "lz4", "message.max.bytes": 1_000_000}))

        # -- 1. load -------------------------------------------------------------------
        creates = [Request(f"{run}-create-{i:02d}", ledger, CreateLedger(), received_at=now_micros())
                   for i, ledger in enumerate(ledgers)]
        transactions = funding_transactions(run, args.accounts, args.postings, ledgers)
        half = len(transactions) // 2
        log(f"load: {len(ledgers)} ledgers, {len(transactions)} transactions of up to {args.postings} postings")
        t0 = time.monotonic()
        produce(producer, coalesce(creates, 1))
        outcomes.wait([r.request_id for r in creates], args.timeout, stack.check_worker)
        stale_dir = None
        phases = [transactions] if args.no_stale else [transactions[:half], transactions[half:]]
        for n, part in enumerate(phases):
            produce(producer, coalesce(part, args.wire_batch))
            outcomes.wait([r.request_id for r in part], args.timeout, stack.check_worker,
                          progress=lambda done, total: log(f"  load: {done}/{total} committed"))
            if n == 0 and len(phases) > 1:
                # A copy of the store at half the load (worker stopped: RocksDB consistent),
                # for the stale-store restart; the worker then carries on.
                result["peak_rss_mb_load_half"] = rss_mb(stack)
                graceful_stop(stack)
                stale_dir = stack.tmp / "worker-data-half"
                shutil.copytree(stack.tmp / "worker-data", stale_dir)
                stack._start_worker()
        result["load_s"] = round(time.monotonic() - t0, 2)
        rejected = outcomes.rejected([r.request_id for r in creates + transactions])
        if rejected:
            raise RuntimeError(f"load: {len(rejected)} requests rejected, e.g. {rejected[:3]}")
        result["log_entries"] = len(creates) + len(transactions)
        result["peak_rss_mb_load"] = rss_mb(stack)
        result["load_cpu_s"] = round(cpu_seconds(stack.worker_pid) or 0, 1)
        size = sum(f.stat().st_size for f in (stack.tmp / "worker-data").rglob("*") if f.is_file())
        result["store_mb"] = round(size / 2**20, 1)
        log(f"load: {result['log_entries']} log entries committed in {result['load_s']} s; "
            f"worker peak RSS {result['peak_rss_mb_load']} MiB; store {result['store_mb']} MiB")

        # -- 2. restart after kill -9 --------------------------------------------------
        kill9(stack)
        restart = back_to_processing(stack, outcomes, producer, ledgers, run, "restart", args.timeout)
        result["restart_to_processing_s"] = restart["to_processing_s"]
        result["restart_replayed_records"] = restart["replayed_records"]
        result["peak_rss_mb_restart"] = restart["peak_rss_mb"]
        result["log_entries"] += len(ledgers)

        graceful_stop(stack)
        graceful = back_to_processing(stack, outcomes, producer, ledgers, run, "graceful", args.timeout)
        result["graceful_restart_to_processing_s"] = graceful["to_processing_s"]
        result["graceful_restart_replayed_records"] = graceful["replayed_records"]
        result["log_entries"] += len(ledgers)

        stale = None
        if stale_dir is not None:
            kill9(stack)
            shutil.rmtree(stack.tmp / "worker-data")
            stale_dir.rename(stack.tmp / "worker-data")
            stale = back_to_processing(stack, outcomes, producer, ledgers, run, "stale", args.timeout)
            result["stale_restart_to_processing_s"] = stale["to_processing_s"]
            result["stale_replayed_records"] = stale["replayed_records"]
            result["stale_recovery_logged_s_max"] = stale["recovery_logged_s_max"]
            result["peak_rss_mb_stale"] = stale["peak_rss_mb"]
            result["log_entries"] += len(ledgers)

        # -- 3. rebuild from the log alone ---------------------------------------------
        graceful_stop(stack)
        shutil.rmtree(stack.tmp / "worker-data")
        rebuild = back_to_processing(stack, outcomes, producer, ledgers, run, "rebuild", args.timeout)
        result["rebuild_to_processing_s"] = rebuild["to_processing_s"]
        result["rebuild_replayed_records"] = rebuild["replayed_records"]
        result["rebuild_recovery_logged_s_max"] = rebuild["recovery_logged_s_max"]
        result["peak_rss_mb_rebuild"] = rebuild["peak_rss_mb"]
        result["log_entries"] += len(ledgers)

        result["details"] = {"restart": restart, "graceful": graceful, "stale": stale, "rebuild": rebuild}
        result["bench_s"] = round(time.monotonic() - bench_started, 1)
        failed = False
    finally:
        if outcomes is not None:
            outcomes.stop()
        if failed:
            log("worker log tail:\n" + stack.worker_log_tail(40))
        stack.close(keep_logs=args.keep or failed)
        if args.keep or failed:
            log(f"kept {stack.tmp}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
