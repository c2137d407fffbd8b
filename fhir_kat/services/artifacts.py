"""Storing program artifacts: validate + map (pure ``mapping`` layer), then one transaction that
checks identity and references and writes every resulting resource, or nothing.

Owns: the clinical storage rules around a mapped artifact — one PHN, one Patient (conflicting
demographics refused, never merged); every reference resolves (to the artifact's own resources
or to stored ones); idempotent re-sends (no new version when nothing changed). Must not: know
mapping rules (``mapping``) or HTTP (``api``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_kat.clinical.protocol import ProgramProtocol
from fhir_kat.errors import Forbidden, Issue, Unprocessable, issue
from fhir_kat.exchange import PartnerConfig
from fhir_kat.mapping import MappingContext, map_artifact
from fhir_kat.mapping.engine import targets
from fhir_kat.mapping.sdc_referral import (
    REFERRAL_STATUSES,
    is_referral_response,
    referral_from_response,
    referral_questionnaire,
)
from fhir_kat.search import iter_references, split_reference
from fhir_kat.security.identity import PUBLIC_NAMESPACE
from fhir_kat.services.access import Access
from fhir_kat.services.bundles import RawBundle, RawEntry
from fhir_kat.services.delivery import derived_of, queue_artifact
from fhir_kat.services.fhir_rest import FhirService, WriteResult, caller_of
from fhir_kat.services.referrals import keep_workflow_state
from fhir_kat.store import StoredResource, Tx
from fhir_kat.store.store import format_instant
from fhir_kat.workflow.shapes import is_referral_task

#: Demographics that identify a person: a PHN re-used with different values is a conflict.
IDENTITY_ELEMENTS = ("birthDate", "gender")


#: ``tx.memo`` key of a referral form checked before its response is stored, written after.
_FORM = "referral-form"
#: Who submits a referral form the service itself stores (no caller: a command, a hook).
SERVICE_SUBMITTER = "fhir-kat"


def referral_types() -> frozenset[str]:
    """What a referral stores: the types of ``mappings/referrals/`` and its Provenance."""
    return frozenset({t.resource_type for t in targets("referrals")} | {"Provenance"})


@dataclass(frozen=True)
class _CheckedForm:
    """A ``kat-referral`` response read, checked and mapped before it is stored, and the
    caller whose referral it is (``None``: the service's own write)."""

    bundle: dict[str, Any]
    caller: Access | None


@dataclass(frozen=True)
class SubmitResult:
    bundle: RawBundle
    created: bool  # any resource new
    changed: bool  # any resource new or changed


class ArtifactService:
    def __init__(
        self,
        fhir: FhirService,
        protocol: ProgramProtocol,
        clock: Callable[[], datetime],
        partners: Mapping[str, PartnerConfig] | None = None,
        id_namespace: uuid.UUID = PUBLIC_NAMESPACE,
    ) -> None:
        self.fhir = fhir
        self.protocol = protocol
        self.clock = clock
        self.partners = dict(partners or {})
        self.id_namespace = id_namespace

    def transform(
        self, kind: str, payload: Any, submitter: str, access: Access | None = None
    ) -> dict[str, Any]:
        """The transaction Bundle the artifact would become: the dry run of ``submit``, with
        its refusals — the sender's organisation, the artifact's schema, clinical and
        terminology problems, each resource's FHIR checks, the PHN's identity and every
        reference resolving to the artifact or to what is stored — and nothing stored. What
        it cannot tell before writing is listed in docs/artifacts.md ("The dry run")."""
        payload, bundle = self._prepare(kind, payload, submitter, access)
        entries: list[dict[str, Any]] = bundle.get("entry", [])
        with self.fhir.store.read(viewer=access) as tx:
            self._check_identity(tx, entries)
            self._check_references(tx.system, entries)
        return bundle

    def _prepare(
        self, kind: str, payload: Any, submitter: str, access: Access | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """What ``submit`` and its dry run check before any transaction: the artifact (an SDC
        response read back first), the sender's organisation, the mapping, and each resource's
        FHIR checks — spent while no lock is held; ``update_in`` later finds them in the
        validation cache."""
        payload = _require_object(as_artifact(kind, payload))
        if access is not None and access.role == "referrer":
            _require_own_organisation(kind, payload, access)
        bundle = self._map(kind, payload, submitter)
        for entry in bundle.get("entry", []):
            self.fhir.check(entry["resource"])
        return payload, bundle

    def _map(self, kind: str, payload: dict[str, Any], submitter: str) -> dict[str, Any]:
        bundle: dict[str, Any] = map_artifact(kind, payload, self._context(submitter))
        return bundle

    def submit(
        self,
        kind: str,
        payload: Any,
        submitter: str,
        access: Access | None = None,
        audit: Callable[[Tx, SubmitResult], None] | None = None,
        deliver_as: str | None = None,
    ) -> SubmitResult:
        """Store the artifact as one transaction; with ``access``, as that caller (a referrer
        never overwrites what is not its organisation's: ``Access.may_change``). ``audit``
        runs inside that transaction with the result, so the audit record commits with the
        data it describes. ``deliver_as``: the kind partners receive it as (an HL7 v2
        referral is a ``referrals`` delivery), ``kind`` by default."""
        payload, bundle = self._prepare(kind, payload, submitter, access)
        with self.fhir.write(access) as tx:
            result = self._store(tx, bundle, deliver_as or kind)
            if audit is not None:
                audit(tx, result)
        return result

    def _store(self, tx: Tx, bundle: dict[str, Any], kind: str) -> SubmitResult:
        """Write a prepared artifact's Bundle in ``tx`` (opened for the sender: its writes
        are the sender's), or refuse it: the part of ``submit`` inside the transaction, which
        the referral form's extraction (``on_referral_form``) shares."""
        entries: list[dict[str, Any]] = bundle.get("entry", [])
        # Every entry's current row in one query (each is written below, so locked now).
        tx.preload(
            [(e["resource"]["resourceType"], e["resource"]["id"]) for e in entries],
            for_update=True,
        )
        # The service's own checks read what is stored, whoever the sender is.
        self._check_identity(tx, entries)
        self._check_references(tx.system, entries)
        results: list[tuple[dict[str, Any], WriteResult]] = []
        provenance: list[dict[str, Any]] = []
        for entry in entries:
            resource = entry["resource"]
            if resource["resourceType"] == "Provenance":
                provenance.append(resource)
                continue
            if is_referral_task(resource):
                current = tx.system.get("Task", resource["id"])
                if current is not None and not current.deleted:
                    resource = keep_workflow_state(current.json(), resource)
            written = self.fhir.update_in(tx, resource)
            results.append((entry, written))
        changed = any(r.changed for _, r in results)
        if changed:  # an identical re-send leaves no new trace and sends nothing again
            for resource in provenance:
                written = self.fhir.update_in(tx, resource)
                results.append(({"resource": resource}, written))
            patient = next((r.stored.patient_id for _, r in results if r.stored.patient_id), None)
            # The outbox row commits with the artifact, or neither does (ADR 0004). It
            # carries the resources as stored (their versions: a later one replaces the
            # partner's copy) and what was derived from them (score Observations).
            stored = [r.stored for _, r in results]
            queue_artifact(
                tx,
                self.partners,
                kind,
                [s.json() for s in stored],
                patient,
                derived=derived_of(tx, [f"{s.type}/{s.id}" for s in stored]),
            )
        return self._result(results, changed)

    # ------------------------------------------------ the referral form through the FHIR door

    def referral_form_rule(self, tx: Tx, body: dict[str, Any], current: Any) -> None:
        """A ``kat-referral`` response written through ``/fhir`` (create, update, transaction
        or batch entry) with status ``completed`` or ``amended`` is a referral: read, checked
        and mapped here, before anything is stored, exactly as ``POST /api/v1/referrals``
        does for the caller (``_prepare``: the answers, the sender's own organisation, each
        resource's FHIR checks) — 422/403 and nothing stored, the response included. Its
        ``subject`` becomes the referral's Patient (the EHR's own patient id means nothing
        here). ``on_referral_form`` writes the referral once the response is stored."""
        if not is_referral_response(body) or body.get("status") not in REFERRAL_STATUSES:
            return
        caller = caller_of(tx)
        submitter = caller.principal.client_id if caller is not None else SERVICE_SUBMITTER
        _, bundle = self._prepare("referrals", body, submitter, caller)
        patient = next(
            e["resource"]["id"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Patient"
        )
        body["subject"] = {"reference": f"Patient/{patient}"}
        tx.memo[f"{_FORM}:{body['id']}"] = _CheckedForm(bundle, caller)

    def on_referral_form(self, tx: Tx, stored: StoredResource, created: bool) -> None:
        """Write the referral a stored ``kat-referral`` response answers, in the same
        transaction and as its sender (``_store``: same ids, identity and reference checks,
        triage, deliveries as a ``referrals`` artifact; a referrer's writes are checked as
        on the native route). Its Provenance names the response as a source, so
        ``Provenance?entity=QuestionnaireResponse/<id>`` leads to the Task. The referral's
        ids come from its identifier: a re-sent or amended response updates the same
        referral, and one that changes nothing writes nothing (ADR 0020)."""
        checked = tx.memo.pop(f"{_FORM}:{stored.id}", None)
        if stored.type != "QuestionnaireResponse" or not isinstance(checked, _CheckedForm):
            return
        source = {"role": "source", "what": {"reference": f"QuestionnaireResponse/{stored.id}"}}
        for entry in checked.bundle["entry"]:
            if entry["resource"]["resourceType"] == "Provenance":
                entry["resource"]["entity"] = [*entry["resource"].get("entity", []), source]
        as_sender = tx.seen_by(checked.caller) if checked.caller is not None else tx
        self._store(as_sender, checked.bundle, "referrals")

    def _result(
        self, results: list[tuple[dict[str, Any], WriteResult]], changed: bool
    ) -> SubmitResult:
        response = RawBundle(
            {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "transaction-response"}
        )
        for _, result in results:
            stored = result.stored
            status = "201 Created" if result.created else "200 OK"
            response.entries.append(
                RawEntry(
                    {
                        "response": {
                            "status": status,
                            "location": f"{stored.type}/{stored.id}/_history/{stored.version_id}",
                            "etag": stored.etag,
                            "lastModified": format_instant(stored.last_updated),
                        }
                    }
                )
            )
        return SubmitResult(response, created=any(r.created for _, r in results), changed=changed)

    def _context(self, submitter: str) -> MappingContext:
        return MappingContext(
            now=self.clock(),
            submitter=submitter,
            protocol=self.protocol,
            id_namespace=self.id_namespace,
        )

    def _check_identity(self, tx: Tx, entries: list[dict[str, Any]]) -> None:
        """One PHN, one person: a Patient already stored under the artifact's PHN whose birth
        date, sex or family name differ is refused (records are never merged automatically).
        The check reads what is stored (``tx.system``), whoever sends; only a caller who may
        read that Patient (``tx``'s caller: program staff, the clinic that referred the
        person) is told which element differs: to anyone else the refusal is the same
        whatever differs, so it cannot confirm a demographic."""
        problems: list[Issue] = []
        for entry in entries:
            resource = entry["resource"]
            if resource["resourceType"] != "Patient":
                continue
            stored = tx.system.get("Patient", resource["id"])
            if stored is None or stored.deleted:
                continue
            named = tx.admits(stored)
            known = stored.json()
            differing = [
                element
                for element in IDENTITY_ELEMENTS
                if element in known and element in resource and known[element] != resource[element]
            ]
            if (
                _family_names(known)
                and _family_names(resource)
                and not (_family_names(known) & _family_names(resource))
            ):
                differing.append("name.family")
            if differing and not named:
                problems.append(
                    issue(
                        "business-rule",
                        "the patient's identity does not match the record held for this PHN; "
                        "resolve it with the program before re-sending (records are never "
                        "merged automatically)",
                        "Patient",
                    )
                )
            for element in differing if named else ():
                problems.append(
                    issue(
                        "business-rule",
                        f"this PHN already belongs to a patient with a different {element}; "
                        "resolve the identity before re-sending (records are never merged "
                        "automatically)",
                        f"Patient.{element}",
                    )
                )
        if problems:
            raise Unprocessable(problems)

    def _check_references(self, tx: Tx, entries: list[dict[str, Any]]) -> None:
        local = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in entries}
        missing: dict[str, str] = {}
        found_refs: set[str] = set()  # each stored target read once (many entries name it)
        for i, entry in enumerate(entries):
            for holder, path in iter_references(entry["resource"], f"Bundle.entry[{i}].resource"):
                ref = holder["reference"]
                if ref in local or ref in missing or ref in found_refs:
                    continue
                target = split_reference(ref)
                if target is None:
                    continue
                found = tx.get(*target)
                if found is None or found.deleted:
                    missing[ref] = path
                else:
                    found_refs.add(ref)
        if missing:
            raise Unprocessable(
                [
                    issue(
                        "not-found",
                        f"{ref.split('/')[0]} referenced by the artifact is not stored",
                        path,
                    )
                    for ref, path in missing.items()
                ]
            )


def as_artifact(kind: str, payload: Any) -> Any:
    """A referral sent as the SDC form's QuestionnaireResponse (``Questionnaire/kat-referral``)
    is read back into the native referral it answers; from there it is the same referral
    (same mapping, checks, ids and triage). Anything else is the artifact itself."""
    if kind == "referrals" and is_referral_response(payload):
        return referral_from_response(payload)
    return payload


def install_referral_form(fhir: FhirService) -> None:
    """Store ``Questionnaire/kat-referral`` (unchanged ones are left alone) at start-up."""
    with fhir.write() as tx:
        tx.lock("install-definitions")  # processes starting together take turns
        fhir.update_in(tx, referral_questionnaire())


def _require_own_organisation(kind: str, payload: dict[str, Any], access: Access) -> None:
    """A referrer refers in its registered organisation's name, always (before anything is
    looked up, so a refusal says nothing about what is stored)."""
    if kind not in ("referrals", "v2"):
        return
    referrer = payload.get("referrer")
    organisation = referrer.get("organization") if isinstance(referrer, dict) else None
    ident = organisation.get("identifier") if isinstance(organisation, dict) else None
    named = (
        f"{ident.get('system', '')}|{ident.get('value', '')}" if isinstance(ident, dict) else None
    )
    if named is None:
        return  # the artifact's own schema refuses it, naming the field
    if not access.principal.organization or named != access.principal.organization:
        raise Forbidden(
            issue(
                "forbidden",
                "a referral is sent in your own organisation's name: referrer.organization."
                "identifier must be the organisation your client is registered for",
                "referrer.organization.identifier",
            )
        )


def _require_object(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise Unprocessable(issue("structure", "an artifact must be a JSON object", "$"))
    return payload


def _family_names(patient: dict[str, Any]) -> set[str]:
    return {
        n["family"].strip().lower()
        for n in patient.get("name", [])
        if isinstance(n.get("family"), str) and n.get("use", "official") in ("official", "usual")
    }
