"""fhir_kat benchmarks. Every figure is a ratio against a baseline measured in the same run on
the same machine, with the absolute numbers beside it. Nothing here asserts a time.

    python -m bench.run                 # quick sizes
    python -m bench.run --full          # adds the large sizes (100k participants / resources)
    python -m bench.run --out docs/benchmarks.md

1. mapping: artifacts mapped + validated per second, per kind, vs the bare fhir.resources R4B
   validate + serialise of the same output resources (target: the engine adds at most 25 %).
2. measure: $evaluate-measure over N participants (SQLite), vs reading the same Observations'
   JSON from the database; the cost should grow linearly.
3. search: p50/p99 of Observations by patient and code at N stored resources, vs a primary-key
   read; the p50 should stay flat as N grows (an indexed lookup, not a scan).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhir.resources.R4B import get_fhir_model_class  # noqa: E402

from fhir_kat.artifacts import KINDS  # noqa: E402
from fhir_kat.clinical.protocol import load_protocol  # noqa: E402
from fhir_kat.instruments.definitions import load_catalogue  # noqa: E402
from fhir_kat.mapping import MappingContext, map_artifact  # noqa: E402
from fhir_kat.search import parse_search  # noqa: E402
from fhir_kat.services.outcomes import OutcomeService  # noqa: E402
from fhir_kat.store import Store  # noqa: E402
from fhir_kat.validation.resource import validate_resource  # noqa: E402

EXAMPLES = ROOT / "docs" / "examples"


def best_rate(fn: Callable[[], int], seconds: float = 1.5, rounds: int = 3) -> float:
    """Items per second, best of a few rounds (the least disturbed by the rest of the machine)."""
    rates = []
    for _ in range(rounds):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / rounds:
            done += fn()
        rates.append(done / (time.perf_counter() - start))
    return max(rates)


def bench_mapping() -> list[str]:
    ctx = MappingContext(datetime(2026, 2, 1, tzinfo=UTC), "bench", load_protocol())
    rows = [
        "| kind | engine + validation /s | bare R4B validate + serialise /s | engine overhead |",
        "|---|---:|---:|---:|",
    ]
    for kind in KINDS:
        artifact = json.loads((EXAMPLES / f"{kind}.json").read_text())
        resources = [e["resource"] for e in map_artifact(kind, artifact, ctx)["entry"]]

        def engine(kind: str = kind, artifact: dict[str, Any] = artifact) -> int:
            bundle = map_artifact(kind, artifact, ctx)
            for entry in bundle["entry"]:
                validate_resource(entry["resource"])
            json.dumps(bundle)
            return 1

        def bare(resources: list[dict[str, Any]] = resources) -> int:
            for r in resources:
                get_fhir_model_class(r["resourceType"]).model_validate(r).model_dump_json()
            return 1

        e, b = best_rate(engine), best_rate(bare)
        rows.append(f"| {kind} | {e:,.0f} | {b:,.0f} | {b / e - 1:+.0%} |")
    return rows


def _seed_observations(store: Store, participants: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    cat = load_catalogue()
    t0 = datetime(2026, 1, 10, tzinfo=UTC)
    with store.write() as tx:
        for i in range(participants):
            pid = f"p{i}"
            tx.put({"resourceType": "Patient", "id": pid}, current=None)
            for inst in cat.instruments.values():
                for j, when in enumerate((t0, t0 + timedelta(days=90))):
                    tx.put(
                        {
                            "resourceType": "Observation",
                            "id": f"{pid}-{inst.key}-{j}",
                            "status": "final",
                            "code": {"coding": [dict(inst.total)]},
                            "subject": {"reference": f"Patient/{pid}"},
                            "effectiveDateTime": when.isoformat(),
                            "valueQuantity": {"value": rng.uniform(inst.min, inst.max)},
                        },
                        current=None,
                    )


def bench_measure(sizes: list[int]) -> list[str]:
    rows = [
        "| participants | $evaluate-measure (s) | raw JSON read of the same rows (s) | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(f"sqlite:///{tmp}/m.sqlite3")
            store.create_schema()
            _seed_observations(store, n)
            service = OutcomeService(store, load_catalogue(), lambda: datetime.now(UTC))
            start = time.perf_counter()
            service.evaluate_measure("kat-program-outcomes", "2026-01-01", "2026-12-31", None)
            measure = time.perf_counter() - start
            start = time.perf_counter()
            with store.engine.connect() as conn:
                from sqlalchemy import text

                for (content,) in conn.execute(
                    text("SELECT content FROM resources WHERE res_type='Observation'")
                ):
                    json.loads(content)
            raw = time.perf_counter() - start
            store.dispose()
        rows.append(f"| {n:,} | {measure:.3f} | {raw:.3f} | {measure / raw:.2f}x |")
    return rows


def bench_search(sizes: list[int]) -> list[str]:
    rows = [
        "| stored resources | search p50 (ms) | search p99 (ms) | read-by-id p50 (ms) | ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    cat = load_catalogue()
    code = cat.instruments["phq9"].total
    for n in sizes:
        participants = max(1, n // 9)
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(f"sqlite:///{tmp}/s.sqlite3")
            store.create_schema()
            _seed_observations(store, participants)
            rng = random.Random(2)
            search_ms, read_ms = [], []
            for _ in range(300):
                pid = f"p{rng.randrange(participants)}"
                query = parse_search(
                    "Observation",
                    [("patient", pid), ("code", f"{code['system']}|{code['code']}")],
                    strict=True,
                    default_count=50,
                    max_count=50,
                )
                start = time.perf_counter()
                with store.read() as tx:
                    rows_found, _, _ = tx.search(query)
                search_ms.append((time.perf_counter() - start) * 1000)
                assert len(rows_found) == 2
                start = time.perf_counter()
                with store.read() as tx:
                    tx.get("Patient", pid)
                read_ms.append((time.perf_counter() - start) * 1000)
            store.dispose()
        p50, p99 = statistics.median(search_ms), statistics.quantiles(search_ms, n=100)[98]
        r50 = statistics.median(read_ms)
        rows.append(
            f"| {participants * 9:,} | {p50:.2f} | {p99:.2f} | {r50:.2f} | {p50 / r50:.1f}x |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="add the large sizes")
    parser.add_argument("--out", help="also write the report (Markdown) to this file")
    parser.add_argument(
        "--delivery",
        action="store_true",
        help="add outbox deliveries per second (bench/delivery.py)",
    )
    args = parser.parse_args(argv)
    measure_sizes = [1_000, 3_000] + ([10_000, 100_000] if args.full else [])
    search_sizes = [3_000, 10_000] + ([100_000, 1_000_000] if args.full else [])
    lines = [
        "# Benchmarks",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{'full' if args.full else 'quick'} sizes. Ratios compare with a baseline measured in "
        "the same run; `python -m bench.run [--full]` reproduces them.",
        "",
        "## Mapping: artifacts mapped and validated per second",
        "",
        *bench_mapping(),
        "",
        "## Outcome measure ($evaluate-measure, SQLite)",
        "",
        *bench_measure(measure_sizes),
        "",
        "## Search: Observations by patient and code (SQLite, store level)",
        "",
        *bench_search(search_sizes),
        "",
    ]
    if args.delivery:
        from bench.delivery import bench_delivery

        lines += ["## Delivery: outbox to a loopback partner", "", *bench_delivery(), ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
