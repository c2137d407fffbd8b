"""CDS Hooks 2.0 services: the program suggests itself in the referring physician's EHR.

Owns: the discovery document, the ``patient-view`` and ``order-select`` services and their
``prefetch`` templates, reading the chart (the hook's prefetch, else the EHR's FHIR server with
the hook's ``fhirAuthorization``), the card, and the feedback the EHR sends about a card.

The card is the triage decision (``ReferralWorkflow.judge``: ``mappings/workflow/
eligibility.yaml`` and the criterion ValueSets, with this installation's minimum age and
terminology server) of the facts ``workflow.chart`` reads from the chart — the same reading and
the same rules a referral with that data meets. What the card says (ADR 0019):

- no recognised, active inclusion diagnosis → no card (nothing suggests the program);
- a recognised exclusion → no card (the program would not take the referral; the EHR is not
  told why: a card that argues against a referral nobody asked for is noise);
- otherwise a card "may be eligible" naming the inclusions met, what the referral form will ask
  (what only the referrer can state: ``triage.referrer_statements``), and — when triage would
  hold the referral for a clinician (a hold, a review criterion, missing data, a condition no
  criterion classifies: unknown means review, never a default) — "needs clinician review" with
  each reason. Nothing unclassified ever makes a card say less than "review".

A chart the service cannot read (no prefetch and no usable ``fhirServer``/``fhirAuthorization``,
or the EHR refusing) is 412, as CDS Hooks 2.0 says; a chart that lacks data is no card.
Must not: parse HTTP, store anything of the chart, or log any of it (PHI).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_kat.errors import BadRequest, PreconditionFailed, issue
from fhir_kat.exchange.ehr_fhir import EhrFhirReader, search_matches
from fhir_kat.instruments.definitions import Catalogue
from fhir_kat.security.cds_clients import CdsClient, CdsHooksConfig
from fhir_kat.services.referrals import ReferralWorkflow
from fhir_kat.workflow.chart import age_on, chart_facts, latest_totals
from fhir_kat.workflow.shapes import SERVICE
from fhir_kat.workflow.triage import Decision, Finding, referrer_statements

LOINC = "http://loinc.org"
PROGRAM = {
    "system": SERVICE,
    "code": "kat-program",
    # The display of mappings/terminology/CodeSystem-kat-service.json
    "display": "Ketamine-assisted therapy program (12 weeks, community of practice)",
}
#: Card and suggestion ids: derived from the hook instance, so a re-sent hook gets the same ids.
NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000c05")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR id
#: Resources the chart is read from (prefetch key → resource type expected in its Bundle).
CHART = {
    "conditions": "Condition",
    "allergies": "AllergyIntolerance",
    "scores": "Observation",
    "medications": "MedicationRequest",
}
#: Without these, triage cannot read the chart (412 when neither prefetch nor the EHR gives them).
REQUIRED = ("patient", "conditions", "allergies")


@dataclass(frozen=True)
class CdsService:
    id: str
    hook: str
    title: str
    description: str


SERVICES = {
    s.id: s
    for s in (
        CdsService(
            "kat-referral-patient-view",
            "patient-view",
            "Ketamine-assisted therapy program: referral suggestion",
            "Suggests a referral to the ketamine-assisted therapy program when the chart meets "
            "the program's inclusion criteria and no recognised exclusion; names what a program "
            "clinician would review.",
        ),
        CdsService(
            "kat-referral-order-select",
            "order-select",
            "Ketamine-assisted therapy program: when a mental-health referral is selected",
            "When the physician selects a referral order the program answers (its own service "
            "code or one configured), tells whether the ketamine-assisted therapy program may "
            "fit, by the same rules as patient-view.",
        ),
    )
}


class CdsHooksService:
    def __init__(
        self,
        workflow: ReferralWorkflow,
        catalogue: Catalogue,
        config: CdsHooksConfig,
        clock: Callable[[], datetime],
        reader_factory: Callable[[str, str], EhrFhirReader] = EhrFhirReader,
    ) -> None:
        self.workflow = workflow
        self.config = config
        self.clock = clock
        self.reader_factory = reader_factory
        # Total scores of the instruments with a LOINC total (PHQ-9, GAD-7, PCL-5), from the
        # catalogue (mappings/instruments/instruments.yaml), never retyped here.
        self.totals = {
            inst.total["code"]: inst.title
            for inst in catalogue.instruments.values()
            if inst.total.get("system") == LOINC
        }
        self.statements = referrer_statements()

    # ------------------------------------------------------------------ discovery

    def prefetch_templates(self) -> dict[str, str]:
        codes = ",".join(f"{LOINC}|{code}" for code in self.totals)
        return {
            "patient": "Patient/{{context.patientId}}",
            # Every condition, not only active ones: triage judges history too (an inactive
            # coronary artery disease still excludes; a resolved psychosis goes to review).
            "conditions": "Condition?patient={{context.patientId}}",
            "allergies": "AllergyIntolerance?patient={{context.patientId}}",
            "scores": f"Observation?patient={{{{context.patientId}}}}&code={codes}"
            "&_sort=-date&_count=30",
            "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
        }

    def discovery(self) -> dict[str, Any]:
        prefetch = self.prefetch_templates()
        return {
            "services": [
                {
                    "hook": s.hook,
                    "title": s.title,
                    "description": s.description,
                    "id": s.id,
                    "prefetch": prefetch,
                    "usageRequirements": (
                        "Register the EHR's JWKS (docs/integrators.md, 'Referral from your "
                        "EMR'); send prefetch, or fhirServer and fhirAuthorization with read "
                        "access to the patient's Patient, Condition, AllergyIntolerance, "
                        "Observation and MedicationRequest."
                    ),
                }
                for s in SERVICES.values()
            ]
        }

    # ------------------------------------------------------------------ a hook call

    def call(self, service_id: str, body: Any, client: CdsClient, app_url: str) -> dict[str, Any]:
        """The CDS Hooks response to ``body`` for ``service_id`` (already known to exist)."""
        service = SERVICES[service_id]
        request = _check_request(body, service)
        context = request["context"]
        if service.hook == "order-select" and not self._selects_referral(context):
            return {"cards": []}
        patient_id = str(context["patientId"])
        chart = self._chart(request, client, patient_id)
        patient = chart["patient"]
        if patient.get("resourceType") != "Patient" or patient.get("id", patient_id) != patient_id:
            raise PreconditionFailed(
                issue(
                    "invalid",
                    "'patient' is not the Patient context.patientId names",
                    "prefetch.patient",
                )
            )
        resources = [r for key in ("conditions", "allergies") for r in chart[key]]
        facts = chart_facts(
            resources, (), age_on(str(patient.get("birthDate", "")), self.clock().date())
        )
        decision = self.workflow.judge(facts)
        card = self.card(decision, request, service, patient_id, chart["scores"], app_url)
        return {"cards": [card] if card else []}

    def card(
        self,
        decision: Decision,
        request: Mapping[str, Any],
        service: CdsService,
        patient_id: str,
        scores: Sequence[Mapping[str, Any]],
        app_url: str,
    ) -> dict[str, Any] | None:
        reasons = [f for f in decision.met if f.criterion not in self.statements]
        if not reasons or decision.outcome == "rejected":
            return None
        to_ask = [
            f for f in decision.findings if f.kind == "missing" and f.criterion in self.statements
        ]
        review = [f for f in decision.findings if f not in to_ask]
        summary = "May be eligible for the ketamine-assisted therapy program"
        if review:
            summary += " (needs clinician review)"
        instance = str(request["hookInstance"])
        card_id = str(uuid.uuid5(NAMESPACE, f"{service.id}|{instance}|card"))
        suggestion_id = str(uuid.uuid5(NAMESPACE, f"{service.id}|{instance}|suggestion"))
        draft: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            "status": "draft",
            "intent": "proposal",
            "code": {
                "coding": [PROGRAM],
                "text": "Referral to the ketamine-assisted therapy program",
            },
            "subject": {"reference": f"Patient/{patient_id}"},
        }
        user = str(request["context"].get("userId", ""))
        if user.startswith(("Practitioner/", "PractitionerRole/")):
            draft["requester"] = {"reference": user}
        return {
            "uuid": card_id,
            "summary": summary,
            "detail": _detail(decision, reasons, to_ask, review, self._latest(scores)),
            "indicator": "info",
            "source": {
                "label": "Ketamine-assisted therapy program (fhir_kat)",
                "topic": {k: PROGRAM[k] for k in ("system", "code", "display")},
            },
            "suggestions": [
                {
                    "label": "Draft a referral to the ketamine-assisted therapy program",
                    "uuid": suggestion_id,
                    "isRecommended": False,
                    "actions": [
                        {
                            "type": "create",
                            "description": "A draft referral (ServiceRequest, intent proposal) "
                            "for you to complete and sign",
                            "resource": draft,
                        }
                    ],
                }
            ],
            "selectionBehavior": "at-most-one",
            "links": [
                {
                    "label": "Open the program's referral form",
                    "url": self.config.referral_app_url or app_url,
                    "type": "absolute",
                }
            ],
        }

    def _selects_referral(self, context: Mapping[str, Any]) -> bool:
        """Whether a selected draft order is a referral the program answers."""
        wanted = {(SERVICE, "kat-program"), *self.config.order_codes}
        selected = set(context.get("selections") or [])
        entries = (context.get("draftOrders") or {}).get("entry") or []
        for entry in entries:
            res = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(res, dict) or res.get("resourceType") != "ServiceRequest":
                continue
            if f"ServiceRequest/{res.get('id')}" not in selected:
                continue
            codings = (res.get("code") or {}).get("coding") or []
            if any(
                (c.get("system"), c.get("code")) in wanted for c in codings if isinstance(c, dict)
            ):
                return True
        return False

    def _chart(
        self, request: Mapping[str, Any], client: CdsClient, patient_id: str
    ) -> dict[str, Any]:
        """Every prefetch key's data: the hook's prefetch where it holds it, else the EHR's FHIR
        server; 412 when a key triage needs is in neither."""
        templates = self.prefetch_templates()
        prefetch = request.get("prefetch") or {}
        reader = self._reader(request, client)
        chart: dict[str, Any] = {}
        missing: list[str] = []
        for key, template in templates.items():
            data = prefetch.get(key)
            if not isinstance(data, dict) and reader is not None:
                data = reader.get(template.replace("{{context.patientId}}", patient_id))
            if key == "patient":
                chart[key] = data if isinstance(data, dict) else None
            else:
                chart[key] = search_matches(data, CHART[key])
            if chart[key] is None:
                chart[key] = [] if key != "patient" else None
                if key in REQUIRED:
                    missing.append(key)
        if missing:
            raise PreconditionFailed(
                [
                    issue(
                        "incomplete",
                        f"cannot read '{key}': not in prefetch, and the EHR's FHIR server "
                        "(fhirServer with fhirAuthorization, registered for this EHR) did not "
                        "answer it",
                        f"prefetch.{key}",
                    )
                    for key in missing
                ]
            )
        return chart

    def _reader(self, request: Mapping[str, Any], client: CdsClient) -> EhrFhirReader | None:
        server = str(request.get("fhirServer") or "").rstrip("/")
        auth = request.get("fhirAuthorization")
        token = auth.get("access_token") if isinstance(auth, dict) else None
        if not server or not isinstance(token, str) or not token:
            return None
        if server not in client.fhir_servers:
            # Never an address the request picks: only the FHIR servers registered for this EHR.
            return None
        return self.reader_factory(server, token)

    def _latest(self, scores: Sequence[Mapping[str, Any]]) -> list[str]:
        """``PHQ-9: 18 (2026-11-02)`` for the latest total of each instrument in the chart."""
        return latest_totals(scores, self.totals, LOINC)


def _detail(
    decision: Decision,
    reasons: list[Finding],
    to_ask: list[Finding],
    review: list[Finding],
    scores: list[str],
) -> str:
    parts = ["**Why the program may fit**", *[f"- {f.text}" for f in reasons]]
    if to_ask:
        parts += ["", "**The referral form will ask**", *[f"- {f.text}" for f in to_ask]]
    if review:
        parts += [
            "",
            "**A program clinician would review** (a referral is not refused for these):",
            *[f"- {f.text}" for f in review],
        ]
    if scores:
        parts += ["", "**Latest scores in the chart**", *[f"- {s}" for s in scores]]
    parts += [
        "",
        f"By the program's triage rules (version {decision.rules_version}), the same rules a "
        "referral with this data meets.",
    ]
    return "\n".join(parts)


def _check_request(body: Any, service: CdsService) -> dict[str, Any]:
    """The CDS Hooks 2.0 request's required shape; 400 naming each problem."""
    if not isinstance(body, dict):
        raise BadRequest(issue("structure", "a CDS Hooks request is a JSON object"))
    problems = []
    if body.get("hook") != service.hook:
        problems.append(issue("value", f"this service answers the hook '{service.hook}'", "hook"))
    if not isinstance(body.get("hookInstance"), str) or not body["hookInstance"]:
        problems.append(issue("required", "hookInstance (a UUID) is required", "hookInstance"))
    context = body.get("context")
    if not isinstance(context, dict):
        problems.append(issue("required", "context is required", "context"))
    else:
        if not isinstance(context.get("userId"), str):
            problems.append(issue("required", "context.userId is required", "context.userId"))
        if not isinstance(context.get("patientId"), str) or not _ID.match(context["patientId"]):
            problems.append(
                issue("required", "context.patientId (a FHIR id) is required", "context.patientId")
            )
        if service.hook == "order-select":
            if not isinstance(context.get("selections"), list):
                problems.append(
                    issue("required", "context.selections is required", "context.selections")
                )
            if not isinstance(context.get("draftOrders"), dict):
                problems.append(
                    issue("required", "context.draftOrders is required", "context.draftOrders")
                )
    for key in ("prefetch", "fhirAuthorization"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            problems.append(issue("structure", f"{key} must be an object", key))
    if body.get("fhirServer") is not None and not isinstance(body["fhirServer"], str):
        problems.append(issue("structure", "fhirServer must be a URL", "fhirServer"))
    if problems:
        raise BadRequest(problems)
    return body


def check_feedback(body: Any) -> list[dict[str, Any]]:
    """The items of a CDS Hooks 2.0 feedback request; 400 naming each problem."""
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise BadRequest(issue("required", "feedback (a list) is required", "feedback"))
    problems = []
    for i, item in enumerate(items):
        where = f"feedback[{i}]"
        if not isinstance(item, dict):
            problems.append(issue("structure", "a feedback item is an object", where))
            continue
        if not isinstance(item.get("card"), str) or not item["card"]:
            problems.append(
                issue("required", "card (the card's uuid) is required", f"{where}.card")
            )
        if item.get("outcome") not in ("accepted", "overridden"):
            problems.append(
                issue("value", "outcome must be accepted or overridden", f"{where}.outcome")
            )
        if not isinstance(item.get("outcomeTimestamp"), str):
            problems.append(
                issue("required", "outcomeTimestamp is required", f"{where}.outcomeTimestamp")
            )
    if problems:
        raise BadRequest(problems)
    return items


def feedback_summary(service_id: str, items: list[dict[str, Any]]) -> str:
    """What the audit record keeps of a feedback request: card ids, outcomes, accepted
    suggestion ids and coded override reasons (never the user's free-text comment)."""
    parts = []
    for item in items:
        text = f"card {_safe(item['card'])} {item['outcome']}"
        accepted = [
            _safe(str(s.get("id")))
            for s in item.get("acceptedSuggestions") or []
            if isinstance(s, dict)
        ]
        if accepted:
            text += f" (suggestion {', '.join(accepted)})"
        reason = (
            (item.get("overrideReason") or {}).get("reason")
            if isinstance(item.get("overrideReason"), dict)
            else None
        )
        if isinstance(reason, dict) and reason.get("code"):
            text += f" (reason {_safe(str(reason.get('system', '')))}|{_safe(str(reason['code']))})"
        parts.append(text)
    return f"cds-hooks feedback {service_id}: " + "; ".join(parts)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9:/._\-|]", "", text)[:80]
