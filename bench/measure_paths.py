"""The outcome measure's index path against the JSON path it replaced, interleaved in one run.

``python -m bench.measure_paths [--sizes 1000,10000] [--postgres URL] [--no-postgres]``

Same data and database for both: per participant a Patient and two total scores per instrument
(``bench.data.observations``). "JSON path" = the measure as it was before the number index
(every total-score Observation's stored JSON streamed through ``Tx.by_token`` and parsed);
"index path" = ``OutcomeService`` as shipped. Rounds alternate the two so a swing in the
machine's load hits both; the best round of each is reported, and both must give the same
MeasureReport groups.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from bench.data import load, observations
from fhir_kat.instruments.definitions import Instrument, load_catalogue
from fhir_kat.instruments.outcomes import ScorePoint
from fhir_kat.search import parse_date_range
from fhir_kat.services.outcomes import FINAL, OutcomeService
from fhir_kat.store import Store, Tx


class JsonPathOutcomes(OutcomeService):
    """``_points`` as it was before the number index (main at 880df51)."""

    def _points(
        self, tx: Tx, inst: Instrument, low: datetime, high: datetime, members: set[str] | None
    ) -> Iterator[ScorePoint]:
        rows = tx.by_token("Observation", "code", inst.total["system"], inst.total["code"])
        for _, content, patient in rows:
            if members is not None and patient not in members:
                continue
            obs = json.loads(content)
            if obs.get("status") not in FINAL:
                continue
            value = obs.get("valueQuantity", {}).get("value", obs.get("valueInteger"))
            when = obs.get("effectiveDateTime")
            parsed = parse_date_range(when) if isinstance(when, str) else None
            if value is None or parsed is None:
                continue
            if parsed[1] < low or parsed[0] > high:
                continue
            yield ScorePoint(patient, parsed[0], float(value))


def run(url: str, participants: int, rounds: int = 5) -> tuple[float, float]:
    store = Store(url)
    store.drop_schema()
    store.create_schema()
    load(store, observations(participants))
    store.analyze()
    catalogue = load_catalogue()
    now = lambda: datetime.now(UTC)  # noqa: E731
    paths = {
        "json": JsonPathOutcomes(store, catalogue, now),
        "index": OutcomeService(store, catalogue, now),
    }
    best = {name: float("inf") for name in paths}
    results = {}
    for _ in range(rounds):
        for name, service in paths.items():
            start = time.perf_counter()
            results[name] = service.results("2026-01-01", "2026-12-31", None)
            best[name] = min(best[name], time.perf_counter() - start)
    assert results["json"] == results["index"], "the two paths disagree"
    store.drop_schema()
    store.dispose()
    return best["json"], best["index"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--sqlite", default="sqlite:////tmp/fhir_kat_measure_paths.sqlite3")
    parser.add_argument(
        "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/fhir_kat_bench"
    )
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    urls = {"SQLite": args.sqlite}
    if not args.no_postgres:
        from bench.run import _postgres

        urls["PostgreSQL"] = _postgres(args.postgres)
    print("| database | participants | JSON path (s) | index path (s) | index / JSON |")
    print("|---|---:|---:|---:|---:|")
    for name, url in urls.items():
        for n in (int(s) for s in args.sizes.split(",")):
            before, after = run(url, n, args.rounds)
            print(
                f"| {name} | {n:,} | {before:.3f} | {after:.3f} | {after / before:.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
