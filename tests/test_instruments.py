"""Questionnaires served, responses checked against them, scored, extracted (SDC), flagged for
safety, and the program outcome measured end to end from QuestionnaireResponses sent over HTTP."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.artifacts import bc_phn_check_digit
from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.instruments.scoring import score
from fhir_kat.mapping.functions import questionnaire
from tests.conftest import client_as
from tests.support.conformance import assert_conformant

CAT = load_catalogue()
#: Synthetic BC PHNs that pass the Mod 11 check digit.
PHNS = [
    f"{b}{d}" for n in range(100) if (d := bc_phn_check_digit(b := f"9000000{n:02d}")) is not None
]
PHN = "9999999998"
PHQ = ["LA6568-5", "LA6569-3", "LA6570-1", "LA6571-9"]
ANSWERS = {
    "phq9": (9, PHQ),
    "gad7": (7, PHQ),
    "pcl5": (20, [f"pcl5-{i}" for i in range(5)]),
    "bipf": (7, [f"bipf-{i}" for i in range(7)]),
}


def qr_artifact(
    instrument: str, values: list[int], source: str, when: str, phn: str = PHN, **extra: Any
) -> dict[str, Any]:
    _, codes = ANSWERS[instrument]
    return {
        "source_id": source,
        "patient_phn": phn,
        "instrument": instrument,
        "authored": when,
        "answers": [
            {"item": f"{instrument}-{i + 1}", "answer": codes[v]} for i, v in enumerate(values)
        ],
        **extra,
    }


def patient(c: FlaskClient, phn: str = PHN) -> str:
    """The Patient the native routes' mappings name for ``phn`` (the installation's id)."""
    from fhir_kat.mapping.engine import deterministic_id

    namespace = c.application.extensions["fhir_kat"].artifacts.id_namespace
    pid = deterministic_id("Patient", phn, namespace=namespace)
    c.put(
        f"/fhir/Patient/{pid}",
        data=json.dumps({"resourceType": "Patient", "id": pid}),
        content_type="application/fhir+json",
    )
    return pid


def send(c: FlaskClient, body: dict[str, Any]) -> Any:
    return c.post(
        "/api/v1/questionnaire-responses", data=json.dumps(body), content_type="application/json"
    )


def totals(c: FlaskClient, pid: str, code: str) -> list[dict[str, Any]]:
    b = c.get(f"/fhir/Observation?patient={pid}&code=http://loinc.org|{code}").get_json()
    return [e["resource"] for e in b.get("entry", [])]


def test_questionnaires_are_served_and_searchable(client: FlaskClient) -> None:
    for url_id in ("phq-9", "gad-7", "pcl-5", "b-ipf"):
        url = f"https://fhir-kat.example.org/fhir/Questionnaire/{url_id}"
        found = client.get(f"/fhir/Questionnaire?url={url}").get_json()
        assert found["total"] == 1
        assert_conformant(found["entry"][0]["resource"])
    by_code = client.get("/fhir/Questionnaire?code=http://loinc.org|44260-8").get_json()
    assert [e["resource"]["id"] for e in by_code["entry"]] == ["phq-9"]


@pytest.mark.parametrize(
    ("instrument", "values", "total"),
    [
        ("phq9", [3] * 9, 27),
        ("phq9", [1, 1, 1, 1, 1, 0, 0, 0, 0], 5),
        ("gad7", [0] * 7, 0),
        ("pcl5", [4] * 20, 80),
        ("pcl5", [2] * 16 + [1, 0, 0, 0], 33),
        ("bipf", [6, 6, 6, 0, 0, 0, 0], 42.9),
    ],
)
def test_scores(instrument: str, values: list[int], total: float) -> None:
    inst = CAT.instruments[instrument]
    q = questionnaire(instrument)
    _, codes = ANSWERS[instrument]
    qr = {
        "item": [
            {"linkId": f"{instrument}-{i + 1}", "answer": [{"valueCoding": {"code": codes[v]}}]}
            for i, v in enumerate(values)
        ]
    }
    assert score(qr, q, inst).total == total


def test_incomplete_responses_and_not_applicable() -> None:
    phq = CAT.instruments["phq9"]
    partial = {"item": [{"linkId": "phq9-1", "answer": [{"valueCoding": {"code": "LA6571-9"}}]}]}
    assert score(partial, questionnaire("phq9"), phq).total is None  # no prorating
    finished = {
        "status": "completed",
        "item": [
            {"linkId": f"phq9-{i}", "answer": [{"valueCoding": {"code": "LA6569-3"}}]}
            for i in range(1, 10)
        ],
    }
    assert score(finished, questionnaire("phq9"), phq).total == 9
    in_progress = finished | {"status": "in-progress"}  # every item, but not finished
    assert score(in_progress, questionnaire("phq9"), phq).total is None
    bipf = CAT.instruments["bipf"]

    def answers(*codes: str | None) -> dict[str, object]:
        return {
            "status": "completed",
            "item": [
                {"linkId": f"bipf-{i}", "answer": [{"valueCoding": {"code": code}}]}
                for i, code in enumerate(codes, start=1)
                if code is not None
            ],
        }

    # NCPTSD IPF method: "not applicable" leaves the denominator.
    result = score(
        answers("bipf-3", "bipf-na", "bipf-6", "bipf-na", "bipf-na", "bipf-na", "bipf-3"),
        questionnaire("bipf"),
        bipf,
    )
    assert result.total == 66.7 and result.answered == 3 and result.not_applicable == 4  # 12/18
    # A skipped domain is not "not applicable": no total.
    skipped = score(
        answers("bipf-3", None, "bipf-6", "bipf-na", "bipf-na", "bipf-na", "bipf-3"),
        questionnaire("bipf"),
        bipf,
    )
    assert skipped.total is None and skipped.unanswered == 1
    # Fewer domains with a value than the minimum (3 by default, configurable): no total.
    thin = answers("bipf-6", "bipf-na", "bipf-na", "bipf-na", "bipf-na", "bipf-na", "bipf-6")
    assert score(thin, questionnaire("bipf"), bipf).total is None
    two = load_catalogue({"bipf": {"min_answered": 2}}).instruments["bipf"]
    assert score(thin, questionnaire("bipf"), two).total == 100.0


def test_extraction_on_store(client: FlaskClient) -> None:
    pid = patient(client)
    r = send(client, qr_artifact("phq9", [2, 2, 3, 2, 1, 2, 1, 0, 0], "Q1", "2026-01-05T10:00:00Z"))
    assert r.status_code == 201, r.get_json()
    total = totals(client, pid, "44261-6")
    assert len(total) == 1
    obs = total[0]
    assert (
        obs["valueQuantity"]["value"] == 13
        and obs["effectiveDateTime"] == "2026-01-05T10:00:00+00:00"
    )
    codes = {c["code"] for i in obs["interpretation"] for c in i["coding"]}
    assert codes == {"moderate", "POS"}
    assert obs["derivedFrom"][0]["reference"].startswith("QuestionnaireResponse/")
    items = client.get(
        f"/fhir/Observation?patient={pid}&derived-from={obs['derivedFrom'][0]['reference']}"
    ).get_json()
    assert items["total"] == 10  # 9 items (all answered) + the total
    for e in items["entry"]:
        assert_conformant(e["resource"])
    assert client.get(f"/fhir/Flag?patient={pid}").get_json()["total"] == 0
    # re-sending the same response changes nothing
    send(client, qr_artifact("phq9", [2, 2, 3, 2, 1, 2, 1, 0, 0], "Q1", "2026-01-05T10:00:00Z"))
    assert len(totals(client, pid, "44261-6")) == 1


def test_safety_flags(client: FlaskClient) -> None:
    pid = patient(client)
    send(client, qr_artifact("phq9", [1, 1, 1, 1, 0, 0, 0, 0, 1], "Q1", "2026-01-05T10:00:00Z"))
    flags = client.get(f"/fhir/Flag?patient={pid}").get_json()
    assert [e["resource"]["code"]["coding"][0]["code"] for e in flags["entry"]] == [
        "phq9-item9-positive"
    ]
    assert_conformant(flags["entry"][0]["resource"])
    send(client, qr_artifact("phq9", [2, 2, 2, 2, 1, 0, 0, 0, 0], "Q2", "2026-02-05T10:00:00Z"))
    assert client.get(f"/fhir/Flag?patient={pid}").get_json()["total"] == 1  # 5 -> 9: +4
    send(client, qr_artifact("phq9", [2, 2, 2, 2, 2, 2, 1, 1, 0], "Q3", "2026-03-05T10:00:00Z"))
    codes = sorted(
        e["resource"]["code"]["coding"][0]["code"]
        for e in client.get(f"/fhir/Flag?patient={pid}").get_json()["entry"]
    )
    assert codes == ["phq9-item9-positive", "phq9-rise"]  # 9 -> 14: +5
    pcl_patient = patient(client, "9999999973")
    send(client, qr_artifact("pcl5", [1] * 20, "P1", "2026-01-05T10:00:00Z", phn="9999999973"))
    send(
        client,
        qr_artifact("pcl5", [1] * 10 + [2] * 10, "P2", "2026-02-05T10:00:00Z", phn="9999999973"),
    )
    flags = client.get(f"/fhir/Flag?patient={pcl_patient}").get_json()
    assert [e["resource"]["code"]["coding"][0]["code"] for e in flags["entry"]] == ["pcl5-rise"]


def test_fhir_responses_are_checked_against_the_questionnaire(client: FlaskClient) -> None:
    pid = patient(client)
    base = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "questionnaire": "https://fhir-kat.example.org/fhir/Questionnaire/gad-7|1",
        "subject": {"reference": f"Patient/{pid}"},
        "authored": "2026-01-05T10:00:00Z",
    }
    good = base | {
        "item": [
            {
                "linkId": f"gad7-{i}",
                "answer": [{"valueCoding": {"system": "http://loinc.org", "code": "LA6570-1"}}],
            }
            for i in range(1, 8)
        ]
    }
    r = client.post(
        "/fhir/QuestionnaireResponse", data=json.dumps(good), content_type="application/fhir+json"
    )
    assert r.status_code == 201
    assert totals(client, pid, "70274-6")[0]["valueQuantity"]["value"] == 14
    bad = base | {
        "item": [
            {
                "linkId": "gad7-99",
                "answer": [{"valueCoding": {"system": "http://loinc.org", "code": "LA6570-1"}}],
            },
            {
                "linkId": "gad7-1",
                "answer": [{"valueCoding": {"system": "http://loinc.org", "code": "LA0000-0"}}],
            },
            {"linkId": "gad7-2", "answer": [{"valueInteger": 2}]},
        ]
    }
    r = client.post(
        "/fhir/QuestionnaireResponse", data=json.dumps(bad), content_type="application/fhir+json"
    )
    assert r.status_code == 422
    assert [i["expression"][0] for i in r.get_json()["issue"]] == [
        "QuestionnaireResponse.item[0].linkId",
        "QuestionnaireResponse.item[1].answer[0].valueCoding",
        "QuestionnaireResponse.item[2].answer[0]",
    ]
    # $extract returns the Observations without storing them
    ext = client.post(
        "/fhir/QuestionnaireResponse/$extract",
        data=json.dumps(good),
        content_type="application/fhir+json",
    )
    assert ext.status_code == 200 and len(ext.get_json()["entry"]) == 8
    stored_id = (
        r.headers.get("Location")
        or client.get("/fhir/QuestionnaireResponse").get_json()["entry"][0]["resource"]["id"]
    )
    inst = client.post(f"/fhir/QuestionnaireResponse/{stored_id}/$extract")
    assert inst.status_code == 200 and inst.get_json()["type"] == "transaction"
    assert len(totals(client, pid, "70274-6")) == 1  # nothing new stored


def test_measure_from_responses_sent_over_http(app: Flask) -> None:
    """A synthetic cohort (seed 7) of PHQ-9 and PCL-5 responses through /api/v1, measured."""
    rng = random.Random(7)
    staff = client_as(app, "staff")
    truth = {"phq9": [0, 0, 0], "pcl5": [0, 0, 0]}
    members = []
    for i in range(24):
        phn = PHNS[i]
        members.append(patient(staff, phn))
        for inst, n, top in (("phq9", 9, 3), ("pcl5", 20, 4)):
            before = [rng.randint(0, top) for _ in range(n)]
            after = [max(0, v - rng.randint(0, 2)) for v in before]
            assert (
                send(
                    staff,
                    qr_artifact(inst, before, f"{inst}-{i}-a", "2026-01-10T09:00:00Z", phn=phn),
                ).status_code
                == 201
            )
            has_post = i % 5 != 0
            if has_post:
                assert (
                    send(
                        staff,
                        qr_artifact(inst, after, f"{inst}-{i}-b", "2026-04-10T09:00:00Z", phn=phn),
                    ).status_code
                    == 201
                )
            definition = CAT.instruments[inst]
            if definition.positive(sum(before)):
                truth[inst][0] += 1
                if has_post:
                    truth[inst][1] += 1
                    truth[inst][2] += int(definition.improved(sum(before), sum(after)))
    # The cohort's program: baseline (01-10) within a month before its start, post (04-10)
    # within two weeks after its end.
    cohort = {
        "resourceType": "Group",
        "id": "cohort-http",
        "type": "person",
        "actual": True,
        "member": [
            {
                "entity": {"reference": f"Patient/{pid}"},
                "period": {"start": "2026-01-20", "end": "2026-04-05"},
            }
            for pid in members
        ],
    }
    r = staff.put(
        "/fhir/Group/cohort-http", data=json.dumps(cohort), content_type="application/fhir+json"
    )
    assert r.status_code == 201
    report = staff.get(  # program staff: the exact counts (small cells are theirs to see)
        "/fhir/Measure/kat-program-outcomes/$evaluate-measure?periodStart=2026-01-01"
        "&periodEnd=2026-12-31"
    ).get_json()
    groups = {g["code"]["coding"][0]["code"]: g for g in report["group"]}
    for inst, panel in (("phq9", "44249-1"), ("pcl5", "101697-1")):
        counts = [p["count"] for p in groups[panel]["population"]]
        assert counts == truth[inst], inst
        assert truth[inst][1] > 0
