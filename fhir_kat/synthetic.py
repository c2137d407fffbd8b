"""Synthetic KaT programs: reproducible artifacts for demos, tests and benchmarks.

Owns: ``generate_program(participants, seed)`` — three cohorts run as the program protocol
describes (referral → three-step intake → consents → baseline instruments → the protocol's KaT
sessions → post instruments), as artifact JSON for ``POST /api/v1/<kind>``. The same seed
always gives the same artifacts (one ``random.Random(seed)``, no clock, no global state), so
``fhir-kat generate`` writes byte-identical files.

Realism, by design and only as far as a demo needs: baseline scores mostly above the screen
cut-offs, most participants improving after the program and a few worsening; some referrals
excluded at triage (a coded contraindication) or declined at intake; some drop-outs (who often
improved mid-program, and sometimes answer once more after leaving); mid-program responses and
late follow-ups (neither of which is a baseline or post score); missing post responses and
skipped items; common adverse events (dissociation, nausea, occasional vomiting or a
blood-pressure rise). Each participant who starts has a program period (``program_start``,
``program_end``, ``ended``: completed or cancelled): not an artifact, so the demo records it as
the cohort Group's member period and ends the referral with ``$end``. Names are invented; PHNs
come from the ``9999…`` range the project's examples use, with a valid Mod 11 check digit so
they pass validation. No PHN range is officially reserved for testing (none was found), so
these are kept to one narrow range and must never be sent to a production system.

Must not: invent clinical codes (every code comes from the ValueSets, the shipped
Questionnaires and the protocol), store, call HTTP or read the clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from functools import cache
from typing import Any

from fhir_kat.artifacts import bc_phn_check_digit
from fhir_kat.clinical.protocol import ProgramProtocol, load_protocol
from fhir_kat.mapping.functions import INSTRUMENT_FILES, questionnaire
from fhir_kat.terminology import IDENTIFIERS

#: Pacific Standard Time: the program runs on Vancouver Island (no DST shift is modelled).
PACIFIC = timezone(timedelta(hours=-8))
COHORTS = 3
#: Weeks between the start of one cohort and the next.
COHORT_SPACING_WEEKS = 16
ORG_SYSTEM = f"{IDENTIFIERS}/organization"
STAFF_SYSTEM = f"{IDENTIFIERS}/staff"
LICENCE_SYSTEM = "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-license-physician"
REFERRAL_SYSTEM = "https://emr.example-clinic.ca/referrals"
HEALTH_AUTHORITY = {
    "name": "Island Health Authority (synthetic)",
    "identifier": {"system": ORG_SYSTEM, "value": "HA-ISLAND"},
}

_GIVEN = [
    "Avery",
    "Blake",
    "Casey",
    "Devon",
    "Emery",
    "Finley",
    "Harper",
    "Jordan",
    "Kai",
    "Logan",
    "Morgan",
    "Noor",
    "Parker",
    "Quinn",
    "Reese",
    "Riley",
    "Rowan",
    "Sage",
    "Skyler",
    "Tatum",
    "Wren",
    "Ari",
    "Jules",
    "Robin",
    "Sasha",
    "Toby",
    "Milan",
    "Remy",
    "Eden",
    "Lee",
]
_FAMILY = [
    "Testcase",
    "Sampleton",
    "Fictus",
    "Mockford",
    "Demoline",
    "Synthwood",
    "Placeholt",
    "Examplar",
    "Nullberg",
    "Notreal",
    "Fakeley",
    "Trialson",
    "Pseudon",
    "Madeup",
    "Imagin",
    "Virtualis",
    "Dummond",
    "Specimen",
    "Modelton",
    "Draftly",
]
_REFERRERS = (
    ("Example", "Jordan", "99001", "Example Family Practice", "CLINIC-7"),
    ("Sample", "Morgan", "99003", "Harbour Medical Clinic (synthetic)", "CLINIC-8"),
    ("Mockwell", "Dana", "99004", "Island Primary Care Network (synthetic)", "CLINIC-9"),
    ("Demo", "Alex", "99005", "Valley Family Medicine (synthetic)", "CLINIC-10"),
)
#: The referring clinics (family, given, licence, clinic name, clinic identifier value).
CLINICS = _REFERRERS
_STAFF = {
    "nurse-intake": ("Nurseperson", "Sam", STAFF_SYSTEM, "RPN-0042"),
    "psychiatrist-clearance": ("Psychiatrist", "Lou", STAFF_SYSTEM, "PSY-0007"),
    "contraindication-check": ("Doctorperson", "Robin", LICENCE_SYSTEM, "99002"),
}
#: The three intake steps, in the program's order (DOMAIN.md, "three-step intake").
INTAKE_STEPS = ("nurse-intake", "psychiatrist-clearance", "contraindication-check")
#: Inclusion diagnoses (codes of ValueSet kat-diagnosis) with rough relative frequencies.
_DIAGNOSES = (
    ("ptsd", 5),
    ("treatment-resistant-depression", 4),
    ("mdd-recurrent", 3),
    ("generalized-anxiety-disorder", 3),
    ("substance-use-disorder", 1),
    ("ocd", 1),
)
#: Exclusions seen at triage (codes of ValueSet kat-contraindication).
_EXCLUSIONS = ("psychosis", "pregnancy", "coronary-artery-disease", "hepatic-cirrhosis")

# Baseline mean and SD per instrument (a population referred for treatment-resistant conditions;
# illustrative figures for synthetic data, not taken from a study).
_BASELINE = {"phq9": (16.0, 4.5), "gad7": (13.0, 4.0), "pcl5": (46.0, 13.0), "bipf": (55.0, 17.0)}
INSTRUMENTS = ("phq9", "gad7", "pcl5", "bipf")

# Probabilities (per participant unless named otherwise).
P_EXCLUDED = 0.06
P_DECLINED = 0.03
P_DROPOUT = 0.05
P_MISSING_POST = 0.06  # per instrument
P_SKIPPED_ITEM = 0.04  # one PHQ-9/GAD-7 item left blank: stored, no total (no prorating)
P_WORSE = 0.08
P_SUICIDAL_ITEM = 0.12  # PHQ-9 item 9 above 0 at baseline
P_BIPF_NA = 0.25  # per response: one domain "not applicable" (e.g. no partner)
P_MID = 0.5  # a mid-program response (week 6) per instrument
P_FOLLOW_UP = 0.3  # a follow-up 3-6 months after the end, per completer
P_DROPOUT_EXIT = 0.4  # a drop-out answers once more within two weeks of leaving
P_AE = {"dissociation": 0.35, "nausea": 0.15, "vomiting": 0.04, "hypertension": 0.04}


@dataclass(frozen=True)
class Artifact:
    kind: str  # as in POST /api/v1/<kind>
    name: str  # a stable, unique file name stem
    payload: dict[str, Any]


@dataclass
class Participant:
    number: int
    cohort: int
    phn: str
    outcome: str  # completed | dropped-out | excluded | declined
    artifacts: list[Artifact] = field(default_factory=list)
    #: The program as it ran (None for referrals that never started).
    program_start: date | None = None
    program_end: date | None = None
    ended: str | None = None  # completed | cancelled (the referral's end, POST …/$end)


@dataclass
class Program:
    seed: int
    participants: list[Participant]

    def artifacts(self) -> Iterator[Artifact]:
        """Every artifact in the order a program system would send them: all referrals and
        intake first, then each cohort's consents, sessions and instruments by date."""
        items = [a for p in self.participants for a in p.artifacts]
        yield from sorted(items, key=lambda a: (_when(a), a.name))

    def period(self) -> tuple[str, str]:
        """The first and last day of the program's artifacts (FHIR dates)."""
        moments = [_when(a)[:10] for p in self.participants for a in p.artifacts]
        return min(moments), max(moments)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.participants:
            out[p.outcome] = out.get(p.outcome, 0) + 1
        return out


def _when(artifact: Artifact) -> str:
    p = artifact.payload
    moment = p.get("authored_on") or p.get("date") or p.get("signed_at") or p.get("start")
    return str(moment or p.get("authored", ""))


#: Every synthetic PHN starts with this (docs/examples use 9999999998).
PHN_PREFIX = "9999"
#: How many distinct synthetic PHNs the range holds (about 10/11 of the 5-digit space).
MAX_PARTICIPANTS = 50_000


def valid_phn(rng: random.Random, taken: set[str]) -> str:
    """A random BC PHN in the synthetic range with a valid Mod 11 check digit, unused so far."""
    while True:
        first_nine = PHN_PREFIX + "".join(
            str(rng.randrange(10)) for _ in range(9 - len(PHN_PREFIX))
        )
        digit = bc_phn_check_digit(first_nine)
        if digit is None:
            continue
        phn = first_nine + str(digit)
        if phn not in taken:
            taken.add(phn)
            return phn


def generate_program(
    participants: int,
    seed: int,
    *,
    start: date = date(2026, 1, 5),
    protocol: ProgramProtocol | None = None,
) -> Program:
    """A synthetic program of ``participants`` referrals spread over three cohorts."""
    if not 1 <= participants <= MAX_PARTICIPANTS:
        raise ValueError(f"participants must be between 1 and {MAX_PARTICIPANTS}")
    rng = random.Random(seed)  # noqa: S311 (reproducible synthetic data, not a secret)
    proto = protocol or load_protocol()
    taken: set[str] = set()
    people = []
    for n in range(participants):
        cohort = n * COHORTS // participants + 1
        cohort_start = start + timedelta(weeks=COHORT_SPACING_WEEKS * (cohort - 1))
        people.append(_participant(rng, proto, n + 1, cohort, cohort_start, seed, taken))
    return Program(seed, people)


def _at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=PACIFIC)


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _person(family: str, given: str, system: str, value: str) -> dict[str, Any]:
    return {
        "family_name": family,
        "given_names": [given],
        "identifier": {"system": system, "value": value},
    }


def _participant(
    rng: random.Random,
    proto: ProgramProtocol,
    number: int,
    cohort: int,
    cohort_start: date,
    seed: int,
    taken: set[str],
) -> Participant:
    tag = f"S{seed}-{number:04d}"
    phn = valid_phn(rng, taken)
    draw = rng.random()
    outcome = (
        "excluded"
        if draw < P_EXCLUDED
        else "declined"
        if draw < P_EXCLUDED + P_DECLINED
        else "dropped-out"
        if draw < P_EXCLUDED + P_DECLINED + P_DROPOUT
        else "completed"
    )
    person = Participant(number, cohort, phn, outcome)
    add = person.artifacts.append
    referral_id = {"system": REFERRAL_SYSTEM, "value": f"R-{tag}"}
    referred = cohort_start - timedelta(days=rng.randint(35, 60))
    family, given, licence, org_name, org_value = rng.choice(_REFERRERS)
    diagnoses = _pick_diagnoses(rng)
    referral: dict[str, Any] = {
        "source_id": f"REF-{tag}",
        "referral_identifier": referral_id,
        "authored_on": _iso(_at(referred, rng.randint(8, 16), rng.choice((0, 15, 30, 45)))),
        "patient": {
            "phn": phn,
            "family_name": rng.choice(_FAMILY),
            "given_names": [rng.choice(_GIVEN)],
            "birth_date": date(
                rng.randint(1962, 1996), rng.randint(1, 12), rng.randint(1, 28)
            ).isoformat(),
            "sex": rng.choices(("female", "male", "other"), (60, 37, 3))[0],
        },
        "referrer": {
            "family_name": family,
            "given_names": [given],
            "licence_number": licence,
            "organization": {
                "name": org_name,
                "identifier": {"system": ORG_SYSTEM, "value": org_value},
            },
        },
        "reason": "Synthetic referral: symptoms persist after at least two adequate treatments",
        "diagnoses": [{"code": d} for d in diagnoses],
        "prior_treatment_failure": True,
        "contraindications": ([{"code": rng.choice(_EXCLUSIONS)}] if outcome == "excluded" else []),
        "flags": [{"code": "extreme-emotional-lability", "value": False}],
        "urgency": "routine",
    }
    add(Artifact("referrals", f"{tag}-01-referral", referral))
    if outcome == "excluded":
        return person  # triage rejects it; nothing more is sent

    day = referred
    for index, step in enumerate(INTAKE_STEPS, start=1):
        day += timedelta(days=rng.randint(3, 8))
        declined_here = outcome == "declined" and index == 2
        sfamily, sgiven, ssystem, svalue = _STAFF[step]
        add(
            Artifact(
                "screenings",
                f"{tag}-02-screening-{index}",
                {
                    "source_id": f"SCR-{tag}-{index}",
                    "referral_identifier": referral_id,
                    "patient_phn": phn,
                    "step": step,
                    "performer": _person(sfamily, sgiven, ssystem, svalue),
                    "date": _iso(_at(day, 10 + index)),
                    "decision": "declined" if declined_here else "cleared",
                    "findings": [
                        {"criterion": "diagnosis", "met": True},
                        {"criterion": "prior-treatment-failure", "met": True},
                    ],
                },
            )
        )
        if declined_here:
            return person

    signed = cohort_start - timedelta(days=rng.randint(7, 14))
    add(_consent(tag, "treatment", phn, signed, rng))
    add(_consent(tag, "share-health-authority", phn, signed, rng))

    severity = {i: _baseline(rng, i) for i in INSTRUMENTS}
    suicidal = rng.random() < P_SUICIDAL_ITEM
    baseline_day = cohort_start - timedelta(days=rng.randint(3, 21))
    for inst in INSTRUMENTS:
        add(_response(rng, tag, "03-baseline", phn, inst, baseline_day, severity[inst], suicidal))

    weeks = proto.weeks or 12
    person.program_start = cohort_start
    weight = round(rng.uniform(52.0, 110.0), 1)
    last_session = len(proto.sessions) if outcome == "completed" else rng.randint(1, 2)
    last_day = cohort_start
    for number_, rule in sorted(proto.sessions.items()):
        if number_ > last_session:
            break
        week = rule.typical_week or (3 + number_)
        session_day = cohort_start + timedelta(weeks=week - 1, days=rng.randint(0, 2))
        last_day = session_day
        add(_session(rng, proto, tag, phn, number_, rule.routes[0], session_day, weight))
    # Mid-program (week 6): often already better — never a post score.
    mid_day = cohort_start + timedelta(weeks=5, days=rng.randint(0, 4))
    if outcome == "completed" or mid_day < last_day + timedelta(days=7):
        for inst in ("phq9", "gad7"):
            if rng.random() < P_MID:
                score = (severity[inst] + _post(rng, inst, severity[inst], False)) / 2
                add(_response(rng, tag, "04-mid", phn, inst, mid_day, score, False))
    if outcome != "completed":
        person.program_end = last_day + timedelta(days=rng.randint(7, 10))
        person.ended = "cancelled"
        if rng.random() < P_DROPOUT_EXIT:
            exit_day = person.program_end + timedelta(days=rng.randint(1, 10))
            for inst in ("phq9", "gad7"):
                score = _post(rng, inst, severity[inst], rng.random() < 0.3)
                add(_response(rng, tag, "05-exit", phn, inst, exit_day, score, False))
        return person

    person.program_end = cohort_start + timedelta(weeks=weeks)
    person.ended = "completed"
    post_day = person.program_end + timedelta(days=rng.randint(7, 14))
    worse = rng.random() < P_WORSE
    post_scores = {}
    for inst in INSTRUMENTS:
        if rng.random() < P_MISSING_POST:
            continue  # the participant did not return this questionnaire
        post_scores[inst] = _post(rng, inst, severity[inst], worse)
        score = post_scores[inst]
        add(_response(rng, tag, "05-post", phn, inst, post_day, score, suicidal and worse))
    if rng.random() < P_FOLLOW_UP:
        follow_day = person.program_end + timedelta(days=rng.randint(90, 180))
        for inst, post in sorted(post_scores.items()):
            # Some keep their gains, some drift back: never the post score either way.
            score = _post(rng, inst, severity[inst], False) if rng.random() < 0.6 else post
            add(_response(rng, tag, "06-follow-up", phn, inst, follow_day, score, False))
    return person


def _pick_diagnoses(rng: random.Random) -> list[str]:
    codes = [c for c, _ in _DIAGNOSES]
    weights = [w for _, w in _DIAGNOSES]
    first = rng.choices(codes, weights)[0]
    out = [first]
    if rng.random() < 0.5:
        second = rng.choices(codes, weights)[0]
        if second != first:
            out.append(second)
    return sorted(out)


def _consent(tag: str, kind: str, phn: str, signed: date, rng: random.Random) -> Artifact:
    payload: dict[str, Any] = {
        "source_id": f"CON-{tag}-{kind}",
        "patient_phn": phn,
        "kind": kind,
        "signed_at": _iso(_at(signed, rng.randint(9, 16))),
        "period": {"start": signed.isoformat(), "end": (signed + timedelta(days=365)).isoformat()},
    }
    if kind != "treatment":
        payload["permitted_party"] = HEALTH_AUTHORITY
        payload["purposes"] = ["HOPERAT", "PUBHLTH"]
    return Artifact("consents", f"{tag}-02-consent-{kind}", payload)


# ---------------------------------------------------------------------------- scores


@cache
def _scale(instrument: str) -> tuple[int, int, float]:
    """(scored items, maximum item value, total maximum) from the shipped Questionnaire."""
    items = _scored_items(instrument)
    top = max(max(v for _, v in options) for _, options in items)
    return len(items), top, float(len(items) * top)


@cache
def _scored_items(instrument: str) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """(linkId, ((answer code, ordinal value), ...)) of every item that carries a score."""
    out = []
    for item in questionnaire(instrument)["item"]:
        options = []
        for option in item.get("answerOption", []):
            ordinal = next(
                (e["valueDecimal"] for e in option.get("extension", []) if "valueDecimal" in e),
                None,
            )
            if ordinal is not None:
                options.append((option["valueCoding"]["code"], int(ordinal)))
        if options:
            out.append((item["linkId"], tuple(options)))
    return tuple(out)


@cache
def _not_applicable(instrument: str, link_id: str) -> str | None:
    for item in questionnaire(instrument)["item"]:
        if item["linkId"] != link_id:
            continue
        for option in item.get("answerOption", []):
            if not any("valueDecimal" in e for e in option.get("extension", [])):
                return str(option["valueCoding"]["code"])
    return None


def _baseline(rng: random.Random, instrument: str) -> float:
    mean, sd = _BASELINE[instrument]
    _, _, top = _scale(instrument)
    total = top if instrument != "bipf" else 100.0
    return min(max(rng.gauss(mean, sd), 0.0), total)


def _post(rng: random.Random, instrument: str, baseline: float, worse: bool) -> float:
    """Most participants improve by about half (a wide spread); a few get worse."""
    total = 100.0 if instrument == "bipf" else _scale(instrument)[2]
    if worse:
        return min(baseline * rng.uniform(1.05, 1.3) + rng.uniform(0, 6), total)
    return max(baseline * rng.uniform(0.2, 0.9), 0.0)


def _response(
    rng: random.Random,
    tag: str,
    when: str,
    phn: str,
    instrument: str,
    day: date,
    score: float,
    suicidal: bool,
) -> Artifact:
    items = _scored_items(instrument)
    count, top, _ = _scale(instrument)
    values = [0] * count
    target = round(score / 100 * count * top) if instrument == "bipf" else round(score)
    # The suicidal-ideation item (PHQ-9 item 9) is raised only for participants who have it.
    locked = {i for i, (link, _) in enumerate(items) if instrument == "phq9" and link == "phq9-9"}
    if suicidal and locked:
        values[next(iter(locked))] = 1
        target -= 1
    free = [i for i in range(count) if i not in locked]
    for _ in range(max(target, 0)):
        open_ = [i for i in free if values[i] < top]
        if not open_:
            break
        values[rng.choice(open_)] += 1
    answers: list[dict[str, Any]] = []
    skip = -1
    status = "completed"
    if instrument in ("phq9", "gad7") and rng.random() < P_SKIPPED_ITEM:
        skip, status = rng.randrange(count), "in-progress"
    na = rng.randrange(count) if instrument == "bipf" and rng.random() < P_BIPF_NA else -1
    for i, (link, options) in enumerate(items):
        if i == skip:
            continue
        if i == na:
            code = _not_applicable(instrument, link)
            if code is not None:
                answers.append({"item": link, "answer": code})
                continue
        code = next(c for c, v in options if v == values[i])
        answers.append({"item": link, "answer": code})
    if instrument == "phq9":
        difficulty = _difficulty_codes()
        answers.append({"item": "phq9-difficulty", "answer": difficulty[min(sum(values) // 7, 3)]})
    return Artifact(
        "questionnaire-responses",
        f"{tag}-{when}-{INSTRUMENT_FILES[instrument]}",
        {
            "source_id": f"QR-{tag}-{when}-{instrument}",
            "patient_phn": phn,
            "instrument": instrument,
            "authored": _iso(_at(day, rng.randint(9, 17), rng.choice((0, 20, 40)))),
            "status": status,
            "answers": answers,
        },
    )


@cache
def _difficulty_codes() -> tuple[str, ...]:
    item = next(i for i in questionnaire("phq9")["item"] if i["linkId"] == "phq9-difficulty")
    return tuple(str(o["valueCoding"]["code"]) for o in item["answerOption"])


# ---------------------------------------------------------------------------- sessions


def _vitals(rng: random.Random, moment: datetime, raised: bool = False) -> dict[str, Any]:
    systolic = rng.randint(108, 132) + (rng.randint(25, 40) if raised else 0)
    return {
        "measured_at": _iso(moment),
        "systolic_mmhg": systolic,
        "diastolic_mmhg": min(systolic - 30, rng.randint(68, 84) + (15 if raised else 0)),
        "heart_rate_per_min": rng.randint(60, 88),
        "spo2_percent": rng.randint(95, 99),
    }


def _session(
    rng: random.Random,
    proto: ProgramProtocol,
    tag: str,
    phn: str,
    number: int,
    route: str,
    day: date,
    weight: float,
) -> Artifact:
    start = _at(day, 13)
    end = start + timedelta(hours=4)
    limits = proto.dose_limits.get(route)
    payload: dict[str, Any] = {
        "source_id": f"SES-{tag}-{number}",
        "patient_phn": phn,
        "session_number": number,
        "start": _iso(start),
        "end": _iso(end),
        "route": route,
        "administered_by": _person(*_STAFF["contraindication-check"]),
    }
    if limits is not None and limits.mg_per_kg is not None:
        low, high = limits.mg_per_kg.min, limits.mg_per_kg.max
        # Inside the range with margin, so rounding to 0.5 mg never leaves it.
        per_kg = rng.uniform(low + (high - low) * 0.1, high - (high - low) * 0.1)
        payload["body_weight_kg"] = weight
        payload["dose_mg"] = round(weight * per_kg * 2) / 2
    elif limits is not None and limits.mg is not None:
        payload["dose_mg"] = float(round(rng.uniform(limits.mg.min, limits.mg.max)))
    else:
        # No range is configured for this route (the protocol never invents one), so the
        # program's clinician confirms each dose: the override carries that decision.
        payload["body_weight_kg"] = weight
        payload["dose_mg"] = float(rng.choice((100, 150, 200)))
        payload["dose_override"] = {
            "reason": "Synthetic: dose confirmed by the program clinician (no protocol range)",
            "clinician": _person(*_STAFF["contraindication-check"]),
        }
    events = [kind for kind, p in P_AE.items() if rng.random() < p]
    payload["vital_signs_before"] = _vitals(rng, start - timedelta(minutes=10))
    payload["vital_signs_after"] = _vitals(
        rng, end + timedelta(minutes=5), raised="hypertension" in events
    )
    payload["adverse_events"] = [
        {
            "kind": kind,
            "description": f"Synthetic {kind.replace('-', ' ')}, resolved during the session",
            "serious": False,
            "onset": _iso(start + timedelta(minutes=rng.randint(10, 90))),
        }
        for kind in events
    ]
    return Artifact("medication-administrations", f"{tag}-04-session-{number}", payload)


def cohort_members(program: Program) -> Mapping[int, list[Participant]]:
    out: dict[int, list[Participant]] = {}
    for p in program.participants:
        out.setdefault(p.cohort, []).append(p)
    return out
