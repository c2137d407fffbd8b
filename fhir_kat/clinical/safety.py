"""Safety signals: the rules that turn a recorded fact into a Flag for the care team, read from
``mappings/program/safety.yaml`` (overridable per deployment, ``[program.safety]``).

Owns: ``SafetyRules`` (the loaded configuration, every problem of it in one ``ValueError``),
``Signal`` (what was found, about whom, pointing at what triggered it), the pure rules —
vital signs beyond their limits, a body weight implausibly far from the participant's other
weights, a dose above the route's hard ceiling, an adverse event that is serious, of a listed
kind or unclassifiable, a dosing session without its prerequisites, a schedule deviation — and
``flag_for``, the Flag a signal becomes (category safety, a business identifier, the
``flag-detail`` extension pointing at the trigger, a code of CodeSystem kat-safety).

Must not: store, read the clock, call HTTP, or refuse anything: a signal records what
happened; entry errors are refused elsewhere (the artifact schemas, the write rules).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fhir_kat.canonical import read_definition
from fhir_kat.search import parse_date_range
from fhir_kat.terminology import BASE, IDENTIFIERS, load_terminology

DEFAULT = Path(__file__).resolve().parents[2] / "mappings" / "program" / "safety.yaml"
SAFETY_SYSTEM = f"{BASE}/CodeSystem/kat-safety"
FLAG_IDS = f"{IDENTIFIERS}/safety-flags"
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
#: Core R4 extension: "Points to the Observation, AllergyIntolerance or other record that
#: provides additional supporting information about this flag" (0..*, valueReference).
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
#: Core R4 extension on Flag: "The alarm priority of the flag" (0..1, valueCodeableConcept), with
#: the codes of CodeSystem flag-priority-code (FHIR R4 4.0.1, hl7.fhir.r4.core
#: StructureDefinition-flag-priority and CodeSystem-flag-priority; checked against the package).
FLAG_PRIORITY = "http://hl7.org/fhir/StructureDefinition/flag-priority"
FLAG_PRIORITY_SYSTEM = "http://hl7.org/fhir/flag-priority-code"
PRIORITY_DISPLAY = {
    "PN": "No alarm",
    "PL": "Low priority",
    "PM": "Medium priority",
    "PH": "High priority",
}
#: What a Flag's priority text adds when the priority is a program decision not yet reviewed.
AWAITING_REVIEW = "program decision awaiting clinical review"
#: Flag ids: uuid5 of the trigger and the signal code (the namespace the instrument flags have
#: always used, so their ids do not change).
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000003")
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
AE_SYSTEM = f"{BASE}/CodeSystem/kat-adverse-event"
AE_SERIOUSNESS = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"
ROUTE_SYSTEM = f"{BASE}/CodeSystem/kat-route"

#: Vital-sign fields of the session sheet -> (the LOINC codes that carry them, the unit, the
#: signal name). SpO2 is 59408-5 (by pulse oximetry) and 2708-6 (the code the R4 vital-signs
#: profile keys on); a reading under either is the same reading.
VITALS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "systolic_mmhg": (("8480-6",), "mm[Hg]", "systolic-bp"),
    "diastolic_mmhg": (("8462-4",), "mm[Hg]", "diastolic-bp"),
    "spo2_percent": (("59408-5", "2708-6"), "%", "spo2"),
    "heart_rate_per_min": (("8867-4",), "/min", "heart-rate"),
    "respiratory_rate_per_min": (("9279-1",), "/min", "respiratory-rate"),
}
_LABELS = {
    "systolic_mmhg": "Systolic blood pressure",
    "diastolic_mmhg": "Diastolic blood pressure",
    "spo2_percent": "SpO2",
    "heart_rate_per_min": "Heart rate",
    "respiratory_rate_per_min": "Respiratory rate",
}
BODY_WEIGHT = "29463-7"
#: Units a body weight may come in (UCUM code -> kg per unit).
WEIGHT_UNITS = {"kg": Fraction(1), "g": Fraction(1, 1000), "[lb_av]": Fraction("0.45359237")}
_TOP = {
    "version",
    "vital_signs",
    "dose_ceilings",
    "body_weight",
    "adverse_events",
    "flag_priority",
}
_TOP_OPTIONAL = {"dosing_prerequisites"}


class SafetyRulesError(ValueError):
    """The safety rules are wrong: the service must not start with them."""


@dataclass(frozen=True)
class Limit:
    at_or_above: float | None = None
    below: float | None = None


@dataclass(frozen=True)
class Ceiling:
    mg_per_kg: float | None = None
    mg: float | None = None


@dataclass(frozen=True)
class Priority:
    """How urgent a signal's Flag is: a code of flag-priority-code, and the clinical source it
    rests on (None: a program decision awaiting clinical review)."""

    code: str
    source: str | None = None

    def concept(self) -> dict[str, Any]:
        """The ``flag-priority`` extension's value: the code, and in words whether it is
        reviewed (the inbox and a receiving EHR show the text)."""
        display = PRIORITY_DISPLAY[self.code]
        text = display if self.source else f"{display} ({AWAITING_REVIEW})"
        return {
            "coding": [{"system": FLAG_PRIORITY_SYSTEM, "code": self.code, "display": display}],
            "text": text,
        }


@dataclass(frozen=True)
class SafetyRules:
    version: str
    vital_signs: Mapping[str, Limit]
    dose_ceilings: Mapping[str, Ceiling]
    max_weight_change: float
    flag_serious_events: bool
    flag_event_kinds: frozenset[str]
    dosing_prerequisites: bool = True
    #: kat-safety code -> its Flag's priority (every code of the CodeSystem has one).
    priorities: Mapping[str, Priority] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return f"{BASE}/mappings/program/safety.yaml#v{self.version}"


@dataclass(frozen=True)
class Signal:
    """A safety signal: ``code`` of kat-safety, what happened in words (``text``), the
    resource that triggered it (``trigger``, ``Type/id``) and any other supporting records."""

    code: str
    text: str
    trigger: str
    subject: Mapping[str, Any]
    start: str
    encounter: str | None = None
    details: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------- configuration


def load_safety_rules(
    overrides: Mapping[str, Any] | None = None, path: Path | None = None
) -> SafetyRules:
    """The rules of ``path`` (default ``mappings/program/safety.yaml``) with ``[program.safety]``
    overrides merged in; ``SafetyRulesError`` names every problem."""
    source = path or DEFAULT
    data = _read(source)
    merged = _merge(data, dict(overrides or {}))
    problems: list[str] = []
    for key in sorted(set(merged) - _TOP - _TOP_OPTIONAL):
        problems.append(f"unknown key '{key}'")
    missing = sorted(_TOP - set(merged))
    if missing:
        problems += [f"missing '{key}'" for key in missing]
        raise SafetyRulesError(f"{source}: " + "; ".join(problems))
    vitals = _vitals(merged["vital_signs"], problems)
    ceilings = _ceilings(merged["dose_ceilings"], problems)
    weight = merged["body_weight"] if isinstance(merged["body_weight"], dict) else {}
    raw_change: Any = weight.get("max_relative_change")
    change = float(raw_change) if _number(raw_change) else 0.0
    if set(weight) != {"max_relative_change"} or not 0 < change < 10:
        problems.append("body_weight: give max_relative_change, a fraction above 0 (0.10 = 10 %)")
    events = merged["adverse_events"] if isinstance(merged["adverse_events"], dict) else {}
    kinds = events.get("kinds", [])
    known = set(load_terminology().value_set_codes("kat-adverse-event"))
    if set(events) - {"serious", "kinds"} or not isinstance(events.get("serious"), bool):
        problems.append("adverse_events: give serious (true/false) and kinds (a list)")
    if not isinstance(kinds, list):
        problems.append("adverse_events.kinds: a list of codes of ValueSet kat-adverse-event")
        kinds = []
    for kind in kinds:
        if kind not in known:
            problems.append(f"adverse_events.kinds: '{kind}' is not in ValueSet kat-adverse-event")
    prerequisites = merged.get("dosing_prerequisites", True)
    if not isinstance(prerequisites, bool):
        problems.append("dosing_prerequisites: true or false")
    priorities = _priorities(merged["flag_priority"], problems)
    if problems:
        raise SafetyRulesError(f"{source}: " + "; ".join(problems))
    return SafetyRules(
        version=str(merged["version"]),
        vital_signs=vitals,
        dose_ceilings=ceilings,
        max_weight_change=change,
        flag_serious_events=bool(events.get("serious")),
        flag_event_kinds=frozenset(str(k) for k in kinds),
        dosing_prerequisites=bool(prerequisites),
        priorities=priorities,
    )


def _priorities(raw: Any, problems: list[str]) -> dict[str, Priority]:
    """``flag_priority``: every kat-safety code -> {priority, and source (a citation) or
    review: pending}; a code left out stops start-up (unknown means review, never a default)."""
    out: dict[str, Priority] = {}
    if not isinstance(raw, dict):
        problems.append("flag_priority: a mapping of kat-safety code -> priority")
        return out
    known = set(load_terminology().code_systems[SAFETY_SYSTEM])
    for code in sorted(known - set(raw)):
        problems.append(f"flag_priority.{code}: missing (every kat-safety code has a priority)")
    for code, spec in raw.items():
        where = f"flag_priority.{code}"
        if code not in known:
            problems.append(f"{where}: not a code of CodeSystem kat-safety")
            continue
        if not isinstance(spec, dict) or spec.get("priority") not in PRIORITY_DISPLAY:
            problems.append(f"{where}: give priority, one of {', '.join(PRIORITY_DISPLAY)}")
            continue
        source, review = spec.get("source"), spec.get("review")
        reviewed = isinstance(source, str) and source.strip() and "review" not in spec
        pending = review == "pending" and "source" not in spec
        if set(spec) - {"priority", "source", "review"} or not (reviewed or pending):
            problems.append(
                f"{where}: give source (the clinical source it rests on) or review: pending "
                "(a program decision awaiting clinical review), not both"
            )
            continue
        out[code] = Priority(str(spec["priority"]), str(source) if reviewed else None)
    return out


@cache
def _read(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(read_definition(path))
    if not isinstance(data, dict):
        raise SafetyRulesError(f"{path}: not a YAML mapping")
    return data


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _vitals(raw: Any, problems: list[str]) -> dict[str, Limit]:
    out: dict[str, Limit] = {}
    if not isinstance(raw, dict):
        problems.append("vital_signs: a mapping of vital sign -> limits")
        return out
    for name in sorted(set(VITALS) - set(raw)):
        # "No limit" must be written down ({}), never an omission.
        problems.append(f"vital_signs.{name}: missing (write {{}} for no limit)")
    for name, spec in raw.items():
        where = f"vital_signs.{name}"
        if name not in VITALS:
            problems.append(f"{where}: not a vital sign ({', '.join(VITALS)})")
            continue
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"at_or_above", "below"}:
            problems.append(f"{where}: only at_or_above and below")
            continue
        if not all(_number(v) and v > 0 for v in spec.values()):
            problems.append(f"{where}: limits are positive numbers")
            continue
        out[name] = Limit(spec.get("at_or_above"), spec.get("below"))
    return out


def _ceilings(raw: Any, problems: list[str]) -> dict[str, Ceiling]:
    out: dict[str, Ceiling] = {}
    if not isinstance(raw, dict):
        problems.append("dose_ceilings: a mapping of route -> ceiling")
        return out
    routes = set(load_terminology().value_set_codes("kat-route"))
    for route, spec in raw.items():
        where = f"dose_ceilings.{route}"
        if route not in routes:
            problems.append(f"{where}: not a code of ValueSet kat-route")
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"mg_per_kg", "mg"}:
            problems.append(f"{where}: only mg_per_kg and mg")
            continue
        if not all(_number(v) and v > 0 for v in spec.values()):
            problems.append(f"{where}: ceilings are positive numbers")
            continue
        out[route] = Ceiling(spec.get("mg_per_kg"), spec.get("mg"))
    return out


# ---------------------------------------------------------------------------- reading FHIR


def codes(concept: Any, system: str | None = None) -> list[str]:
    """The codes of a CodeableConcept (of ``system`` when given)."""
    if not isinstance(concept, Mapping):
        return []
    return [
        str(c.get("code"))
        for c in concept.get("coding", []) or []
        if isinstance(c, Mapping)
        and c.get("code")
        and (system is None or c.get("system") == system)
    ]


def _loinc(concept: Any) -> set[str]:
    return set(codes(concept, LOINC))


def _quantity(value: Any) -> float | None:
    if isinstance(value, Mapping) and _number(value.get("value")):
        return float(value["value"])
    return None


def _label(value: float) -> str:
    return f"{value:g}"


def observation_when(obs: Mapping[str, Any]) -> str:
    period = obs.get("effectivePeriod")
    return str(
        obs.get("effectiveDateTime")
        or obs.get("effectiveInstant")
        or (period.get("start") if isinstance(period, Mapping) else None)
        or obs.get("issued")
        or ""
    )


def readings(obs: Mapping[str, Any]) -> dict[str, float]:
    """Vital-sign values of an Observation (its own value and its components), by field."""
    found: dict[str, float] = {}
    parts = [obs, *[c for c in obs.get("component", []) or [] if isinstance(c, Mapping)]]
    for part in parts:
        value = _quantity(part.get("valueQuantity"))
        if value is None:
            continue
        for name, (loincs, _unit, _signal) in VITALS.items():
            if _loinc(part.get("code")) & set(loincs):
                found[name] = value
    return found


def body_weight_kg(obs: Mapping[str, Any]) -> float | None:
    """A body-weight Observation's value in kg (None when it is not one, or its unit is not a
    mass unit this rule knows)."""
    if BODY_WEIGHT not in _loinc(obs.get("code")):
        return None
    quantity = obs.get("valueQuantity")
    value = _quantity(quantity)
    if value is None or not isinstance(quantity, Mapping):
        return None
    unit = quantity.get("code") if quantity.get("system") == UCUM else None
    factor = WEIGHT_UNITS.get(str(unit)) if unit else None
    if factor is None:
        text = str(quantity.get("unit", "")).strip().lower()
        factor = {"kg": Fraction(1), "g": Fraction(1, 1000), "lb": WEIGHT_UNITS["[lb_av]"]}.get(
            text.removesuffix("s")
        )
    return float(Fraction(str(value)) * factor) if factor is not None else None


def usable(resource: Mapping[str, Any]) -> bool:
    """False for a record withdrawn as an error (nothing to signal about)."""
    return resource.get("status") not in ("entered-in-error", "cancelled", "not-done")


# ---------------------------------------------------------------------------- the rules


def vital_sign_signals(obs: Mapping[str, Any], obs_id: str, rules: SafetyRules) -> list[Signal]:
    """A Signal per reading at or beyond a configured limit."""
    if not usable(obs) or not isinstance(obs.get("subject"), Mapping):
        return []
    out: list[Signal] = []
    for name, value in sorted(readings(obs).items()):
        limit = rules.vital_signs.get(name)
        if limit is None:
            continue
        unit, signal = VITALS[name][1], VITALS[name][2]
        if limit.at_or_above is not None and value >= limit.at_or_above:
            text = (
                f"{_LABELS[name]} {_label(value)} {unit} at or above the limit "
                f"{_label(limit.at_or_above)} {unit}"
            )
            out.append(_signal(f"{signal}-high", text, f"Observation/{obs_id}", obs))
        if limit.below is not None and value < limit.below:
            text = (
                f"{_LABELS[name]} {_label(value)} {unit} below the limit "
                f"{_label(limit.below)} {unit}"
            )
            out.append(_signal(f"{signal}-low", text, f"Observation/{obs_id}", obs))
    return out


def weight_signal(
    obs: Mapping[str, Any],
    obs_id: str,
    others: Sequence[tuple[str, float, str]],
    rules: SafetyRules,
) -> Signal | None:
    """``others``: the participant's other body weights as (when, kg, Observation id). A
    weight implausibly far from every earlier one (the closest earlier weight differs by more
    than the limit) is a signal; with no earlier weight, the later ones are the reference (a
    weight recorded after the fact)."""
    kg = body_weight_kg(obs)
    if kg is None or not others or not usable(obs):
        return None
    when = parse_date_range(observation_when(obs))
    earlier = [
        o
        for o in others
        if when is not None
        and (moment := parse_date_range(o[0])) is not None
        and moment[0] < when[0]
    ]
    candidates = [o for o in (earlier or others) if o[1] > 0]
    if not candidates:
        return None
    nearest = min(candidates, key=lambda o: (abs(kg - o[1]) / o[1], o[2]))
    reference = nearest[1]
    change = abs(kg - reference) / reference
    if change <= rules.max_weight_change:
        return None
    text = (
        f"Body weight {_label(round(kg, 1))} kg differs by {round(change * 100):d} % from "
        f"every {'earlier ' if earlier else ''}recorded weight of the participant (closest: "
        f"{_label(round(reference, 1))} kg on {nearest[0][:10]}; limit "
        f"{round(rules.max_weight_change * 100):d} %): check the unit and the value before "
        "relying on any weight-based dose"
    )
    return _signal(
        "body-weight-implausible",
        text,
        f"Observation/{obs_id}",
        obs,
        details=(f"Observation/{nearest[2]}",),
    )


def dose_ceiling_signal(
    ma: Mapping[str, Any],
    ma_id: str,
    route: str | None,
    dose_mg: float | None,
    weight_kg: float | None,
    rules: SafetyRules,
) -> Signal | None:
    """A dose above the route's hard ceiling (mg/kg with a weight, mg always) — whatever any
    override said."""
    if route is None or dose_mg is None:
        return None
    ceiling = rules.dose_ceilings.get(route)
    if ceiling is None:
        return None
    reasons = []
    if ceiling.mg is not None and Fraction(str(dose_mg)) > Fraction(str(ceiling.mg)):
        reasons.append(f"{_label(dose_mg)} mg is above the ceiling of {_label(ceiling.mg)} mg")
    if ceiling.mg_per_kg is not None and weight_kg:
        ratio = Fraction(str(dose_mg)) / Fraction(str(weight_kg))
        if ratio > Fraction(str(ceiling.mg_per_kg)):
            reasons.append(
                f"{_label(round(float(ratio), 3))} mg/kg is above the ceiling of "
                f"{_label(ceiling.mg_per_kg)} mg/kg"
            )
    if not reasons:
        return None
    text = f"Ketamine {route}: " + "; ".join(reasons) + " (a hard ceiling, override or not)"
    return _signal("dose-above-ceiling", text, f"MedicationAdministration/{ma_id}", ma)


def adverse_event_signal(ae: Mapping[str, Any], ae_id: str, rules: SafetyRules) -> Signal | None:
    """One Signal per adverse event that needs a clinician: a listed kind, serious, or coded in
    a way the rules cannot classify ("unknown means review")."""
    if ae.get("actuality", "actual") != "actual" or not isinstance(ae.get("subject"), Mapping):
        return None
    kinds = event_kinds(ae.get("event"))
    serious = seriousness(ae.get("seriousness"))
    listed = sorted(kinds & rules.flag_event_kinds)
    display = load_terminology().display
    trigger = f"AdverseEvent/{ae_id}"
    what = ", ".join(display(AE_SYSTEM, k) or k for k in sorted(kinds)) or "an event"
    seriously = {True: "serious", False: "non-serious", None: "seriousness not stated"}[serious]
    if listed:
        text = f"Adverse event: {what} ({seriously})"
        return _signal(f"adverse-event-{listed[0]}", text, trigger, ae, when=_AE_WHEN)
    if serious and rules.flag_serious_events:
        return _signal(
            "adverse-event-serious", f"Serious adverse event: {what}", trigger, ae, _AE_WHEN
        )
    if not kinds or serious is None:
        text = (
            "Adverse event the safety rules cannot classify (its code is not a program code, or "
            f"its seriousness is not stated): {what}, {seriously}; a clinician reviews it"
        )
        return _signal("adverse-event-unclassified", text, trigger, ae, when=_AE_WHEN)
    return None


def event_kinds(concept: Any) -> set[str]:
    """The kat-adverse-event kinds of an AdverseEvent.event: its program code, or the program
    code a standard code translates back from (ConceptMap kat-adverse-event-to-snomed)."""
    found = set(codes(concept, AE_SYSTEM)) & set(
        load_terminology().value_set_codes("kat-adverse-event")
    )
    if found or not isinstance(concept, Mapping):
        return found
    table = load_terminology().concept_map("kat-adverse-event-to-snomed")
    standard = {
        (str(c.get("system")), str(c.get("code")))
        for c in concept.get("coding", []) or []
        if isinstance(c, Mapping)
    }
    for (_system, code), targets in table.targets.items():
        if any((t.get("system"), t.get("code")) in standard for t in targets):
            found.add(code)
    return found


def seriousness(concept: Any) -> bool | None:
    """True for Serious (or one of its criteria), False for Non-serious, None when absent or
    in another system."""
    found = codes(concept, AE_SERIOUSNESS)
    if not found:
        return None
    return any(c != "Non-serious" for c in found)


def prerequisite_signals(
    ma: Mapping[str, Any],
    ma_id: str,
    task_statuses: Sequence[tuple[str, str]],
    treatment_consent: bool,
) -> list[Signal]:
    """``task_statuses``: (Task id, status) of the participant's referral Tasks. A session for
    a participant whose referral was rejected or closed, whose intake is not complete, who has
    no referral on record, or who has no treatment consent covering it."""
    out: list[Signal] = []
    trigger = f"MedicationAdministration/{ma_id}"
    statuses = {s for _, s in task_statuses}
    cleared = statuses & {"accepted", "in-progress", "completed"}
    if not task_statuses:
        out.append(
            _signal(
                "dosing-without-referral",
                "Ketamine given to a participant with no referral on record",
                trigger,
                ma,
            )
        )
    elif not cleared:
        pending = statuses - {"rejected", "cancelled", "failed", "entered-in-error"}
        tasks = tuple(f"Task/{tid}" for tid, _ in task_statuses)
        if pending:
            code, text = (
                "dosing-intake-incomplete",
                "Ketamine given before the participant's intake was complete (referral "
                f"{', '.join(sorted(pending))}, not accepted)",
            )
        elif "rejected" in statuses:
            code, text = (
                "dosing-referral-rejected",
                "Ketamine given to a participant whose referral was rejected",
            )
        else:
            code, text = (
                "dosing-referral-closed",
                f"Ketamine given to a participant whose referral is {', '.join(sorted(statuses))}",
            )
        out.append(_signal(code, text, trigger, ma, details=tasks))
    if not treatment_consent:
        out.append(
            _signal(
                "dosing-without-treatment-consent",
                "Ketamine given with no active treatment consent on record for this session",
                trigger,
                ma,
            )
        )
    return out


def schedule_signal(
    ma: Mapping[str, Any], ma_id: str, deviation: str | None, planned: str | None
) -> Signal | None:
    """A session given off the protocol's schedule (a route the session does not allow, or a
    session the protocol has not): ``deviation`` is the recorded reason, ``planned`` what the
    protocol says, when the rules could tell."""
    if deviation is None and planned is None:
        return None
    text = "Dosing session off the protocol schedule"
    if planned:
        text += f": {planned}"
    if deviation:
        text += f". Recorded reason: {deviation}"
    else:
        text += ". No deviation reason is recorded"
    return _signal("schedule-deviation", text[:1000], f"MedicationAdministration/{ma_id}", ma)


#: When an adverse event happened, best first: occurred, detected, recorded.
_AE_WHEN = ("date", "detected", "recordedDate")


def _signal(
    code: str,
    text: str,
    trigger: str,
    resource: Mapping[str, Any],
    when: tuple[str, ...] = (),
    details: tuple[str, ...] = (),
) -> Signal:
    subject = resource.get("subject") or resource.get("patient") or {}
    if when:
        start = next((str(resource[w]) for w in when if resource.get(w)), "")
    elif resource.get("resourceType") == "MedicationAdministration":
        period = resource.get("effectivePeriod") or {}
        start = str(resource.get("effectiveDateTime") or period.get("start") or "")
    else:
        start = observation_when(resource)
    encounter = resource.get("encounter") or resource.get("context")
    ref = encounter.get("reference") if isinstance(encounter, Mapping) else None
    return Signal(
        code=code,
        text=text,
        trigger=trigger,
        subject={"reference": subject["reference"]} if "reference" in subject else dict(subject),
        start=start,
        encounter=ref if isinstance(ref, str) and ref.startswith("Encounter/") else None,
        details=details,
    )


# ---------------------------------------------------------------------------- the Flag


def flag_id(trigger: str, code: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{trigger}|{code}"))


def flag_for(signal: Signal, rules: SafetyRules) -> dict[str, Any]:
    """The Flag a signal becomes: active, category safety, a business identifier, a code of
    kat-safety with the signal's words as text, ``flag-detail`` at the trigger (then any
    supporting records), ``flag-priority`` as the rules decide it for the code, the period
    starting when the trigger happened."""
    fid = flag_id(signal.trigger, signal.code)
    display = load_terminology().display(SAFETY_SYSTEM, signal.code) or signal.code
    priority = rules.priorities.get(signal.code)
    flag: dict[str, Any] = {
        "resourceType": "Flag",
        "id": fid,
        "extension": [
            {"url": FLAG_DETAIL, "valueReference": {"reference": ref}}
            for ref in (signal.trigger, *signal.details)
        ]
        + (
            [{"url": FLAG_PRIORITY, "valueCodeableConcept": priority.concept()}] if priority else []
        ),
        "identifier": [{"system": FLAG_IDS, "value": fid}],
        "status": "active",
        "category": [
            {"coding": [{"system": FLAG_CATEGORY, "code": "safety", "display": "Safety"}]}
        ],
        "code": {
            "coding": [{"system": SAFETY_SYSTEM, "code": signal.code, "display": display}],
            "text": signal.text,
        },
        "subject": dict(signal.subject),
        "author": {"display": f"fhir_kat safety rules ({rules.reference})"},
    }
    if signal.start:
        flag["period"] = {"start": signal.start}
    if signal.encounter:
        flag["encounter"] = {"reference": signal.encounter}
    return flag


def is_safety_flag(resource: Mapping[str, Any]) -> bool:
    """A Flag this service raised (its identifier system is ours)."""
    return resource.get("resourceType") == "Flag" and any(
        isinstance(i, Mapping) and i.get("system") == FLAG_IDS
        for i in resource.get("identifier", []) or []
    )


def ketamine(ma: Mapping[str, Any]) -> bool:
    concept = ma.get("medicationCodeableConcept")
    return bool(
        set(codes(concept, "http://www.nlm.nih.gov/research/umls/rxnorm")) & {"6130"}
        or set(codes(concept, "http://snomed.info/sct")) & {"373464007"}
    )


def route_of(ma: Mapping[str, Any]) -> str | None:
    """The kat-route code of a MedicationAdministration (its own, or translated back from the
    SNOMED CT route of ConceptMap kat-route-to-snomed); None when the rules cannot tell."""
    dosage = ma.get("dosage")
    concept = dosage.get("route") if isinstance(dosage, Mapping) else None
    local = set(codes(concept, ROUTE_SYSTEM))
    if local:
        return sorted(local)[0]
    table = load_terminology().concept_map("kat-route-to-snomed")
    given = set(codes(concept, "http://snomed.info/sct"))
    matches = sorted(
        code
        for (_system, code), targets in table.targets.items()
        if any(t.get("code") in given for t in targets)
    )
    return matches[0] if len(matches) == 1 else None


def dose_in_mg(ma: Mapping[str, Any]) -> float | None:
    dosage = ma.get("dosage")
    dose = dosage.get("dose") if isinstance(dosage, Mapping) else None
    value = _quantity(dose)
    if value is None or not isinstance(dose, Mapping):
        return None
    unit = dose.get("code") if dose.get("system") == UCUM else dose.get("unit")
    factor = {"mg": Fraction(1), "g": Fraction(1000), "ug": Fraction(1, 1000)}.get(str(unit))
    return float(Fraction(str(value)) * factor) if factor is not None else None


def references(resource: Mapping[str, Any], element: str) -> Iterable[str]:
    value = resource.get(element)
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, Mapping) and isinstance(item.get("reference"), str):
            yield item["reference"]


__all__ = [
    "DEFAULT",
    "FLAG_DETAIL",
    "FLAG_IDS",
    "FLAG_PRIORITY",
    "FLAG_PRIORITY_SYSTEM",
    "SAFETY_SYSTEM",
    "Priority",
    "SafetyRules",
    "SafetyRulesError",
    "Signal",
    "adverse_event_signal",
    "body_weight_kg",
    "dose_ceiling_signal",
    "dose_in_mg",
    "flag_for",
    "flag_id",
    "is_safety_flag",
    "ketamine",
    "load_safety_rules",
    "prerequisite_signals",
    "route_of",
    "schedule_signal",
    "vital_sign_signals",
    "weight_signal",
]
