"""The audit journal: where an SQLite deployment's reads leave their AuditEvent (ADR 0023).

Owns: a small SQLite file beside the database (``<db>-audit``), append-only, with its own
writer queue, into which the audit records written at response time (reads, searches,
refusals, sign-ins, deliveries) are committed — several concurrent requests' records in one
commit (group commit) — and from which the store moves them into the resource store as
AuditEvents (``Store.drain_audit``). Must not: decide what an AuditEvent says
(``fhir_kat.security.audit``) or who may read one (the AuditEvents are read through the store,
under the one visibility rule, once moved).

Why a second file: SQLite admits one writer per database file, so an AuditEvent written into
the main database makes every read wait for the writer turn, i.e. behind ingest. Appending to
another file takes only that file's writer turn, which only other appends (each one INSERT)
contend for. The journal is as durable as the database itself (WAL, ``synchronous=NORMAL``:
a commit survives the process — a crash or ``kill -9`` after the answer — as the data does;
a power loss may take the last commits of both), and an answer is released only after its
record's commit.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass

from fhir_kat.store.writer_queue import SqliteWriterQueue

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS audit_journal ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " event_id TEXT NOT NULL,"
    " content TEXT NOT NULL)"
)


@dataclass
class _Entry:
    event_id: str
    content: str
    done: bool = False
    error: BaseException | None = None


@dataclass(frozen=True)
class JournalRow:
    seq: int
    event_id: str
    content: str


class AuditJournal:
    """Append-only records, committed in groups, read and forgotten in order of ``seq``.

    ``append`` returns once the record is committed. The threads of a process that append at
    once share one commit: the first to take the journal's lock commits every record queued
    by then, and the others find theirs done when they get the lock (the classic group
    commit); processes take turns on the journal's own writer queue (``flock`` of
    ``<journal>-writer.lock``), never on the database's."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._queue = SqliteWriterQueue(f"sqlite:///{path}")
        self._lock = threading.Lock()  # the connection, and the right to commit a group
        self._waiting_lock = threading.Lock()
        self._waiting: list[_Entry] = []
        self._conn: sqlite3.Connection | None = None
        #: Commits and records since this object was made (the benchmark and tests read them).
        self.commits = 0
        self.appended = 0

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout=30000")
            for attempt in range(300):  # the switch ignores the busy handler: ~30 s of retries
                try:
                    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                        with self._queue.turn():
                            conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == 299:
                        raise
                    time.sleep(0.1)
            conn.execute("PRAGMA synchronous=NORMAL")
            with self._queue.turn():
                conn.execute(_SCHEMA)
            self._conn = conn
        return self._conn

    def append(self, event_id: str, content: str) -> int:
        """Commit one record; returns how many records the journal holds (its backlog)."""
        entry = _Entry(event_id, content)
        with self._waiting_lock:
            self._waiting.append(entry)
        with self._lock:
            if not entry.done:
                with self._waiting_lock:
                    batch, self._waiting = self._waiting, []
                self._commit(batch)
            if entry.error is not None:
                raise entry.error
            return self._backlog()

    def _commit(self, batch: list[_Entry]) -> None:
        try:
            conn = self._connection()
            with self._queue.turn():
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(
                        "INSERT INTO audit_journal (event_id, content) VALUES (?, ?)",
                        [(e.event_id, e.content) for e in batch],
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            self.commits += 1
            self.appended += len(batch)
        except BaseException as exc:
            for e in batch:
                e.error = exc
        finally:
            for e in batch:
                e.done = True

    def _backlog(self) -> int:
        row = self._connection().execute("SELECT min(seq), max(seq) FROM audit_journal").fetchone()
        return 0 if row[0] is None else int(row[1]) - int(row[0]) + 1

    def backlog(self) -> int:
        """How many records wait to be moved (an upper bound: ``seq`` has no gaps but at the
        edges of a partly forgotten range)."""
        with self._lock:
            return self._backlog()

    def oldest(self, limit: int) -> list[JournalRow]:
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT seq, event_id, content FROM audit_journal ORDER BY seq LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
        return [JournalRow(int(s), str(i), str(c)) for s, i, c in rows]

    def forget(self, upto: int) -> None:
        """Drop the records up to ``seq`` ``upto``: called after they are committed in the
        store. A crash before this leaves them here, and the next move skips what the store
        already holds (by the AuditEvent's id), so a record is never lost nor stored twice."""
        with self._lock:
            conn = self._connection()
            with self._queue.turn():
                conn.execute("DELETE FROM audit_journal WHERE seq <= ?", (upto,))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self._queue.close()
