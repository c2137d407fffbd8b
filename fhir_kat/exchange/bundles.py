"""The wire form of a delivery: which resources a partner gets, as which transaction Bundle.

Owns: turning an artifact's resources (each with our deterministic ``id`` and a business
identifier) into the transaction Bundle a partner receives, in the partner's ``write_mode``:

- ``conditional-create``: every entry is ``POST`` with ``ifNoneExist: identifier=<system>|<value>``
  from the resource's first identifier, ``fullUrl`` a ``urn:uuid:`` derived from our id, and
  references between entries rewritten to those ``urn:uuid:``s (the partner assigns its own ids
  and resolves them). Sending the same Bundle twice creates nothing the second time. A later
  version of one of our resources (``meta.versionId`` above 1: a status change, a correction)
  is ``PUT <Type>?identifier=<system>|<value>`` instead (R4 conditional update: it replaces the
  partner's copy, or creates it), so the partner's copy converges to our record.
- ``put``: every entry is ``PUT <Type>/<our id>`` (for partners that accept client ids); sending
  twice writes the same content as a new version, never a second resource.

A resource without a business identifier cannot be conditionally created: with the partner's
``source_identifier_system`` it travels with the identifier ``<that system>|<our id>`` (our
deterministic id, stated as such, not a guessed business value); otherwise it goes as ``PUT
<Type>/<our id>`` inside the same transaction (``without_identifier = "put"``, the default), or
the delivery is refused naming it (``"dead-letter"``). Built when a delivery is sent: a partner
that cannot take something never causes a write to be refused.

Must not: touch the database or the network, read a clock, or invent a business identifier.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from fhir_kat.errors import Issue, Unprocessable, issue
from fhir_kat.exchange.partners import PartnerConfig, WithoutIdentifier, WriteMode

# uuid5 namespace for the urn:uuid fullUrls of outbound entries. Fixed forever: changing it
# would change every Bundle we send (harmless for conditional create, noisy in diffs).
FULLURL_NAMESPACE = uuid.UUID("6f1d2b53-5d8a-4c4e-9a57-0c7e3e5b9a01")


# R4 resources whose ``identifier`` is 0..1 (a single Identifier, not a list), and some that have
# no ``identifier`` at all (conditional create by identifier is impossible for them).
SINGLE_IDENTIFIER = frozenset({"QuestionnaireResponse", "AdverseEvent", "Bundle", "Composition"})
NO_IDENTIFIER = frozenset(
    {"Provenance", "MessageHeader", "Binary", "Parameters", "OperationOutcome", "Subscription"}
)
#: R4 resources that have an identifier but no ``identifier`` search parameter (the official
#: hl7.fhir.r4 4.0.1 SearchParameter definitions): ``ifNoneExist: identifier=…`` on them is
#: refused by a conformant server (SEKMET: "Unknown search parameter 'identifier' for
#: AdverseEvent"), so they travel like a resource without an identifier.
NO_IDENTIFIER_SEARCH = frozenset({"AdverseEvent"})


Resolve = Callable[[str, str], Mapping[str, Any] | None]


def full_url_for(resource_type: str, resource_id: str) -> str:
    return f"urn:uuid:{uuid.uuid5(FULLURL_NAMESPACE, f'{resource_type}/{resource_id}')}"


def search_escape(value: str) -> str:
    """FHIR search escaping (R4 search, "Escaping search parameters"): ``\\``, ``,``, ``$``
    and ``|`` inside a value are preceded by ``\\``."""
    out = value.replace("\\", "\\\\")
    for char in (",", "$", "|"):
        out = out.replace(char, "\\" + char)
    return out


def identifier_query(resource: Mapping[str, Any]) -> str | None:
    """``identifier=<system>|<value>`` from the first identifier with both, URL-encoded."""
    for ident in _identifiers(resource):
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and system and isinstance(value, str) and value:
            token = f"{search_escape(system)}|{search_escape(value)}"
            # ':' and '/' are legal in a query; everything else that could end the parameter
            # ('&', '#', '+', '%', spaces) is percent-encoded.
            return "identifier=" + quote(token, safe=":/|")
    return None


def _identifiers(resource: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    idents = resource.get("identifier")
    if isinstance(idents, Mapping):  # a few resources (e.g. Bundle) have a single identifier
        return [idents]
    if isinstance(idents, list):
        return [i for i in idents if isinstance(i, Mapping)]
    return []


def version_of(resource: Mapping[str, Any]) -> int:
    """The stored version a queued resource carries (``meta.versionId``), 0 when none."""
    meta = resource.get("meta")
    raw = meta.get("versionId") if isinstance(meta, Mapping) else None
    return int(raw) if isinstance(raw, str) and raw.isdigit() else 0


def resources_of(artifact: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The resources of a Bundle (any type) or of a plain list of resources."""
    if isinstance(artifact, Mapping):
        if artifact.get("resourceType") != "Bundle":
            return [dict(artifact)]
        return [dict(e["resource"]) for e in artifact.get("entry", []) if "resource" in e]
    return [dict(r) for r in artifact]


def to_transaction(
    artifact: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    write_mode: WriteMode,
    *,
    partner_base_url: str = "",
    resource_types: frozenset[str] | None = None,
    source_identifier_system: str | None = None,
    resolve: Resolve | None = None,
    without_identifier: WithoutIdentifier = "put",
) -> dict[str, Any]:
    """The transaction Bundle for ``artifact``; ``Unprocessable`` lists every resource that
    cannot be sent (no id, no way to send it exactly once, a reference to a resource the
    filter removed). Called when a delivery is sent, never when the artifact is stored.

    ``resolve(type, id)`` returns a stored resource (or ``None``). In conditional-create mode a
    reference ``Type/id`` to a resource outside the artifact becomes the conditional reference
    ``Type?identifier=…`` with the identifier that resource was (or will be) sent under, since
    the partner knows it by that identifier, not by our id.

    Conditional create, a resource without a business identifier: with the partner's
    ``source_identifier_system`` it travels under ``<that system>|<our id>``; otherwise, with
    ``without_identifier = "put"``, as ``PUT <Type>/<our id>`` in the same transaction (sending
    it again writes a new version, never a second resource); with ``"dead-letter"`` the
    delivery is refused, naming the resource.
    """
    resources = resources_of(artifact)
    problems: list[Issue] = []
    keys: list[tuple[str, str]] = []
    for i, res in enumerate(resources):
        rtype, rid = res.get("resourceType"), res.get("id")
        if not isinstance(rtype, str) or not isinstance(rid, str) or not rid:
            problems.append(
                issue("required", "every resource needs resourceType and id", f"entry[{i}]")
            )
            continue
        keys.append((rtype, rid))
    if problems:
        raise Unprocessable(problems)

    kept = [
        (k, r)
        for k, r in zip(keys, resources, strict=True)
        if resource_types is None or k[0] in resource_types
    ]
    if not kept:
        raise Unprocessable(
            issue("business-rule", "no resource of this artifact is accepted by the partner")
        )

    # Every spelling by which an entry may refer to another entry of the same Bundle.
    spellings: dict[str, tuple[str, str]] = {}
    for rtype, rid in keys:
        spellings[f"{rtype}/{rid}"] = (rtype, rid)
        spellings[full_url_for(rtype, rid)] = (rtype, rid)
    if isinstance(artifact, Mapping) and artifact.get("resourceType") == "Bundle":
        for entry in artifact.get("entry", []):
            res = entry.get("resource") or {}
            full = entry.get("fullUrl")
            key = (res.get("resourceType"), res.get("id"))
            if isinstance(full, str) and key in set(keys):
                spellings[full] = (str(key[0]), str(key[1]))

    # First how each entry travels (its references depend on how their targets do).
    bodies: dict[tuple[str, str], dict[str, Any]] = {}
    queries: dict[tuple[str, str], str | None] = {}  # None: PUT with our id
    later: set[tuple[str, str]] = set()  # a later version of ours: a conditional update
    for index, ((rtype, rid), res) in enumerate(kept):
        if version_of(res) > 1:
            later.add((rtype, rid))
        body = copy.deepcopy(res)
        body.get("meta", {}).pop("versionId", None)
        body.get("meta", {}).pop("lastUpdated", None)
        if not body.get("meta", True):
            body.pop("meta")
        bodies[(rtype, rid)] = body
        queries[(rtype, rid)] = None
        if write_mode != "conditional-create":
            continue
        query = identifier_query(body) if rtype not in NO_IDENTIFIER_SEARCH else None
        if (
            query is None
            and source_identifier_system
            and rtype not in NO_IDENTIFIER | NO_IDENTIFIER_SEARCH
        ):
            _add_identifier(body, rtype, {"system": source_identifier_system, "value": rid})
            query = identifier_query(body)
        if query is None and without_identifier == "dead-letter":
            problems.append(
                issue(
                    "required",
                    f"{rtype} has no identifier element (or no identifier search parameter) "
                    "in R4, and this partner takes conditional creates only "
                    '(without_identifier = "dead-letter"): allow PUT, or leave '
                    f"{rtype} out with resource_types"
                    if rtype in NO_IDENTIFIER | NO_IDENTIFIER_SEARCH
                    else f"{rtype} has no identifier with system and value, and this partner "
                    'takes conditional creates only (without_identifier = "dead-letter"): '
                    "allow PUT or set source_identifier_system",
                    f"Bundle.entry[{index}].resource.identifier",
                )
            )
        queries[(rtype, rid)] = query

    entries: list[dict[str, Any]] = []
    kept_keys = set(bodies)
    base = partner_base_url.rstrip("/")
    for index, key in enumerate(bodies):
        rtype, rid = key
        body = bodies[key]
        expr = f"Bundle.entry[{index}].resource"
        for ref in _references(body):
            value = ref["reference"]
            target = spellings.get(value) or spellings.get(_tail(value))
            if target is None:
                if write_mode == "conditional-create" and resolve is not None:
                    conditional = _conditional_reference(value, resolve, source_identifier_system)
                    if conditional is not None:
                        ref["reference"] = conditional
                continue  # otherwise outside the Bundle: the partner must already know it
            if target not in kept_keys:
                problems.append(
                    issue(
                        "business-rule",
                        f"refers to a {target[0]} that this partner does not accept",
                        expr,
                    )
                )
            elif queries[target] is not None:
                ref["reference"] = full_url_for(*target)
            else:
                ref["reference"] = f"{target[0]}/{target[1]}"
        query = queries[key]
        if query is not None:
            body.pop("id", None)
            # A later version must replace what the partner holds (its copy converges to our
            # record): R4 conditional update, which also creates it when the partner has none.
            request = (
                {"method": "PUT", "url": f"{rtype}?{query}"}
                if key in later
                else {"method": "POST", "url": rtype, "ifNoneExist": query}
            )
            entries.append(
                {"fullUrl": full_url_for(rtype, rid), "resource": body, "request": request}
            )
        else:
            entries.append(
                {
                    "fullUrl": f"{base}/{rtype}/{rid}" if base else full_url_for(rtype, rid),
                    "resource": body,
                    "request": {"method": "PUT", "url": f"{rtype}/{rid}"},
                }
            )
    if problems:
        raise Unprocessable(problems)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def for_partner(
    partner: PartnerConfig,
    artifact: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    resolve: Resolve | None = None,
) -> dict[str, Any]:
    return to_transaction(
        artifact,
        partner.write_mode,
        partner_base_url=partner.base_url,
        resource_types=partner.resource_types,
        source_identifier_system=partner.source_identifier_system,
        resolve=resolve,
        without_identifier=partner.without_identifier,
    )


#: Task references the referrer's EMR holds already (it sent them): sent as conditional
#: references. Every other reference travels as a logical one (Reference.identifier), since our
#: ids mean nothing at the referrer and it need not hold our Organizations or staff.
REFERRER_HELD = ("for", "focus", "basedOn")


def task_update_transaction(
    task: Mapping[str, Any],
    resolve: Resolve,
    document: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A transaction that updates the referral Task at the referrer's EMR, conditionally on
    the referrer's identifier (``PUT Task?identifier=<system>|<value>``; FHIR R4 conditional
    update: creates it when the EMR has none, updates it when it has one, 412 when several).

    ``document`` (a ``document`` Bundle with an identifier) is sent first, as a conditional
    create, and ``Task.output`` points at it; without it ``Task.output`` is left out, so the
    referrer sees the status alone. Raises ``Unprocessable`` when the Task has no identifier.
    """
    query = identifier_query(task)
    if query is None:
        raise Unprocessable(
            issue("required", "a referral Task needs the referrer's identifier", "Task.identifier")
        )
    body = copy.deepcopy(dict(task))
    for key in ("id", "meta", "output", "text", "contained"):
        body.pop(key, None)
    for key, value in list(body.items()):
        if key in ("identifier", "code", "businessStatus", "statusReason"):
            continue
        for ref in list(_references(value)):
            target = ref["reference"]
            if key in REFERRER_HELD:
                conditional = _conditional_reference(target, resolve, None)
                if conditional is not None:
                    ref["reference"] = conditional
                    continue
            parts = target.split("/")
            stored = resolve(parts[0], parts[1]) if len(parts) == 2 else None
            ident = next(iter(_identifiers(stored)), None) if stored is not None else None
            ref.pop("reference")
            if ident is not None and ident.get("system") and ident.get("value"):
                ref["identifier"] = {"system": ident["system"], "value": ident["value"]}
            elif "display" not in ref:
                ref["display"] = parts[0]  # the kind of party; its id means nothing there
    entries: list[dict[str, Any]] = []
    if document is not None:
        doc_query = identifier_query(document)
        if doc_query is None:
            raise Unprocessable(issue("required", "a document needs an identifier", "Bundle"))
        doc_url = f"urn:uuid:{uuid.uuid5(FULLURL_NAMESPACE, doc_query)}"
        doc = {k: v for k, v in document.items() if k not in ("id", "meta")}
        entries.append(
            {
                "fullUrl": doc_url,
                "resource": doc,
                "request": {"method": "POST", "url": "Bundle", "ifNoneExist": doc_query},
            }
        )
        body["output"] = [
            {
                "type": {"text": "Program feedback document"},
                "valueReference": {"reference": doc_url},
            }
        ]
    entries.append(
        {
            "fullUrl": full_url_for("Task", str(task.get("id", ""))),
            "resource": body,
            "request": {"method": "PUT", "url": f"Task?{query}"},
        }
    )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _conditional_reference(
    reference: str, resolve: Resolve, source_identifier_system: str | None
) -> str | None:
    parts = reference.split("/")
    if len(parts) != 2 or not parts[0][:1].isupper() or reference.startswith(("urn:", "#")):
        return None  # absolute, versioned, contained or logical: leave it as it is
    if parts[0] in NO_IDENTIFIER_SEARCH:
        return None  # not searchable by identifier: it travelled under our id (PUT)
    stored = resolve(parts[0], parts[1])
    if stored is None:
        return None
    query = identifier_query(stored)
    if query is None and source_identifier_system and parts[0] not in NO_IDENTIFIER:
        query = identifier_query(
            {"identifier": [{"system": source_identifier_system, "value": parts[1]}]}
        )
    return f"{parts[0]}?{query}" if query is not None else None


def _add_identifier(resource: dict[str, Any], rtype: str, identifier: dict[str, str]) -> None:
    if rtype in SINGLE_IDENTIFIER:
        # A single identifier without system or value is kept, never overwritten: the
        # resource is then refused and a person decides.
        resource.setdefault("identifier", identifier)
    else:
        resource["identifier"] = [*_identifiers(resource), identifier]


def _tail(reference: str) -> str:
    """``Type/id`` from an absolute or versioned reference (``…/Patient/1/_history/2``)."""
    parts = reference.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def _references(node: Any) -> Iterator[dict[str, Any]]:
    """Every Reference (a dict with a string ``reference``) inside ``node``."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


__all__ = [
    "FULLURL_NAMESPACE",
    "NO_IDENTIFIER",
    "NO_IDENTIFIER_SEARCH",
    "for_partner",
    "full_url_for",
    "identifier_query",
    "resources_of",
    "search_escape",
    "task_update_transaction",
    "to_transaction",
    "version_of",
]
