"""Eligibility triage from coded referral data: each rule, condition status, age, every code of
every criterion ValueSet classified as intended, and (generated) that no code the rules do not
classify is ever accepted."""

from __future__ import annotations

import json
from typing import Any

import pytest
import responses
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kat.exchange.terminology import TerminologyServer
from fhir_kat.terminology.criteria import ICD10, load_criteria, normalise_icd
from fhir_kat.workflow.states import allowed, business_status, intake, needs_reason
from fhir_kat.workflow.triage import (
    RXNORM,
    SNOMED,
    Coding,
    Condition,
    ReferralFacts,
    load_rules,
    triage,
    triage_settings,
)

PTSD = Coding(SNOMED, "47505003")
ICD = "http://hl7.org/fhir/sid/icd-10"
ICD_CA = "http://hl7.org/fhir/sid/icd-10-ca"
ICD_PTSD = Coding(ICD_CA, "F43.1")
OK_FLAGS = {"prior_treatment_failure": True}
RULES = load_rules()
CRITERIA = load_criteria()


def facts(*conditions: Condition | Coding, **changes: Any) -> ReferralFacts:
    base: dict[str, Any] = {"conditions": (PTSD, *conditions), "flags": dict(OK_FLAGS), "age": 40}
    base.update(changes)
    return ReferralFacts(**base)


def kinds(decision: Any) -> list[tuple[str, str]]:
    return [(f.criterion, f.kind) for f in decision.findings]


def test_clearly_eligible() -> None:
    decision = triage(facts())
    assert decision.outcome == "eligible" and decision.findings == ()
    assert decision.business_status == "eligible"
    assert triage(facts(conditions=(ICD_PTSD,))).outcome == "eligible"


EXCLUSIONS = [
    ("psychosis", Coding(SNOMED, "69322001"), {}),
    ("dementia", Coding(SNOMED, "52448006"), {}),
    ("delirium", Coding(SNOMED, "2776000"), {}),
    ("coronary-artery-disease", Coding(SNOMED, "53741008"), {}),
    ("hypertension", Coding(SNOMED, "38341003"), {"uncontrolled": True}),
    ("cardiopulmonary", Coding(SNOMED, "84114007"), {"uncontrolled_cardiopulmonary": True}),
    ("aneurysm", Coding(SNOMED, "432119003"), {}),
    ("intracerebral-haemorrhage", Coding(SNOMED, "274100004"), {}),
    ("hepatic-cirrhosis", Coding(SNOMED, "19943007"), {}),
    ("hepatorenal", Coding(SNOMED, "51292008"), {}),
    ("pregnancy", Coding(SNOMED, "77386006"), {}),
    ("psychosis", Coding(ICD, "F20.0"), {}),
    ("psychosis", Coding(ICD, "F32.3"), {}),
    ("delirium", Coding(ICD_CA, "F10.4"), {}),
]


@pytest.mark.parametrize(("criterion", "coding", "flags"), EXCLUSIONS)
def test_each_exclusion_alone_rejects_and_is_named(
    criterion: str, coding: Coding, flags: dict[str, bool]
) -> None:
    decision = triage(facts(coding, flags={**OK_FLAGS, **flags}))
    assert decision.outcome == "rejected"
    assert [f.criterion for f in decision.findings] == [criterion]


def test_flag_and_allergy_exclusions() -> None:
    allergy = triage(facts(allergies=(Coding(RXNORM, "6130"),)))
    assert kinds(allergy) == [("ketamine-hypersensitivity", "exclusion")]
    inactive = Condition((Coding(SNOMED, "373464007"),), clinical="resolved")
    assert triage(facts(allergies=(inactive,))).outcome == "on-hold"
    assert triage(facts(flags={**OK_FLAGS, "aneurysm": True})).outcome == "rejected"


def test_timing_conditions_hold_and_never_reject() -> None:
    meds = triage(facts(flags={**OK_FLAGS, "recent_mood_medication_change": True}))
    assert kinds(meds) == [("recent-medication-change", "hold")]
    assert meds.findings[0].cleared_by == ("psychiatrist-clearance",)
    feeding = triage(facts(Coding(SNOMED, "1260078007")))
    assert kinds(feeding) == [("breastfeeding", "hold")]
    assert feeding.findings[0].cleared_by == ("contraindication-check",)
    assert triage(facts(Coding(ICD, "Z39.1"))).outcome == "on-hold"


def test_inclusions_reject_only_when_the_referrer_says_not_met() -> None:
    no_failure = triage(facts(flags={"prior_treatment_failure": False}))
    assert kinds(no_failure) == [("prior-treatment-failure", "inclusion-not-met")]
    assert triage(facts(flags={})).outcome == "on-hold"
    # No recognised diagnosis: review, never "not met".
    controlled = triage(
        facts(conditions=(Coding(SNOMED, "38341003"),), flags={**OK_FLAGS, "uncontrolled": False})
    )
    assert kinds(controlled) == [("diagnosis", "missing")]
    assert triage(facts(conditions=())).outcome == "on-hold"
    text_only = triage(facts(conditions=(), uncoded_conditions=1))
    assert {f.kind for f in text_only.findings} == {"missing", "unclassified"}


def test_relative_exclusions_and_uncontrolled_disease_go_to_a_clinician() -> None:
    lability = triage(facts(flags={**OK_FLAGS, "extreme_emotional_lability": True}))
    assert lability.outcome == "on-hold" and lability.business_status == "needs-review"
    htn = triage(facts(Coding(SNOMED, "38341003")))
    assert kinds(htn) == [("hypertension-control-unknown", "review")]
    heart = triage(facts(Coding(SNOMED, "84114007")))
    assert kinds(heart) == [("cardiopulmonary-control-unknown", "review")]
    controlled = triage(
        facts(Coding(SNOMED, "84114007"), flags={**OK_FLAGS, "uncontrolled_cardiopulmonary": False})
    )
    assert controlled.outcome == "eligible"


@pytest.mark.parametrize(
    ("clinical", "verification", "code", "outcome"),
    [
        ("active", "entered-in-error", "58214004", "eligible"),  # ignored
        ("active", "refuted", "77386006", "eligible"),
        ("active", "provisional", "58214004", "on-hold"),  # never rejects unconfirmed
        ("active", "differential", "77386006", "on-hold"),
        ("resolved", "confirmed", "2776000", "eligible"),  # a past delirium does not exclude
        ("resolved", "confirmed", "274100004", "rejected"),  # a past haemorrhage still does
        ("remission", "confirmed", "58214004", "on-hold"),  # psychosis history: a clinician
        ("inactive", "confirmed", "77386006", "eligible"),  # no longer pregnant
        ("recurrence", "confirmed", "58214004", "rejected"),
        ("", "", "58214004", "rejected"),  # no status stated counts as active
    ],
)
def test_condition_status(clinical: str, verification: str, code: str, outcome: str) -> None:
    condition = Condition(
        (Coding(SNOMED, code),), clinical or "active", verification or "confirmed"
    )
    assert triage(facts(condition)).outcome == outcome


def test_inactive_or_unconfirmed_diagnoses_do_not_count_as_inclusion() -> None:
    resolved = Condition((PTSD,), clinical="resolved")
    assert kinds(triage(facts(conditions=(resolved,)))) == [("diagnosis", "missing")]
    provisional = Condition((PTSD,), verification="provisional")
    assert triage(facts(conditions=(provisional,))).outcome == "on-hold"


def test_age() -> None:
    assert kinds(triage(facts(age=12))) == [("under-minimum-age", "review")]
    assert triage(facts(age=18)).outcome == "eligible"
    assert kinds(triage(facts(age=None))) == [("age-unknown", "missing")]
    assert triage(facts(age=18), minimum_age=19).outcome == "on-hold"
    assert triage(facts(age=12), minimum_age=12).outcome == "eligible"


def test_triage_settings() -> None:
    assert triage_settings({}).minimum_age is None
    assert triage_settings({"minimum_age": 19}).minimum_age == 19
    with pytest.raises(ValueError, match="minimum_age"):
        triage_settings({"minimum_age": "18"})
    with pytest.raises(ValueError, match="terminology_server"):
        triage_settings({"terminology_server": "ftp://x"})
    with pytest.raises(ValueError, match="unknown setting"):
        triage_settings({"min_age": 18})


# ---------------------------------------------------------------------- every ValueSet code

#: What a code of each criterion ValueSet must do beside PTSD (rule id and finding kind).
INTENDED = {
    "kat-criterion-psychosis": [("psychosis", "exclusion")],
    "kat-criterion-dementia": [("dementia", "exclusion")],
    "kat-criterion-delirium": [("delirium", "exclusion")],
    "kat-criterion-coronary-artery-disease": [("coronary-artery-disease", "exclusion")],
    "kat-criterion-aneurysm": [("aneurysm", "exclusion")],
    "kat-criterion-intracerebral-haemorrhage": [("intracerebral-haemorrhage", "exclusion")],
    "kat-criterion-hepatic-cirrhosis": [("hepatic-cirrhosis", "exclusion")],
    "kat-criterion-hepatorenal": [("hepatorenal", "exclusion")],
    "kat-criterion-pregnancy": [("pregnancy", "exclusion")],
    "kat-criterion-hypertension": [("hypertension-control-unknown", "review")],
    "kat-criterion-cardiopulmonary": [("cardiopulmonary-control-unknown", "review")],
    "kat-criterion-breastfeeding": [("breastfeeding", "hold")],
    "kat-criterion-not-relevant": [],
    "kat-criterion-diagnosis-depression": [],
    "kat-criterion-diagnosis-anxiety": [],
    "kat-criterion-diagnosis-ocd": [],
    "kat-criterion-diagnosis-ptsd": [],
    "kat-criterion-diagnosis-suicidality": [],
    "kat-criterion-diagnosis-substance-use": [],
}
INCLUSION_SETS = set(RULES["inclusion"][0]["value_sets"])


def _examples(value_set: str) -> list[Coding]:
    """Every listed member, and for each ICD-10 root a code below it (as a referral carries)."""
    out = []
    for system, code in CRITERIA[value_set].members():
        out.append(Coding(system, code))
        if system in ICD10 and len(normalise_icd(code)) == 3:
            below = Coding(system, f"{code}.9")
            if CRITERIA[value_set].contains(below.system, below.code):
                out.append(below)
    return out


def test_every_criterion_value_set_is_tested_and_used() -> None:
    assert set(INTENDED) == set(CRITERIA)
    used = set(RULES["inclusion"][0]["value_sets"]) | set(RULES["neutral"])
    used |= {
        r["value_set"]
        for key in ("exclusion", "conditional", "holds")
        for r in RULES[key]
        if "value_set" in r
    }
    assert used == set(CRITERIA)


@pytest.mark.parametrize("value_set", sorted(INTENDED))
def test_every_code_of_every_criterion_is_classified_as_intended(value_set: str) -> None:
    examples = _examples(value_set)
    assert examples, value_set
    wrong = {}
    for coding in examples:
        decision = triage(facts(coding))
        got = kinds(decision)
        want = INTENDED[value_set]
        # A code may belong to a stronger criterion as well (depression with psychotic
        # features: psychosis wins); it must never be unclassified or accepted against intent.
        stronger = decision.outcome == "rejected" and _also_classified_elsewhere(coding, value_set)
        if want and not set(want) <= set(got) and not stronger:
            wrong[coding.code] = got
        if not want and (
            any(k == "unclassified" for _, k in got)
            or (
                decision.outcome != "eligible" and not _also_classified_elsewhere(coding, value_set)
            )
        ):
            wrong[coding.code] = got
        if value_set in INCLUSION_SETS:
            alone = triage(facts(conditions=(coding,)))
            if alone.outcome == "on-hold" and ("diagnosis", "missing") in kinds(alone):
                wrong[coding.code] = kinds(alone)
    assert not wrong, wrong


def _also_classified_elsewhere(coding: Coding, value_set: str) -> bool:
    return any(
        vs.contains(coding.system, coding.code)
        for name, vs in CRITERIA.items()
        if name != value_set
    )


# ---------------------------------------------------------------------- unknown never accepted

KNOWN = {
    (system, normalise_icd(code) if system in ICD10 else code)
    for vs in CRITERIA.values()
    for system, code in vs.include.codes | vs.include.roots
}
SYSTEMS = st.sampled_from(
    [SNOMED, ICD, ICD_CA, "http://hl7.org/fhir/sid/icd-10-cm", "http://loinc.org", "urn:local"]
)
CODES = st.one_of(
    st.from_regex(r"\A[1-9][0-9]{5,17}\Z"),
    st.from_regex(r"\A[A-Z][0-9]{2}(\.[0-9A-Z]{1,4})?\Z"),
    st.text(min_size=1, max_size=12),
)


def _classified(coding: Coding) -> bool:
    return any(vs.contains(coding.system, coding.code) for vs in CRITERIA.values())


@settings(max_examples=400, deadline=None)
@given(system=SYSTEMS, code=CODES, clinical=st.sampled_from(["active", "resolved", "remission"]))
def test_an_unknown_code_never_yields_eligible(system: str, code: str, clinical: str) -> None:
    coding = Coding(system, code)
    if _classified(coding):
        return  # a code the rules know is judged by them (tests above)
    decision = triage(facts(Condition((coding,), clinical)))
    assert decision.outcome != "eligible"
    assert (
        any(f.kind == "unclassified" for f in decision.findings) or decision.outcome == "rejected"
    )


@settings(max_examples=200, deadline=None)
@given(code=st.from_regex(r"\A[1-9][0-9]{5,17}\Z"))
def test_an_unknown_code_beside_an_inclusion_diagnosis_is_review(code: str) -> None:
    coding = Coding(SNOMED, code)
    if _classified(coding):
        return
    decision = triage(facts(coding))
    assert decision.outcome == "on-hold"
    assert any(f.kind == "unclassified" and code in f.text for f in decision.findings)


# ---------------------------------------------------------------------- terminology server


@responses.activate
def test_a_terminology_server_widens_the_lists_and_its_silence_is_review() -> None:
    base = "https://tx.example.org/fhir"
    child = "1234567001"  # a made-up descendant the lists do not know

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        a, b = request.params["codeA"], request.params["codeB"]
        outcome = "subsumes" if (a, b) == ("69322001", child) else "not-subsumed"
        body = {
            "resourceType": "Parameters",
            "parameter": [{"name": "outcome", "valueCode": outcome}],
        }
        return 200, {}, json.dumps(body)

    responses.add_callback(responses.GET, f"{base}/CodeSystem/$subsumes", callback=answer)
    server = TerminologyServer(base)
    unknown = facts(Coding(SNOMED, child))
    assert triage(unknown).outcome == "on-hold"  # offline: unclassified
    assert kinds(triage(unknown, oracle=server)) == [("psychosis", "exclusion")]
    calls = len(responses.calls)
    triage(unknown, oracle=server)
    assert len(responses.calls) == calls  # answers are remembered
    responses.replace(responses.GET, f"{base}/CodeSystem/$subsumes", status=503)
    down = TerminologyServer(base)
    assert (
        triage(unknown, oracle=down).outcome == "on-hold"
    )  # a server that is down accepts nothing


def test_rules_are_data_with_a_version() -> None:
    assert RULES["version"] >= 2
    ids = [r["id"] for key in ("exclusion", "conditional", "holds", "review") for r in RULES[key]]
    assert len(ids) == len(set(ids))
    steps = set(intake()["steps"])
    for key in ("inclusion", "exclusion", "conditional", "holds", "review"):
        for rule in RULES[key]:
            assert rule["cleared_by"] and set(rule["cleared_by"]) <= steps, rule["id"]


def test_task_state_machine() -> None:
    assert allowed("requested", "received") and allowed("on-hold", "rejected")
    assert allowed("received", "accepted") and allowed("on-hold", "received")
    assert allowed("accepted", "in-progress") and allowed("in-progress", "completed")
    assert not allowed("completed", "in-progress") and not allowed("requested", "completed")
    assert needs_reason("rejected") and not needs_reason("accepted")
    assert business_status("eligible")["coding"][0]["code"] == "eligible"
