"""FerretDB as released against FerretDB with our patches (infra/ferretdb), side by side.

The operations the platform does most, on collections of rising size:

* `find_one` by `_id` (the event store's reads, loads of read-model documents);
* `update_one` by `_id` (the relay's position);
* the projections' guarded upsert, `{_id: k, version: {$lt: n}}` (apply an event once);
* `insert_many` of 10 events (a group commit).

Both builds run at once, each on its own data directory, and get the same operations in
turn, so the machine's state weighs on both alike.  Figures go to
`bench/results/ferretdb-<time>.json` and `bench/results/ferretdb-latest.md`.

    PYTHONPATH=.:gen python -m bench.ferretdb      (BENCH_FERRETDB_SIZES=200,2000,20000
                                                    BENCH_FERRETDB_OPS=100 per operation)
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymongo

from infra.stack import FERRETDB_VERSION, FerretNode, ferretdb_patches, free_ports

OUT = Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parent / "results"))
BUILDS = ("released", "patched")


def _timed(operation: Callable[[int], Any], count: int) -> dict[str, float]:
    times = []
    for i in range(count):
        started = time.perf_counter()
        operation(i)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"p50": statistics.median(times), "p99": times[max(0, int(len(times) * 0.99) - 1)]}


def _operations(db: Any, size: int) -> dict[str, Callable[[int], Any]]:
    views, events = db["views"], db["events"]
    views.insert_many([{"_id": f"agent-{i}", "version": 0, "state": "ready", "pad": "x" * 300} for i in range(size)])
    events.insert_many([{"_id": f"seed-{i}", "payload": "x" * 300} for i in range(size)])

    def key(i: int) -> str:
        return f"agent-{(i * 7919) % size}"

    def guarded(i: int) -> Any:
        try:
            return views.update_one(
                {"_id": key(i), "version": {"$lt": 10**6 + i}},
                {"$set": {"version": 10**6 + i, "state": "busy"}},
                upsert=True,
            )
        except pymongo.errors.DuplicateKeyError:
            return None

    return {
        "find_one by _id": lambda i: views.find_one({"_id": key(i)}),
        "update_one by _id": lambda i: views.update_one({"_id": key(i)}, {"$inc": {"touched": 1}}),
        "guarded upsert {_id, version<n}": guarded,
        "insert_many of 10 events": lambda i: events.insert_many(
            [{"_id": f"run-{i}-{j}", "payload": "x" * 300} for j in range(10)]
        ),
    }


def run(sizes: list[int], count: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="centralino-ferretdb-bench-") as tmp:
        ports = free_ports(2)
        nodes = {
            "released": FerretNode(Path(tmp) / "released", ports[0], patches=()),
            "patched": FerretNode(Path(tmp) / "patched", ports[1]),
        }
        try:
            for node in nodes.values():
                node.start()
            clients: dict[str, Any] = {name: pymongo.MongoClient(node.url) for name, node in nodes.items()}
            for size in sizes:
                ops = {name: _operations(clients[name][f"size{size}"], size) for name in BUILDS}
                for op in ops["released"]:
                    results.setdefault(op, {})[size] = {name: _timed(ops[name][op], count) for name in BUILDS}
        finally:
            for node in nodes.values():
                node.stop()
    return results


def report(results: dict[str, Any], sizes: list[int], count: int) -> str:
    patches = ", ".join(p.name for p in ferretdb_patches())
    lines = [
        "# FerretDB as released against patched",
        "",
        f"FerretDB {FERRETDB_VERSION} (SQLite backend) as released, and with {patches}; "
        f"{count} operations each, ms.  Command: `make bench` (or `python -m bench.ferretdb`).",
        "",
        "| operation | documents | released p50 / p99 | patched p50 / p99 | released / patched (p50) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for op, by_size in results.items():
        for size in sizes:
            r, p = by_size[size]["released"], by_size[size]["patched"]
            lines.append(
                f"| {op} | {size} | {r['p50']:.2f} / {r['p99']:.2f} | {p['p50']:.2f} / {p['p99']:.2f} "
                f"| {r['p50'] / p['p50']:.1f}x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    sizes = [int(s) for s in os.environ.get("BENCH_FERRETDB_SIZES", "200,2000,20000").split(",")]
    count = int(os.environ.get("BENCH_FERRETDB_OPS", "100"))
    results = run(sizes, count)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    OUT.mkdir(parents=True, exist_ok=True)
    figures = {"sizes": sizes, "ops": count, "results": results}
    (OUT / f"ferretdb-{stamp}.json").write_text(json.dumps(figures, indent=2))
    text = report(results, sizes, count)
    (OUT / "ferretdb-latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
