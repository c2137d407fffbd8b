"""Every stored row of the resource, version and index tables, for comparing two ways of
writing the same data (equal dumps = the same resources, history and search index)."""

from __future__ import annotations

from sqlalchemy import select

from fhir_kat.store import Store
from fhir_kat.store.schema import INDEX_TABLES, resource_versions, resources


def dump_tables(store: Store) -> dict[str, list[tuple[str, ...]]]:
    out = {}
    with store.read() as tx:
        for table in (resources, resource_versions, *INDEX_TABLES):
            rows = tx.conn.execute(select(table)).all()
            out[table.name] = sorted(tuple(str(v) for v in r) for r in rows)
    return out
