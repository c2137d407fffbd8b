"""Every statement the service runs on its write and read paths is an index lookup, on SQLite and
PostgreSQL (issue 25, docs/adr/0017-statement-plans-and-statistics.md).

The paths a user hits run against a database that already holds data (a bulk-loaded cohort,
statistics refreshed), with every SQL statement they send recorded (SQLAlchemy's
``before_cursor_execute``). Each recorded statement is then explained with its own first
parameters:

- SQLite: ``EXPLAIN QUERY PLAN``; a ``SCAN <table>`` line (with or without an index: a walk of
  the whole table or of a whole index) fails, a ``SEARCH`` passes. A ``SCAN`` of a sub-query's
  own rows (``CO-ROUTINE``/``MATERIALIZE``d, ``CONSTANT ROWS``) is not a table scan.
- PostgreSQL: ``EXPLAIN (FORMAT JSON)`` with ``enable_seqscan = off``, so a small test table
  cannot hide the answer: the planner then takes any index path it has, and a ``Seq Scan``
  still chosen means the statement has none. An ``Index Scan``/``Index Only Scan`` without an
  ``Index Cond`` (a walk of a whole index) fails too.

What may scan, and why, is listed in ``ALLOWED`` (statement pattern, table, reason); an entry
that no longer matches anything fails the test, so the list cannot outlive its reasons. No
timings here: the figures are in bench/ and docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import json
import re
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, create_engine, event, insert
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import ExecuteStyle

from bench import data as bench_data
from fhir_kat.app import create_app
from fhir_kat.exchange.outbox import outbox
from fhir_kat.settings import Settings
from fhir_kat.store import Store
from fhir_kat.validation.resource import SUPPORTED_TYPES
from tests.conftest import HA_ORG, TEST_CLIENTS, client_as
from tests.test_delivery import Receiver, run_worker
from tests.test_export import ASYNC, wait_for
from tests.test_messaging import as_message, process, referral, transform
from tests.test_referrer_writes import referred

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
FHIR = "application/fhir+json"
#: Participants of the bulk-loaded cohort the paths run beside (10 resources each).
COHORT = 150


@dataclass(frozen=True)
class Allowed:
    """A statement that may scan ``table``: the statement matches ``pattern``."""

    pattern: str
    table: str
    reason: str


#: Statements that may read a whole table, each with its reason. None is on a write path.
ALLOWED: tuple[Allowed, ...] = (
    Allowed(
        r"FROM observation_values WHERE code IN",
        "observation_values",
        "the outcome measure is a whole-population report: it reads every outcome row of the "
        "instruments' codes once, in one narrow pass over the covering table built for it "
        "(docs/adr/0008-observation-values.md); its cost follows the program's size by design",
    ),
    Allowed(
        r"FROM sqlite_stat1 WHERE tbl = ",
        "sqlite_stat1",
        "the statistics check (fhir_kat/store/statistics.py) reads SQLite's own statistics "
        "table: one row per index of the schema, however many resources are stored",
    ),
)


# ---------------------------------------------------------------------- recording


@dataclass
class Recorded:
    path: str
    statement: str
    parameters: Any


@dataclass
class Recorder:
    """Every statement sent through ``engine`` while ``path`` is set, first parameters each."""

    engine: Engine
    path: str | None = None
    seen: dict[str, Recorded] = field(default_factory=dict)

    def __post_init__(self) -> None:
        event.listen(self.engine, "before_cursor_execute", self._record)

    def _record(
        self,
        _conn: Any,
        _cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if self.path is None or statement in self.seen:
            return
        # A multi-row INSERT … RETURNING that SQLAlchemy rendered itself ("insertmanyvalues":
        # a transaction's creates, ``Tx._send_creates``) is one statement with all its rows'
        # parameters; an ``executemany`` repeats one statement, explained with its first row.
        rendered = getattr(context, "execute_style", None) is ExecuteStyle.INSERTMANYVALUES
        first = parameters[0] if executemany and parameters and not rendered else parameters
        self.seen[statement] = Recorded(self.path, statement, first)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)


# ---------------------------------------------------------------------- plans

_EXPLAINED = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.IGNORECASE)
_DECLARE = re.compile(r"^\s*DECLARE \w+ NO SCROLL CURSOR FOR ", re.IGNORECASE)


_PLAIN_INSERT = re.compile(r"^\s*INSERT\b(?!.*\bSELECT\b)", re.IGNORECASE | re.DOTALL)


def _explainable(statement: str) -> str | None:
    """The statement to explain (a cursor's query for a DECLARE), or None for what reads no
    table (transaction control, PRAGMA, SET, ANALYZE, FETCH from a declared cursor, a plain
    ``INSERT … VALUES`` — whose multi-row form, ``create_many``'s, SQLAlchemy sends in batches
    whose text and parameters the recorder cannot pair)."""
    declared = _DECLARE.match(statement)
    if declared:
        return statement[declared.end() :]
    if _PLAIN_INSERT.match(statement):
        return None
    return statement if _EXPLAINED.match(statement) else None


def sqlite_scans(conn: sqlite3.Connection, statement: str, parameters: Any) -> list[str]:
    """The tables ``statement`` scans whole, by SQLite's ``EXPLAIN QUERY PLAN``."""
    rows = conn.execute(f"EXPLAIN QUERY PLAN {statement}", parameters or ()).fetchall()
    details = [str(r[3]) for r in rows]
    own_rows = {
        m.group(2)
        for d in details
        if (m := re.match(r"^(CO-ROUTINE|MATERIALIZE) (\S+)", d)) is not None
    }
    scanned = []
    for detail in details:
        m = re.match(r"^SCAN (\S+)", detail)
        if m is None or m.group(1) in own_rows or "CONSTANT ROW" in detail:
            continue
        scanned.append(detail)
    return scanned


def _sqlite_tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def postgres_scans(cursor: Any, statement: str, parameters: Any) -> list[str]:
    """The relations ``statement`` scans whole, by PostgreSQL's plan with seq scans disabled:
    a ``Seq Scan``, or an index scan whose condition does not bound the index's leading column
    (a walk of the whole index, filtered as it goes)."""
    cursor.execute(
        "SELECT c.relname, t.relname, a.attname FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
    )
    leading = {index: (table, column) for index, table, column in cursor.fetchall()}
    cursor.execute(f"EXPLAIN (FORMAT JSON) {statement}", parameters or None)
    plan = cursor.fetchone()[0][0]["Plan"]
    found: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        kind = node["Node Type"]
        if kind == "Seq Scan":
            found.append(f"Seq Scan on {node['Relation Name']}")
        elif kind in ("Index Scan", "Index Only Scan", "Bitmap Index Scan"):
            table, column = leading[node["Index Name"]]
            cond = node.get("Index Cond", "")
            if not re.search(rf"(?<![.\w]){re.escape(column)}\b", cond):
                found.append(
                    f"{kind} without a condition on {table} (index {node['Index Name']}, "
                    f"leading column {column}; condition: {cond or 'none'})"
                )
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    return found


def _table_of(line: str) -> str:
    m = re.search(r"(?:^SCAN |Seq Scan on |without a condition on )(\w+)", line)
    return m.group(1) if m else line


def audit(url: str, recorded: dict[str, Recorded]) -> tuple[list[str], set[Allowed], int]:
    """Every recorded statement that scans a table and is not ``ALLOWED``, the ``ALLOWED``
    entries used, and how many statements were explained."""
    explained = 0
    problems: list[str] = []
    used: set[Allowed] = set()
    explain: Callable[[str, Any], list[str]]
    if url.startswith("sqlite"):
        conn = sqlite3.connect(str(make_url(url).database))
        tables = _sqlite_tables(conn)

        def explain(statement: str, parameters: Any) -> list[str]:
            return [s for s in sqlite_scans(conn, statement, parameters) if _table_in(s, tables)]

        close: Callable[[], None] = conn.close
    else:
        engine = create_engine(url)
        raw = engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute("SET enable_seqscan = off")

        def explain(statement: str, parameters: Any) -> list[str]:
            return postgres_scans(cursor, statement, parameters)

        def close() -> None:
            raw.rollback()
            raw.close()
            engine.dispose()

    try:
        for rec in recorded.values():
            statement = _explainable(rec.statement)
            if statement is None:
                continue
            flat = " ".join(statement.split())
            explained += 1
            for scan in explain(statement, rec.parameters):
                allowed = next(
                    (
                        a
                        for a in ALLOWED
                        if a.table == _table_of(scan) and re.search(a.pattern, flat)
                    ),
                    None,
                )
                if allowed is not None:
                    used.add(allowed)
                    continue
                problems.append(f"[{rec.path}] {scan}\n    {flat[:600]}")
    finally:
        close()
    return problems, used, explained


def _table_in(scan: str, tables: set[str]) -> bool:
    """Whether a SQLite ``SCAN x`` line names a table (or an alias of one: SQLAlchemy names
    aliases ``<table>_<n>``)."""
    name = _table_of(scan)
    return name in tables or re.sub(r"_\d+$", "", name) in tables


# ---------------------------------------------------------------------- the service's paths


def example(kind: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / f"{kind}.json").read_text())
    return loaded


def ok(r: Any, *statuses: int) -> Any:
    assert r.status_code in (statuses or (200, 201)), r.get_data(as_text=True)[:600]
    return r


@pytest.fixture
def kat(settings: Settings) -> Iterator[tuple[Flask, Recorder]]:
    """The service with a partner to deliver to, beside a bulk-loaded cohort with statistics,
    and a recorder on its engine."""
    receiver = Receiver()
    partners = {
        "island-ehr": {
            "base_url": receiver.url,
            "write_mode": "put",
            "organization": HA_ORG,
            "timeout_seconds": 5,
            "resource_types": sorted(set(SUPPORTED_TYPES) - {"Provenance"}),
        }
    }
    app = create_app(replace(settings, extra={"clients": TEST_CLIENTS, "partners": partners}))
    store = app.extensions["fhir_kat"].store
    bench_data.load(store, bench_data.observations(COHORT))
    bench_data.load(store, bench_data.tasks(COHORT * 2))
    _outbox_history(store)
    store.analyze()
    recorder = Recorder(store.engine)
    try:
        yield app, recorder
    finally:
        recorder.close()
        app.extensions["fhir_kat"].export.shutdown()
        store.dispose()
        receiver.close()


def _outbox_history(store: Store) -> None:
    """An outbox with a history like a running program's: mostly delivered rows, a few still
    waiting for consent (SQLite plans from the shape of the data, and an empty or uniform
    table makes any scan look cheapest)."""
    when = datetime(2026, 1, 10)
    rows = [
        {
            "partner": "island-ehr",
            "kind": "bundle",
            "patient_key": f"p{i % COHORT}",
            "payload": "{}",
            "status": "blocked-consent" if i % 50 == 0 else "delivered",
            "attempts": 1,
            "next_attempt_at": when,
            "created_at": when,
            "updated_at": when,
        }
        for i in range(COHORT * 8)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(outbox), rows)


def write_paths(app: Flask, recorder: Recorder) -> dict[str, str]:
    """Every kind of write a user makes; returns ids the read paths use."""
    staff, referrer = client_as(app, "staff"), client_as(app, "referrer")

    recorder.path = "artifact: referral"
    ok(staff.post("/api/v1/referrals", json=example("referrals")), 201)
    recorder.path = "artifact: intake steps (screenings)"
    screening = example("screenings")
    ok(staff.post("/api/v1/screenings", json=screening), 201)
    for step in ("psychiatrist-clearance", "contraindication-check"):
        s = copy.deepcopy(screening) | {"step": step, "source_id": f"S-{step}"}
        ok(staff.post("/api/v1/screenings", json=s), 201)
    for kind in (
        "medication-administrations",
        "questionnaire-responses",
        "adverse-events",
        "consents",
    ):
        recorder.path = f"artifact: {kind}"
        ok(staff.post(f"/api/v1/{kind}", json=example(kind)), 201)
    recorder.path = "artifact: identical re-send"
    ok(staff.post("/api/v1/consents", json=example("consents")))

    recorder.path = "FHIR transaction: referral + referrer's Consent"
    shared = referred(app)
    recorder.path = "FHIR $process-message: referral"
    message = as_message(transform(staff, referral(number="R-9001", own_patient=True)))
    ok(process(referrer, message), 200)

    recorder.path = "FHIR REST: create, update, conditional create, delete"
    patient = {"resourceType": "Patient", "gender": "female", "birthDate": "1980-02-03"}
    created = ok(staff.post("/fhir/Patient", json=patient, content_type=FHIR), 201).get_json()
    pid = created["id"]
    ok(staff.put(f"/fhir/Patient/{pid}", json=created | {"gender": "other"}, content_type=FHIR))
    new_id = str(uuid.uuid4())
    ok(staff.put(f"/fhir/Patient/{new_id}", json=patient | {"id": new_id}, content_type=FHIR), 201)
    ident = {"system": "https://fhir-kat.example.org/fhir/sid/test", "value": "plans-1"}
    conditional = patient | {"identifier": [ident]}
    exist = {"If-None-Exist": f"identifier={ident['system']}|{ident['value']}"}
    for _ in range(2):
        ok(staff.post("/fhir/Patient", json=conditional, content_type=FHIR, headers=exist))
    gone = ok(staff.post("/fhir/Patient", json=patient, content_type=FHIR), 201).get_json()
    ok(staff.delete(f"/fhir/Patient/{gone['id']}"), 200, 204)
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "44249-1"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2026-01-20T10:00:00Z",
        "valueInteger": 7,
    }
    ok(staff.post("/fhir/Observation", json=observation, content_type=FHIR), 201)
    recorder.path = "FHIR batch"
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        ],
    }
    ok(staff.post("/fhir", json=batch, content_type=FHIR), 200)

    recorder.path = "delivery outbox: worker"
    run_worker(app)
    admin = client_as(app, "admin")
    recorder.path = "delivery outbox: the admins' list"
    for blocked in ok(admin.get("/api/v1/deliveries?status=blocked-consent")).get_json()[
        "deliveries"
    ][:2]:
        recorder.path = "delivery outbox: retry"
        # A later delivery of the same patient may have gone: 409 unless forced (both planned).
        ok(admin.post(f"/api/v1/deliveries/{blocked['id']}/retry"), 200, 409)
        ok(admin.post(f"/api/v1/deliveries/{blocked['id']}/retry?force=true"))
    recorder.path = "delivery outbox: worker"
    run_worker(app)
    recorder.path = None
    return {"patient": pid, "referred_patient": shared["Patient"]["id"]}


def read_paths(app: Flask, recorder: Recorder, ids: dict[str, str]) -> None:
    staff, ha = client_as(app, "staff"), client_as(app, "ha")
    referrer = client_as(app, "referrer")
    pid = ids["patient"]

    recorder.path = "read, vread, history"
    ok(staff.get(f"/fhir/Patient/{pid}"))
    ok(staff.get(f"/fhir/Patient/{pid}/_history/1"))
    ok(staff.get(f"/fhir/Patient/{pid}/_history"))
    ok(staff.get(f"/fhir/Patient/{ids['referred_patient']}/_history"))
    ok(ha.get(f"/fhir/Observation?patient={ids['referred_patient']}"))

    searches = [
        f"Observation?patient={pid}",
        "Observation?subject=Patient/p3&code=http://loinc.org|44249-1",
        "Observation?code=http://loinc.org|44249-1&date=ge2026-01-01&_count=5",
        "Observation?value-quantity=gt10&code=http://loinc.org|44249-1&_count=5",
        "Task?code=fulfill&status=received&_include=Task:patient",
        "Task?requester=Organization/org1&_count=10",
        "Patient?identifier=https://fhir-kat.example.org/fhir/sid/test|plans-1",
        f"Patient?_id={pid}&_revinclude=Observation:patient",
        "Patient?gender=female&_summary=count",
        "Observation?_lastUpdated=ge2026-01-01&_count=5&_sort=-_lastUpdated",
        "Condition?code:not=http://snomed.info/sct|1",
    ]
    for query in searches:
        recorder.path = f"search {query.split('?')[0]}"
        found = ok(staff.get(f"/fhir/{query}")).get_json()
        nxt = next(
            (link["url"] for link in found.get("link", []) if link["relation"] == "next"), None
        )
        if nxt:
            recorder.path = f"search {query.split('?')[0]}: next page"
            ok(staff.get(nxt.split("localhost", 1)[1]))
    recorder.path = "search as a referrer (visibility)"
    ok(referrer.get("/fhir/Task?status=received"))
    ok(referrer.get("/fhir/ServiceRequest?_count=5"))
    recorder.path = "search as the health authority (consent)"
    ok(ha.get("/fhir/Observation?_count=5"))

    recorder.path = "$evaluate-measure"
    ok(
        ha.get(
            "/fhir/Measure/kat-program-outcomes/$evaluate-measure"
            "?periodStart=2026-01-01&periodEnd=2026-12-31"
        )
    )

    recorder.path = "$export (system, as the health authority)"
    r = ok(ha.get("/fhir/$export?_type=Patient,Observation", headers=ASYNC), 202)
    wait_for(ha, r.headers["Content-Location"])
    recorder.path = "$export (Patient level, _since)"
    r = ok(staff.get("/fhir/Patient/$export?_since=2026-01-01T00:00:00Z", headers=ASYNC), 202)
    wait_for(staff, r.headers["Content-Location"])
    recorder.path = None


# ---------------------------------------------------------------------- the tests


def _report(problems: list[str]) -> str:
    return "statements that scan a whole table:\n" + "\n".join(problems)


def test_write_paths_only_look_up(kat: tuple[Flask, Recorder], database_url: str) -> None:
    app, recorder = kat
    write_paths(app, recorder)
    problems, _, explained = audit(database_url, recorder.seen)
    assert not problems, _report(problems)
    # The recorder saw the paths (a test of nothing would pass too).
    assert len({r.path for r in recorder.seen.values()}) >= 10
    assert explained > 40, explained


def test_read_paths_only_look_up(kat: tuple[Flask, Recorder], database_url: str) -> None:
    app, recorder = kat
    ids = write_paths(app, recorder)
    recorder.seen.clear()
    read_paths(app, recorder, ids)
    problems, used, explained = audit(database_url, recorder.seen)
    assert not problems, _report(problems)
    assert explained > 40, explained
    stale = [
        a
        for a in ALLOWED
        if a not in used and database_url.startswith("sqlite") and a.table != "sqlite_stat1"
    ]
    assert not stale, f"ALLOWED entries no statement needs any more: {stale}"


def test_the_audit_sees_a_scan(tmp_path: Path) -> None:
    """The checker itself: the row-value preload form issue 25 measured, and an unindexed
    predicate, are reported as scans on SQLite; the preload's form today is not."""

    from fhir_kat.store import Store
    from fhir_kat.store.store import _preload_statement

    store = Store(f"sqlite:///{tmp_path / 'plans.sqlite3'}")
    store.create_schema()
    bench_data.load(store, bench_data.tasks(300))
    store.analyze()
    conn = sqlite3.connect(str(tmp_path / "plans.sqlite3"))
    try:
        old = (
            "SELECT * FROM resources WHERE (res_type, res_id) IN (VALUES (?, ?), (?, ?)) "
            "ORDER BY res_type, res_id"
        )
        assert sqlite_scans(conn, old, ("Task", "t1", "Patient", "p1"))
        assert sqlite_scans(conn, "SELECT * FROM resources WHERE content LIKE ?", ("%x%",))
        stmt = _preload_statement(2, False).params(
            k_type_0="Task", k_ids_0=["t1", "t2"], k_type_1="Patient", k_ids_1=["p1"]
        )
        compiled = stmt.compile(store.engine, compile_kwargs={"literal_binds": True})
        assert not sqlite_scans(conn, str(compiled), ())
    finally:
        conn.close()
        store.dispose()


def test_the_audit_sees_a_scan_on_postgres(postgres_url: str) -> None:
    """The same on PostgreSQL, with seq scans disabled: an unindexed predicate, and one on a
    later column of an index only, are reported; the preload's form is not."""
    from tests.conftest import empty_postgres

    empty_postgres(postgres_url)
    engine = create_engine(postgres_url)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SET enable_seqscan = off")
        assert postgres_scans(
            cursor, "SELECT * FROM resources WHERE content LIKE %(p)s", {"p": "%x%"}
        )
        # A condition on a later column of an index still walks all of it.
        assert postgres_scans(
            cursor, "SELECT * FROM observation_values WHERE code = %(c)s", {"c": "44249-1"}
        )
        assert postgres_scans(cursor, "SELECT * FROM resources WHERE res_id = %(i)s", {"i": "t1"})
        assert not postgres_scans(
            cursor,
            "SELECT * FROM resources WHERE (res_type = %(t)s AND res_id IN (%(a)s, %(b)s))",
            {"t": "Task", "a": "t1", "b": "t2"},
        )
    finally:
        raw.rollback()
        raw.close()
        engine.dispose()
