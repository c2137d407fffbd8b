"""Shared fixtures: one database per backend (SQLite and PostgreSQL, both real), an app per
test, and a live HTTP server on loopback for real FHIR clients.

PostgreSQL comes from FHIR_KAT_TEST_POSTGRES_URL (default: the machine's 127.0.0.1:5432/test,
trust auth). An unreachable configured PostgreSQL fails the run; only an explicit
FHIR_KAT_TEST_POSTGRES=off skips those tests (for machines without one; CI never sets it).
Each xdist worker gets its own PostgreSQL database, emptied between tests.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from werkzeug.serving import BaseWSGIServer, make_server

from fhir_kat.app import create_app
from fhir_kat.settings import Settings, load_settings
from fhir_kat.store.schema import metadata

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_disabled() -> bool:
    return os.environ.get("FHIR_KAT_TEST_POSTGRES", "").lower() == "off"


@pytest.fixture(scope="session")
def postgres_url(worker_id: str) -> Iterator[str]:
    """A PostgreSQL database of this worker's own, created fresh for the session."""
    if postgres_disabled():
        pytest.skip("FHIR_KAT_TEST_POSTGRES=off")
    admin_url = os.environ.get("FHIR_KAT_TEST_POSTGRES_URL", PG_DEFAULT)
    name = f"fhir_kat_test_{worker_id}".replace("-", "_")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # the run must fail, loudly, not skip
        pytest.fail(f"PostgreSQL at FHIR_KAT_TEST_POSTGRES_URL is unreachable: {exc}")
    base, _, _ = admin_url.rpartition("/")
    yield f"{base}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite3'}"
        return
    url: str = request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    yield url


class FakeClock:
    """A settable clock so versions and lastUpdated are predictable in tests."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 15, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return load_settings({}, database_url=database_url, data_dir=str(tmp_path / "var"))


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    application = create_app(settings)
    yield application
    application.extensions["fhir_kat"].store.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


class LiveServer:
    def __init__(self, app: Flask) -> None:
        self.app = app
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(app: Flask) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server
