"""The shipped Questionnaires as the validated forms (issue 17): the instrument's own stem and
recall period as display items, local codes for every PCL-5 item, and a ``calculatedExpression``
that agrees with the server's scoring on every response — complete, partial, "not applicable" —
evaluated with fhirpathpy (SDC's ``ordinal()`` supplied from the Questionnaire's options)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fhirpathpy import evaluate
from fhirpathpy.models import models
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.instruments.scoring import ORDINAL, check_response, score
from fhir_kat.mapping.functions import questionnaire

CAT = load_catalogue()
CALC = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-calculatedExpression"
STEMS = {
    "phq9": (
        "Over the last 2 weeks, how often have you been bothered by any of the following problems?"
    ),
    "gad7": "Over the last 2 weeks, how often have you been bothered by the following problems?",
    "pcl5": "In the past month, how much were you bothered by:",
    "bipf": "past 30 days",
}


def _scored(q: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        i
        for i in q["item"]
        if any(
            e.get("url") == ORDINAL
            for o in i.get("answerOption", [])
            for e in o.get("extension", [])
        )
    ]


VARIABLE = "http://hl7.org/fhir/StructureDefinition/variable"


def _total_item(q: dict[str, Any]) -> dict[str, Any]:
    (total,) = [i for i in q["item"] if i.get("readOnly")]
    return total


def _expression(q: dict[str, Any]) -> str:
    (ext,) = [e for e in _total_item(q)["extension"] if e["url"] == CALC]
    expression: str = ext["valueExpression"]["expression"]
    return expression


def _calculated(q: dict[str, Any], qr: dict[str, Any]) -> float | None:
    ordinals = {
        (o["valueCoding"].get("system"), o["valueCoding"]["code"]): e["valueDecimal"]
        for i in q["item"]
        for o in i.get("answerOption", [])
        for e in o.get("extension", [])
        if e.get("url") == ORDINAL
    }

    def ordinal(inputs: list[Any]) -> list[Any]:
        return [
            ordinals[(c.get("system"), c.get("code"))]
            for c in inputs
            if isinstance(c, dict) and (c.get("system"), c.get("code")) in ordinals
        ]

    options = {"userInvocationTable": {"ordinal": {"fn": ordinal, "arity": {0: []}}}}
    context: dict[str, Any] = {"resource": qr}
    for ext in _total_item(q)["extension"]:  # SDC variables, in order
        if ext["url"] == VARIABLE:
            value = ext["valueExpression"]
            # answer.value is a choice type: the R4 model resolves it to valueCoding
            context[value["name"]] = evaluate(
                qr, value["expression"], context, models["r4"], options=options
            )
    result = evaluate(qr, _expression(q), context, models["r4"], options=options)
    assert len(result) <= 1, result
    return float(result[0]) if result else None


@pytest.mark.parametrize("key", sorted(CAT.instruments))
def test_the_form_shows_the_instruments_own_stem_and_recall_period(key: str) -> None:
    q = questionnaire(key)
    displays = [i for i in q["item"] if i.get("type") == "display"]
    assert displays and q["item"][0]["type"] == "display"  # before the first question
    assert any(STEMS[key] in i["text"] for i in displays)
    # A display item takes no answer.
    qr = {
        "subject": {"reference": "Patient/p1"},
        "authored": "2025-01-01",
        "item": [{"linkId": displays[0]["linkId"], "answer": [{"valueString": "x"}]}],
    }
    assert [p.expression for p in check_response(qr, q, CAT.instruments[key])] == [
        ("QuestionnaireResponse.item[0].answer",)
    ]


def test_every_pcl5_item_has_a_local_code() -> None:
    for item in _scored(questionnaire("pcl5")):
        assert [c["system"] for c in item["code"]] == [
            "https://fhir-kat.example.org/fhir/CodeSystem/kat-instruments"
        ], item["linkId"]
    assert "101699-7" not in json.dumps(questionnaire("pcl5")["item"])


def test_the_bipf_expression_carries_the_configured_minimum() -> None:
    assert f">= {CAT.instruments['bipf'].min_answered}," in _expression(questionnaire("bipf"))
    assert "%answered = 7" in _expression(questionnaire("bipf"))


ANSWER = st.one_of(st.none(), st.integers(0, 6), st.just("na"))


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(sorted(CAT.instruments)), data=st.data())
def test_the_calculated_total_agrees_with_the_server(key: str, data: st.DataObject) -> None:
    q = questionnaire(key)
    inst = CAT.instruments[key]
    items = []
    for item in _scored(q):
        options = item["answerOption"]
        choice = data.draw(ANSWER)
        scored = [
            o for o in options if any(e.get("url") == ORDINAL for e in o.get("extension", []))
        ]
        unscored = [o for o in options if o not in scored]
        if choice is None:
            continue  # left unanswered
        if choice == "na":
            if not unscored:
                continue
            option = unscored[0]
        else:
            option = scored[choice % len(scored)]
        items.append({"linkId": item["linkId"], "answer": [{"valueCoding": option["valueCoding"]}]})
    qr = {"resourceType": "QuestionnaireResponse", "status": "completed", "item": items}
    server = score(qr, q, inst).total
    assert _calculated(q, qr) == server, (key, items)
