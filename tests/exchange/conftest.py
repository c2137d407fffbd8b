"""Fixtures for the exchange tests: a store on both backends with a settable clock, partner
keys generated per session, partner configurations, and a real FHIR partner (SEKMET) on
loopback, installed into its own virtual environment."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_kat.exchange import outbox as _outbox  # noqa: F401  registers the outbox table
from fhir_kat.exchange.partners import PartnerConfig, parse_partners
from fhir_kat.store import Store

SEKMET_VERSION = "0.1.1"
CACHE = Path(os.environ.get("FHIR_KAT_CACHE", Path.home() / ".cache" / "fhir_kat"))
SEKMET_VENV = CACHE / "sekmet-venv"
REPO = Path(__file__).resolve().parents[2]


class ManualClock:
    """Aware-UTC time that moves only when a test says so."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(database_url: str, clock: ManualClock) -> Iterator[Store]:
    s = Store(database_url, clock=clock)
    s.create_schema()
    yield s
    s.dispose()


@pytest.fixture
def real_store(database_url: str) -> Iterator[Store]:
    """A store on the wall clock (for tests with real processes and servers)."""
    s = Store(database_url)
    s.create_schema()
    yield s
    s.dispose()


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def exchange_log() -> Iterator[list[logging.LogRecord]]:
    """Records of ``fhir_kat.exchange`` loggers, captured directly: the app's JSON logging stops
    propagation to the root logger, so ``caplog`` would see nothing after an app test."""
    logger = logging.getLogger("fhir_kat.exchange")
    handler, level = _ListHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


# ---------------------------------------------------------------------------- keys


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def key_files(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> dict[str, Path]:
    out = {}
    for alg, key in (("RS384", rsa_key), ("ES384", ec_key)):
        path = tmp_path / f"{alg.lower()}.pem"
        path.write_bytes(_pem(key))
        out[alg] = path
    return out


# ---------------------------------------------------------------------------- partners

BASE = "https://ehr.example.test/fhir"
TOKEN_URL = "https://ehr.example.test/oauth/token"


def make_partner(name: str = "ehr", **table: Any) -> PartnerConfig:
    raw = {"base_url": BASE, **table}
    return parse_partners({name: raw}, environ={"EHR_SECRET": "s3cret"})[name]


# ---------------------------------------------------------------------------- synthetic data

PID_SYSTEM = "https://fhir-kat.example.org/fhir/sid/participant"
OBS_SYSTEM = "https://fhir-kat.example.org/fhir/sid/observation"


def artifact(n: int, observations: int = 2) -> dict[str, Any]:
    """A synthetic artifact Bundle: a Patient and PHQ-9 total Observations referencing it,
    with our deterministic ids and business identifiers."""
    pid = f"pt-{n:04d}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"https://kat.example.org/fhir/Patient/{pid}",
            "resource": {
                "resourceType": "Patient",
                "id": pid,
                "identifier": [{"system": PID_SYSTEM, "value": f"P{n:04d}"}],
                "gender": "female" if n % 2 else "male",
                "birthDate": f"19{60 + n % 40}-0{1 + n % 9}-1{n % 10}",
            },
        }
    ]
    for k in range(observations):
        oid = f"obs-{n:04d}-{k}"
        entries.append(
            {
                "fullUrl": f"https://kat.example.org/fhir/Observation/{oid}",
                "resource": {
                    "resourceType": "Observation",
                    "id": oid,
                    "identifier": [{"system": OBS_SYSTEM, "value": f"O{n:04d}-{k}"}],
                    "status": "final",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "survey",
                                }
                            ]
                        }
                    ],
                    "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
                    "subject": {"reference": f"Patient/{pid}"},
                    "effectiveDateTime": f"2026-02-{10 + k:02d}T10:00:00Z",
                    "valueInteger": (n + 3 * k) % 28,
                },
            }
        )
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


# ---------------------------------------------------------------------------- SEKMET partner


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def sekmet_bin() -> Path:
    """``sekmet`` from its own virtual environment (created once, reused; never skipped)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp = SEKMET_VENV / f".installed-{SEKMET_VERSION}"
    with open(CACHE / "sekmet-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers: one installs, the other waits
        if not stamp.exists():
            # Built in place (venvs are not relocatable); the stamp marks it complete.
            shutil.rmtree(SEKMET_VENV, ignore_errors=True)
            try:
                subprocess.run(
                    [sys.executable, "-m", "venv", str(SEKMET_VENV)],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                subprocess.run(
                    [
                        str(SEKMET_VENV / "bin" / "pip"),
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        f"sekmet-fhir=={SEKMET_VERSION}",
                    ],
                    check=True,
                    capture_output=True,
                    timeout=600,
                )
            except (subprocess.SubprocessError, OSError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                shutil.rmtree(SEKMET_VENV, ignore_errors=True)
                pytest.fail(
                    f"cannot install sekmet-fhir=={SEKMET_VERSION} into {SEKMET_VENV}: {exc}\n"
                    + detail.decode(errors="replace")[-2000:]
                )
            stamp.touch()
    binary = SEKMET_VENV / "bin" / "sekmet"
    if not binary.exists():
        pytest.fail(f"{binary} is missing; delete {SEKMET_VENV} to reinstall")
    return binary


class SekmetServer:
    """SEKMET's FHIR R4 server on 127.0.0.1, stoppable and restartable on the same port and
    database (to play a partner that goes down and comes back)."""

    def __init__(self, binary: Path, workdir: Path, extra_yaml: str = "") -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.root}/fhir"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "settings.yaml"
        self.config.write_text(
            f"base_url: {self.base}\n"
            "host: 127.0.0.1\n"
            f"port: {self.port}\n"
            f"data_dir: {workdir / 'data'}\n"
            f"own_private_key_path: {workdir / 'keys' / 'own.pem'}\n"
            "log_inbound: false\n"
            "simulator:\n  enabled: false\n" + extra_yaml
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "sekmet.log"
        #: Sent with the test's own reads (a static bearer token when the server wants auth).
        self.read_headers: dict[str, str] = {}

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "serve",
                    "-c",
                    str(self.config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sekmet exited: {self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.base}/metadata", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"sekmet did not start in {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        # Strict handling: SEKMET ignores unknown search parameters otherwise, and a typo
        # would then "find" everything.
        r = requests.get(
            f"{self.base}/{path}",
            params=params,
            headers={
                "Prefer": "handling=strict",
                "Accept": "application/fhir+json",
                **self.read_headers,
            },
            timeout=30,
        )
        r.raise_for_status()
        doc: dict[str, Any] = r.json()
        return doc

    def search_all(self, rtype: str, **params: str) -> list[dict[str, Any]]:
        """Every match, following ``next`` links (bounded)."""
        out: list[dict[str, Any]] = []
        bundle = self.get(rtype, _count="200", **params)
        for _ in range(50):
            out += [
                e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"
            ]
            nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
            if not nxt:
                return out
            r = requests.get(
                nxt[0], headers={"Prefer": "handling=strict", **self.read_headers}, timeout=30
            )
            r.raise_for_status()
            bundle = r.json()
        raise AssertionError("more than 50 pages")


@pytest.fixture
def sekmet_factory(sekmet_bin: Path, tmp_path: Path) -> Iterator[Callable[..., SekmetServer]]:
    servers: list[SekmetServer] = []

    def make(extra_yaml: str = "", start: bool = True) -> SekmetServer:
        server = SekmetServer(sekmet_bin, tmp_path / f"sekmet{len(servers)}", extra_yaml)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def sekmet(sekmet_factory: Callable[..., SekmetServer]) -> SekmetServer:
    return sekmet_factory()


def worker_env(database_url: str, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_KAT_")}
    # The bases the suite writes under (tests/conftest.py): a worker under others is refused
    # by the database, as the server would be (ADR 0021).
    for name in ("FHIR_KAT_CANONICAL_BASE", "FHIR_KAT_IDENTIFIER_BASE"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(
        FHIR_KAT_DATABASE_URL=database_url,
        FHIR_KAT_CONFIG=str(config),
        FHIR_KAT_LOG_LEVEL="INFO",
        PYTHONPATH=str(REPO),
    )
    return env


def spawn_worker(database_url: str, config: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m fhir_kat.exchange.worker`` (what ``fhir-kat worker`` will run)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fhir_kat.exchange.worker", *args],
            env=worker_env(database_url, config),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------------------- loopback partners


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client killed mid-request is part of these tests, not an error


class LoopbackPartner:
    """A minimal HTTP partner on 127.0.0.1. Without ``upstream`` it answers every transaction
    itself (counting each Patient identifier it receives); with ``upstream`` it forwards to a
    real server and can hold the ``hold_request``-th answer back until ``release`` is set (the
    partner has committed, the sender has not heard: the window a crash must survive)."""

    def __init__(
        self, upstream: str | None = None, hold_request: int | None = None, delay: float = 0.0
    ) -> None:
        self.upstream = upstream
        self.hold_request = hold_request
        self.delay = delay
        self.lock = threading.Lock()
        self.requests = 0
        self.received: Counter[str] = Counter()
        self.committed = threading.Event()
        self.release = threading.Event()
        self.held_delivery: int | None = None
        partner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, answer = partner._answer(self.path, self.headers, body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the sender is gone

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _answer(self, path: str, headers: Any, body: bytes) -> tuple[int, bytes]:
        with self.lock:
            self.requests += 1
            number = self.requests
        if self.upstream is not None:
            forward = {k: headers[k] for k in ("Content-Type", "Accept", "Prefer") if k in headers}
            r = requests.post(
                self.upstream + path.removeprefix("/fhir"), data=body, headers=forward, timeout=30
            )
            if number == self.hold_request:
                request_id = headers.get("X-Request-ID", "")  # fhir-kat-delivery-<id>-<nonce>
                self.held_delivery = int(request_id.split("-")[3])
                self.committed.set()
                self.release.wait(timeout=60)
            return r.status_code, r.content
        sent = json.loads(body)
        with self.lock:
            for entry in sent["entry"]:
                res = entry["resource"]
                if res["resourceType"] == "Patient":
                    self.received[res["identifier"][0]["value"]] += 1
        time.sleep(self.delay)
        reply = {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [
                {"response": {"status": "201 Created", "location": f"{e['request']['url']}/{i}"}}
                for i, e in enumerate(sent["entry"])
            ],
        }
        return 200, json.dumps(reply).encode()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def loopback_partner() -> Iterator[Callable[..., LoopbackPartner]]:
    made: list[LoopbackPartner] = []

    def make(**kw: Any) -> LoopbackPartner:
        made.append(LoopbackPartner(**kw))
        return made[-1]

    yield make
    for partner in made:
        partner.close()


class Workers:
    """Worker processes started by a test, killed in the finaliser whatever happened."""

    def __init__(self, database_url: str, config: Path, logs: Path) -> None:
        self.database_url, self.config, self.logs = database_url, config, logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        proc = spawn_worker(self.database_url, self.config, log, "--worker-id", name, *args)
        self.procs.append(proc)
        wait_for(
            lambda: "worker started" in log.read_text() or proc.poll() is not None,
            60,
            f"worker {name} to start",
        )
        if proc.poll() is not None:
            raise AssertionError(f"worker {name} exited: {log.read_text()[-3000:]}")
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=30)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[Callable[[Path], Workers]]:
    made: list[Workers] = []

    def make(config: Path) -> Workers:
        made.append(Workers(database_url, config, tmp_path))
        return made[-1]

    yield make
    for w in made:
        w.kill_all()
