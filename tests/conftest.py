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
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# The tests' canonical home, set before anything of fhir_kat is imported (the bases are read
# once per process, ADR 0021); servers the tests start inherit it. example.org lives only here,
# in the tests' data and in the examples.
os.environ["FHIR_KAT_CANONICAL_BASE"] = "https://fhir-kat.example.org/fhir"
os.environ.pop("FHIR_KAT_IDENTIFIER_BASE", None)

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import settings as hypothesis_settings
from sqlalchemy import create_engine, text
from werkzeug.serving import BaseWSGIServer, make_server

from fhir_kat.app import create_app
from fhir_kat.security.secrets import hash_secret
from fhir_kat.settings import Settings, load_settings
from fhir_kat.store.schema import metadata

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

# Property tests (hypothesis): CI runs the same examples every time, so a red run is
# reproducible and never a coin toss; a developer's run explores new ones.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")
# Every app the tests start, in this process or as a subprocess server, fails a request whose
# write-pipeline step stores what its row does not name (fhir_kat/services/pipeline.py).
os.environ.setdefault("FHIR_KAT_PIPELINE_STRICT", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite tests/golden/**/*.expected.json from the current mappings",
    )


def postgres_disabled() -> bool:
    return os.environ.get("FHIR_KAT_TEST_POSTGRES", "").lower() == "off"


@pytest.fixture(scope="session")
def postgres_url(worker_id: str) -> Iterator[str]:
    """A PostgreSQL database of this worker's own, created fresh for the session."""
    if postgres_disabled():
        pytest.skip("FHIR_KAT_TEST_POSTGRES=off")
    admin_url = os.environ.get("FHIR_KAT_TEST_POSTGRES_URL", PG_DEFAULT)
    # Unique per process: two test runs on one machine (or one PostgreSQL) never collide.
    name = f"fhir_kat_test_{worker_id}_{os.getpid()}".replace("-", "_")
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
    empty_postgres(url)
    yield url


def empty_postgres(url: str) -> None:
    """Every table of the store created and emptied (one database per worker, reused)."""
    engine = create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


class FakeClock:
    """A settable clock so versions and lastUpdated are predictable in tests."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 15, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


# Synthetic organisations the test clients act for.
HA_ORG = "https://fhir-kat.example.org/fhir/sid/organization|HA-ISLAND"
CLINIC_ORG = "https://fhir-kat.example.org/fhir/sid/organization|CLINIC-7"
OTHER_CLINIC_ORG = "https://fhir-kat.example.org/fhir/sid/organization|CLINIC-8"
FAST_HASH = 1000  # PBKDF2 rounds for test secrets only; production hashes use the default


def _registration(role: str, scopes: list[str], secret: str, **extra: Any) -> dict[str, Any]:
    return {
        "role": role,
        "scopes": scopes,
        "secret_hash": hash_secret(secret, iterations=FAST_HASH),
        **extra,
    }


TEST_CLIENTS: dict[str, dict[str, Any]] = {
    "staff": _registration("program-staff", ["system/*.cruds"], "staff-secret"),
    "admin": _registration("admin", ["system/*.rs"], "admin-secret"),
    "ha": _registration("health-authority", ["system/*.rs"], "ha-secret", organization=HA_ORG),
    "referrer": _registration(
        "referrer", ["system/*.cruds"], "referrer-secret", organization=CLINIC_ORG
    ),
    "other-referrer": _registration(
        "referrer", ["system/*.cruds"], "other-secret", organization=OTHER_CLINIC_ORG
    ),
    "staff-readonly": _registration("program-staff", ["system/Patient.rs"], "ro-secret"),
}

#: HL7 v2 senders (``fhir-kat mllp``, tests/test_v2_mllp.py): each writes as a test client.
TEST_V2_SENDERS: dict[str, dict[str, Any]] = {
    "clinic7-emr": {
        "client": "referrer",
        "sending_application": "OSCAR",
        "sending_facility": "CLINIC7",
        "addresses": ["127.0.0.1"],
        "organization_name": "Example Family Practice",
        "timezone": "America/Vancouver",
    },
    "clinic8-emr": {
        "client": "other-referrer",
        "sending_application": "OTHEREMR",
        "sending_facility": "CLINIC8",
        "addresses": ["127.0.0.1"],
        "organization_name": "Other Family Practice",
        "timezone": "America/Vancouver",
    },
    # Registered, but for another network (documentation range): loopback is not it.
    "clinic7-remote": {
        "client": "referrer",
        "sending_application": "REMOTE",
        "sending_facility": "CLINIC7",
        "addresses": ["192.0.2.0/24"],
        "organization_name": "Example Family Practice",
    },
}


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    base = load_settings(
        {}, database_url=database_url, data_dir=str(tmp_path / "var"), pipeline_strict=True
    )
    return replace(base, extra={"clients": TEST_CLIENTS, "v2_senders": TEST_V2_SENDERS})


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    application = create_app(settings)
    yield application
    application.extensions["fhir_kat"].export.shutdown()
    application.extensions["fhir_kat"].store.dispose()


def token_for(app: Flask, client_id: str) -> str:
    """An access token as /auth/token would issue it (tests of the endpoint itself use HTTP)."""
    state = app.extensions["fhir_kat"]
    client = state.clients.get(client_id)
    token, _ = state.tokens.issue(client, client.scopes)
    return str(token)


def client_as(app: Flask, client_id: str | None) -> FlaskClient:
    test_client = app.test_client()
    if client_id:
        test_client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app, client_id)}"
    return test_client


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client acting as program staff (most tests); see ``client_as`` for other roles."""
    return client_as(app, "staff")


class LiveServer:
    def __init__(self, app: Flask) -> None:
        self.app = app
        self.token = token_for(app, "staff")
        self.headers = {"Authorization": f"Bearer {self.token}"}
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
