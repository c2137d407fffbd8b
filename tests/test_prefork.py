"""Loading before forking (issue 25, fhir_kat/prefork.py): a child forked from a loaded app
renews its database pool, SQLite writer queue and export threads and works beside its parent;
gunicorn ``--preload`` serves the write paths from several workers on SQLite and PostgreSQL.
The memory it saves is measured in bench/prefork_memory.py, not asserted here."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from bench.ingest_inprocess import bodies
from fhir_kat.prefork import fork_safe, warm
from fhir_kat.security.secrets import hash_secret
from tests.conftest import client_as

ROOT = Path(__file__).resolve().parents[1]


def _task_count(app: Flask) -> int:
    r = client_as(app, "staff").get("/fhir/Task?code=fulfill&_summary=count")
    assert r.status_code == 200
    return int(r.get_json()["total"])


def test_a_forked_child_renews_what_it_must_not_share(app: Flask) -> None:
    assert warm() > 10  # every artifact kind's resources mapped and validated
    staff = client_as(app, "staff")
    assert staff.post("/api/v1/referrals", json=bodies(1)["referrals"]).status_code == 201
    store = app.extensions["fhir_kat"].store
    export = app.extensions["fhir_kat"].export
    parent_executor = export.executor
    fork_safe(app)
    try:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            code = 1
            try:
                renewed = (
                    store.engine.pool.checkedin() == 0
                    and export.executor is not parent_executor
                    and (store._writer is None or store._writer._fd is None)
                )
                child = client_as(app, "staff")
                wrote = child.post("/api/v1/referrals", json=bodies(2)["referrals"])
                code = 0 if renewed and wrote.status_code == 201 else 2
            finally:
                os._exit(code)
        # The parent writes at the same time, on its own connections.
        assert staff.post("/api/v1/referrals", json=bodies(3)["referrals"]).status_code == 201
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        gc.unfreeze()
    assert _task_count(app) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def preloaded(database_url: str, tmp_path: Path) -> Iterator[str]:
    """The service under ``gunicorn --preload`` with two workers."""
    config = tmp_path / "kat.toml"
    config.write_text(
        '[clients.staff]\nrole = "program-staff"\nscopes = ["system/*.cruds"]\n'
        f'secret_hash = "{hash_secret("prefork-secret", iterations=1000)}"\n'
    )
    port = _free_port()
    env = {
        **os.environ,
        "FHIR_KAT_DATABASE_URL": database_url,
        "FHIR_KAT_CONFIG": str(config),
        "FHIR_KAT_DATA_DIR": str(tmp_path / "var"),
        "FHIR_KAT_LOG_LEVEL": "WARNING",
        "FHIR_KAT_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}/fhir",
    }
    log_file = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "--workers",
            "2",
            "--threads",
            "4",
            "--timeout",
            "120",
            "--bind",
            f"127.0.0.1:{port}",
            "fhir_kat.wsgi:app",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # bounded: about 60 s (the parent warms before forking)
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            log = (tmp_path / "gunicorn.log").read_text()[-2000:]
            raise AssertionError(f"gunicorn did not start: {log}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
        print((tmp_path / "gunicorn.log").read_text()[-6000:])


def test_preloaded_workers_share_the_database_safely(preloaded: str) -> None:
    token = requests.post(
        f"{preloaded}/auth/token",
        auth=("staff", "prefork-secret"),
        data={"grant_type": "client_credentials"},
        timeout=10,
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def referral(n: int) -> int:
        body: dict[str, Any] = bodies(n)["referrals"]
        r = requests.post(
            f"{preloaded}/api/v1/referrals", data=json.dumps(body), headers=headers, timeout=60
        )
        return r.status_code

    # The first alone: it creates what every referral shares (the referrer's Organization,
    # Practitioner…), which concurrent first writers would race for (409, by design).
    assert referral(0) == 201
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(referral, range(1, 16)))
    assert statuses == [201] * 15
    # One conditional create wins across the workers.
    fhir = {**headers, "Content-Type": "application/fhir+json"}
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:p", "value": "1"}]}

    def create(_: int) -> int:
        r = requests.post(
            f"{preloaded}/fhir/Patient",
            json=body,
            headers={**fhir, "If-None-Exist": "identifier=urn:p|1"},
            timeout=60,
        )
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(create, range(8)))
    assert created.count(201) == 1 and set(created) <= {200, 201}, created
    count = f"{preloaded}/fhir/Task?code=fulfill&_summary=count"
    found = requests.get(count, headers=fhir, timeout=30)
    assert found.json()["total"] == 16
