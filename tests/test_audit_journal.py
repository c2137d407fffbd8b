"""The audit trail stays complete while reads stop taking the SQLite writer turn (ADR 0023).

On SQLite a request that writes nothing else (a read, a search, a refusal, a sign-in) commits
its AuditEvent to the audit journal beside the database (``store.audit_journal``), which has a
writer queue of its own; the store moves the records in as AuditEvents. Pinned here, on both
databases where it applies: every kind of request leaves exactly one AuditEvent, readable
through the API; a read answers while another process holds the database's writer; a record
survives the process being killed right after the answer; a move interrupted before the
journal forgets its records stores nothing twice; concurrent appends share one commit.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from fhir_kat.app import create_app
from fhir_kat.settings import load_settings
from fhir_kat.store import Store
from fhir_kat.store.audit_journal import AuditJournal
from fhir_kat.store.schema import resource_versions
from fhir_kat.store.store import AUDIT_MOVE_AT, _SqliteWriterQueue
from tests.conftest import TEST_CLIENTS, TEST_V2_SENDERS, client_as
from tests.support.v2_messages import ack_code, referral_message, send
from tests.test_cds_hooks import PTSD, cds_app, condition, hook_request, prefetch
from tests.test_cds_hooks import call as cds_call
from tests.test_messaging import as_message, process, referral, transform
from tests.test_noop_updates import mllp_port

__all__ = ["cds_app", "mllp_port"]  # fixtures, used by name

FHIR = "application/fhir+json"
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _audit_ids(app: Flask) -> list[str]:
    """Every AuditEvent id in the store (the journal moved first), in write order."""
    store: Store = app.extensions["fhir_kat"].store
    store.drain_audit()
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                select(resource_versions.c.res_id)
                .where(resource_versions.c.res_type == "AuditEvent")
                .order_by(resource_versions.c.seq)
            ).scalars()
        )


def _patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "unknown"}


def _post(c: Any, path: str, body: Any, **headers: str) -> Any:
    return c.post(path, data=json.dumps(body), content_type=FHIR, headers=headers)


def _requests(app: Flask) -> list[tuple[str, Any]]:
    """One request of each kind the service audits: (what, a call making it)."""
    staff, admin, ha = client_as(app, "staff"), client_as(app, "admin"), client_as(app, "ha")
    anonymous = app.test_client()
    referral = json.loads((EXAMPLES / "referrals.json").read_text())
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": _patient("t1"), "request": {"method": "PUT", "url": "Patient/t1"}},
            {
                "resource": {"resourceType": "Patient", "gender": "other"},
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": "_id=t1"},
            },
        ],
    }
    batch = {**bundle, "type": "batch"}
    return [
        ("create", lambda: _post(staff, "/fhir/Patient", {"resourceType": "Patient"})),
        ("update-as-create", lambda: staff.put("/fhir/Patient/a1", json=_patient("a1"))),
        ("no-op update", lambda: staff.put("/fhir/Patient/a1", json=_patient("a1"))),
        ("read", lambda: staff.get("/fhir/Patient/a1")),
        ("vread", lambda: staff.get("/fhir/Patient/a1/_history/1")),
        ("history", lambda: staff.get("/fhir/Patient/a1/_history")),
        ("search", lambda: staff.get("/fhir/Patient?gender=unknown")),
        ("search _revinclude", lambda: staff.get("/fhir/Patient?_id=a1&_revinclude=Task:patient")),
        ("read not found", lambda: staff.get("/fhir/Patient/nobody")),
        ("read refused by role", lambda: staff.get("/fhir/AuditEvent")),
        ("no token", lambda: anonymous.get("/fhir/Patient/a1")),
        (
            "conditional create",
            lambda: _post(staff, "/fhir/Patient", _patient("x"), **{"If-None-Exist": "_id=a1"}),
        ),
        ("transaction", lambda: _post(staff, "/fhir", bundle)),
        ("batch", lambda: _post(staff, "/fhir", batch)),
        (
            "invalid create",
            lambda: _post(staff, "/fhir/Patient", {"resourceType": "Patient", "x": 1}),
        ),
        ("delete", lambda: staff.delete("/fhir/Patient/t1")),
        (
            "operation",
            lambda: staff.get(
                "/fhir/Measure/kat-program-outcomes/$evaluate-measure"
                "?periodStart=2026-01-01&periodEnd=2026-12-31"
            ),
        ),
        ("$export kick-off", lambda: ha.get("/fhir/$export", headers={"Prefer": "respond-async"})),
        ("artifact", lambda: staff.post("/api/v1/referrals", json=referral)),
        ("artifact re-sent", lambda: staff.post("/api/v1/referrals", json=referral)),
        ("artifact refused", lambda: staff.post("/api/v1/referrals", json={"nothing": 1})),
        ("audit search by an admin", lambda: admin.get("/fhir/AuditEvent?_count=1")),
        (
            "sign-in",
            lambda: anonymous.post(
                "/auth/token",
                data={"grant_type": "client_credentials"},
                headers={"Authorization": "Basic YWRtaW46YWRtaW4tc2VjcmV0"},  # admin:admin-secret
            ),
        ),
    ]


def test_every_request_leaves_exactly_one_audit_event_readable_through_the_api(
    app: Flask,
) -> None:
    admin = client_as(app, "admin")
    for what, call in _requests(app):
        before = set(_audit_ids(app))
        answer = call()
        assert answer.status_code < 500, (what, answer.status_code)
        new = [i for i in _audit_ids(app) if i not in before]
        assert len(new) == 1, (what, len(new))
        shown = admin.get(f"/fhir/AuditEvent/{new[0]}")
        assert shown.status_code == 200, what
        assert shown.get_json()["outcome"] == ("0" if answer.status_code < 400 else "4"), what


def _sqlite_only(app: Flask) -> Store:
    store: Store = app.extensions["fhir_kat"].store
    if not store.is_sqlite:
        pytest.skip("SQLite's single writer; PostgreSQL's readers never queue for one")
    return store


def _hold_the_writer(url: str, database: str, held: Any, release: Any) -> None:
    """Another process holding the database's writer as a writer does: its turn in the
    queue, and SQLite's own write lock (BEGIN IMMEDIATE)."""
    queue = _SqliteWriterQueue(url)
    with queue.turn():
        conn = sqlite3.connect(database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(60)
        conn.execute("ROLLBACK")
        conn.close()
    queue.close()


def test_reads_answer_while_another_process_holds_the_writer(app: Flask) -> None:
    store = _sqlite_only(app)
    staff = client_as(app, "staff")
    assert staff.put("/fhir/Patient/r1", json=_patient("r1")).status_code == 201
    before = set(_audit_ids(app))
    database = str(store.engine.url.database)
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_the_writer, args=(store.url, database, held, release))
    holder.start()
    answers: list[int] = []
    try:
        assert held.wait(60)

        def read() -> None:
            answers.append(staff.get("/fhir/Patient/r1").status_code)
            answers.append(staff.get("/fhir/Patient?_id=r1").status_code)
            answers.append(staff.get("/fhir/Patient/nobody").status_code)

        reader = threading.Thread(target=read)
        reader.start()
        # Not a timing claim: the holder lets go only after this, so a read that needed the
        # writer turn (or SQLite's write lock) could not have answered at all by then.
        reader.join(60)
        assert answers == [200, 200, 404]
    finally:
        release.set()
        holder.join(60)
    new = [i for i in _audit_ids(app) if i not in before]
    assert len(new) == 3
    events = client_as(app, "admin").get("/fhir/AuditEvent?entity=Patient/r1").get_json()
    assert events["total"] >= 2


def _read_then_die(database_url: str, data_dir: str, answered: Any) -> None:
    settings = load_settings({}, database_url=database_url, data_dir=data_dir)
    app = create_app(replace(settings, extra={"clients": TEST_CLIENTS}))
    answer = client_as(app, "staff").get("/fhir/Patient/k1")
    answered.value = answer.status_code  # shared memory: set before the kill
    os.kill(os.getpid(), signal.SIGKILL)  # no clean shutdown: nothing runs after the answer


def test_a_read_is_audited_even_when_the_process_is_killed_after_the_answer(
    app: Flask, tmp_path: Path
) -> None:
    _sqlite_only(app)
    settings = load_settings(
        {}, database_url=f"sqlite:///{tmp_path / 'killed.sqlite3'}", data_dir=str(tmp_path / "k")
    )
    first = create_app(replace(settings, extra={"clients": TEST_CLIENTS}))
    assert client_as(first, "staff").put("/fhir/Patient/k1", json=_patient("k1")).status_code == 201
    first.extensions["fhir_kat"].export.shutdown()
    first.extensions["fhir_kat"].store.dispose()
    ctx = multiprocessing.get_context("spawn")
    answered = ctx.Value("i", 0)
    dying = ctx.Process(
        target=_read_then_die,
        args=(settings.database_url, settings.data_dir, answered),
    )
    dying.start()
    dying.join(120)
    assert dying.exitcode == -signal.SIGKILL
    assert answered.value == 200
    again = create_app(
        replace(settings, extra={"clients": TEST_CLIENTS, "v2_senders": TEST_V2_SENDERS})
    )
    try:
        found = client_as(again, "admin").get("/fhir/AuditEvent?entity=Patient/k1&subtype=read")
        assert found.get_json()["total"] == 1
    finally:
        again.extensions["fhir_kat"].export.shutdown()
        again.extensions["fhir_kat"].store.dispose()


def _event(n: int) -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "id": f"ev-{n}",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
        },
        "recorded": "2026-01-15T09:00:00Z",
        "agent": [{"requestor": True, "who": {"display": "test"}}],
        "source": {"observer": {"display": "fhir_kat"}},
    }


def _stored_events(store: Store) -> list[str]:
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                select(resource_versions.c.res_id).where(
                    resource_versions.c.res_type == "AuditEvent"
                )
            ).scalars()
        )


def test_a_move_interrupted_before_the_journal_forgets_stores_each_record_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'moves.sqlite3'}")
    store.create_schema()
    for n in range(AUDIT_MOVE_AT // 2):
        store.record_audit(_event(n))
    assert _stored_events(store) == []  # below the threshold: all waiting in the journal

    def crash(upto: int) -> None:
        raise OSError("killed between the store's commit and the journal's")

    assert store._journal is not None
    monkeypatch.setattr(store._journal, "forget", crash)
    store.drain_audit()  # moved and committed, not forgotten
    monkeypatch.undo()
    assert store._journal.backlog() == AUDIT_MOVE_AT // 2
    store.record_audit(_event(999))
    store.drain_audit()
    ids = _stored_events(store)
    assert sorted(ids) == sorted([f"ev-{n}" for n in range(AUDIT_MOVE_AT // 2)] + ["ev-999"])
    assert store._journal.backlog() == 0
    store.dispose()


def test_writers_take_waiting_records_along_and_idle_moments_move_them(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'along.sqlite3'}")
    store.create_schema()
    assert store._journal is not None
    with store._writer_turn():  # the database's writer busy: appends never wait for it
        for n in range(AUDIT_MOVE_AT + 5):
            store.record_audit(_event(n))
    assert store._journal.backlog() == AUDIT_MOVE_AT + 5
    with store.write() as tx:
        tx.put(_patient("w1"), current=None)
    assert store._journal.backlog() == 0
    assert len(_stored_events(store)) == AUDIT_MOVE_AT + 5
    for n in range(1000, 1000 + AUDIT_MOVE_AT):  # the writer idle: the append moves them
        store.record_audit(_event(n))
    assert store._journal.backlog() == 0
    assert len(_stored_events(store)) == 2 * AUDIT_MOVE_AT + 5
    store.dispose()


def test_concurrent_appends_share_one_commit(tmp_path: Path) -> None:
    journal = AuditJournal(str(tmp_path / "journal"))
    journal.append("warm", "{}")  # the connection and table made
    commits = journal.commits
    threads = [threading.Thread(target=journal.append, args=(f"e{n}", "{}")) for n in range(8)]
    with journal._lock:  # the group's first member is busy committing
        for t in threads:
            t.start()
        for _ in range(3000):  # bounded: until all 8 wait (3 s at most)
            with journal._waiting_lock:
                if len(journal._waiting) == 8:
                    break
            threading.Event().wait(0.001)
    for t in threads:
        t.join(30)
    assert journal.commits == commits + 1
    assert journal.appended == 9
    assert sorted(r.event_id for r in journal.oldest(100)) == sorted(
        ["warm"] + [f"e{n}" for n in range(8)]
    )
    journal.close()


def test_records_from_several_processes_all_land(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'procs.sqlite3'}"
    store = Store(url)
    store.create_schema()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_many, args=(url, k)) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    store.drain_audit()
    with store.engine.connect() as conn:
        count = conn.execute(
            select(func.count()).where(resource_versions.c.res_type == "AuditEvent")
        ).scalar_one()
    assert count == 3 * 100
    store.dispose()


def _append_many(url: str, k: int) -> None:
    store = Store(url)
    for n in range(100):
        store.record_audit(_event(k * 1000 + n))
    store.dispose()


# ------------------------------------------------- the paths that are not plain REST requests


def _one_new_event(app: Flask, make: Any) -> dict[str, Any]:
    before = set(_audit_ids(app))
    make()
    new = [i for i in _audit_ids(app) if i not in before]
    assert len(new) == 1, len(new)
    shown = client_as(app, "admin").get(f"/fhir/AuditEvent/{new[0]}")
    assert shown.status_code == 200
    event: dict[str, Any] = shown.get_json()
    return event


def test_cds_hooks_calls_leave_exactly_one_audit_event(cds_app: Flask) -> None:
    body = hook_request(prefetch=prefetch(condition("c1", PTSD)))
    _one_new_event(cds_app, lambda: cds_call(cds_app, body))
    _one_new_event(cds_app, lambda: cds_call(cds_app, {"hook": "patient-view"}))  # refused


def test_messages_and_v2_leave_exactly_one_audit_event(app: Flask, mllp_port: int) -> None:
    staff, referrer = client_as(app, "staff"), client_as(app, "referrer")
    message = as_message(transform(staff, referral()))
    _one_new_event(app, lambda: process(referrer, message))
    _one_new_event(app, lambda: process(referrer, message))  # re-sent: nothing written
    raw = referral_message(referral(), "JOURNAL-1")
    _one_new_event(app, lambda: ack_code(send(mllp_port, raw)))
    _one_new_event(app, lambda: ack_code(send(mllp_port, raw)))  # answered from its ACK
