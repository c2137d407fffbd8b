"""The ingest write path's shortcuts (issue 9, benchmark 2) store exactly what the plain path
stores, on SQLite and PostgreSQL:

- index rows are held in the transaction and sent in one statement per table (``Tx.flush``)
  before any index read and before the commit: the stored rows, versions and index equal those
  of sending each resource's rows at once, and a search inside the transaction sees them;
- ``Tx.preload`` reads many current rows in one query; ``get`` answers from it until the
  resource is written in the transaction, never with a stale version;
- an artifact and its AuditEvent commit in one transaction; a refused artifact is still
  audited (at response time, with its real outcome).

A statement count per referral pins the round trips (a count, not a time), so the saving
cannot silently regress.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event

from fhir_kat.artifacts.schemas import bc_phn_check_digit
from fhir_kat.search import Criterion, SearchQuery
from fhir_kat.store import Store, Tx
from tests.conftest import FakeClock
from tests.support.store_dump import dump_tables

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"

#: Statements one referral artifact costs once the process is warm (SQLite 41, PostgreSQL 40
#: when this was written; 81 plus a second transaction for the AuditEvent before). A change
#: that adds round trips to the ingest path must raise this on purpose. Issue 17 did (SQLite
#: 46): triage reads every Condition and AllergyIntolerance of the patient, not only those the
#: ServiceRequest references — two searches.
REFERRAL_STATEMENTS = 47


def _obs(i: int, code: str, patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{i}",
        "status": "final",
        "code": {"coding": [{"system": "urn:test", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": f"2026-01-{i % 28 + 1:02d}T10:00:00Z",
        # Even ones have a total-score shape (they get observation_values rows too).
        **(
            {
                "valueQuantity": {"value": i},
                "derivedFrom": [{"reference": f"QuestionnaireResponse/qr{i}"}],
            }
            if i % 2 == 0
            else {"valueString": f"value {i}"}
        ),
    }


def _script(tx: Tx, flush_each: bool) -> None:
    """Creates, updates (twice in the transaction, changing index values), a delete and a
    re-create after it; ``flush_each`` sends every write's index rows at once (the plain
    path), otherwise they wait for the next index read or the commit."""

    def step() -> None:
        if flush_each:
            tx.flush()

    for pid in ("p1", "p2"):
        tx.put({"resourceType": "Patient", "id": pid, "gender": "female"}, current=None)
        step()
    for i in range(6):
        tx.put(_obs(i, "a", "p1" if i % 2 else "p2"), current=None)
        step()
    for i in (1, 2):
        for code in ("b", "c"):
            current = tx.get("Observation", f"o{i}")
            tx.put(_obs(i, code, "p2"), current=current)
            step()
    gone = tx.get("Observation", "o3")
    assert gone is not None
    tx.delete(gone)
    step()
    again = tx.get("Observation", "o4")
    assert again is not None
    tx.delete(again)
    step()
    tx.put(_obs(4, "d", "p1"), current=tx.get("Observation", "o4"))
    step()


@contextmanager
def _fresh(database_url: str) -> Iterator[Store]:
    store = Store(database_url, clock=FakeClock())
    store.drop_schema()  # PostgreSQL: sequences restart, so both runs get the same seq values
    store.create_schema()
    try:
        yield store
    finally:
        store.dispose()


def test_held_index_rows_store_what_immediate_rows_store(database_url: str) -> None:
    dumps = []
    for flush_each in (True, False):
        with _fresh(database_url) as store:
            with store.write() as tx:
                _script(tx, flush_each)
            with store.write() as tx:  # a second transaction over committed rows
                tx.put(_obs(1, "e", "p1"), current=tx.get("Observation", "o1"))
                if flush_each:
                    tx.flush()
                tx.put(_obs(9, "e", "p1"), current=None)
            dumps.append(dump_tables(store))
    assert dumps[0] == dumps[1]
    tokens = {(r[1], r[4]) for r in dumps[0]["search_token"] if r[2] == "code"}
    assert tokens == {("o0", "a"), ("o1", "e"), ("o2", "c"), ("o4", "d"), ("o5", "a"), ("o9", "e")}
    values = {(r[1], r[3]) for r in dumps[0]["observation_values"]}
    assert values == {("o0", "a"), ("o2", "c"), ("o4", "d")}


def test_a_search_in_the_transaction_sees_held_index_rows(database_url: str) -> None:
    def code(c: str) -> SearchQuery:
        return SearchQuery(
            "Observation", criteria=(Criterion("code", "token", "", (("urn:test", c, True),), ""),)
        )

    with _fresh(database_url) as store, store.write() as tx:
        tx.put(_obs(1, "a", "p1"), current=None)
        assert [r.id for r in tx.matches(code("a"))] == ["o1"]
        tx.put(_obs(1, "b", "p1"), current=tx.get("Observation", "o1"))
        assert tx.matches(code("a")) == []
        assert [r.id for r in tx.search(code("b"))[0]] == ["o1"]
        assert tx.references_from("Observation", ["o1"], "subject", None) == [("Patient", "p1")]
        assert tx.referencing("Observation", "subject", "Patient", ["p1"]) == [
            ("Observation", "o1")
        ]


def _statements(store: Store) -> Any:
    seen: list[str] = []

    def record(_c: Any, _cur: Any, statement: str, *_rest: Any) -> None:
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    return seen, lambda: event.remove(store.engine, "before_cursor_execute", record)


def test_preload_answers_get_until_the_resource_is_written(database_url: str) -> None:
    with _fresh(database_url) as store:
        with store.write() as tx:
            tx.put({"resourceType": "Patient", "id": "p1"}, current=None)
            stored, _ = tx.put({"resourceType": "Patient", "id": "p2"}, current=None)
            tx.delete(stored)
        keys = [("Patient", "p1"), ("Patient", "p2"), ("Patient", "nobody")]
        with store.read() as tx:
            plain = [tx.get(*k) for k in keys]
        seen, stop = _statements(store)
        try:
            with store.write() as tx:
                tx.preload(keys, for_update=True)
                before = len(seen)
                assert [tx.get(*k, for_update=True) for k in keys] == plain
                assert len(seen) == before  # answered without a round trip
                assert plain[1] is not None and plain[1].deleted
                current = tx.get("Patient", "p1")
                tx.put({"resourceType": "Patient", "id": "p1", "gender": "male"}, current=current)
                after = tx.get("Patient", "p1")
                assert after is not None and after.version_id == 2 and "male" in after.content
        finally:
            stop()


def _phn(n: int) -> str:
    while True:
        first = f"9{n % 10**8:08d}"
        check = bc_phn_check_digit(first)
        if check is not None:
            return first + str(check)
        n += 1_000_003


def _referral(n: int) -> dict[str, Any]:
    body: dict[str, Any] = copy.deepcopy(json.loads((EXAMPLES / "referrals.json").read_text()))
    body["source_id"] = f"WRITE-PATH-{n}"
    body["referral_identifier"]["value"] = f"R-WRITE-PATH-{n}"
    body["patient"]["phn"] = _phn(n * 7919 + 13)
    return body


def _post(client: FlaskClient, kind: str, body: dict[str, Any]) -> Any:
    return client.post(f"/api/v1/{kind}", data=json.dumps(body), content_type="application/json")


def _audit_events(app: Flask) -> list[dict[str, Any]]:
    store: Store = app.extensions["fhir_kat"].store
    store.drain_audit()  # a refusal's record waits in the audit journal (ADR 0023)
    with store.read() as tx:
        rows, _, _ = tx.search(SearchQuery("AuditEvent", count=1000))
    return [r.json() for r in rows]


def test_a_referral_is_one_transaction_with_its_audit_event(
    app: Flask, client: FlaskClient
) -> None:
    store: Store = app.extensions["fhir_kat"].store
    assert _post(client, "referrals", _referral(1)).status_code == 201  # warm the caches
    begins: list[int] = []

    def on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("kat_write"):
            begins.append(1)

    event.listen(store.engine, "begin", on_begin)
    seen, stop = _statements(store)
    audited = len(_audit_events(app))
    seen.clear()
    try:
        r = _post(client, "referrals", _referral(2))
    finally:
        stop()
        event.remove(store.engine, "begin", on_begin)
    assert r.status_code == 201, r.get_json()
    writes = [s for s in seen if s.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))]
    assert len(begins) == 1, "the artifact and its AuditEvent commit in one write transaction"
    assert writes and len(seen) <= REFERRAL_STATEMENTS, len(seen)
    events = _audit_events(app)
    assert len(events) == audited + 1
    new = events[-1]
    assert new["outcome"] == "0" and new["subtype"][0]["code"] == "create"
    located = {e["response"]["location"].split("/_history")[0] for e in r.get_json()["entry"]}
    recorded = {e["what"]["reference"] for e in new["entity"] if "what" in e}
    assert located - {p for p in located if p.startswith("Patient/")} <= recorded
    assert located <= recorded | {f"Patient/{p}" for p in _patients(new)}


def _patients(audit: dict[str, Any]) -> set[str]:
    return {
        e["what"]["reference"].split("/", 1)[1]
        for e in audit.get("entity", [])
        if e.get("role", {}).get("code") == "1"
    }


def test_a_refused_artifact_is_still_audited(app: Flask, client: FlaskClient) -> None:
    audited = len(_audit_events(app))
    body = json.loads((EXAMPLES / "screenings.json").read_text())  # no referral stored yet
    r = _post(client, "screenings", body)
    assert r.status_code == 422
    events = _audit_events(app)
    assert len(events) == audited + 1
    assert events[-1]["outcome"] == "4" and events[-1]["outcomeDesc"] == "HTTP 422"
    assert "entity" not in events[-1] or not any(
        "what" in e and not e["what"]["reference"].startswith("Patient/")
        for e in events[-1]["entity"]
    )


def _transaction(patient_ref: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:6f0e4d8a-2d7c-4c41-9d0e-0a4c1b6f3a11",
                "resource": {"resourceType": "Patient", "gender": "male"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
                    "subject": {"reference": patient_ref},
                    "valueQuantity": {"value": 12},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }


def test_a_fhir_transaction_commits_with_its_audit_event_and_a_failed_one_is_audited(
    app: Flask, client: FlaskClient
) -> None:
    store: Store = app.extensions["fhir_kat"].store
    writes: list[int] = []

    def on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("kat_write"):
            writes.append(1)

    audited = len(_audit_events(app))
    event.listen(store.engine, "begin", on_begin)
    try:
        ok = client.post(
            "/fhir",
            data=json.dumps(_transaction("urn:uuid:6f0e4d8a-2d7c-4c41-9d0e-0a4c1b6f3a11")),
            content_type="application/fhir+json",
        )
    finally:
        event.remove(store.engine, "begin", on_begin)
    assert ok.status_code == 200, ok.get_json()
    assert len(writes) == 1, "the transaction and its AuditEvent commit together"
    events = _audit_events(app)
    assert len(events) == audited + 1
    assert events[-1]["outcome"] == "0" and events[-1]["subtype"][0]["code"] == "transaction"

    stale = _transaction("urn:uuid:6f0e4d8a-2d7c-4c41-9d0e-0a4c1b6f3a11")
    stale["entry"].append(  # refused inside the database transaction: all of it rolls back
        {
            "resource": {"resourceType": "Patient", "id": "not-stored"},
            "request": {"method": "PUT", "url": "Patient/not-stored", "ifMatch": 'W/"3"'},
        }
    )
    refused = client.post("/fhir", data=json.dumps(stale), content_type="application/fhir+json")
    assert refused.status_code >= 400
    events = _audit_events(app)
    assert len(events) == audited + 2
    assert events[-1]["outcome"] == "4"
    assert events[-1]["outcomeDesc"] == f"HTTP {refused.status_code}"
