"""No-op updates (FHIR: an update identical to the current version) on every write path, on
both databases: a REST PUT (with or without If-Match), a conditional update, a transaction or
batch entry, a re-sent native artifact, a re-sent FHIR message and a re-sent HL7 v2 message
write no new version, answer with the current one (ETag, Last-Modified, Location of it), and
each request still leaves exactly one AuditEvent naming what it touched. What counts as a
change is pinned too (ADR 0020): ``meta.tag``/``security``/``profile`` are content, a
decimal's precision is part of its value, key order is not."""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from fhir_kat.api.mllp import ListenerConfig, MllpListener
from fhir_kat.security.audit import NOTHING_WRITTEN
from fhir_kat.store import same_content
from fhir_kat.store.schema import resource_versions
from tests.conftest import client_as
from tests.support.v2_messages import ack_code, referral_message, send
from tests.test_messaging import as_message, process, referral, transform

FHIR = "application/fhir+json"
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
ID_SYSTEM = "urn:test:noop"


# ----------------------------------------------------------------------------- helpers


def versions(app: Flask) -> Counter[str]:
    """How many versions of each type are stored, AuditEvents aside."""
    engine = app.extensions["fhir_kat"].store.engine
    with engine.connect() as conn:
        rows = conn.execute(select(resource_versions.c.res_type)).scalars().all()
    return Counter(t for t in rows if t != "AuditEvent")


def audit_events(app: Flask) -> list[dict[str, Any]]:
    """Every AuditEvent, oldest first (the audit journal's records moved first, ADR 0023)."""
    app.extensions["fhir_kat"].store.drain_audit()
    engine = app.extensions["fhir_kat"].store.engine
    with engine.connect() as conn:
        rows = conn.execute(
            select(resource_versions.c.content)
            .where(resource_versions.c.res_type == "AuditEvent")
            .order_by(resource_versions.c.seq)
        ).scalars()
        return [json.loads(c) for c in rows]


def entities(event: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in event.get("entity", []) if "what" in e}


class Watch:
    """What one request wrote: versions (AuditEvents aside) and AuditEvents."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.before = versions(app)
        self.audits = len(audit_events(app))

    def wrote_nothing(self) -> dict[str, Any]:
        """Asserts no version was written and exactly one AuditEvent; returns it."""
        assert versions(self.app) == self.before
        events = audit_events(self.app)
        assert len(events) == self.audits + 1, [e.get("outcomeDesc") for e in events]
        return events[-1]


def put(c: FlaskClient, path: str, body: dict[str, Any], **headers: str) -> Any:
    return c.put(path, data=json.dumps(body), content_type=FHIR, headers=headers)


def patient(value: str = "1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": ID_SYSTEM, "value": value}],
        "gender": "female",
        "birthDate": "1980-05-01",
        **extra,
    }


def observation(value: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {
            "value": value,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def reordered(value: Any) -> Any:
    """The same JSON with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(v) for v in value]
    return value


# ------------------------------------------------------------------------- REST update


def test_an_identical_put_writes_nothing_answers_the_current_version_and_is_audited(
    app: Flask, client: FlaskClient
) -> None:
    body = {**patient(), "id": "noop-1"}
    first = put(client, "/fhir/Patient/noop-1", body)
    assert first.status_code == 201
    for again_body, headers in (
        (body, {}),
        (reordered(body), {}),  # key order is not content
        # server-kept meta the client echoes (even a stale one) is not content either
        ({**body, "meta": {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"}}, {}),
        (body, {"If-Match": first.headers["ETag"]}),
    ):
        watch = Watch(app)
        again = put(client, "/fhir/Patient/noop-1", again_body, **headers)
        assert again.status_code == 200, again.get_json()
        assert again.headers["ETag"] == first.headers["ETag"] == 'W/"1"'
        assert again.headers["Last-Modified"] == first.headers["Last-Modified"]
        assert again.headers["Location"] == first.headers["Location"]
        assert again.get_json() == first.get_json()
        event = watch.wrote_nothing()
        assert event["subtype"][0]["code"] == "update" and event["outcome"] == "0"
        assert event["outcomeDesc"] == NOTHING_WRITTEN
        assert "Patient/noop-1" in entities(event)
    # A stale If-Match is still a conflict, identical body or not (and still audited).
    watch = Watch(app)
    assert put(client, "/fhir/Patient/noop-1", body, **{"If-Match": 'W/"9"'}).status_code == 412
    assert watch.wrote_nothing()["outcome"] == "4"
    history = client.get("/fhir/Patient/noop-1/_history").get_json()
    assert history["total"] == 1


@pytest.mark.parametrize(
    "change",
    [
        {"meta": {"tag": [{"system": "urn:test:tags", "code": "t"}]}},
        {"meta": {"security": [{"system": "urn:test:labels", "code": "s"}]}},
        {"meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/Patient"]}},
        {"gender": "male"},
        {"active": True},
    ],
    ids=["tag", "security", "profile", "value", "new-element"],
)
def test_a_change_to_meta_or_content_is_a_new_version(
    client: FlaskClient, change: dict[str, Any]
) -> None:
    body = {**patient(), "id": "noop-2"}
    assert put(client, "/fhir/Patient/noop-2", body).status_code == 201
    changed = put(client, "/fhir/Patient/noop-2", {**body, **change})
    assert changed.status_code == 200 and changed.headers["ETag"] == 'W/"2"'
    # and back again is a change as well
    assert put(client, "/fhir/Patient/noop-2", body).headers["ETag"] == 'W/"3"'


def test_a_decimals_precision_is_part_of_its_value(client: FlaskClient) -> None:
    body = {**observation(72), "id": "noop-3"}
    assert put(client, "/fhir/Observation/noop-3", body).status_code == 201
    same = put(client, "/fhir/Observation/noop-3", body)
    assert same.headers["ETag"] == 'W/"1"'
    precise = copy.deepcopy(body)
    precise["valueQuantity"]["value"] = 72.0  # "72.0": one more significant figure
    assert put(client, "/fhir/Observation/noop-3", precise).headers["ETag"] == 'W/"2"'
    assert put(client, "/fhir/Observation/noop-3", precise).headers["ETag"] == 'W/"2"'


def test_an_identical_put_after_a_delete_recreates(client: FlaskClient) -> None:
    body = {**patient(), "id": "noop-4"}
    put(client, "/fhir/Patient/noop-4", body)
    assert client.delete("/fhir/Patient/noop-4").status_code == 204
    again = put(client, "/fhir/Patient/noop-4", body)
    assert again.status_code == 201 and again.headers["ETag"] == 'W/"3"'


# ------------------------------------------------------------------- conditional update


def test_conditional_update_creates_updates_and_is_a_no_op_when_identical(
    app: Flask, client: FlaskClient
) -> None:
    url = f"/fhir/Patient?identifier={ID_SYSTEM}|cu-1"
    created = put(client, url, patient("cu-1"))
    assert created.status_code == 201, created.get_json()
    rid = created.get_json()["id"]
    watch = Watch(app)
    same = put(client, url, patient("cu-1"))  # no id in the body: the match's
    assert same.status_code == 200 and same.headers["ETag"] == 'W/"1"'
    assert same.headers["Location"] == created.headers["Location"]
    event = watch.wrote_nothing()
    assert event["outcomeDesc"] == NOTHING_WRITTEN and f"Patient/{rid}" in entities(event)
    with_id = put(client, url, {**patient("cu-1"), "id": rid})
    assert with_id.status_code == 200 and with_id.headers["ETag"] == 'W/"1"'
    changed = put(client, url, patient("cu-1", gender="male"))
    assert changed.status_code == 200 and changed.headers["ETag"] == 'W/"2"'
    assert changed.get_json()["id"] == rid
    # the body's id must be the match's
    wrong = put(client, url, {**patient("cu-1"), "id": "someone-else"})
    assert wrong.status_code == 400
    # no match and an id: update as create, with that id
    r = put(client, f"/fhir/Patient?identifier={ID_SYSTEM}|cu-2", {**patient("cu-2"), "id": "cu2"})
    assert r.status_code == 201 and r.get_json()["id"] == "cu2"
    # several matches: 412, nothing written
    put(client, "/fhir/Patient/cu3", {**patient("cu-1"), "id": "cu3"})
    watch = Watch(app)
    assert put(client, url, patient("cu-1")).status_code == 412
    assert watch.wrote_nothing()["outcome"] == "4"
    assert put(client, "/fhir/Patient", patient("cu-1")).status_code == 400  # no criteria


# ----------------------------------------------------------------- transaction and batch


def _bundle(btype: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": btype, "entry": entries}


def _entries() -> list[dict[str, Any]]:
    org = {"resourceType": "Organization", "id": "noop-org", "name": "Synthetic Clinic"}
    return [
        {"resource": org, "request": {"method": "PUT", "url": "Organization/noop-org"}},
        {
            "resource": {**patient("tx-1"), "id": "noop-tx"},
            "request": {"method": "PUT", "url": "Patient/noop-tx"},
        },
        {
            "resource": patient("tx-2", managingOrganization={"reference": "urn:uuid:org"}),
            "request": {"method": "PUT", "url": f"Patient?identifier={ID_SYSTEM}|tx-2"},
        },
        {
            "fullUrl": "urn:uuid:org",
            "resource": {"resourceType": "Organization", "name": "Synthetic Lab"},
            "request": {
                "method": "POST",
                "url": "Organization",
                "ifNoneExist": "name:exact=Synthetic Lab",
            },
        },
    ]


@pytest.mark.parametrize("btype", ["transaction", "batch"])
def test_identical_bundle_entries_write_nothing_and_are_audited(
    app: Flask, client: FlaskClient, btype: str
) -> None:
    if btype == "batch":  # a batch resolves no urn:uuid between entries
        entries = [e for e in _entries() if "fullUrl" not in e]
        entries[2]["resource"].pop("managingOrganization")
    else:
        entries = _entries()
    first = client.post("/fhir", data=json.dumps(_bundle(btype, entries)), content_type=FHIR)
    assert first.status_code == 200, first.get_json()
    assert [e["response"]["status"] for e in first.get_json()["entry"]] == ["201 Created"] * len(
        entries
    )
    watch = Watch(app)
    again = client.post(
        "/fhir", data=json.dumps(_bundle(btype, copy.deepcopy(entries))), content_type=FHIR
    )
    assert again.status_code == 200, again.get_json()
    answers = [e["response"] for e in again.get_json()["entry"]]
    assert [a["status"] for a in answers] == ["200 OK"] * len(entries)
    assert [a["location"] for a in answers] == [
        e["response"]["location"] for e in first.get_json()["entry"]
    ]
    assert all(a["etag"] == 'W/"1"' for a in answers)
    event = watch.wrote_nothing()
    assert event["subtype"][0]["code"] == btype and event["outcome"] == "0"
    named = {a["location"].split("/_history")[0].split("/fhir/")[-1] for a in answers}
    assert named <= entities(event) | {f"Patient/{p}" for p in _patients(event)}


def _patients(event: dict[str, Any]) -> set[str]:
    return {
        e["what"]["reference"].split("/", 1)[1]
        for e in event.get("entity", [])
        if e.get("role", {}).get("code") == "1"
    }


def test_a_resent_referral_transaction_writes_nothing(app: Flask) -> None:
    """Issue 20: the REST path re-versioned the referrer's Organization, Practitioner and
    PractitionerRole on every referral."""
    staff = client_as(app, "staff")
    referrer = client_as(app, "referrer")
    bundle = transform(staff, referral())
    first = referrer.post("/fhir", data=json.dumps(bundle), content_type=FHIR)
    assert first.status_code == 200, first.get_json()
    watch = Watch(app)
    again = referrer.post("/fhir", data=json.dumps(bundle), content_type=FHIR)
    assert again.status_code == 200, again.get_json()
    assert {e["response"]["status"] for e in again.get_json()["entry"]} == {"200 OK"}
    event = watch.wrote_nothing()
    assert len(entities(event) | _patients(event)) >= len(bundle["entry"])


# ------------------------------------------------------------- artifacts and messages


@pytest.mark.parametrize("kind", ["referrals", "screenings", "consents"])
def test_a_resent_artifact_writes_nothing_and_is_audited(
    app: Flask, client: FlaskClient, kind: str
) -> None:
    if kind != "referrals":
        _submit(client, "referrals")
    first = _submit(client, kind)
    assert first.status_code == 201, first.get_json()
    watch = Watch(app)
    again = _submit(client, kind)
    assert again.status_code == 200, again.get_json()
    assert {e["response"]["status"] for e in again.get_json()["entry"]} == {"200 OK"}
    event = watch.wrote_nothing()
    assert event["outcomeDesc"] == NOTHING_WRITTEN
    locations = {e["response"]["location"].split("/_history")[0] for e in again.get_json()["entry"]}
    assert locations <= entities(event) | {f"Patient/{p}" for p in _patients(event)}


def _submit(c: FlaskClient, kind: str) -> Any:
    body = json.loads((EXAMPLES / f"{kind}.json").read_text())
    return c.post(f"/api/v1/{kind}", data=json.dumps(body), content_type="application/json")


def test_a_resent_fhir_message_writes_nothing_and_is_audited(app: Flask) -> None:
    staff = client_as(app, "staff")
    referrer = client_as(app, "referrer")
    message = as_message(transform(staff, referral()))
    assert process(referrer, message).status_code == 200
    for again in (message, as_message(transform(staff, referral()))):  # same id, a new one
        watch = Watch(app)
        answer = process(referrer, again)
        assert answer.get_json()["entry"][0]["resource"]["response"]["code"] == "ok"
        event = watch.wrote_nothing()
        assert any(ref.startswith("Task/") for ref in entities(event))


@pytest.fixture
def mllp_port(app: Flask) -> Iterator[int]:
    service = app.extensions["fhir_kat"].services.v2
    with MllpListener(ListenerConfig(port=0, idle_timeout=30), service.receive) as listener:
        yield listener.address[1]


def test_a_resent_v2_referral_writes_nothing_and_is_audited(app: Flask, mllp_port: int) -> None:
    native = referral()
    raw = referral_message(native, "NOOP-1")
    assert ack_code(send(mllp_port, raw)) == "AA"
    # the same message again (its recorded ACK), then the same referral in a new message
    for again in (raw, referral_message(native, "NOOP-2")):
        watch = Watch(app)
        assert ack_code(send(mllp_port, again)) == "AA"
        event = watch.wrote_nothing()
        assert event["outcome"] == "0" and NOTHING_WRITTEN in event["outcomeDesc"]


# ---------------------------------------------------------------------- the comparison

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


KEYS = st.text(min_size=1).filter(lambda k: k not in ("resourceType", "id", "meta"))


@given(st.dictionaries(KEYS, JSON, max_size=5))
def test_same_content_is_json_equality_apart_from_server_meta(doc: dict[str, Any]) -> None:
    resource = {"resourceType": "Basic", "id": "x", **doc}
    stamped = {**resource, "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:00Z"}}
    assert same_content(resource, reordered(stamped))
    assert same_content(resource, json.loads(json.dumps(resource)))
    for key, value in doc.items():
        for other in ([value], {"v": value}):
            assert not same_content(resource, {**resource, key: other})
        assert not same_content(resource, {k: v for k, v in resource.items() if k != key})
        if isinstance(value, int) and not isinstance(value, bool):
            assert not same_content(resource, {**resource, key: float(value)})
            assert not same_content(resource, {**resource, key: bool(value)})
