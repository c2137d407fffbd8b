"""``fhir-kat sandbox-check``: against the real SEKMET FHIR server on loopback (its
CapabilityStatement, a create → search → read → delete round trip) and, with ``responses``,
servers a live peer here cannot play (missing types, wrong FHIR version, no delete)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from fhir_kat.cli import main
from fhir_kat.exchange.sandbox import SANDBOX_SYSTEM
from tests.exchange.conftest import SekmetServer, free_port


def _configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str) -> None:
    config = tmp_path / "kat.toml"
    config.write_text(table)
    for name in ("FHIR_KAT_DATABASE_URL", "FHIR_KAT_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FHIR_KAT_CONFIG", str(config))


def test_sekmet_round_trip_passes_for_what_it_supports(
    sekmet: SekmetServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _configure(
        tmp_path,
        monkeypatch,
        f'[partners.sandbox]\nbase_url = "{sekmet.base}"\n'
        'artifact_kinds = ["referrals", "consents", "screenings"]\n',
    )
    assert main(["sandbox-check", "sandbox"]) == 0
    out = capsys.readouterr().out
    assert "PASS  fhir-version" in out and "FHIR 4.0.1" in out
    for check in ("type Task", "type ServiceRequest", "create", "search", "read", "cleanup"):
        assert f"PASS  {check} " in out, check
    assert out.rstrip().splitlines()[-1].startswith("PASS:")
    # The synthetic Patient is gone again (SEKMET allows delete).
    left = [
        p
        for p in sekmet.search_all("Patient")
        if any(i.get("system") == SANDBOX_SYSTEM for i in p.get("identifier", []))
    ]
    assert left == []


def test_sekmet_lacks_types_the_full_program_sends(
    sekmet: SekmetServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SEKMET 0.1.1 has no QuestionnaireResponse or AdverseEvent endpoint: a partner that
    takes every artifact kind fails the check, naming both."""
    _configure(tmp_path, monkeypatch, f'[partners.sandbox]\nbase_url = "{sekmet.base}"\n')
    assert main(["sandbox-check", "sandbox"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  type QuestionnaireResponse" in out and "FAIL  type AdverseEvent" in out
    assert "PASS  cleanup" in out  # the round trip still ran
    assert out.rstrip().splitlines()[-1].startswith("FAIL:")


def test_configuration_errors_and_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    _configure(
        tmp_path, monkeypatch, f'[partners.gone]\nbase_url = "http://127.0.0.1:{port}/fhir"\n'
    )
    assert main(["sandbox-check", "other"]) == 2
    assert "configured: gone" in capsys.readouterr().err
    assert main(["sandbox-check", "gone"]) == 3
    assert "FAIL  connection" in capsys.readouterr().out
    _configure(tmp_path, monkeypatch, '[partners.bad]\nbase_url = "ftp://x"\n')
    assert main(["sandbox-check", "bad"]) == 2
    assert "base_url" in capsys.readouterr().err


BASE = "https://vendor.example.test/fhir"


def _capability(version: str, resources: list[dict[str, Any]], system: list[str]) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": version,
        "rest": [
            {
                "mode": "server",
                "resource": resources,
                "interaction": [{"code": c} for c in system],
            }
        ],
    }


def _resource(rtype: str, *codes: str, conditional: bool = True) -> dict[str, Any]:
    return {
        "type": rtype,
        "interaction": [{"code": c} for c in codes],
        "conditionalCreate": conditional,
    }


@responses.activate
def test_a_server_without_the_needed_capabilities_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _configure(
        tmp_path,
        monkeypatch,
        f'[partners.vendor]\nbase_url = "{BASE}"\nartifact_kinds = ["consents"]\n',
    )
    responses.get(
        f"{BASE}/metadata",
        json=_capability(
            "3.0.2",
            [_resource("Observation", "read"), _resource("Consent", "create", conditional=False)],
            ["batch"],
        ),
    )
    assert main(["sandbox-check", "vendor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  fhir-version" in out and "3.0.2" in out
    assert "FAIL  transaction" in out
    assert "FAIL  type DocumentReference" in out and "not supported" in out
    assert "FAIL  Patient create" in out
    assert "FAIL  type Consent" in out and "conditionalCreate" in out
    assert "SKIP  round trip" in out
    assert len(responses.calls) == 1  # nothing was written to a server that cannot take it


@responses.activate
def test_no_delete_leaves_the_patient_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _configure(
        tmp_path,
        monkeypatch,
        f'[partners.vendor]\nbase_url = "{BASE}"\nresource_types = ["Patient"]\n',
    )
    responses.get(
        f"{BASE}/metadata",
        json=_capability(
            "4.0.1", [_resource("Patient", "create", "read", "search-type")], ["transaction"]
        ),
    )
    responses.post(
        f"{BASE}/Patient", status=201, headers={"Location": f"{BASE}/Patient/p1/_history/1"}
    )
    sent: dict[str, Any] = {}

    def search(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        sent["query"] = request.url
        return (
            200,
            {},
            '{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Patient","id":"p1"},"search":{"mode":"match"}}]}',
        )

    responses.add_callback(responses.GET, f"{BASE}/Patient", callback=search)
    responses.get(
        f"{BASE}/Patient/p1",
        json={"resourceType": "Patient", "id": "p1", "identifier": []},
    )
    assert main(["sandbox-check", "vendor"]) == 1  # the read lost the identifier
    out = capsys.readouterr().out
    assert "PASS  create" in out and "PASS  search" in out
    assert "FAIL  read" in out
    assert "SKIP  cleanup" in out and "Patient/p1 left" in out
    assert not any(c.request.method == "DELETE" for c in responses.calls)
    assert "sandbox-check" in sent["query"]


@responses.activate
def test_a_refused_token_fails_before_any_fhir_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VENDOR_SECRET", "not-the-right-one")
    _configure(
        tmp_path,
        monkeypatch,
        f'[partners.vendor]\nbase_url = "{BASE}"\nauth = "client_credentials"\n'
        'token_url = "https://vendor.example.test/token"\nclient_id = "kat"\n'
        'client_secret_env = "VENDOR_SECRET"\n',
    )
    responses.post(
        "https://vendor.example.test/token", status=401, json={"error": "invalid_client"}
    )
    assert main(["sandbox-check", "vendor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  token" in out and "invalid_client" in out
    assert "not-the-right-one" not in out
    assert [c.request.url for c in responses.calls] == ["https://vendor.example.test/token"]
    # The secret's variable unset: a configuration error naming the variable, not the value.
    monkeypatch.delenv("VENDOR_SECRET")
    assert main(["sandbox-check", "vendor"]) == 2
    assert "VENDOR_SECRET" in capsys.readouterr().err


def test_needed_types_come_from_the_mappings_and_unknown_kinds_are_named() -> None:
    from fhir_kat.exchange.partners import PartnerConfig
    from fhir_kat.exchange.sandbox import needed_types

    consents = PartnerConfig("p", BASE, artifact_kinds=frozenset({"consents"}))
    assert needed_types(consents) == ({"Consent", "DocumentReference", "Organization"}, [])
    narrowed = PartnerConfig(
        "p",
        BASE,
        artifact_kinds=frozenset({"questionnaire-responses", "safety-flags"}),
        resource_types=frozenset({"Observation", "Flag"}),
    )
    assert needed_types(narrowed) == ({"Observation", "Flag"}, [])
    # A kind added later (built directly: the partner parser would refuse it today).
    later = PartnerConfig("p", BASE, artifact_kinds=frozenset({"consents", "a-new-kind"}))
    assert needed_types(later)[1] == ["a-new-kind"]


def test_provenance_is_checked_and_kinds_never_received_are_not_warned_about() -> None:
    """Provenance travels by PUT with our id (it has no identifier); a partner with every
    kind does not receive referral-status, so nothing is said about it; a conditional-create
    partner needs conditional update too (later versions replace its copy)."""
    from fhir_kat.exchange.partners import PartnerConfig
    from fhir_kat.exchange.sandbox import SandboxReport, _compare, needed_types

    every = PartnerConfig("p", BASE)
    types, unknown = needed_types(every)
    assert "Provenance" in types and unknown == []
    qr = PartnerConfig("p", BASE, artifact_kinds=frozenset({"questionnaire-responses"}))
    assert {"Provenance", "Observation", "QuestionnaireResponse"} <= needed_types(qr)[0]
    capability = _capability(
        "4.0.1",
        [
            _resource("QuestionnaireResponse", "create", "update") | {"conditionalUpdate": True},
            _resource("Observation", "create"),  # no conditional update
            _resource("Provenance", "create"),  # no update: cannot take PUT with our id
        ],
        ["transaction"],
    )
    report = SandboxReport("p", BASE)
    _compare(capability, qr, report)
    outcome = {c.name: (c.outcome, c.detail) for c in report.checks}
    assert outcome["type QuestionnaireResponse"][0] == "pass"
    assert outcome["type Observation"] == ("fail", "missing update, conditionalUpdate")
    assert outcome["type Provenance"] == ("fail", "missing update, updateCreate")
    assert not any(name.startswith("kind ") for name in outcome)
