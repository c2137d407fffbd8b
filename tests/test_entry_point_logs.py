"""No PHI in logs, on every way the README starts the service: ``python server.py``,
``./run.sh serve``, ``fhir-kat serve`` and gunicorn on ``fhir_kat.wsgi:app`` (docs/deployment.md)
are started for real, sent recognisable synthetic PHI in query strings, paths, headers, a
malformed request line and a body, and their stderr is searched for it."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from flask import Flask

from fhir_kat.logging import configure_logging

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Synthetic, recognisable values a log must never hold.
PHI = ("Bartholomew", "Quixotica", "9123456782", "1961-04-12", "Larkspur")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _commands(port: int) -> dict[str, list[str]]:
    where = ["--host", "127.0.0.1", "--port", str(port)]
    return {
        "server.py": [sys.executable, "server.py", *where],
        "run.sh serve": ["./run.sh", "serve", *where],
        "fhir-kat serve": [str(BIN / "fhir-kat"), "serve", *where],
        "gunicorn": [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            "1",
            "--bind",
            f"127.0.0.1:{port}",
            "fhir_kat.wsgi:app",
        ],
    }


def _raw(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (TimeoutError, ConnectionResetError):
            pass


def _exercise(base: str, port: int) -> None:
    name, family, phn, birth, street = PHI
    headers = {"X-Request-Id": f"{name} {family} {birth}"}
    query = f"name={name}&family={family}&identifier=https://example.org/phn|{phn}"
    requests.get(f"{base}/fhir/Patient?{query}&birthdate={birth}", headers=headers, timeout=10)
    requests.get(f"{base}/fhir/Patient/{phn}?address={street}", timeout=10)
    requests.get(f"{base}/app/login?next=/app/referrals/{phn}", timeout=10)
    requests.post(
        f"{base}/auth/token",
        data={"grant_type": "client_credentials", "client_id": name, "client_secret": family},
        timeout=10,
    )
    requests.post(
        f"{base}/fhir/Patient",
        data=f'{{"resourceType": "Patient", "name": [{{"family": "{family}"',
        headers={"Content-Type": "application/fhir+json"},
        timeout=10,
    )
    _raw(port, f"GET /fhir/Patient?name={name} HTTP/1.1 {family}\r\n\r\n".encode())
    _raw(
        port, f"GET /fhir/Patient?identifier={phn} HTTP/1.1\r\nHost: x\r\n{street}\r\n\r\n".encode()
    )
    _raw(port, f"GET /fhir/Patient?name={name}%00 HTTP/7.9\r\n\r\n".encode())


@pytest.mark.parametrize("entry", ["server.py", "run.sh serve", "fhir-kat serve", "gunicorn"])
def test_no_phi_reaches_the_log_of_any_entry_point(entry: str, tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_KAT_")}
    env.update(
        FHIR_KAT_DATA_DIR=str(tmp_path / "var"),
        FHIR_KAT_LOG_LEVEL="DEBUG",  # the most talkative setting still holds no PHI
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    if entry == "gunicorn":  # the WSGI app needs it; `serve` on loopback (the quick start) not
        env["FHIR_KAT_PUBLIC_BASE_URL"] = f"{base}/fhir"
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            _commands(port)[entry], cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, stderr.read_text()[-2000:]
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"{entry} did not start"
            time.sleep(0.2)
        _exercise(base, port)
        time.sleep(0.5)  # let the last lines reach the file
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    text = stderr.read_text()
    leaked = [value for value in PHI if value in text]
    assert not leaked, f"{entry} logged {leaked}:\n{text[-3000:]}"
    # two-sided: the service's own request log is there, with route patterns only
    assert '"route": "/fhir/<rtype>"' in text and '"event": "request"' in text


def test_server_log_lines_keep_their_first_words_only(caplog: pytest.LogCaptureFixture) -> None:
    configure_logging("INFO")
    error, access = logging.getLogger("gunicorn.error"), logging.getLogger("gunicorn.access")
    with caplog.at_level(logging.INFO):
        error.warning("Invalid request from ip=10.0.0.1: Invalid HTTP Header: 'Larkspur Way'")
        error.exception("Error handling request /fhir/Patient?name=Bartholomew")
        error.info("Booting worker with pid: %s", 42)
        access.info('127.0.0.1 "GET /fhir/Patient?identifier=9123456782 HTTP/1.1" 200')
    assert [r.getMessage() for r in caplog.records] == [
        "Invalid request from ip=10.0.0.1: Invalid HTTP Header",
        "Error handling request",
        "Booting worker with pid: 42",
    ]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("req-2026.11_abc", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("Bartholomew Quixotica", False),
        ("id;X-Injected=1", False),
        ("ünïcode", False),
        ("", False),
    ],
)
def test_a_client_request_id_is_kept_only_in_a_safe_form(app: Flask, sent: str, kept: bool) -> None:
    answer = app.test_client().get("/healthz", headers={"X-Request-Id": sent} if sent else {})
    echoed = answer.headers["X-Request-Id"]
    if kept:
        assert echoed == sent
    else:
        assert echoed != sent and str(uuid.UUID(echoed)) == echoed
