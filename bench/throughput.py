"""How many transfers per second does one worker apply, against what ceiling, at what latency?

    .venv/bin/python bench/throughput.py            # full run (600k requests per phase)
    .venv/bin/python bench/throughput.py --quick    # smoke check, well under a minute

Starts its own stack (a LocalKafka in a temp dir, the topics, ONE `streamledger worker`
subprocess with a fresh data dir, a free port and a unique app id) unless
KAFKA_BOOTSTRAP_SERVERS is set, in which case that cluster is used (a worker is still
spawned with a unique app id unless --external-worker; note that a new app id reads
ledger.requests from the beginning). Ledger names and request ids are unique per run.
Worker tuning comes from the environment as usual (STREAMLEDGER_BATCH_MAX, ..._LINGER_MS).

Phases, in one run (ratios against the same run's baseline are what to compare on a
noisy shared machine; absolutes move with the neighbours):

0. warm-up  — batches of --warmup-requests (as many as --requests) uniform transfers on
   ledgers of their own, through the worker, not measured, until --warmup-seconds (30)
   have passed: every measured phase then runs on a broker that has already carried that
   load (its JIT compiler busy for a third to half a core in its first minute, see the
   latency phase); the uniform phases still start from fresh ledgers and accounts. Three
   alternated pairs (2026-11-23): uniform 43.7 / 42.7 / 41.3k tx/s without a warm-up,
   45.8 / 44.6 / 53.0k with one batch. One batch (~3 s) was not enough: in a run with it,
   the broker's CPU per request went 13.6 → 10.3 → 7.2 µs over the three pairs' uniform
   phases and 13.3 → 10.0 → 7.9 over their baselines, and the pairs' ratios 0.77 → 0.56
   → 0.45 (a baseline is the more sensitive to the broker's cost).
1. uniform  — N single-posting transfers over --accounts accounts in each of --ledgers
   ledgers (ledger and accounts uniform at random). A fraction --world-fraction (0.9) are
   funded from `world` (amount 100, always valid); the rest move 1..50 between two user
   accounts and are rejected INSUFFICIENT_FUND when the source has not been funded enough
   yet (reported as `rejected_uniform`, the first pair's). Requests are coalesced per
   ledger into RequestBatch records of up to --wire-batch requests, as the gateway does,
   pre-encoded before the clock starts. Clock: first produce → last outcome (ledger.committed + ledger.rejected,
   read_committed, matched by the `request_id` header, duplicates counted once).
2. hot      — N transfers `world` → `hot` on ONE ledger (so one partition, one account, one
   hash chain: the worst case for a serial-per-partition design). Same batching and clock.
3. baseline — bench/_passthrough.py, a no-op confluent-kafka process that consumes the
   same wire-batch records (a copy of phase 1's, produced the same way to a bench topic)
   and for each input record transactionally produces one record per request in it, whose
   value is one of the worker's own outcome values sampled in phase 1 (same sizes, same lz4
   compressibility; plus a request_id header of the same length), in rounds of at most
   STREAMLEDGER_BATCH_MAX requests with one transaction each, as the worker commits
   (begin → produce → flush → send_offsets_to_transaction → commit). It never decodes a payload
   (the request count comes from an `n` header on the copy); a quarter of the records go
   through it first, unmeasured, as the worker's topics are warm. So it moves the same bytes in
   and out and pays the same transaction protocol as the worker, and
   `baseline_passthrough_msgs_per_s` counts requests (outputs) per second, measured with
   the same clock as phase 1: `ratio_worker_to_baseline` = uniform / baseline is the share
   of the Kafka-only ceiling the worker reaches.
   Phases 1 and 3 run in turn --pairs times (3), each uniform phase on ledgers of its own
   and each baseline on topics of its own, before phase 2: the JSON reports the medians
   (uniform, baseline, and the pairs' ratios) and every pair under `pairs`. The host's
   neighbours move the two phases differently: single pairs' ratios went from 0.34 to 0.59
   within an hour at the same code (2026-11-23; 0.33 to 0.79 before the baselines were
   warmed up). Each phase reports the broker's CPU per request too.
4. latency  — --rate requests/s for --latency-warmup-seconds (60, not measured: the
   broker's JIT warms up) then --latency-seconds (measured), each request alone in its wire batch
   (what the gateway's 1 ms linger produces at that rate), producer as the gateway's
   (linger.ms 0, lz4). Latency = outcome arrival − *scheduled* send time (so a producer that
   falls behind schedule shows up in the numbers instead of hiding them).

Phase length. The default, 600,000 requests per phase, is what a steady state needs: the
passthrough gets through a phase several times faster than the worker, and a phase of
100,000 requests (the default until 2026-11-23) lasted it under a second, start-up
included (its first fetches and transactions): in one hour, with the same code, its
median went 97k / 106k / 102k msgs/s over 100k-request phases, 153k / 157k over 300k and
192k / 218k (two pairs) over 600k, while the worker stayed at 59-66k tx/s in all of them,
so the ratio read 0.71 / 0.47 / 0.65, then 0.43 / 0.38, then 0.29. Earlier sessions'
ratios (0.4-0.6) were measured over 100k-request phases and overstate it.

Prints its parameters first and a single JSON object as its last line. No thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition  # noqa: E402

from bench._stack import Stack, cpu_seconds, peak_rss_mb, produce, spawn, stop_process  # noqa: E402
from ledger.commands import CreateLedger, CreateTransaction, Request  # noqa: E402
from ledger.model import Posting  # noqa: E402
from streams import codecs  # noqa: E402
from streams.topics import COMMITTED, REJECTED, REQUESTS, consume_available, producer_config  # noqa: E402

ASSET = "USD"


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- outcomes


class Phase:
    """Outcomes expected by one phase: request ids start with the phase's letter."""

    def __init__(self, name: str, expected: int, *, arrivals: bool = False) -> None:
        self.name = name
        self.expected = expected
        self.seen: set[bytes] = set()
        self.committed = self.rejected = self.duplicates = self.records = 0
        self.value_bytes = 0
        self.first: float | None = None
        self.last: float | None = None
        self.arrivals: dict[bytes, float] | None = {} if arrivals else None
        # The outcome record's timestamp (the worker's produce() call), on the monotonic clock.
        self.produced: dict[bytes, float] = {}
        self.samples: list[bytes] = []  # outcome values, for the baseline's payloads
        self.done = threading.Event()

    def count(self, request_id: bytes | None, rejected: bool, value: bytes | None, now: float,
              produced: float | None = None) -> None:
        self.records += 1
        size = len(value) if value else 0
        if request_id is not None:
            if request_id in self.seen:
                self.duplicates += 1
                return
            self.seen.add(request_id)
            if self.arrivals is not None:
                self.arrivals[request_id] = now
                if produced is not None:
                    self.produced[request_id] = produced
        self.value_bytes += size
        if len(self.samples) < 2000 and value and self.records % 7 == 0:
            self.samples.append(value)
        if rejected:
            self.rejected += 1
        else:
            self.committed += 1
        if self.first is None:
            self.first = now
        self.last = now
        if self.committed + self.rejected >= self.expected:
            self.done.set()

    @property
    def outcomes(self) -> int:
        return self.committed + self.rejected


def _end_offset(consumer: Consumer, topic: str, partition: int, timeout: float = 30.0) -> int:
    """High watermark, retried while a just-created topic has no leader yet."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Outcomes:
    """One consumer thread over ledger.committed, ledger.rejected and the baseline output
    topic, positioned at their end when the run starts; dispatches to the current phases."""

    def __init__(self, bootstrap: str, partitions: int, baseline_outs: list[str]) -> None:
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.baseline_outs = frozenset(baseline_outs)
        self.phases: dict[int, Phase] = {}  # first byte of the request id -> phase
        self.baseline: Phase | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outcomes", daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the outcome consumer was not positioned after {timeout} s")
        if self.error:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)

    def expect(self, letter: str, phase: Phase) -> Phase:
        self.phases[ord(letter)] = phase
        return phase

    def _run(self) -> None:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"bench-outcomes-{os.getpid()}-{time.time_ns()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            # A long poll: the broker answers as soon as an outcome is readable (for
            # read_committed, when the transaction's marker lands), so waiting longer costs no
            # latency, while a 5 ms poll cost the broker ~200 idle fetches a second per consumer.
            "fetch.wait.max.ms": 500,
            "socket.nagle.disable": True,
        })
        try:
            assignment = []
            for topic in (COMMITTED, REJECTED, *sorted(self.baseline_outs)):
                for p in range(self.partitions):
                    assignment.append(TopicPartition(topic, p, _end_offset(consumer, topic, p)))
            consumer.assign(assignment)
            self._ready.set()
            phases, rejected_topic, baseline_topics = self.phases, REJECTED, self.baseline_outs
            while not self._stop.is_set():
                messages = consume_available(consumer, 10_000, 0.05)
                if not messages:
                    continue
                now = time.monotonic()
                wall_to_mono = now - time.time()
                for m in messages:
                    if m.error() is not None:
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            log("outcome consumer:", m.error())
                        continue
                    topic = m.topic()
                    if topic in baseline_topics:
                        if self.baseline is not None:
                            self.baseline.count(None, False, m.value(), now)
                        continue
                    request_id = None
                    for name, value in m.headers() or ():
                        if name == "request_id":
                            request_id = value
                            break
                    if not request_id:
                        continue
                    phase = phases.get(request_id[0])
                    if phase is not None:
                        produced = m.timestamp()[1] / 1000 + wall_to_mono if phase.arrivals is not None else None
                        phase.count(request_id, topic == rejected_topic, m.value(), now, produced)
        except BaseException as error:  # noqa: BLE001 — surfaced by wait()
            self.error = error
            self._ready.set()
        finally:
            consumer.close()

    def wait(self, phase: Phase, timeout: float, stack: Stack) -> None:
        deadline = time.monotonic() + timeout
        while not phase.done.wait(0.5):
            if self.error:
                raise RuntimeError(f"outcome consumer failed: {self.error!r}")
            stack.check_worker()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"phase {phase.name}: {phase.outcomes}/{phase.expected} outcomes after {timeout:.0f} s"
                )


# ---------------------------------------------------------------------- requests


def now_micros() -> int:
    return time.time_ns() // 1000


def transfer(request_id: str, ledger: str, source: str, destination: str, amount: int) -> Request:
    return Request(
        request_id, ledger,
        CreateTransaction(postings=(Posting(source, destination, amount, ASSET),)),
        received_at=now_micros(),
    )


def coalesce(requests: list[Request], wire_batch: int) -> list[tuple[bytes, bytes, int]]:
    """Group requests per ledger into (key, RequestBatch value, request count) records in
    arrival order, as the gateway's per-ledger coalescing does (a ledger's batch is sent when
    full; leftovers at the end)."""
    pending: dict[str, list[Request]] = {}
    records = []
    for request in requests:
        batch = pending.setdefault(request.ledger, [])
        batch.append(request)
        if len(batch) >= wire_batch:
            records.append((request.ledger.encode(), codecs.encode_requests(batch), len(batch)))
            pending[request.ledger] = []
    for ledger, batch in pending.items():
        if batch:
            records.append((ledger.encode(), codecs.encode_requests(batch), len(batch)))
    return records


def uniform_requests(prefix: str, n: int, ledgers: list[str], accounts: int,
                     world_fraction: float, rng: random.Random) -> list[Request]:
    out = []
    for i in range(n):
        ledger = ledgers[rng.randrange(len(ledgers))]
        destination = rng.randrange(accounts)
        if rng.random() < world_fraction:
            source, amount = "world", 100
        else:
            src = rng.randrange(accounts - 1)
            src += src >= destination  # never the destination itself
            source, amount = f"users:{src:05d}", rng.randint(1, 50)
        out.append(transfer(f"{prefix}{i:08d}", ledger, source, f"users:{destination:05d}", amount))
    return out


def produce_records(producer: Producer, topic: str, records, *, with_count_header: bool = False,
                    timeout: float = 120.0) -> float:
    """Produce (key, value, n) records; returns the monotonic time of the first produce."""
    started = None
    for key, value, n in records:
        headers = [("n", str(n).encode())] if with_count_header else None
        if started is None:
            started = time.monotonic()
        produce(producer, topic, value, key, headers=headers)
    remaining = producer.flush(timeout)
    if remaining:
        raise TimeoutError(f"{remaining} records to {topic} not delivered after {timeout} s")
    return started if started is not None else time.monotonic()


# ---------------------------------------------------------------------- phases


class BrokerCpu:
    """The broker's CPU between two points of a phase (when the bench started it): the
    other half of what a request costs on two shared cores."""

    def __init__(self, stack: Stack) -> None:
        self.pid = stack.broker_pid
        self.cpu0 = cpu_seconds(self.pid) if self.pid else None

    def finish(self, wall: float, expected: int) -> dict:
        cpu = cpu_seconds(self.pid) if self.pid and self.cpu0 is not None else None
        if cpu is None:
            return {}
        return {"broker_cpu_util": round((cpu - self.cpu0) / max(wall, 1e-9), 2),
                "broker_cpu_us_per_request": round((cpu - self.cpu0) / expected * 1e6, 1)}


class WorkerProbe:
    """Worker CPU and batch metrics between two points of a run."""

    KEYS = ("streamledger_batch_requests_sum", "streamledger_batch_requests_count",
            "streamledger_batch_seconds_sum", "streamledger_apply_seconds_sum", "streamledger_commit_seconds_sum")

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.cpu0 = cpu_seconds(stack.worker_pid) if stack.worker_pid else None
        self.broker0 = BrokerCpu(stack)
        self.m0 = stack.metrics()
        self.t0 = time.monotonic()

    def finish(self, wall: float, expected: int) -> dict:
        out: dict = {}
        pid = self.stack.worker_pid
        if pid and self.cpu0 is not None:
            cpu = cpu_seconds(pid)
            if cpu is not None:
                out["worker_cpu_s"] = round(cpu - self.cpu0, 2)
                out["worker_cpu_util"] = round((cpu - self.cpu0) / max(wall, 1e-9), 2)
        out.update(self.broker0.finish(wall, expected))
        # The worker observes a batch after its RocksDB write, i.e. just after its outcomes
        # are visible: wait (briefly) until the histogram covers the phase's requests.
        key = "streamledger_batch_requests_sum"
        deadline = time.monotonic() + 5
        while True:
            m1 = self.stack.metrics()
            if not m1 or m1.get(key, 0) - (self.m0 or {}).get(key, 0) >= expected:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if m1 and self.m0 is not None:
            d = {k: m1.get(k, 0.0) - self.m0.get(k, 0.0) for k in self.KEYS}
            gc = {}
            for name in m1:
                if name.startswith("streamledger_gc_pause_seconds_"):
                    kind = name[len("streamledger_gc_pause_seconds_"):]  # sum{generation="2"}, count{...}
                    stat, _, labels = kind.partition("{")
                    if stat in ("sum", "count"):
                        generation = labels.split('"')[1] if '"' in labels else "?"
                        gc.setdefault(f"gen{generation}", {})[stat] = m1[name] - self.m0.get(name, 0.0)
            if gc:  # Python's collector during the phase: pauses and seconds per generation
                out["worker_gc"] = {g: {"pauses": int(v.get("count", 0)), "ms": round(v.get("sum", 0) * 1000, 1)}
                                    for g, v in sorted(gc.items())}
            batches = d["streamledger_batch_requests_count"]
            if batches:
                out["worker_batches"] = int(batches)
                out["worker_requests_per_batch"] = round(d["streamledger_batch_requests_sum"] / batches, 1)
                out["worker_process_s"] = round(d["streamledger_batch_seconds_sum"], 2)
                out["worker_process_share_of_wall"] = round(d["streamledger_batch_seconds_sum"] / max(wall, 1e-9), 2)
                # Per round: applying (Python) and the Kafka transaction (mostly waiting).
                out["worker_round_ms"] = {
                    "all": round(d["streamledger_batch_seconds_sum"] / batches * 1000, 2),
                    "apply": round(d["streamledger_apply_seconds_sum"] / batches * 1000, 2),
                    "transaction": round(d["streamledger_commit_seconds_sum"] / batches * 1000, 2),
                }
        return out


def throughput_phase(name: str, letter: str, records, expected: int, outcomes: Outcomes,
                     stack: Stack, producer: Producer, timeout: float, profile_path: Path | None = None) -> dict:
    phase = outcomes.expect(letter, Phase(name, expected))
    probe = WorkerProbe(stack)
    profiler = None
    if profile_path is not None and stack.worker_pid:
        from bench._pyspy import Profiler

        profiler = Profiler(stack.worker_pid, profile_path)
        time.sleep(1.0)  # let py-spy attach before the clock starts
    try:
        started = produce_records(producer, REQUESTS, records)
        produced = time.monotonic()
        outcomes.wait(phase, timeout, stack)
    finally:
        if profiler is not None:
            profiler.stop()
    wall = phase.last - started
    result = {
        "tx_per_s": round(expected / wall, 1),
        "wall_s": round(wall, 3),
        "produce_s": round(produced - started, 3),
        "committed": phase.committed,
        "rejected": phase.rejected,
        "duplicate_outcomes": phase.duplicates,
        "records_in": len(records),
        "mean_outcome_bytes": round(phase.value_bytes / max(phase.outcomes, 1), 1),
        "_samples": phase.samples,
    }
    result.update(probe.finish(wall, expected))
    log(f"{name}: {expected} requests in {wall:.2f} s = {result['tx_per_s']:.0f} tx/s "
        f"({phase.committed} committed, {phase.rejected} rejected) {probe_summary(result)}")
    return result


def probe_summary(r: dict) -> str:
    keys = ("worker_cpu_util", "worker_requests_per_batch", "worker_process_share_of_wall",
            "broker_cpu_us_per_request")
    return " ".join(f"{k}={r[k]}" for k in keys if k in r)


def baseline_phase(args, stack: Stack, outcomes: Outcomes, records, expected: int,
                   values: list[bytes], header_size: int, topics: tuple[str, str], producer: Producer) -> dict:
    in_topic, out_topic = topics
    # The outputs are real outcome values sampled in the uniform phase (same sizes, same
    # lz4 compressibility as the worker's), cycled through.
    values_file = stack.tmp / "baseline-values.bin"
    values_file.write_bytes(b"".join(len(v).to_bytes(4, "big") + v for v in values))
    out_size = round(sum(map(len, values)) / len(values), 1)
    # Its topics are new, the worker's are not (the warm-up ran through them): a quarter of
    # the records first, not measured, so the first transactions' costs of new partitions
    # (leaders looked up, partitions added, segments created) are not in the measure.
    # Without it the baseline of 100,000-request phases came out below that of 300,000.
    warm_records = records[:max(1, len(records) // 4)]
    warm = Phase("baseline warm-up", sum(n for _key, _value, n in warm_records))
    phase = Phase("baseline", expected)
    outcomes.baseline = warm
    cmd = [
        sys.executable, str(REPO_ROOT / "bench" / "_passthrough.py"),
        "--bootstrap", stack.bootstrap, "--in-topic", in_topic, "--out-topic", out_topic,
        "--partitions", str(args.partitions), "--group", f"bench-passthrough-{stack.run_id}",
        "--expected", str(len(warm_records) + len(records)), "--values-file", str(values_file),
        "--header-size", str(header_size),
        "--batch-max", os.environ.get("STREAMLEDGER_BATCH_MAX", "4000"),
        "--linger-ms", os.environ.get("STREAMLEDGER_BATCH_LINGER_MS", "0"),
        "--timeout", str(args.phase_timeout),
    ]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=_pdeathsig_hook())
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in child.stdout:  # type: ignore[union-attr]
            lines.append(line.strip())
            if line.strip() == "READY":
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.2):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"passthrough did not start: {child.stderr.read() if child.poll() is not None else 'timeout'}")
        produce_records(producer, in_topic, warm_records, with_count_header=True)
        deadline = time.monotonic() + args.phase_timeout
        while not warm.done.wait(0.2):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"baseline warm-up: {warm.outcomes}/{warm.expected} outputs "
                                   f"({'exited' if child.poll() is not None else 'timeout'})")
        outcomes.baseline = phase  # every output of the warm-up is in: what follows is measured
        cpu0 = cpu_seconds(child.pid)
        broker = BrokerCpu(stack)
        started = produce_records(producer, in_topic, records, with_count_header=True)
        deadline = time.monotonic() + args.phase_timeout
        while not phase.done.wait(0.5):
            if child.poll() is not None and not phase.done.is_set():
                phase.done.wait(2)
                if phase.done.is_set():
                    break
                raise RuntimeError(f"passthrough exited early ({child.returncode}): {child.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"baseline: {phase.outcomes}/{expected} after {args.phase_timeout} s")
        wall = phase.last - started
        cpu1 = cpu_seconds(child.pid)
        broker_cpu = broker.finish(wall, expected)
        child.wait(30)
        reader.join(5)
    finally:
        stop_process(child, 10)
    stats = {}
    for line in lines:
        if line.startswith("{"):
            stats = json.loads(line)
    result = {
        "msgs_per_s": round(expected / wall, 1),
        "wall_s": round(wall, 3),
        "out_value_bytes": out_size,
        "transactions_incl_warmup": stats.get("transactions"),
    }
    if cpu0 is not None and cpu1 is not None:
        result["cpu_util"] = round((cpu1 - cpu0) / wall, 2)
        result["cpu_us_per_message"] = round((cpu1 - cpu0) / expected * 1e6, 1)
    result.update(broker_cpu)
    log(f"baseline: {expected} requests in {wall:.2f} s = {result['msgs_per_s']:.0f} msgs/s "
        f"({stats.get('transactions')} transactions, a warm-up's included) "
        f"cpu_us_per_message={result.get('cpu_us_per_message')} "
        f"broker_cpu_us_per_request={result.get('broker_cpu_us_per_request')}")
    return result


def _pdeathsig_hook():
    from bench._stack import _pdeathsig

    return _pdeathsig if sys.platform == "linux" else None


def latency_phase(args, stack: Stack, outcomes: Outcomes, ledgers: list[str], prefix: str,
                  rng: random.Random, profile_path: Path | None = None) -> dict:
    n = int(args.rate * args.latency_seconds)
    # First the warm-up, at the same rate and without a gap: a freshly started broker JIT-
    # compiles for its first minute or so under load (measured: its C2 compiler thread at
    # 35-57% of a core), and latency falls with it (p50/p99 in 10 s windows of one run:
    # 76/221, 46/96, 39/109, 31/70, 27/80, 24/48 ms). A production broker is warm.
    warm = int(args.rate * args.latency_warmup_seconds)
    records = []
    for i in range(warm + n):
        ledger = ledgers[rng.randrange(len(ledgers))]
        request = transfer(f"{prefix}{i:08d}", ledger, "world", f"users:{rng.randrange(args.accounts):05d}", 100)
        records.append((request.request_id.encode(), ledger.encode(), codecs.encode_requests([request])))
    phase = outcomes.expect(prefix[0], Phase("latency", warm + n, arrivals=True))
    # The gateway's producer settings: each record goes out as soon as it is produced.
    producer = Producer(producer_config(stack.bootstrap, **{"linger.ms": 0, "compression.type": "lz4"}))
    profiler = None
    if profile_path is not None and stack.worker_pid:
        from bench._pyspy import Profiler

        profiler = Profiler(stack.worker_pid, profile_path)
        time.sleep(1.0)
    if warm:
        log(f"latency: warming up for {args.latency_warmup_seconds:.0f} s at {args.rate:.0f} tx/s, "
            f"then measuring for {args.latency_seconds:.0f} s")
    probe = WorkerProbe(stack) if not warm else None
    scheduled: list[float] = []
    interval = 1.0 / args.rate
    start = time.monotonic() + 0.05
    measured_start = start + warm * interval
    behind_max = 0.0
    for i, (_rid, key, value) in enumerate(records):
        target = start + i * interval
        if i == warm and probe is None:
            probe = WorkerProbe(stack)
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif i >= warm:
            behind_max = max(behind_max, -delay)
        produce(producer, REQUESTS, value, key, backoff=0.01)
        scheduled.append(target)
    sent_done = time.monotonic()
    producer.flush(30)
    try:
        outcomes.wait(phase, max(30.0, (args.latency_seconds + args.latency_warmup_seconds) * 3), stack)
    except TimeoutError as error:
        log(f"latency: {error}")
    finally:
        if profiler is not None:
            profiler.stop()
    wall = (phase.last or sent_done) - measured_start
    assert phase.arrivals is not None and probe is not None
    warmup = sorted((phase.arrivals[rid] - t) * 1000 for (rid, _k, _v), t in zip(records[:warm], scheduled)
                    if rid in phase.arrivals)
    records, scheduled = records[warm:], scheduled[warm:]
    latencies = sorted(
        (phase.arrivals[rid] - t) * 1000 for (rid, _k, _v), t in zip(records, scheduled)
        if rid in phase.arrivals
    )

    # Split at the outcome's record timestamp (the worker's produce() call, ms resolution):
    # before = on the wire, waiting for a round, applying; after = the round's transaction
    # (flush, offsets, commit) and the consumer seeing it.
    to_produce = sorted((phase.produced[rid] - t) * 1000 for (rid, _k, _v), t in zip(records, scheduled)
                        if rid in phase.produced)
    to_visible = sorted((phase.arrivals[rid] - phase.produced[rid]) * 1000 for rid, _k, _v in records
                        if rid in phase.produced)

    def pct(q: float, values: list[float] = latencies) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else None

    result = {
        "offered_rate": args.rate,
        "achieved_send_rate": round(n / max(sent_done - measured_start, 1e-9), 1),
        "warmup": {"seconds": args.latency_warmup_seconds, "requests": warm,
                   "p50_ms": pct(0.5, warmup), "p99_ms": pct(0.99, warmup)},
        "sender_max_behind_ms": round(behind_max * 1000, 2),
        "requests": n,
        "outcomes": len(latencies),
        "missing": n - len(latencies),
        "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "until_produced_ms": {"p50": pct(0.5, to_produce), "p99": pct(0.99, to_produce)},
        "produced_to_visible_ms": {"p50": pct(0.5, to_visible), "p99": pct(0.99, to_visible)},
    }
    result.update(probe.finish(wall, n))
    log(f"latency: {result}")
    return result


# ---------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=None,
                   help="requests per throughput phase (600000: see 'Phase length' in the module doc)")
    p.add_argument("--wire-batch", type=int, default=500, help="requests per RequestBatch record (500)")
    p.add_argument("--rate", type=float, default=1000.0, help="offered rate of the latency phase, tx/s (1000)")
    p.add_argument("--latency-seconds", type=float, default=None, help="duration of the latency phase (10)")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="uniform requests on ledgers of their own before the measured phases (as "
                        "many as --requests; --quick 0)")
    p.add_argument("--warmup-seconds", type=float, default=None,
                   help="warm-up batches go on until this long has passed (30; --quick 0)")
    p.add_argument("--latency-warmup-seconds", type=float, default=None,
                   help="requests at the same rate before the latency phase is measured (60; --quick 0)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-hot", action="store_true")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--pairs", type=int, default=None,
                   help="uniform + baseline phases run this many times in turn, each uniform on "
                        "ledgers of its own; the medians are reported (3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="5000 requests, 3 s of latency: a smoke check")
    p.add_argument("--ledgers", type=int, default=16)
    p.add_argument("--accounts", type=int, default=10_000, help="accounts per ledger (10000)")
    p.add_argument("--world-fraction", type=float, default=0.9,
                   help="share of uniform transfers funded from world (the rest may be rejected)")
    p.add_argument("--partitions", type=int, default=int(os.environ.get("STREAMLEDGER_PARTITIONS", "8")))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--phase-timeout", type=float, default=900.0, help="bound of every phase's wait, s")
    p.add_argument("--external-worker", action="store_true",
                   help="with KAFKA_BOOTSTRAP_SERVERS: do not spawn a worker, one is running")
    p.add_argument("--py-spy", metavar="DIR", type=Path, default=None,
                   help="sample the worker with py-spy (idle included) during the uniform and "
                        "latency phases: raw collapsed stacks to DIR/{uniform,latency}.txt, "
                        "top functions per thread on stderr. Perturbs the numbers.")
    args = p.parse_args(argv)
    if args.requests is None:
        args.requests = 5_000 if args.quick else 600_000
    if args.pairs is None:
        args.pairs = 1 if args.quick else 3
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    if args.warmup_requests is None:
        args.warmup_requests = 0 if args.quick else args.requests
    if args.warmup_seconds is None:
        args.warmup_seconds = 0.0 if args.quick else 30.0
    if args.latency_seconds is None:
        args.latency_seconds = 3.0 if args.quick else 10.0
    if args.latency_warmup_seconds is None:
        args.latency_warmup_seconds = 0.0 if args.quick else 60.0
    if args.external_worker and "KAFKA_BOOTSTRAP_SERVERS" not in os.environ:
        p.error("--external-worker needs KAFKA_BOOTSTRAP_SERVERS")
    return args


def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=-1) for t in names],
                                  operation_timeout=30, request_timeout=30)
    for fut in futures.values():
        fut.result(60)
    deadline = time.monotonic() + 30
    while not all(t in admin.list_topics(timeout=10).topics for t in names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics {names} not visible")
        time.sleep(0.1)


def run(args, stack: Stack) -> dict:
    rng = random.Random(args.seed)
    t_run = time.monotonic()

    def profile_path(phase: str) -> Path | None:
        if args.py_spy is None:
            return None
        args.py_spy.mkdir(parents=True, exist_ok=True)
        return args.py_spy / f"{phase}.txt"

    stack.start()
    run_id = stack.run_id
    ledgers = [f"bench-{run_id}-{i:02d}" for i in range(args.ledgers)]
    # Pair r's uniform phase runs on ledgers of its own (fresh accounts, as the first),
    # its baseline on topics of its own (the passthrough reads its input from offset 0).
    pair_ledgers = [ledgers] + [[f"bench-{run_id}-p{r}-{i:02d}" for i in range(args.ledgers)]
                                for r in range(1, args.pairs)]
    base_topics = [(f"bench-{run_id}.passthrough{r}.in", f"bench-{run_id}.passthrough{r}.out")
                   for r in range(args.pairs)]
    create_topics(stack.bootstrap, [t for pair in base_topics for t in pair], args.partitions)
    outcomes = Outcomes(stack.bootstrap, args.partitions, [out for _in, out in base_topics])
    outcomes.start()
    producer = Producer(producer_config(stack.bootstrap, **{
        "linger.ms": 5, "compression.type": "lz4", "queue.buffering.max.kbytes": 256 * 1024,
    }))
    try:
        # Ready = the worker owns its partitions: each ledger's CREATED_LEDGER is out.
        t0 = time.monotonic()
        warm_ledgers = [f"bench-{run_id}-w{i:02d}" for i in range(args.ledgers)] if args.warmup_requests else []
        every_ledger = [ledger for some in pair_ledgers for ledger in some] + warm_ledgers
        create = [Request(f"c{run_id}{i:04d}", ledger, CreateLedger(), received_at=now_micros())
                  for i, ledger in enumerate(every_ledger)]
        ready = outcomes.expect("c", Phase("create", len(create)))
        produce_records(producer, REQUESTS, coalesce(create, args.wire_batch))
        outcomes.wait(ready, 180, stack)
        if ready.rejected:
            raise RuntimeError(f"{ready.rejected} CreateLedger requests were rejected")
        worker_ready_s = round(time.monotonic() - t0, 2)
        log(f"worker ready: {len(create)} ledgers created in {worker_ready_s} s")

        warmup = None
        if args.warmup_requests:
            warm_rng, batches, began = random.Random(args.seed + 1), [], time.monotonic()
            while not batches or time.monotonic() - began < args.warmup_seconds:
                log(f"warm-up batch {len(batches) + 1}: encoding {args.warmup_requests} requests ...")
                warm_records = coalesce(
                    uniform_requests(f"w{run_id}b{len(batches)}", args.warmup_requests, warm_ledgers,
                                     args.accounts, args.world_fraction, warm_rng),
                    args.wire_batch)
                batch = throughput_phase("warm-up", "w", warm_records, args.warmup_requests, outcomes, stack,
                                         producer, args.phase_timeout)
                batch.pop("_samples")
                batches.append(batch)
                del warm_records
            warmup = {"batches": len(batches), "seconds": round(time.monotonic() - began, 1),
                      "tx_per_s": [batch["tx_per_s"] for batch in batches],
                      "broker_cpu_us_per_request": [batch.get("broker_cpu_us_per_request") for batch in batches]}

        n = args.requests
        # Uniform and baseline in turn, --pairs times: the host's neighbours move the two
        # phases differently (baselines of 68k to 129k msgs/s within an hour at the same
        # code), so one uniform phase against one baseline phase is mostly noise; the
        # pairs' median much less.
        pairs = []
        for r in range(args.pairs):
            log(f"pair {r + 1}/{args.pairs}: encoding {n} uniform requests ...")
            uniform_records = coalesce(
                uniform_requests(f"u{run_id}p{r}", n, pair_ledgers[r], args.accounts, args.world_fraction, rng),
                args.wire_batch)
            uniform = throughput_phase("uniform", "u", uniform_records, n, outcomes, stack, producer,
                                       args.phase_timeout, profile_path("uniform") if r == 0 else None)
            uniform_samples = uniform.pop("_samples")
            if r == 0 and args.py_spy is not None and (args.py_spy / "uniform.txt").exists():
                from bench._pyspy import report

                report(args.py_spy / "uniform.txt", log)
            baseline = None
            if not args.skip_baseline:
                baseline = baseline_phase(
                    args, stack, outcomes, uniform_records, n,
                    values=uniform_samples,
                    header_size=len(f"u{run_id}p{r}{0:08d}"), topics=base_topics[r], producer=producer)
            pairs.append((uniform, baseline))
            del uniform_records

        hot = None
        if not args.skip_hot:
            log(f"encoding {n} hot requests ...")
            hot_requests = [transfer(f"h{run_id}{i:08d}", ledgers[0], "world", "hot", 100) for i in range(n)]
            hot = throughput_phase("hot", "h", coalesce(hot_requests, args.wire_batch), n, outcomes,
                                   stack, producer, args.phase_timeout)
            hot.pop("_samples")
            del hot_requests

        latency = None
        if not args.skip_latency:
            latency = latency_phase(args, stack, outcomes, ledgers, f"l{run_id}", rng,
                                    profile_path("latency"))
            if args.py_spy is not None and (args.py_spy / "latency.txt").exists():
                from bench._pyspy import report

                report(args.py_spy / "latency.txt", log)
    finally:
        outcomes.stop()
        producer.flush(10)

    rss = peak_rss_mb(stack.worker_pid) if stack.worker_pid else None
    u = round(statistics.median(uniform["tx_per_s"] for uniform, _baseline in pairs), 1)
    baselines = [baseline["msgs_per_s"] for _uniform, baseline in pairs if baseline]
    ratios = [round(uniform["tx_per_s"] / baseline["msgs_per_s"], 3) for uniform, baseline in pairs if baseline]
    result = {
        "throughput_uniform_tx_per_s": u,
        "throughput_hot_tx_per_s": hot["tx_per_s"] if hot else None,
        "ratio_hot_to_uniform": round(hot["tx_per_s"] / u, 3) if hot else None,
        "baseline_passthrough_msgs_per_s": round(statistics.median(baselines), 1) if baselines else None,
        "ratio_worker_to_baseline": round(statistics.median(ratios), 3) if ratios else None,
        "pairs": [{"uniform_tx_per_s": uniform["tx_per_s"],
                   "baseline_msgs_per_s": baseline["msgs_per_s"] if baseline else None,
                   "ratio": round(uniform["tx_per_s"] / baseline["msgs_per_s"], 3) if baseline else None}
                  for uniform, baseline in pairs],
        "latency_ms_p50": latency["p50_ms"] if latency else None,
        "latency_ms_p99": latency["p99_ms"] if latency else None,
        "worker_peak_rss_mb": rss,
        "requests": n,
        "ledgers": args.ledgers,
        "accounts": args.accounts,
        "accounts_note": "per ledger: users:00000..users:{:05d} in each of the ledgers".format(args.accounts - 1),
        "rejected_uniform": pairs[0][0]["rejected"],
        "uniform_funding": (f"{args.world_fraction:.0%} world->user (100 USD, always valid), "
                            f"{1 - args.world_fraction:.0%} user->user (1..50 USD, INSUFFICIENT_FUND "
                            "when the source is not yet funded); no pre-funding"),
        "hot_shape": "one ledger (one partition), every transfer world -> hot",
        "wire_batch": args.wire_batch,
        "partitions": args.partitions,
        "phases": {"warmup": warmup, "uniform": [u_ for u_, _b in pairs], "hot": hot,
                   "baseline": [b for _u, b in pairs], "latency": latency},
        "worker_ready_s": worker_ready_s,
        "worker_env": {k: v for k, v in os.environ.items() if k.startswith("STREAMLEDGER_BATCH")},
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "profiled_with_py_spy": args.py_spy is not None,
        "run_s": round(time.monotonic() - t_run, 1),
    }
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    params["kafka"] = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "local (started by the bench)")
    print("parameters: " + json.dumps(params), flush=True)

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    stack = Stack(args.partitions, spawn_worker=not args.external_worker, log=log)
    failed = True
    try:
        result = run(args, stack)
        failed = False
    except KeyboardInterrupt:
        log("interrupted; tearing down")
        return 130
    except BaseException:
        if stack.worker is not None:
            log(f"--- worker log tail ({stack.worker_log}):\n{stack.worker_log_tail()}")
        raise
    finally:
        try:
            stack.close(keep_logs=failed)
        except KeyboardInterrupt:
            stack.close(keep_logs=failed)
        if failed:
            log(f"logs kept in {stack.tmp}")
    result["teardown_s"] = stack.timings.get("teardown_s")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
