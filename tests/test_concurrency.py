"""Concurrent writers against a live server, on SQLite and PostgreSQL: exactly one If-Match
update wins, and parallel conditional creates produce one resource."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from tests.conftest import LiveServer

HEADERS = {"Content-Type": "application/fhir+json"}
WRITERS = 8


def _race(n: int, task: Any) -> list[Any]:
    barrier = threading.Barrier(n, timeout=30)

    def run(i: int) -> Any:
        barrier.wait()
        return task(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def test_if_match_exactly_one_writer_wins(live_server: LiveServer) -> None:
    base = live_server.url + "/fhir"
    headers = {**HEADERS, **live_server.headers}
    created = requests.post(
        f"{base}/Patient",
        json={"resourceType": "Patient", "gender": "female"},
        headers=headers,
        timeout=30,
    ).json()
    pid = created["id"]

    def update(i: int) -> int:
        body = dict(created, birthDate=f"19{50 + i}-01-01")
        r = requests.put(
            f"{base}/Patient/{pid}", json=body, headers={**headers, "If-Match": 'W/"1"'}, timeout=30
        )
        return r.status_code

    statuses = _race(WRITERS, update)
    assert sorted(statuses).count(200) == 1, statuses
    assert all(s in (200, 409, 412) for s in statuses), statuses
    final = requests.get(f"{base}/Patient/{pid}", headers=headers, timeout=30).json()
    assert final["meta"]["versionId"] == "2"


def test_parallel_conditional_creates_make_one_resource(live_server: LiveServer) -> None:
    base = live_server.url + "/fhir"
    headers = {**HEADERS, **live_server.headers}
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test:phn", "value": "9999"}],
    }

    def create(_: int) -> tuple[int, str]:
        r = requests.post(
            f"{base}/Patient",
            json=body,
            headers={**headers, "If-None-Exist": "identifier=urn:test:phn|9999"},
            timeout=30,
        )
        return r.status_code, r.json()["id"]

    results = _race(WRITERS, create)
    assert [s for s, _ in results].count(201) == 1, results
    assert {rid for _, rid in results} == {results[0][1]}
    found = requests.get(
        f"{base}/Patient?identifier=urn:test:phn|9999", headers=headers, timeout=30
    ).json()
    assert found["total"] == 1
