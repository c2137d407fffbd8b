"""Sandbox check: can this partner FHIR server take what fhir_kat will send it?

Owns: ``check_partner`` — read the partner's CapabilityStatement and compare it with what
fhir_kat needs for that partner (the resource types its artifact kinds map to, Provenance
included, with the interactions they travel by — conditional create and, for later versions,
conditional update; PUT with our id in put mode and for Provenance — and ``transaction`` at
the system level); then a round trip
with a synthetic Patient: create → search by identifier → read → delete (when the server allows
delete; otherwise the Patient is left and named). The result is a list of checks, each pass,
warn, skip or fail, for the command line to print.

Must not: send anything but the synthetic Patient, log bodies or tokens, or raise for what the
partner does (every answer becomes a check).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import requests

from fhir_kat.artifacts import KINDS
from fhir_kat.exchange.bundles import NO_IDENTIFIER, NO_IDENTIFIER_SEARCH
from fhir_kat.exchange.client import PartnerClient, TokenError
from fhir_kat.exchange.partners import DELIVERABLE_KINDS, REFERRAL_STATUS, PartnerConfig
from fhir_kat.mapping.engine import targets
from fhir_kat.terminology import IDENTIFIERS

Outcome = Literal["pass", "warn", "skip", "fail"]
FHIR_JSON = "application/fhir+json"
#: The identifier system of the synthetic Patient (a value no real system issues).
SANDBOX_SYSTEM = f"{IDENTIFIERS}/sandbox-check"
#: Resources the service adds beside an artifact's own mapping (DOMAIN.md: SDC extraction of
#: questionnaire scores into Observations; safety Flags to the care team, with the Patient).
_EXTRA_TYPES = {
    "questionnaire-responses": {"Observation", "Provenance"},
    "safety-flags": {"Flag", "Patient"},
    # The referral Task by conditional update, and the feedback document (a Bundle).
    "referral-status": {"Task", "Bundle"},
}


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str


@dataclass
class SandboxReport:
    partner: str
    base_url: str
    checks: list[Check] = field(default_factory=list)
    #: True when the partner could not be reached at all (no HTTP answer).
    unreachable: bool = False

    @property
    def passed(self) -> bool:
        return not self.unreachable and all(c.outcome != "fail" for c in self.checks)

    def add(self, name: str, outcome: Outcome, detail: str) -> None:
        self.checks.append(Check(name, outcome, detail))


def needed_types(partner: PartnerConfig) -> tuple[set[str], list[str]]:
    """The resource types fhir_kat will send this partner (from the mapping files; the
    Provenance of each artifact included), and the kinds it receives whose types this check
    does not know (reported, never guessed). Only kinds the partner receives count: a partner
    with every kind does not get ``referral-status`` unless it names it."""
    kinds: Iterable[str] = (
        partner.artifact_kinds
        if partner.artifact_kinds is not None
        else DELIVERABLE_KINDS - {REFERRAL_STATUS}
    )
    types: set[str] = set()
    unknown: list[str] = []
    for kind in sorted(kinds):
        if kind in KINDS:
            types |= {t.resource_type for t in targets(kind)}
        elif kind not in _EXTRA_TYPES:
            unknown.append(kind)
        types |= _EXTRA_TYPES.get(kind, set())
    return {t for t in types if partner.accepts_type(t)}, unknown


def _how(rtype: str, partner: PartnerConfig) -> tuple[str, ...]:
    """What the partner must declare for ``rtype`` given how it travels (bundles.py):
    ``PUT <Type>/<our id>`` in put mode and for a type that cannot be matched by identifier
    (Provenance, AdverseEvent); otherwise a conditional create for its first version and a
    conditional update for later ones (a Task status change, a correction)."""
    if partner.write_mode == "put" or rtype in NO_IDENTIFIER | NO_IDENTIFIER_SEARCH:
        return ("update", "updateCreate")
    return ("create", "conditionalCreate", "update", "conditionalUpdate")


class _Unreachable(Exception):
    pass


class _Session:
    """Requests to one partner with its token (renewed once on a 401)."""

    def __init__(self, partner: PartnerConfig, session: requests.Session | None) -> None:
        self.partner = partner
        self.client = PartnerClient(partner, session=session)

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        url = path if path.startswith("http") else f"{self.partner.base_url}/{path}"
        for attempt in (0, 1):
            headers = {"Accept": FHIR_JSON, **kw.pop("headers", {})}
            if self.partner.auth.kind != "none":
                headers["Authorization"] = f"Bearer {self.client.access_token()}"
            try:
                response = self.client.session.request(
                    method,
                    url,
                    headers=headers,
                    timeout=self.partner.timeout_seconds,
                    allow_redirects=False,
                    **kw,
                )
            except requests.RequestException as exc:
                raise _Unreachable(type(exc).__name__) from None
            if response.status_code == 401 and attempt == 0 and self.partner.auth.kind != "none":
                self.client.invalidate_token()
                kw["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover (the loop always returns)

    def close(self) -> None:
        self.client.close()


def check_partner(
    partner: PartnerConfig, *, session: requests.Session | None = None
) -> SandboxReport:
    report = SandboxReport(partner.name, partner.base_url)
    http = _Session(partner, session)
    try:
        if partner.auth.kind != "none":
            try:
                http.client.access_token()
                report.add(
                    "token", "pass", f"{partner.auth.kind} token from {partner.auth.token_url}"
                )
            except TokenError as exc:
                report.add("token", "fail", exc.reason)
                return report
        capability = _capability(http, report)
        if capability is None:
            return report
        can_delete, can_round_trip = _compare(capability, partner, report)
        if can_round_trip:
            _round_trip(http, report, can_delete)
        else:
            report.add("round trip", "skip", "Patient create, search-type and read are needed")
    except _Unreachable as exc:
        report.unreachable = True
        report.add("connection", "fail", f"no answer from {partner.base_url} ({exc})")
    finally:
        http.close()
    return report


def _capability(http: _Session, report: SandboxReport) -> dict[str, Any] | None:
    response = http.request("GET", "metadata")
    if response.status_code != 200:
        report.add("capability", "fail", f"GET metadata answered HTTP {response.status_code}")
        return None
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("resourceType") != "CapabilityStatement":
        report.add("capability", "fail", "GET metadata did not return a CapabilityStatement")
        return None
    version = str(doc.get("fhirVersion", ""))
    software = doc.get("software", {}).get("name") if isinstance(doc.get("software"), dict) else ""
    name = f" ({software})" if software else ""
    if version.startswith("4.0."):
        report.add("fhir-version", "pass", f"FHIR {version}{name}")
    else:
        report.add("fhir-version", "fail", f"FHIR {version or 'unknown'}{name}; R4 (4.0.x) needed")
    return doc


def _compare(
    capability: dict[str, Any], partner: PartnerConfig, report: SandboxReport
) -> tuple[bool, bool]:
    """Checks per needed resource type; returns whether Patient delete is supported and
    whether the round trip can be tried."""
    rest = next(
        (
            r
            for r in capability.get("rest", [])
            if isinstance(r, dict) and r.get("mode") == "server"
        ),
        {},
    )
    resources = {
        r.get("type"): r for r in rest.get("resource", []) if isinstance(r, dict) and r.get("type")
    }
    system = {i.get("code") for i in rest.get("interaction", []) if isinstance(i, dict)}
    if "transaction" in system:
        report.add("transaction", "pass", "system interaction transaction")
    else:
        report.add(
            "transaction", "fail", "no system-level transaction: deliveries are transactions"
        )

    types, unknown = needed_types(partner)
    for kind in unknown:
        report.add(f"kind {kind}", "warn", "its resource types are not checked here")
    for rtype in sorted(types):
        spec = resources.get(rtype)
        if spec is None:
            report.add(f"type {rtype}", "fail", "not supported")
            continue
        interactions = {i.get("code") for i in spec.get("interaction", []) if isinstance(i, dict)}
        needed = _how(rtype, partner)
        missing = [
            n
            for n in needed
            if (n not in interactions if n in ("create", "update") else spec.get(n) is not True)
        ]
        if missing:
            report.add(f"type {rtype}", "fail", f"missing {', '.join(missing)}")
        else:
            report.add(f"type {rtype}", "pass", ", ".join(needed))
    patient = resources.get("Patient", {})
    codes = {i.get("code") for i in patient.get("interaction", []) if isinstance(i, dict)}
    absent = [n for n in ("create", "search-type", "read") if n not in codes]
    for code in absent:
        report.add(f"Patient {code}", "fail", "not in the CapabilityStatement (round trip)")
    return "delete" in codes, not absent


def _round_trip(http: _Session, report: SandboxReport, can_delete: bool) -> None:
    value = uuid.uuid4().hex
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": SANDBOX_SYSTEM, "value": value}],
        "name": [{"family": "Sandboxcheck", "given": ["Synthetic"]}],
        "gender": "unknown",
        "birthDate": "1970-01-01",
    }
    created = http.request(
        "POST",
        "Patient",
        json=patient,
        headers={"Content-Type": FHIR_JSON, "Prefer": "return=representation"},
    )
    if created.status_code not in (200, 201):
        report.add("create", "fail", f"POST Patient answered HTTP {created.status_code}")
        return
    pid = _created_id(created)
    if not pid:
        report.add("create", "fail", "no id in Location or the body")
        return
    report.add("create", "pass", f"Patient/{pid} (HTTP {created.status_code})")

    found = http.request("GET", "Patient", params={"identifier": f"{SANDBOX_SYSTEM}|{value}"})
    ids = _bundle_ids(found)
    if found.status_code == 200 and ids == [pid]:
        report.add("search", "pass", "Patient?identifier= finds exactly the new Patient")
    else:
        report.add("search", "fail", f"HTTP {found.status_code}, matches: {len(ids)} (1 expected)")

    read = http.request("GET", f"Patient/{pid}")
    body = _json(read)
    same = any(
        i.get("system") == SANDBOX_SYSTEM and i.get("value") == value
        for i in body.get("identifier", [])
        if isinstance(i, dict)
    )
    if read.status_code == 200 and same:
        report.add("read", "pass", f"Patient/{pid} with the identifier sent")
    else:
        report.add("read", "fail", f"HTTP {read.status_code}; identifier kept: {same}")

    if not can_delete:
        report.add("cleanup", "skip", f"delete not supported: Patient/{pid} left in the sandbox")
        return
    deleted = http.request("DELETE", f"Patient/{pid}")
    if deleted.status_code in (200, 202, 204):
        report.add("cleanup", "pass", f"Patient/{pid} deleted")
    else:
        report.add(
            "cleanup", "warn", f"DELETE answered HTTP {deleted.status_code}; Patient/{pid} left"
        )


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _created_id(response: requests.Response) -> str | None:
    location = response.headers.get("Location") or response.headers.get("Content-Location")
    if location:
        parts = location.split("?")[0].rstrip("/").split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) >= 2 and parts[-2] == "Patient":
            return parts[-1]
    rid = _json(response).get("id")
    return str(rid) if rid else None


def _bundle_ids(response: requests.Response) -> list[str]:
    doc = _json(response)
    return [
        str(e["resource"].get("id"))
        for e in doc.get("entry", [])
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e.get("search", {}).get("mode", "match") == "match"
    ]


__all__ = ["Check", "SandboxReport", "check_partner", "needed_types"]
