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


class _Size:
    """One loaded database of about ``n`` resources and the timings taken from it so far."""

    def __init__(self, url: str, n: int) -> None:
        self.store = store = Store(url, clock=StepClock())
        store.drop_schema()
        store.create_schema()
        start = time.perf_counter()
        self.sizes = seed(store, n)
        store.analyze()  # what the store does by itself as writes accumulate
        self.load_s = time.perf_counter() - start
        self.midpoint = format_instant(T0 + (store.clock() - T0) / 2)
        code = load_catalogue().instruments["phq9"].total
        self.token = f"{code['system']}|{code['code']}"
        self.organisations = max(1, self.sizes["tasks"] // 100)
        self.rng = random.Random(2)
        # SELECTs per search (each one a round trip on PostgreSQL), to show what planning costs.
        self.statements = 0
        event.listen(store.engine, "before_cursor_execute", self._count_select)
        self.sent = {"obs": 0, "task": 0, "page": 0}
        self.ms: dict[str, list[float]] = {"obs": [], "task": [], "page": [], "read": []}
        self.pages = 0

    def _count_select(self, _conn: object, _cursor: object, sql: str, *_: object) -> None:
        if sql.lstrip().upper().startswith("SELECT"):  # not SQLite's BEGIN
            self.statements += 1

    def _search(self, rtype: str, pairs: list[tuple[str, str]]) -> int:
        query = parse_search(rtype, pairs, strict=True, default_count=50, max_count=200)
        with self.store.read(transaction=False) as tx:  # as the REST searches
            rows, _, more = tx.search(query)
        return rows[-1].seq if more and rows else 0

    def _timed(self, kind: str, fn: Callable[[], object]) -> None:
        before = self.statements
        self.ms[kind].append(_ms(fn))
        self.sent[kind] += self.statements - before

    def one_round(self) -> None:
        pid = f"p{self.rng.randrange(self.sizes['participants'])}"
        org = f"Organization/org{self.rng.randrange(self.organisations)}"
        self._timed(
            "obs", lambda: self._search("Observation", [("patient", pid), ("code", self.token)])
        )
        self._timed(
            "task",
            lambda: self._search(
                "Task", [("requester", org), ("_lastUpdated", f"ge{self.midpoint}")]
            ),
        )
        cursor = 0
        while True:
            pairs = [("requester", org), ("_count", "20")]
            if cursor:
                pairs.append(("_cursor", str(cursor)))
            before = self.statements
            start = time.perf_counter()
            cursor = self._search("Task", pairs)
            self.ms["page"].append((time.perf_counter() - start) * 1000)
            self.sent["page"] += self.statements - before
            self.pages += 1
            if not cursor:
                break
        self.ms["read"].append(_ms(lambda: _read(self.store, pid)))

    def result(self) -> dict[str, float]:
        self.store.drop_schema()
        self.store.dispose()
        ms = self.ms
        return {
            "n": self.sizes["participants"] * 9 + self.sizes["tasks"],
            "obs_p50": statistics.median(ms["obs"]),
            "obs_p99": _pct(ms["obs"], 99),
            "task_p50": statistics.median(ms["task"]),
            "task_p99": _pct(ms["task"], 99),
            "page_p50": statistics.median(ms["page"]),
            "page_p99": _pct(ms["page"], 99),
            "pages": self.pages / ROUNDS,
            "read_p50": statistics.median(ms["read"]),
            "obs_sql": self.sent["obs"] / ROUNDS,
            "task_sql": self.sent["task"] / ROUNDS,
            "page_sql": self.sent["page"] / self.pages,
            "load_s": self.load_s,
        }


def run(urls: dict[int, str]) -> dict[int, dict[str, float]]:
    """p50/p99 (ms) of each search at each size: ``urls`` maps a size to an empty database of
    its own. Every size is loaded first, then the rounds alternate between the sizes, so a
    change in the machine's load during the run touches every size alike (measured one after
    the other, identical code showed -20 % to +67 % "growth" from 10k to 100k on a quiet
    machine)."""
    loaded = {n: _Size(url, n) for n, url in urls.items()}
    for _ in range(ROUNDS):
        for size in loaded.values():
            size.one_round()
    return {n: size.result() for n, size in loaded.items()}


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
