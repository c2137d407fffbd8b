"""Ingest over HTTP: the service under gunicorn on loopback, 1/8/32 concurrent clients posting
artifacts (a new referral each time: new source id, referral id and PHN) and FHIR transaction
Bundles (a Patient and an Observation), vs a trivial Flask endpoint under the same gunicorn
setup (the framework ceiling, ``bench.ceiling``).

The load generator runs in separate processes (threads inside each, one keep-alive session
per client) so it is not the bottleneck of the ceiling; on a 2-core machine client and server
still share the CPU, which caps every figure here alike.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from fhir_kat.artifacts.schemas import bc_phn_check_digit
from fhir_kat.security.secrets import hash_secret

ROOT = Path(__file__).resolve().parents[1]
WORKERS, THREADS = 2, 4
#: Seconds of unmeasured load (4 clients) before each target's measurements: every worker
#: process and thread has then served requests of that kind (a worker's first artifact loads
#: the R4B model classes, mappings and terminology, which a short window would count).
WARM_UP = 2.0
SECRET = "bench-secret"  # noqa: S105 - a throwaway client of a throwaway server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def gunicorn(app: str, env: dict[str, str]) -> Iterator[str]:
    """``app`` under gunicorn (WORKERS processes x THREADS threads) on a free loopback port."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(WORKERS),
            "--threads",
            str(THREADS),
            "--timeout",
            "120",
            "--bind",
            f"127.0.0.1:{port}",
            app,
        ],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # bounded: about 60 s on a loaded machine
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise RuntimeError("gunicorn did not start: " + proc.stderr.read().decode()[-2000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()


def service_env(database_url: str, tmp: Path) -> dict[str, str]:
    config = tmp / "kat.toml"
    config.write_text(
        '[clients.bench]\nrole = "program-staff"\nscopes = ["system/*.cruds"]\n'
        f'secret_hash = "{hash_secret(SECRET, iterations=1000)}"\n'
    )
    return {
        "FHIR_KAT_DATABASE_URL": database_url,
        "FHIR_KAT_CONFIG": str(config),
        "FHIR_KAT_DATA_DIR": str(tmp / "var"),
        "FHIR_KAT_LOG_LEVEL": "WARNING",
        "FHIR_KAT_RATE_LIMIT_PER_MINUTE": "0",
        "FHIR_KAT_ALLOW_HOST_DERIVED_URLS": "1",  # loopback, port chosen later
    }


def _phn(n: int) -> str:
    """A valid synthetic BC PHN (9 + 8 digits + check digit), distinct per ``n``."""
    while True:
        first = f"9{n % 10**8:08d}"
        check = bc_phn_check_digit(first)
        if check is not None:
            return first + str(check)
        n += 1_000_003


_REFERRAL = json.loads((ROOT / "docs" / "examples" / "referrals.json").read_text())


def artifact(n: int) -> tuple[str, bytes]:
    body = copy.deepcopy(_REFERRAL)
    body["source_id"] = f"BENCH-{n}"
    body["referral_identifier"]["value"] = f"R-BENCH-{n}"
    # ``n // 10**8`` tells the load processes apart: their offsets differ by multiples of
    # 10**8, which ``n * 7919`` alone maps to the same PHNs (concurrent referrals of one
    # patient: some 409s, and not the new-patient path this measures).
    body["patient"]["phn"] = _phn(n * 7919 + n // 10**8)
    return "/api/v1/referrals", json.dumps(body).encode()


def transaction(n: int) -> tuple[str, bytes]:
    patient = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient,
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:bench", "value": str(n)}],
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
                    "subject": {"reference": patient},
                    "effectiveDateTime": "2026-02-01T10:00:00Z",
                    "valueQuantity": {"value": 12},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    return "/fhir", json.dumps(bundle).encode()


def ceiling(n: int) -> tuple[str, bytes]:
    return "/echo", artifact(n)[1]


def _observation(n: int, i: int, shape: str) -> dict[str, object]:
    """A heart rate with a business identifier unique to (``shape``, request ``n``, entry
    ``i``)."""
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:bench:obs", "value": f"{shape}-{n}-{i}"}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        # One patient per request: a per-patient hook never grows with the run.
        "subject": {"reference": f"Patient/bench-{n}"},
        "effectiveDateTime": "2026-02-01T10:00:00Z",
        "valueQuantity": {
            "value": 60 + i % 40,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def observation(n: int) -> tuple[str, bytes]:
    """A single ``POST /fhir/Observation``."""
    return "/fhir/Observation", json.dumps(_observation(n, 0, "s")).encode()


#: Entries of the 100-entry transactions (issue 20's shapes).
TX_ENTRIES = 100


def transaction_100(n: int) -> tuple[str, bytes]:
    """A transaction of 100 plain Observation creates."""
    entries = [
        {"resource": _observation(n, i, "t"), "request": {"method": "POST", "url": "Observation"}}
        for i in range(TX_ENTRIES)
    ]
    return "/fhir", json.dumps(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    ).encode()


def conditional_100(n: int) -> tuple[str, bytes]:
    """A transaction of 100 Observations, each a conditional create on its identifier (the
    shape idempotent loaders and partner deliveries send); new identifiers: each creates."""
    entries = [
        {
            "resource": _observation(n, i, "c"),
            "request": {
                "method": "POST",
                "url": "Observation",
                "ifNoneExist": f"identifier=urn:bench:obs|c-{n}-{i}",
            },
        }
        for i in range(TX_ENTRIES)
    ]
    return "/fhir", json.dumps(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    ).encode()


BODIES = {
    "artifact": artifact,
    "transaction": transaction,
    "ceiling": ceiling,
    "observation": observation,
    "transaction-100": transaction_100,
    "conditional-100": conditional_100,
}


def _client_process(args: tuple[str, str, str, int, float, int]) -> tuple[int, int, list[float]]:
    """One load-generator process: ``threads`` clients posting until ``seconds`` pass."""
    url, kind, token, threads, seconds, offset = args
    content_type = (
        "application/json" if kind in ("artifact", "ceiling") else "application/fhir+json"
    )
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        session = requests.Session()
        n = offset + index * 1_000_000
        mine: list[float] = []
        bad = 0
        while time.perf_counter() < deadline:
            path, body = BODIES[kind](n)
            n += 1
            start = time.perf_counter()
            try:
                r = session.post(url + path, data=body, headers=headers, timeout=60)
                ok = r.status_code < 300
            except requests.RequestException:
                ok = False
            if ok:
                mine.append(time.perf_counter() - start)
            else:
                bad += 1
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return len(latencies), errors[0], latencies


def load(
    url: str, kind: str, token: str, clients: int, seconds: float, offset: int
) -> dict[str, float]:
    processes = min(clients, 4)
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    jobs = [(url, kind, token, per[i], seconds, offset + i * 100_000_000) for i in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        results = pool.map(_client_process, jobs)
    latencies = sorted(x for _, _, lat in results for x in lat)
    errors = sum(e for _, e, _ in results)
    if not latencies:  # every request refused: no latency to report
        nan = float("nan")
        return {"rps": 0.0, "p50": nan, "p95": nan, "p99": nan, "errors": errors}
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {
        "rps": len(latencies) / seconds,
        "p50": statistics.median(latencies) * 1000,
        "p95": q[94] * 1000,
        "p99": q[98] * 1000,
        "errors": errors,
    }


def token(url: str) -> str:
    r = requests.post(
        f"{url}/auth/token",
        auth=("bench", SECRET),
        data={"grant_type": "client_credentials"},
        timeout=30,
    )
    r.raise_for_status()
    return str(r.json()["access_token"])


def run(database_urls: dict[str, str], concurrency: list[int], seconds: float) -> list[str]:
    """One table: requests/s and latency per (target, clients), and the share of the ceiling.
    Access tokens live 300 s, so each measurement fetches a fresh one."""
    rows = [
        "| target | clients | requests/s | p50 / p95 / p99 (ms) | errors | share of ceiling |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ceilings: dict[int, float] = {}
    with gunicorn("bench.ceiling:app", {}) as url:
        load(url, "ceiling", "", 4, WARM_UP, 0)
        for c in concurrency:
            r = load(url, "ceiling", "", c, seconds, 0)
            ceilings[c] = r["rps"]
            rows.append(_row("Flask ceiling (parse JSON, answer 201)", c, r, 1.0))
    offset = 1
    for name, database_url in database_urls.items():
        with (
            tempfile.TemporaryDirectory() as tmp,
            gunicorn("fhir_kat.wsgi:app", service_env(database_url, Path(tmp))) as url,
        ):
            for kind in ("artifact", "transaction"):
                offset += 1
                load(url, kind, token(url), 4, WARM_UP, offset * 10**9)
                for c in concurrency:
                    offset += 1
                    r = load(url, kind, token(url), c, seconds, offset * 10**9)
                    what = "referral artifact" if kind == "artifact" else "transaction (2 entries)"
                    label = f"{name}: {what}"
                    rows.append(_row(label, c, r, r["rps"] / ceilings[c]))
    return rows


def _row(label: str, clients: int, r: dict[str, float], share: float) -> str:
    return (
        f"| {label} | {clients} | {r['rps']:,.0f} | {r['p50']:.1f} / {r['p95']:.1f} / "
        f"{r['p99']:.1f} | {r['errors']:.0f} | {share:.0%} |"
    )
