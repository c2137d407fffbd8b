"""Per-request access: role × scopes × organisation × consent, decided in one place.

Owns: ``Access``, built from the caller's token for one request. It is the ``Viewer`` of every
transaction opened for that caller (``Store.read/write(viewer=access)``): ``scope`` says which
rows of a type the caller may see and the store applies it to every read, search, count,
include, version, conditional match and export, so no path can show more than another and a
row outside the scope answers exactly as one never stored (docs/security.md, "One visibility
rule"). It also decides what an existing resource a caller may change (``may_change``) and what a
referrer may write at all (``fhir_kat.services.write_policy``). Must not: parse HTTP.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import datetime
from functools import cached_property
from typing import Any

from fhir_kat.errors import Forbidden, issue
from fhir_kat.exchange.subscriptions import owned_ids
from fhir_kat.search import Criterion, SearchQuery, split_reference
from fhir_kat.security.consent import (
    Actor,
    ConsentDecisionPoint,
    actor_for,
    organization_ids,
)
from fhir_kat.security.policy import OUTSIDE_PROGRAM, role_allows
from fhir_kat.security.scopes import allows, parse_scopes
from fhir_kat.security.tokens import Principal
from fhir_kat.store import StoredResource, Tx
from fhir_kat.store.store import dumps
from fhir_kat.store.view import EVERYTHING, NOTHING, PatientSlice, ReadScope
from fhir_kat.workflow.shapes import is_program_referral

#: Types a referrer sees when its organisation sent them (the requester of the referral).
REFERRER_OWNED = {"Task": "requester", "ServiceRequest": "requester"}
#: Patient-less types a referrer may change when they belong to its organisation (see
#: ``Access.may_change``); every other patient-less type it may only create.
REFERRER_DIRECTORY = frozenset({"Organization", "Practitioner", "PractitionerRole", "Endpoint"})
#: Roles that see every Subscription; the others see only those they created (an endpoint
#: and its headers are the subscriber's business).
SEES_ALL_SUBSCRIPTIONS = frozenset({"program-staff", "admin"})
#: The date that says when a type's data happened, for consents narrowed by ``dataPeriod``
#: (a type without one is never opened by a period).
DATA_PERIOD_PARAMS = {
    "AdverseEvent": "date",
    "AllergyIntolerance": "date",
    "Appointment": "date",
    "ClinicalImpression": "date",
    "Communication": "sent",
    "Composition": "date",
    "Condition": "recorded-date",
    "Consent": "date",
    "DocumentReference": "date",
    "Encounter": "date",
    "Flag": "date",
    "MedicationAdministration": "effective-time",
    "Observation": "date",
    "Provenance": "recorded",
    "QuestionnaireResponse": "authored",
    "ServiceRequest": "authored",
    "Task": "authored-on",
}
#: Types whose rows a caller outside the program sees reshaped (``Access.shape``).
SHAPED = frozenset({"Group"})
#: v3 ObservationValue: the security label saying content was withheld from this copy.
REDACTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "REDACTED",
    "display": "redacted",
}


class Access:
    def __init__(
        self,
        principal: Principal,
        consent: ConsentDecisionPoint,
        clock: Callable[[], datetime],
    ) -> None:
        self.principal = principal
        self.consent = consent
        self.clock = clock

    @cached_property
    def now(self) -> datetime:
        return self.clock()

    @property
    def role(self) -> str:
        return self.principal.role

    def can(self, rtype: str, letter: str) -> bool:
        p = self.principal
        return role_allows(p.role, rtype, letter) and allows(p.scopes, rtype, letter)

    def reads(self, rtype: str) -> bool:
        return self.can(rtype, "r")

    def for_group_membership(self) -> Access:
        """This caller as it reads a cohort Group to export its members' data: the role's
        right to read Groups counts without a Group scope (``ExportService._group_members``);
        consent still shapes the members it sees."""
        scopes, _ = parse_scopes(["system/Group.rs"])
        principal = dataclasses.replace(self.principal, scopes=(*self.principal.scopes, *scopes))
        return Access(principal, self.consent, self.clock)

    # ------------------------------------------------------------------ the Viewer

    def scope(self, tx: Tx, rtype: str) -> ReadScope:
        """What of ``rtype`` this caller may see (``tx`` is unrestricted)."""
        if not self.can(rtype, "r"):
            return NOTHING
        ids: frozenset[str] | None = None
        owned_by: tuple[str, tuple[tuple[str, str], ...]] | None = None
        if rtype == "Subscription" and self.role not in SEES_ALL_SUBSCRIPTIONS:
            ids = frozenset(owned_ids(tx, self.principal.client_id))
        if self.role == "referrer" and rtype in REFERRER_OWNED:
            owners = tuple(self.owner_references(tx))
            if not owners:
                return NOTHING
            owned_by = (REFERRER_OWNED[rtype], owners)
        if self.role == "referrer" and rtype == "Patient":
            # The people its own program referrals are about (ADR 0027), not consent-gated,
            # like the referrals themselves; nobody else.
            return ReadScope(ids=frozenset(self.referred_patients(tx)))
        shaped = rtype in SHAPED and self.consent_applies(rtype)
        if not self.consent_applies(rtype):
            return ReadScope(ids=ids, owned_by=owned_by) if ids or owned_by else EVERYTHING
        full, granted = self.consent.grants(
            tx, self.actor(tx), self.principal.purpose, rtype, self.now
        )
        period_param = DATA_PERIOD_PARAMS.get(rtype)
        slices = {
            patient: PatientSlice(g.references, g.periods, period_param)
            for patient, g in granted.items()
        }
        return ReadScope(
            patients=frozenset(full), slices=slices, ids=ids, owned_by=owned_by, shaped=shaped
        )

    def shape(self, tx: Tx, stored: StoredResource) -> StoredResource:
        """A cohort Group lists people: a caller outside the program sees only the members
        whose consent opens their membership to it, and a label that members were withheld."""
        if stored.type not in SHAPED or not self.consent_applies("Group") or not stored.content:
            return stored
        group = json.loads(stored.content)
        members = group.get("member", [])
        if not members:
            return stored
        full, _ = self.consent.grants(tx, self.actor(tx), self.principal.purpose, "Group", self.now)
        kept = [m for m in members if _member_patient(m) in full]
        if len(kept) == len(members):
            return stored
        group["member"] = kept
        if not kept:
            group.pop("member")
        group.pop("quantity", None)  # the cohort's size is an aggregate: the measure's business
        meta = group.setdefault("meta", {})
        labels = [lab for lab in meta.get("security", []) if lab.get("code") != "REDACTED"]
        meta["security"] = [*labels, REDACTED]
        return StoredResource(
            type=stored.type,
            id=stored.id,
            version_id=stored.version_id,
            last_updated=stored.last_updated,
            content=dumps(group),
            deleted=stored.deleted,
            seq=stored.seq,
            patient_id=stored.patient_id,
        )

    # ------------------------------------------------------------------ consent

    def actor(self, tx: Tx) -> Actor:
        return actor_for(tx.system, self.principal.organization) or Actor(frozenset(), frozenset())

    def consent_applies(self, rtype: str) -> bool:
        """Whether the patients' consent decides what ``rtype`` data this caller sees."""
        return self.role in OUTSIDE_PROGRAM and not (
            self.role == "referrer" and rtype in REFERRER_OWNED
        )

    # ------------------------------------------------------------------ ownership

    def owner_references(self, tx: Tx) -> list[tuple[str, str]]:
        """The references a referrer's own referrals carry as requester: its Organization(s)
        and the PractitionerRoles in them."""
        org_ids = self._organization_ids(tx)
        owners = [("Organization", oid) for oid in org_ids]
        if org_ids:
            roles = SearchQuery(
                "PractitionerRole",
                criteria=(
                    Criterion(
                        "organization",
                        "reference",
                        "",
                        tuple(("Organization", oid) for oid in org_ids),
                        "",
                    ),
                ),
                count=1000,
            )
            owners += [("PractitionerRole", r.id) for r in tx.system.matches(roles)]
        return owners

    def referred_patients(self, tx: Tx) -> set[str]:
        """The Patients a referrer may read (ADR 0027): the subject of each of its
        organisation's **program referrals** — the program's ServiceRequest
        (``is_program_referral``) with one of its ``owner_references`` as requester — in any
        status but ``entered-in-error``. A withdrawn, revoked, rejected or completed referral
        keeps the grant (the clinic still follows its own referral and must tell which person
        it was about); one entered in error ends it (it may have named the wrong person). A
        Task, which a referrer can make up, grants nothing; neither does any ServiceRequest
        that is not the program's referral. Another clinic referring the same person sees the
        same Patient, and nothing of this clinic's referral (ownership, above)."""
        owners = tuple(self.owner_references(tx))
        if not owners:
            return set()
        query = SearchQuery(
            "ServiceRequest",
            criteria=(Criterion("requester", "reference", "", owners, ""),),
            count=1000,
        )
        referred: set[str] = set()
        for batch in tx.system.scan_batches(query, batch=1000):
            for _, content, patient_id in batch:
                if patient_id is None or patient_id in referred:
                    continue
                body = json.loads(content)
                if is_program_referral(body) and body.get("status") not in ERASED:
                    referred.add(patient_id)
        return referred

    def _organization_ids(self, tx: Tx) -> list[str]:
        org = self.principal.organization
        return organization_ids(tx.system, org) if org else []

    # ------------------------------------------------------------------ changing

    def may_change(self, tx: Tx, current: StoredResource) -> bool:
        """Whether this caller may update or delete the stored ``current`` resource (the role
        and scopes were checked already; creating is not decided here).

        A Subscription is changed only by the client that owns it. A referrer changes only what
        is its organisation's (docs/security.md, "Writes by referrers"):

        - a Task or ServiceRequest whose requester is among ``owner_references``;
        - patient data (Patient and its compartment) when the organisation has referred that
          patient and no other sender has: every stored ServiceRequest about the patient has
          a requester among ``owner_references``. A second sender, or a request the program
          made, leaves the patient's data to program staff;
        - its own Organization(s), the PractitionerRoles and Endpoints in them, and the
          Practitioners all of whose PractitionerRoles are in them;
        - nothing else.
        """
        if current.deleted:
            return True  # writing over a deletion is creating again
        if current.type == "Subscription":
            return current.id in owned_ids(tx.system, self.principal.client_id) or (
                self.role in SEES_ALL_SUBSCRIPTIONS and self.can("Subscription", "u")
            )
        if self.principal.role != "referrer":
            return True
        if current.type in REFERRER_OWNED:
            owners = set(self.owner_references(tx))
            return _requester(current.json()) in owners
        if current.patient_id:
            return self._sole_referrer(tx, current.patient_id)
        if current.type in REFERRER_DIRECTORY:
            return self._own_directory_entry(tx, current)
        return False

    # ------------------------------------------------------------------ what a referrer writes

    def after_write(self, tx: Tx, stored: StoredResource) -> None:
        """Called for every version this caller writes. A referrer's writes are checked at
        the end of the transaction, when every entry of its Bundle is stored (the referral
        that entitles a Consent comes in the same Bundle): 403 and nothing stored otherwise."""
        if self.role != "referrer" or stored.deleted:
            return
        key = f"referrer-write:{stored.type}/{stored.id}"
        tx.defer(key, lambda t: self._check_referrer_write(t, stored.type, stored.id))

    def _check_referrer_write(self, tx: Tx, rtype: str, rid: str) -> None:
        stored = tx.get(rtype, rid)
        if stored is None or stored.deleted:
            return
        body = stored.json()
        problems = []
        if rtype in REFERRER_OWNED and _requester(body) not in set(self.owner_references(tx)):
            # Names no organisation: only that the requester is not the sender's own.
            problems.append(
                issue(
                    "forbidden",
                    "a referral is sent in your own organisation's name: its requester must "
                    "be your Organization or a PractitionerRole in it",
                    f"{rtype}.requester",
                )
            )
        if stored.patient_id and not self.has_referred(tx, stored.patient_id):
            problems.append(
                issue(
                    "forbidden",
                    "a referrer records data only about patients of its own program referrals",
                    rtype,
                )
            )
        if rtype == "Consent" and not self._grants_only_itself(tx, body):
            problems.append(
                issue(
                    "forbidden",
                    "a referrer's Consent may concern only its own organisation: every "
                    "provision names it as the actor (consents for other parties are "
                    "recorded by the program)",
                    "Consent.provision.actor",
                )
            )
        if problems:
            raise Forbidden(problems)

    def has_referred(self, tx: Tx, patient_id: str) -> bool:
        """Whether this caller's organisation has a program referral for the patient: the
        program's ServiceRequest (``is_program_referral``) about the patient with one of its
        ``owner_references`` as requester — not any ServiceRequest it made up."""
        owners = tuple(self.owner_references(tx))
        if not owners:
            return False
        query = SearchQuery(
            "ServiceRequest",
            criteria=(
                Criterion("patient", "reference", "", (("Patient", patient_id),), ""),
                Criterion("requester", "reference", "", owners, ""),
            ),
            count=100,
        )
        return any(
            is_program_referral(r.json()) and r.json().get("status") not in WITHDRAWN
            for r in tx.system.matches(query)
        )

    def _grants_only_itself(self, tx: Tx, consent: dict[str, Any]) -> bool:
        """Every provision (nested ones too) names actors, and each is this organisation."""
        own = self.actor(tx)
        pending = [consent.get("provision") or {}]
        while pending:
            provision = pending.pop()
            actors = provision.get("actor") or []
            if not actors:
                return False
            for actor in actors:
                reference = actor.get("reference") or {}
                target = split_reference(reference.get("reference", ""))
                identifier = reference.get("identifier") or {}
                by_id = f"{identifier.get('system', '')}|{identifier.get('value', '')}"
                if not (
                    (target and f"{target[0]}/{target[1]}" in own.references)
                    or by_id in own.identifiers
                ):
                    return False
            pending.extend(provision.get("provision", []))
        return True

    def _count(self, tx: Tx, rtype: str, *criteria: Criterion) -> int:
        _, total, _ = tx.system.search(SearchQuery(rtype, criteria=criteria, count=0))
        return total or 0

    def _sole_referrer(self, tx: Tx, patient_id: str) -> bool:
        owners = tuple(self.owner_references(tx))
        if not owners:
            return False
        about = Criterion("patient", "reference", "", (("Patient", patient_id),), "")
        mine = self._count(
            tx, "ServiceRequest", about, Criterion("requester", "reference", "", owners, "")
        )
        return mine > 0 and mine == self._count(tx, "ServiceRequest", about)

    def _own_directory_entry(self, tx: Tx, current: StoredResource) -> bool:
        org_ids = self._organization_ids(tx)
        if current.type == "Organization":
            return current.id in org_ids
        own_orgs = {f"Organization/{oid}" for oid in org_ids}
        body = current.json()
        if current.type == "PractitionerRole":
            return body.get("organization", {}).get("reference") in own_orgs
        if current.type == "Endpoint":
            return body.get("managingOrganization", {}).get("reference") in own_orgs
        # Practitioner: shared by every organisation it works for, so only when all its
        # PractitionerRoles are this organisation's.
        of = Criterion("practitioner", "reference", "", (("Practitioner", current.id),), "")
        roles = self._count(tx, "PractitionerRole", of)
        if not roles or not org_ids:
            return False
        in_own = Criterion(
            "organization", "reference", "", tuple(("Organization", o) for o in org_ids), ""
        )
        return roles == self._count(tx, "PractitionerRole", of, in_own)


#: ServiceRequest statuses that no longer make a referral (R4 request-status).
WITHDRAWN = frozenset({"revoked", "entered-in-error"})
#: ServiceRequest statuses after which a referral never was: it opens no Patient (ADR 0027).
ERASED = frozenset({"entered-in-error"})


def _requester(resource: dict[str, Any]) -> tuple[str, str] | None:
    return split_reference((resource.get("requester") or {}).get("reference", ""))


def _member_patient(member: dict[str, Any]) -> str | None:
    target = split_reference((member.get("entity") or {}).get("reference", ""))
    return target[1] if target and target[0] == "Patient" else None
