"""The write path's statements per request (issue 20): a transaction's creates are sent
together, one INSERT per table, so a request's round trips do not grow with its entries —
and what is stored is exactly what one statement per create stored.

- ``Tx.put`` creates are held until the transaction's next statement of any kind (``Tx.conn``):
  the stored rows (resources, versions with their seqs in write order, every index table)
  equal those written with a statement in between every create;
- whatever runs in between — a search, a ``get_many``, a history, a service's own SELECT on
  ``tx.conn`` — sees every create made before it;
- a transaction of 100 (conditional) creates sends as many statements as one of 10, on both
  databases, through the HTTP API with the whole write pipeline;
- the write hooks' reads of what was just written take no statement;
- a create that collides with an existing id still fails the whole transaction.

No timings: bench/write_paths.py and docs/benchmarks.md have the figures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, event, select
from sqlalchemy.exc import IntegrityError

from fhir_kat.search import SearchQuery, parse_search
from fhir_kat.store import Store
from fhir_kat.store.schema import resource_versions, resources
from tests.conftest import FakeClock
from tests.support.store_dump import dump_tables

FHIR_JSON = "application/fhir+json"


def _observation(i: int, patient: str = "p1") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{i}",
        "identifier": [{"system": "urn:test:obs", "value": f"v{i}"}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": f"2026-02-{1 + i % 27:02d}T10:00:00Z",
        "valueQuantity": {
            "value": 60 + i,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


@contextmanager
def counted(engine: Engine) -> Iterator[list[str]]:
    """The statements sent through ``engine`` inside the block (an ``executemany`` or a
    rendered multi-row INSERT is one)."""
    sent: list[str] = []

    def record(*args: Any) -> None:
        sent.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _write(database_url: str, interleave: bool) -> dict[str, list[tuple[str, ...]]]:
    """Patients, then Observations, an update and a delete, in one transaction; with
    ``interleave`` a statement between every write sends each create on its own."""
    store = Store(database_url, clock=FakeClock())
    store.drop_schema()
    store.create_schema()
    try:
        with store.write() as tx:
            for p in ("p1", "p2"):
                tx.put({"resourceType": "Patient", "id": p, "active": True}, current=None)
                if interleave:
                    tx.conn.execute(select(resources.c.seq).limit(1)).all()
            for i in range(12):
                tx.put(_observation(i, "p1" if i % 2 else "p2"), current=None)
                if interleave:
                    tx.conn.execute(select(resources.c.seq).limit(1)).all()
            # An update and a delete of resources created in this same transaction.
            tx.put({**_observation(3), "status": "amended"}, current=tx.get("Observation", "o3"))
            current = tx.get("Observation", "o4")
            assert current is not None
            tx.delete(current)
            for i in range(12, 15):
                tx.put(_observation(i), current=None)
        return dump_tables(store)
    finally:
        store.drop_schema()
        store.dispose()


def test_creates_sent_together_store_what_one_by_one_stored(database_url: str) -> None:
    together, one_by_one = _write(database_url, False), _write(database_url, True)
    assert together == one_by_one
    # Seqs follow the order of the writes (paging and history order rely on it).
    versions = sorted(
        (int(seq), rtype, rid, vid) for seq, rtype, rid, vid, *_ in together[resource_versions.name]
    )
    order = [(rtype, rid, vid) for _, rtype, rid, vid in versions]
    expected = [("Patient", "p1", "1"), ("Patient", "p2", "1")]
    expected += [("Observation", f"o{i}", "1") for i in range(12)]
    expected += [("Observation", "o3", "2"), ("Observation", "o4", "2")]
    expected += [("Observation", f"o{i}", "1") for i in range(12, 15)]
    assert order == expected


def test_reads_in_the_transaction_see_every_create_before_them(database_url: str) -> None:
    store = Store(database_url, clock=FakeClock())
    store.drop_schema()
    store.create_schema()
    try:
        with store.write() as tx:
            for i in range(3):
                tx.put(_observation(i), current=None)
            # A service's own statement on the connection (the consent cache, the outbox).
            raw = tx.conn.execute(
                select(resources.c.res_id).where(resources.c.res_type == "Observation")
            ).all()
            assert sorted(r.res_id for r in raw) == ["o0", "o1", "o2"]
            tx.put(_observation(3), current=None)
            assert [r.id for r in tx.get_many([("Observation", "o3")])] == ["o3"]
            tx.put(_observation(4), current=None)
            assert [v.version_id for v, _ in tx.history("Observation", "o4", 10)] == [1]
            tx.put(_observation(5), current=None)
            found = tx.matches(
                parse_search(
                    "Observation",
                    [("identifier", "urn:test:obs|v5")],
                    strict=True,
                    default_count=10,
                    max_count=10,
                )
            )
            assert [r.id for r in found] == ["o5"]
            tx.put(_observation(6), current=None)
            version = tx.vread("Observation", "o6", 1)
            assert version is not None and version.seq > 0
        with store.read() as tx:
            rows, total, _ = tx.search(SearchQuery("Observation", count=50))
            assert total == 7
            assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    finally:
        store.drop_schema()
        store.dispose()


def test_a_written_resource_is_read_back_without_a_statement(database_url: str) -> None:
    store = Store(database_url, clock=FakeClock())
    store.drop_schema()
    store.create_schema()
    try:
        with store.write() as tx:
            stored, _ = tx.put(_observation(1), current=None)
            with counted(store.engine) as sent:
                again = tx.get("Observation", "o1", for_update=True)
            assert sent == [] and again == stored
            updated, _ = tx.put({**_observation(1), "status": "amended"}, current=again)
            with counted(store.engine) as sent:
                assert tx.get("Observation", "o1", for_update=True) == updated
            assert sent == []
    finally:
        store.drop_schema()
        store.dispose()


def _bundle(n: int, tag: str, conditional: bool) -> str:
    entries = []
    for i in range(n):
        obs = _observation(i, f"bench-{tag}")
        del obs["id"]
        obs["identifier"] = [{"system": "urn:test:obs", "value": f"{tag}-{i}"}]
        request = {"method": "POST", "url": "Observation"}
        if conditional:
            request["ifNoneExist"] = f"identifier=urn:test:obs|{tag}-{i}"
        entries.append({"resource": obs, "request": request})
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def _statements(client: FlaskClient, engine: Engine, body: str) -> list[str]:
    with counted(engine) as sent:
        r = client.post("/fhir", data=body, content_type=FHIR_JSON)
    assert r.status_code == 200, r.get_data(as_text=True)
    return sent


def _own(sent: list[str]) -> list[str]:
    """The request's statements on the store's tables (not the statistics' upkeep)."""
    tables = ("resources", "resource_versions", "search_", "observation_values", "outbox")
    return [
        s.split("(")[0][:60]
        for s in sent
        if s.lstrip().split(" ")[0] in ("SELECT", "INSERT", "UPDATE", "DELETE")
        and any(t in s for t in tables)
        and "sqlite_stat" not in s
        and "pg_stat" not in s
    ]


def test_a_transactions_statements_do_not_grow_with_its_entries(
    client: FlaskClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = app.extensions["fhir_kat"].store
    engine = store.engine
    # The planner statistics' upkeep (``store.statistics``) runs as rows accumulate, after
    # whichever request crosses its threshold: not the request's own statements.
    monkeypatch.setattr(store.statistics, "wrote", lambda _n: None)
    for conditional in (False, True):
        label = "c" if conditional else "p"
        # Warm-up: start-up statistics, the first statement of each shape.
        _statements(client, engine, _bundle(5, f"{label}-warm", conditional))
        small = _statements(client, engine, _bundle(10, f"{label}-small", conditional))
        large = _statements(client, engine, _bundle(100, f"{label}-large", conditional))
        assert len(_own(large)) == len(_own(small)), "\n".join([*_own(small), "--", *_own(large)])
        # Re-sent: every entry matches, nothing is written but the audit record.
        again = _statements(client, engine, _bundle(100, f"{label}-large", True))
        assert len([s for s in again if "INSERT INTO resource_versions" in s]) == 1


def test_a_single_create_sends_each_table_once(client: FlaskClient, app: Any) -> None:
    engine = app.extensions["fhir_kat"].store.engine
    body = _observation(1, "single")
    del body["id"]
    client.post("/fhir/Observation", data=json.dumps(body), content_type=FHIR_JSON)
    with counted(engine) as sent:
        r = client.post("/fhir/Observation", data=json.dumps(body), content_type=FHIR_JSON)
    assert r.status_code == 201
    # No SELECT of the resource just written (the safety step's read is answered in memory).
    assert not [s for s in sent if s.lstrip().startswith("SELECT resources.res_type")]
    # Each table once: the Observation and its request's AuditEvent share one transaction.
    # (PostgreSQL sends several tables' INSERTs as one statement: data-modifying CTEs.)
    tables = [t for s in sent for t in re.findall(r"INSERT INTO (\w+)", s)]
    assert "resource_versions" in tables and max(tables.count(t) for t in tables) == 1


def _audit_events(store: Any) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(resources.c.content)
            .where(resources.c.res_type == "AuditEvent")
            .order_by(resources.c.seq)
        ).scalars()
        return [json.loads(c) for c in rows]


@pytest.mark.parametrize(
    ("method", "path", "send", "status", "subtype", "nothing_written"),
    [
        ("POST", "/fhir/Observation", "new", 201, "create", False),
        ("POST", "/fhir/Observation", "matched", 200, "create", True),
        ("PUT", "/fhir/Observation/w1", "changed", 200, "update", False),
        ("PUT", "/fhir/Observation/w1", "same", 200, "update", True),
        ("PUT", "/fhir/Observation/w9", "new-id", 201, "create", False),
        ("PUT", "/fhir/Observation?identifier=urn:test:obs|v1", "changed", 200, "update", False),
    ],
)
def test_a_single_write_commits_once_with_its_audit_event(
    client: FlaskClient,
    app: Any,
    method: str,
    path: str,
    send: str,
    status: int,
    subtype: str,
    nothing_written: bool,
) -> None:
    """A REST create/update (plain, conditional, a no-op) is one database transaction: the
    resource and the request's AuditEvent commit together, and exactly one AuditEvent names
    what the request did (issue 20: one commit where there were two)."""
    store = app.extensions["fhir_kat"].store
    first = _observation(1, "single")
    first["id"] = "w1"
    client.put("/fhir/Observation/w1", data=json.dumps(first), content_type=FHIR_JSON)
    body = dict(first)
    headers: dict[str, str] = {}
    if send == "changed":
        body["valueQuantity"] = {**first["valueQuantity"], "value": 99}
    elif send == "new-id":
        body = _observation(9, "single")
        body["id"] = "w9"
    elif method == "POST":
        del body["id"]
        if send == "matched":
            headers["If-None-Exist"] = "identifier=urn:test:obs|v1"
        else:
            body["identifier"] = [{"system": "urn:test:obs", "value": "fresh"}]
    before = len(_audit_events(store))
    commits: list[int] = []

    def committed(_conn: Any) -> None:
        commits.append(1)

    event.listen(store.engine, "commit", committed)
    try:
        r = client.open(
            path, method=method, data=json.dumps(body), content_type=FHIR_JSON, headers=headers
        )
    finally:
        event.remove(store.engine, "commit", committed)
    assert r.status_code == status, r.get_data(as_text=True)
    stored_id = r.headers["Location"].split("/")[-3]
    new = _audit_events(store)[before:]
    assert len(new) == 1, new
    (audit,) = new
    assert audit["subtype"][0]["code"] == subtype
    assert audit["outcome"] == "0"
    assert f"Observation/{stored_id}" in [e["what"]["reference"] for e in audit["entity"]]
    assert ("nothing written" in json.dumps(audit)) == nothing_written
    assert len(commits) == 1, commits


def test_postgres_sends_a_create_and_its_index_in_one_statement(
    client: FlaskClient, app: Any
) -> None:
    store = app.extensions["fhir_kat"].store
    if store.is_sqlite:
        pytest.skip("PostgreSQL's round trips (SQLite: one INSERT per table, in process)")
    body = _observation(1, "single")
    del body["id"]
    client.post("/fhir/Observation", data=json.dumps(body), content_type=FHIR_JSON)
    with counted(store.engine) as sent:
        r = client.post("/fhir/Observation", data=json.dumps(body), content_type=FHIR_JSON)
    assert r.status_code == 201
    writes = [s for s in sent if "INSERT INTO" in s]
    # One transaction (the Observation with its request's AuditEvent, committed together):
    # one statement writing both versions, their current rows and every index table's rows.
    assert len(writes) == 1, writes


def test_a_create_over_an_existing_id_fails_the_whole_transaction(database_url: str) -> None:
    store = Store(database_url, clock=FakeClock())
    store.drop_schema()
    store.create_schema()
    try:
        with store.write() as tx:
            tx.put(_observation(1), current=None)
        try:
            with store.write() as tx:
                tx.put(_observation(2), current=None)
                tx.put(_observation(1), current=None)  # exists: the unique key refuses it
        except IntegrityError:
            pass
        else:
            raise AssertionError("a second create of Observation/o1 was stored")
        with store.read() as tx:
            assert tx.get("Observation", "o2") is None  # nothing half-stored
            assert [v.version_id for v, _ in tx.history("Observation", "o1", 5)] == [1]
    finally:
        store.drop_schema()
        store.dispose()
