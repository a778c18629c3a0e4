"""Prometheus metrics of the worker, served on the worker's web port at /metrics."""

from prometheus_client import Counter, Gauge, Histogram

applied = Counter("streamledger_applied_total", "Requests committed to the log", ["ledger"])
rejected = Counter("streamledger_rejected_total", "Requests rejected", ["ledger"])
batch_requests = Histogram(
    "streamledger_batch_requests", "Requests per applied batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 4000),
)
batch_seconds = Histogram(
    "streamledger_batch_seconds", "Seconds to apply and commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
partition_rounds = Counter(
    "streamledger_partition_rounds_total",
    "Partition rounds applied, by path: native (the fast path), python (a request the fast path does "
    "not take), fallback (taken at decode, handed back by the fast path: e.g. a redelivery)",
    ["path"],
)
apply_seconds = Histogram(
    "streamledger_apply_seconds", "Seconds to apply one round's requests to the state (no I/O but store reads)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
commit_seconds = Histogram(
    "streamledger_commit_seconds", "Seconds of one round's Kafka transaction (produce, offsets, commit)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
recovered_records = Gauge(
    "streamledger_recovered_records", "Log records replayed at the last recovery", ["partition"]
)
batch_retries = Counter(
    "streamledger_batch_retries_total", "Batches retried after a transient Kafka failure"
)
consumer_lag = Gauge(
    "streamledger_consumer_lag", "Records of ledger.requests not yet applied", ["partition"]
)
recovery_replayed = Gauge(
    "streamledger_recovery_replayed_records", "Records replayed so far by the running recovery", ["partition"]
)
recovering = Gauge("streamledger_recovering", "1 while a partition is catching up from the log", ["partition"])
gc_pause_seconds = Histogram(
    "streamledger_gc_pause_seconds", "Pauses of Python's cyclic garbage collector, by generation", ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
hanging_transactions_aborted = Counter(
    "streamledger_hanging_transactions_aborted_total",
    "Transactions a catch-up found open on a log partition with no coordinator to end them, and aborted",
)
