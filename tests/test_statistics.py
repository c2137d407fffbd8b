"""The service refreshes the planner's statistics itself (issue 25, fhir_kat/store/statistics.py):
after a bulk load it did not write (a restored dump, a loading tool) at start-up, and after a
large import of its own by the number of versions written, on SQLite and PostgreSQL, with
autovacuum off (the tables' own ``autovacuum_enabled = off`` on PostgreSQL)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text

from bench import data as bench_data
from fhir_kat.store import Store
from fhir_kat.store.statistics import STALE_ROWS, TABLES


def _analysed(store: Store) -> dict[str, Any]:
    """Per table: the row count the statistics record (SQLite), or whether it was ever
    analysed and how many rows changed since (PostgreSQL)."""
    with store.engine.connect() as conn:
        if store.is_sqlite:
            has = conn.execute(
                text("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'")
            ).first()
            if has is None:
                return {}
            rows = conn.execute(text("SELECT tbl, stat FROM sqlite_stat1 WHERE idx IS NOT NULL"))
            return {r.tbl: int(r.stat.split()[0]) for r in rows}
        rows = conn.execute(
            text(
                "SELECT relname, coalesce(last_analyze, last_autoanalyze) AS at, "
                "n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = ANY(:t)"
            ),
            {"t": list(TABLES)},
        )
        return {r.relname: (r.at, r.n_mod_since_analyze) for r in rows}


def _wait_for_counters(store: Store, rows: int) -> None:
    """PostgreSQL reports a backend's row counts shortly after its transaction: wait for
    them (bounded: 10 s)."""
    if store.is_sqlite:
        return
    for _ in range(100):
        with store.engine.connect() as conn:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            live = conn.execute(
                text("SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'resources'")
            ).scalar()
        if live is not None and live >= rows:
            return
        time.sleep(0.1)
    raise AssertionError("PostgreSQL never reported the load's row counts")


def _autovacuum_off(store: Store) -> None:
    if store.is_sqlite:
        return
    with store.engine.begin() as conn:
        for table in TABLES:
            conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = off)"))
            conn.execute(text(f"SELECT pg_stat_reset_single_table_counters('{table}'::regclass)"))


def test_a_bulk_loaded_database_gets_statistics_at_start_up(database_url: str) -> None:
    loader = Store(database_url)
    loader.create_schema()
    _autovacuum_off(loader)
    loaded = bench_data.load(loader, bench_data.observations(100))
    loader.dispose()
    probe = Store(database_url)
    _wait_for_counters(probe, loaded)
    before = _analysed(probe)
    if probe.is_sqlite:
        assert before.get("resources") is None
    else:
        assert before["resources"][0] is None
    probe.dispose()

    service = Store(database_url)  # a process starting on that database
    service.create_schema()
    after = _analysed(service)
    if service.is_sqlite:
        assert after["resources"] >= loaded // 2
    else:
        assert after["resources"][0] is not None and after["resources"][1] == 0
        assert after["search_token"][0] is not None
    # Fresh statistics are left alone: a second start analyses nothing.
    assert service.statistics.refresh() == []
    service.dispose()


def test_a_large_import_refreshes_them_by_its_size(database_url: str) -> None:
    store = Store(database_url)
    store.create_schema()
    _autovacuum_off(store)
    with store.write() as tx:
        tx.create_many(list(bench_data.tasks(50)))
    store.statistics.refresh()  # what start-up did: statistics for the first 50
    _wait_for_counters(store, 50)
    first = _analysed(store)["resources"]

    # One transaction of many versions counts for its size, not as one write.
    size = 20 * STALE_ROWS
    with store.write() as tx:
        tx.create_many([{**t, "id": f"big-{t['id']}"} for t in bench_data.tasks(size)])
    if store.is_sqlite:
        # A sampled ANALYZE (``analysis_limit``) estimates the row count.
        assert _analysed(store)["resources"] >= size // 2 > 5 * first
    else:
        # Analysed after the commit, without waiting for the server's counters.
        at, _ = _analysed(store)["resources"]
        assert at is not None and at != first[0]
    store.dispose()
