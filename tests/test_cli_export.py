"""``fhir-kat export``: the Bulk Data client against the service's own $export on a live
loopback server (kick-off, polling with Retry-After, download with the token), and its exit
codes for missing credentials, refused credentials, a refused export and an absent server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import responses

from fhir_kat.cli import main
from tests.conftest import LiveServer


def _seed(live: LiveServer, patients: int = 3) -> None:
    fhir = live.app.extensions["fhir_kat"].fhir
    for n in range(patients):
        fhir.update("Patient", f"exp-{n}", {"resourceType": "Patient", "id": f"exp-{n}"})
        fhir.create(
            "Observation",
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
                "subject": {"reference": f"Patient/exp-{n}"},
                "valueQuantity": {"value": 10 + n},
            },
        )


def _secret_file(tmp_path: Path, secret: str) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(secret + "\n")
    return path


def test_export_downloads_every_file(
    live_server: LiveServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _seed(live_server)
    monkeypatch.setenv("FHIR_KAT_CLIENT_ID", "staff")
    out = tmp_path / "out"
    code = main(
        [
            "export",
            "--url",
            f"{live_server.url}/fhir",
            "--client-secret-file",
            str(_secret_file(tmp_path, "staff-secret")),
            "--type",
            "Patient,Observation",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "export: complete" in captured.err
    patients = [json.loads(line) for line in (out / "Patient.ndjson").read_text().splitlines()]
    assert sorted(p["id"] for p in patients) == ["exp-0", "exp-1", "exp-2"]
    observations = (out / "Observation.ndjson").read_text().splitlines()
    assert len(observations) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Observation"}
    assert "Patient\t3\t" in captured.out and not list(out.glob("*.part"))
    # _since after everything: an empty export, still a success.
    later = tmp_path / "later"
    since = "2999-01-01T00:00:00Z"
    assert (
        main(
            [
                "export",
                "--url",
                f"{live_server.url}/fhir",
                "--since",
                since,
                "--out",
                str(later),
                "--client-secret-file",
                str(tmp_path / "secret.txt"),
            ]
        )
        == 0
    )
    assert json.loads((later / "manifest.json").read_text())["output"] == []


def test_export_exit_codes(
    live_server: LiveServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["export", "--url", f"{live_server.url}/fhir"]
    monkeypatch.delenv("FHIR_KAT_CLIENT_SECRET", raising=False)
    monkeypatch.delenv("FHIR_KAT_CLIENT_SECRET_FILE", raising=False)
    # No credentials at all: a configuration error, before any request.
    assert main([*base, "--client-id", "staff", "--out", str(tmp_path / "a")]) == 2
    # A wrong secret: the token endpoint refuses: configuration again.
    monkeypatch.setenv("FHIR_KAT_CLIENT_SECRET", "wrong")
    assert main([*base, "--client-id", "staff", "--out", str(tmp_path / "b")]) == 2
    assert "invalid_client" in capsys.readouterr().err
    # A client whose role may not export: the server refuses the kick-off (403) → 1.
    monkeypatch.setenv("FHIR_KAT_CLIENT_SECRET", "referrer-secret")
    assert main([*base, "--client-id", "referrer", "--out", str(tmp_path / "c")]) == 1
    assert "HTTP 403" in capsys.readouterr().err
    # A folder in the way.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    assert main([*base, "--client-id", "staff", "--out", str(tmp_path / "d")]) == 2
    # Nobody listening.
    live_server.server.shutdown()
    live_server.server.server_close()
    assert main([*base, "--client-id", "staff", "--out", str(tmp_path / "e")]) == 3


@responses.activate
def test_export_honours_retry_after_and_reports_a_failed_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Edge cases a live fhir_kat does not produce on demand: a long Retry-After (the client
    waits as told, within its budget) and a job that fails while running."""
    waits: list[float] = []
    monkeypatch.setattr("time.sleep", waits.append)
    base = "https://bulk.example.test/fhir"
    responses.get(f"{base}/.well-known/smart-configuration", status=404)
    responses.post("https://bulk.example.test/auth/token", json={"access_token": "t"})
    status = f"{base}/$export-status/1"
    responses.get(f"{base}/$export", status=202, headers={"Content-Location": status})
    progress: list[dict[str, Any]] = [
        {"status": 202, "headers": {"Retry-After": "7", "X-Progress": "1 of 2 types"}},
        {"status": 429, "headers": {"Retry-After": "3"}},
        {
            "status": 500,
            "json": {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "diagnostics": "disk full"}],
            },
        },
    ]
    for answer in progress:
        responses.get(status, **answer)
    monkeypatch.setenv("FHIR_KAT_CLIENT_SECRET", "s")
    code = main(["export", "--url", base, "--client-id", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert waits == [7.0, 3.0]
    assert "1 of 2 types" in err and "disk full" in err
    assert responses.calls[1].request.headers["Authorization"] == "Basic eDpz"
    assert responses.calls[2].request.headers["Prefer"] == "respond-async"
    assert responses.calls[2].request.headers["Authorization"] == "Bearer t"
