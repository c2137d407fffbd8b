"""The fast paths of issue 9 give the same answers as the general ones they replace.

- ``Tx.create_many`` stores exactly what one ``put`` per resource stores (JSON, versions, index).
- The outcome measure's single streamed join (``Tx.by_token``) gives the same results as the
  old batched search (``Observation?code=…&status=…&date=ge…&date=le…`` through ``Tx.scan``),
  on a generated cohort full of edge cases, with and without a cohort Group.
- The benchmarks' bulk loader (``bench.data.load``) writes exactly the rows of ``create_many``.
- A search's total, fetched with its page in one statement, and its pages equal a plain
  count and listing of every match, with the round trips pinned per kind of search.
- ``parse_date_range``'s fast path for full dateTimes agrees with the general parser.

No timings here: the figures are in bench/ and docs/benchmarks.md.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, event, or_, select, update

from bench import data as bench_data
from fhir_kat.cli import main as cli_main
from fhir_kat.instruments.definitions import Catalogue, Instrument, load_catalogue
from fhir_kat.instruments.outcomes import Fold, ScorePoint, counted, evaluate_fold, read_range
from fhir_kat.search import (
    EFFECTIVE_DATETIME,
    VALUE_INTEGER,
    Criterion,
    SearchQuery,
    _parse_date_range,
    parse_date_range,
    parse_search,
)
from fhir_kat.services import outcomes
from fhir_kat.services.outcomes import FINAL, OutcomeService
from fhir_kat.store import Store, Tx
from fhir_kat.store import reindex as reindex_module
from fhir_kat.store.observations import observation_values
from fhir_kat.store.reindex import current_fingerprints, recorded_fingerprints, stale_types
from fhir_kat.store.schema import (
    INDEX_TABLES,
    resources,
    search_date,
    search_number,
    store_meta,
)
from fhir_kat.store.schema import observation_values as value_table
from tests.conftest import FakeClock
from tests.support.scores import set_score_value
from tests.support.store_dump import dump_tables


def _cohort(catalogue: Catalogue, participants: int, seed: int) -> Iterator[dict[str, Any]]:
    """Synthetic total-score Observations with the cases the measure must get right: ties in
    time, other statuses, dates either side of the period, zones, Period- and instant-valued
    effective, valueInteger, decimals, zero, missing values (a Quantity without a value, a
    coded value), both value rows at once, the code in another system, a Group as subject,
    Observations without a subject."""
    rng = random.Random(seed)
    t0 = datetime(2026, 1, 10, tzinfo=UTC)
    n = 0
    # Everyone's program ran from the day after t0 to t0 + 85 days: the -20/0-day scores are
    # baselines, the +90-day ones posts (a few completers dropped out instead).
    yield {
        "resourceType": "Group",
        "id": "program",
        "type": "person",
        "actual": True,
        "member": [
            {
                "entity": {"reference": f"Patient/p{i}"},
                "period": {"start": "2026-01-11", "end": "2026-04-05"},
                **({"inactive": True} if i % 7 == 3 else {}),
            }
            for i in range(participants)
        ],
    }
    for i in range(participants):
        pid = f"p{i}"
        yield {"resourceType": "Patient", "id": pid}
        for inst in catalogue.instruments.values():
            for _ in range(rng.randrange(0, 4)):
                n += 1
                obs: dict[str, Any] = {
                    "resourceType": "Observation",
                    "id": f"o{n}",
                    "status": rng.choice((*FINAL, "preliminary", "entered-in-error")),
                    "code": {"coding": [dict(inst.total)]},
                    "subject": {"reference": f"Patient/{pid}"},
                }
                subject = rng.random()
                if subject < 0.05:
                    del obs["subject"]
                elif subject < 0.08:
                    obs["subject"] = {"reference": "Group/cohort"}
                if rng.random() < 0.04:
                    obs["code"] = {"coding": [{"system": "urn:other", "code": inst.total["code"]}]}
                when = t0 + timedelta(days=rng.choice((-20, 0, 0, 45, 90, 400)))
                shape = rng.random()
                if shape < 0.04:
                    obs["effectiveInstant"] = when.isoformat()
                elif shape < 0.1:
                    obs["effectivePeriod"] = {"start": when.isoformat()}
                elif shape < 0.2:
                    obs["effectiveDateTime"] = when.date().isoformat()
                elif shape < 0.3:
                    obs["effectiveDateTime"] = (
                        when.astimezone(UTC).isoformat().replace("+00:00", "-08:00")
                    )
                else:
                    obs["effectiveDateTime"] = when.isoformat()
                score = rng.randint(int(inst.min), int(inst.max))
                set_score_value(obs, score, rng, none_above=0.95, offsets=(0, 0, 0.5, 0.25, -score))
                if rng.random() < 0.92:  # else typed in by hand: not a program score
                    obs["derivedFrom"] = [{"reference": f"QuestionnaireResponse/q{n}"}]
                yield obs


def _reference_points(
    tx: Tx, inst: Instrument, low: datetime, high: datetime, members: set[str] | None
) -> Iterator[ScorePoint]:
    """The measure's data as it was read before issue 9: the generic search, in batches."""
    query = SearchQuery(
        "Observation",
        criteria=(
            Criterion("code", "token", "", ((inst.total["system"], inst.total["code"], True),), ""),
            Criterion("status", "token", "", tuple((None, s, False) for s in FINAL), ""),
            Criterion("date", "date", "", (("ge", low, low),), ""),
            Criterion("date", "date", "", (("le", high, high),), ""),
        ),
    )
    after = 0
    while True:
        batch = tx.scan(query, after_seq=after, limit=7, patients=members)
        for _, content, patient in batch:
            if patient is None:
                continue
            obs = json.loads(content)
            if not any(
                d.get("reference", "").startswith("QuestionnaireResponse/")
                for d in obs.get("derivedFrom", [])
            ):
                continue
            value = obs.get("valueQuantity", {}).get("value", obs.get("valueInteger"))
            when = obs.get("effectiveDateTime")
            parsed = parse_date_range(when) if isinstance(when, str) else None
            if value is None or parsed is None:
                continue
            yield ScorePoint(patient, parsed[0], float(value))
        if len(batch) < 7:
            return
        after = batch[-1][0]


def _load(store: Store, items: list[dict[str, Any]], bulk: bool) -> None:
    with store.write() as tx:
        if bulk:
            tx.create_many(items)
        else:
            for item in items:
                tx.put(item, current=None)


@pytest.mark.parametrize("group", ["none", "small", "large"])
def test_measure_matches_the_search_based_reading(
    database_url: str, group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if group == "large":  # a cohort too large for an IN list is filtered while reading
        monkeypatch.setattr(outcomes, "MEMBERS_IN_SQL", 5)
    catalogue = load_catalogue()
    store = Store(database_url, clock=FakeClock())
    store.create_schema()
    try:
        items = list(_cohort(catalogue, 60, seed=5))
        _load(store, items, bulk=True)
        members = {f"p{i}" for i in range(0, 60, 3)} if group != "none" else None
        if members is not None:
            with store.write() as tx:
                tx.put(
                    {
                        "resourceType": "Group",
                        "id": "cohort",
                        "type": "person",
                        "actual": True,
                        "member": [{"entity": {"reference": f"Patient/{m}"}} for m in members],
                    },
                    current=None,
                )
        # Deleted and updated Observations: only the current version counts.
        _delete_and_update(store, items)
        service = OutcomeService(store, catalogue, lambda: datetime.now(UTC))
        subject = "Group/cohort" if members is not None else None
        for start, end in (("2026-01-01", "2026-12-31"), ("2026-01-10", "2026-04-10")):
            got = service.results(start, end, subject)
            low, high = parse_date_range(start), parse_date_range(end)
            assert low is not None and high is not None
            with store.read() as tx:
                lines = counted(service.timelines(tx, members), low[0], high[1])
                span = read_range(lines.values(), catalogue.measure)
                assert span is not None
                want = []
                for inst in catalogue.instruments.values():
                    fold = Fold(lines, catalogue.measure)
                    for point in _reference_points(tx, inst, span[0], span[1], set(lines)):
                        fold.add(point)
                    want.append(evaluate_fold(inst, fold, lines, catalogue.measure))
            assert got == want
            assert any(r.denominator for r in got)  # the cohort exercises the arithmetic
    finally:
        store.drop_schema()
        store.dispose()


def _delete_and_update(store: Store, items: list[dict[str, Any]]) -> None:
    """Delete one final Observation with a value and rewrite others every way that moves
    them in or out of the measure; each update's index rows must replace the old ones."""
    scored = [
        o["id"]
        for o in items
        if o["resourceType"] == "Observation"
        and o.get("status") == "final"
        and "effectiveDateTime" in o
        and "value" in o.get("valueQuantity", {})
        and "subject" in o
    ]
    edits: list[Any] = [
        lambda o: o.update(status="amended"),
        lambda o: o.update(status="preliminary"),
        lambda o: (o.pop("valueQuantity"), o.update(valueInteger=3)),
        lambda o: o["valueQuantity"].update(value=7.75),
        lambda o: o["valueQuantity"].pop("value"),
        lambda o: o.update(effectiveDateTime="2031-01-01"),
        lambda o: o.update(effectivePeriod={"start": o.pop("effectiveDateTime")}),
    ]
    with store.write() as tx:
        gone = tx.get("Observation", scored[0])
        assert gone is not None
        tx.delete(gone)
        for rid, edit in zip(scored[1:], edits, strict=False):
            current = tx.get("Observation", rid)
            assert current is not None
            changed = current.json()
            edit(changed)
            tx.put(changed, current=current)
    with store.read() as tx:
        for table in INDEX_TABLES:
            rows = tx.conn.execute(select(table).where(table.c.res_id == scored[0])).all()
            assert not rows, f"{table.name} keeps rows of a deleted resource"
        numbers = {
            rid: sorted(
                (r.param, r.value)
                for r in tx.conn.execute(select(search_number).where(search_number.c.res_id == rid))
            )
            for rid in scored[3:6]
        }
        assert list(numbers.values()) == [
            [(VALUE_INTEGER, 3.0)],
            [("value-quantity", 7.75)],
            [],
        ], "an update must replace the resource's number rows, not add to them"


def test_create_many_stores_what_put_stores(tmp_path: Any) -> None:
    items = list(_cohort(load_catalogue(), 15, seed=9))
    items.append(
        {
            "resourceType": "Task",
            "id": "t1",
            "meta": {"tag": [{"system": "urn:x", "code": "y"}]},
            "status": "requested",
            "intent": "order",
            "requester": {"reference": "Organization/org1"},
            "for": {"reference": "Patient/p1"},
        }
    )
    dumps = []
    for bulk in (False, True):
        store = Store(f"sqlite:///{tmp_path}/{bulk}.sqlite3", clock=lambda: datetime(2026, 2, 1))
        store.create_schema()
        _load(store, items, bulk)
        dumps.append(dump_tables(store))
        store.dispose()
    assert dumps[0] == dumps[1]
    assert len(dumps[0]["search_token"]) > len(items)


def test_fast_date_path_agrees_with_the_general_parser() -> None:
    rng = random.Random(1)
    checked = 0
    for _ in range(20_000):
        text = (
            f"{rng.choice(['2026', '1999', '0001'])}-{rng.choice(['01', '02', '12', '13'])}-"
            f"{rng.choice(['01', '28', '29', '31', '00'])}T{rng.choice(['00', '23', '24'])}:"
            f"{rng.choice(['00', '59', '60'])}:{rng.choice(['00', '59', '60'])}"
            f"{rng.choice(['', '.1', '.123', '.123456', '.1234567'])}"
            f"{rng.choice(['Z', '+00:00', '-05:30', '+14:00', ''])}"
        )
        try:
            want = _parse_date_range(text)
        except OverflowError:
            continue  # 0001-01-01T00:00+14:00 lies before datetime.min either way
        assert parse_date_range(text) == want, text
        checked += 1
    assert checked > 19_000


def test_matches_returns_the_page_search_returns(database_url: str) -> None:
    """``Tx.matches`` (the services' look-ups, no total) gives exactly ``search``'s page."""
    store = Store(database_url, clock=FakeClock())
    store.create_schema()
    try:
        with store.write() as tx:
            for resource in _cohort(load_catalogue(), 30, seed=9):
                tx.put(resource, current=None)
        total_code = next(iter(load_catalogue().instruments.values())).total
        token = ((total_code["system"], total_code["code"], True),)
        queries = [
            SearchQuery("Observation", criteria=(Criterion("code", "token", "", token, ""),)),
            SearchQuery(
                "Observation",
                criteria=(
                    Criterion("code", "token", "", token, ""),
                    Criterion("patient", "reference", "", (("Patient", "p3"),), ""),
                ),
                count=2,
                sort_desc=True,
            ),
            SearchQuery("Observation", criteria=(Criterion("_id", "id", "", ("o1", "o2"), ""),)),
            SearchQuery("Patient", count=7, cursor=3),
            SearchQuery("Task"),
        ]
        with store.read() as tx:
            for query in queries:
                rows, _, _ = tx.search(query)
                assert tx.matches(query) == rows
            assert tx.search(queries[0])[0], "the cohort has matches to compare"
    finally:
        store.dispose()


def test_bench_loader_writes_what_create_many_writes(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bench.data.load`` (rows built in Python, COPY / executemany) stores the same rows as
    ``Tx.create_many`` per chunk, seqs included, across several chunks and transactions; and
    later writes carry on after the loaded seqs (PostgreSQL's sequence moved past them)."""
    monkeypatch.setattr(bench_data, "CHUNK", 7)
    items = list(
        bench_data.interleave(
            list(_cohort(load_catalogue(), 12, seed=3)), list(bench_data.tasks(30, per_requester=4))
        )
    )
    items.append(
        {
            "resourceType": "Task",
            "id": "tagged",
            "meta": {"tag": [{"system": "urn:x", "code": "y"}]},
            "status": "requested",
            "intent": "order",
        }
    )
    dumps = []
    for fast in (False, True):
        store = Store(database_url, clock=bench_data.StepClock())
        store.drop_schema()
        store.create_schema()
        try:
            if fast:
                assert bench_data.load(store, iter(items), batch=20) == len(items)
            else:
                assert bench_data.load_through_tx(store, iter(items)) == len(items)
            with store.write() as tx:
                tx.put({"resourceType": "Patient", "id": "later"}, current=None)
            with store.read() as tx:  # a create's seq is the database's, once it is sent
                after = tx.get("Patient", "later")
            assert after is not None and after.seq == len(items) + 1
            dumps.append(dump_tables(store))
        finally:
            store.drop_schema()
            store.dispose()
    assert sum(len(rows) for rows in dumps[0].values()) > 3 * len(items)
    assert dumps[0] == dumps[1]


def _search_store(database_url: str) -> Store:
    """Tasks for three requesters (one with most of them) and Observations per patient, a
    deleted and an updated Task among them, in several transactions (distinct lastUpdated)."""
    store = Store(database_url, clock=FakeClock())
    store.create_schema()
    rng = random.Random(11)
    items: list[dict[str, Any]] = []
    for i in range(40):
        items.append(
            {
                "resourceType": "Task",
                "id": f"t{i}",
                "status": rng.choice(("requested", "accepted")),
                "intent": "order",
                "requester": {"reference": f"Organization/org{min(2, rng.randrange(4))}"},
                "for": {"reference": f"Patient/p{rng.randrange(5)}"},
            }
        )
    for i in range(5):
        for j in range(4):
            items.append(
                {
                    "resourceType": "Observation",
                    "id": f"o{i}-{j}",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": f"c{j % 2}"}]},
                    "subject": {"reference": f"Patient/p{i}"},
                }
            )
    for start in range(0, len(items), 15):
        _load(store, items[start : start + 15], bulk=True)
    with store.write() as tx:
        gone = tx.get("Task", "t3")
        assert gone is not None
        tx.delete(gone)
        changed = tx.get("Task", "t5")
        assert changed is not None
        tx.put({**changed.json(), "status": "accepted"}, current=changed)
    return store


SEARCHES = [
    ("Task", [("requester", "Organization/org2")]),
    ("Task", [("requester", "Organization/org0"), ("status", "accepted")]),
    ("Task", [("requester", "Organization/org2"), ("_sort", "-_lastUpdated")]),
    ("Task", [("_lastUpdated", "ge2026-01-15T09:00:00.030Z"), ("requester", "Organization/org1")]),
    ("Task", [("status:not", "accepted")]),
    ("Task", [("status", "accepted"), ("patient:missing", "false")]),
    ("Task", []),
    ("Task", [("requester", "Organization/nobody")]),
    ("Observation", [("patient", "p1"), ("code", "http://loinc.org|c1")]),
    ("Observation", [("code", "c0")]),
]


@pytest.mark.parametrize("visible", [None, {"p1", "p2"}])
def test_search_total_and_pages_match_a_plain_reading(
    database_url: str, visible: set[str] | None
) -> None:
    """The total fetched with the page, the empty-page fallbacks and the planner-chosen order
    (one criterion on PostgreSQL) give the same pages, totals and next-page flags as counting
    and listing every match in write order."""
    store = _search_store(database_url)
    try:
        for rtype, pairs in SEARCHES:
            query = parse_search(rtype, pairs, strict=True, default_count=3, max_count=10)
            with store.read() as tx:
                where = tx._where(query)
                if visible is not None:
                    where.append(
                        or_(resources.c.patient_id.is_(None), resources.c.patient_id.in_(visible))
                    )
                order = resources.c.seq.desc() if query.sort_desc else resources.c.seq
                stmt = select(resources.c.seq, resources.c.res_id).where(*where).order_by(order)
                everything = [(int(s), i) for s, i in tx.conn.execute(stmt)]
            seen: list[str] = []
            cursor: int | None = None
            while True:
                page_query = replace(query, cursor=cursor)
                with store.read() as tx:
                    rows, total, more = tx.search(page_query, visible_patients=visible)
                assert total == len(everything), (rtype, pairs)
                assert [r.id for r in rows] == [i for _, i in everything][len(seen) : len(seen) + 3]
                seen.extend(r.id for r in rows)
                assert more == (len(seen) < len(everything))
                if not more:
                    break
                cursor = rows[-1].seq
            assert seen == [i for _, i in everything]
            # A cursor past the last match: an empty page, the total still right.
            last = everything[-1][0] if everything else 0
            with store.read() as tx:
                rows, total, more = tx.search(replace(query, cursor=last), visible_patients=visible)
            assert (rows, total, more) == ([], len(everything), False)
            with store.read() as tx:
                counted = tx.search(replace(query, summary_count=True), visible_patients=visible)
            assert counted == ([], len(everything), False)
    finally:
        store.drop_schema()
        store.dispose()


def test_search_round_trips(database_url: str) -> None:
    """Statements per search: the total rides with the page; the capped estimates run only
    when there is a driver to choose (on PostgreSQL; SQLite's planner needs the estimate even
    for one criterion, and it costs no network round trip)."""
    store = _search_store(database_url)
    statements: list[str] = []
    event.listen(
        store.engine, "before_cursor_execute", lambda _c, _cur, sql, *_a: statements.append(sql)
    )
    one = 2 if store.is_sqlite else 1

    def run(rtype: str, pairs: list[tuple[str, str]], cursor: int | None = None) -> int:
        query = parse_search(rtype, pairs, strict=True, default_count=3, max_count=10)
        with store.read() as tx:
            statements.clear()
            tx.search(replace(query, cursor=cursor))
        return sum(1 for s in statements if s.lstrip().upper().startswith("SELECT"))

    try:
        assert run("Task", [("requester", "Organization/org2")]) == one
        assert run("Task", [("requester", "Organization/org2")], cursor=5) == one
        assert run("Task", [("requester", "Organization/org0"), ("status", "accepted")]) == 2
        assert run("Task", []) == 1
        # An empty page after a cursor counts separately; an empty first page needs no count.
        assert run("Task", [("requester", "Organization/org2")], cursor=10**9) == one + 1
        assert run("Task", [("requester", "Organization/nobody")]) == one
    finally:
        store.drop_schema()
        store.dispose()


def _measure(store: Store) -> list[Any]:
    service = OutcomeService(store, load_catalogue(), lambda: datetime.now(UTC))
    return service.results("2026-01-01", "2026-12-31", None)


def test_a_database_from_before_the_number_index_is_rebuilt_at_start_up(
    database_url: str,
) -> None:
    """Observations stored before the number index have no number rows (nor the internal
    effectiveDateTime rows): ``create_schema`` finds their type stale and rewrites exactly
    the rows a write stores, and the measure then reads what it read before."""
    store = Store(database_url, clock=FakeClock())
    store.create_schema()
    try:
        items = list(_cohort(load_catalogue(), 40, seed=11))
        with store.write() as tx:
            for item in items:
                tx.put(item, current=None)
        _delete_and_update(store, items)
        written, want = dump_tables(store), _measure(store)
        with store.write() as tx:  # the database as an older version left it
            tx.conn.execute(delete(search_number))
            tx.conn.execute(delete(search_date).where(search_date.c.param == EFFECTIVE_DATETIME))
            tx.conn.execute(delete(value_table))  # (and of course before the covering rows)
            tx.conn.execute(delete(store_meta))
        assert _measure(store) != want  # the measure needs those rows
        with store.read() as tx:
            assert "Observation" in stale_types(tx.conn)
        store.create_schema()
        assert dump_tables(store) == written
        assert _measure(store) == want
        with store.read() as tx:
            assert stale_types(tx.conn) == []
            assert recorded_fingerprints(tx.conn) == current_fingerprints()
    finally:
        store.drop_schema()
        store.dispose()


def test_only_types_whose_parameters_changed_are_rebuilt(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(f"sqlite:///{tmp_path}/kat.sqlite3", clock=FakeClock())
    store.create_schema()
    with store.write() as tx:
        for item in _cohort(load_catalogue(), 3, seed=1):
            tx.put(item, current=None)
        recorded = recorded_fingerprints(tx.conn)
        recorded["Patient"] = "written-by-an-older-version"
        tx.conn.execute(
            update(store_meta)
            .values(value=json.dumps(recorded))
            .where(store_meta.c.name == "index")
        )
    calls: list[list[str]] = []
    original = reindex_module.reindex
    monkeypatch.setattr(
        reindex_module,
        "reindex",
        lambda conn, types, *a: (calls.append(list(types)), original(conn, types, *a))[1],
    )
    store.create_schema()
    store.create_schema()
    assert calls == [["Patient"], []]
    store.dispose()


def test_reindex_command_rebuilds_on_demand(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/kat.sqlite3"
    store = Store(url, clock=FakeClock())
    store.create_schema()
    with store.write() as tx:
        for item in _cohort(load_catalogue(), 5, seed=2):
            tx.put(item, current=None)
    written = dump_tables(store)
    with store.write() as tx:  # damage that no fingerprint shows
        tx.conn.execute(delete(search_number))
    monkeypatch.setenv("FHIR_KAT_DATABASE_URL", url)
    assert cli_main(["reindex", "--type", "Observation"]) == 0
    assert dump_tables(store) == written
    assert "reindexed" in capsys.readouterr().err
    assert cli_main(["reindex", "--type", "Nonsense"]) == 2
    store.dispose()


def test_observation_values_reads_each_element_as_the_json_reading_did(database_url: str) -> None:
    """Row by row, on the cases a whole-cohort comparison may not reach."""
    store = Store(database_url, clock=FakeClock())
    store.create_schema()
    total = {"system": "http://loinc.org", "code": "44261-6"}

    def obs(rid: str, **extra: Any) -> dict[str, Any]:
        base = {
            "resourceType": "Observation",
            "id": rid,
            "status": "final",
            "code": {"coding": [total]},
            "subject": {"reference": "Patient/p"},
            "effectiveDateTime": "2026-02-01T10:00:00-08:00",
            "valueQuantity": {"value": 5},
            "derivedFrom": [{"reference": "QuestionnaireResponse/q"}],
        }
        base.update(extra)
        return {k: v for k, v in base.items() if v is not None}

    try:
        with store.write() as tx:
            for resource in (
                obs("both", valueInteger=9),  # the quantity wins, as .get(…, fallback) did
                obs("integer-only", valueQuantity={"unit": "{score}"}, valueInteger=9),
                obs("decimal", valueQuantity={"value": 12.25}),
                obs("instant", effectiveDateTime=None, effectiveInstant="2026-02-01T10:00:00Z"),
                obs("period", effectiveDateTime=None, effectivePeriod={"start": "2026-02-01"}),
                obs("other-system", code={"coding": [{**total, "system": "urn:x"}]}),
                obs("preliminary", status="preliminary"),
                obs("no-value", valueQuantity=None),
                obs("late", effectiveDateTime="2027-01-01"),
                obs("typed-in", derivedFrom=None),  # not derived from a response
            ):
                tx.put(resource, current=None)
        with store.read() as tx:
            got = list(
                observation_values(
                    tx,
                    [(total["system"], total["code"])],
                    FINAL,
                    datetime(2026, 1, 1),
                    datetime(2026, 12, 31, 23, 59, 59),
                )
            )
        when = datetime(2026, 2, 1, 18, 0)
        key = (total["system"], total["code"])
        assert got == [(key, "p", when, 5.0), (key, "p", when, 9.0), (key, "p", when, 12.25)]
    finally:
        store.drop_schema()
        store.dispose()
