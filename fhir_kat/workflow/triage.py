"""Eligibility triage of a referral from its coded data, driven by ``eligibility.yaml`` and the
criterion ValueSets of ``mappings/terminology/criteria/``.

Outcome: ``rejected`` (a recognised exclusion, or an inclusion the referrer says is not met —
each named), ``on-hold`` (a clinician decides: a hold, a review criterion, missing data, or a
coded condition no criterion classifies — unknown means review, never a default), or
``eligible`` (intake can start). Nothing the rules cannot classify is ever ``eligible``.
Every finding that holds the referral names the intake step(s) that can clear it. The decision
also names the inclusion criteria the facts meet (``met``): the reasons a CDS Hooks card gives
(``services/cds_hooks``), from this one rule set.

Must not: read the store or the clock (``services/referrals`` gathers the facts), call HTTP
(a terminology server is reached through the ``Subsumption`` oracle it is given).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fhir_kat.canonical import read_definition
from fhir_kat.terminology.criteria import CriterionSet, Subsumption, load_criteria

RULES_FILE = Path(__file__).resolve().parents[2] / "mappings" / "workflow" / "eligibility.yaml"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
#: Condition.clinicalStatus codes that mean "not current" (HL7 condition-clinical).
INACTIVE = frozenset({"inactive", "remission", "resolved"})
#: Condition.verificationStatus codes that mean "not established" (HL7 condition-ver-status).
UNCONFIRMED = frozenset({"unconfirmed", "provisional", "differential"})
IGNORED = frozenset({"refuted", "entered-in-error"})
#: Kinds of finding that reject; every other kind holds the referral for a clinician.
REJECTING = frozenset({"exclusion", "inclusion-not-met"})
#: Short names of the systems a statusReason names unclassified codes in.
SYSTEM_LABELS = {
    SNOMED: "SNOMED CT",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://hl7.org/fhir/sid/icd-10-ca": "ICD-10-CA",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
}
_CODE_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,39}$")


@dataclass(frozen=True)
class Coding:
    system: str
    code: str


@dataclass(frozen=True)
class Condition:
    """A coded condition as triage reads it: its codings and HL7 status codes ("" = not
    stated; a condition without clinicalStatus counts as active)."""

    codings: tuple[Coding, ...]
    clinical: str = "active"
    verification: str = "confirmed"

    @property
    def ignored(self) -> bool:
        return self.verification in IGNORED

    @property
    def inactive(self) -> bool:
        return self.clinical in INACTIVE

    @property
    def unconfirmed(self) -> bool:
        return self.verification in UNCONFIRMED


@dataclass(frozen=True)
class ReferralFacts:
    """What the referral says, reduced to what triage reads. ``None`` = not stated.

    ``conditions`` and ``allergies`` accept plain ``Coding`` values (an active, confirmed
    condition of that one code) for brevity."""

    conditions: tuple[Condition | Coding, ...] = ()
    uncoded_conditions: int = 0  # diagnoses given only as text
    allergies: tuple[Condition | Coding, ...] = ()
    flags: Mapping[str, bool | None] = field(default_factory=dict)
    #: Age in whole years when the referral was written; None = no birth date (review).
    age: int | None = None


@dataclass(frozen=True)
class Finding:
    criterion: str
    text: str
    #: exclusion | inclusion-not-met | hold | review | missing | unclassified | met (an
    #: inclusion the facts meet: a reason, never a problem)
    kind: str
    #: intake steps whose clearance lifts this finding (kat-intake codes)
    cleared_by: tuple[str, ...] = ()

    @property
    def rejects(self) -> bool:
        return self.kind in REJECTING


@dataclass(frozen=True)
class Decision:
    outcome: str  # eligible | rejected | on-hold
    findings: tuple[Finding, ...]
    rules_version: int
    #: The inclusion criteria the facts meet (kind ``met``), in the rules' order.
    met: tuple[Finding, ...] = ()

    @property
    def business_status(self) -> str:
        return {"eligible": "eligible", "rejected": "ineligible", "on-hold": "needs-review"}[
            self.outcome
        ]

    @property
    def holds(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.rejects)


@cache
def load_rules(path: Path = RULES_FILE) -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(read_definition(path))
    return rules


def _as_condition(item: Condition | Coding) -> Condition:
    return item if isinstance(item, Condition) else Condition((item,))


def name_code(coding: Coding) -> str:
    """``SNOMED CT 58214004`` — how a statusReason names a code (the code only when it is
    shaped like one, so free text sent as a code is never echoed)."""
    label = SYSTEM_LABELS.get(coding.system, coding.system[:80] or "no system")
    code = coding.code if _CODE_SHAPE.match(coding.code) else "<not a code>"
    return f"{label} {code}"


class _Classifier:
    def __init__(self, sets: Mapping[str, CriterionSet], oracle: Subsumption | None) -> None:
        self.sets = sets
        self.oracle = oracle

    def member(self, value_set: str, coding: Coding, *, inclusion: bool = False) -> bool:
        return self.sets[value_set].contains(
            coding.system, coding.code, self.oracle, icd_beyond_who=not inclusion
        )

    def any_member(self, value_set: str, condition: Condition, *, inclusion: bool = False) -> bool:
        return any(self.member(value_set, c, inclusion=inclusion) for c in condition.codings)


def triage(
    facts: ReferralFacts,
    rules: Mapping[str, Any] | None = None,
    *,
    minimum_age: int | None = None,
    oracle: Subsumption | None = None,
    criteria: Mapping[str, CriterionSet] | None = None,
) -> Decision:
    """The decision for ``facts``. ``minimum_age`` overrides the rules' default (configuration);
    ``oracle`` answers SNOMED CT subsumption when a terminology server is configured."""
    rules = rules or load_rules()
    known = _Classifier(criteria or load_criteria(), oracle)
    conditions = [c for c in map(_as_condition, facts.conditions) if not c.ignored]
    allergies = [a for a in map(_as_condition, facts.allergies) if not a.ignored]
    findings: list[Finding] = []
    classified: set[int] = set()  # indexes into ``conditions``

    def add(rule: Mapping[str, Any], kind: str, text: str | None = None, rid: str = "") -> None:
        finding = Finding(
            rid or rule["id"], text or rule["text"], kind, tuple(rule.get("cleared_by", ()))
        )
        if finding not in findings:
            findings.append(finding)

    def judge(rule: Mapping[str, Any], kind: str, hits: Iterable[Condition]) -> None:
        """One matched condition per call: active+confirmed → ``kind``; else by status."""
        for condition in hits:
            if condition.unconfirmed:
                add(rule, "review", f"{rule['text']}: recorded as {condition.verification}")
            elif condition.inactive:
                how = rule.get("inactive", "review")
                if how == "exclude":
                    add(rule, kind)
                elif how == "review":
                    add(rule, "review", f"{rule['text']}: recorded as {condition.clinical}")
            else:
                add(rule, kind)

    def matching(value_set: str) -> list[Condition]:
        hits = []
        for i, condition in enumerate(conditions):
            if known.any_member(value_set, condition):
                classified.add(i)
                hits.append(condition)
        return hits

    for rule in rules["exclusion"]:
        if rule.get("flag") and facts.flags.get(rule["flag"]) is True:
            add(rule, "exclusion")
        if "value_set" in rule:
            judge(rule, "exclusion", matching(rule["value_set"]))
        if "allergy_substance" in rule:
            subst = rule["allergy_substance"]
            judge(
                rule,
                "exclusion",
                [
                    a
                    for a in allergies
                    if any(
                        (c.system == SNOMED and c.code in subst.get("snomed", ()))
                        or (c.system == RXNORM and c.code in subst.get("rxnorm", ()))
                        for c in a.codings
                    )
                ],
            )
    for rule in rules["conditional"]:
        hits = matching(rule["value_set"])
        if not hits:
            continue
        stated = facts.flags.get(rule["flag"])
        if stated is True:
            judge(rule, "exclusion", hits)
        elif stated is None:
            review = {**rule, "id": rule["review_id"], "text": rule["review_text"]}
            judge(review, "review", hits)
    for rule in rules["holds"]:
        if rule.get("flag") and facts.flags.get(rule["flag"]) is True:
            add(rule, "hold")
        if "value_set" in rule:
            judge(
                {**rule, "inactive": rule.get("inactive", "review")},
                "hold",
                matching(rule["value_set"]),
            )
    for rule in rules["review"]:
        if facts.flags.get(rule["flag"]) is True:
            add(rule, "review")
    for value_set in rules.get("neutral", ()):
        matching(value_set)
    met: list[Finding] = []
    _inclusions(rules, facts, conditions, known, classified, add, met)
    _age(rules, facts, minimum_age, add)
    unclassified = rules["unclassified"]
    for i, condition in enumerate(conditions):
        if i not in classified and condition.codings:
            names = ", ".join(name_code(c) for c in condition.codings[:3])
            add(unclassified, "unclassified", f"{unclassified['text']} ({names})", "unclassified")
    if facts.uncoded_conditions:
        add(unclassified, "unclassified", "a condition given as text only", "uncoded-condition")
    version = int(rules["version"])
    if any(f.rejects for f in findings):
        return Decision("rejected", tuple(f for f in findings if f.rejects), version, tuple(met))
    return Decision("on-hold" if findings else "eligible", tuple(findings), version, tuple(met))


def _inclusions(
    rules: Mapping[str, Any],
    facts: ReferralFacts,
    conditions: list[Condition],
    known: _Classifier,
    classified: set[int],
    add: Any,
    met: list[Finding],
) -> None:
    for rule in rules["inclusion"]:
        if "value_sets" in rule:
            meeting: list[Coding] = []
            for i, condition in enumerate(conditions):
                for value_set in rule["value_sets"]:
                    if not known.any_member(value_set, condition, inclusion=True):
                        continue
                    classified.add(i)  # recognised, even when its status keeps it from counting
                    if not condition.inactive and not condition.unconfirmed:
                        meeting += [
                            c
                            for c in condition.codings
                            if known.member(value_set, c, inclusion=True) and c not in meeting
                        ]
            if meeting:
                names = ", ".join(name_code(c) for c in meeting[:3])
                met.append(Finding(rule["id"], f"{rule['text']} ({names})", "met"))
            else:
                # Never "not met": the diagnosis may be one the rules do not recognise.
                add(rule, "missing", f"no recognised {rule['text']}")
        elif "flag" in rule:
            value = facts.flags.get(rule["flag"])
            if value is None:
                add(rule, "missing", f"{rule['text']} not stated")
            elif value is False:
                add(rule, "inclusion-not-met")
            else:
                met.append(Finding(rule["id"], rule["text"], "met"))


def referrer_statements(rules: Mapping[str, Any] | None = None) -> frozenset[str]:
    """Ids of the inclusion criteria only the referrer can state (flags such as a history of
    previous treatment failure): a chart read by CDS Hooks never carries them, the referral
    form asks them."""
    rules = rules or load_rules()
    return frozenset(str(r["id"]) for r in rules["inclusion"] if "flag" in r)


def _age(rules: Mapping[str, Any], facts: ReferralFacts, minimum: int | None, add: Any) -> None:
    limit = int(rules["minimum_age"] if minimum is None else minimum)
    if facts.age is None:
        add(rules["age"]["unknown"], "missing")
    elif facts.age < limit:
        rule = rules["age"]["under_minimum"]
        add(rule, "review", f"{rule['text']} ({limit})")


@dataclass(frozen=True)
class TriageSettings:
    """``[program.triage]``: ``minimum_age`` (default: the rules' 18) and
    ``terminology_server`` (a FHIR base URL answering ``CodeSystem/$subsumes``; none by default)."""

    minimum_age: int | None = None
    terminology_server: str | None = None


def triage_settings(table: Mapping[str, Any]) -> TriageSettings:
    """Validated ``[program.triage]``; ``ValueError`` naming every bad entry."""
    problems = [
        f"[program.triage].{k}: unknown setting"
        for k in sorted(set(table) - {"minimum_age", "terminology_server"})
    ]
    age = table.get("minimum_age")
    if age is not None and (
        isinstance(age, bool) or not isinstance(age, int) or not 0 <= age <= 120
    ):
        problems.append("[program.triage].minimum_age: a whole number of years (0-120)")
    server = table.get("terminology_server")
    if server is not None and (
        not isinstance(server, str) or not server.startswith(("https://", "http://"))
    ):
        problems.append("[program.triage].terminology_server: an http(s) FHIR base URL")
    if problems:
        raise ValueError("; ".join(problems))
    return TriageSettings(age, server or None)


__all__ = [
    "RXNORM",
    "SNOMED",
    "Coding",
    "Condition",
    "Decision",
    "Finding",
    "ReferralFacts",
    "TriageSettings",
    "load_rules",
    "name_code",
    "referrer_statements",
    "triage",
    "triage_settings",
]
