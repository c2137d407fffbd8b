"""The PostgreSQL read path without its fixed per-request round trips (issue 9, search):

- ``Store.read(transaction=False)`` (the REST reads and searches) runs each statement on its
  own on PostgreSQL — no BEGIN, no COMMIT — and answers exactly what a transactional read
  answers (same rows, totals, pages; the REST bundles the same apart from their random ids).
- What needs a transaction inside such a read still gets one (``Tx.need_transaction``): the
  export's cursor (``scan_batches``), the measure's streamed join (``by_token``), an advisory
  lock, a row lock.
- A connection goes back to the pool transactional: a failing write after such a read on the
  same connection still rolls back.
- Pooled connections are pinged only after ``PING_AFTER_IDLE`` seconds idle (no round trip per
  checkout); a dead idle connection is replaced before use, and a connection that dies in
  steady use fails one request, after which the pool recovers.

No timings here: the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError

from fhir_kat.search import parse_search
from fhir_kat.store import Store
from fhir_kat.store import store as store_module
from fhir_kat.store.schema import resources
from tests.conftest import client_as
from tests.test_store_performance_paths import SEARCHES, _search_store


def _in_transaction(tx: Any) -> bool:
    """Whether the driver's connection is inside a transaction block (PostgreSQL)."""
    status = tx.conn.connection.dbapi_connection.info.transaction_status
    return bool(status != 0)  # psycopg.pq.TransactionStatus.IDLE


@pytest.fixture
def store(database_url: str) -> Any:
    searched = _search_store(database_url)
    yield searched
    searched.drop_schema()
    searched.dispose()


def test_reads_without_a_transaction_answer_as_transactional_ones(store: Store) -> None:
    for rtype, pairs in SEARCHES:
        query = parse_search(rtype, pairs, strict=True, default_count=3, max_count=10)
        cursor: int | None = None
        while True:
            page = replace(query, cursor=cursor)
            with store.read() as tx:
                expected = tx.search(page)
            with store.read(transaction=False) as tx:
                assert tx.search(page) == expected, (rtype, pairs, cursor)
            rows, _, more = expected
            if not more:
                break
            cursor = rows[-1].seq
    for key in (("Task", "t3"), ("Observation", "o1-2"), ("Task", "nobody")):
        with store.read() as tx:
            expected_row = tx.get(*key)
        with store.read(transaction=False) as tx:
            assert tx.get(*key) == expected_row


def test_no_begin_or_commit_on_postgresql(store: Store) -> None:
    """SQLite reads keep their transaction (nothing to save in-process); PostgreSQL's run
    each statement in autocommit: the connection is never left inside a transaction block."""
    query = parse_search(
        "Task",
        [("requester", "Organization/org2"), ("status", "accepted")],
        strict=True,
        default_count=3,
        max_count=10,
    )
    with store.read(transaction=False) as tx:
        tx.search(query)
        tx.get("Task", "t1")
        if not store.is_sqlite:
            assert not _in_transaction(tx)
    with store.read() as tx:
        tx.get("Task", "t1")
        if not store.is_sqlite:
            assert _in_transaction(tx)


def test_what_needs_a_transaction_gets_one(store: Store) -> None:
    query = parse_search("Task", [], strict=True, default_count=3, max_count=10)
    with store.read() as tx:
        expected = [list(b) for b in tx.scan_batches(query, batch=7)]
        expected_tokens = list(tx.by_token("Observation", "code", "http://loinc.org", "c1"))
    assert sum(len(b) for b in expected) == 39  # 40 Tasks, one deleted
    assert expected_tokens
    with store.read(transaction=False) as tx:
        assert [list(b) for b in tx.scan_batches(query, batch=7)] == expected
        if not store.is_sqlite:
            assert _in_transaction(tx)  # the cursor's, kept to the end
    with store.read(transaction=False) as tx:
        assert list(tx.by_token("Observation", "code", "http://loinc.org", "c1")) == (
            expected_tokens
        )
    with store.read(transaction=False) as tx:
        tx.lock("some key")
        if not store.is_sqlite:
            assert _in_transaction(tx)  # the advisory lock is held until the end
    with store.read(transaction=False) as tx:
        assert tx.get("Task", "t2", for_update=True) == tx.get("Task", "t2")
        if not store.is_sqlite:
            assert _in_transaction(tx)


def test_a_connection_returns_to_the_pool_transactional(store: Store) -> None:
    """The connection a transaction-less read used (one at a time here: the same pooled
    connection) still rolls a failing write back afterwards."""
    with store.read(transaction=False) as tx:
        tx.get("Task", "t1")
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.put(
            {"resourceType": "Task", "id": "rolled-back", "status": "draft", "intent": "order"},
            current=None,
        )
        raise RuntimeError("fail before the commit")
    with store.read(transaction=False) as tx:
        assert tx.get("Task", "rolled-back") is None
    with store.read(transaction=False) as tx:
        tx.lock("escalated")  # leaves autocommit for the rest of that read only
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.put(
            {"resourceType": "Task", "id": "rolled-back", "status": "draft", "intent": "order"},
            current=None,
        )
        raise RuntimeError("fail before the commit")
    with store.read() as tx:
        assert tx.get("Task", "rolled-back") is None


def test_rest_search_and_read_bundles_unchanged(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over HTTP: the same entries, totals and links through the transaction-less read as
    through a transactional one (the bundle's id is random either way)."""
    client = client_as(app, "staff")
    for i in range(7):
        task = {
            "resourceType": "Task",
            "id": f"rt{i}",
            "status": "requested",
            "intent": "order",
            "requester": {"reference": f"Organization/org{i % 2}"},
        }
        assert client.put(f"/fhir/Task/rt{i}", json=task).status_code in (200, 201)
    urls = [
        "/fhir/Task?requester=Organization/org1&_count=2",
        "/fhir/Task?requester=Organization/org0&_lastUpdated=ge2020-01-01",
        "/fhir/Task/rt3",
        "/fhir/Task/rt3/_history/1",
    ]

    def answers() -> list[Any]:
        found = []
        for url in urls:
            response = client.get(url)
            assert response.status_code == 200, response.get_data(as_text=True)
            body = response.get_json()
            if body["resourceType"] == "Bundle":
                body.pop("id")
            found.append((body, response.headers.get("ETag")))
        return found

    now = answers()
    original = Store.read

    def transactional(self: Store, *, transaction: bool = True, viewer: Any = None) -> Any:
        return original(self, viewer=viewer)

    monkeypatch.setattr(Store, "read", transactional)
    assert answers() == now


def _terminate_backends(url: str) -> None:
    """Kill every other connection to this database (what a server restart does to them)."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    admin.dispose()


def test_idle_connections_are_pinged_busy_ones_are_not(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store.is_sqlite:
        pytest.skip("a PostgreSQL connection pool")
    original_ping = store.engine.dialect.do_ping
    pinged: list[int] = []

    def counting_ping(dbapi_conn: Any) -> bool:
        pinged.append(1)
        return bool(original_ping(dbapi_conn))

    monkeypatch.setattr(store.engine.dialect, "do_ping", counting_ping)
    for _ in range(3):
        with store.read(transaction=False) as tx:
            tx.get("Task", "t1")
    assert pinged == []  # in steady use: no round trip before each request

    # Idle past the threshold, then the server drops the connections: replaced before use.
    monkeypatch.setattr(store_module, "PING_AFTER_IDLE", 0.0)
    _terminate_backends(store.url)
    with store.read(transaction=False) as tx:
        assert tx.get("Task", "t1") is not None
    assert pinged


def test_a_connection_dropped_in_steady_use_fails_once(store: Store) -> None:
    """Without the ping (the connection was just used), the request that meets the dead
    connection fails; the pool then drops every connection opened before, and the next
    request works."""
    if store.is_sqlite:
        pytest.skip("a PostgreSQL connection pool")
    with store.read(transaction=False) as tx:
        tx.get("Task", "t1")
    _terminate_backends(store.url)
    with pytest.raises(DBAPIError) as failed, store.read(transaction=False) as tx:
        tx.conn.execute(select(resources.c.res_id).limit(1)).all()
    assert failed.value.connection_invalidated
    with store.read(transaction=False) as tx:
        assert tx.get("Task", "t1") is not None
