"""What each partner will receive, and how: the listing the service and the worker log at
start-up (``fhir-kat partners`` prints it), the configurations that can never deliver (refused
at start-up), and those that deliver less than an operator probably meant (warned about).

Owns: ``kind_types`` (the resource types each deliverable kind puts in a delivery, from the
mapping files), ``describe_partner``, ``partner_problems`` and ``partner_warnings``. Must not:
touch the network or the database, or refuse anything at write time — a partner's
configuration decides what is sent, never what is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cache

from fhir_kat.artifacts import KINDS
from fhir_kat.exchange.bundles import NO_IDENTIFIER, NO_IDENTIFIER_SEARCH
from fhir_kat.exchange.partners import (
    DELIVERABLE_KINDS,
    REFERRAL_STATUS,
    SAFETY_FLAGS,
    PartnerConfig,
    purpose_for,
)
from fhir_kat.mapping.engine import targets

log = logging.getLogger("fhir_kat.exchange.partners")

#: Kinds that are not artifacts: what their deliveries carry (a safety Flag travels with the
#: participant's Patient, so that the receiving system can place it).
_OTHER_TYPES = {
    SAFETY_FLAGS: frozenset({"Flag", "Patient"}),
    REFERRAL_STATUS: frozenset({"Task", "Bundle"}),
}


@cache
def kind_types(kind: str) -> frozenset[str]:
    """The resource types a delivery of ``kind`` carries (an artifact's mapping targets and the
    Provenance the engine adds to each)."""
    if kind in KINDS:
        return frozenset({t.resource_type for t in targets(kind)} | {"Provenance"})
    return _OTHER_TYPES.get(kind, frozenset())


def partner_kinds(partner: PartnerConfig) -> list[str]:
    """The kinds routed to ``partner`` (``referral-status`` only when named: it is for
    referrers' EMRs, which a partner with every kind is not)."""
    if partner.artifact_kinds is not None:
        return sorted(partner.artifact_kinds)
    return sorted(DELIVERABLE_KINDS - {REFERRAL_STATUS})


def _types(partner: PartnerConfig, kind: str) -> frozenset[str]:
    return frozenset(t for t in kind_types(kind) if partner.accepts_type(t))


def describe_partner(partner: PartnerConfig) -> str:
    """One line an operator reads: kinds, resource types, wire form, consent."""
    if not partner.enabled:
        return f"partner {partner.name}: disabled (nothing new is queued; queued deliveries wait)"
    kinds = partner_kinds(partner)
    types = sorted({t for k in kinds for t in _types(partner, k)})
    if kinds == [REFERRAL_STATUS]:
        wire = (
            "transaction of PUT Task?identifier=<the referrer's identifier> (conditional "
            "update), the feedback document by conditional create"
        )
    elif partner.write_mode == "put":
        wire = "transaction of PUT <Type>/<our id>"
    else:
        unidentified = (
            f"identifier {partner.source_identifier_system}|<our id>"
            if partner.source_identifier_system
            else (
                "PUT <Type>/<our id>"
                if partner.without_identifier == "put"
                else "dead-lettered (without_identifier = dead-letter)"
            )
        )
        wire = (
            "transaction of conditional creates on each resource's business identifier; "
            f"a resource without one: {unidentified}"
        )
    if partner.care_team:
        consent = "the program's own care team: treatment (TREAT), no sharing consent asked"
    else:
        purposes = sorted({f"{k} {purpose_for(k)}" for k in kinds if k != REFERRAL_STATUS})
        actor = partner.organization or "no organization (no consent can name it)"
        consent = (
            f"outside the program: each patient delivery waits for a sharing consent naming "
            f"{actor} for its purpose ({', '.join(purposes)})"
            if purposes
            else ""
        )
        if REFERRAL_STATUS in kinds:
            consent = (consent + "; " if consent else "") + (
                "referral status without consent, the feedback document under a sharing "
                f"consent naming {actor} for {purpose_for(REFERRAL_STATUS)}"
            )
    return (
        f"partner {partner.name} -> {partner.base_url}: kinds {', '.join(kinds)}; "
        f"types {', '.join(types) or 'none'}; {wire}; {consent}"
    )


def describe_partners(partners: Mapping[str, PartnerConfig]) -> list[str]:
    lines = [describe_partner(partners[name]) for name in sorted(partners)]
    receivers = [
        n for n, p in sorted(partners.items()) if p.enabled and SAFETY_FLAGS in partner_kinds(p)
    ]
    lines.append(
        f"safety Flags go to: {', '.join(receivers)}"
        if receivers
        else "safety Flags go to no partner: staff see them in the service only "
        "(GET /fhir/Flag?status=active&category=safety, /app/dashboard)"
    )
    return lines


def partner_problems(partners: Mapping[str, PartnerConfig]) -> list[str]:
    """Configurations under which a partner can never receive what it asks for."""
    problems: list[str] = []
    for name in sorted(partners):
        partner = partners[name]
        where = f"[partners.{name}]"
        kinds = partner_kinds(partner)
        if partner.artifact_kinds is not None and partner.resource_types is not None:
            for kind in kinds:
                if kind_types(kind) and not _types(partner, kind):
                    problems.append(
                        f"{where}.resource_types: leaves out every resource type of {kind} "
                        f"({', '.join(sorted(kind_types(kind)))}): it would receive nothing"
                    )
        if partner.write_mode == "conditional-create" and partner.without_identifier == (
            "dead-letter"
        ):
            for kind in kinds:
                stuck = sorted(_types(partner, kind) & (NO_IDENTIFIER | NO_IDENTIFIER_SEARCH))
                if stuck:
                    problems.append(
                        f"{where}.without_identifier: every {kind} delivery carries "
                        f"{', '.join(stuck)}, which cannot be conditionally created in R4 (no "
                        "identifier element, or no identifier search parameter): allow PUT "
                        '(without_identifier = "put") or '
                        f"leave {', '.join(stuck)} out with resource_types"
                    )
    return problems


def partner_warnings(partners: Mapping[str, PartnerConfig]) -> list[str]:
    """Configurations that deliver less than an operator probably meant."""
    warnings: list[str] = []
    for name in sorted(partners):
        partner = partners[name]
        if not partner.enabled:
            continue
        kinds = partner_kinds(partner)
        if not partner.care_team and not partner.organization and kinds != [REFERRAL_STATUS]:
            warnings.append(
                f"partner {name}: outside the program and names no organization, so no "
                "consent can permit it: every delivery about a patient will be blocked-consent "
                "(set organization, or care_team = true for the program's own care team)"
            )
        if partner.resource_types is not None:
            for kind in kinds:
                # Nothing refers to a Provenance: leaving it out cuts no reference.
                kept, all_types = _types(partner, kind), kind_types(kind) - {"Provenance"}
                if kept and not all_types <= kept:
                    warnings.append(
                        f"partner {name}: receives {', '.join(sorted(kept))} of {kind}; a "
                        "delivery whose resources refer to a left-out "
                        f"{'/'.join(sorted(all_types - kept))} is dead-lettered, naming it"
                    )
    return warnings


def log_partner_plan(partners: Mapping[str, PartnerConfig]) -> None:
    """The listing as log lines (INFO), each warning as a WARNING: what a process that starts
    will send, and where it will not, is on record before its first delivery."""
    for line in describe_partners(partners):
        log.info(line)
    for line in partner_warnings(partners):
        log.warning(line)


__all__ = [
    "describe_partner",
    "describe_partners",
    "kind_types",
    "log_partner_plan",
    "partner_kinds",
    "partner_problems",
    "partner_warnings",
]
