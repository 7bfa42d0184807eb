"""kafka-python's producer against librdkafka's (confluent-kafka, what the relays use), side by side.

The outbox relays' work: batches of records of an event's size, with the envelope's
headers and a `traceparent`, sent with acks=all and idempotence, each batch waited for.
Both producers send to one broker started here, in alternating rounds, so the machine's
state weighs on both alike.  Measured: the process's CPU per record (librdkafka's own
threads included) and each batch's wall time.  Figures go to
`bench/results/kafka-producers-<time>.json` and `bench/results/kafka-producers-latest.md`.

    PYTHONPATH=.:gen python -m bench.kafka_producers   (BENCH_KAFKA_BATCHES=300 per round,
                                                        BENCH_KAFKA_BATCH=8 records, 3 rounds)
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from infra.stack import KafkaNode, free_ports
from services.kernel.kafka import EventProducer, Record, ensure_topics

OUT = Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parent / "results"))
TOPIC = "bench-producers"
VALUE = os.urandom(420)  # about an envelope with a state change
HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"0" * 32),
    ("ce_type", b"agents.AgentStateChanged"),
    ("ce_source", b"centralino-agents"),
    ("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def kafka_python_sender(bootstrap: str) -> Callable[[Sequence[Record]], object]:
    """kafka-python configured as the relays were until librdkafka replaced it."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        retries=2**31 - 1,
        request_timeout_ms=10_000,
        delivery_timeout_ms=30_000,
    )

    def send(records: Sequence[Record]) -> object:
        futures = [producer.send(t, key=k, value=v, headers=h) for t, k, v, h in records]
        producer.flush(timeout=30)
        return [future.get(timeout=30) for future in futures]

    return send


def librdkafka_sender(bootstrap: str) -> Callable[[Sequence[Record]], object]:
    producer = EventProducer(bootstrap, "bench")
    return lambda records: producer.send_all(records, timeout_s=30)


def _round(send: Callable[[Sequence[Record]], object], batches: int, size: int, pause_s: float) -> dict[str, Any]:
    walls = []
    cpu_before = _cpu_s()
    for b in range(batches):
        records = [(TOPIC, f"agent-{(b * size + i) % 60}".encode(), VALUE, HEADERS) for i in range(size)]
        started = time.perf_counter()
        send(records)
        walls.append((time.perf_counter() - started) * 1000)
        time.sleep(pause_s)  # a relay wakes up per group commit, not in a tight loop
    cpu = _cpu_s() - cpu_before
    walls.sort()
    return {
        "records": batches * size,
        "cpu_ms_per_record": cpu * 1000 / (batches * size),
        "batch_p50_ms": statistics.median(walls),
        "batch_p99_ms": walls[max(0, int(len(walls) * 0.99) - 1)],
    }


def main() -> None:
    batches = int(os.environ.get("BENCH_KAFKA_BATCHES", "300"))
    size = int(os.environ.get("BENCH_KAFKA_BATCH", "8"))
    rounds = int(os.environ.get("BENCH_KAFKA_ROUNDS", "3"))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        port, controller = free_ports(2)
        node = KafkaNode(Path(tmp), port=port, controller_port=controller)
        node.start()
        try:
            node.wait_ready()
            bootstrap = f"127.0.0.1:{port}"
            ensure_topics(bootstrap, [TOPIC])
            senders = {"kafka-python": kafka_python_sender(bootstrap), "librdkafka": librdkafka_sender(bootstrap)}
            for send in senders.values():  # connections, metadata, the broker's JIT
                _round(send, 50, size, 0.002)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in senders}
            for _ in range(rounds):
                for name, send in senders.items():
                    runs[name].append(_round(send, batches, size, 0.005))
        finally:
            node.stop()
    _write(runs, batches, size, rounds, time.monotonic() - started)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _write(runs: dict[str, list[dict[str, Any]]], batches: int, size: int, rounds: int, took_s: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = OUT / f"kafka-producers-{stamp}.json"
    raw.write_text(json.dumps({"batches": batches, "batch": size, "rounds": rounds, "runs": runs}, indent=2))
    old, new = runs["kafka-python"], runs["librdkafka"]
    lines = [
        "# Kafka producers: kafka-python against librdkafka (confluent-kafka)",
        "",
        f"Run {stamp} on {os.cpu_count()} CPUs; took {took_s:.0f} s.  Command: "
        "`PYTHONPATH=.:gen python -m bench.kafka_producers` (also part of `make bench`).",
        "",
        f"{rounds} alternating rounds of {batches} batches of {size} records ({len(VALUE)} B values, "
        f"{len(HEADERS)} headers), acks=all, idempotent; medians of the rounds.",
        "",
        "| measure | kafka-python | librdkafka | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("cpu_ms_per_record", "CPU ms per record"),
        ("batch_p50_ms", "batch wall p50 ms"),
        ("batch_p99_ms", "batch wall p99 ms"),
    ):
        a, b = _median(old, key), _median(new, key)
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
    lines += ["", f"Raw figures: `{raw}`.", ""]
    (OUT / "kafka-producers-latest.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
