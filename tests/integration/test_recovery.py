"""Recovery of a worker's RocksDB stores: from the log alone, and from their own positions.

(i)   A store rebuilt from ledger.committed / ledger.rejected alone (data dir deleted) is
      byte-for-byte the store the worker built while applying the requests, positions
      included.
(ii)  After a `kill -9` (under load) and a restart on the same data dir, each partition
      replays exactly the records after the positions its store recorded (not the whole
      log); the same for a store put back to the copy taken at the kill while the log went
      on (a store behind by several batches, deterministically). The ledgers then carry on
      with the next ids: no gap, no duplicate.
(iii) Request ids redelivered after that restart are answered with their original outcome
      (on ledger.replies) and are not applied a second time.

The module runs its own LocalKafka: a worker with a new app id reads ledger.requests and
rebuilds from ledger.committed from the beginning, so it must not share those topics with
the rest of the suite's workers.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from rocksdict import AccessType, Options, Rdict

from bench._stack import WORKER_COMMAND, spawn
from ledger.commands import (
    CreateLedger, CreateTransaction, DeleteMetadata, Request, RevertTransaction, SaveMetadata,
)
from ledger.model import Posting
from streamledger.kafka_local import LocalKafka, free_ports
from streams import codecs
from streams.topics import COMMITTED, REJECTED, REPLIES, REQUESTS, ensure_topics, partition_for, producer_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
P = 8
READY = re.compile(r"partition (\d+) ready: replayed (\d+) log records")
POSITION_PREFIX = b"\xffpos\x00"


# ------------------------------------------------------------------------------ the stack


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    kafka = LocalKafka(tmp_path_factory.mktemp("recovery-kafka"))
    kafka.start()
    try:
        ensure_topics(kafka.bootstrap_servers, P)
        yield kafka.bootstrap_servers
    finally:
        kafka.close()


class Worker:
    """One `streamledger worker` process at a time on a fixed data dir and app id; every
    start writes its own log file. Stopped by its own pid only."""

    def __init__(self, bootstrap: str, data_dir: Path, logs: Path, app_id: str, **env: str) -> None:
        self.bootstrap, self.data_dir, self.logs, self.app_id = bootstrap, data_dir, logs, app_id
        self.env = env  # overrides, e.g. a fixed STREAMLEDGER_WORKER_PORT (a stable worker id)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.app_id}-{self.starts}.log"

    def start(self) -> None:
        assert self.process is None
        self.starts += 1
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMLEDGER_APP_ID": self.app_id,
            "STREAMLEDGER_DATA_DIR": str(self.data_dir),
            "STREAMLEDGER_WORKER_PORT": str(free_ports(1)[0]),
            "STREAMLEDGER_PARTITIONS": str(P),
            "STREAMLEDGER_SESSION_TIMEOUT_MS": "6000",
            "STREAMLEDGER_ROCKSDB_BLOCK_CACHE_MB": "8",
            "STREAMLEDGER_ROCKSDB_WRITE_BUFFER_MB": "4",
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        self.process = spawn(WORKER_COMMAND, env=env, log_path=self.log_path, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self) -> dict[int, int]:
        """partition -> records replayed, from this start's "partition N ready" lines."""
        return {int(m.group(1)): int(m.group(2)) for m in READY.finditer(self.log())}

    def wait_ready(self, timeout: float = 60) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        while True:
            ready = self.ready()
            if len(ready) == P:
                return ready
            self.check()
            if time.monotonic() > deadline:
                raise AssertionError(f"only partitions {sorted(ready)} recovered:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
            self.process = None

    def kill9(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            self.process = None


@pytest.fixture
def new_worker(broker, tmp_path):
    workers: list[Worker] = []

    def make(name: str) -> Worker:
        worker = Worker(broker, tmp_path / f"{name}-data", tmp_path, f"recovery-{name}-{uuid.uuid4().hex[:6]}")
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


# ------------------------------------------------------------------------------ the topics


class Topics:
    """Everything on ledger.committed / .rejected / .replies (read_committed), accumulated
    by polling: outcome records keyed by their request_id header."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"recovery-test-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "isolation.level": "read_committed",
            "auto.offset.reset": "earliest", "fetch.wait.max.ms": 20,
        })
        self.consumer.assign([TopicPartition(t, p, 0) for t in (COMMITTED, REJECTED, REPLIES) for p in range(P)])
        self.records: dict[str, list[tuple[int, int, str, bytes]]] = defaultdict(list)  # topic -> [(p, off, rid, value)]

    def poll(self, seconds: float = 2.0) -> None:
        """Read what is there, for at most about `seconds` (outcomes may keep coming)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            messages = self.consumer.consume(5000, timeout=0.2)
            if not messages:
                return
            for m in messages:
                if m.error() is not None:
                    assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                    continue
                rid = dict(m.headers() or ()).get("request_id", b"").decode()
                self.records[m.topic()].append((m.partition(), m.offset(), rid, m.value()))

    def ids(self, topic: str) -> Counter:
        return Counter(rid for _, _, rid, _ in self.records[topic])

    def wait(self, outcomes: set[str] = frozenset(), replies: set[str] = frozenset(),
             timeout: float = 60, worker: Worker | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            seen = set(self.ids(COMMITTED)) | set(self.ids(REJECTED))
            missing = (set(outcomes) - seen) | (set(replies) - set(self.ids(REPLIES)))
            if not missing:
                return
            if worker is not None:
                worker.check()
            if time.monotonic() > deadline:
                log = worker.log()[-3000:] if worker else ""
                raise AssertionError(f"{len(missing)} outcomes missing, e.g. {sorted(missing)[:5]}\n{log}")

    def entries(self) -> dict[str, list]:
        """Decoded log entries per ledger, in log order."""
        out: dict[str, list] = defaultdict(list)
        for _, _, _, value in sorted(self.records[COMMITTED], key=lambda r: (r[0], r[1])):
            entry = codecs.decode_log_entry(value)
            out[entry.ledger].append(entry)
        return out

    def outcome(self, request_id: str):
        for topic, decode in ((COMMITTED, codecs.decode_log_entry), (REJECTED, codecs.decode_rejection)):
            for _, _, rid, value in self.records[topic]:
                if rid == request_id:
                    return decode(value)
        return None

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def topics(broker):
    t = Topics(broker)
    yield t
    t.close()


def send(bootstrap: str, requests: list[Request], per_record: int = 20) -> None:
    """Produce requests in order, coalesced per ledger into records of `per_record`."""
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 2}))
    batches: dict[str, list[Request]] = {}
    for request in requests:
        batch = batches.setdefault(request.ledger, [])
        batch.append(request)
        if len(batch) >= per_record:
            producer.produce(REQUESTS, codecs.encode_requests(batch), request.ledger.encode())
            batches[request.ledger] = []
    for ledger, batch in batches.items():
        if batch:
            producer.produce(REQUESTS, codecs.encode_requests(batch), ledger.encode())
    assert producer.flush(30) == 0


def rid() -> str:
    return uuid.uuid4().hex


def req(ledger: str, command, **kw) -> Request:
    return Request(kw.pop("request_id", None) or rid(), ledger, command, received_at=time.time_ns() // 1000, **kw)


def tx(ledger: str, *postings: tuple[str, str, int], **kw) -> Request:
    fields = {k: kw.pop(k) for k in ("reference", "metadata", "account_metadata") if k in kw}
    return req(ledger, CreateTransaction(postings=tuple(Posting(s, d, a, "USD") for s, d, a in postings), **fields), **kw)


def read_store(path: Path) -> dict[bytes, bytes]:
    db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
    try:
        return {key: value for key, value in db.items()}
    finally:
        db.close()


def store_paths(worker: Worker) -> dict[int, Path]:
    base = worker.data_dir / worker.app_id
    return {int(p.name.split("-")[1]): p for p in sorted(base.glob("partition-*"))}


def positions(store: dict[bytes, bytes]) -> dict[str, int]:
    return {k[len(POSITION_PREFIX):].decode(): int(v) for k, v in store.items() if k.startswith(POSITION_PREFIX)}


def records_from(bootstrap: str, topic: str, partition: int, start: int) -> int:
    """Data records on topic/partition from offset `start` to the end, read_committed."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"recovery-count-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": True})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        if high <= start:
            return 0
        consumer.assign([TopicPartition(topic, partition, max(start, low))])
        count = 0
        while True:
            for m in consumer.consume(1000, timeout=0.2):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        return count
                    raise AssertionError(m.error())
                count += 1
    finally:
        consumer.close()


def ledger_names(prefix: str, n: int) -> list[str]:
    """n ledger names over distinct partitions where possible (n <= P)."""
    names, used, i = [], set(), 0
    while len(names) < n:
        name = f"{prefix}{i}"
        partition = partition_for(name.encode(), P)
        if partition not in used or len(used) == P:
            names.append(name)
            used.add(partition)
        i += 1
    return names


def assert_log_is_exact(entries: dict[str, list], topics: Topics) -> None:
    """Per ledger: log ids 0..n without gap or repeat, transaction ids 1..m; every request id
    exactly once across ledger.committed and ledger.rejected."""
    for ledger, log in entries.items():
        assert [e.id for e in log] == list(range(len(log))), f"{ledger}: log ids {[e.id for e in log]}"
        tx_ids = [e.data["transaction"]["id"] for e in log if e.type in ("NEW_TRANSACTION", "REVERTED_TRANSACTION")]
        assert tx_ids == list(range(1, len(tx_ids) + 1)), f"{ledger}: transaction ids {tx_ids}"
    both = topics.ids(COMMITTED) + topics.ids(REJECTED)
    twice = {r: n for r, n in both.items() if n > 1}
    assert not twice, f"request ids with more than one outcome: {twice}"


# ------------------------------------------------------------------------------ (i)


def mixed_requests(ledger: str, rng: random.Random) -> list[Request]:
    users = [f"users:{i:02d}" for i in range(12)]
    out = [req(ledger, CreateLedger(metadata={"owner": "recovery"}))]
    for i in range(60):
        out.append(tx(ledger, ("world", rng.choice(users), rng.randint(1, 100))))
    for i in range(60):  # some of these overdraw their source: INSUFFICIENT_FUND
        source, destination = rng.sample(users, 2)
        out.append(tx(ledger, (source, destination, rng.randint(1, 120))))
    out.append(tx(ledger, ("users:00", "users:01", 10**9)))  # certainly INSUFFICIENT_FUND
    out.append(tx(ledger, ("world", "users:03", 5), reference="ref-1", metadata={"kind": "ref"}))
    out.append(tx(ledger, ("world", "users:04", 5), reference="ref-1"))  # duplicate reference: CONFLICT
    out.append(tx(ledger, ("world", "users:05", 7), account_metadata={"users:05": {"tier": "gold"}}))
    out.append(req(ledger, SaveMetadata("ACCOUNT", "users:06", {"a": "1", "b": "2"})))
    out.append(req(ledger, DeleteMetadata("ACCOUNT", "users:06", "a")))
    out.append(req(ledger, SaveMetadata("TRANSACTION", 1, {"note": "first"})))
    out.append(req(ledger, SaveMetadata("TRANSACTION", 10**6, {"note": "no such transaction"})))  # NOT_FOUND
    out.append(tx(ledger, ("world", "users:07", 9), idempotency_key="ik-1", idempotency_hash="h1"))
    out.append(tx(ledger, ("world", "users:07", 9), idempotency_key="ik-1", idempotency_hash="h1"))  # hit
    out.append(tx(ledger, ("world", "users:07", 9), idempotency_key="ik-1", idempotency_hash="h2"))  # reused key
    return out


def test_a_store_rebuilt_from_the_log_alone_is_identical(broker, new_worker, topics, tmp_path):
    rng = random.Random(4)
    worker = new_worker("rebuild")
    worker.start()
    ledgers = ledger_names("rebuild-", 3)
    first = [r for ledger in ledgers for r in mixed_requests(ledger, rng)]
    first.append(req("rebuild-missing", CreateTransaction(postings=(Posting("world", "a", 1, "USD"),))))
    # The second request with idempotency key ik-1 and the same hash is answered on
    # ledger.replies with the first one's outcome.
    hits = {[r for r in first if r.ledger == ledger and r.idempotency_hash == "h1"][1].request_id
            for ledger in ledgers}
    send(broker, first)
    topics.wait({r.request_id for r in first} - hits, replies=hits, timeout=90, worker=worker)

    # Second round: reverts (one of them of an already reverted transaction) and a
    # request id redelivered.
    second = []
    for ledger in ledgers:
        second.append(req(ledger, RevertTransaction(3, force=True)))
        second.append(req(ledger, RevertTransaction(3, force=True)))  # already reverted: rejected
        second.append(req(ledger, RevertTransaction(4, force=True, metadata={"why": "test"})))
    redelivered = first[5]
    second.append(redelivered)
    send(broker, second)
    topics.wait({r.request_id for r in second}, replies={redelivered.request_id}, worker=worker)
    codes = Counter(codecs.decode_rejection(v).code for _, _, _, v in topics.records[REJECTED])
    assert {"INSUFFICIENT_FUND", "CONFLICT", "NOT_FOUND", "LEDGER_NOT_FOUND", "ALREADY_REVERT"} <= set(codes), codes
    assert sum(1 for e in topics.entries()[ledgers[0]] if e.type == "REVERTED_TRANSACTION") == 2
    worker.stop()

    live = {p: read_store(path) for p, path in store_paths(worker).items()}
    shutil.copytree(worker.data_dir, tmp_path / "live-copy")
    shutil.rmtree(worker.data_dir)

    worker.start()  # same app id, empty data dir: rebuilds every partition from the log
    replayed = worker.wait_ready()
    total = sum(len(topics.records[t]) for t in (COMMITTED, REJECTED))
    assert sum(replayed.values()) == total, (replayed, total)
    worker.stop()
    rebuilt = {p: read_store(path) for p, path in store_paths(worker).items()}

    assert set(rebuilt) == set(range(P)) and set(live) <= set(rebuilt)
    for partition in range(P):
        a, b = live.get(partition, {}), rebuilt[partition]
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        assert not differ, (
            f"partition {partition}: {len(differ)} keys differ, e.g. "
            + "; ".join(f"{k!r}: live {a.get(k)!r} rebuilt {b.get(k)!r}" for k in differ[:5])
        )
    assert sum(len(s) for s in live.values()) > 1000  # the comparison compared something
    assert any(positions(s) for s in live.values())


# ------------------------------------------------------------------------------ (ii) (iii)


@pytest.fixture(scope="module")
def restarted(broker, tmp_path_factory):
    """A worker killed with -9 while requests stream in, then restarted on its data dir.
    (Module scope: (ii) and (iii) look at the same restart.)"""
    rng = random.Random(5)
    tmp = tmp_path_factory.mktemp("restart")
    worker = Worker(broker, tmp / "data", tmp, f"recovery-restart-{uuid.uuid4().hex[:6]}")
    topics = Topics(broker)
    try:
        yield from _restarted(broker, worker, topics, rng)
    finally:
        worker.stop()
        topics.close()


def _restarted(broker: str, worker: Worker, topics: Topics, rng: random.Random):
    worker.start()
    ledgers = ledger_names("restart-", 4)
    users = [f"users:{i}" for i in range(20)]
    before = [req(ledger, CreateLedger()) for ledger in ledgers]
    for _ in range(200):
        ledger = rng.choice(ledgers)
        if rng.random() < 0.7:
            before.append(tx(ledger, ("world", rng.choice(users), rng.randint(1, 100))))
        else:
            source, destination = rng.sample(users, 2)
            before.append(tx(ledger, (source, destination, rng.randint(1, 150))))
    send(broker, before)
    topics.wait({r.request_id for r in before}, timeout=90, worker=worker)
    assert topics.ids(REJECTED), "expected some INSUFFICIENT_FUND rejections"
    # The stores keep no write-ahead log: a quiet worker persists them (within ~1.5 s).
    # A kill loses what came after, which the restart replays.
    time.sleep(2.5)

    # A stream of requests, and a kill -9 in the middle of it.
    streamed: list[Request] = []
    stop = threading.Event()

    def stream() -> None:
        producer = Producer(producer_config(broker, **{"linger.ms": 0}))
        while not stop.is_set():
            ledger = rng.choice(ledgers)
            batch = [tx(ledger, ("world", rng.choice(users), 1)) for _ in range(5)]
            streamed.extend(batch)
            producer.produce(REQUESTS, codecs.encode_requests(batch), ledger.encode())
            producer.poll(0)
            time.sleep(0.005)
        assert producer.flush(30) == 0

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(set(topics.ids(COMMITTED)) & {r.request_id for r in streamed}) < 50:
            topics.poll()
            assert time.monotonic() < deadline, "the worker is not applying the stream"
        worker.kill9()
    finally:
        stop.set()
        thread.join()

    # (a) The restart after the kill: the store as the kill left it.
    crash_copy = worker.data_dir.parent / "data-at-kill"
    shutil.copytree(worker.data_dir, crash_copy)
    behind = lagging(broker, worker)
    topics.poll()
    log_records = Counter(p for t in (COMMITTED, REJECTED) for p, _, _, _ in topics.records[t])
    worker.start()
    restarts = [("kill -9", worker.wait_ready(), behind, log_records)]
    topics.wait({r.request_id for r in streamed}, worker=worker)  # what the kill interrupted

    # (b) A store further behind the log than a kill leaves it (as if the store writes of
    # many batches were lost after their Kafka commits): the copy taken at the kill, while
    # the log went on. Each partition replays what the log holds after its positions.
    more = [tx(ledger, ("world", "users:more", 1)) for ledger in ledgers for _ in range(5)]
    send(broker, more, per_record=2)
    topics.wait({r.request_id for r in more}, worker=worker)
    worker.stop()
    shutil.rmtree(worker.data_dir)
    crash_copy.rename(worker.data_dir)
    behind = lagging(broker, worker)
    topics.poll()
    log_records = Counter(p for t in (COMMITTED, REJECTED) for p, _, _, _ in topics.records[t])
    worker.start()
    restarts.append(("stale store", worker.wait_ready(), behind, log_records))
    for name, replayed, behind, _ in restarts:
        print(f"{name}: replayed per partition {dict(sorted(replayed.items()))}, behind {dict(sorted(behind.items()))}")
    yield dict(worker=worker, topics=topics, ledgers=ledgers, before=before, streamed=streamed,
               restarts=restarts)


def lagging(broker: str, worker: Worker) -> dict[int, int]:
    """partition -> records on ledger.committed + ledger.rejected after its store's positions
    (the worker stopped)."""
    behind = {}
    for partition, path in store_paths(worker).items():
        store_positions = positions(read_store(path))
        behind[partition] = sum(
            records_from(broker, topic, partition, store_positions.get(topic, 0)) for topic in (COMMITTED, REJECTED)
        )
    return behind


def test_a_restart_replays_only_what_the_store_lacks_and_continues_the_ids(broker, restarted):
    worker, ledgers, topics = restarted["worker"], restarted["ledgers"], restarted["topics"]
    for name, replayed, behind, log_records in restarted["restarts"]:
        # Each partition replayed exactly the records after its store's positions...
        assert replayed == {p: behind.get(p, 0) for p in range(P)}, (name, replayed, behind)
        # ... which is not the whole log.
        for partition, count in replayed.items():
            if log_records[partition]:
                assert count < log_records[partition], (name, partition, count, log_records[partition])
    # The kill came in the middle of a stream, after a quiet pause: the store had persisted
    # everything before the pause (no write-ahead log: what the memtables held since is
    # replayed), so none of it is replayed.
    _, replayed, _, log_records = restarted["restarts"][0]
    assert sum(replayed.values()) <= sum(log_records.values()) - len(restarted["before"]), replayed
    stale = restarted["restarts"][1]
    assert sum(stale[1].values()) >= 5 * len(ledgers), stale  # (b) did replay something

    last = {ledger: log[-1].id for ledger, log in topics.entries().items() if ledger in ledgers}
    after = [tx(ledger, ("world", "users:new", 1)) for ledger in ledgers for _ in range(3)]
    send(broker, after, per_record=1)
    topics.wait({r.request_id for r in after}, worker=worker)
    entries = topics.entries()
    for ledger in ledgers:
        new_ids = [e.id for e in entries[ledger] if e.request_id in {r.request_id for r in after}]
        assert new_ids == [last[ledger] + 1, last[ledger] + 2, last[ledger] + 3], (ledger, last[ledger], new_ids)
    assert_log_is_exact({ledger: entries[ledger] for ledger in ledgers}, topics)


def test_requests_redelivered_after_a_restart_get_their_original_outcome(broker, restarted):
    worker, topics = restarted["worker"], restarted["topics"]
    before = restarted["before"]
    committed_ids, rejected_ids = set(topics.ids(COMMITTED)), set(topics.ids(REJECTED))
    again = [r for r in before if r.request_id in committed_ids][-5:] + \
        [r for r in before if r.request_id in rejected_ids][-2:] + restarted["streamed"][-3:]
    assert len(again) == 10
    replies_before = topics.ids(REPLIES)
    entries_before = sum(len(log) for log in topics.entries().values())
    send(broker, again, per_record=3)
    topics.wait(replies={r.request_id for r in again}, worker=worker)
    time.sleep(1.0)  # anything applied twice would be in the log by now
    topics.poll()

    for request in again:
        answers = [codecs.decode_reply(v) for _, _, r, v in topics.records[REPLIES] if r == request.request_id]
        fresh = answers[replies_before.get(request.request_id, 0):] or answers
        request_id, ledger, kind, outcome = fresh[-1]
        assert (request_id, ledger, kind) == (request.request_id, request.ledger, codecs.REPLY_REDELIVERED)
        assert outcome == topics.outcome(request.request_id), request.request_id
    assert sum(len(log) for log in topics.entries().values()) == entries_before
    both = topics.ids(COMMITTED) + topics.ids(REJECTED)
    assert all(both[r.request_id] == 1 for r in again), {r.request_id: both[r.request_id] for r in again}


def test_a_static_member_restarted_after_kill_9_resumes_before_its_session_expires(broker, tmp_path):
    """STREAMLEDGER_STATIC_MEMBERSHIP: the worker joins as a static member under its worker
    id. Killed and restarted with the same id, it takes its partitions back at once; a
    dynamic member would wait for the dead one's session (here 120 s) to expire first.
    (A session this long also checks that it is accepted: faust's own default request
    timeout, 90 s, would refuse it.)"""
    session_s = 120
    worker = Worker(broker, tmp_path / "data", tmp_path, f"recovery-static-{uuid.uuid4().hex[:6]}",
                    STREAMLEDGER_STATIC_MEMBERSHIP="true", STREAMLEDGER_WORKER_PORT=str(free_ports(1)[0]),
                    STREAMLEDGER_SESSION_TIMEOUT_MS=str(session_s * 1000))
    topics = Topics(broker)
    try:
        worker.start()
        ledgers = ledger_names("static-", 4)
        first = [req(ledger, CreateLedger()) for ledger in ledgers] + [
            tx(ledger, ("world", "users:a", 10)) for ledger in ledgers]
        send(broker, first)
        topics.wait({r.request_id for r in first}, timeout=90, worker=worker)

        worker.kill9()
        killed = time.monotonic()
        worker.start()
        after = [tx(ledger, ("users:a", "users:b", 4)) for ledger in ledgers]
        send(broker, after)
        topics.wait({r.request_id for r in after}, timeout=session_s / 2, worker=worker)
        assert time.monotonic() - killed < session_s / 2
        assert set(topics.ids(COMMITTED)) >= {r.request_id for r in after}  # applied, funds were there
        entries = topics.entries()
        assert_log_is_exact({ledger: entries[ledger] for ledger in ledgers}, topics)
    finally:
        worker.stop()
        topics.close()
