"""Outbound never vetoes inbound, as a property: for every artifact kind (native API and FHIR)
and every partner configuration variant — none, conditional create (with and without
business identifiers, PUT or dead letter for resources without one), PUT, the care team,
a party outside the program, a referrer, a filtered partner, a disabled one — with a sharing
consent on record or not, every write gets the same answer and the stored clinical record
(every resource, every version, byte for byte) is identical to the run without partners.
Partner configuration decides what is sent, never what is stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from fhir_kat.app import create_app
from fhir_kat.artifacts import KINDS
from fhir_kat.exchange.bundles import NO_IDENTIFIER, NO_IDENTIFIER_SEARCH
from fhir_kat.exchange.partners import DELIVERABLE_KINDS, REFERRAL_STATUS
from fhir_kat.exchange.plan import kind_types
from fhir_kat.mapping.engine import deterministic_id
from fhir_kat.settings import Settings
from fhir_kat.store.schema import resource_versions, resources
from tests.conftest import CLINIC_ORG, HA_ORG, empty_postgres, token_for
from tests.support.clinical import adverse_event, phq9_response

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
BASE = "https://partner.example.test/fhir"
PHN = "9999999998"
_ALL_TYPES = sorted(
    {t for k in DELIVERABLE_KINDS for t in kind_types(k)} - NO_IDENTIFIER - NO_IDENTIFIER_SEARCH
)

VARIANTS: dict[str, dict[str, Any]] = {
    "conditional-create": {"ehr": {"base_url": BASE, "organization": HA_ORG}},
    "conditional-create-source-identifiers": {
        "ehr": {
            "base_url": BASE,
            "organization": HA_ORG,
            "source_identifier_system": "https://fhir-kat.example.org/fhir/sid/resource",
        }
    },
    "conditional-create-identified-only": {
        "ehr": {
            "base_url": BASE,
            "organization": HA_ORG,
            "without_identifier": "dead-letter",
            "resource_types": _ALL_TYPES,
        }
    },
    "put": {"ehr": {"base_url": BASE, "organization": HA_ORG, "write_mode": "put"}},
    "every-kind-named": {
        "ehr": {
            "base_url": BASE,
            "organization": HA_ORG,
            "artifact_kinds": sorted(DELIVERABLE_KINDS - {REFERRAL_STATUS}),
            "care_team": False,
        }
    },
    "care-team": {
        "team": {"base_url": BASE, "artifact_kinds": ["safety-flags"], "care_team": True}
    },
    "flags-to-an-outside-party": {
        "gp": {"base_url": BASE, "artifact_kinds": ["safety-flags"], "care_team": False}
    },
    "referrer": {
        "emr": {"base_url": BASE, "organization": CLINIC_ORG, "artifact_kinds": [REFERRAL_STATUS]}
    },
    "filtered": {
        "ehr": {
            "base_url": BASE,
            "artifact_kinds": ["screenings", "questionnaire-responses", "safety-flags"],
            "resource_types": ["Observation", "Flag", "QuestionnaireResponse"],
            "care_team": False,
        }
    },
    "disabled": {"ehr": {"base_url": BASE, "enabled": False}},
}


def _example(name: str, /, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_text())
    return {**body, **changes}


def scenario(consent: bool, pid: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, body): every artifact kind, with safety signals in it, then the same
    facts through FHIR (client ids, so that two runs write the same ids) about ``pid``."""
    steps: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/api/v1/referrals", _example("referrals"))
    ]
    for n, step in enumerate(("nurse-intake", "psychiatrist-clearance", "contraindication-check")):
        steps.append(
            ("POST", "/api/v1/screenings", _example("screenings", source_id=f"S-{n}", step=step))
        )
    treatment = _example("consents", source_id="C-T", kind="treatment", session_number=2)
    treatment.pop("permitted_party")
    treatment.pop("purposes")
    steps.append(("POST", "/api/v1/consents", treatment))
    if consent:
        share = _example("consents", source_id="C-HA", purposes=["HOPERAT", "TREAT"])
        steps.append(("POST", "/api/v1/consents", share))
    session = _example("medication-administrations", dose_mg=700.0)
    session["dose_override"] = {"reason": "synthetic", "clinician": session["administered_by"]}
    session["vital_signs_before"]["systolic_mmhg"] = 185
    session["adverse_events"].append({"kind": "suicidality", "serious": True})
    steps.append(("POST", "/api/v1/medication-administrations", session))
    qr = _example("questionnaire-responses")
    qr["answers"][8]["answer"] = "LA6570-1"  # item 9: more than half the days
    steps.append(("POST", "/api/v1/questionnaire-responses", qr))
    steps.append(
        ("POST", "/api/v1/adverse-events", _example("adverse-events", kind="hospitalisation"))
    )
    qr_fhir = phq9_response([1] * 8 + [3], "qr-fhir", "2026-02-20T10:00:00Z", f"Patient/{pid}")
    steps.append(("PUT", "/fhir/QuestionnaireResponse/qr-fhir", qr_fhir))
    uncoded = adverse_event(None, None, f"Patient/{pid}", id="ae-fhir")
    steps.append(("PUT", "/fhir/AdverseEvent/ae-fhir", uncoded))
    assert {p.split("/")[3] for m, p, _ in steps if p.startswith("/api/v1/")} == set(KINDS)
    return steps


def run(
    settings: Settings, partners: dict[str, Any], consent: bool, moment: datetime
) -> dict[str, Any]:
    """The scenario against a fresh app whose clock stands still at ``moment`` (two runs give
    byte-identical records); the answers' statuses and the stored record."""
    app = create_app(
        replace(settings, extra={**settings.extra, "partners": partners}), clock=lambda: moment
    )
    try:
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app, 'staff')}"
        namespace = app.extensions["fhir_kat"].artifacts.id_namespace
        pid = deterministic_id("Patient", PHN, namespace=namespace)
        statuses = []
        for method, path, body in scenario(consent, pid):
            kind = "application/json" if path.startswith("/api/") else "application/fhir+json"
            r = client.open(path, method=method, data=json.dumps(body), content_type=kind)
            statuses.append((path, r.status_code))
            assert r.status_code in (200, 201), (path, r.get_json())
        state = app.extensions["fhir_kat"]
        with state.store.read() as tx:
            rows = [
                (r.res_type, r.res_id, r.version_id, _timeless(r.content))
                for r in tx.conn.execute(
                    select(resources).where(resources.c.res_type != "AuditEvent")
                )
            ]
            versions = [
                (v.res_type, v.res_id, v.version_id, _timeless(v.content))
                for v in tx.conn.execute(
                    select(resource_versions).where(resource_versions.c.res_type != "AuditEvent")
                )
            ]
            queued = tx.conn.execute(text("SELECT count(*) FROM outbox")).scalar()
        flags = sum(1 for t, *_ in rows if t == "Flag")
        return {
            "statuses": statuses,
            "resources": sorted(rows),
            "versions": sorted(versions),
            "flags": flags,
            "queued": queued,
        }
    finally:
        app.extensions["fhir_kat"].export.shutdown()
        app.extensions["fhir_kat"].store.dispose()


def _timeless(content: str) -> str:
    """The stored JSON without what the clock wrote (when it was stored, when a Provenance was
    recorded): the baseline is computed once per database and consent, at another moment."""
    resource = json.loads(content)
    resource.get("meta", {}).pop("lastUpdated", None)
    if resource.get("resourceType") == "Provenance":
        resource.pop("recorded", None)
        resource.pop("text", None)  # its generated narrative shows `recorded` too
    return json.dumps(resource, sort_keys=True)


#: The run without partners, once per (database, consent) and process.
_BASELINES: dict[tuple[str, bool], dict[str, Any]] = {}


@pytest.fixture
def fresh(
    database_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A function giving settings on an empty database, each call."""
    from fhir_kat.settings import load_settings
    from tests.conftest import TEST_CLIENTS

    counter = iter(range(1000))
    # One installation id secret for the process (the cached baselines were written under it).
    secret = tmp_path_factory.getbasetemp() / "id-secret"

    def make() -> Settings:
        n = next(counter)
        if database_url.startswith("sqlite"):
            url = f"sqlite:///{tmp_path / f'run-{n}.sqlite3'}"
        else:
            url = database_url
            empty_postgres(url)
        base = load_settings({}, database_url=url, data_dir=str(tmp_path / f"var-{n}"))
        # One installation id secret for every run: the same business identifiers give the
        # same ids, so records of separate runs compare.
        return replace(base, extra={"clients": TEST_CLIENTS}, id_secret_file=str(secret))

    yield make


@pytest.mark.parametrize("consent", [False, True], ids=["no-sharing-consent", "sharing-consent"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_partner_configuration_never_changes_what_is_stored(
    fresh: Any, variant: str, consent: bool
) -> None:
    moment = datetime.now(UTC)  # tokens are checked against the wall clock
    settings = fresh()
    key = (settings.effective_database_url.split(":")[0], consent)
    if key not in _BASELINES:
        _BASELINES[key] = run(settings, {}, consent, moment)
        settings = fresh()
    baseline = _BASELINES[key]
    assert baseline["flags"] >= 6  # the scenario raises safety signals on every path
    assert baseline["queued"] == 0
    configured = run(settings, VARIANTS[variant], consent, moment)
    assert configured["statuses"] == baseline["statuses"]
    assert configured["resources"] == baseline["resources"]
    assert configured["versions"] == baseline["versions"]
    if variant != "disabled":
        assert configured["queued"] > 0, "the variant's partner received something"
