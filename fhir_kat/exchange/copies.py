"""Partner copies: which resources each partner was sent, under which kind, at which version —
so that a later version of any of them is sent too and the partner's copy converges to the
program's record.

Owns: the ``partner_copy`` table (on the store's ``MetaData``; ``Store.create_schema()``
creates it once this module is imported), ``record`` (called by ``routing.enqueue_artifact``
in the write transaction that queues a delivery) and ``behind`` (the copies whose queued
version is older than what is stored now, for the write pipeline's convergence step).

Must not: decide what a partner receives or in which form (``routing`` and ``bundles`` do, at
send time), or send anything. A row means "queued for this partner", not "delivered": the
outbox holds the delivery's fate, and per-patient order makes the later version go after it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Index, Integer, String, Table, and_, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from fhir_kat.exchange.bundles import version_of
from fhir_kat.store import Tx
from fhir_kat.store.schema import metadata

partner_copy = Table(
    "partner_copy",
    metadata,
    Column("partner", String(64), primary_key=True),
    Column("resource_type", String(64), primary_key=True),
    Column("resource_id", String(64), primary_key=True),
    # The artifact kind it was sent under: its later versions go under the same kind, so the
    # same consent purpose and the same partner choice apply.
    Column("artifact_kind", String(64), nullable=False),
    Column("patient_key", String(128), nullable=True),
    # The version last queued for this partner (0: queued without a stored version).
    Column("version_id", Integer, nullable=False),
    # Looked up by resource on every write of a resource sent before (copies_of): an index
    # lookup, never a scan of every copy (tests/test_statement_plans.py).
    Index("partner_copy_resource", "resource_type", "resource_id"),
)

#: Keys per query when looking up copies (well under every backend's parameter limit).
CHUNK = 400


@dataclass(frozen=True)
class Copy:
    partner: str
    resource_type: str
    resource_id: str
    artifact_kind: str
    patient_key: str | None
    version_id: int


def record(
    tx: Tx,
    partner: str,
    artifact_kind: str,
    patient_key: str | None,
    resources: Iterable[Mapping[str, Any]],
) -> None:
    """Note that these resources were queued for ``partner`` (in the queueing transaction)."""
    rows = {}
    for res in resources:
        rtype, rid = res.get("resourceType"), res.get("id")
        if isinstance(rtype, str) and isinstance(rid, str) and rid:
            version = version_of(res)
            if version == 0:  # queued without its meta: the version stored now is the one sent
                stored = tx.get(rtype, rid)
                version = stored.version_id if stored is not None else 0
            rows[(rtype, rid)] = {
                "partner": partner,
                "resource_type": rtype,
                "resource_id": rid,
                "artifact_kind": artifact_kind,
                "patient_key": patient_key,
                "version_id": version,
            }
    if not rows:
        return
    insert = sqlite_insert if tx.store.is_sqlite else pg_insert
    stmt = insert(partner_copy).values(list(rows.values()))
    stmt = stmt.on_conflict_do_update(
        index_elements=["partner", "resource_type", "resource_id"],
        set_={
            "artifact_kind": stmt.excluded.artifact_kind,
            "patient_key": stmt.excluded.patient_key,
            "version_id": stmt.excluded.version_id,
        },
    )
    tx.conn.execute(stmt)


def copies_of(tx: Tx, keys: Collection[tuple[str, str]]) -> list[Copy]:
    """Every partner copy of these ``(type, id)`` resources."""
    ordered = sorted(keys)
    found: list[Copy] = []
    for start in range(0, len(ordered), CHUNK):
        by_type: dict[str, list[str]] = {}
        for rtype, rid in ordered[start : start + CHUNK]:
            by_type.setdefault(rtype, []).append(rid)
        # One equality and an IN per type: both databases plan each branch as index lookups
        # (a row-value IN over (type, id) pairs is planned by SQLite as a scan).
        rows = tx.conn.execute(
            select(partner_copy).where(
                or_(
                    *(
                        and_(
                            partner_copy.c.resource_type == rtype,
                            partner_copy.c.resource_id.in_(ids),
                        )
                        for rtype, ids in by_type.items()
                    )
                )
            )
        )
        found += [
            Copy(
                r.partner,
                r.resource_type,
                r.resource_id,
                r.artifact_kind,
                r.patient_key,
                int(r.version_id),
            )
            for r in rows
        ]
    # Sorted here, not in SQL: an ORDER BY on the primary key's columns makes PostgreSQL walk
    # that index instead of looking the resources up.
    return sorted(found, key=lambda c: (c.partner, c.resource_type, c.resource_id))


__all__ = ["Copy", "copies_of", "partner_copy", "record"]
