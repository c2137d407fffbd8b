"""Instrument responses become scores, Observations and safety Flags.

Owns: serving the shipped Questionnaires, checking QuestionnaireResponses against them (a write
rule: 422 naming the item), checking total-score Observations however they arrive (a write rule:
a value outside the instrument's range or in another unit is 422), SDC observation-based
extraction when a response is stored (a write hook: same transaction, so a response never
exists without its Observations), ``$extract`` (the same Bundle, not stored — as SDC defines
it), and the instrument safety signals: PHQ-9 item 9 above 0, item 9 left unanswered when the
other answers already reach the moderate band, or a rise between consecutive responses (PHQ-9
≥ 5, PCL-5 ≥ 10; instruments.yaml, safety) — raised through ``SafetyService.raise_signal`` like
every other safety Flag.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from fhir_kat.clinical.safety import SAFETY_SYSTEM, Signal
from fhir_kat.errors import Issue, Unprocessable, issue
from fhir_kat.instruments.definitions import Catalogue, Instrument
from fhir_kat.instruments.scoring import check_response, extract, score
from fhir_kat.search import Criterion, SearchQuery, parse_date_range
from fhir_kat.services.delivery import note_derived
from fhir_kat.services.fhir_rest import FhirService
from fhir_kat.store import StoredResource, Tx
from fhir_kat.store.store import format_instant

SAFETY = SAFETY_SYSTEM
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000003")


class InstrumentService:
    def __init__(
        self,
        fhir: FhirService,
        catalogue: Catalogue,
        questionnaires: Iterable[dict[str, Any]],
        clock: Callable[[], datetime],
        raise_signal: Callable[[Tx, Signal], bool] | None = None,
    ) -> None:
        self.fhir = fhir
        self.catalogue = catalogue
        self.questionnaires = {q["url"]: q for q in questionnaires}
        self.by_reference = {f"Questionnaire/{q['id']}": q for q in self.questionnaires.values()}
        self.clock = clock
        #: ``SafetyService.raise_signal``: the one way a safety Flag is raised and delivered.
        self.raise_signal = raise_signal

    def install_questionnaires(self) -> None:
        with self.fhir.write() as tx:
            tx.lock("install-definitions")  # processes starting together take turns
            for q in self.questionnaires.values():
                self.fhir.update_in(tx, dict(q))

    def _questionnaire(self, qr: dict[str, Any]) -> tuple[dict[str, Any], Instrument] | None:
        """The program Questionnaire a response answers: named by its canonical URL (with or
        without ``|version``, as SDC renderers write it) or by a literal ``Questionnaire/<id>``
        (as some EMRs do). Anything else is not one of the program's instruments."""
        canonical = str(qr.get("questionnaire", "")).split("|")[0]
        q = self.questionnaires.get(canonical) or self.by_reference.get(canonical)
        instrument = self.catalogue.by_questionnaire(q["url"]) if q else None
        return (q, instrument) if q and instrument else None

    # ------------------------------------------------------------------ write rule and hook

    def check_rule(self, tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
        if body.get("resourceType") == "Observation":
            problems = total_score_problems(body, self.catalogue)
            if problems:
                raise Unprocessable(problems)
            return
        if body.get("resourceType") != "QuestionnaireResponse":
            return
        found = self._questionnaire(body)
        if found is None:
            return  # not one of the program's instruments: stored as any other response
        problems = check_response(body, *found)
        if problems:
            raise Unprocessable(problems)

    def on_write(self, tx: Tx, stored: StoredResource, created: bool) -> None:
        if stored.type != "QuestionnaireResponse" or stored.deleted:
            return
        qr = stored.json()
        found = self._questionnaire(qr)
        if found is None or "subject" not in qr or "authored" not in qr:
            return
        questionnaire, instrument = found
        result = score(qr, questionnaire, instrument)
        observations = extract(qr, questionnaire, instrument, result)
        derived = [self.fhir.update_in(tx, obs).stored.json() for obs in observations]
        if observations:
            provenance = self._provenance(qr, observations)
            derived.append(self.fhir.update_in(tx, provenance).stored.json())
        # Partners that receive the response receive its scores with it (docs/exchange.md).
        note_derived(tx, f"QuestionnaireResponse/{stored.id}", derived)
        if self.raise_signal is not None:
            for signal in self._signals(tx, qr, instrument, result.item_values, result.total):
                self.raise_signal(tx, signal)

    def extract_bundle(self, qr: dict[str, Any]) -> dict[str, Any]:
        """``$extract``: the Observations a response yields, as a transaction Bundle. The
        response passes the same checks as a stored one (structure, then the Questionnaire)."""
        self.fhir.check(qr)
        found = self._questionnaire(qr)
        if found is None:
            raise Unprocessable(
                "the response is not for one of the program's Questionnaires",
                expression="QuestionnaireResponse.questionnaire",
            )
        problems = check_response(qr, *found)
        if problems:
            raise Unprocessable(problems)
        qr = dict(qr)
        qr.setdefault("id", str(uuid.uuid4()))
        observations = extract(qr, found[0], found[1], score(qr, found[0], found[1]))
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{o['id']}",
                    "resource": o,
                    "request": {"method": "PUT", "url": f"Observation/{o['id']}"},
                }
                for o in observations
            ],
        }

    # ------------------------------------------------------------------ flags

    def _signals(
        self,
        tx: Tx,
        qr: dict[str, Any],
        instrument: Instrument,
        items: Mapping[str, float],
        total: float | None,
    ) -> list[Signal]:
        found: list[tuple[str, str]] = []
        item_rule = instrument.safety.get("item_positive")
        if item_rule and items.get(item_rule["link_id"], 0) > item_rule["above"]:
            found.append((f"{instrument.key}-item9-positive", ""))
        unanswered = instrument.safety.get("item_unanswered")
        if unanswered and unanswered["link_id"] not in items and items:
            band = next(b for b in instrument.bands if b.code == unanswered["band_at_least"])
            partial = sum(items.values())
            if partial >= band.min:
                found.append(
                    (
                        f"{instrument.key}-item9-unanswered",
                        f"the other answers add up to {partial:g} ({band.display.lower()} or "
                        "worse) and the suicide-risk item was not answered: ask it",
                    )
                )
        rise = instrument.safety.get("rise")
        if rise is not None and total is not None:
            previous = self._previous_total(tx, qr, instrument)
            if previous is not None and total - previous >= rise:
                found.append(
                    (
                        f"{instrument.key}-rise",
                        f"{instrument.title} total {previous:g} -> {total:g}",
                    )
                )
        return [self._signal(qr, code, detail) for code, detail in found]

    def _previous_total(self, tx: Tx, qr: dict[str, Any], instrument: Instrument) -> float | None:
        patient = qr["subject"]["reference"].split("/")[-1]
        authored = parse_date_range(qr["authored"])
        if authored is None:
            return None
        query = SearchQuery(
            "Observation",
            criteria=(
                Criterion("patient", "reference", "", (("Patient", patient),), ""),
                Criterion(
                    "code",
                    "token",
                    "",
                    ((instrument.total["system"], instrument.total["code"], True),),
                    "",
                ),
                Criterion("date", "date", "", (("lt", authored[0], authored[0]),), ""),
            ),
            count=1000,
        )
        rows = tx.matches(query)
        best: tuple[datetime, float] | None = None
        for row in rows:
            obs = json.loads(row.content)
            when = parse_date_range(obs.get("effectiveDateTime", ""))
            value = obs.get("valueQuantity", {}).get("value")
            if when and value is not None and (best is None or when[0] > best[0]):
                best = (when[0], float(value))
        return best[1] if best else None

    def _signal(self, qr: dict[str, Any], code: str, detail: str) -> Signal:
        from fhir_kat.terminology import load_terminology

        display = load_terminology().display(SAFETY, code) or code
        return Signal(
            code=code,
            text=f"{display}: {detail}" if detail else display,
            trigger=f"QuestionnaireResponse/{qr['id']}",
            subject=qr["subject"],
            start=qr["authored"],
        )

    def _provenance(self, qr: dict[str, Any], observations: list[dict[str, Any]]) -> dict[str, Any]:
        qr_ref = f"QuestionnaireResponse/{qr['id']}"
        return {
            "resourceType": "Provenance",
            "id": str(uuid.uuid5(NAMESPACE, f"{qr_ref}|extraction")),
            "target": [{"reference": f"Observation/{o['id']}"} for o in observations],
            "recorded": format_instant(self.clock()),
            "activity": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                        "code": "DERIVE",
                        "display": "derive",
                    }
                ]
            },
            "agent": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                "code": "assembler",
                                "display": "Assembler",
                            }
                        ]
                    },
                    "who": {"display": "fhir_kat SDC observation-based extraction"},
                }
            ],
            "entity": [{"role": "source", "what": {"reference": qr_ref}}],
        }


UCUM = "http://unitsofmeasure.org"


def total_score_problems(obs: Mapping[str, Any], catalogue: Catalogue) -> list[Issue]:
    """Problems of an Observation carrying an instrument's total-score code: the value must be
    a number within the instrument's range (``valueQuantity``, or ``valueInteger`` for whole-
    number totals) in the instrument's unit (UCUM ``{score}`` or ``%``) — a PHQ-9 total of 99,
    or one in kg, would otherwise become somebody's baseline. No value (a dataAbsentReason) is
    not checked."""
    instruments = [
        i
        for c in obs.get("code", {}).get("coding", [])
        if isinstance(c, dict)
        for i in [catalogue.by_total_code(str(c.get("system")), str(c.get("code")))]
        if i is not None
    ]
    if not instruments:
        return []
    inst = instruments[0]
    problems: list[Issue] = []
    value: Any = None
    where = "Observation.valueQuantity"
    if "valueQuantity" in obs:
        quantity = obs["valueQuantity"]
        value = quantity.get("value")
        ucum = quantity.get("code") if quantity.get("system") in (None, UCUM) else None
        if quantity.get("system") not in (None, UCUM) or (ucum is not None and ucum != inst.unit):
            problems.append(
                issue(
                    "value",
                    f"a {inst.title} total is in UCUM '{inst.unit}'",
                    f"{where}.code",
                )
            )
        elif quantity.get("unit") not in (None, inst.unit) and ucum is None:
            problems.append(
                issue("value", f"a {inst.title} total is in '{inst.unit}'", f"{where}.unit")
            )
        where = f"{where}.value"
    elif "valueInteger" in obs:
        value, where = obs["valueInteger"], "Observation.valueInteger"
    else:
        other = next((k for k in obs if k.startswith("value")), None)
        if other is not None:
            problems.append(
                issue(
                    "value",
                    f"a {inst.title} total is a valueQuantity in '{inst.unit}'",
                    f"Observation.{other}",
                )
            )
        return problems
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not inst.min <= value <= inst.max:
        problems.append(
            issue(
                "value",
                f"a {inst.title} total lies between {inst.min:g} and {inst.max:g}",
                where,
            )
        )
    return problems
