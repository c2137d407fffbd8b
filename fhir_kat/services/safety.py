"""Safety signals in the write pipeline: every stored fact that needs a clinician becomes a Flag
and a delivery to the care team, whichever way it arrived (native artifact, FHIR create or
update, transaction, message).

Owns: the write hook that finds signals (``clinical/safety.py`` holds the rules) in vital-sign
and body-weight Observations, AdverseEvents and ketamine MedicationAdministrations — deferred to
the end of the write transaction, so that a transaction's other entries (the session's weight,
a consent signed at the session) are there to be read; ``raise_signal`` (the one way a Flag is
raised: once per trigger and signal, never overwriting what staff did with it, queued for the
``safety-flags`` partners in the same transaction); the write rules that refuse entry errors
(a diastolic above the systolic) and keep a safety Flag's lifecycle honest (its trigger never
changes; resolving records who and when; a resolved Flag is not reopened; it is never deleted);
and ``acknowledge`` / ``resolve`` for the native API.

Must not: refuse a write for anything but an entry error or a Flag lifecycle breach, parse
HTTP, or decide consent (the delivery's consent check does, at send time).
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from fhir_kat.clinical.protocol import ProgramProtocol
from fhir_kat.clinical.safety import (
    FLAG_DETAIL,
    SafetyRules,
    Signal,
    adverse_event_signal,
    body_weight_kg,
    dose_ceiling_signal,
    dose_in_mg,
    flag_for,
    flag_id,
    is_safety_flag,
    ketamine,
    observation_when,
    prerequisite_signals,
    readings,
    route_of,
    schedule_signal,
    usable,
    vital_sign_signals,
    weight_signal,
)
from fhir_kat.errors import Conflict, MethodNotAllowed, NotFound, Unprocessable, issue
from fhir_kat.exchange import PartnerConfig
from fhir_kat.mapping.engine import NAMESPACE, deterministic_id
from fhir_kat.search import Criterion, SearchQuery, parse_date_range, split_reference
from fhir_kat.services.delivery import queue_artifact
from fhir_kat.services.fhir_rest import FhirService
from fhir_kat.store import StoredResource, Tx
from fhir_kat.store.store import format_instant
from fhir_kat.terminology import BASE
from fhir_kat.workflow.shapes import is_referral_task

log = logging.getLogger("fhir_kat.safety")

#: Extensions this service reads and writes (StructureDefinitions of ours, ADR 0002 base).
SESSION_NUMBER = f"{BASE}/StructureDefinition/session-number"
SCHEDULE_DEVIATION = f"{BASE}/StructureDefinition/schedule-deviation"
ACKNOWLEDGEMENT = f"{BASE}/StructureDefinition/flag-acknowledgement"
RESOLUTION = f"{BASE}/StructureDefinition/flag-resolution"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
SYSTOLIC, DIASTOLIC = "systolic_mmhg", "diastolic_mmhg"


class SafetyService:
    def __init__(
        self,
        fhir: FhirService,
        rules: SafetyRules,
        protocol: ProgramProtocol,
        partners: Mapping[str, PartnerConfig],
        clock: Callable[[], datetime],
        id_namespace: uuid.UUID = NAMESPACE,
    ) -> None:
        self.fhir = fhir
        self.rules = rules
        self.protocol = protocol
        self.partners = partners
        self.clock = clock
        #: The installation's namespace of ids derived from business identifiers (app.py).
        self.id_namespace = id_namespace

    # ------------------------------------------------------------------ raising a Flag

    def raise_signal(self, tx: Tx, signal: Signal) -> bool:
        """Store the Flag of ``signal`` unless it was raised before (then what staff did with
        it — acknowledged, resolved — stands), and queue it for the care team in the same
        transaction; True when a new Flag was raised."""
        fid = flag_id(signal.trigger, signal.code)
        if tx.get("Flag", fid) is not None:
            return False
        flag = flag_for(signal, self.rules)
        written = self.fhir.update_in(tx, flag)
        patient = written.stored.patient_id
        queue_artifact(tx, self.partners, "safety-flags", self._for_delivery(tx, flag), patient)
        log.info("safety flag raised", extra={"flag": fid, "code": signal.code})
        return True

    def _for_delivery(self, tx: Tx, flag: dict[str, Any]) -> list[dict[str, Any]]:
        """The Flag as the care team receives it: with the Patient (so that a conditional
        create finds or creates the participant there), and its other references as logical
        ones (the trigger's business identifier and type): the care team's system need not
        hold our Observations or AdverseEvents for the Flag to be accepted."""
        sent = json.loads(json.dumps(flag))
        for ext in sent.get("extension", []):
            if ext.get("url") == FLAG_DETAIL:
                ext["valueReference"] = self._logical(tx, ext["valueReference"]["reference"])
        if "encounter" in sent:
            sent["encounter"] = self._logical(tx, sent["encounter"]["reference"])
        out = [sent]
        target = split_reference(flag.get("subject", {}).get("reference", ""))
        patient = tx.get(*target) if target else None
        if patient is not None and not patient.deleted:
            body = patient.json()
            body.pop("meta", None)
            out.append(body)
        return out

    @staticmethod
    def _logical(tx: Tx, reference: str) -> dict[str, Any]:
        target = split_reference(reference)
        stored = tx.get(*target) if target else None
        rtype = target[0] if target else "resource"
        if stored is None or stored.deleted:
            return {"type": rtype, "display": rtype}
        idents = stored.json().get("identifier")
        ident = idents if isinstance(idents, dict) else next(iter(idents or []), None)
        out: dict[str, Any] = {"type": rtype, "display": rtype}
        if isinstance(ident, dict) and ident.get("system") and ident.get("value"):
            out["identifier"] = {"system": ident["system"], "value": ident["value"]}
        return out

    # ------------------------------------------------------------------ the write hook

    def on_write(self, tx: Tx, stored: StoredResource, _created: bool) -> None:
        if stored.deleted or not _may_signal(stored):
            return
        key = (stored.type, stored.id)
        tx.defer(f"safety:{stored.type}/{stored.id}", lambda t: self._check(t, key))

    def _check(self, tx: Tx, key: tuple[str, str]) -> None:
        stored = tx.get(*key)
        if stored is None or stored.deleted:
            return
        resource = stored.json()
        if stored.type == "Observation":
            signals = vital_sign_signals(resource, stored.id, self.rules)
            weight = self._weight_signal(tx, resource, stored)
            signals += [weight] if weight else []
        elif stored.type == "AdverseEvent":
            found = adverse_event_signal(resource, stored.id, self.rules)
            signals = [found] if found else []
        else:
            signals = self._session_signals(tx, resource, stored)
        for signal in signals:
            self.raise_signal(tx, signal)

    def _weight_signal(self, tx: Tx, obs: dict[str, Any], stored: StoredResource) -> Signal | None:
        if body_weight_kg(obs) is None or stored.patient_id is None:
            return None
        others = [
            (when, kg, row.id)
            for row in self._search(tx, "Observation", stored.patient_id, code="29463-7")
            if row.id != stored.id
            for when, kg, fit in (_weight_reading(row.content),)
            if fit and kg is not None
        ]
        return weight_signal(obs, stored.id, others, self.rules)

    def _session_signals(self, tx: Tx, ma: dict[str, Any], stored: StoredResource) -> list[Signal]:
        if not ketamine(ma) or not usable(ma):
            return []
        route, dose = route_of(ma), dose_in_mg(ma)
        out: list[Signal] = []
        if route is None or dose is None:
            out.append(
                Signal(
                    "dose-unverifiable",
                    "Ketamine administration whose "
                    + ("route" if route is None else "dose in mg")
                    + " the safety rules cannot read: the dose ceiling was not checked",
                    f"MedicationAdministration/{stored.id}",
                    {"reference": ma.get("subject", {}).get("reference", "")},
                    _session_start(ma),
                )
            )
        ceiling = dose_ceiling_signal(
            ma, stored.id, route, dose, self._session_weight(tx, ma, stored), self.rules
        )
        out += [ceiling] if ceiling else []
        schedule = schedule_signal(ma, stored.id, *self._schedule(ma, route))
        out += [schedule] if schedule else []
        if self.rules.dosing_prerequisites and stored.patient_id is not None:
            tasks = [
                (row.id, str(row.json().get("status", "")))
                for row in self._search(tx, "Task", stored.patient_id)
                if is_referral_task(row.json())
            ]
            consent = self._treatment_consent(tx, ma, stored.patient_id)
            out += prerequisite_signals(ma, stored.id, tasks, consent)
        return out

    def _session_weight(self, tx: Tx, ma: dict[str, Any], stored: StoredResource) -> float | None:
        """The body weight the session recorded (``supportingInformation``), else the
        participant's latest weight at or before the session."""
        for info in ma.get("supportingInformation", []) or []:
            target = split_reference(info.get("reference", ""))
            found = tx.get(*target) if target and target[0] == "Observation" else None
            if found is not None and not found.deleted:
                kg = body_weight_kg(found.json())
                if kg is not None:
                    return kg
        start = parse_date_range(_session_start(ma))
        if start is None or stored.patient_id is None:
            return None
        best: tuple[datetime, float] | None = None
        for row in self._search(tx, "Observation", stored.patient_id, code="29463-7"):
            recorded, kg, fit = _weight_reading(row.content)
            when = parse_date_range(recorded)
            if (
                when
                and kg is not None
                and fit
                and when[0] <= start[1]
                and (best is None or when[0] > best[0])
            ):
                best = (when[0], kg)
        return best[1] if best else None

    def _schedule(self, ma: dict[str, Any], route: str | None) -> tuple[str | None, str | None]:
        """(the recorded deviation reason, what the protocol says) for this session."""
        reason = None
        for ext in ma.get("extension", []) or []:
            if ext.get("url") == SCHEDULE_DEVIATION:
                reason = next(
                    (
                        str(sub.get("valueString"))
                        for sub in ext.get("extension", [])
                        if sub.get("url") == "reason"
                    ),
                    "recorded without a reason",
                )
        number = session_number(ma)
        planned = None
        if number is not None:
            rule = self.protocol.sessions.get(number)
            if rule is None:
                planned = (
                    f"session {number} is not in protocol {self.protocol.reference} "
                    f"(sessions {', '.join(str(n) for n in sorted(self.protocol.sessions))})"
                )
            elif route is not None and route not in rule.routes:
                planned = (
                    f"session {number} was given {route}; protocol {self.protocol.reference} "
                    f"gives it {', '.join(rule.routes)}"
                )
        return reason, planned

    def _treatment_consent(self, tx: Tx, ma: dict[str, Any], patient_id: str) -> bool:
        """An active treatment Consent (scope ``treatment``) of the participant that covers
        the session: its period includes the session start, it was signed by then, and — when
        it names a session number — it is for this session."""
        start = parse_date_range(_session_start(ma))
        number = session_number(ma)
        for row in self._search(tx, "Consent", patient_id):
            consent = row.json()
            if consent.get("status") != "active":
                continue
            scopes = {
                c.get("code")
                for c in consent.get("scope", {}).get("coding", [])
                if c.get("system") == CONSENT_SCOPE
            }
            if "treatment" not in scopes:
                continue
            signed = parse_date_range(str(consent.get("dateTime", "")))
            if start and signed and signed[0] > start[1]:
                continue
            period = consent.get("provision", {}).get("period", {})
            begin = parse_date_range(str(period.get("start", ""))) if period else None
            end = parse_date_range(str(period.get("end", ""))) if period else None
            if start and ((begin and start[1] < begin[0]) or (end and start[0] > end[1])):
                continue
            named = session_number(consent)
            if named is not None and number is not None and named != number:
                continue
            return True
        return False

    @staticmethod
    def _search(
        tx: Tx, rtype: str, patient_id: str, code: str | None = None
    ) -> list[StoredResource]:
        criteria = [Criterion("patient", "reference", "", (("Patient", patient_id),), "")]
        if code is not None:
            criteria.append(Criterion("code", "token", "", (("http://loinc.org", code, True),), ""))
        rows = tx.matches(SearchQuery(rtype, criteria=tuple(criteria), count=1000))
        return [r for r in rows if not r.deleted]

    # ------------------------------------------------------------------ write rules

    def check_rule(self, tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
        rtype = body.get("resourceType")
        if rtype == "Observation":
            values = readings(body)
            if SYSTOLIC in values and DIASTOLIC in values and values[DIASTOLIC] > values[SYSTOLIC]:
                raise Unprocessable(
                    issue(
                        "business-rule",
                        "the diastolic blood pressure is above the systolic: an entry error; "
                        "correct the reading (nothing was stored)",
                        "Observation.component",
                    )
                )
        elif rtype == "Flag" and current is not None and not current.deleted:
            old = current.json()
            if is_safety_flag(old):
                _check_flag_change(old, body)

    def delete_rule(self, _tx: Tx, current: StoredResource) -> None:
        """A safety Flag is never deleted: it is resolved, or marked entered-in-error."""
        if current.type == "Flag" and is_safety_flag(current.json()):
            raise MethodNotAllowed(
                issue(
                    "business-rule",
                    "a safety Flag is not deleted: resolve it (status inactive, period.end, "
                    "the flag-resolution extension) or mark it entered-in-error",
                    "Flag",
                )
            )

    # ------------------------------------------------------------------ lifecycle (native API)

    def acknowledge(
        self, flag_id_: str, who: dict[str, Any], note: str | None, access: Any = None
    ) -> StoredResource:
        return self._lifecycle(flag_id_, who, note, access, resolve=False)

    def resolve(
        self, flag_id_: str, who: dict[str, Any], note: str | None, access: Any = None
    ) -> StoredResource:
        return self._lifecycle(flag_id_, who, note, access, resolve=True)

    def _lifecycle(
        self,
        fid: str,
        who: dict[str, Any],
        note: str | None,
        access: Any,
        *,
        resolve: bool,
    ) -> StoredResource:
        now = format_instant(self.clock())
        # Opened for the caller: a Flag it may not see is, for it, not there.
        with self.fhir.write(access) as tx:
            stored = tx.get("Flag", fid, for_update=True)
            if stored is None or stored.deleted or not is_safety_flag(stored.json()):
                raise NotFound(issue("not-found", f"no safety Flag {fid}", "Flag"))
            flag = stored.json()
            flag.pop("meta", None)
            if flag.get("status") != "active":
                raise Conflict(
                    issue("business-rule", f"the Flag is already {flag.get('status')}", "Flag")
                )
            practitioner = self.fhir.update_in(tx, practitioner_of(who, self.id_namespace)).stored
            record = {
                "url": RESOLUTION if resolve else ACKNOWLEDGEMENT,
                "extension": [
                    {
                        "url": "by",
                        "valueReference": {"reference": f"Practitioner/{practitioner.id}"},
                    },
                    {"url": "at", "valueDateTime": now},
                    *([{"url": "note", "valueString": note}] if note else []),
                ],
            }
            flag["extension"] = [
                e for e in flag.get("extension", []) if e.get("url") != record["url"]
            ] + [record]
            if resolve:
                flag["status"] = "inactive"
                flag["period"] = {**flag.get("period", {}), "end": now}
            return self.fhir.update_in(tx, flag).stored


@functools.lru_cache(maxsize=8192)
def _weight_reading(content: str) -> tuple[str, float | None, bool]:
    """(when, kg, usable) of a stored Observation's JSON, remembered by that JSON: the weight
    rules read every body weight of the participant on each new weight or dosing session, and
    parsing each again was most of a write's time for a participant with a long history (the
    JSON is the key, so an answer can never outlive what it was read from)."""
    obs = json.loads(content)
    return observation_when(obs), body_weight_kg(obs), usable(obs)


def _may_signal(stored: StoredResource) -> bool:
    """Could this version raise a signal? (A cheap look, so that the Observations of a
    referral or a questionnaire cost the write nothing.)"""
    if stored.type == "AdverseEvent":
        return True
    if stored.type == "MedicationAdministration":
        return ketamine(stored.json())
    if stored.type == "Observation":
        obs = stored.json()
        return bool(readings(obs)) or body_weight_kg(obs) is not None
    return False


def practitioner_of(who: Mapping[str, Any], namespace: uuid.UUID = NAMESPACE) -> dict[str, Any]:
    """The staff member who acknowledges or resolves, as the Practitioner the artifact
    mappings would make of them (same deterministic id: one person, one resource)."""
    ident = who["identifier"]
    name: dict[str, Any] = {"family": who["family_name"]}
    if who.get("given_names"):
        name["given"] = list(who["given_names"])
    return {
        "resourceType": "Practitioner",
        "id": deterministic_id(
            "Practitioner", ident["system"], ident["value"], namespace=namespace
        ),
        "identifier": [{"system": ident["system"], "value": ident["value"]}],
        "name": [name],
    }


def session_number(resource: Mapping[str, Any]) -> int | None:
    for ext in resource.get("extension", []) or []:
        if ext.get("url") == SESSION_NUMBER and isinstance(ext.get("valueInteger"), int):
            return int(ext["valueInteger"])
    return None


def _session_start(ma: Mapping[str, Any]) -> str:
    period = ma.get("effectivePeriod") or {}
    return str(ma.get("effectiveDateTime") or period.get("start") or "")


#: What identifies a safety Flag's trigger: never changed once raised.
_FIXED = ("identifier", "code", "subject", "category", "encounter")


def _check_flag_change(old: dict[str, Any], new: dict[str, Any]) -> None:
    problems = [
        issue("business-rule", f"a safety Flag's {key} is fixed when it is raised", f"Flag.{key}")
        for key in _FIXED
        if old.get(key) != new.get(key)
    ]
    details = _details(old)
    if _details(new) != details:
        problems.append(
            issue(
                "business-rule",
                "a safety Flag's flag-detail (what triggered it) is fixed when it is raised",
                "Flag.extension",
            )
        )
    if problems:
        raise Unprocessable(problems)
    before, after = old.get("status"), new.get("status")
    if before != "active" and after != before:
        raise Conflict(
            issue(
                "business-rule",
                f"a {before} safety Flag is not reopened; a new signal raises a new Flag",
                "Flag.status",
            )
        )
    if before == "active" and after == "inactive":
        missing = []
        if not new.get("period", {}).get("end"):
            missing.append(issue("required", "a resolved Flag has period.end", "Flag.period.end"))
        if not _recorded_by(new, RESOLUTION):
            missing.append(
                issue(
                    "required",
                    "a resolved safety Flag records who resolved it and when (extension "
                    f"{RESOLUTION} with by and at)",
                    "Flag.extension",
                )
            )
        if missing:
            raise Unprocessable(missing)
    if _has(new, ACKNOWLEDGEMENT) and not _recorded_by(new, ACKNOWLEDGEMENT):
        raise Unprocessable(
            issue(
                "required",
                f"an acknowledgement records who and when (extension {ACKNOWLEDGEMENT} with by "
                "and at)",
                "Flag.extension",
            )
        )


def _details(flag: Mapping[str, Any]) -> list[Any]:
    return [
        e.get("valueReference") for e in flag.get("extension", []) if e.get("url") == FLAG_DETAIL
    ]


def _has(flag: Mapping[str, Any], url: str) -> bool:
    return any(e.get("url") == url for e in flag.get("extension", []))


def _recorded_by(flag: Mapping[str, Any], url: str) -> bool:
    for ext in flag.get("extension", []):
        if ext.get("url") != url:
            continue
        subs = {s.get("url"): s for s in ext.get("extension", [])}
        by, at = subs.get("by", {}), subs.get("at", {})
        if by.get("valueReference") and at.get("valueDateTime"):
            return True
    return False
