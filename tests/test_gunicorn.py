"""Several service processes (gunicorn workers) share one PostgreSQL safely: parallel
conditional creates through different processes still produce one resource, and If-Match
updates still let exactly one writer win."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from fhir_kat.security.secrets import hash_secret

WORKERS = 2
REQUESTS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gunicorn_url(postgres_url: str, tmp_path: Path) -> str:
    from sqlalchemy import create_engine, text

    from fhir_kat.store.schema import metadata

    engine = create_engine(postgres_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    config = tmp_path / "kat.toml"
    config.write_text(
        '[clients.staff]\nrole = "program-staff"\nscopes = ["system/*.cruds"]\n'
        f'secret_hash = "{hash_secret("gunicorn-secret", iterations=1000)}"\n'
    )
    port = _free_port()
    env = {
        **os.environ,
        "FHIR_KAT_DATABASE_URL": postgres_url,
        "FHIR_KAT_CONFIG": str(config),
        "FHIR_KAT_DATA_DIR": str(tmp_path / "var"),
        "FHIR_KAT_LOG_LEVEL": "WARNING",
        "FHIR_KAT_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}/fhir",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(WORKERS),
            "--timeout",
            "120",  # a loaded CI machine boots workers slowly: do not kill them
            "--threads",
            "4",
            "--bind",
            f"127.0.0.1:{port}",
            "fhir_kat.wsgi:app",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):  # bounded: about 30 s
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            raise AssertionError("gunicorn did not start: " + proc.stderr.read().decode()[-2000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()


def test_processes_share_postgresql_safely(gunicorn_url: str) -> None:
    token = requests.post(
        f"{gunicorn_url}/auth/token",
        auth=("staff", "gunicorn-secret"),
        data={"grant_type": "client_credentials"},
        timeout=10,
    ).json()
    headers = {
        "Authorization": f"Bearer {token['access_token']}",
        "Content-Type": "application/fhir+json",
    }
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:g", "value": "1"}]}

    def create(_: int) -> tuple[int, str]:
        r = requests.post(
            f"{gunicorn_url}/fhir/Patient",
            json=body,
            timeout=30,
            headers={**headers, "If-None-Exist": "identifier=urn:g|1"},
        )
        return r.status_code, r.json()["id"]

    with ThreadPoolExecutor(REQUESTS) as pool:
        results = list(pool.map(create, range(REQUESTS)))
    assert [s for s, _ in results].count(201) == 1, results
    assert len({rid for _, rid in results}) == 1
    pid = results[0][1]
    current = requests.get(f"{gunicorn_url}/fhir/Patient/{pid}", headers=headers, timeout=10)

    def update(i: int) -> int:
        r = requests.put(
            f"{gunicorn_url}/fhir/Patient/{pid}",
            timeout=30,
            json=dict(current.json(), gender="other"),
            headers={**headers, "If-Match": current.headers["ETag"]},
        )
        return r.status_code

    with ThreadPoolExecutor(REQUESTS) as pool:
        statuses = list(pool.map(update, range(REQUESTS)))
    assert statuses.count(200) == 1 and set(statuses) <= {200, 409, 412}, statuses
