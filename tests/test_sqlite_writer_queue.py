"""SQLite writers queue for their turn (``store._SqliteWriterQueue``) before ``BEGIN
IMMEDIATE``: threads on a process lock, processes on a ``flock`` of ``<db>-writer.lock``. A
writer waiting its turn must not proceed while another process holds it, every queued write
must land, and a write nested in another on one thread fails at once instead of waiting for
itself."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any

import pytest

from fhir_kat.store import Store
from fhir_kat.store.store import _SqliteWriterQueue


def _hold_turn(url: str, held: Any, release: Any) -> None:
    queue = _SqliteWriterQueue(url)
    with queue.turn():
        held.set()
        release.wait(30)
    queue.close()


def _patient(n: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"p{n}", "gender": "unknown"}


def test_a_writer_waits_while_another_process_has_the_turn(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/kat.db"
    store = Store(url)
    store.create_schema()
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_turn, args=(url, held, release))
    other.start()
    try:
        assert held.wait(30)
        done = threading.Event()

        def write() -> None:
            with store.write() as tx:
                tx.put(_patient(1), current=None)
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        # Not a timing claim: the write cannot finish at all while the other process holds
        # the turn (it holds no SQLite lock, so only the queue keeps this writer out).
        assert not done.wait(0.5)
        release.set()
        writer.join(30)
        assert done.is_set()
    finally:
        release.set()
        other.join(30)
    with store.read() as tx:
        assert tx.get("Patient", "p1") is not None
    assert (tmp_path / "kat.db-writer.lock").exists()
    store.dispose()


def test_queued_threads_all_write(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/kat.db")
    store.create_schema()
    barrier = threading.Barrier(8, timeout=30)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            barrier.wait()
            for k in range(5):
                with store.write() as tx:
                    tx.put(_patient(n * 10 + k), current=None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with store.read() as tx:
        assert (
            len(tx.get_many([("Patient", f"p{n * 10 + k}") for n in range(8) for k in range(5)]))
            == 40
        )
    store.dispose()


def test_a_nested_write_fails_at_once(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/kat.db")
    store.create_schema()
    with store.write(), pytest.raises(RuntimeError, match="nested write"), store.write():
        pass
    # The turn is free again afterwards.
    with store.write() as tx:
        tx.put(_patient(2), current=None)
    store.dispose()


def test_in_memory_databases_queue_threads_without_a_lock_file() -> None:
    queue = _SqliteWriterQueue("sqlite://")
    with queue.turn():
        pass
    queue.close()
