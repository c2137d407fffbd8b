"""Search benchmark: the health authority's typical searches at growing N, store level.

Data (``bench.data``): per participant a Patient and eight total-score Observations, plus one
Task per ten resources, ~100 per referring organisation; ``lastUpdated`` spreads over the load.
So each search returns about as many resources at every N, and a flat cost means an indexed
lookup. Searches:

- ``Observation?patient=…&code=<PHQ-9 total>`` (2 matches; ``code`` alone matches 2 per participant)
- ``Task?requester=…&_lastUpdated=ge<midpoint>`` (~50 matches; ``_lastUpdated`` alone ~N/20)
- paging: ``Task?requester=…&_count=20`` and every next page (``_cursor``) to the end
Baseline: a read by id in the same database.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from sqlalchemy import event

from bench.data import T0, StepClock, interleave, load, observations, tasks
from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.search import parse_search
from fhir_kat.store import Store
from fhir_kat.store.store import format_instant

ROUNDS = 200


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def seed(store: Store, n: int) -> dict[str, int]:
    participants = max(1, n * 9 // 10 // 9)
    task_count = max(1, n // 10)
    load(store, interleave(list(observations(participants)), list(tasks(task_count))))
    return {"participants": participants, "tasks": task_count}


def run(url: str, n: int) -> dict[str, float]:
    """p50/p99 (ms) of each search after loading about ``n`` resources into an empty ``url``."""
    store = Store(url, clock=StepClock())
    store.drop_schema()
    store.create_schema()
    start = time.perf_counter()
    sizes = seed(store, n)
    store.analyze()  # what the store does by itself as writes accumulate
    load_s = time.perf_counter() - start
    end = store.clock()
    midpoint = format_instant(T0 + (end - T0) / 2)
    code = load_catalogue().instruments["phq9"].total
    organisations = max(1, sizes["tasks"] // 100)
    token = f"{code['system']}|{code['code']}"
    rng = random.Random(2)
    # SELECTs per search (each one a round trip on PostgreSQL), to show what planning costs.
    statements = [0]

    def count_select(_conn: object, _cursor: object, sql: str, *_: object) -> None:
        if sql.lstrip().upper().startswith("SELECT"):  # not SQLite's BEGIN
            statements[0] += 1

    event.listen(store.engine, "before_cursor_execute", count_select)
    sent = {"obs": 0, "task": 0, "page": 0}

    def counted(kind: str, fn: Callable[[], object]) -> float:
        before = statements[0]
        took = _ms(fn)
        sent[kind] += statements[0] - before
        return took

    def search(rtype: str, pairs: list[tuple[str, str]]) -> tuple[int, int | None]:
        query = parse_search(rtype, pairs, strict=True, default_count=50, max_count=200)
        with store.read(transaction=False) as tx:  # as the REST searches
            rows, _, more = tx.search(query)
        return (rows[-1].seq if more and rows else 0), len(rows)

    obs_ms, task_ms, page_ms, read_ms = [], [], [], []
    pages = 0
    for _ in range(ROUNDS):
        pid = f"p{rng.randrange(sizes['participants'])}"
        org = f"Organization/org{rng.randrange(organisations)}"
        obs_ms.append(
            counted("obs", lambda p=pid: search("Observation", [("patient", p), ("code", token)]))
        )
        task_ms.append(
            counted(
                "task",
                lambda o=org: search("Task", [("requester", o), ("_lastUpdated", f"ge{midpoint}")]),
            )
        )
        cursor = None
        while True:
            pairs = [("requester", org), ("_count", "20")]
            if cursor:
                pairs.append(("_cursor", str(cursor)))
            before = statements[0]
            start = time.perf_counter()
            cursor, _ = search("Task", pairs)
            page_ms.append((time.perf_counter() - start) * 1000)
            sent["page"] += statements[0] - before
            pages += 1
            if not cursor:
                break
        read_ms.append(_ms(lambda p=pid: _read(store, p)))
    store.drop_schema()
    store.dispose()
    return {
        "n": sizes["participants"] * 9 + sizes["tasks"],
        "obs_p50": statistics.median(obs_ms),
        "obs_p99": _pct(obs_ms, 99),
        "task_p50": statistics.median(task_ms),
        "task_p99": _pct(task_ms, 99),
        "page_p50": statistics.median(page_ms),
        "page_p99": _pct(page_ms, 99),
        "pages": pages / ROUNDS,
        "read_p50": statistics.median(read_ms),
        "obs_sql": sent["obs"] / ROUNDS,
        "task_sql": sent["task"] / ROUNDS,
        "page_sql": sent["page"] / pages,
        "load_s": load_s,
    }


def _read(store: Store, pid: str) -> None:
    with store.read(transaction=False) as tx:  # as the REST reads
        tx.get("Patient", pid)


def table(results: list[tuple[str, dict[str, float]]]) -> list[str]:
    rows = [
        "| database | stored resources | Obs patient+code p50 / p99 "
        "| Task requester+_lastUpdated p50 / p99 | paging p50 / p99 (pages) "
        "| read-by-id p50 | Obs p50 / read | growth of p50s vs smallest N "
        "| SELECTs per search (Obs / Task / page) | load + ANALYZE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first: dict[str, dict[str, float]] = {}
    for db, r in results:
        base = first.setdefault(db, r)
        growth = " / ".join(
            f"{r[k] / base[k] - 1:+.0%}" for k in ("obs_p50", "task_p50", "page_p50")
        )
        rows.append(
            f"| {db} | {r['n']:,.0f} | {r['obs_p50']:.2f} / {r['obs_p99']:.2f} ms "
            f"| {r['task_p50']:.2f} / {r['task_p99']:.2f} ms "
            f"| {r['page_p50']:.2f} / {r['page_p99']:.2f} ms ({r['pages']:.1f}) "
            f"| {r['read_p50']:.2f} ms | {r['obs_p50'] / r['read_p50']:.1f}x | {growth} "
            f"| {r['obs_sql']:.1f} / {r['task_sql']:.1f} / {r['page_sql']:.1f} "
            f"| {r['load_s']:.0f} s |"
        )
    return rows
