"""The resource store: SQLAlchemy Core over SQLite (embedded default) or PostgreSQL.

Writes run in ``Store.write()``: on SQLite that is ``BEGIN IMMEDIATE`` (one writer at a time, so a
conditional create's search and insert cannot interleave); on PostgreSQL, row locks
(``SELECT … FOR UPDATE``) and transaction-scoped advisory locks (``Tx.lock``) give the same
guarantee across processes. The resource row, its version row and its index rows are written in
one transaction, so a search never sees a half-written resource.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.expression import ClauseElement, Executable, Select

from fhir_kat.canonical import (
    LEGACY_CANONICAL_BASE,
    LEGACY_IDENTIFIER_BASE,
    Bases,
    process_bases,
    refusal,
)
from fhir_kat.search import (
    Criterion,
    IndexRows,
    NumberValue,
    SearchQuery,
    extract_index,
    params_for,
)
from fhir_kat.settings import SettingsError
from fhir_kat.store.audit_journal import AuditJournal
from fhir_kat.store.observations import value_rows
from fhir_kat.store.reindex import bring_up_to_date
from fhir_kat.store.schema import (
    INDEX_TABLE_TYPES,
    INDEX_TABLES,
    metadata,
    observation_values,
    resource_versions,
    resources,
    search_date,
    search_number,
    search_reference,
    search_string,
    search_token,
    store_meta,
)
from fhir_kat.store.statistics import TABLES, Statistics, analyze
from fhir_kat.store.view import EVERYTHING, PatientSlice, ReadScope, Viewer
from fhir_kat.store.writer_queue import SqliteWriterQueue as _SqliteWriterQueue

Clock = Callable[[], datetime]
log = logging.getLogger("fhir_kat.store")

#: How far a criterion's matches are counted when choosing which one drives a search.
ESTIMATE_CAP = 500

#: A pooled PostgreSQL connection idle for longer than this (seconds) is pinged before use.
PING_AFTER_IDLE = 10.0

# The write path's statements, built once: SQLAlchemy then only binds parameters (building
# a statement and its cache key per call cost more than running it on SQLite).
_GET = select(resources).where(
    resources.c.res_type == bindparam("k_type"), resources.c.res_id == bindparam("k_id")
)
_GET_FOR_UPDATE = _GET.with_for_update()
_INSERT_VERSION = insert(resource_versions).returning(resource_versions.c.seq)
# Several versions in one statement (SQLAlchemy's "insertmanyvalues": one multi-row INSERT …
# RETURNING), their seqs in the order of the rows. PostgreSQL: SQLAlchemy orders them
# (``sort_by_parameter_order``). SQLite: asking that makes SQLAlchemy send one INSERT per row;
# unasked, one statement whose seqs, sorted, are in row order — ``seq`` is the rowid, which
# SQLite assigns as the largest one plus one to each row in turn, under the single writer.
_INSERT_VERSIONS = insert(resource_versions).returning(
    resource_versions.c.seq, sort_by_parameter_order=True
)
_INSERT_VERSIONS_SQLITE = insert(resource_versions).returning(resource_versions.c.seq)
_INSERT_CURRENT = insert(resources)
_UPDATE_CURRENT: dict[tuple[str, ...], Any] = {
    columns: update(resources)
    .where(
        resources.c.res_type == bindparam("k_type"),
        resources.c.res_id == bindparam("k_id"),
        resources.c.version_id == bindparam("k_version"),
    )
    .values({c: bindparam(c) for c in columns})
    for columns in (
        ("version_id", "last_updated", "seq", "deleted", "content", "patient_id"),
        ("version_id", "last_updated", "seq", "deleted"),
    )
}
_CLEAR_INDEX = [
    (
        INDEX_TABLE_TYPES.get(table),
        delete(table).where(
            table.c.res_type == bindparam("k_type"), table.c.res_id == bindparam("k_id")
        ),
    )
    for table in INDEX_TABLES
]
_INSERT_INDEX = {table: insert(table) for table in INDEX_TABLES}


def dumps(resource: dict[str, Any]) -> str:
    return json.dumps(resource, separators=(",", ":"), ensure_ascii=False)


def format_instant(moment: datetime) -> str:
    """FHIR ``instant`` in UTC with millisecond precision (``2024-01-02T03:04:05.678Z``)."""
    moment = moment.astimezone(UTC) if moment.tzinfo else moment
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


_cursor_names = itertools.count()


class _Declare(Executable, ClauseElement):
    """``DECLARE name NO SCROLL CURSOR FOR <select>`` (PostgreSQL), for ``Tx.scan_batches``."""

    inherit_cache = False

    def __init__(self, name: str, query: Select[Any]) -> None:
        self.name = name
        self.query = query


@compiles(_Declare)
def _compile_declare(element: _Declare, compiler: Any, **kw: Any) -> str:
    return f"DECLARE {element.name} NO SCROLL CURSOR FOR {compiler.process(element.query, **kw)}"


@dataclass(frozen=True)
class StoredResource:
    type: str
    id: str
    version_id: int
    last_updated: datetime  # naive UTC
    content: str  # the JSON text served, meta included; "" for a deletion
    deleted: bool = False
    seq: int = 0
    patient_id: str | None = None

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.content)
        return loaded


class Store:
    def __init__(self, url: str, clock: Clock | None = None) -> None:
        self.url = url
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.is_sqlite = url.startswith("sqlite")
        self.engine: Engine = self._make_engine(url)
        self._writer = _SqliteWriterQueue(url) if self.is_sqlite else None
        self._journal = _journal_for(url)
        self.statistics = Statistics(
            self.engine, is_sqlite=self.is_sqlite, writer_turn=self._writer_turn
        )

    def _make_engine(self, url: str) -> Engine:
        if not self.is_sqlite:
            engine = create_engine(url, pool_size=5, max_overflow=10)
            _ping_when_idle(engine)
            return engine
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
            # Take transaction control from pysqlite so BEGIN IMMEDIATE is ours to issue.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            _use_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = conn.get_execution_options().get("kat_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if mode else "BEGIN")

        return engine

    def create_schema(self) -> None:
        """Create missing tables, and rebuild index rows written under older search parameter
        definitions (``reindex.bring_up_to_date``: a new parameter gets its rows for resources
        stored before it). Several processes starting at once (gunicorn workers) take
        turns: through an advisory lock on PostgreSQL (concurrent CREATE TABLEs collide), and
        through ``BEGIN IMMEDIATE`` on SQLite — in a deferred transaction the table check reads
        first, and a reader that then wants to write gets "database is locked" at once instead
        of waiting for the busy timeout."""
        if self.is_sqlite:
            with self.engine.connect().execution_options(kat_write=True) as conn, conn.begin():
                _create_missing(conn)
                _reindex_stale(conn)
            # Records a crashed or stopped process left in the audit journal (ADR 0023).
            self.drain_audit()
            self.statistics.refresh()
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(7301)"))
            try:
                _create_missing(conn)
                _reindex_stale(conn)
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7301)"))
                conn.commit()
        # A database restored, bulk-loaded or reindexed while no process watched.
        self.statistics.refresh()

    def claim_id_namespace(self, fingerprint: str) -> str:
        """The fingerprint of the id namespace this database's deterministic ids come from:
        recorded by the first start (``fingerprint``), or ``"legacy"`` for a database that
        already held data then (its ids keep their namespace: re-sends stay idempotent)."""
        return self._claim("id-namespace", fingerprint, legacy="legacy")

    def claim_setting(self, name: str, value: str, *, legacy: str) -> str:
        """The value of a setting this database's content depends on (the canonical and
        identifier bases): recorded by the first start (``value``), or ``legacy`` — what the
        data was written with — for a database that already held data then. The caller refuses
        to run when what is returned is not what it is configured with."""
        return self._claim(f"setting:{name}", value, legacy=legacy)

    def claim_bases(self) -> None:
        """Refuse (``SettingsError``, ADR 0021) to work on a database written with other
        canonical or identifier bases than this process's: both are in its resources and in
        the identifiers its ids derive from, so a service, a worker or a command writing under
        another base would store second copies. A new database records the process's."""
        current = process_bases()
        recorded = Bases(
            self.claim_setting("canonical_base", current.canonical, legacy=LEGACY_CANONICAL_BASE),
            self.claim_setting(
                "identifier_base", current.identifiers, legacy=LEGACY_IDENTIFIER_BASE
            ),
        )
        problem = refusal(recorded)
        if problem is not None:
            raise SettingsError(problem)

    def _claim(self, key: str, value: str, *, legacy: str) -> str:
        with (
            self._writer_turn(),
            self.engine.connect().execution_options(kat_write=True) as conn,
            conn.begin(),
        ):
            if not self.is_sqlite:  # SQLite: BEGIN IMMEDIATE already serialises first starts
                conn.execute(text("SELECT pg_advisory_xact_lock(7302)"))
            row = conn.execute(select(store_meta.c.value).where(store_meta.c.name == key)).first()
            if row is not None:
                return str(row.value)
            held = conn.execute(select(resources.c.seq).limit(1)).first() is not None
            recorded = legacy if held else value
            conn.execute(insert(store_meta).values(name=key, value=recorded))
            return recorded

    def drop_schema(self) -> None:
        metadata.drop_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._writer is not None:
            self._writer.close()
        if self._journal is not None:
            self._journal.close()

    @contextmanager
    def write(self, *, viewer: Viewer | None = None) -> Iterator[Tx]:
        """A write transaction; with ``viewer``, opened for that caller (``Tx``): what it
        reads, matches and returns is only what the caller may see."""
        with (
            self._writer_turn(),
            self.engine.connect().execution_options(kat_write=True) as conn,
            conn.begin(),
        ):
            tx = Tx(conn, self, viewer=viewer)
            yield tx
            tx.run_deferred()
            moved = self._move_audit_along(tx)
            tx.flush()
        if moved:
            self._journal_forget(moved)
        # Statistics are checked by stored versions, so a large import counts for its size.
        self.statistics.wrote(tx._s.written)

    def after_fork(self) -> None:
        """In a child process (``fhir_kat.prefork``): the parent's pooled connections are left
        to the parent (``close=False``: closing would end the parent's sessions), and the
        SQLite writer queue opens its own lock file (``flock`` locks belong to the open file,
        which a shared descriptor would share between processes)."""
        self.engine.dispose(close=False)
        self.statistics = Statistics(
            self.engine, is_sqlite=self.is_sqlite, writer_turn=self._writer_turn
        )
        if self._writer is not None:
            self._writer = _SqliteWriterQueue(self.url)
        if self._journal is not None:
            # The parent's journal connection is left open and unused here, as the pool's
            # connections are: closing an SQLite connection opened in another process is
            # what SQLite's documentation warns against.
            _INHERITED.append(self._journal)
            self._journal = _journal_for(self.url)

    # ------------------------------------------------------------------ the audit trail

    def record_audit(self, event: dict[str, Any]) -> None:
        """Store the AuditEvent of a request that wrote nothing else (a read, a search, a
        refusal, a sign-in, a delivery), durably, before the request is answered.

        PostgreSQL (and an in-memory SQLite): its own transaction. SQLite: appended to the
        audit journal (``audit_journal``), which takes only the journal's writer turn — a read
        never waits behind the database's writers — and moved into the store as an AuditEvent
        (the same resource, id and content) by the next writer once enough are waiting, by an
        idle moment, by anyone about to read AuditEvents, and at start-up (ADR 0023)."""
        if self._journal is None:
            with self.write() as tx:
                tx.put(event, current=None)
            return
        waiting = self._journal.append(str(event["id"]), dumps(event))
        if waiting < AUDIT_MOVE_AT or self._writer is None:
            return
        written = 0
        try:  # the record is committed: nothing here may fail the request any more
            with self._writer.try_turn() as mine:
                if mine:  # the database's writer is idle: move them now, without waiting
                    written = self._drain_in_turn(AUDIT_MOVE_BATCH)[1]
        except Exception:
            log.exception("moving the audit journal failed; the records stay in the journal")
        self.statistics.wrote(written)

    def drain_audit(self) -> None:
        """Move every record of the audit journal into the store (waits for the writer turn):
        before AuditEvents are read, and at start-up."""
        if self._journal is None:
            return
        while self._journal.backlog():
            with self._writer_turn():
                moved, written = self._drain_in_turn(AUDIT_DRAIN_BATCH)
            self.statistics.wrote(written)
            if not moved:
                return  # nothing left, or moved but not forgotten (logged): the next retries

    def _drain_in_turn(self, limit: int) -> tuple[bool, int]:
        """(whether records were moved and forgotten, versions written); the caller holds
        the turn and tells the statistics after leaving it (their refresh takes a turn)."""
        assert self._journal is not None
        with self.engine.connect().execution_options(kat_write=True) as conn, conn.begin():
            tx = Tx(conn, self)
            upto = self._move_audit(tx, limit)
            tx.flush()
        return bool(upto) and self._journal_forget(upto), tx._s.written

    def _move_audit_along(self, tx: Tx) -> int:
        """A writer takes waiting audit records along into its own commit once enough wait
        (one commit for both). A failure here is logged and never costs the write."""
        if self._journal is None:
            return 0
        try:
            if self._journal.backlog() < AUDIT_MOVE_AT:
                return 0
            with tx.conn.begin_nested():
                return self._move_audit(tx, AUDIT_MOVE_BATCH)
        except Exception:
            log.exception("moving the audit journal failed; the records stay in the journal")
            return 0

    def _move_audit(self, tx: Tx, limit: int) -> int:
        """Insert the journal's oldest records as AuditEvents; returns the last ``seq`` moved
        (0: none). Records the store already holds (a move that committed before its records
        were forgotten: a crash in between) are skipped, so each is stored exactly once."""
        assert self._journal is not None
        rows = self._journal.oldest(limit)
        if not rows:
            return 0
        ids = list(dict.fromkeys(r.event_id for r in rows))
        held: set[str] = set()
        for start in range(0, len(ids), 500):
            held.update(
                tx.conn.execute(
                    select(resources.c.res_id).where(
                        resources.c.res_type == "AuditEvent",
                        resources.c.res_id.in_(ids[start : start + 500]),
                    )
                ).scalars()
            )
        new: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row.event_id not in held:
                new.setdefault(row.event_id, json.loads(row.content))
        tx.create_many(list(new.values()))
        return rows[-1].seq

    def _journal_forget(self, upto: int) -> bool:
        assert self._journal is not None
        try:
            self._journal.forget(upto)
            return True
        except Exception:  # moved and committed: the next move skips them by id
            log.exception("forgetting moved audit records failed")
            return False

    def _writer_turn(self) -> Any:
        return self._writer.turn() if self._writer is not None else _NO_QUEUE

    def analyze(self) -> None:
        """Refresh the planner's statistics of every table the store plans from (after a bulk
        load, say); the store also does so itself when they are missing or stale
        (``fhir_kat.store.statistics``). On SQLite a sampled ANALYZE: milliseconds."""
        with self.engine.connect() as conn:
            analyze(conn, TABLES, is_sqlite=self.is_sqlite)
            conn.commit()

    @contextmanager
    def read(self, *, transaction: bool = True, viewer: Viewer | None = None) -> Iterator[Tx]:
        """A read-only transaction. ``transaction=False`` (the REST reads and searches): on
        PostgreSQL each statement runs on its own (autocommit), which saves the BEGIN and
        COMMIT round trips and sees exactly what it would inside the transaction — under READ
        COMMITTED every statement takes its own snapshot either way. A method that needs a
        transaction (a cursor, an advisory lock) still opens one (``Tx.need_transaction``).
        SQLite: the same transaction in both cases (no round trips to save). ``viewer``: as
        for ``write``."""
        if self._journal is not None and viewer is not None and viewer.reads("AuditEvent"):
            # Whoever may read AuditEvents reads every one recorded so far: the journal's
            # records move first (this read waits for the writer turn; other reads never do).
            self.drain_audit()
        conn = self.engine.connect()
        autocommit = not transaction and not self.is_sqlite
        if autocommit:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        with conn, conn.begin():
            yield Tx(conn, self, autocommit=autocommit, viewer=viewer)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


_NO_QUEUE = nullcontext()

#: Audit records waiting in the journal before a writer takes them along (or an idle moment
#: moves them), and how many one move takes: moved in groups, their cost is shared (ADR 0023).
AUDIT_MOVE_AT = 64
AUDIT_MOVE_BATCH = 256
AUDIT_DRAIN_BATCH = 1000


#: Audit journals opened by a parent process before it forked (kept from being closed).
_INHERITED: list[AuditJournal] = []


def _journal_for(url: str) -> AuditJournal | None:
    """The audit journal of an SQLite file database (``<db>-audit``); none for PostgreSQL,
    whose writers do not queue behind one another, nor for an in-memory database."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return AuditJournal(f"{database}-audit")


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection before use only if it has been idle for ``PING_AFTER_IDLE``
    seconds (what a restarted server, or a firewall's or server's idle timeout, leaves dead);
    a dead one is replaced before the request sees it. ``pool_pre_ping`` pinged on every
    checkout: a round trip per request. A connection that dies while in steady use fails its
    request once, and the pool then replaces every connection opened before the failure
    (SQLAlchemy's disconnect handling)."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info["kat_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        since = record.info.get("kat_idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out another (a new one if need be).
            raise DisconnectionError() from exc


def _create_missing(conn: Connection) -> None:
    """Missing tables, and the indexes added to existing tables since a database was created
    (``create_all`` creates an existing table's new index only with the table)."""
    metadata.create_all(conn)
    for table in metadata.sorted_tables:
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            index.create(conn, checkfirst=True)


def _reindex_stale(conn: Connection) -> None:
    rebuilt = bring_up_to_date(conn)
    if rebuilt:
        log.info("search index rebuilt", extra={"resource_types": rebuilt})


def _use_wal(cursor: Any, attempts: int = 300) -> None:
    """Switch a SQLite file to WAL (persistent: once per file). The switch does not wait on the
    busy handler, so processes opening a new file at once (gunicorn workers) would get
    "database is locked": it is retried for up to ~30 s, and skipped once another did it."""
    for attempt in range(attempts):
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.1)


_PRELOADS: dict[tuple[int, bool], Select[Any]] = {}


def _preload_statement(types: int, lock: bool) -> Select[Any]:
    """``Tx.preload``'s statement for keys of ``types`` resource types: an OR, per type, of
    ``res_type = :k_type_<i> AND res_id IN :k_ids_<i>`` (expanding), so both databases plan
    each branch as lookups in the primary key. The row-value form ``(res_type, res_id) IN
    (VALUES …)`` is planned by SQLite 3.40 as a scan of the whole primary key (issue 25;
    docs/adr/0017-statement-plans-and-statistics.md; tests/test_statement_plans.py holds every
    statement to an index lookup). Built once per number of types, so SQLAlchemy's compiled
    cache serves every call (building it per call cost more than running it)."""
    key = (types, lock)
    stmt = _PRELOADS.get(key)
    if stmt is None:
        stmt = (
            select(resources)
            .where(
                or_(
                    *(
                        and_(
                            resources.c.res_type == bindparam(f"k_type_{i}"),
                            resources.c.res_id.in_(bindparam(f"k_ids_{i}", expanding=True)),
                        )
                        for i in range(types)
                    )
                )
            )
            .order_by(resources.c.res_type, resources.c.res_id)
        )
        if lock:
            stmt = stmt.with_for_update()
        _PRELOADS[key] = stmt
    return stmt


#: Creates sent in one statement at most on PostgreSQL (8 parameters each).
_MAX_CREATES_TOGETHER = 3_000
#: ``Tx._send_creates_together``'s statement: the versions' INSERT (a CTE) and the current
#: rows' INSERT; ``<versions>`` and ``<currents>`` become the rows' placeholders.
_VERSIONS_CTE = (
    "WITH kat_v AS (INSERT INTO resource_versions "
    "(res_type, res_id, version_id, last_updated, method, content) VALUES <versions> "
    "RETURNING seq, res_type, res_id, last_updated, content)"
)
_CURRENTS_INSERT = (
    "INSERT INTO resources "
    "(res_type, res_id, version_id, last_updated, seq, deleted, content, patient_id) "
    "SELECT kat_v.res_type, kat_v.res_id, 1, kat_v.last_updated, kat_v.seq, false, "
    "kat_v.content, kat_c.patient_id "
    "FROM kat_v JOIN (VALUES <currents>) AS kat_c (res_type, res_id, patient_id) "
    "ON kat_c.res_type = kat_v.res_type AND kat_c.res_id = kat_v.res_id "
    "RETURNING res_type, res_id, seq"
)
#: Parameters of one combined index INSERT at most (PostgreSQL's limit is 65,535 per statement).
_MAX_INDEX_PARAMETERS = 30_000


def _index_statement(
    by_table: dict[Any, list[dict[str, Any]]],
) -> tuple[str, tuple[Any, ...]] | None:
    """PostgreSQL: the rows of several index tables as one statement — each table's multi-row
    INSERT a data-modifying CTE of the last one's (``WITH t0 AS (INSERT …), t1 AS (INSERT …)
    INSERT …``), parameters bound by the driver as for any statement. None when the rows are
    too many for one statement (the caller then sends one INSERT per table)."""
    found = _index_inserts(by_table)
    if found is None:
        return None
    parts, values = found
    *first, last = parts
    ctes = ", ".join(f"kat_ix{i} AS ({part})" for i, part in enumerate(first))
    return (f"WITH {ctes} {last}" if ctes else last), tuple(values)


def _index_inserts(
    by_table: dict[Any, list[dict[str, Any]]], budget: int = _MAX_INDEX_PARAMETERS
) -> tuple[list[str], list[Any]] | None:
    """Each index table's multi-row INSERT (placeholders) and their parameters, in order;
    None beyond ``budget`` parameters."""
    parts: list[str] = []
    values: list[Any] = []
    for table in INDEX_TABLES:
        rows = by_table.get(table)
        if not rows:
            continue
        columns = list(rows[0])
        if any(len(r) != len(columns) for r in rows):
            return None
        one = "(" + ", ".join(["%s"] * len(columns)) + ")"
        # Names are the schema's own (INDEX_TABLES, the rows' keys); every value is bound.
        head = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "  # noqa: S608
        parts.append(head + ", ".join([one] * len(rows)))
        for r in rows:
            values.extend(r[c] for c in columns)
        if len(values) > budget:
            return None
    return parts, values


def _version_of(row: Any, *, compartment: bool = False) -> StoredResource:
    """A ``resource_versions`` row; with ``compartment``, the patient of its own content."""
    content = row.content or ""
    patient = None
    if compartment and content:
        body = json.loads(content)
        patient = patient_of(body, extract_index(body))
    return StoredResource(
        type=row.res_type,
        id=row.res_id,
        version_id=row.version_id,
        last_updated=row.last_updated,
        content=content,
        deleted=row.method == "DELETE",
        seq=row.seq,
        patient_id=patient,
    )


def _row_to_stored(row: Any) -> StoredResource:
    return StoredResource(
        type=row.res_type,
        id=row.res_id,
        version_id=row.version_id,
        last_updated=row.last_updated,
        content=row.content or "",
        deleted=bool(getattr(row, "deleted", False)),
        seq=row.seq,
        patient_id=getattr(row, "patient_id", None),
    )


class _TxState:
    """What one database transaction holds, shared by every view of it."""

    def __init__(self, autocommit: bool) -> None:
        #: PostgreSQL reads opened with ``transaction=False``: statements still autocommit.
        self.autocommit = autocommit
        self.deferred: dict[str, Callable[[Tx], None]] = {}
        self.memo: dict[str, Any] = {}
        # Index rows written in this transaction but not yet sent, and the resources whose
        # older index rows are still to be deleted: sent together (one statement per table)
        # before anything reads the index (``flush``) and before the commit.
        self.pending_index: list[tuple[Any, dict[str, Any]]] = []
        self.pending_clear: dict[tuple[str, str], None] = {}
        # Current rows read ahead by ``preload`` (and whether row-locked): ``get`` answers
        # from here until the resource is written in this transaction.
        self.preloaded: dict[tuple[str, str], tuple[StoredResource | None, bool]] = {}
        #: Versions written (``Store.statistics`` counts them after the commit).
        self.written = 0
        #: Each viewer's scope per type, until the transaction writes again.
        self.scopes: dict[tuple[Viewer, str], ReadScope] = {}
        #: Creates (``put`` with ``current=None``) not yet sent: their version and current
        #: rows go as one multi-row INSERT per table right before this transaction's next
        #: statement of any kind (``Tx.conn``), so the database never sees them out of order.
        self.pending_creates: list[_PendingCreate] = []


@dataclass
class _PendingCreate:
    """A created resource whose rows are not sent yet (``Tx.put``, ``Tx._send_creates``)."""

    stored: StoredResource  # as ``put`` returned it (``seq`` 0 until sent)
    ordered: dict[str, Any]  # the stored JSON as a dict
    rows: IndexRows
    method: str


class Tx:
    """One database transaction; every method runs inside it.

    A transaction opened for a caller (``viewer``) returns, matches, counts, includes and
    versions only what that caller may see (``fhir_kat.store.view``): a row outside its scope
    does not exist for it. ``system`` is the same transaction without that restriction, for
    the service's own work (workflow, scoring, consent checks) inside the caller's request.
    """

    def __init__(
        self,
        conn: Connection,
        store: Store,
        *,
        autocommit: bool = False,
        viewer: Viewer | None = None,
    ) -> None:
        self._conn = conn
        self.store = store
        self.viewer = viewer
        # Everything but the viewer lives in one state object that every view of this
        # transaction (``system``, ``seen_by``) shares.
        self._s = _TxState(autocommit)
        self._system: Tx | None = None

    @property
    def conn(self) -> Connection:
        """The transaction's connection, for a statement about to be run: creates still
        pending (``put``) are sent first, so every statement — ours or a service's own on
        another table — runs after the writes that came before it."""
        if self._s.pending_creates:
            self._send_creates()
        return self._conn

    @property
    def memo(self) -> dict[str, Any]:
        """Per-transaction caches of the services (each invalidated by its own write hook)."""
        return self._s.memo

    @property
    def system(self) -> Tx:
        """This transaction without the caller's read restriction (itself when it has none):
        same connection, same pending index rows, deferred actions and caches."""
        if self.viewer is None:
            return self
        if self._system is None:
            self._system = self.seen_by(None)
        return self._system

    def seen_by(self, viewer: Viewer | None) -> Tx:
        """This same transaction as ``viewer`` would see it (a Subscription's owner, say)."""
        twin = copy.copy(self)
        twin.viewer, twin._system = viewer, None
        return twin

    def defer(self, key: str, action: Callable[[Tx], None]) -> None:
        """Run ``action`` once, at the end of this transaction, before it commits: for rules
        that need every entry of a transaction Bundle written first (referral triage). It
        runs on ``system``: a deferred rule decides for the service, not as the caller. It
        runs in the context it was deferred in (``contextvars``), so whoever deferred it is
        still the one acting when it runs (the write pipeline's step, a request's state)."""
        if key not in self._s.deferred:
            context = contextvars.copy_context()
            self._s.deferred[key] = lambda tx: context.run(action, tx)

    def run_deferred(self) -> None:
        while self._s.deferred:
            key = next(iter(self._s.deferred))
            self._s.deferred.pop(key)(self.system)

    # ------------------------------------------------------------------ the caller's scope

    def scope(self, rtype: str) -> ReadScope:
        """What of ``rtype`` this transaction may return (everything without a viewer);
        asked of the viewer once per type until this transaction writes again."""
        if self.viewer is None:
            return EVERYTHING
        key = (self.viewer, rtype)
        found = self._s.scopes.get(key)
        if found is None:
            found = self._s.scopes[key] = self.viewer.scope(self.system, rtype)
        return found

    def _forget_scopes(self) -> None:
        # A write may change what the caller may see (its own referral's Organization, a
        # Consent): the next read asks again, whichever view of the transaction wrote.
        self._s.scopes.clear()

    def admits(self, stored: StoredResource) -> bool:
        """Whether this transaction's caller may see ``stored``: a current row, or one of its
        versions (whose ``patient_id`` is that version's compartment, which may differ from
        the current row's)."""
        if self.viewer is None:
            return True
        scope = self.scope(stored.type)
        if not scope.readable:
            return False
        if scope.unrestricted:
            return True
        if scope.ids is not None and stored.id not in scope.ids:
            return False
        patient = stored.patient_id
        if scope.patients is not None and patient is not None and patient not in scope.patients:
            piece = scope.slices.get(patient)
            if piece is None or not _in_slice(piece, stored):
                return False
        if scope.owned_by is not None:
            if stored.deleted or not stored.content:
                return False
            param, targets = scope.owned_by
            rows = extract_index(json.loads(stored.content))
            if not any(
                (t_type, t_id) in targets for p, t_type, t_id in rows.references if p == param
            ):
                return False
        return True

    def _shown(self, stored: StoredResource | None) -> StoredResource | None:
        if stored is None or self.viewer is None:
            return stored
        if not self.admits(stored):
            return None
        return self.viewer.shape(self.system, stored)

    def need_transaction(self) -> None:
        """From here to the end, run in one transaction (on PostgreSQL a read opened with
        ``transaction=False`` runs each statement on its own until then): for cursors, which
        live in a transaction, and locks held until it ends."""
        if self._s.autocommit:
            # The connection is idle between statements, so the driver may leave autocommit:
            # its next statement BEGINs, and the commit (or rollback) at the end of the
            # ``with`` block ends it. The pool restores the isolation level on check-in.
            self.conn.connection.dbapi_connection.autocommit = False  # type: ignore[union-attr]
            self._s.autocommit = False

    # ------------------------------------------------------------------ locking

    def lock(self, key: str) -> None:
        """Serialise writers on ``key`` until this transaction ends (PostgreSQL advisory lock;
        on SQLite ``BEGIN IMMEDIATE`` already serialises every writer)."""
        if self.store.is_sqlite:
            return
        self.need_transaction()
        self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_number(key)})

    def lock_many(self, keys: Sequence[str]) -> None:
        """``lock`` on each of ``keys``, in one statement, in a fixed order (by lock number:
        two transactions locking overlapping sets cannot deadlock each other)."""
        if self.store.is_sqlite or not keys:
            return
        if len(keys) == 1:
            self.lock(keys[0])
            return
        self.need_transaction()
        numbers = sorted({_lock_number(k) for k in keys})
        self.conn.execute(
            text(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:ks AS bigint[]))"
                " WITH ORDINALITY AS t(k, i) ORDER BY i"
            ),
            {"ks": numbers},
        )

    # ------------------------------------------------------------------ reads

    def get(self, rtype: str, rid: str, *, for_update: bool = False) -> StoredResource | None:
        lock = for_update and not self.store.is_sqlite
        known = self._s.preloaded.get((rtype, rid))
        if known is not None and (known[1] or not lock):
            return self._shown(known[0])
        if lock:
            self.need_transaction()
        stmt = _GET_FOR_UPDATE if lock else _GET
        row = self.conn.execute(stmt, {"k_type": rtype, "k_id": rid}).first()
        return self._shown(_row_to_stored(row) if row else None)

    def preload(self, keys: Collection[tuple[str, str]], *, for_update: bool = False) -> None:
        """Read the current rows of ``keys`` (deleted ones too) in one query, so the ``get``
        calls that follow in this transaction need no round trip each. ``for_update`` locks
        them on PostgreSQL, in key order (concurrent preloads cannot deadlock each other)."""
        lock = for_update and not self.store.is_sqlite
        wanted = sorted(
            {
                k
                for k in keys
                if k not in self._s.preloaded or (lock and not self._s.preloaded[k][1])
            }
        )
        if not wanted:
            return
        by_type: dict[str, list[str]] = {}
        for rtype, rid in wanted:
            by_type.setdefault(rtype, []).append(rid)
        params: dict[str, Any] = {}
        for i, (rtype, ids) in enumerate(by_type.items()):
            params[f"k_type_{i}"], params[f"k_ids_{i}"] = rtype, ids
        stmt = _preload_statement(len(by_type), lock)
        found = {(r.res_type, r.res_id): _row_to_stored(r) for r in self.conn.execute(stmt, params)}
        for key in wanted:
            self._s.preloaded[key] = (found.get(key), lock)

    def get_many(self, keys: Sequence[tuple[str, str]]) -> list[StoredResource]:
        if not keys:
            return []
        by_type: dict[str, list[str]] = {}
        for rtype, rid in keys:
            by_type.setdefault(rtype, []).append(rid)
        out: list[StoredResource] = []
        for rtype, ids in by_type.items():
            stmt = select(resources).where(
                resources.c.res_type == rtype,
                resources.c.res_id.in_(ids),
                resources.c.deleted == false(),
            )
            for r in self.conn.execute(stmt):
                shown = self._shown(_row_to_stored(r))
                if shown is not None:
                    out.append(shown)
        return out

    def vread(self, rtype: str, rid: str, version_id: int) -> StoredResource | None:
        stmt = select(resource_versions).where(
            resource_versions.c.res_type == rtype,
            resource_versions.c.res_id == rid,
            resource_versions.c.version_id == version_id,
        )
        row = self.conn.execute(stmt).first()
        if row is None:
            return None
        version = _version_of(row, compartment=self.viewer is not None)
        if self.viewer is None:
            return version
        if version.deleted:
            # A deletion has no content: the caller sees it when it saw what it deleted.
            before = self.vread(rtype, rid, version_id - 1) if version_id > 1 else None
            return version if before is not None else None
        return self._shown(version)

    def history(self, rtype: str, rid: str, count: int) -> list[tuple[StoredResource, str]]:
        """The newest ``count`` versions the caller may see, newest first, with the method
        that wrote each. Each version is judged on its own content (a resource moved from one
        patient to another keeps the first patient's versions under that patient's consent);
        a deletion is shown to whoever saw the version it deleted."""
        stmt = select(resource_versions).where(
            resource_versions.c.res_type == rtype, resource_versions.c.res_id == rid
        )
        if self.viewer is None:
            stmt = stmt.order_by(resource_versions.c.version_id.desc()).limit(count)
            return [(_version_of(r), r.method) for r in self.conn.execute(stmt)]
        shown: list[tuple[StoredResource, str]] = []
        previous_seen = False
        for r in self.conn.execute(stmt.order_by(resource_versions.c.version_id)):
            version = _version_of(r, compartment=True)
            if version.deleted:
                seen = previous_seen
            else:
                visible = self._shown(version)
                seen = visible is not None
                version = visible or version
            if seen:
                shown.append((version, r.method))
            previous_seen = seen
        return shown[::-1][:count]

    # ------------------------------------------------------------------ writes

    def put(
        self,
        resource: dict[str, Any],
        *,
        current: StoredResource | None,
        method: str | None = None,
    ) -> tuple[StoredResource, bool]:
        """Write ``resource`` as the next version after ``current`` (None = create).

        Sets ``meta.versionId``/``meta.lastUpdated``. Returns the stored resource (a create's
        rows are sent with the creates around it, before the transaction's next statement:
        until then its ``seq`` is 0) and whether a new version was written: an update that
        says exactly what ``current`` says (``same_content``) writes nothing, on every path
        (FHIR's no-op update, ADR 0020), and ``current`` is returned as it is.
        """
        rtype, rid = resource["resourceType"], resource["id"]
        if current is not None and not current.deleted and same_content(current.json(), resource):
            return current, False
        version_id = (current.version_id + 1) if current else 1
        now = self.store.clock()
        now_naive = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
        ordered = _stored_form(resource, version_id, now_naive)
        content = dumps(ordered)
        method = method or ("PUT" if current else "POST")
        self._s.preloaded.pop((rtype, rid), None)
        self._forget_scopes()
        rows = extract_index(ordered)
        patient_id = patient_of(ordered, rows)
        if current is None:
            # Sent with the creates around it (``_send_creates``): a transaction of 100
            # creates costs two INSERTs, not 200 (on PostgreSQL, two round trips).
            stored = StoredResource(rtype, rid, 1, now_naive, content, False, 0, patient_id)
            self._s.pending_creates.append(_PendingCreate(stored, ordered, rows, method))
            self._s.written += 1
            self._s.preloaded[(rtype, rid)] = (stored, True)
            return stored, True
        seq = self._insert_version(rtype, rid, version_id, now_naive, method, content)
        values: dict[str, Any] = {
            "version_id": version_id,
            "last_updated": now_naive,
            "seq": seq,
            "deleted": False,
            "content": content,
            "patient_id": patient_id,
        }
        self._update_current(rtype, rid, current.version_id, values)
        self._clear_index(rtype, rid)
        self._write_index(ordered, rows, seq=seq, patient_id=patient_id)
        stored = StoredResource(rtype, rid, version_id, now_naive, content, False, seq, patient_id)
        # What was just written is what a ``get`` in this transaction would read back (the
        # write hooks read it again, deferred): answered from here, no round trip. Written
        # rows are this transaction's own (row-locked on PostgreSQL), hence "locked".
        self._s.preloaded[(rtype, rid)] = (stored, True)
        return stored, True

    def _send_creates(self) -> None:
        """Send the pending creates: one INSERT of their versions (RETURNING their seqs, in
        order), one of their current rows; their index rows join the pending ones."""
        pending, self._s.pending_creates = self._s.pending_creates, []
        conn = self._conn
        versions = [
            {
                "res_type": p.stored.type,
                "res_id": p.stored.id,
                "version_id": 1,
                "last_updated": p.stored.last_updated,
                "method": p.method,
                "content": p.stored.content,
            }
            for p in pending
        ]
        if not self.store.is_sqlite and len(pending) <= _MAX_CREATES_TOGETHER:
            self._send_creates_together(pending)
            return
        if len(versions) == 1:  # the compiled single-row statement: cheaper on one row
            seqs = [int(conn.execute(_INSERT_VERSION, versions[0]).scalar_one())]
        elif self.store.is_sqlite:
            seqs = sorted(int(s) for s in conn.execute(_INSERT_VERSIONS_SQLITE, versions).scalars())
        else:
            seqs = [int(s) for s in conn.execute(_INSERT_VERSIONS, versions).scalars()]
        current_rows = []
        for p, seq in zip(pending, seqs, strict=True):
            stored = dataclasses.replace(p.stored, seq=seq)
            current_rows.append(
                {
                    "res_type": stored.type,
                    "res_id": stored.id,
                    "version_id": 1,
                    "last_updated": stored.last_updated,
                    "seq": seq,
                    "deleted": False,
                    "content": stored.content,
                    "patient_id": stored.patient_id,
                }
            )
            key = (stored.type, stored.id)
            known = self._s.preloaded.get(key)
            if known is not None and known[0] is p.stored:
                self._s.preloaded[key] = (stored, True)
            self._write_index(p.ordered, p.rows, seq=seq, patient_id=stored.patient_id)
        conn.execute(_INSERT_CURRENT, current_rows[0] if len(current_rows) == 1 else current_rows)

    def _send_creates_together(self, pending: list[_PendingCreate]) -> None:
        """PostgreSQL: the versions and current rows of ``pending`` in one statement (one round
        trip): the versions' INSERT a data-modifying CTE whose RETURNING feeds the current
        rows' INSERT, which returns each resource's seq. Seqs follow the rows' order (the
        sequence is drawn row by row as the VALUES are read)."""
        one_version = "(%s, %s, 1, %s, %s, %s)"
        values: list[Any] = []
        for p in pending:
            values += [p.stored.type, p.stored.id, p.stored.last_updated, p.method]
            values.append(p.stored.content)
        for p in pending:
            values += [p.stored.type, p.stored.id, p.stored.patient_id]
        # Only placeholders are put in: every value is bound by the driver.
        versions = _VERSIONS_CTE.replace("<versions>", ", ".join([one_version] * len(pending)))
        currents = _CURRENTS_INSERT.replace(
            "<currents>", ", ".join(["(%s, %s, %s)"] * len(pending))
        )
        index = self._index_with_creates(pending, budget=_MAX_INDEX_PARAMETERS - len(values))
        if index is None:
            statement = f"{versions} {currents}"
        else:
            # The index rows too (only when none needs the seqs this returns): a create and
            # its index in one round trip. Data-modifying CTEs all run, read or not.
            parts, index_values = index
            ctes = "".join(f", kat_ix{i} AS ({part})" for i, part in enumerate(parts))
            statement = f"{versions}, kat_r AS ({currents}){ctes} SELECT * FROM kat_r"  # noqa: S608
            values += index_values
            self._s.pending_index = []
        result = self._conn.exec_driver_sql(statement, tuple(values))
        seqs = {(t, i): int(seq) for t, i, seq in result}
        for p in pending:
            stored = dataclasses.replace(p.stored, seq=seqs[(p.stored.type, p.stored.id)])
            key = (stored.type, stored.id)
            known = self._s.preloaded.get(key)
            if known is not None and known[0] is p.stored:
                self._s.preloaded[key] = (stored, True)
            if index is None:
                self._write_index(p.ordered, p.rows, seq=stored.seq, patient_id=stored.patient_id)

    def _index_with_creates(
        self, pending: list[_PendingCreate], *, budget: int
    ) -> tuple[list[str], list[Any]] | None:
        """The index INSERTs to send with ``pending``'s rows: theirs and the transaction's
        other pending index rows; None when that cannot be one statement — replaced rows'
        index still to delete first, an ``observation_values`` row (it carries the seq the
        statement returns), or too many parameters."""
        if self._s.pending_clear:
            return None
        mine: list[tuple[Any, dict[str, Any]]] = []
        for p in pending:
            mine += _index_params(p.ordered, p.rows, seq=0, patient_id=p.stored.patient_id)
        if any(table is observation_values for table, _ in mine):
            return None
        by_table: dict[Any, list[dict[str, Any]]] = {}
        for table, params in [*self._s.pending_index, *mine]:
            by_table.setdefault(table, []).append(params)
        return _index_inserts(by_table, budget) if by_table else None

    def create_many(self, new: Sequence[dict[str, Any]]) -> list[StoredResource]:
        """Create ``new`` resources (none may exist yet) with one multi-row INSERT per table:
        the same stored JSON, versions and index rows as ``put(r, current=None)`` each, for
        bulk loads (imports, the benchmarks' data sets)."""
        if not new:
            return []
        now = self.store.clock()
        now_naive = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
        prepared = []
        self._forget_scopes()
        for resource in new:
            self._s.preloaded.pop((resource["resourceType"], resource["id"]), None)
            ordered = _stored_form(resource, 1, now_naive)
            prepared.append((ordered, dumps(ordered)))
        result = self.conn.execute(
            insert(resource_versions).returning(
                resource_versions.c.seq, sort_by_parameter_order=True
            ),
            [
                {
                    "res_type": r["resourceType"],
                    "res_id": r["id"],
                    "version_id": 1,
                    "last_updated": now_naive,
                    "method": "POST",
                    "content": content,
                }
                for r, content in prepared
            ],
        )
        seqs = [int(s) for s in result.scalars()]
        self._s.written += len(seqs)
        stored: list[StoredResource] = []
        current_rows: list[dict[str, Any]] = []
        index: list[tuple[Any, dict[str, Any]]] = []
        for (r, content), seq in zip(prepared, seqs, strict=True):
            rows = extract_index(r)
            patient_id = patient_of(r, rows)
            current_rows.append(
                {
                    "res_type": r["resourceType"],
                    "res_id": r["id"],
                    "version_id": 1,
                    "last_updated": now_naive,
                    "seq": seq,
                    "deleted": False,
                    "content": content,
                    "patient_id": patient_id,
                }
            )
            stored.append(
                StoredResource(
                    r["resourceType"], r["id"], 1, now_naive, content, False, seq, patient_id
                )
            )
            index.extend(_index_params(r, rows, seq=seq, patient_id=patient_id))
        self.conn.execute(insert(resources), current_rows)
        self._insert_index(index)
        return stored

    def delete(self, current: StoredResource) -> StoredResource:
        now = self.store.clock()
        now_naive = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
        version_id = current.version_id + 1
        self._s.preloaded.pop((current.type, current.id), None)
        self._forget_scopes()
        seq = self._insert_version(current.type, current.id, version_id, now_naive, "DELETE", None)
        self._update_current(
            current.type,
            current.id,
            current.version_id,
            {"version_id": version_id, "last_updated": now_naive, "seq": seq, "deleted": True},
        )
        self._clear_index(current.type, current.id)
        return StoredResource(current.type, current.id, version_id, now_naive, "", True, seq)

    def _insert_version(
        self, rtype: str, rid: str, vid: int, when: datetime, method: str, content: str | None
    ) -> int:
        self._s.written += 1
        result = self.conn.execute(
            _INSERT_VERSION,
            {
                "res_type": rtype,
                "res_id": rid,
                "version_id": vid,
                "last_updated": when,
                "method": method,
                "content": content,
            },
        )
        return int(result.scalar_one())

    def _update_current(
        self, rtype: str, rid: str, expected_version: int, values: dict[str, Any]
    ) -> None:
        result = self.conn.execute(
            _UPDATE_CURRENT[tuple(values)],
            {"k_type": rtype, "k_id": rid, "k_version": expected_version, **values},
        )
        if result.rowcount != 1:
            # Another writer got there first; the unique (type, id, version) constraint on the
            # version table normally catches this earlier. Callers map it to 409/412.
            raise ConcurrentUpdate(rtype, rid)

    def _clear_index(self, rtype: str, rid: str) -> None:
        # Rows still pending belong to an older version of this resource: never sent; rows
        # already in the database go at the next flush, before any new ones are inserted.
        self._s.pending_index = [
            (t, p) for t, p in self._s.pending_index if p["res_id"] != rid or p["res_type"] != rtype
        ]
        self._s.pending_clear[(rtype, rid)] = None

    def _write_index(
        self, resource: dict[str, Any], rows: IndexRows, *, seq: int, patient_id: str | None
    ) -> None:
        self._s.pending_index.extend(_index_params(resource, rows, seq=seq, patient_id=patient_id))

    def flush(self) -> None:
        """Send the index changes of this transaction's writes: the deletions of replaced
        versions' rows, then one multi-row INSERT per index table. Every method that reads
        the index calls it first, and ``Store.write`` before the commit, so no reader (in
        this transaction or after it) sees the index lag the resources."""
        if self._s.pending_creates:
            self._send_creates()
        if self._s.pending_clear:
            keys = [{"k_type": t, "k_id": i} for t, i in self._s.pending_clear]
            self._s.pending_clear = {}
            for only, stmt in _CLEAR_INDEX:
                some = keys if only is None else [k for k in keys if k["k_type"] == only]
                if some:
                    self.conn.execute(stmt, some)
        if self._s.pending_index:
            pending, self._s.pending_index = self._s.pending_index, []
            self._insert_index(pending)

    def _insert_index(self, index: Sequence[tuple[Any, dict[str, Any]]]) -> None:
        """One multi-row INSERT per index table; on PostgreSQL all of them in one statement
        (``_index_statement``): one round trip where a table each took one."""
        by_table: dict[Any, list[dict[str, Any]]] = {}
        for table, params in index:
            by_table.setdefault(table, []).append(params)
        if not self.store.is_sqlite and len(by_table) > 1:
            together = _index_statement(by_table)
            if together is not None:
                self.conn.exec_driver_sql(*together)
                return
        for table in INDEX_TABLES:
            if table in by_table:
                self.conn.execute(_INSERT_INDEX[table], by_table[table])

    # ------------------------------------------------------------------ search

    def search(
        self, query: SearchQuery, visible_patients: Collection[str] | None = None
    ) -> tuple[list[StoredResource], int | None, bool]:
        """Matches for ``query`` (one page), the total, and whether another page follows.

        ``visible_patients`` (None = no restriction) hides patient data outside that set from
        the matches *and* the total, so a count never leaks what a caller may not see.
        """
        self.flush()
        query, scoped = self._scoped(query)
        where, selective = self._plan(query)
        where += scoped
        if visible_patients is not None:
            where.append(
                or_(
                    resources.c.patient_id.is_(None),
                    resources.c.patient_id.in_(sorted(visible_patients)),
                )
            )
        # Uncorrelated (``correlate(None)``), so the database counts once per statement, not
        # per row; the EXISTS probes inside still refer to this count's own resources row.
        count = select(func.count()).select_from(resources).where(*where).correlate(None)
        if query.summary_count or query.count == 0:
            return [], int(self.conn.execute(count).scalar_one()), False
        # The total travels with the page (one round trip, one snapshot). Only an empty page
        # has no row to carry it: before any cursor that means no match at all; after one,
        # it takes its own statement.
        rows, has_more, total = self._page(query, where, selective, total=count)
        if total is None:
            total = 0 if query.cursor is None else int(self.conn.execute(count).scalar_one())
        return self._shaped(query.resource_type, rows), total, has_more

    def matches(self, query: SearchQuery) -> list[StoredResource]:
        """The first page of ``query``'s matches, without counting them all: for the
        services' own look-ups, which never show a total (one query fewer than ``search``)."""
        self.flush()
        query, scoped = self._scoped(query)
        where, selective = self._plan(query)
        return self._shaped(query.resource_type, self._page(query, [*where, *scoped], selective)[0])

    def _shaped(self, rtype: str, rows: list[StoredResource]) -> list[StoredResource]:
        if self.viewer is None or not self.scope(rtype).shaped:
            return rows
        return [self.viewer.shape(self.system, row) for row in rows]

    def _scoped(self, query: SearchQuery) -> tuple[SearchQuery, list[ColumnElement[bool]]]:
        """``query`` narrowed to the caller's scope: ids and ownership become criteria (so the
        planner may start from them), the patients' consent a clause on ``patient_id``."""
        scope = self.scope(query.resource_type)
        if scope.unrestricted:
            return query, []
        if not scope.readable:
            return query, [false()]
        forced: list[Criterion] = []
        if scope.ids is not None:
            forced.append(Criterion("_id", "id", "", tuple(sorted(scope.ids)), ""))
        if scope.owned_by is not None:
            param, targets = scope.owned_by
            forced.append(Criterion(param, "reference", "", targets, ""))
        if forced:
            query = dataclasses.replace(query, criteria=(*query.criteria, *forced))
        return query, self._consent_clauses(query.resource_type, scope)

    def _consent_clauses(self, rtype: str, scope: ReadScope) -> list[ColumnElement[bool]]:
        if scope.patients is None:
            return []
        allowed: list[ColumnElement[bool]] = [
            resources.c.patient_id.is_(None),
            resources.c.patient_id.in_(sorted(scope.patients)),
        ]
        for patient, piece in sorted(scope.slices.items()):
            allowed.append(and_(resources.c.patient_id == patient, _slice_clause(rtype, piece)))
        return [or_(*allowed)]

    def _page(
        self,
        query: SearchQuery,
        where: list[ColumnElement[bool]],
        selective: bool | None,
        *,
        total: Any = None,
    ) -> tuple[list[StoredResource], bool, int | None]:
        """One page of matches after ``query.cursor``, whether more follow, and the value of
        the scalar query ``total`` when given (None without it, or for an empty page)."""
        page_where = list(where)
        if query.cursor is not None:
            page_where.append(
                resources.c.seq < query.cursor
                if query.sort_desc
                else resources.c.seq > query.cursor
            )
        # A selective driver leaves a few candidates: sort them (``seq + 0`` keeps SQLite from
        # walking the whole seq index instead, for the ORDER BY); otherwise read in index
        # order and stop at the page size. Unknown (None, PostgreSQL with one criterion):
        # plain ``seq``, and the planner chooses between the two from its statistics.
        seq = resources.c.seq + 0 if selective else resources.c.seq
        order = seq.desc() if query.sort_desc else seq.asc()
        columns: list[Any] = [resources]
        if total is not None:
            columns.append(total.scalar_subquery().label("kat_total"))
        stmt = select(*columns).where(*page_where).order_by(order).limit(query.count + 1)
        result = list(self.conn.execute(stmt))
        rows = [_row_to_stored(r) for r in result]
        has_more = len(rows) > query.count
        found = int(result[0].kat_total) if total is not None and result else None
        return rows[: query.count], has_more, found

    def scan(
        self,
        query: SearchQuery,
        *,
        after_seq: int,
        limit: int,
        since: datetime | None = None,
        visible_patients: Collection[str] | None = None,
        patients: Collection[str] | None = None,
    ) -> list[tuple[int, str, str | None]]:
        """One batch of (seq, stored JSON, patient id) in write order, for streaming exports:
        keyset paging keeps memory flat and never re-reads a row."""
        where = self._scan_where(query, since, visible_patients, patients)
        where.append(resources.c.seq > after_seq)
        stmt = (
            select(resources.c.seq, resources.c.content, resources.c.patient_id)
            .where(*where)
            .order_by(resources.c.seq)
            .limit(limit)
        )
        rows = [(seq, content, patient) for seq, content, patient in self.conn.execute(stmt)]
        if self.scope(query.resource_type).shaped:
            return self._shape_rows(query.resource_type, rows)
        return rows

    def _scan_where(
        self,
        query: SearchQuery,
        since: datetime | None,
        visible_patients: Collection[str] | None,
        patients: Collection[str] | None,
    ) -> list[ColumnElement[bool]]:
        """The criteria of ``scan``/``scan_batches``: the query, ``_since``, consent (resources
        outside any compartment, or of a visible patient) and a cohort's members."""
        self.flush()
        query, scoped = self._scoped(query)
        where = self._where(query) + scoped
        if since is not None:
            where.append(resources.c.last_updated > since)
        if visible_patients is not None:
            where.append(
                or_(
                    resources.c.patient_id.is_(None),
                    resources.c.patient_id.in_(sorted(visible_patients)),
                )
            )
        if patients is not None:
            where.append(resources.c.patient_id.in_(sorted(patients)))
        return where

    def scan_batches(
        self,
        query: SearchQuery,
        *,
        batch: int,
        since: datetime | None = None,
        visible_patients: Collection[str] | None = None,
        patients: Collection[str] | None = None,
    ) -> Generator[Sequence[tuple[int, str, str | None]], None, None]:
        """What ``scan`` pages through, as one query read ``batch`` rows at a time: one plan,
        one snapshot and bounded memory for a whole export of a type. On PostgreSQL a cursor
        of our own (DECLAREd through SQLAlchemy, so parameters bind as everywhere else) whose
        rows are FETCHed by the driver as plain tuples; SQLite steps its statement."""
        where = self._scan_where(query, since, visible_patients, patients)
        stmt = (
            select(resources.c.seq, resources.c.content, resources.c.patient_id)
            .where(*where)
            .order_by(resources.c.seq)
        )
        shaped = self.scope(query.resource_type).shaped
        if self.store.is_sqlite:
            with self.conn.execute(stmt) as result:
                while rows := result.fetchmany(batch):
                    yield self._shape_rows(query.resource_type, rows) if shaped else rows
            return
        self.need_transaction()
        name = f"kat_scan_{next(_cursor_names)}"
        self.conn.execute(_Declare(name, stmt))
        cursor = self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            while True:
                cursor.execute(f"FETCH FORWARD {int(batch)} FROM {name}")
                rows = cursor.fetchall()
                if not rows:
                    break
                yield self._shape_rows(query.resource_type, rows) if shaped else rows
        finally:
            cursor.close()
        self.conn.exec_driver_sql(f"CLOSE {name}")  # else it closes with the transaction

    def _shape_rows(
        self, rtype: str, rows: Sequence[tuple[int, str, str | None]]
    ) -> list[tuple[int, str, str | None]]:
        """Streamed (seq, JSON, patient) rows as the viewer shapes them."""
        assert self.viewer is not None
        shaped = []
        for seq, content, patient in rows:
            stored = StoredResource(
                rtype, "", 0, datetime.min, content, seq=seq, patient_id=patient
            )
            shaped.append((seq, self.viewer.shape(self.system, stored).content, patient))
        return shaped

    def by_token(
        self,
        rtype: str,
        param: str,
        system: str,
        code: str,
        *,
        patients: Collection[str] | None = None,
    ) -> Iterator[tuple[int, str, str]]:
        """Every current ``rtype`` in a patient's compartment whose ``param`` has the token
        ``system|code``, as (seq, stored JSON, patient id) in write order.

        One join driven by the token index, streamed (a server-side cursor on PostgreSQL), so
        the cost grows linearly with the matches and memory stays flat: for whole-population
        passes such as the outcome measure, where batched ``scan`` calls would re-run the
        criteria's sub-queries for every batch."""
        self.flush()
        stmt = (
            select(resources.c.seq, resources.c.content, resources.c.patient_id)
            .select_from(
                search_token.join(
                    resources,
                    and_(
                        resources.c.res_type == search_token.c.res_type,
                        resources.c.res_id == search_token.c.res_id,
                    ),
                )
            )
            .where(
                search_token.c.res_type == rtype,
                search_token.c.param == param,
                search_token.c.code == code,
                search_token.c.system == system,
                resources.c.deleted == false(),
                resources.c.patient_id.is_not(None),
            )
            .order_by(resources.c.seq)
        )
        if patients is not None:
            stmt = stmt.where(resources.c.patient_id.in_(sorted(patients)))
        _, scoped = self._scoped(SearchQuery(rtype))
        if scoped:
            # A caller's scope here is consent alone: the callers of this pass (the outcome
            # measure) are roles that own nothing and read every type they ask for.
            stmt = stmt.where(*scoped)
        self.need_transaction()  # a server-side cursor on PostgreSQL
        result = self.conn.execution_options(stream_results=True, yield_per=2000).execute(stmt)
        for row in result:
            yield int(row.seq), row.content, row.patient_id

    def _where(self, query: SearchQuery) -> list[ColumnElement[bool]]:
        return self._plan(query)[0]

    def _plan(self, query: SearchQuery) -> tuple[list[ColumnElement[bool]], bool | None]:
        """The WHERE clauses of ``query``, planned most-selective-first, and whether the
        driving criterion is known to match fewer than ``ESTIMATE_CAP`` resources (None: not
        counted, left to the database's planner).

        The criterion matching the fewest resources (counted up to ``ESTIMATE_CAP`` in its
        index) becomes an uncorrelated IN-subquery, so the database starts from those few
        index entries; every other criterion becomes a correlated EXISTS probed per candidate
        through the owner index. Cost then follows the most selective criterion, not the
        least (``code`` alone matches every PHQ-9 total in the database)."""
        rtype = query.resource_type
        clauses: list[ColumnElement[bool]] = [
            resources.c.res_type == rtype,
            resources.c.deleted == false(),
        ]
        criteria = list(query.criteria)
        made: dict[int, Any] = {}  # each criterion's condition, built once (``_condition``)
        drivable = [c for c in criteria if c.modifier not in ("missing", "not")]
        driver = None
        selective: bool | None = False
        if len(drivable) == 1 and not self.store.is_sqlite:
            # Nothing to choose between: skip the round trip. Whether the one criterion is
            # selective stays unknown, and PostgreSQL's planner picks the page's plan itself
            # (SQLite's needs the hint, and its estimate costs no network round trip).
            driver, selective = drivable[0], None
        elif drivable:
            # One round trip: every candidate's capped count.
            counts = self.conn.execute(
                select(*(self._estimate(rtype, c, made) for c in drivable))
            ).one()
            best = min(range(len(drivable)), key=lambda i: counts[i])
            driver, selective = drivable[best], counts[best] < ESTIMATE_CAP
        for criterion in criteria:
            clauses.append(self._criterion(rtype, criterion, driver=criterion is driver, made=made))
        return clauses, selective

    def _condition(self, rtype: str, c: Criterion, made: dict[int, Any] | None) -> Any:
        """``c``'s condition: on ``last_updated`` for ``_lastUpdated``, else the index table
        and the condition on its rows (``_index_condition``). Built once per plan (``made``,
        by criterion): the estimate and the page's clauses share it, and building SQLAlchemy
        expressions is a good part of a search's CPU time."""
        if made is not None and id(c) in made:
            return made[id(c)]
        if c.type == "lastUpdated":
            col = resources.c.last_updated
            built: Any = or_(*(_date_clause(col, col, v) for v in c.values))
        else:
            built = self._index_condition(rtype, c)
        if made is not None:
            made[id(c)] = built
        return built

    def _estimate(self, rtype: str, c: Criterion, made: dict[int, Any] | None = None) -> Any:
        """How many resources ``c`` matches, counted no further than ``ESTIMATE_CAP`` (a
        scalar sub-query)."""
        if c.type == "id":
            return literal(len(c.values))
        if c.type == "lastUpdated":
            # Only indexed columns: (res_type, last_updated) answers it alone; selecting res_id
            # read a table row per counted entry, which at 1M are spread over the JSON's pages.
            inner = select(resources.c.last_updated).where(
                resources.c.res_type == rtype, self._condition(rtype, c, made)
            )
        else:
            table, condition = self._condition(rtype, c, made)
            inner = select(table.c.res_id).where(condition)
        capped = inner.limit(ESTIMATE_CAP).subquery()
        return select(func.count()).select_from(capped).scalar_subquery()

    def _criterion(
        self, rtype: str, c: Criterion, *, driver: bool, made: dict[int, Any] | None = None
    ) -> ColumnElement[bool]:
        if c.type == "id":
            return resources.c.res_id.in_(list(c.values))
        if c.type == "lastUpdated":
            clause: ColumnElement[bool] = self._condition(rtype, c, made)
            return clause
        table, condition = self._condition(rtype, c, made)
        if c.modifier == "missing":
            present = resources.c.res_id.in_(select(table.c.res_id).where(condition))
            return not_(present) if c.values[0] else present
        matched: ColumnElement[bool]
        if driver:
            # Uncorrelated: the database starts from the index on (res_type, param, value)
            # and joins to the few matching resources.
            matched = resources.c.res_id.in_(select(table.c.res_id).where(condition))
        else:
            # Correlated: probed through (res_type, res_id) for each candidate row.
            matched = (
                select(literal(1))
                .where(
                    table.c.res_type == resources.c.res_type,
                    table.c.res_id == resources.c.res_id,
                    condition,
                )
                .exists()
            )
        return not_(matched) if c.modifier == "not" else matched

    def _index_condition(self, rtype: str, c: Criterion) -> tuple[Any, ColumnElement[bool]]:
        """The index table ``c`` reads and the condition on its rows."""
        table = {
            "token": search_token,
            "reference": search_reference,
            "date": search_date,
            "string": search_string,
            "uri": search_string,
            "number": search_number,
            "quantity": search_number,
        }[c.type]
        scope = and_(table.c.res_type == rtype, table.c.param == c.name)
        if c.modifier == "missing":
            return table, scope
        alternatives: list[ColumnElement[bool]] = []
        values = c.values
        if c.type == "token":
            # Codes with no system given: one ``code IN (…)`` (the same rows as OR-ed
            # equalities, and one expression to build where a transaction's conditional
            # creates look up 100 identifiers together: ``FhirService._conditional_matches``).
            bare = sorted({code for _, code, has_pipe in values if code and not has_pipe})
            if len(bare) > 1:
                alternatives.append(search_token.c.code.in_(bare))
                values = tuple(v for v in values if not v[1] or v[2])
        for value in values:
            if c.type == "token":
                system, code, has_pipe = value
                conds = []
                if code:
                    conds.append(search_token.c.code == code)
                if has_pipe:
                    conds.append(search_token.c.system == (system or ""))
                alternatives.append(and_(*conds))
            elif c.type == "reference":
                ttype, tid = value
                conds = [search_reference.c.target_id == tid]
                if ttype:
                    conds.append(search_reference.c.target_type == ttype)
                alternatives.append(and_(*conds))
            elif c.type == "date":
                alternatives.append(_date_clause(search_date.c.low, search_date.c.high, value))
            elif c.type == "string":
                if c.modifier == "exact":
                    alternatives.append(search_string.c.value == " ".join(value.lower().split()))
                elif c.modifier == "contains":
                    alternatives.append(search_string.c.value.contains(value, autoescape=True))
                else:
                    alternatives.append(search_string.c.value.startswith(value, autoescape=True))
            elif c.type in ("number", "quantity"):
                alternatives.append(_number_clause(value))
            else:  # uri: exact match
                alternatives.append(search_string.c.value == value)
        return table, and_(scope, or_(*alternatives))

    def references_from(
        self, rtype: str, ids: Sequence[str], param: str, target_type: str | None
    ) -> list[tuple[str, str]]:
        if not ids:
            return []
        self.flush()
        stmt = select(search_reference.c.target_type, search_reference.c.target_id).where(
            search_reference.c.res_type == rtype,
            search_reference.c.res_id.in_(list(ids)),
            search_reference.c.param == param,
        )
        if target_type:
            stmt = stmt.where(search_reference.c.target_type == target_type)
        return sorted({(r.target_type, r.target_id) for r in self.conn.execute(stmt)})

    def referencing(
        self, source_type: str, param: str, target_type: str, target_ids: Sequence[str]
    ) -> list[tuple[str, str]]:
        if not target_ids:
            return []
        self.flush()
        stmt = select(search_reference.c.res_type, search_reference.c.res_id).where(
            search_reference.c.res_type == source_type,
            search_reference.c.param == param,
            search_reference.c.target_type == target_type,
            search_reference.c.target_id.in_(list(target_ids)),
        )
        return sorted({(r.res_type, r.res_id) for r in self.conn.execute(stmt)})


#: Search parameters that put a resource in a patient's compartment, in order of preference.
_PATIENT_PARAMS = ("patient", "subject")


def patient_of(resource: dict[str, Any], rows: IndexRows) -> str | None:
    """The patient whose data ``resource`` is (its own id for a Patient)."""
    if resource["resourceType"] == "Patient":
        return str(resource["id"])
    for wanted in _PATIENT_PARAMS:
        for param, target_type, target_id in rows.references:
            if param == wanted and target_type == "Patient":
                return target_id
    return None


class ConcurrentUpdate(Exception):
    def __init__(self, rtype: str, rid: str) -> None:
        super().__init__(f"{rtype}/{rid} changed concurrently")
        self.rtype, self.rid = rtype, rid


def _lock_number(key: str) -> int:
    """The PostgreSQL advisory lock number of ``key``."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def _stored_form(resource: dict[str, Any], version_id: int, when: datetime) -> dict[str, Any]:
    """The JSON stored for ``resource`` as version ``version_id`` written at ``when``."""
    meta = dict(resource.get("meta", {}))
    meta["versionId"] = str(version_id)
    meta["lastUpdated"] = format_instant(when)
    stored_json = dict(resource)
    stored_json["meta"] = meta
    # Keep resourceType and id first: readers (and people) expect them at the top.
    ordered = {"resourceType": resource["resourceType"], "id": resource["id"]}
    ordered.update((k, v) for k, v in stored_json.items() if k not in ordered)
    return ordered


def _index_params(
    resource: dict[str, Any], rows: IndexRows, *, seq: int, patient_id: str | None
) -> list[tuple[Any, dict[str, Any]]]:
    """The index rows of ``resource``, stored as ``seq`` in ``patient_id``'s compartment, as
    (table, INSERT parameters), duplicates dropped; with the ``observation_values`` rows
    derived from them."""
    base = {"res_type": resource["resourceType"], "res_id": resource["id"]}
    out: list[tuple[Any, dict[str, Any]]] = []
    out.extend(
        (search_token, {**base, "param": p, "system": sy[:255], "code": c[:255]})
        for p, sy, c in set(rows.tokens)
    )
    out.extend(
        (search_reference, {**base, "param": p, "target_type": t, "target_id": i[:64]})
        for p, t, i in set(rows.references)
    )
    out.extend(
        (search_date, {**base, "param": p, "low": lo, "high": hi}) for p, lo, hi in set(rows.dates)
    )
    out.extend(
        (search_string, {**base, "param": p, "value": v[:512]}) for p, v in set(rows.strings)
    )
    out.extend(
        (
            search_number,
            {**base, "param": p, "value": v, "system": sy[:255], "code": c[:255], "unit": u[:255]},
        )
        for p, v, sy, c, u in set(rows.numbers)
    )
    out.extend(
        (observation_values, row)
        for row in value_rows(
            base["res_type"], base["res_id"], rows, seq=seq, patient_id=patient_id
        )
    )
    return out


def _without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    copy = dict(resource)
    meta = dict(copy.get("meta", {}))
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if meta:
        copy["meta"] = meta
    else:
        copy.pop("meta", None)
    return copy


def _slice_clause(rtype: str, piece: PatientSlice) -> ColumnElement[bool]:
    """``_in_slice`` in SQL, for one patient's rows of ``rtype``."""
    ids = sorted(r.split("/", 1)[1] for r in piece.references if r.split("/", 1)[0] == rtype)
    options: list[ColumnElement[bool]] = [resources.c.res_id.in_(ids)] if ids else []
    if piece.periods and piece.period_param is not None:
        mine = and_(
            search_date.c.res_type == resources.c.res_type,
            search_date.c.res_id == resources.c.res_id,
            search_date.c.param == piece.period_param,
        )
        inside = or_(
            *(
                and_(
                    search_date.c.low >= start if start is not None else true(),
                    search_date.c.high <= end if end is not None else true(),
                )
                for start, end in piece.periods
            )
        )
        options.append(
            and_(
                select(literal(1)).where(mine).exists(),
                not_(select(literal(1)).where(mine, not_(inside)).exists()),
            )
        )
    return or_(*options) if options else false()


def _in_slice(piece: PatientSlice, stored: StoredResource) -> bool:
    """Whether ``stored`` lies in the slice of its patient's data a narrowed consent opens."""
    if f"{stored.type}/{stored.id}" in piece.references:
        return True
    if not piece.periods or piece.period_param is None or not stored.content:
        return False
    ranges = [
        (low, high)
        for param, low, high in extract_index(json.loads(stored.content)).dates
        if param == piece.period_param
    ]
    return bool(ranges) and all(
        any((s is None or low >= s) and (e is None or high <= e) for s, e in piece.periods)
        for low, high in ranges
    )


def same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two versions say the same thing: equal JSON once the server-set
    ``meta.versionId`` and ``meta.lastUpdated`` are left out, object keys in any order, arrays
    in order, and each value of the same JSON type (``1`` is not ``1.0``, a decimal's
    precision is part of its value; ``true`` is not ``1``). Every other ``meta`` element
    (``tag``, ``security``, ``profile``, ``source``) is content: changing one is a change."""
    return _same_json(_without_server_meta(a), _without_server_meta(b))


def _same_json(a: Any, b: Any) -> bool:
    # Python's == says 1 == 1.0 == True; JSON (and FHIR decimals) do not.
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _number_clause(value: NumberValue) -> ColumnElement[bool]:
    """A number or quantity search value against ``search_number`` rows: ``eq``/``ne`` over
    the value's implicit range, the other prefixes against the number itself; a quantity's
    unit by system and code, or by code or human unit when no system is given (FHIR R4
    search, "number" and "quantity")."""
    col = search_number.c.value
    in_range = and_(col >= value.low, col < value.high)
    conds: list[ColumnElement[bool]] = [
        {
            "eq": in_range,
            "ne": not_(in_range),
            "gt": col > value.number,
            "lt": col < value.number,
            "ge": col >= value.number,
            "le": col <= value.number,
        }[value.prefix]
    ]
    if value.system is not None:
        conds.append(search_number.c.system == value.system)
        if value.code is not None:
            conds.append(search_number.c.code == value.code)
    elif value.code is not None:
        conds.append(or_(search_number.c.code == value.code, search_number.c.unit == value.code))
    return and_(*conds)


def _date_clause(
    low_col: Any, high_col: Any, value: tuple[str, datetime, datetime]
) -> ColumnElement[bool]:
    """FHIR date prefixes over ranges: the stored range [low_col, high_col] against the
    parameter's implied range [low, high] (FHIR R4 search, "date" section)."""
    prefix, low, high = value
    clause: ColumnElement[bool]
    if prefix == "eq":
        clause = and_(low_col >= low, high_col <= high)
    elif prefix == "ne":
        clause = not_(and_(low_col >= low, high_col <= high))
    elif prefix == "gt":
        clause = high_col > high
    elif prefix == "lt":
        clause = low_col < low
    elif prefix == "ge":
        clause = high_col >= low
    elif prefix == "le":
        clause = low_col <= high
    elif prefix == "sa":
        clause = low_col > high
    else:  # eb
        clause = high_col < low
    return clause


__all__ = ["ConcurrentUpdate", "Store", "StoredResource", "Tx", "format_instant", "params_for"]
