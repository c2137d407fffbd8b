"""The referral as an SDC form: ``Questionnaire/kat-referral``, ``$populate`` and the response
read back into the native referral artifact.

Owns: the served Questionnaire (``mappings/questionnaires/Questionnaire-kat-referral.json`` with
the program's ValueSets contained and expanded from ``mappings/terminology/``, so a renderer
needs no terminology server), ``populate`` (SDC ``$populate``: each ``initialExpression``
evaluated with fhirpathpy against the launch context ``%patient``, ``%user`` and the
``%conditions`` query's Bundle) and ``referral_from_response`` (a QuestionnaireResponse → the
native referral artifact). Each item's ``linkId`` *is* the artifact field it answers, so the
response becomes the same referral, through the same mapping and checks, as
``POST /api/v1/referrals`` — one mapping, not a second one.

Must not: guess. An answer of the wrong type, an unknown item, or a prefilled value that is not
one of the item's codes is an issue or is left for the physician, never coerced.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from fhirpathpy import evaluate

from fhir_kat.canonical import read_definition
from fhir_kat.errors import Issue, Unprocessable, issue
from fhir_kat.terminology import BASE, canonical, load_terminology

FILE = (
    Path(__file__).resolve().parents[2]
    / "mappings"
    / "questionnaires"
    / "Questionnaire-kat-referral.json"
)
URL = f"{BASE}/Questionnaire/kat-referral"
INITIAL = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-initialExpression"
#: The answer element of each item type (FHIR R4 QuestionnaireResponse.item.answer.value[x]).
ANSWER = {
    "string": "valueString",
    "text": "valueString",
    "date": "valueDate",
    "boolean": "valueBoolean",
    "url": "valueUri",
    "choice": "valueCoding",
    "open-choice": "valueCoding",
}
#: The statuses of a response that is a referral: ``completed``, and ``amended`` (a completed
#: response corrected: the same referral, updated — its ids come from its identifier).
REFERRAL_STATUSES = ("completed", "amended")
_JSON = {"valueString": str, "valueDate": str, "valueBoolean": bool, "valueUri": str}


@cache
def _served() -> dict[str, Any]:
    q: dict[str, Any] = json.loads(read_definition(FILE))
    terminology = load_terminology()
    contained: list[dict[str, Any]] = []
    for item in _walk(q["item"]):
        ref = item.get("answerValueSet", "")
        if ref.startswith("#") and ref[1:] not in {c["id"] for c in contained}:
            name = ref[1:]
            contains = [
                {"system": system, "code": code, "display": terminology.display(system, code)}
                for system, code in sorted(terminology.value_set(name))
            ]
            contained.append(
                {
                    "resourceType": "ValueSet",
                    "id": name,
                    "url": canonical("ValueSet", name),
                    "status": "active",
                    "expansion": {
                        "identifier": f"urn:fhir-kat:expansion:{name}",
                        "timestamp": q["date"],
                        "contains": [{k: v for k, v in c.items() if v} for c in contains],
                    },
                }
            )
    return {**q, "contained": contained}


def referral_questionnaire() -> dict[str, Any]:
    """The Questionnaire as served (a copy: callers may change it)."""
    return copy.deepcopy(_served())


def _walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield item
        yield from _walk(item.get("item", []))


@cache
def _items() -> dict[str, dict[str, Any]]:
    return {i["linkId"]: i for i in _walk(_served()["item"])}


def _options(item: Mapping[str, Any]) -> list[dict[str, Any]]:
    ref = item.get("answerValueSet", "")
    if ref.startswith("#"):
        vs = next(c for c in _served()["contained"] if c["id"] == ref[1:])
        return list(vs["expansion"]["contains"])
    return [o["valueCoding"] for o in item.get("answerOption", []) if "valueCoding" in o]


# ---------------------------------------------------------------------------- $populate


def populate(context: Mapping[str, Any], subject: str | None = None) -> dict[str, Any]:
    """An ``in-progress`` QuestionnaireResponse prefilled from ``context`` (``patient``,
    ``user``: resources; ``conditions``: a Bundle). An expression that yields nothing, or a
    value the item cannot take (a code outside its ValueSet), leaves the item for the
    physician."""
    env = {k: v for k, v in context.items() if isinstance(v, dict)}

    def answer_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for item in items:
            if item["type"] == "group":
                children = answer_items(item.get("item", []))
                if children:
                    out.append({"linkId": item["linkId"], "text": item["text"], "item": children})
                continue
            answers = _initial(item, env)
            if answers:
                out.append({"linkId": item["linkId"], "text": item["text"], "answer": answers})
        return out

    qr: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{URL}|{_served()['version']}",
        "status": "in-progress",
        "item": answer_items(_served()["item"]),
    }
    if subject:
        qr["subject"] = {"reference": subject}
    return qr


def _initial(item: Mapping[str, Any], env: Mapping[str, Any]) -> list[dict[str, Any]]:
    expression = next(
        (
            e["valueExpression"]["expression"]
            for e in item.get("extension", [])
            if e.get("url") == INITIAL
        ),
        None,
    )
    names = {"patient", "user", "conditions"}
    if expression is None or not all(f"%{n}" not in expression or n in env for n in names):
        return []
    try:
        values = evaluate({}, expression, dict(env))
    except Exception:  # fhirpathpy raises plain exceptions on data it cannot read: no prefill
        return []
    element = ANSWER[item["type"]]
    answers: list[dict[str, Any]] = []
    for value in values:
        if element == "valueCoding":
            coding = _as_coding(item, value)
            if coding is not None:
                answers.append({"valueCoding": coding})
        elif isinstance(value, _JSON[element]) and not (
            element != "valueBoolean" and isinstance(value, bool)
        ):
            answers.append({element: value})
    return answers if item.get("repeats") else answers[:1]


def _as_coding(item: Mapping[str, Any], value: Any) -> dict[str, Any] | None:
    """A Coding the item can take: any for an open-choice item, else one of its options. A
    plain string (a code without its system) is not a Coding and is never made one."""
    if not (isinstance(value, dict) and value.get("system") and value.get("code")):
        return None
    coding = {k: value[k] for k in ("system", "code", "display") if value.get(k)}
    if item["type"] == "open-choice" or any(
        (o["system"], o["code"]) == (coding["system"], coding["code"]) for o in _options(item)
    ):
        return coding
    return None


# ---------------------------------------------------------------------------- response → artifact


def is_referral_response(payload: Any) -> bool:
    return (
        isinstance(payload, dict)
        and payload.get("resourceType") == "QuestionnaireResponse"
        and str(payload.get("questionnaire", "")).split("|")[0]
        in (URL, "Questionnaire/kat-referral")
    )


def referral_from_response(qr: Mapping[str, Any]) -> dict[str, Any]:
    """The native referral artifact a ``kat-referral`` response answers; 422 naming each
    problem (``expression`` = the item's linkId, which is also the artifact field)."""
    problems: list[Issue] = []
    artifact: dict[str, Any] = {}
    identifier = qr.get("identifier")
    if (
        not isinstance(identifier, dict)
        or not isinstance(identifier.get("system"), str)
        or not isinstance(identifier.get("value"), str)
    ):
        problems.append(
            issue(
                "required",
                "the referral's identifier (system and value) is required",
                "QuestionnaireResponse.identifier",
            )
        )
    else:
        artifact["source_id"] = identifier["value"]
        artifact["referral_identifier"] = {
            "system": identifier["system"],
            "value": identifier["value"],
        }
    if not isinstance(qr.get("authored"), str):
        problems.append(
            issue(
                "required",
                "authored (the referral's date) is required",
                "QuestionnaireResponse.authored",
            )
        )
    else:
        artifact["authored_on"] = qr["authored"]
    if qr.get("status") not in REFERRAL_STATUSES:
        problems.append(
            issue(
                "value",
                "only a completed response is a referral (status completed)",
                "QuestionnaireResponse.status",
            )
        )
    _read_answers(qr, artifact, problems)
    if problems:
        raise Unprocessable(problems)
    return artifact


def answered_fields(qr: Mapping[str, Any]) -> dict[str, Any]:
    """The artifact fields a response's answers give, as far as they go (``$populate``'s
    in-progress response: a prefill, not a referral). An answer the item cannot take is left
    out, never coerced: the physician answers it."""
    artifact: dict[str, Any] = {}
    _read_answers(qr, artifact, [])
    return artifact


def _read_answers(qr: Mapping[str, Any], artifact: dict[str, Any], problems: list[Issue]) -> None:
    for link, answers in _answers(qr.get("item"), problems):
        item = _items().get(link)
        if item is None or item["type"] == "group":
            problems.append(issue("invalid", "not an item of Questionnaire kat-referral", link))
            continue
        values = [_value(item, a, problems) for a in answers]
        values = [v for v in values if v is not None]
        if len(values) > 1 and not item.get("repeats"):
            problems.append(issue("invalid", "this item takes one answer", link))
            continue
        if values:
            _assign(artifact, link, values)


def _answers(items: Any, problems: list[Issue]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("linkId"), str):
            problems.append(
                issue("structure", "an item needs a linkId", "QuestionnaireResponse.item")
            )
            continue
        answers = [a for a in item.get("answer", []) if isinstance(a, dict)]
        if answers:
            yield item["linkId"], answers
        yield from _answers(item.get("item"), problems)


def _value(item: Mapping[str, Any], answer: Mapping[str, Any], problems: list[Issue]) -> Any:
    link = item["linkId"]
    element = ANSWER[item["type"]]
    if item["type"] == "url" and "valueUri" not in answer and "valueUrl" in answer:
        element = "valueUrl"  # what some renderers write for a url item
    value = answer.get(element)
    if element == "valueCoding":
        if not isinstance(value, dict) or not isinstance(value.get("code"), str):
            problems.append(issue("value", "the answer must be a Coding", link))
            return None
        if item["type"] == "open-choice":
            # A problem-list condition, coded as the EMR holds it: the artifact checks the code.
            return {
                k: value[k] for k in ("system", "code", "display") if isinstance(value.get(k), str)
            }
        if not any(
            (o["system"], o["code"]) == (value.get("system"), value["code"]) for o in _options(item)
        ):
            problems.append(
                issue("code-invalid", f"{value['code']!r} is not one of this item's codes", link)
            )
            return None
        return value["code"]
    expected = _JSON.get(element, str)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        problems.append(issue("value", f"the answer must be {element}", link))
        return None
    return value


def _assign(artifact: dict[str, Any], link: str, values: list[Any]) -> None:
    """Put ``values`` where ``link`` names: ``a.b`` (one value), ``a[]`` (a list),
    ``a[].code`` (a list of objects with that key), ``a[code]`` (a list entry
    ``{"code": code, "value": v}`` — the referral's flags)."""
    head, _, rest = link.partition("[")
    path = head.split(".")
    target = artifact
    for part in path[:-1]:
        target = target.setdefault(part, {})
    last = path[-1]
    if not rest:
        target[last] = values[0]
    elif rest == "]":
        target.setdefault(last, []).extend(values)
    elif rest.startswith("]."):
        target.setdefault(last, []).extend({rest[2:]: v} for v in values)
    else:
        target.setdefault(last, []).append({"code": rest[:-1], "value": values[0]})
