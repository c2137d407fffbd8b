"""The SQLite writer queue: one writer at a time per database file, in order of arrival.

Owns: the turn a writer waits for before ``BEGIN IMMEDIATE`` (threads on a lock, processes on
an exclusive ``flock`` of ``<db>-writer.lock``). Used by the store for the database and by the
audit journal for its own file (``fhir_kat.store.audit_journal``).
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import make_url


class SqliteWriterQueue:
    """Writers to one SQLite file wait their turn here, before ``BEGIN IMMEDIATE``.

    SQLite admits one writer at a time; the others' ``BEGIN IMMEDIATE`` spins in the busy
    handler, which sleeps 1, 2, 5 … up to 100 ms between attempts and so leaves the file idle
    while writers sleep (and lets a lucky newcomer overtake the long waiters: seconds of
    p99 under 8 concurrent clients). Here the threads of a process queue on a lock, and the
    processes on an exclusive ``flock`` of a lock file beside the database; both wake the next
    writer the moment the current one commits. ``BEGIN IMMEDIATE`` and the busy timeout stay
    as the guarantee for writers that bypass the queue (the ``sqlite3`` shell, an older
    process). The lock file is separate from the database on purpose: closing any descriptor
    of the database file would drop SQLite's own POSIX locks held by this process."""

    def __init__(self, url: str) -> None:
        database = make_url(url).database
        self._path = f"{database}-writer.lock" if database and database != ":memory:" else None
        self._threads = threading.Lock()
        self._holder: int | None = None
        self._fd: int | None = None

    @contextmanager
    def turn(self) -> Iterator[None]:
        if self._holder == threading.get_ident():
            # A write opened inside another on the same thread would wait for itself.
            raise RuntimeError("nested write transaction on SQLite")
        with self._threads:
            self._holder = threading.get_ident()
            try:
                if self._path is None:
                    yield
                    return
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)  # releases the GIL while it waits
                try:
                    yield
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                self._holder = None

    @contextmanager
    def try_turn(self) -> Iterator[bool]:
        """The turn if it is free now (yields True, and holds it until the block ends), else
        yields False at once: for work that may be done by whoever is idle (moving the audit
        journal), never worth waiting for."""
        if self._holder == threading.get_ident() or not self._threads.acquire(blocking=False):
            yield False
            return
        self._holder = threading.get_ident()
        try:
            if self._path is None:
                yield True
                return
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._holder = None
            self._threads.release()

    def close(self) -> None:
        with self._threads:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
