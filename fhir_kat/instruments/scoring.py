"""Checking a QuestionnaireResponse against its Questionnaire, scoring it, and SDC
observation-based extraction.

Scores come from the Questionnaire itself (each answer option's ``ordinalValue``), so the
numbers live in one place. Rules for incomplete responses: a response still ``in-progress``
gets no total at all (never a final total from a partial response); PHQ-9, GAD-7 and PCL-5 are
scored only when every scored item is answered (no prorating); B-IPF from the domains answered
with a value ("not applicable" leaves the denominator, the NCPTSD IPF method), but only when no
domain is left unanswered ("not answered" is not "not applicable") and at least the
instrument's ``min_answered`` domains have a value (issue 17).
Each Questionnaire's total item carries an SDC ``calculatedExpression`` that computes the same
(tests/web/test_browser.py proves it in a real renderer, tests/test_questionnaire_forms.py with
fhirpathpy): a response may carry that answer, and it is checked against the service's own
total, never trusted in its place.
Extraction follows SDC's observation-based rules: status final, effective = authored, one
Observation per answered coded item (none for skipped items), plus the total with its band and
screen result as interpretation, each ``derivedFrom`` the QuestionnaireResponse.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhir_kat.errors import Issue, issue
from fhir_kat.instruments.definitions import Instrument

ORDINAL = "http://hl7.org/fhir/StructureDefinition/ordinalValue"
#: Where renderers copy an option's score onto the answer's Coding: R4's ordinalValue, or the
#: itemWeight extension that replaces it in R5 and SDC 4.
SCORE_EXTENSIONS = (ORDINAL, "http://hl7.org/fhir/StructureDefinition/itemWeight")
CALCULATED = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-calculatedExpression"
#: Totals as the service reports them: B-IPF's percentage to one decimal, the sums whole. A sent
#: total agrees when it rounds to the service's figure (a renderer may send 42.857142857 for 42.9).
REPORTED_DECIMALS = 1
#: A literal reference to a Patient, relative or absolute (a transaction's urn:uuid is resolved
#: before the write rules run).
PATIENT_REFERENCE = re.compile(r"(^|/)Patient/[A-Za-z0-9\-.]{1,64}$")
#: The answer elements each item type takes (R4 QuestionnaireResponse.item.answer.value[x]).
ANSWER_ELEMENTS: dict[str, tuple[str, ...]] = {
    "boolean": ("valueBoolean",),
    "decimal": ("valueDecimal",),
    "integer": ("valueInteger",),
    "date": ("valueDate",),
    "dateTime": ("valueDateTime",),
    "time": ("valueTime",),
    "string": ("valueString",),
    "text": ("valueString",),
    "url": ("valueUri",),
    "choice": ("valueCoding",),
    "open-choice": ("valueCoding", "valueString"),
    "attachment": ("valueAttachment",),
    "reference": ("valueReference",),
    "quantity": ("valueQuantity",),
}
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
SURVEY = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "survey",
    "display": "Survey",
}
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000002")


def own_identifier(resource_id: str) -> list[dict[str, str]]:
    """The business identifier of a derived resource with no natural one: its deterministic id
    as a URI (the mapping engine's ``$id: urn``), so a partner can conditionally create it."""
    return [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{resource_id}"}]


@dataclass(frozen=True)
class Score:
    total: float | None
    answered: int  # scored items answered with a value
    scored_items: int
    item_values: Mapping[str, float]  # linkId -> ordinal of the chosen option
    not_applicable: int = 0  # scored items answered "not applicable" (an option without a score)
    #: The total the answers give were the response finished (``total`` is None while it is
    #: ``in-progress``): what a renderer's calculated item may show meanwhile.
    provisional: float | None = None
    min_answered: int = 1

    @property
    def complete(self) -> bool:
        return self.answered == self.scored_items

    @property
    def unanswered(self) -> int:
        """Scored items with no answer at all (skipped), as opposed to "not applicable"."""
        return self.scored_items - self.answered - self.not_applicable


def _items(questionnaire: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {i["linkId"]: i for i in questionnaire.get("item", [])}


def _ordinal(option: Mapping[str, Any]) -> float | None:
    for ext in option.get("extension", []):
        if ext.get("url") == ORDINAL:
            return float(ext["valueDecimal"])
    return None


def _sent_score(coding: Mapping[str, Any]) -> float | None:
    """The score a renderer copied onto the answer, if it did (LHC-Forms does)."""
    for ext in coding.get("extension") or []:
        if isinstance(ext, Mapping) and ext.get("url") in SCORE_EXTENSIONS:
            value = ext.get("valueDecimal", ext.get("valueInteger"))
            if _is_number(value):
                return float(value)
    return None


def _answer_coding(item: Mapping[str, Any]) -> Mapping[str, Any] | None:
    answers = item.get("answer") or []
    coding = answers[0].get("valueCoding") if answers else None
    return coding if isinstance(coding, Mapping) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def is_calculated(item: Mapping[str, Any]) -> bool:
    return any(e.get("url") == CALCULATED for e in item.get("extension", []))


def computed_by_service(item: Mapping[str, Any], instrument: Instrument) -> bool:
    """A calculated item the service computes itself: the instrument's total (by its code)."""
    total = (instrument.total["system"], instrument.total["code"])
    return is_calculated(item) and any(
        (c.get("system"), c.get("code")) == total for c in item.get("code", [])
    )


def takes_answers(item: Mapping[str, Any], instrument: Instrument) -> bool:
    """Questions take answers; display and group items never do, and a read-only item only
    when the service computes it too (so that a sent value can be checked)."""
    if item.get("type") in ("display", "group"):
        return False
    return not item.get("readOnly") or computed_by_service(item, instrument)


def total_issue(
    link: str, sent: float, result: Score, instrument: Instrument, where: str
) -> Issue | None:
    """A sent value of the total that is not the service's own, as one issue naming the item
    and both values. The values are scores, not anything a person typed, and go back only to
    the sender: a renderer and the service disagreeing about a suicide-risk score must be seen,
    never stored silently."""
    # While a response is in progress the service stores no total, but a renderer's calculated
    # item may show what the answers give so far: compared with that, not refused for it.
    own = result.provisional
    if own is not None and round(sent, REPORTED_DECIMALS) == own:
        return None
    if own is None:
        if not instrument.score_partial:
            why = (
                f"{result.answered} of {result.scored_items} scored items answered, and a "
                f"total needs all {result.scored_items} (no prorating)"
            )
        elif result.unanswered:
            why = (
                f"{result.unanswered} domain(s) left unanswered (not answered is not "
                '"not applicable")'
            )
        else:
            why = (
                f"{result.answered} domain(s) answered with a score, and a score needs at "
                f"least {result.min_answered}"
            )
        ours = f"no total: {why}"
    else:
        ours = f"{_number(own)} from its answers"
    text = f"item '{link}' is {_number(sent)} in the response, but the service computes {ours}"
    return issue("value", text, where)


def check_response(
    qr: Mapping[str, Any], questionnaire: Mapping[str, Any], instrument: Instrument
) -> list[Issue]:
    """A FHIR QuestionnaireResponse against its Questionnaire, as SDC renderers send them — one
    issue per problem, naming the item.

    The response names its participant (``subject``: a Patient) and ``authored``: everything
    scored from it hangs on them. Accepted: ``text`` on items, ``questionnaire`` with or without
    a known ``|version``, answers
    as ``valueCoding`` with or without the option's score copied on, and an answer to the total
    when it agrees with the service's own. Refused: an unknown linkId, an item twice, nested
    items (the Questionnaires are flat), answers to display items or to read-only items the
    service does not compute, several answers to a non-repeating item, an answer of the wrong
    type or outside the options, a copied score that differs from the Questionnaire's, and a
    total that differs from the service's (checked once everything else is right).
    """
    problems = _version_issues(qr, instrument) + _context_issues(qr)
    items = _items(questionnaire)
    seen: set[str] = set()
    totals: list[tuple[str, float, str]] = []  # (linkId, sent value, where)
    for i, answered in enumerate(qr.get("item") or []):
        where = f"QuestionnaireResponse.item[{i}]"
        link = answered.get("linkId")
        item = items.get(link) if isinstance(link, str) else None
        if item is None:
            problems.append(
                issue("value", "linkId is not an item of the Questionnaire", f"{where}.linkId")
            )
            continue
        if link in seen:
            problems.append(
                issue("duplicate", f"item '{link}' appears more than once", f"{where}.linkId")
            )
        seen.add(link)
        if answered.get("item"):
            problems.append(
                issue("structure", f"item '{link}' has no nested items", f"{where}.item")
            )
        answers = answered.get("answer") or []
        if not answers:
            continue
        if not takes_answers(item, instrument):
            kind = item.get("type") if item.get("type") in ("display", "group") else "read-only"
            problems.append(
                issue(
                    "value",
                    f"item '{link}' is a {kind} item: it takes no answer",
                    f"{where}.answer",
                )
            )
            continue
        if len(answers) > 1 and not item.get("repeats"):
            problems.append(issue("value", f"item '{link}' takes one answer", f"{where}.answer[1]"))
        for j, answer in enumerate(answers):
            at = f"{where}.answer[{j}]"
            found = _answer_issue(link, item, answer, at)
            if found is not None:
                problems.append(found)
            elif item.get("readOnly"):
                element = next(k for k in answer if k.startswith("value"))
                totals.append((link, float(answer[element]), f"{at}.{element}"))
    if totals and not problems:  # a total compared with answers that are wrong means nothing
        result = score(qr, questionnaire, instrument)
        for link, sent, at in totals:
            found = total_issue(link, sent, result, instrument, at)
            if found is not None:
                problems.append(found)
    return problems


def _context_issues(qr: Mapping[str, Any]) -> list[Issue]:
    """Scores, Observations and safety Flags are recorded for a patient at a time: a response
    without either could be stored but never scored, and a Flag would be lost silently."""
    problems = []
    subject = qr.get("subject")
    reference = subject.get("reference") if isinstance(subject, Mapping) else None
    if not isinstance(reference, str) or not PATIENT_REFERENCE.search(reference):
        problems.append(
            issue(
                "required",
                "a response to a program instrument names its participant: subject is a "
                "reference to a Patient (Patient/<id>)",
                "QuestionnaireResponse.subject",
            )
        )
    if not qr.get("authored"):
        problems.append(
            issue(
                "required",
                "a response to a program instrument says when it was answered (authored)",
                "QuestionnaireResponse.authored",
            )
        )
    return problems


def _version_issues(qr: Mapping[str, Any], instrument: Instrument) -> list[Issue]:
    url, _, version = str(qr.get("questionnaire", "")).partition("|")
    if not version or version in instrument.questionnaire_versions:
        return []
    return [
        issue(
            "not-supported",
            f"this service publishes versions {', '.join(instrument.questionnaire_versions)} of "
            f"{url}, not the version the response names",
            "QuestionnaireResponse.questionnaire",
        )
    ]


def _answer_issue(
    link: str, item: Mapping[str, Any], answer: Mapping[str, Any], at: str
) -> Issue | None:
    if answer.get("item"):
        return issue("structure", f"answers to '{link}' have no nested items", f"{at}.item")
    expected = ANSWER_ELEMENTS.get(str(item.get("type")), ())
    element = next((k for k in answer if k.startswith("value")), None)
    if element is None:
        return issue("required", f"the answer to '{link}' has no value", at)
    if element not in expected:
        return issue("value", f"item '{link}' takes {' or '.join(expected) or 'no answer'}", at)
    value = answer[element]
    if element in ("valueInteger", "valueDecimal"):
        if not _is_number(value) or (element == "valueInteger" and not isinstance(value, int)):
            return issue("value", f"item '{link}' takes a number", f"{at}.{element}")
        return None
    if element != "valueCoding":
        return None
    coding = value if isinstance(value, Mapping) else {}
    option = next(
        (
            o
            for o in item.get("answerOption", [])
            if (o["valueCoding"].get("system"), o["valueCoding"]["code"])
            == (coding.get("system"), coding.get("code"))
        ),
        None,
    )
    if option is None:
        return issue(
            "value", f"the answer to '{link}' is not one of its options", f"{at}.valueCoding"
        )
    sent, own = _sent_score(coding), _ordinal(option)
    if sent is not None and sent != own:
        ours = "no score" if own is None else f"a score of {_number(own)}"
        return issue(
            "value",
            f"the answer to '{link}' carries a score of {_number(sent)}; the Questionnaire gives "
            f"that option {ours}",
            f"{at}.valueCoding.extension",
        )
    return None


def score(qr: Mapping[str, Any], questionnaire: Mapping[str, Any], instrument: Instrument) -> Score:
    items = _items(questionnaire)
    scored = [
        link
        for link, item in items.items()
        if not item.get("readOnly")
        and any(_ordinal(o) is not None for o in item.get("answerOption", []))
    ]
    values: dict[str, float] = {}
    not_applicable: set[str] = set()
    for answered in qr.get("item", []):
        link = answered.get("linkId")
        coding = _answer_coding(answered)
        if link not in scored or coding is None:
            continue
        option = next(
            (
                o
                for o in items[link]["answerOption"]
                if o["valueCoding"]["code"] == coding.get("code")
            ),
            None,
        )
        value = _ordinal(option) if option else None
        if value is not None:
            values[link] = value
        elif option is not None:
            not_applicable.add(link)
    provisional: float | None = None
    minimum = max(instrument.min_answered, 1)
    if instrument.score_partial:
        every_domain = len(values) + len(not_applicable) == len(scored)
        if every_domain and len(values) >= minimum:
            top = max(_ordinal(o) or 0.0 for o in items[scored[0]]["answerOption"])
            provisional = round(sum(values.values()) * 100 / (top * len(values)), REPORTED_DECIMALS)
    elif len(values) == len(scored):
        provisional = sum(values.values())
    total = provisional if qr.get("status") != "in-progress" else None
    return Score(total, len(values), len(scored), values, len(not_applicable), provisional, minimum)


def extract(
    qr: Mapping[str, Any], questionnaire: Mapping[str, Any], instrument: Instrument, result: Score
) -> list[dict[str, Any]]:
    """The Observations SDC observation-based extraction yields (ids deterministic)."""
    qr_ref = f"QuestionnaireResponse/{qr['id']}"
    common: dict[str, Any] = {
        "status": "final",
        "category": [{"coding": [SURVEY]}],
        "subject": qr["subject"],
        "effectiveDateTime": qr["authored"],
        "derivedFrom": [{"reference": qr_ref}],
    }
    out = []
    items = _items(questionnaire)
    for answered in qr.get("item", []):
        link = answered.get("linkId")
        coding = _answer_coding(answered)
        item = items.get(link)
        if coding is None or item is None or not item.get("code"):
            continue  # SDC: no Observation for a skipped item
        oid = str(uuid.uuid5(NAMESPACE, f"{qr_ref}|{link}"))
        out.append(
            {
                "resourceType": "Observation",
                "id": oid,
                "identifier": own_identifier(oid),
                **common,
                "code": {"coding": [dict(c) for c in item["code"]], "text": item.get("text", link)},
                "valueCodeableConcept": {"coding": [dict(coding)]},
            }
        )
    if result.total is not None:
        band = instrument.band(result.total)
        unit = instrument.unit
        positive = instrument.positive(result.total)
        tid = str(uuid.uuid5(NAMESPACE, f"{qr_ref}|total"))
        out.append(
            {
                "resourceType": "Observation",
                "id": tid,
                "identifier": own_identifier(tid),
                **common,
                "code": {"coding": [dict(instrument.total)]},
                "valueQuantity": {
                    "value": result.total,
                    "unit": unit,
                    "system": "http://unitsofmeasure.org",
                    "code": unit,
                },
                "interpretation": [
                    {
                        "coding": [
                            {
                                "system": instrument.band_system,
                                "code": band.code,
                                "display": band.display,
                            }
                        ]
                    },
                    {
                        "coding": [
                            {
                                "system": INTERPRETATION,
                                "code": "POS" if positive else "NEG",
                                "display": "Positive" if positive else "Negative",
                            }
                        ]
                    },
                ],
                "hasMember": [{"reference": f"Observation/{o['id']}"} for o in out],
            }
        )
    return out
