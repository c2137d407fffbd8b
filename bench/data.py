"""Synthetic data sets for the benchmarks, and their bulk loader: the rows ``Tx.create_many``
writes (the same stored JSON and index rows as one ``put`` per resource), built by the store's
own functions and sent with ``COPY`` / ``executemany`` (1M resources in minutes, not hours).

Everything is synthetic: participants ``p<n>``, referrers ``org<n>``, codes from the shipped
instrument catalogue (LOINC totals, see fhir_kat/instruments).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, func, insert, select, text

from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.search import extract_index
from fhir_kat.store import Store
from fhir_kat.store.schema import resource_versions
from fhir_kat.store.schema import resources as resources_table
from fhir_kat.store.store import _index_params, _stored_form, dumps, patient_of

T0 = datetime(2026, 1, 10, tzinfo=UTC)
#: Resources per ``Tx.create_many`` call (one clock reading each) in the reference loader.
CHUNK = 2000
#: Resources per transaction in the fast loader.
BATCH = 50_000


def observations(participants: int, seed: int = 1) -> Iterator[dict[str, Any]]:
    """Per participant: the Patient, the referral Task whose executionPeriod is the program
    (from the day after the baseline to day 85, completed), then a baseline and a 90-day total
    score per instrument derived from a response (10 resources per participant with the four
    shipped instruments)."""
    rng = random.Random(seed)
    instruments = list(load_catalogue().instruments.values())
    program = {
        "start": (T0 + timedelta(days=1)).date().isoformat(),
        "end": (T0 + timedelta(days=85)).date().isoformat(),
    }
    for i in range(participants):
        pid = f"p{i}"
        yield {"resourceType": "Patient", "id": pid}
        yield {
            "resourceType": "Task",
            "id": f"referral-{pid}",
            "status": "completed",
            "intent": "order",
            "code": {
                "coding": [
                    {"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}
                ]
            },
            "for": {"reference": f"Patient/{pid}"},
            "executionPeriod": program,
        }
        for inst in instruments:
            for j, days in enumerate((0, 90)):
                when = T0 + timedelta(days=days, minutes=rng.randrange(600))
                yield {
                    "resourceType": "Observation",
                    "id": f"{pid}-{inst.key}-{j}",
                    "status": "final",
                    "code": {"coding": [dict(inst.total)]},
                    "subject": {"reference": f"Patient/{pid}"},
                    "effectiveDateTime": when.isoformat(),
                    "valueQuantity": {"value": round(rng.uniform(inst.min, inst.max), 1)},
                    "derivedFrom": [{"reference": f"QuestionnaireResponse/{pid}-{inst.key}-{j}"}],
                }


def tasks(count: int, per_requester: int = 100, seed: int = 3) -> Iterator[dict[str, Any]]:
    """Referral Tasks, ``per_requester`` per referring organisation on average: a bigger
    program has more referrers, not longer work lists (so a requester's search returns about
    as many Tasks at every size)."""
    rng = random.Random(seed)
    organisations = max(1, count // per_requester)
    for i in range(count):
        yield {
            "resourceType": "Task",
            "id": f"t{i}",
            "status": "requested",
            "intent": "order",
            "requester": {"reference": f"Organization/org{rng.randrange(organisations)}"},
            "for": {"reference": f"Patient/p{rng.randrange(max(1, count))}"},
        }


class StepClock:
    """A clock that moves one minute per reading: ``create_many`` reads it once per chunk,
    so a bulk load spreads ``lastUpdated`` over time as real ingest would."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def interleave(*streams: list[dict[str, Any]], seed: int = 4) -> Iterator[dict[str, Any]]:
    """Merge lists in random order, each spread evenly over the whole load (types arrive
    mixed, as in a live program)."""
    rng = random.Random(seed)
    left = [len(s) for s in streams]
    pos = [0] * len(streams)
    while any(left):
        i = rng.choices(range(len(streams)), weights=left)[0]
        yield streams[i][pos[i]]
        pos[i] += 1
        left[i] -= 1


def load(store: Store, resources: Iterable[dict[str, Any]], *, batch: int = BATCH) -> int:
    """Bulk-create ``resources`` (none may be stored yet); returns how many.

    Exactly the rows ``Tx.create_many`` writes for each ``CHUNK`` of them (one clock reading
    per chunk, the same stored JSON, version, index rows and ``seq`` order, built by the
    store's own functions), but written without the store's per-statement work: rows are built
    in Python and sent ``batch`` resources per transaction, with ``COPY`` on PostgreSQL and
    ``executemany`` on SQLite. ``seq`` values are assigned here, after the highest stored one,
    and PostgreSQL's sequence is moved past them, so later writes carry on from there. For
    benchmarks on a database nobody else writes to while it loads."""
    done = 0
    pending: list[list[dict[str, Any]]] = []
    for chunk in _chunks(resources, CHUNK):
        pending.append(chunk)
        if sum(len(c) for c in pending) >= batch:
            done += _write_batch(store, pending)
            pending = []
    if pending:
        done += _write_batch(store, pending)
    return done


def load_through_tx(store: Store, resources: Iterable[dict[str, Any]]) -> int:
    """The reference loader: ``Tx.create_many`` per ``CHUNK``, one transaction each (what
    ``load`` must reproduce row for row; the benchmarks' loader before 1M was within reach)."""
    done = 0
    for chunk in _chunks(resources, CHUNK):
        with store.write() as tx:
            tx.create_many(chunk)
        done += len(chunk)
    return done


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class _Rows:
    """One batch's rows per table, as column-name → value dicts in insertion order."""

    by_table: dict[Table, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, table: Table, row: dict[str, Any]) -> None:
        self.by_table.setdefault(table, []).append(row)


def _build(store: Store, chunks: list[list[dict[str, Any]]], first_seq: int) -> _Rows:
    """The rows ``Tx.create_many`` would write for each of ``chunks``."""
    out = _Rows()
    seq = first_seq
    for chunk in chunks:
        now = store.clock()
        when = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
        for resource in chunk:
            ordered = _stored_form(resource, 1, when)
            content = dumps(ordered)
            rtype, rid = ordered["resourceType"], ordered["id"]
            out.add(
                resource_versions,
                {
                    "seq": seq,
                    "res_type": rtype,
                    "res_id": rid,
                    "version_id": 1,
                    "last_updated": when,
                    "method": "POST",
                    "content": content,
                },
            )
            index = extract_index(ordered)
            patient_id = patient_of(ordered, index)
            out.add(
                resources_table,
                {
                    "res_type": rtype,
                    "res_id": rid,
                    "version_id": 1,
                    "last_updated": when,
                    "seq": seq,
                    "deleted": False,
                    "content": content,
                    "patient_id": patient_id,
                },
            )
            for table, params in _index_params(ordered, index, seq=seq, patient_id=patient_id):
                out.add(table, params)
            seq += 1
    return out


def _write_batch(store: Store, chunks: list[list[dict[str, Any]]]) -> int:
    with store.engine.connect() as conn, conn.begin():
        top = conn.execute(select(func.max(resource_versions.c.seq))).scalar_one()
        rows = _build(store, chunks, int(top or 0) + 1)
        if store.is_sqlite:
            for table, table_rows in rows.by_table.items():
                conn.execute(insert(table), table_rows)
        else:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for table, table_rows in rows.by_table.items():
                columns = list(table_rows[0])
                copy_sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
                with cursor.copy(copy_sql) as copy:
                    for row in table_rows:
                        copy.write_row([row[c] for c in columns])
            # COPY bypasses the sequence: move it past the seqs written here.
            conn.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('resource_versions', 'seq'), "
                    "(SELECT max(seq) FROM resource_versions))"
                )
            )
    return sum(len(c) for c in chunks)
