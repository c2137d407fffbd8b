"""Several processes opening a new SQLite file at once (gunicorn workers on the embedded
default) all start: the switch to WAL and the CREATE TABLEs take turns instead of failing with
"database is locked"."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

PROCESSES = 4


def _start(url: str, barrier: Any, results: Any) -> None:
    import fhir_kat.exchange  # noqa: F401 - registers the outbox table like the app does
    from fhir_kat.store import Store

    store = Store(url)
    barrier.wait(timeout=30)
    try:
        store.create_schema()
        with store.read() as tx:
            tx.get("Patient", "none")
        results.put("ok")
    except Exception as exc:  # reported to the test, which names it
        results.put(f"{type(exc).__name__}: {exc}"[:300])
    finally:
        store.dispose()


def test_processes_starting_together_on_a_new_sqlite_file(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'new-{round_}.sqlite3'}"
        barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_start, args=(url, barrier, results)) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert outcomes == ["ok"] * PROCESSES, outcomes
