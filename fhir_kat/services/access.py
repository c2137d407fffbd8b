"""Per-request access: role + scopes + consent + referrer ownership, in one place.

Owns: ``Access``, built from the caller's token for one request; FhirService asks it whether a
type/interaction is allowed, which patients' data may be shown, and which extra criteria narrow a
search (a referrer sees only what its organisation sent), and whether an existing resource may be
changed or deleted (a referrer changes only what is its organisation's). Must not: parse HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import cached_property

from fhir_kat.exchange.subscriptions import owned_ids
from fhir_kat.search import Criterion, SearchQuery
from fhir_kat.security.consent import (
    Actor,
    ConsentDecisionPoint,
    actor_for,
    organization_ids,
)
from fhir_kat.security.policy import OUTSIDE_PROGRAM, role_allows
from fhir_kat.security.scopes import allows
from fhir_kat.security.tokens import Principal
from fhir_kat.store import StoredResource, Tx

#: Types a referrer sees when its organisation sent them (the requester of the referral).
REFERRER_OWNED = {"Task": "requester", "ServiceRequest": "requester"}
#: Patient-less types a referrer may change when they belong to its organisation (see
#: ``Access.may_change``); every other patient-less type it may only create.
REFERRER_DIRECTORY = frozenset({"Organization", "Practitioner", "PractitionerRole", "Endpoint"})
#: Roles that see every Subscription; the others see only those they created (an endpoint
#: and its headers are the subscriber's business).
SEES_ALL_SUBSCRIPTIONS = frozenset({"program-staff", "admin"})


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
        self._visible: dict[str, set[str] | None] = {}
        self._actor: Actor | None = None
        self._owners: list[tuple[str, str]] | None = None

    @cached_property
    def now(self) -> datetime:
        return self.clock()

    def can(self, rtype: str, letter: str) -> bool:
        p = self.principal
        return role_allows(p.role, rtype, letter) and allows(p.scopes, rtype, letter)

    # ------------------------------------------------------------------ consent

    def actor(self, tx: Tx) -> Actor:
        if self._actor is None:
            self._actor = actor_for(tx, self.principal.organization) or Actor(
                frozenset(), frozenset()
            )
        return self._actor

    def _organization_ids(self, tx: Tx) -> list[str]:
        org = self.principal.organization
        return organization_ids(tx, org) if org else []

    def consent_applies(self, rtype: str) -> bool:
        """Whether the patients' consent decides what ``rtype`` data this caller sees."""
        return self.principal.role in OUTSIDE_PROGRAM and not (
            self.principal.role == "referrer" and rtype in REFERRER_OWNED
        )

    def visible_patients(self, tx: Tx, rtype: str) -> set[str] | None:
        """None = no restriction; otherwise the patients whose ``rtype`` data may be shown."""
        if not self.consent_applies(rtype):
            return None
        if rtype not in self._visible:
            self._visible[rtype] = self.consent.visible_patients(
                tx, self.actor(tx), self.principal.purpose, rtype, self.now
            )
        return self._visible[rtype]

    def permits_patient(self, tx: Tx, patient_id: str, rtype: str) -> bool:
        visible = self.visible_patients(tx, rtype)
        return visible is None or patient_id in visible

    # ------------------------------------------------------------------ ownership

    def owner_references(self, tx: Tx) -> list[tuple[str, str]]:
        """The references a referrer's own referrals carry as requester: its Organization(s)
        and the PractitionerRoles in them."""
        if self._owners is None:
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
                rows = tx.matches(roles)
                owners += [("PractitionerRole", r.id) for r in rows]
            self._owners = owners
        return self._owners

    def restrict(self, tx: Tx, query: SearchQuery) -> SearchQuery:
        if (
            query.resource_type == "Subscription"
            and self.principal.role not in SEES_ALL_SUBSCRIPTIONS
        ):
            forced = Criterion("_id", "id", "", tuple(owned_ids(tx, self.principal.client_id)), "")
        elif self.principal.role != "referrer" or query.resource_type not in REFERRER_OWNED:
            return query
        else:
            param = REFERRER_OWNED[query.resource_type]
            owners = tuple(self.owner_references(tx))
            forced = (
                Criterion(param, "reference", "", owners, "")
                if owners
                else Criterion("_id", "id", "", (), "")  # owns nothing: matches nothing
            )
        return SearchQuery(
            query.resource_type,
            criteria=(*query.criteria, forced),
            count=query.count,
            sort_desc=query.sort_desc,
            includes=query.includes,
            summary_count=query.summary_count,
            cursor=query.cursor,
            ignored=query.ignored,
        )

    def may_see(self, tx: Tx, stored: StoredResource) -> bool:
        if not self.can(stored.type, "r"):
            return False
        if stored.patient_id and not self.permits_patient(tx, stored.patient_id, stored.type):
            return False
        if stored.type == "Subscription" and self.principal.role not in SEES_ALL_SUBSCRIPTIONS:
            return stored.id in owned_ids(tx, self.principal.client_id)
        if self.principal.role == "referrer" and stored.type in REFERRER_OWNED:
            probe = self.restrict(
                tx,
                SearchQuery(
                    stored.type, criteria=(Criterion("_id", "id", "", (stored.id,), ""),), count=1
                ),
            )
            _, total, _ = tx.search(probe)
            return bool(total)
        return True

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
            return self.may_see(tx, current)
        if self.principal.role != "referrer":
            return True
        self._owners = None  # this request may have just created the organisation's entries
        if current.type in REFERRER_OWNED:
            return self.may_see(tx, current)
        if current.patient_id:
            return self._sole_referrer(tx, current.patient_id)
        if current.type in REFERRER_DIRECTORY:
            return self._own_directory_entry(tx, current)
        return False

    def may_grant_consent(self, tx: Tx, patient_id: str | None) -> bool:
        """Whether this caller may create a Consent for ``patient_id``. A Consent is what opens
        a patient's data to parties outside the program, so a referrer records one only for a
        patient its organisation has referred (a ServiceRequest about the patient with one of
        its ``owner_references`` as requester) — asked at the end of the write transaction, so
        the referral Bundle that carries the Consent counts. Other roles: the role rules."""
        if self.principal.role != "referrer":
            return True
        owners = tuple(self.owner_references(tx))
        if not owners or not patient_id:
            return False
        about = Criterion("patient", "reference", "", (("Patient", patient_id),), "")
        mine = Criterion("requester", "reference", "", owners, "")
        return self._count(tx, "ServiceRequest", about, mine) > 0

    def _count(self, tx: Tx, rtype: str, *criteria: Criterion) -> int:
        _, total, _ = tx.search(SearchQuery(rtype, criteria=criteria, count=0))
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
