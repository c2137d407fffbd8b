"""Rebuilding search-index rows from the stored resources.

Owns: knowing which resource types' index rows are stale (their ``index_fingerprint``, with
what the store derives from them — ``DERIVED`` — differs from the one recorded in
``store_meta`` when they were last written, or none was recorded: a database from before the
record existed) and rewriting them. ``Store.create_schema`` brings a
database up to date at start-up; ``fhir-kat reindex`` rebuilds on demand. Must not: change any
stored resource or version, only what is derived from them (index rows, ``patient_id``).

Each type is read in keyset batches of its current resources and rewritten batch by batch in
the caller's transaction, so a database is never left half-indexed: until the new fingerprints
are committed with the rows, the next start-up does it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, delete, false, insert, select, update

from fhir_kat.search import all_params, extract_index, index_fingerprint
from fhir_kat.store import observations
from fhir_kat.store.schema import INDEX_TABLES, resources, store_meta

BATCH = 1000
META_KEY = "index"

Progress = Callable[[str, int], None]


def recorded_fingerprints(conn: Connection) -> dict[str, str]:
    row = conn.execute(select(store_meta.c.value).where(store_meta.c.name == META_KEY)).first()
    loaded: dict[str, str] = json.loads(row[0]) if row else {}
    return loaded


#: What the store derives from a type's index rows beyond the index itself (tables and the
#: format of their rows): part of that type's fingerprint, so a database written before a
#: derived table existed, or under another format of it, gets its rows rebuilt.
DERIVED = {"Observation": f"observation_values:{observations.FORMAT}"}


def current_fingerprints() -> dict[str, str]:
    return {rtype: _fingerprint(rtype) for rtype in sorted(all_params())}


def _fingerprint(rtype: str) -> str:
    base = index_fingerprint(rtype)
    derived = DERIVED.get(rtype)
    if derived is None:
        return base
    return hashlib.sha256(f"{base}+{derived}".encode()).hexdigest()[:16]


def stale_types(conn: Connection) -> list[str]:
    """Resource types with stored resources whose index rows were written under other
    parameter definitions (or before fingerprints were recorded)."""
    recorded = recorded_fingerprints(conn)
    current = current_fingerprints()
    candidates = sorted(
        t for t in set(current) | set(recorded) if recorded.get(t) != current.get(t)
    )
    return [t for t in candidates if _has_resources(conn, t)]


def bring_up_to_date(conn: Connection, progress: Progress | None = None) -> list[str]:
    """Rebuild the stale types (``stale_types``) and record the current fingerprints; returns
    the types rebuilt. Runs in ``conn``'s transaction: the caller commits."""
    stale = stale_types(conn)
    reindex(conn, stale, progress)
    if stale or recorded_fingerprints(conn) != current_fingerprints():
        _record(conn)
    return stale


def reindex(conn: Connection, types: Iterable[str], progress: Progress | None = None) -> int:
    """Rewrite the index rows (and ``patient_id``) of every current resource of ``types``
    from its stored JSON, exactly as a ``put`` of it would; returns how many were rewritten.
    On PostgreSQL each batch is locked (``FOR UPDATE``) so a concurrent write cannot leave
    rows from the version read here."""
    # Imported here: store.py calls this module from Store.create_schema.
    from fhir_kat.store.store import _index_params, patient_of

    is_postgres = conn.dialect.name == "postgresql"
    done = 0
    for rtype in types:
        after = -1
        while True:
            stmt = (
                select(resources.c.res_id, resources.c.seq, resources.c.content)
                .add_columns(resources.c.patient_id)
                .where(
                    resources.c.res_type == rtype,
                    resources.c.deleted == false(),
                    resources.c.seq > after,
                )
                .order_by(resources.c.seq)
                .limit(BATCH)
            )
            if is_postgres:
                stmt = stmt.with_for_update()
            batch = conn.execute(stmt).all()
            if not batch:
                break
            ids = [row.res_id for row in batch]
            for table in INDEX_TABLES:
                conn.execute(
                    delete(table).where(table.c.res_type == rtype, table.c.res_id.in_(ids))
                )
            rows_by_table: dict[Any, list[dict[str, Any]]] = {}
            for row in batch:
                resource = json.loads(row.content)
                rows = extract_index(resource)
                patient_id = patient_of(resource, rows)
                for table, params in _index_params(
                    resource, rows, seq=row.seq, patient_id=patient_id
                ):
                    rows_by_table.setdefault(table, []).append(params)
                if patient_id != row.patient_id:
                    conn.execute(
                        update(resources)
                        .where(resources.c.res_type == rtype, resources.c.res_id == row.res_id)
                        .values(patient_id=patient_id)
                    )
            for table in INDEX_TABLES:
                if table in rows_by_table:
                    conn.execute(insert(table), rows_by_table[table])
            done += len(batch)
            after = batch[-1].seq
            if progress is not None:
                progress(rtype, done)
    return done


def _record(conn: Connection) -> None:
    value = json.dumps(current_fingerprints(), separators=(",", ":"), sort_keys=True)
    updated = conn.execute(
        update(store_meta).where(store_meta.c.name == META_KEY).values(value=value)
    )
    if updated.rowcount == 0:
        conn.execute(insert(store_meta).values(name=META_KEY, value=value))


def _has_resources(conn: Connection, rtype: str) -> bool:
    found = conn.execute(
        select(resources.c.res_id).where(resources.c.res_type == rtype).limit(1)
    ).first()
    return found is not None
