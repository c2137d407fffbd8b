"""What SDC form renderers send is accepted on every path a response takes, and checked like
any other response.

A renderer (NLM LHC-Forms; the real one runs in tests/web/test_browser.py) sends each item's
``text``, the Questionnaire's ``url|version``, ``authored``/``author``/``source``, the option's
score copied onto each ``valueCoding`` and the calculated total. A hand-built response sends none
of that. Both shapes must give the same stored total and Flags, and a total that differs from the
service's own is refused naming the item and both values — on POST, PUT, conditional create,
transaction (POST and PUT entries), batch, ``$extract`` (resource and Parameters) and the native
artifact. The expected totals come from an oracle written from DOMAIN.md, not from the scoring
code under test.
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient

from fhir_kat.instruments.scoring import check_response, score
from fhir_kat.mapping.functions import questionnaire
from tests.support.questionnaire_responses import (
    CAT,
    NA,
    SCALES,
    TOTAL_LINK,
    Values,
    oracle_total,
    random_values,
    response,
)
from tests.test_instruments import PHN, patient, qr_artifact, send

# ---------------------------------------------------------------------------- the write paths


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]  # the stored resource, the $extract Bundle, or the OperationOutcome
    qr_id: str | None = None  # set when the path stored the response


def _json(c: FlaskClient, method: str, url: str, body: Any, **headers: str) -> Any:
    return c.open(
        url,
        method=method,
        data=json.dumps(body),
        content_type="application/fhir+json",
        headers=headers,
    )


def via_post(c: FlaskClient, qr: dict[str, Any]) -> Outcome:
    r = _json(c, "POST", "/fhir/QuestionnaireResponse", qr)
    body = r.get_json()
    return Outcome(r.status_code, body, body.get("id") if r.status_code == 201 else None)


def via_put(c: FlaskClient, qr: dict[str, Any]) -> Outcome:
    rid = str(uuid.uuid4())
    r = _json(c, "PUT", f"/fhir/QuestionnaireResponse/{rid}", qr | {"id": rid})
    return Outcome(r.status_code, r.get_json(), rid if r.status_code == 201 else None)


def via_conditional_create(c: FlaskClient, qr: dict[str, Any]) -> Outcome:
    value = str(uuid.uuid4())
    body = qr | {"identifier": {"system": "urn:example:renderer", "value": value}}
    r = _json(
        c,
        "POST",
        "/fhir/QuestionnaireResponse",
        body,
        **{"If-None-Exist": f"identifier=urn:example:renderer|{value}"},
    )
    out = r.get_json()
    return Outcome(r.status_code, out, out.get("id") if r.status_code == 201 else None)


def _bundle(c: FlaskClient, qr: dict[str, Any], kind: str, method: str) -> Outcome:
    rid = str(uuid.uuid4())
    request = (
        {"method": "POST", "url": "QuestionnaireResponse"}
        if method == "POST"
        else {"method": "PUT", "url": f"QuestionnaireResponse/{rid}"}
    )
    resource = qr if method == "POST" else qr | {"id": rid}
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource, "request": request}
        ],
    }
    r = _json(c, "POST", "/fhir", bundle)
    body = r.get_json()
    if r.status_code != 200:
        return Outcome(r.status_code, body)
    response = body["entry"][0]["response"]
    status = int(response["status"].split()[0])
    if status >= 400:  # a batch answers each entry on its own
        return Outcome(status, response["outcome"])
    qr_id = response["location"].split("QuestionnaireResponse/")[1].split("/")[0]
    return Outcome(status, body, qr_id)


def via_extract(c: FlaskClient, qr: dict[str, Any]) -> Outcome:
    r = _json(c, "POST", "/fhir/QuestionnaireResponse/$extract", qr)
    return Outcome(r.status_code, r.get_json())


def via_extract_parameters(c: FlaskClient, qr: dict[str, Any]) -> Outcome:
    params = {
        "resourceType": "Parameters",
        "parameter": [{"name": "questionnaire-response", "resource": qr}],
    }
    r = _json(c, "POST", "/fhir/QuestionnaireResponse/$extract", params)
    return Outcome(r.status_code, r.get_json())


PATHS: dict[str, Callable[[FlaskClient, dict[str, Any]], Outcome]] = {
    "POST": via_post,
    "PUT": via_put,
    "conditional-create": via_conditional_create,
    "transaction-POST": lambda c, qr: _bundle(c, qr, "transaction", "POST"),
    "transaction-PUT": lambda c, qr: _bundle(c, qr, "transaction", "PUT"),
    "batch": lambda c, qr: _bundle(c, qr, "batch", "POST"),
    "$extract": via_extract,
    "$extract-Parameters": via_extract_parameters,
}
STORES = {p for p in PATHS if not p.startswith("$extract")}


def new_patient(c: FlaskClient) -> str:
    pid: str = c.post("/fhir/Patient", json={"resourceType": "Patient"}).get_json()["id"]
    return pid


def stored_total(c: FlaskClient, instrument: str, outcome: Outcome) -> float | None:
    """The total the service extracted: from the store, or from the ``$extract`` Bundle."""
    code = CAT.instruments[instrument].total
    if outcome.qr_id is None:
        found = [
            e["resource"]
            for e in outcome.body["entry"]
            if e["resource"]["code"]["coding"][0]["code"] == code["code"]
        ]
    else:
        bundle = c.get(
            f"/fhir/Observation?derived-from=QuestionnaireResponse/{outcome.qr_id}"
            f"&code={code['system']}|{code['code']}"
        ).get_json()
        found = [e["resource"] for e in bundle.get("entry", [])]
    assert len(found) <= 1
    return float(found[0]["valueQuantity"]["value"]) if found else None


def flags(c: FlaskClient, pid: str) -> list[str]:
    bundle = c.get(f"/fhir/Flag?patient={pid}").get_json()
    return sorted(e["resource"]["code"]["coding"][0]["code"] for e in bundle.get("entry", []))


def stored_responses(c: FlaskClient, pid: str) -> int:
    total: int = c.get(
        f"/fhir/QuestionnaireResponse?subject=Patient/{pid}&_summary=count"
    ).get_json()["total"]
    return total


def assert_total_refused(outcome: Outcome, qr: dict[str, Any], sent: float, own: str) -> None:
    assert outcome.status == 422, outcome.body
    [problem] = outcome.body["issue"]
    link = qr["item"][-1]["linkId"]
    element = next(iter(qr["item"][-1]["answer"][0]))
    assert f"item '{link}' is {sent:g} in the response" in problem["diagnostics"]
    assert f"the service computes {own}" in problem["diagnostics"]
    assert problem["expression"] == [
        f"QuestionnaireResponse.item[{len(qr['item']) - 1}].answer[0].{element}"
    ]


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", PATHS)
def test_renderer_and_hand_built_responses_score_alike_on_every_path(
    client: FlaskClient, path: str
) -> None:
    rng = random.Random(f"sdc-{path}")
    write = PATHS[path]
    for instrument in SCALES:
        values = random_values(rng, instrument)
        if instrument == "phq9":
            values[8] = 2  # item 9 above 0: a safety Flag, whatever the shape
        if instrument == "bipf":
            values[1] = NA
        expected = oracle_total(instrument, values)
        assert expected is not None
        pids = []
        for renderer in (True, False):
            pid = new_patient(client)
            pids.append(pid)
            qr = response(instrument, values, pid, renderer=renderer)
            assert (TOTAL_LINK[instrument] in json.dumps(qr)) is renderer
            outcome = write(client, qr)
            assert outcome.status in (200, 201), (path, instrument, renderer, outcome.body)
            assert stored_total(client, instrument, outcome) == expected, (instrument, renderer)
            if path in STORES:
                assert flags(client, pid) == (
                    ["phq9-item9-positive"] if instrument == "phq9" else []
                )
                stored = client.get(f"/fhir/QuestionnaireResponse/{outcome.qr_id}").get_json()
                assert stored["item"] == qr["item"]  # kept as sent: text, scores, the total
        # The renderer's total, one point off: refused, naming the item and both values.
        pid = new_patient(client)
        wrong = response(instrument, values, pid, total=expected + 1)
        assert_total_refused(write(client, wrong), wrong, expected + 1, f"{expected:g}")
        assert stored_responses(client, pid) == 0 and flags(client, pid) == []


@pytest.mark.parametrize("path", ["POST", "transaction-POST", "$extract"])
def test_a_partial_response_has_a_total_on_neither_side(client: FlaskClient, path: str) -> None:
    """PHQ-9, GAD-7 and PCL-5 need every item (the Questionnaires' calculatedExpressions yield
    nothing either); B-IPF needs every domain answered (a score or "not applicable") and at least
    the configured number answered with a score (issue 17)."""
    write = PATHS[path]
    for instrument in SCALES:
        n, _ = SCALES[instrument]
        values: Values = [1] * n
        values[2] = None
        pid = new_patient(client)
        expected = oracle_total(instrument, values)
        # As the renderer exports it: its total when it computes one, none otherwise.
        outcome = write(client, response(instrument, values, pid))
        assert outcome.status in (200, 201), outcome.body
        assert stored_total(client, instrument, outcome) == expected
        if instrument != "bipf":
            assert expected is None
            # A renderer summing what is there (as the Questionnaires' v1 expression did).
            partial_sum = response(instrument, values, pid, total=float(n - 1))
            assert_total_refused(
                write(client, partial_sum),
                partial_sum,
                n - 1,
                f"no total: {n - 1} of {n} scored items answered, and a total needs all {n}",
            )
    # Every B-IPF domain "not applicable": no total anywhere, and a sent one is refused.
    pid = new_patient(client)
    all_na = response("bipf", [NA] * 7, pid, total=0.0)
    assert_total_refused(
        write(client, all_na),
        all_na,
        0,
        "no total: 0 domain(s) answered with a score, and a score needs at least 3",
    )
    outcome = write(client, response("bipf", [NA] * 7, pid))
    assert outcome.status in (200, 201) and stored_total(client, "bipf", outcome) is None


def test_the_questionnaire_as_responses_name_it(client: FlaskClient) -> None:
    q = questionnaire("phq9")
    values: Values = [0, 0, 0, 0, 0, 0, 0, 0, 1]
    for ref in (
        q["url"],
        f"{q['url']}|1",  # the earlier version: same items, options and scores
        f"{q['url']}|{q['version']}",
        "Questionnaire/phq-9",  # a literal reference, as some EMRs write it
    ):
        pid = new_patient(client)
        outcome = via_post(client, response("phq9", values, pid, questionnaire_ref=ref))
        assert outcome.status == 201, (ref, outcome.body)
        assert stored_total(client, "phq9", outcome) == 1
        assert flags(client, pid) == ["phq9-item9-positive"]
    pid = new_patient(client)
    r = via_post(client, response("phq9", values, pid, questionnaire_ref=f"{q['url']}|99"))
    assert r.status == 422
    assert [i["expression"] for i in r.body["issue"]] == [["QuestionnaireResponse.questionnaire"]]
    assert "publishes versions 1, 2, 3 of" in r.body["issue"][0]["diagnostics"]
    assert stored_responses(client, pid) == 0


def test_a_response_names_its_patient_and_when(client: FlaskClient) -> None:
    """Scores, Observations and Flags are a patient's at a time: without a Patient reference or
    ``authored`` a response could only be stored unscored (its Flag lost) — refused instead, on
    every path; a transaction's ``urn:uuid`` Patient is the participant's Patient."""
    values: Values = [0, 0, 0, 0, 0, 0, 0, 0, 2]
    for path in ("POST", "transaction-POST", "$extract"):
        for subject in (
            {
                "identifier": {
                    "system": "https://fhir.infoway-inforoute.ca/NamingSystem/x",
                    "value": "1",
                }
            },
            {"display": "A participant"},
            {"reference": "Group/cohort-a"},
            None,
        ):
            qr = response("phq9", values, "p1")
            if subject is None:
                del qr["subject"]
            else:
                qr["subject"] = subject
            outcome = PATHS[path](client, qr)
            assert outcome.status == 422, (path, subject, outcome.body)
            assert [i["expression"] for i in outcome.body["issue"]] == [
                ["QuestionnaireResponse.subject"]
            ]
        qr = response("phq9", values, "p1")
        del qr["authored"]
        outcome = PATHS[path](client, qr)
        assert outcome.status == 422, outcome.body
        assert [i["expression"] for i in outcome.body["issue"]] == [
            ["QuestionnaireResponse.authored"]
        ]
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    qr = response("phq9", values, "p1") | {"subject": {"reference": patient_url}}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_url,
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {"resource": qr, "request": {"method": "POST", "url": "QuestionnaireResponse"}},
        ],
    }
    r = _json(client, "POST", "/fhir", bundle)
    assert r.status_code == 200, r.get_json()
    pid = r.get_json()["entry"][0]["response"]["location"].split("Patient/")[1].split("/")[0]
    assert flags(client, pid) == ["phq9-item9-positive"]


def test_what_a_response_may_not_carry_is_refused_naming_the_item(client: FlaskClient) -> None:
    pid = new_patient(client)
    qr = response("phq9", [1] * 9, pid)
    lying = copy.deepcopy(qr["item"][0]["answer"][0])
    lying["valueCoding"]["extension"][0]["valueDecimal"] = 3  # "Several days" scores 1
    qr["item"] += [
        {"linkId": "phq9-1", "answer": [lying]},  # item twice, with a score not its own
        {"linkId": "phq9-2", "answer": qr["item"][1]["answer"] * 2},  # two answers
        {"linkId": "phq9-3", "item": [{"linkId": "phq9-4"}]},  # nested items
        {"linkId": "phq9-total", "answer": [{"valueDecimal": 9.0}]},  # integer item
        {"linkId": "phq9-nope", "answer": [{"valueInteger": 1}]},
    ]
    r = via_post(client, qr)
    assert r.status == 422
    assert [(i["code"], i["expression"][0]) for i in r.body["issue"]] == [
        ("duplicate", "QuestionnaireResponse.item[10].linkId"),
        ("value", "QuestionnaireResponse.item[10].answer[0].valueCoding.extension"),
        ("duplicate", "QuestionnaireResponse.item[11].linkId"),
        ("value", "QuestionnaireResponse.item[11].answer[1]"),
        ("duplicate", "QuestionnaireResponse.item[12].linkId"),
        ("structure", "QuestionnaireResponse.item[12].item"),
        ("duplicate", "QuestionnaireResponse.item[13].linkId"),
        ("value", "QuestionnaireResponse.item[13].answer[0]"),
        ("value", "QuestionnaireResponse.item[14].linkId"),
    ]
    assert (
        "carries a score of 3; the Questionnaire gives that option a score of 1"
        in (r.body["issue"][1]["diagnostics"])
    )
    assert stored_responses(client, pid) == 0


def test_display_and_uncomputed_read_only_items_take_no_answer() -> None:
    """The served Questionnaires have no display item yet (issue 17 adds the stems): the rule
    is checked on a Questionnaire that has one, and a read-only item the service does not
    compute."""
    q = copy.deepcopy(questionnaire("gad7"))
    q["item"].insert(0, {"linkId": "gad7-stem", "type": "display", "text": "Over the last 2 weeks"})
    q["item"].append({"linkId": "gad7-note", "type": "string", "readOnly": True, "text": "Note"})
    qr = response("gad7", [1] * 7, "p1")
    qr["item"] += [
        {"linkId": "gad7-stem", "text": "Over the last 2 weeks"},  # shown, not answered: fine
        {"linkId": "gad7-stem", "answer": [{"valueString": "ok"}]},
        {"linkId": "gad7-note", "answer": [{"valueString": "x"}]},
    ]
    problems = check_response(qr, q, CAT.instruments["gad7"])
    assert [(p.diagnostics, p.expression) for p in problems] == [
        ("item 'gad7-stem' appears more than once", ("QuestionnaireResponse.item[9].linkId",)),
        (
            "item 'gad7-stem' is a display item: it takes no answer",
            ("QuestionnaireResponse.item[9].answer",),
        ),
        (
            "item 'gad7-note' is a read-only item: it takes no answer",
            ("QuestionnaireResponse.item[10].answer",),
        ),
    ]


@pytest.mark.parametrize("instrument", SCALES)
def test_any_response_is_accepted_exactly_when_its_total_agrees(instrument: str) -> None:
    """Property: over random responses (complete, partial, "not applicable", with or without
    the renderer's extras), the service's total is the oracle's, a sent total is accepted
    exactly when it rounds to it, and the rounding a renderer may skip (42.857142… for 42.9)
    is no disagreement."""
    rng = random.Random(f"property-{instrument}")
    q, definition = questionnaire(instrument), CAT.instruments[instrument]
    for _ in range(400):
        values = random_values(rng, instrument, skip=rng.choice((0.0, 0.1, 0.5)))
        expected = oracle_total(instrument, values)
        renderer = rng.random() < 0.5
        qr = response(instrument, values, "p1", renderer=renderer, total=None)
        assert score(qr, q, definition).total == expected, values
        assert check_response(qr, q, definition) == []
        scored = [v for v in values if isinstance(v, int)]
        exact = sum(scored) * 100 / (6 * len(scored)) if instrument == "bipf" and scored else None
        candidates = [expected, exact, rng.randint(0, 100), (expected or 0) + rng.choice((-1, 1))]
        for sent in candidates:
            if sent is None or (instrument != "bipf" and sent < 0):
                continue
            sent_qr = response(instrument, values, "p1", renderer=renderer, total=float(sent))
            agrees = expected is not None and round(sent, 1) == expected
            assert (check_response(sent_qr, q, definition) == []) is agrees, (values, sent)


def test_native_artifacts_may_carry_the_total(client: FlaskClient) -> None:
    pid = patient(client)
    values = [2, 2, 3, 2, 1, 2, 1, 0, 0]
    artifact = qr_artifact("phq9", values, "Q-TOTAL", "2026-01-05T10:00:00Z")
    artifact["answers"].append({"item": "phq9-total", "answer": 13})
    r = send(client, artifact)
    assert r.status_code == 201, r.get_json()
    location = next(
        e["response"]["location"]
        for e in r.get_json()["entry"]
        if "QuestionnaireResponse/" in e["response"]["location"]
    )
    qr_id = location.split("QuestionnaireResponse/")[1].split("/")[0]
    qr = client.get(f"/fhir/QuestionnaireResponse/{qr_id}").get_json()
    assert qr["item"][-1] == {
        "linkId": "phq9-total",
        "text": "PHQ-9 total score",
        "answer": [{"valueInteger": 13}],
    }
    obs = client.get(f"/fhir/Observation?patient={pid}&code=http://loinc.org|44261-6").get_json()[
        "entry"
    ]
    assert [o["resource"]["valueQuantity"]["value"] for o in obs] == [13]
    artifact = qr_artifact("phq9", values, "Q-TOTAL-2", "2026-01-06T10:00:00Z", phn=PHN)
    artifact["answers"].append({"item": "phq9-total", "answer": 12})
    r = send(client, artifact)
    assert r.status_code == 422
    assert [(i["diagnostics"], i["expression"]) for i in r.get_json()["issue"]] == [
        (
            "item 'phq9-total' is 12 in the response, but the service computes 13 from its answers",
            ["answers[9].answer"],
        )
    ]
