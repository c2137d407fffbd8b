"""The planner's statistics, kept fresh by the service itself (issue 25).

Owns: deciding when the store's tables need ``ANALYZE`` and running it. Must not: depend on
autovacuum (off on some managed and test installations, and a minute or more late after a bulk
load everywhere), or hold queries of the store's data (``store.py`` does).

Both databases plan from table statistics: which criterion a search starts from, whether a
lookup is worth an index. A database without them (new, restored from a dump, bulk-loaded by
a tool that bypasses the service) or with stale ones (a large import) gets plans that grow with
the data: a search at 123 ms p50 instead of 4 ms until an ANALYZE ran. So the store checks:

- at start-up (``Store.create_schema``): whatever happened to the database while no process
  of ours was watching;
- after its own writes, counted in stored versions (a 1,000-entry transaction counts 1,000):
  at 64 written, then each time the count doubles up to ``STEADY_EVERY``, then every
  ``STEADY_EVERY``.

A check is cheap and ANALYZEs only what is stale. PostgreSQL: the server's own counters
(``pg_stat_user_tables``, kept with ``track_counts``, PostgreSQL's default, whether autovacuum
runs or not) — a table never analysed while holding rows, or changed by more than
``STALE_FRACTION`` of its rows (plus ``STALE_ROWS``) since, by those counters or by what this
process wrote since its last ANALYZE (the counters lag a commit by up to a second or so); one
process at a time (an advisory
lock: the others skip, the statistics are shared). SQLite: the row count ``sqlite_stat1``
recorded for ``resources`` against the versions this process wrote since, or no statistics at
all; its ANALYZE is sampled (``analysis_limit``): milliseconds at any size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.exc import SQLAlchemyError

from fhir_kat.store.schema import INDEX_TABLES, resource_versions, resources

log = logging.getLogger("fhir_kat.store")

#: Versions written between checks once the first doublings are done.
STEADY_EVERY = 4096
FIRST_CHECK = 64
#: A table is stale once this share of its rows (plus ``STALE_ROWS``) changed since its last
#: ANALYZE (autovacuum's defaults are 0.1 and 50).
STALE_FRACTION = 0.1
STALE_ROWS = 50
#: The tables whose statistics plan the store's statements.
TABLES: tuple[str, ...] = (
    resources.name,
    resource_versions.name,
    *(t.name for t in INDEX_TABLES),
)
_LOCK = 7303  # advisory lock key (7301: schema, 7302: id namespace)


class Statistics:
    """When the statistics of one store's tables are due for a check, and the check."""

    def __init__(
        self,
        engine: Engine,
        *,
        is_sqlite: bool,
        writer_turn: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.engine = engine
        self.is_sqlite = is_sqlite
        self._writer_turn = writer_turn
        self._lock = threading.Lock()
        self._written = 0
        self._next_check = FIRST_CHECK
        self._since_analyze = 0  # versions this process wrote since its last ANALYZE (SQLite)

    def wrote(self, versions: int) -> None:
        """Count ``versions`` stored versions just committed; check when due."""
        if versions <= 0:
            return
        with self._lock:
            self._written += versions
            self._since_analyze += versions
            due = self._written >= self._next_check
            if due:
                step = min(self._next_check, STEADY_EVERY)
                while self._next_check <= self._written:
                    self._next_check += step
        if due:
            try:
                self.refresh()
            except SQLAlchemyError as exc:
                # The write is committed: a missed refresh only waits for the next check.
                log.warning("statistics refresh failed", extra={"error": type(exc).__name__})

    def refresh(self) -> list[str]:
        """ANALYZE the tables whose statistics are missing or stale; returns their names."""
        if self.is_sqlite:
            # A writer like any other: its turn in the queue and BEGIN IMMEDIATE (a deferred
            # transaction that read first and then writes gets "database is locked" at once
            # when another process wrote meanwhile).
            with (
                self._writer_turn(),
                self.engine.connect().execution_options(kat_write=True) as conn,
                conn.begin(),
            ):
                stale = self._stale_sqlite(conn)
                if stale:
                    analyze(conn, stale, is_sqlite=True)
                    with self._lock:
                        self._since_analyze = 0
            if stale:
                log.info("statistics refreshed", extra={"tables": stale})
            return stale
        with self.engine.connect() as conn:
            if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK}).scalar():
                try:
                    stale = self._stale_postgres(conn)
                    if stale:
                        analyze(conn, stale, is_sqlite=False)
                        with self._lock:
                            self._since_analyze = 0
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK})
            else:
                stale = []  # another process is at it; the statistics are shared
            conn.commit()
        if stale:
            log.info("statistics refreshed", extra={"tables": stale})
        return stale

    def _stale_sqlite(self, conn: Connection) -> list[str]:
        has_stats = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'")
        ).first()
        recorded = None
        if has_stats is not None:
            row = conn.execute(
                text("SELECT stat FROM sqlite_stat1 WHERE tbl = :t AND idx IS NOT NULL LIMIT 1"),
                {"t": resources.name},
            ).first()
            recorded = int(str(row[0]).split()[0]) if row is not None else None
        if recorded is None:
            held = conn.execute(select(resources.c.seq).limit(1)).first()
            return list(TABLES) if held is not None else []
        if self._since_analyze > STALE_FRACTION * recorded + STALE_ROWS:
            return list(TABLES)
        return []

    def _stale_postgres(self, conn: Connection) -> list[str]:
        rows = conn.execute(
            text(
                "SELECT relname, n_live_tup, n_mod_since_analyze, "
                "coalesce(last_analyze, last_autoanalyze) IS NULL AS never "
                "FROM pg_stat_user_tables WHERE relname = ANY(:tables)"
            ),
            {"tables": list(TABLES)},
        )
        # The server's counters arrive shortly after a commit (each backend reports its own,
        # at most once a second): what this process just wrote counts even before they do.
        own = self._since_analyze
        return sorted(
            r.relname
            for r in rows
            if (r.never and (r.n_live_tup > 0 or own > 0))
            or max(r.n_mod_since_analyze, own) > STALE_FRACTION * r.n_live_tup + STALE_ROWS
        )


def analyze(conn: Connection, tables: Sequence[str], *, is_sqlite: bool) -> None:
    """ANALYZE ``tables`` (sampled on SQLite)."""
    if is_sqlite:
        conn.exec_driver_sql("PRAGMA analysis_limit=1000")
        for table in tables:
            conn.exec_driver_sql(f"ANALYZE {table}")
    else:
        conn.execute(text(f"ANALYZE {', '.join(tables)}"))
