"""HL7's official R4 examples (npm hl7.fhir.r4.examples 4.0.1) of every supported resource type
are accepted and read back unchanged apart from server-kept ``meta``; the few the service refuses
are listed, each with its reason, in ``tests/expected_refusals.json``."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from fhir_kat.errors import FhirError
from fhir_kat.validation.resource import SUPPORTED_TYPES
from tests.conftest import client_as
from tools.hl7_packages import ensure

REFUSALS: dict[str, str] = json.loads(
    (Path(__file__).parent / "expected_refusals.json").read_text()
)


@cache
def examples() -> list[tuple[str, dict[str, Any]]]:
    folder = ensure("hl7.fhir.r4.examples")
    out = []
    for path in sorted(folder.glob("*.json")):
        rtype = path.name.split("-", 1)[0]
        if rtype not in SUPPORTED_TYPES:
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("resourceType") == rtype and "id" in doc:
            out.append((path.name, doc))
    return out


def _without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    copy = dict(resource)
    meta = {k: v for k, v in copy.pop("meta", {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        copy["meta"] = meta
    return copy


def test_every_supported_type_has_official_examples() -> None:
    covered = {doc["resourceType"] for _, doc in examples()}
    assert covered == set(SUPPORTED_TYPES)
    assert len(examples()) > 250


def test_official_examples_round_trip(app: Flask) -> None:
    staff, admin = client_as(app, "staff"), client_as(app, "admin")
    # Policy, not validation, keeps clients from writing these: Subscriptions belong to outside
    # parties (a referrer here), and only the service itself writes AuditEvents.
    writers = {"Subscription": client_as(app, "referrer")}
    readers = {"AuditEvent": admin}
    service = app.extensions["fhir_kat"].fhir
    refused: dict[str, list[str]] = {}
    accepted = 0
    for name, doc in examples():
        rtype, rid = doc["resourceType"], doc["id"]
        if rtype == "AuditEvent":
            try:
                service.update(rtype, rid, json.loads(json.dumps(doc)))
            except FhirError as exc:
                refused[name] = [i.diagnostics for i in exc.issues]
                continue
        else:
            r = writers.get(rtype, staff).put(
                f"/fhir/{rtype}/{rid}", data=json.dumps(doc), content_type="application/fhir+json"
            )
            if r.status_code not in (200, 201):
                refused[name] = [i.get("diagnostics", "") for i in r.get_json()["issue"]]
                continue
        accepted += 1
        back = readers.get(rtype, staff).get(f"/fhir/{rtype}/{rid}").get_json()
        assert _without_server_meta(back) == _without_server_meta(doc), name
    unexpected = {k: v for k, v in refused.items() if k not in REFUSALS}
    assert not unexpected, f"refused but not in expected_refusals.json: {unexpected}"
    stale = set(REFUSALS) - set(refused)
    assert not stale, f"now accepted, remove from expected_refusals.json: {stale}"
    assert accepted > 250


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_each_expected_refusal_has_a_reason(name: str) -> None:
    assert len(REFUSALS[name]) > 20
