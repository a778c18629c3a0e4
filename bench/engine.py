"""What one partition's work costs without Kafka: decode → apply → store, per request.

    .venv/bin/python bench/engine.py                    # 300,000 uniform requests, native path
    .venv/bin/python bench/engine.py --python           # the Python path
    .venv/bin/python bench/engine.py --requests 20000   # a quick look

The worker's own objects (`PartitionProcessor`: its RocksDB store, its native engine) on
--partitions partitions in a temp dir, fed the throughput bench's uniform requests
(`bench/throughput.py`: ledgers and accounts uniform at random, 90% funded from `world`)
as wire-batch records, one record per partition per round, each round committed as the
worker commits it (`apply`, then `commit` once "the transaction" — here nothing —
committed). No broker, no producer: what is left is the ledger's own CPU.

Reports the wall time of each step per request on the round's thread, that thread's CPU,
and the whole process's CPU over the loop plus --settle-seconds after it (RocksDB's
flushes and compactions run on threads of their own, partly after the loop): the
difference is the store's background work. On the shared 2-core machine this moves far
less than the full bench (whose baseline swings by half within an hour), so compare
changes of the hot path here, in alternated runs.

Prints its parameters first and one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench._stack import cpu_seconds  # noqa: E402
from bench.throughput import coalesce, uniform_requests  # noqa: E402
from ledger.commands import CreateLedger, Request  # noqa: E402
from streams import codecs  # noqa: E402
from streams.processor import PartitionProcessor  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.topics import COMMITTED, REJECTED, partition_for  # noqa: E402


def run(args: argparse.Namespace, data_dir: Path) -> dict:
    partitions = args.partitions
    ledgers = [f"engine-{i:02d}" for i in range(args.ledgers)]
    requests = uniform_requests("u", args.requests, ledgers, args.accounts, args.world_fraction,
                                random.Random(args.seed))
    by_partition: dict[int, list] = {p: [] for p in range(partitions)}
    for key, value, _n in coalesce(requests, args.wire_batch):
        by_partition[partition_for(key, partitions)].append((key, value))
    del requests

    settings = Settings(data_dir=data_dir, partitions=partitions, native=not args.python)
    processors = {p: PartitionProcessor(settings, p) for p in range(partitions)}
    now = int(time.time() * 1_000_000)
    # The log positions a round's outcomes would have, as the writer reports them.
    positions = {(topic, p): 0 for topic in (COMMITTED, REJECTED) for p in range(partitions)}
    offsets = {p: 0 for p in range(partitions)}

    steps = {"decode": 0.0, "apply": 0.0, "store": 0.0}
    totals = {"committed": 0, "rejected": 0}

    def one_round(work: dict[int, tuple[bytes, bytes]]) -> None:
        began = time.perf_counter()
        decoded = {p: processors[p].decode([(offsets[p], key, value)], now) for p, (key, value) in work.items()}
        for p in work:
            offsets[p] += 1
        decoded_at = time.perf_counter()
        applied = {p: processors[p].apply(decoded[p], now) for p in decoded}
        applied_at = time.perf_counter()
        for p, a in applied.items():
            positions[(COMMITTED, p)] += a.result.committed  # (a native round's outcomes are
            positions[(REJECTED, p)] += a.result.rejected    # produced by the writer, from Rust)
            totals["committed"] += a.result.committed
            totals["rejected"] += a.result.rejected
            processors[p].commit(a, positions)
        steps["decode"] += decoded_at - began
        steps["apply"] += applied_at - decoded_at
        steps["store"] += time.perf_counter() - applied_at

    for p in range(partitions):  # the ledgers, created as the worker would create them
        mine = [ledger for ledger in ledgers if partition_for(ledger.encode(), partitions) == p]
        if mine:
            record = codecs.encode_requests([Request(f"c-{ledger}", ledger, CreateLedger()) for ledger in mine])
            one_round({p: (mine[0].encode(), record)})
    steps.update(decode=0.0, apply=0.0, store=0.0)
    totals.update(committed=0, rejected=0)

    gc.collect()
    gc.freeze()
    rounds = max(len(records) for records in by_partition.values())
    process0, thread0, wall0 = cpu_seconds(os.getpid()), time.thread_time(), time.perf_counter()
    for r in range(rounds):
        one_round({p: records[r] for p, records in by_partition.items() if r < len(records)})
    for processor in processors.values():  # the last round's writes: the store's step too
        began = time.perf_counter()
        processor.write_unstored()
        steps["store"] += time.perf_counter() - began
    wall = time.perf_counter() - wall0
    thread = time.thread_time() - thread0
    time.sleep(args.settle_seconds)  # RocksDB's flushes and compactions of the loop's writes
    process = cpu_seconds(os.getpid()) - process0
    native = any(processor.engine is not None for processor in processors.values())
    for processor in processors.values():
        processor.close()
    n = args.requests
    if totals["committed"] + totals["rejected"] != n:
        raise RuntimeError(f"{totals} outcomes for {n} requests")
    per = 1e6 / n
    return {
        "requests": n,
        "committed": totals["committed"],
        "rejected": totals["rejected"],
        "path": "native" if native else "python",
        "us_per_request": {name: round(seconds * per, 2) for name, seconds in steps.items()},
        "round_thread_wall_us_per_request": round(wall * per, 2),
        "round_thread_cpu_us_per_request": round(thread * per, 2),
        "process_cpu_us_per_request": round(process * per, 2),
        "background_cpu_us_per_request": round((process - thread) * per, 2),
        "settle_seconds": args.settle_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--ledgers", type=int, default=16)
    p.add_argument("--accounts", type=int, default=10_000, help="accounts per ledger (10000)")
    p.add_argument("--world-fraction", type=float, default=0.9)
    p.add_argument("--wire-batch", type=int, default=500, help="requests per record (500)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--python", action="store_true", help="the Python path instead of the native one")
    p.add_argument("--settle-seconds", type=float, default=3.0,
                   help="wait after the loop, counting RocksDB's background work (3)")
    args = p.parse_args(argv)
    print("parameters:", json.dumps(vars(args)), flush=True)
    data_dir = Path(tempfile.mkdtemp(prefix="streamledger-engine-"))
    try:
        result = run(args, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
