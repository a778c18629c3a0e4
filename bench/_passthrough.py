"""The baseline "worker": a no-op transactional passthrough with confluent-kafka only.

Run as a separate process by `bench/throughput.py` (as the real worker is), it consumes
the wire-batch records of an input topic and, for each one, produces `n` records to an
output topic, where `n` is the number of requests in the input record (read from its `n`
header: the payload is never decoded) and the values are the worker's own outcome values
sampled by the bench (`--values-file`, cycled through), in one Kafka
transaction per round, as the worker commits (streams/worker.py, streams/writer.py):

    poll one record, then consume(up to batch-max, within linger-ms)   # as the worker takes
    split it into rounds of at most batch-max requests (a record is never split)
    for each round:                         # two transactional producers, taking turns
        begin_transaction → produce every output of the round → flush
        → send_offsets_to_transaction (every partition of the round) → commit

So it moves the same bytes in and out as the worker (same input records, one output record
per request, of the worker's sizes and compressibility) and pays the same Kafka transaction
protocol, but does no decoding, no ledger logic and no RocksDB.

Prints `READY` once its producers are initialised and its consumer assigned, and a JSON
line of counters when it has passed `--expected` input records through (or on SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--in-topic", required=True)
    parser.add_argument("--out-topic", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--expected", type=int, required=True, help="input records to pass through")
    parser.add_argument("--values-file", required=True,
                        help="output values to cycle through: 4-byte big-endian length + bytes, repeated")
    parser.add_argument("--header-size", type=int, default=24, help="bytes of the request_id header")
    parser.add_argument("--batch-max", type=int, default=4000)
    parser.add_argument("--linger-ms", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from streams.topics import producer_config

    stopping = False

    def on_term(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    producers = []
    for turn in range(2):
        producer = Producer(producer_config(args.bootstrap, **{
            "transactional.id": f"{args.group}-passthrough-{turn}",
            "linger.ms": 0, "compression.type": "lz4", "transaction.timeout.ms": 60_000,
        }))
        producer.init_transactions(30)
        producers.append(producer)
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
    })
    consumer.assign([TopicPartition(args.in_topic, p, 0) for p in range(args.partitions)])
    metadata = consumer.consumer_group_metadata()
    raw = open(args.values_file, "rb").read()
    values, i = [], 0
    while i < len(raw):
        size = int.from_bytes(raw[i:i + 4], "big")
        values.append(raw[i + 4:i + 4 + size])
        i += 4 + size
    next_value = __import__("itertools").cycle(values).__next__
    out_headers = [("request_id", b"x" * args.header_size)]
    print("READY", flush=True)

    seen = requests = transactions = 0
    busy = 0.0
    deadline = time.monotonic() + args.timeout
    try:
        while seen < args.expected and not stopping and time.monotonic() < deadline:
            # As the worker takes (streams.worker._take): the first record, then what is
            # fetched already or arrives within the linger.
            first = consumer.poll(0.5)
            if first is None:
                continue
            messages = [first, *consumer.consume(args.batch_max - 1, timeout=args.linger_ms / 1000)]
            t0 = time.perf_counter()
            for round_ in _rounds(messages, args.batch_max):
                producer = producers[transactions % 2]
                producer.begin_transaction()
                offsets: dict[int, int] = {}
                for message, n in round_:
                    partition = message.partition()
                    key = message.key()
                    for _ in range(n):
                        producer.produce(args.out_topic, next_value(), key, partition=partition,
                                         headers=out_headers)
                    offsets[partition] = message.offset() + 1
                    requests += n
                if producer.flush(30):
                    raise KafkaException("records not delivered in 30 s")
                producer.send_offsets_to_transaction(
                    [TopicPartition(args.in_topic, p, o) for p, o in offsets.items()], metadata, 30)
                producer.commit_transaction(60)
                transactions += 1
            seen += len(messages)
            busy += time.perf_counter() - t0
    finally:
        consumer.close()
        for producer in producers:
            producer.flush(5)
    print(json.dumps({"records_in": seen, "requests_out": requests, "transactions": transactions,
                      "busy_s": round(busy, 3)}), flush=True)
    return 0 if seen >= args.expected else 1


def _rounds(messages, requests_max: int):
    """[(message, requests in it)] per round, as streams.worker.Worker._rounds splits a
    take: partition by partition, at most `requests_max` requests (a record alone may
    exceed it)."""
    by_partition: dict[int, list] = {}
    for message in messages:
        if message.error() is not None:
            raise KafkaException(message.error())
        by_partition.setdefault(message.partition(), []).append(message)
    current, requests = [], 0
    for batch in by_partition.values():
        for message in batch:
            n = 1
            for name, value in message.headers() or ():
                if name == "n":
                    n = int(value)
            if current and requests + n > requests_max:
                yield current
                current, requests = [], 0
            current.append((message, n))
            requests += n
    if current:
        yield current


if __name__ == "__main__":
    sys.exit(main())
