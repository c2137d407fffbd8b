"""The referral form's prefill from the EHR a SMART launch came from (docs/integrators.md,
"SMART app").

Owns: reading the launched patient's chart from the EHR's FHIR server with the launch's access
token (``exchange/ehr_fhir.py``: the Patient, every Condition, active MedicationRequests, the
recent PHQ-9/GAD-7/PCL-5 totals, and the physician's own Practitioner), and turning it into
what the form shows: ``Questionnaire/kat-referral``'s ``$populate`` (``mapping/sdc_referral``:
the same initialExpressions an SDC renderer evaluates) read back into the referral artifact's
fields, the latest scores as the CDS Hooks card states them (``workflow.chart.latest_totals``)
and the active medications' names, for the physician to review.

Must not: keep any of it (a prefill lives in the page it is rendered into; nothing of the chart
reaches the store unless the physician sends it as the referral), log any of it, or read
anything but the registered EHR's FHIR base.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fhir_kat.exchange.ehr_fhir import EhrFhirReader, search_matches
from fhir_kat.instruments.definitions import Catalogue
from fhir_kat.mapping.sdc_referral import answered_fields, populate
from fhir_kat.workflow.chart import latest_totals

LOINC = "http://loinc.org"


class ChartUnavailable(Exception):
    """The EHR's FHIR server did not answer the patient (down, refused, not FHIR)."""


@dataclass(frozen=True)
class Prefill:
    #: The referral artifact's fields the chart answers (``patient.family_name`` → value…).
    fields: dict[str, Any]
    #: The problem list's coded conditions the form offers (active, confirmed; as populate
    #: selects them), each ``{system, code, display}``.
    conditions: list[dict[str, str]]
    #: ``PHQ-9: 17 (2026-11-20)``: the latest total of each instrument in the chart.
    scores: list[str]
    #: The names of the patient's active medications.
    medications: list[str]
    #: Whether each part could be read (``False``: the EHR refused it; the page says so).
    complete: bool


class LaunchChart:
    def __init__(
        self,
        catalogue: Catalogue,
        reader_factory: Callable[[str, str], EhrFhirReader] = EhrFhirReader,
    ) -> None:
        self.reader_factory = reader_factory
        # Total scores of the instruments with a LOINC total, from the catalogue (never retyped).
        self.totals = {
            inst.total["code"]: inst.title
            for inst in catalogue.instruments.values()
            if inst.total.get("system") == LOINC
        }

    def prefill(self, iss: str, token: str, patient_id: str, user_path: str | None) -> Prefill:
        reader = self.reader_factory(iss, token)
        patient = reader.get(f"Patient/{patient_id}")
        if (
            not isinstance(patient, dict)
            or patient.get("resourceType") != "Patient"
            or patient.get("id") != patient_id
        ):
            raise ChartUnavailable("patient not readable")
        codes = ",".join(f"{LOINC}|{code}" for code in self.totals)
        conditions = reader.get(f"Condition?patient={patient_id}")
        medications = reader.get(f"MedicationRequest?patient={patient_id}&status=active")
        scores = reader.get(f"Observation?patient={patient_id}&code={codes}&_sort=-date&_count=30")
        context: dict[str, Any] = {"patient": patient}
        user = self._practitioner(reader, user_path)
        if user is not None:
            context["user"] = user
        if isinstance(conditions, dict) and conditions.get("resourceType") == "Bundle":
            context["conditions"] = conditions
        fields = answered_fields(populate(context, f"Patient/{patient_id}"))
        found = fields.pop("conditions", [])
        return Prefill(
            fields=_flatten(fields),
            conditions=[c for c in found if isinstance(c, dict)],
            scores=latest_totals(search_matches(scores, "Observation") or [], self.totals, LOINC),
            medications=sorted(
                {_medication(m) for m in search_matches(medications, "MedicationRequest") or []}
                - {""}
            ),
            complete=all(
                isinstance(b, dict) and b.get("resourceType") == "Bundle"
                for b in (conditions, medications, scores)
            ),
        )

    @staticmethod
    def _practitioner(reader: EhrFhirReader, user_path: str | None) -> dict[str, Any] | None:
        """The physician's Practitioner (``%user``): ``fhirUser`` itself, or the practitioner a
        PractitionerRole names (a relative reference on the same server; nothing else)."""
        if not user_path:
            return None
        found = reader.get(user_path)
        if isinstance(found, dict) and found.get("resourceType") == "PractitionerRole":
            ref = str((found.get("practitioner") or {}).get("reference") or "")
            rtype, _, rid = ref.partition("/")
            if rtype != "Practitioner" or not _ID.match(rid):
                return None
            found = reader.get(ref)
        return found if _is(found, "Practitioner") else None


_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # a FHIR id: a relative reference, never a URL


def _is(resource: Any, rtype: str) -> bool:
    return isinstance(resource, dict) and resource.get("resourceType") == rtype


def _medication(request: Mapping[str, Any]) -> str:
    concept = request.get("medicationCodeableConcept")
    if not isinstance(concept, dict):
        return ""  # a reference to a Medication resource: not resolved, the physician adds it
    if isinstance(concept.get("text"), str):
        return str(concept["text"])[:200]
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and isinstance(coding.get("display"), str):
            return str(coding["display"])[:200]
    return ""


def _flatten(artifact: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"patient": {"family_name": "X"}}`` → ``{"patient.family_name": "X"}``; a list of
    names becomes the words the form's names field takes."""
    out: dict[str, Any] = {}
    for key, value in artifact.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{path}."))
        elif isinstance(value, list):
            if all(isinstance(v, str) for v in value):
                out[path] = " ".join(value)
        else:
            out[path] = value
    return out
