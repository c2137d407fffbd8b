"""The export runner's single streamed query per type (``Tx.scan_batches``, issue 9) writes
exactly what the keyset-paged ``Tx.scan`` loop it replaced wrote: every batch boundary, the
consent filter, ``_since``, Group members, ``_typeFilter`` criteria, deletions, patient-level
skipping and the OR of several ``_typeFilter`` queries; it stops at a cancel and heartbeats.

No timings here: the figures are in bench/export.py and docs/benchmarks.md.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import insert, select

from fhir_kat.search import Criterion, SearchQuery
from fhir_kat.services import export as export_module
from fhir_kat.services.export import ExportService
from fhir_kat.store import Store, Tx
from fhir_kat.store.schema import export_jobs
from fhir_kat.store.view import EVERYTHING, ReadScope
from tests.conftest import FakeClock

PATIENTS = 7


def _items() -> Iterator[dict[str, Any]]:
    for i in range(PATIENTS):
        yield {"resourceType": "Patient", "id": f"p{i}"}
        for j in range(3):
            yield {
                "resourceType": "Observation",
                "id": f"o{i}-{j}",
                "status": "final" if j else "preliminary",
                "code": {"coding": [{"system": "http://loinc.org", "code": f"c{j}"}]},
                "subject": {"reference": f"Patient/p{i}"},
            }
    for k in range(4):  # outside any patient's compartment
        yield {
            "resourceType": "Observation",
            "id": f"free{k}",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "c1"}]},
        }


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = Store(database_url, clock=FakeClock())
    s.create_schema()
    with s.write() as tx:
        for item in _items():
            tx.put(item, current=None)
    with s.write() as tx:  # a deletion and an update: the update moves to the end of the order
        current = tx.get("Observation", "o2-1")
        assert current is not None
        tx.delete(current)
        current = tx.get("Observation", "o0-0")
        assert current is not None
        tx.put({**current.json(), "status": "final"}, current=current)
    yield s
    s.dispose()


def _paged(tx: Tx, query: SearchQuery, limit: int, **kw: Any) -> list[tuple[int, str, str | None]]:
    """The reading before issue 9: keyset pages of ``Tx.scan``."""
    out: list[tuple[int, str, str | None]] = []
    after = 0
    while True:
        batch = tx.scan(query, after_seq=after, limit=limit, **kw)
        out += batch
        if len(batch) < limit:
            return out
        after = batch[-1][0]


QUERIES = {
    "all": SearchQuery("Observation"),
    "patients": SearchQuery("Patient"),
    "code": SearchQuery(
        "Observation",
        criteria=(Criterion("code", "token", "", (("http://loinc.org", "c1", True),), ""),),
    ),
    "status-not": SearchQuery(
        "Observation",
        criteria=(Criterion("status", "token", "not", ((None, "final", False),), ""),),
    ),
}


@pytest.mark.parametrize("name", sorted(QUERIES))
@pytest.mark.parametrize("batch", [1, 2, 5, 1000])
@pytest.mark.parametrize("filters", ["none", "visible", "members", "since"])
def test_scan_batches_reads_what_paged_scans_read(
    store: Store, name: str, batch: int, filters: str
) -> None:
    kw: dict[str, Any] = {}
    if filters == "visible":
        kw["visible_patients"] = {"p1", "p4", "nobody"}
    elif filters == "members":
        kw["patients"] = {"p0", "p2", "p6"}
    elif filters == "since":
        with store.read() as tx:
            middle = tx.get("Observation", "o3-1")
        assert middle is not None
        kw["since"] = middle.last_updated
    query = QUERIES[name]
    with store.read() as tx:
        expected = _paged(tx, query, 3, **kw)
        batches = [list(b) for b in tx.scan_batches(query, batch=batch, **kw)]
    assert expected, "the case must read something"
    assert [tuple(r) for b in batches for r in b] == expected
    assert all(0 < len(b) <= batch for b in batches)
    assert all(len(b) == batch for b in batches[:-1])  # only the last one is short


def test_scan_batches_stopped_early_leaves_the_transaction_usable(store: Store) -> None:
    with store.read() as tx:
        first = tx.scan_batches(SearchQuery("Observation"), batch=2)
        assert len(next(first)) == 2
        first.close()  # the export was cancelled mid-type
        again = [r for b in tx.scan_batches(SearchQuery("Patient"), batch=3) for r in b]
        assert len(again) == PATIENTS
        assert tx.get("Patient", "p0") is not None


class _Access:
    """A caller whose scope is consent alone: the patients in ``visible`` (None: any)."""

    def __init__(self, visible: set[str] | None) -> None:
        self.visible = visible
        self.calls = 0

    def scope(self, _tx: Any, _rtype: str) -> ReadScope:
        self.calls += 1
        return EVERYTHING if self.visible is None else ReadScope(patients=frozenset(self.visible))

    def shape(self, _tx: Any, stored: Any) -> Any:
        return stored

    def reads(self, _rtype: str) -> bool:
        return True


class _Clock:
    """Moves a minute per reading: every batch is due a heartbeat."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 15, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def _old_write_type(
    store: Store,
    query: SearchQuery,
    visible: set[str] | None,
    patients: set[str] | None,
    level: str,
    seen: set[int] | None,
) -> list[str]:
    """What ``_write_type`` wrote before issue 9, line by line."""
    lines = []
    with store.read() as tx:
        rows = _paged(tx, query, 2, visible_patients=visible, patients=patients)
    for seq, content, patient in rows:
        if level != "system" and patient is None:
            continue
        if seen is not None:
            if seq in seen:
                continue
            seen.add(seq)
        lines.append(content)
    return lines


@pytest.mark.parametrize("level", ["system", "patient", "group"])
@pytest.mark.parametrize("visible", [None, {"p1", "p3"}])
def test_write_type_writes_what_the_paged_loop_wrote(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    level: str,
    visible: set[str] | None,
) -> None:
    monkeypatch.setattr(export_module, "BATCH", 2)  # many batch boundaries
    service = ExportService(store, tmp_path, _Clock())
    beats: list[str] = []
    monkeypatch.setattr(service, "_update", lambda job_id, **_: beats.append(job_id))
    patients = {"p1", "p2", "p5"} if level == "group" else None
    # two _typeFilter queries that overlap (OR-ed, each resource once)
    queries = [QUERIES["code"], QUERIES["status-not"], QUERIES["all"]]
    try:
        out = io.StringIO()
        seen: set[int] = set()
        count = sum(
            service._write_type(
                out, q, cast(Any, _Access(visible)), None, patients, level, "job", seen=seen
            )
            for q in queries
        )
        old_seen: set[int] = set()
        expected = [
            line
            for q in queries
            for line in _old_write_type(store, q, visible, patients, level, old_seen)
        ]
        single = io.StringIO()
        single_count = service._write_type(
            single, QUERIES["all"], cast(Any, _Access(visible)), None, patients, level, "job", None
        )
        expected_single = _old_write_type(store, QUERIES["all"], visible, patients, level, None)
    finally:
        service.shutdown()
    assert out.getvalue().splitlines() == expected and count == len(expected)
    assert single.getvalue().splitlines() == expected_single
    assert single_count == len(expected_single)
    assert expected_single, "the case must export something"
    for line in expected_single:  # consent: no line of a patient the caller may not see
        subject = json.loads(line).get("subject", {}).get("reference", "")
        assert visible is None or not subject or subject.split("/")[1] in visible
    assert beats and set(beats) == {"job"}


def test_write_type_stops_at_a_cancel(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "BATCH", 3)
    service = ExportService(store, tmp_path, lambda: datetime(2026, 1, 15, tzinfo=UTC))
    checks = iter([False, True])  # cancelled while the second batch was written
    monkeypatch.setattr(service, "_is_cancelled", lambda _job: next(checks))
    try:
        out = io.StringIO()
        count = service._write_type(
            out, QUERIES["all"], cast(Any, _Access(None)), None, None, "system", "job", None
        )
    finally:
        service.shutdown()
    assert count == 6 and len(out.getvalue().splitlines()) == 6


def test_heartbeat_is_written_while_a_type_streams(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat is a write transaction of its own while the type's read is open (a
    second connection; on SQLite a WAL writer beside a reader): it must go through."""
    monkeypatch.setattr(export_module, "BATCH", 4)
    clock = _Clock()
    start = clock()
    with store.write() as tx:
        tx.conn.execute(
            insert(export_jobs).values(
                id="job",
                client_id="c",
                status="in-progress",
                request_url="x",
                params="{}",
                created_at=start.replace(tzinfo=None),
                heartbeat_at=start.replace(tzinfo=None),
                transaction_time="2026-01-15T00:00:00.000Z",
            )
        )
    service = ExportService(store, tmp_path, clock)
    try:
        count = service._write_type(
            io.StringIO(),
            QUERIES["all"],
            cast(Any, _Access(None)),
            None,
            None,
            "system",
            "job",
            None,
        )
    finally:
        service.shutdown()
    with store.read() as tx:
        row = tx.conn.execute(select(export_jobs).where(export_jobs.c.id == "job")).one()
    assert count > 4 and row.heartbeat_at > start.replace(tzinfo=None) + timedelta(minutes=1)
