"""A transaction's conditional creates are looked up together (``_conditional_matches``: one
query per type, parameter and 100 tokens) and must answer exactly as one by one: the same
matches, creates and 412s, on both databases, only within the caller's view."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from tests.test_visibility import World, fhir

FHIR = "application/fhir+json"
SYSTEM = "urn:test:obs"


def obs(value: str, system: str = SYSTEM, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": system, "value": value}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        **extra,
    }


def conditional(resource: dict[str, Any], criteria: str) -> dict[str, Any]:
    rtype = resource["resourceType"]
    return {
        "resource": resource,
        "request": {"method": "POST", "url": rtype, "ifNoneExist": criteria},
    }


def transaction(c: FlaskClient, entries: list[dict[str, Any]]) -> Any:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return c.post("/fhir", data=json.dumps(bundle), content_type=FHIR)


def one_by_one(c: FlaskClient, entries: list[dict[str, Any]]) -> list[str]:
    """What each entry matches when sent alone: the stored id, or "" for none."""
    out = []
    for e in entries:
        rtype = e["request"]["url"]
        r = c.get(f"/fhir/{rtype}?{e['request']['ifNoneExist']}")
        found = r.get_json().get("entry", [])
        out.append(found[0]["resource"]["id"] if len(found) == 1 else "")
    return out


def test_matches_creates_and_lookalikes_as_one_by_one(client: FlaskClient) -> None:
    stored = {}
    for value in ("a", "b", "c"):
        r = fhir(client, "POST", "/fhir/Observation", obs(value))
        stored[value] = r.get_json()["id"]
    fhir(client, "POST", "/fhir/Observation", obs("d", system="urn:test:other"))  # other system
    patient = {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": "e"}]}
    fhir(client, "POST", "/fhir/Patient", patient)  # same token, other type
    entries = [
        conditional(obs("a"), f"identifier={SYSTEM}|a"),
        conditional(obs("new-1"), f"identifier={SYSTEM}|new-1"),
        conditional(obs("d"), f"identifier={SYSTEM}|d"),
        conditional(obs("e"), f"identifier={SYSTEM}|e"),
        conditional(obs("b"), f"identifier={SYSTEM}|b&status=final"),  # not one token
        conditional(obs("c"), "identifier=c"),  # no system: any system
        conditional(obs("new-2"), f"identifier={SYSTEM}|new-2"),
    ]
    expected = one_by_one(client, entries)
    assert expected == [stored["a"], "", "", "", stored["b"], stored["c"], ""]
    r = transaction(client, entries)
    assert r.status_code == 200, r.get_json()
    answers = [e["response"] for e in r.get_json()["entry"]]
    for want, answer in zip(expected, answers, strict=True):
        if want:
            assert answer["status"] == "200 OK" and f"Observation/{want}/" in answer["location"]
        else:
            assert answer["status"] == "201 Created"
    assert client.get(f"/fhir/Observation?identifier={SYSTEM}|d").get_json()["total"] == 1


def test_several_matches_are_a_412_naming_the_entry(client: FlaskClient) -> None:
    for _ in range(2):
        fhir(client, "POST", "/fhir/Observation", obs("twice"))
    entries = [
        conditional(obs("x"), f"identifier={SYSTEM}|x"),
        conditional(obs("twice"), f"identifier={SYSTEM}|twice"),
    ]
    r = transaction(client, entries)
    assert r.status_code == 412
    found = r.get_json()["issue"][0]
    assert found["expression"] == ["Bundle.entry[1].request.ifNoneExist"]
    assert "more than one Observation" in found["diagnostics"]
    assert client.get(f"/fhir/Observation?identifier={SYSTEM}|x").get_json()["total"] == 0


def test_more_entries_than_one_lookup_takes(client: FlaskClient) -> None:
    entries = [conditional(obs(f"n{i}"), f"identifier={SYSTEM}|n{i}") for i in range(230)]
    first = transaction(client, entries)
    assert first.status_code == 200, first.get_json()
    assert {e["response"]["status"] for e in first.get_json()["entry"]} == {"201 Created"}
    again = transaction(client, entries)
    assert [e["response"]["location"] for e in again.get_json()["entry"]] == [
        e["response"]["location"] for e in first.get_json()["entry"]
    ]
    assert {e["response"]["status"] for e in again.get_json()["entry"]} == {"200 OK"}
    total = client.get("/fhir/Observation?_summary=count").get_json()["total"]
    assert total == 230


def test_only_what_the_caller_may_see_is_matched(app: Flask) -> None:
    world = World(app)
    task_a = world.staff.get(f"/fhir/Task/{world.task_id['A']}").get_json()
    ident = task_a["identifier"][0]
    own_role = world.task(world.other)["requester"]

    def probe(value: str) -> dict[str, Any]:
        return {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "identifier": [{"system": ident["system"], "value": value}],
            "requester": own_role,
        }

    entries = [
        conditional(probe(ident["value"]), f"identifier={ident['system']}|{ident['value']}"),
        conditional(probe("CLINIC-8-own"), f"identifier={ident['system']}|CLINIC-8-own"),
    ]
    r = transaction(world.other, entries)
    assert r.status_code == 200, r.get_json()
    answers = [e["response"] for e in r.get_json()["entry"]]
    assert [a["status"] for a in answers] == ["201 Created", "201 Created"]
    assert task_a["id"] not in answers[0]["location"]  # CLINIC-7's Task: for CLINIC-8, absent
    again = transaction(world.other, entries)
    assert [e["response"]["location"] for e in again.get_json()["entry"]] == [
        a["location"] for a in answers
    ]
    assert world.staff.get(f"/fhir/Task/{task_a['id']}").get_json() == task_a
