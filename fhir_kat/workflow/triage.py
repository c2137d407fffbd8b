"""Eligibility triage of a referral from its coded data, driven by ``eligibility.yaml``.

Outcome: ``accepted`` (eligible: intake can start), ``rejected`` (each exclusion met and each
inclusion the data shows is not met, named), or ``on-hold`` (needs clinician review: data
missing or uncertain, or a relative exclusion). Missing or uncertain data never rejects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

RULES_FILE = Path(__file__).resolve().parents[2] / "mappings" / "workflow" / "eligibility.yaml"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


@dataclass(frozen=True)
class Coding:
    system: str
    code: str


@dataclass(frozen=True)
class ReferralFacts:
    """What the referral says, reduced to what triage reads. ``None`` = not stated."""

    conditions: tuple[Coding, ...] = ()
    uncoded_conditions: int = 0  # diagnoses given only as text or in an unknown system
    allergies: tuple[Coding, ...] = ()
    flags: Mapping[str, bool | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    criterion: str
    text: str
    kind: str  # "exclusion" | "inclusion-not-met" | "review" | "missing"


@dataclass(frozen=True)
class Decision:
    outcome: str  # accepted | rejected | on-hold
    findings: tuple[Finding, ...]
    rules_version: int

    @property
    def business_status(self) -> str:
        return {"accepted": "eligible", "rejected": "ineligible", "on-hold": "needs-review"}[
            self.outcome
        ]


@cache
def load_rules(path: Path = RULES_FILE) -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return rules


def _matches(rule: Mapping[str, Any], codings: Iterable[Coding], icd10: Iterable[str]) -> bool:
    snomed = set(rule.get("snomed", ()))
    prefixes = tuple(rule.get("icd10_prefixes", ()))
    icd_systems = set(icd10)
    for coding in codings:
        if coding.system == SNOMED and coding.code in snomed:
            return True
        if coding.system in icd_systems and prefixes and coding.code.startswith(prefixes):
            return True
    return False


def triage(facts: ReferralFacts, rules: Mapping[str, Any] | None = None) -> Decision:
    rules = rules or load_rules()
    icd10 = rules["icd10"]
    findings: list[Finding] = []
    for rule in rules["exclusion"]:
        met = False
        if "allergy_substance" in rule:
            subst = rule["allergy_substance"]
            met = any(
                (a.system == SNOMED and a.code in subst.get("snomed", ()))
                or (a.system == RXNORM and a.code in subst.get("rxnorm", ()))
                for a in facts.allergies
            )
        elif "flag" in rule:
            met = facts.flags.get(rule["flag"]) is True
        elif _matches(rule, facts.conditions, icd10):
            needed = rule.get("requires_flag")
            met = needed is None or facts.flags.get(needed) is True
        if met:
            findings.append(Finding(rule["id"], rule["text"], "exclusion"))
    for rule in rules["inclusion"]:
        if "any_condition" in rule:
            if _matches(rule["any_condition"], facts.conditions, icd10):
                continue
            if facts.uncoded_conditions or not facts.conditions:
                findings.append(Finding(rule["id"], rule["text"], "missing"))
            else:
                findings.append(Finding(rule["id"], rule["text"], "inclusion-not-met"))
        elif "flag" in rule:
            value = facts.flags.get(rule["flag"])
            if value is None:
                findings.append(Finding(rule["id"], rule["text"], "missing"))
            elif value is False:
                findings.append(Finding(rule["id"], rule["text"], "inclusion-not-met"))
    for rule in rules["review"]:
        if "flag" in rule:
            hit = facts.flags.get(rule["flag"]) is True
        else:
            hit = _matches(rule, facts.conditions, icd10) and (
                facts.flags.get(rule.get("unless_flag", "")) is None
            )
        if hit:
            findings.append(Finding(rule["id"], rule["text"], "review"))
    kinds = {f.kind for f in findings}
    if kinds & {"exclusion", "inclusion-not-met"}:
        outcome = "rejected"
        findings = [f for f in findings if f.kind in ("exclusion", "inclusion-not-met")]
    elif kinds:
        outcome = "on-hold"
    else:
        outcome = "accepted"
    return Decision(outcome, tuple(findings), int(rules["version"]))
