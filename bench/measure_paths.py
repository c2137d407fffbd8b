"""The outcome measure's readings, interleaved in one run on one database.

``python -m bench.measure_paths [--sizes 1000,10000] [--postgres URL] [--no-postgres]``

Same data and database for every path: per participant a Patient and two total scores per
instrument (``bench.data.observations``).

- "JSON": the measure before the number index (main at 880df51): every total-score
  Observation's stored JSON streamed through ``Tx.by_token`` and parsed;
- "index join": the measure before the covering rows (main at ddd8b3a): one statement joining
  the code token → ``resources`` → the status token → the effectiveDateTime date → the value;
- "covering rows": ``OutcomeService`` as shipped (the ``observation_values`` scan).

Rounds alternate the paths so a swing in the machine's load hits all of them; the best round
of each is reported, and all must give the same MeasureReport groups.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

from sqlalchemy import Boolean, DateTime, Float, Integer, String, bindparam, text

from bench.data import load, observations
from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.instruments.outcomes import Fold, ScorePoint, Timeline
from fhir_kat.search import EFFECTIVE_DATETIME, VALUE_INTEGER, parse_date_range
from fhir_kat.services.outcomes import FINAL, OutcomeService
from fhir_kat.store import Store, Tx


class JsonPathOutcomes(OutcomeService):
    """``_folds`` reading each total score's stored JSON (main at 880df51)."""

    def _folds(
        self, tx: Tx, low: datetime, high: datetime, timelines: dict[str, Timeline]
    ) -> dict[str, Fold]:
        folds = {}
        members = set(timelines)
        for inst in self.catalogue.instruments.values():
            fold = folds[inst.key] = Fold(timelines, self.catalogue.measure)
            rows = tx.by_token("Observation", "code", inst.total["system"], inst.total["code"])
            for _, content, patient in rows:
                if patient not in members:
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
                fold.add(ScorePoint(patient, parsed[0], float(value)))
        return folds


_JOIN = text("""
SELECT r.seq, r.patient_id, c.system, c.code, e.low, v.param, v.value
FROM search_token c
CROSS JOIN resources r
CROSS JOIN search_token s
CROSS JOIN search_date e
CROSS JOIN search_number v
WHERE c.res_type = 'Observation' AND c.param = 'code' AND c.code IN :codes
  AND r.res_type = c.res_type AND r.res_id = c.res_id
  AND r.deleted = :deleted AND r.patient_id IS NOT NULL
  AND s.res_type = c.res_type AND s.res_id = c.res_id
  AND s.param = 'status' AND s.code IN :statuses
  AND e.res_type = c.res_type AND e.res_id = c.res_id
  AND e.param = :effective AND e.high >= :low AND e.low <= :high
  AND v.res_type = c.res_type AND v.res_id = c.res_id
  AND v.param IN (:quantity, :integer)
ORDER BY r.seq, c.system, c.code, v.param DESC
""").bindparams(
    bindparam("codes", expanding=True, type_=String),
    bindparam("statuses", expanding=True, type_=String),
    bindparam("deleted", type_=Boolean),
    bindparam("low", type_=DateTime),
    bindparam("high", type_=DateTime),
)


class IndexJoinOutcomes(OutcomeService):
    """``_folds`` through the five-way index join (main at ddd8b3a; the participants counted
    are filtered while reading). Neither historical path checks ``derivedFrom``: every score
    the benchmark loads is derived from a response, so all three read the same scores."""

    def _folds(
        self, tx: Tx, low: datetime, high: datetime, timelines: dict[str, Timeline]
    ) -> dict[str, Fold]:
        folds: dict[tuple[str, str], Fold] = {}
        by_key = {}
        members = set(timelines)
        for inst in self.catalogue.instruments.values():
            key = (inst.total["system"], inst.total["code"])
            by_key[inst.key] = folds[key] = Fold(timelines, self.catalogue.measure)
        stmt = (
            _JOIN.bindparams(
                codes=sorted({code for _, code in folds}),
                statuses=sorted(FINAL),
                deleted=False,
                effective=EFFECTIVE_DATETIME,
                low=low,
                high=high,
                quantity="value-quantity",
                integer=VALUE_INTEGER,
            )
            .columns(seq=Integer, low=DateTime, value=Float)
            .execution_options(stream_results=True, yield_per=2000)
        )
        previous = None
        for seq, patient, system, code, start, _param, number in tx.conn.execute(stmt):
            fold = folds.get((system, code))
            if fold is None or (seq, system, code) == previous:
                continue
            previous = (seq, system, code)
            if patient not in members:
                continue
            fold.add(ScorePoint(patient, start, float(number)))
        return by_key


PATHS = {
    "JSON": JsonPathOutcomes,
    "index join": IndexJoinOutcomes,
    "covering rows": OutcomeService,
}


def run(url: str, participants: int, rounds: int = 5) -> dict[str, float]:
    store = Store(url)
    store.drop_schema()
    store.create_schema()
    load(store, observations(participants))
    store.analyze()
    catalogue = load_catalogue()
    now = lambda: datetime.now(UTC)  # noqa: E731
    services = {name: cls(store, catalogue, now) for name, cls in PATHS.items()}
    best = {name: float("inf") for name in services}
    results = {}
    for _ in range(rounds):
        for name, service in services.items():
            start = time.perf_counter()
            results[name] = service.results("2026-01-01", "2026-12-31", None)
            best[name] = min(best[name], time.perf_counter() - start)
    first = results["JSON"]
    assert all(r == first for r in results.values()), "the paths disagree"
    assert any(r.denominator for r in first)
    store.drop_schema()
    store.dispose()
    return best


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
    names = list(PATHS)
    print(
        "| database | participants | "
        + " | ".join(f"{n} (s)" for n in names)
        + " | covering / JSON | covering / index join |"
    )
    print("|---|---:|" + "---:|" * (len(names) + 2))
    for name, url in urls.items():
        for n in (int(s) for s in args.sizes.split(",")):
            best = run(url, n, args.rounds)
            cells = " | ".join(f"{best[p]:.3f}" for p in names)
            ratio_json = best["covering rows"] / best["JSON"]
            ratio_join = best["covering rows"] / best["index join"]
            print(
                f"| {name} | {n:,} | {cells} | {ratio_json:.2f}x | {ratio_join:.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
