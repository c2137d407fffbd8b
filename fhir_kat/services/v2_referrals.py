"""HL7 v2 referrals (REF^I12 / REF^I13) as a fourth route into the referral workflow.

Owns: who may send (``[v2_senders.<name>]``: MSH-3/MSH-4 plus the source address or the TLS
client certificate, mapped to a registered client of the API's registry), exactly-once
answers (the ``message_inbox`` table, under the sender and MSH-10, in the same transaction as
the referral), and turning each outcome into an original-mode ACK: AA when stored and
triaged; AE (recorded, so a re-send gets the same bytes) when the content is refused; AR,
not recorded, when the sender is unknown or the service could not act (a lost race, an
internal error) — the sender may try again. The referral is written by
``ArtifactService.submit("v2", …)`` *as the sender's client* (``Access`` for that client), so
validation, the privacy rules (a referral in its own organisation's name; only its own
referrals changed), triage, feedback, audit and the outbox are those of the other routes.

Must not: parse MLLP framing (``fhir_kat.api.mllp``) or read v2 fields (``fhir_kat.v2``).
"""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fhir_kat.errors import Conflict, FhirError, Forbidden, Issue
from fhir_kat.security.audit import (
    NOTHING_WRITTEN,
    AuditRecord,
    build_audit_event,
    write_audit_event_in,
)
from fhir_kat.security.clients import ClientRegistry
from fhir_kat.security.consent import ConsentDecisionPoint
from fhir_kat.security.policy import area_allowed
from fhir_kat.security.tokens import Principal
from fhir_kat.services.access import Access
from fhir_kat.services.artifacts import ArtifactService, SubmitResult
from fhir_kat.services.messaging import record_answer, recorded_answer
from fhir_kat.settings import SettingsError
from fhir_kat.store import Tx
from fhir_kat.v2 import (
    Header,
    Location,
    Problem,
    Refused,
    SenderContext,
    build_ack,
    locate,
    parse,
    read_header,
    read_referral,
)
from fhir_kat.v2.referral import ISSUE_CODES, check_header, decode

log = logging.getLogger("fhir_kat.mllp")
#: uuid5 namespace of ACK control ids (MSH-10 of the ACK): one per answered message.
ACK_NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000003")
#: FHIR elements a storage-time refusal may name (identity checks), as PID fields.
FHIR_LOCATIONS = {
    "Patient": Location("PID", 1, 3),
    "Patient.birthDate": Location("PID", 1, 7),
    "Patient.gender": Location("PID", 1, 8),
    "Patient.name.family": Location("PID", 1, 5),
}
SENDER_KEYS = {
    "client",
    "sending_application",
    "sending_facility",
    "addresses",
    "certificate_sha256",
    "organization_name",
    "referral_identifier_system",
    "timezone",
    "description",
}


@dataclass(frozen=True)
class V2Sender:
    name: str
    client_id: str
    sending_application: str  # MSH-3, first component
    sending_facility: str  # MSH-4, first component
    addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    certificate_sha256: tuple[str, ...]  # lowercase hex, no separators
    organization_name: str
    referral_identifier_system: str = ""
    timezone: str = ""


@dataclass(frozen=True)
class Peer:
    """The connection a message came on: the source address, the client certificate."""

    address: str
    certificate_sha256: str | None = None


@dataclass(frozen=True)
class V2Result:
    ack: str
    code: str  # AA | AE | AR
    replayed: bool = False


def load_senders(tables: Mapping[str, Any], clients: ClientRegistry) -> dict[str, V2Sender]:
    """``[v2_senders.<name>]`` tables, every problem at once (start-up stops on any)."""
    problems: list[str] = []
    senders: dict[str, V2Sender] = {}
    for name, spec in tables.items():
        where = f"[v2_senders.{name}]"
        if not isinstance(spec, Mapping):
            problems.append(f"{where} must be a table")
            continue
        for key in sorted(set(spec) - SENDER_KEYS):
            problems.append(f"{where}: unknown key {key}")
        client = clients.get(str(spec.get("client", "")))
        if client is None:
            problems.append(f"{where}: client must name a registered [clients.<id>]")
        elif not area_allowed(client.role, "artifacts:referrals"):
            problems.append(f"{where}: client {client.client_id} may not send referrals")
        elif not client.organization:
            problems.append(f"{where}: client {client.client_id} names no organization")
        for key in ("sending_application", "sending_facility", "organization_name"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                problems.append(f"{where}: {key} is required")
        addresses = []
        for text in spec.get("addresses", []):
            try:
                addresses.append(ipaddress.ip_network(str(text), strict=False))
            except ValueError:
                problems.append(f"{where}: not an address or network: {text}")
        fingerprints = tuple(
            str(f).lower().replace(":", "") for f in spec.get("certificate_sha256", [])
        )
        if not addresses and not fingerprints:
            problems.append(
                f"{where}: name the sender's addresses or its certificate_sha256 (or both)"
            )
        zone = str(spec.get("timezone", ""))
        if zone:
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                problems.append(f"{where}: unknown timezone {zone}")
        system = str(spec.get("referral_identifier_system", ""))
        if system and not system.startswith(("http://", "https://", "urn:")):
            problems.append(f"{where}: referral_identifier_system must be a URI")
        if client is not None:
            senders[name] = V2Sender(
                name=name,
                client_id=client.client_id,
                sending_application=str(spec.get("sending_application", "")),
                sending_facility=str(spec.get("sending_facility", "")),
                addresses=tuple(addresses),
                certificate_sha256=fingerprints,
                organization_name=str(spec.get("organization_name", "")),
                referral_identifier_system=system,
                timezone=zone,
            )
    pairs: dict[tuple[str, str], str] = {}
    for sender in senders.values():
        pair = (sender.sending_application, sender.sending_facility)
        if pair in pairs:
            problems.append(
                f"[v2_senders.{sender.name}]: MSH-3/MSH-4 already belong to "
                f"[v2_senders.{pairs[pair]}]"
            )
        pairs[pair] = sender.name
    if problems:
        raise SettingsError("invalid v2 senders:\n  " + "\n  ".join(problems))
    return senders


class _AlreadyAnswered(Exception):
    def __init__(self, recorded: dict[str, Any]) -> None:
        super().__init__("answered")
        self.recorded = recorded


class V2ReferralService:
    def __init__(
        self,
        artifacts: ArtifactService,
        clients: ClientRegistry,
        consent: ConsentDecisionPoint,
        senders: Mapping[str, V2Sender],
        clock: Callable[[], datetime],
        processing_ids: tuple[str, ...] = ("P",),
    ) -> None:
        self.artifacts = artifacts
        self.store = artifacts.fhir.store
        self.clients = clients
        self.consent = consent
        self.senders = dict(senders)
        self.clock = clock
        self.processing_ids = processing_ids

    # ------------------------------------------------------------------ entry point

    def receive(self, raw: bytes, peer: Peer) -> V2Result:
        """Answer one message (the bytes between MLLP's start and end blocks)."""
        started = time.perf_counter()
        header = Header()
        try:
            message = parse(decode(raw))
            header = read_header(message)
        except Refused as refused:
            return self._finish(header, refused.ack_code, refused.problems, None, started)
        sender = self._authenticate(header, peer)
        if sender is None:
            self._audit_refusal(None, peer, 401, "HL7 v2 sender not registered")
            problem = Problem(
                "207",
                "sender not registered here: MSH-3, MSH-4 and the connection must match a "
                "configured v2 sender",
                Location("MSH", 1, 4),
            )
            return self._finish(header, "AR", [problem], None, started)
        key = f"v2|{sender.name}|{header.control_id}"[:200]
        if header.control_id:
            with self.store.read() as tx:
                seen = recorded_answer(tx, key)
            if seen is not None:
                return self._finish_replay(seen, sender, peer, started)
        try:
            check_header(header, self.processing_ids)
            access = self._access(sender)
            organization = access.principal.organization or ""
            read = read_referral(message, header, _context(sender, organization))
        except Refused as refused:
            # A refusal of the content (AE) or of the type, event, version or processing id
            # (AR 200-203) is the same for the same message: recorded, answered alike again.
            ack = self._ack(header, sender, refused.ack_code, refused.problems)
            if header.control_id:
                self._record_alone(key, ack, refused.ack_code)
            return self._logged(V2Result(ack, refused.ack_code), sender, started)
        ack = self._ack(header, sender, "AA", read.warnings)

        def record(tx: Tx, result: SubmitResult) -> None:
            tx.lock(f"message|{key}")
            again = recorded_answer(tx, key)
            if again is not None:  # a parallel copy of the same message won the race
                raise _AlreadyAnswered(again)
            record_answer(tx, key, {"ack": ack, "code": "AA"}, self.clock())
            status = 201 if result.created else 200
            entities = [
                e.fields["response"]["location"].split("/_history")[0]
                for e in result.bundle.entries
            ]
            detail = "HL7 v2 REF^" + header.event
            if not result.changed:
                detail += f"; {NOTHING_WRITTEN}"
            audit = self._audit_record(sender, peer, status, detail)
            audit.entities.extend(entities)
            write_audit_event_in(tx, build_audit_event(audit, self.clock()))

        try:
            self.artifacts.submit(
                "v2",
                read.payload,
                sender.client_id,
                access,
                audit=record,
                deliver_as="referrals",
            )
        except _AlreadyAnswered as answered:
            return self._finish_replay(answered.recorded, sender, peer, started)
        except Forbidden as exc:
            # Who may change what is not a property of the message: not recorded (as the
            # FHIR messaging route's 403), answered AR naming only the rule.
            self._audit_refusal(sender, peer, 403, "HL7 v2 referral refused")
            problems = [
                Problem("207", i.diagnostics, _where(i, read.locations)) for i in exc.issues
            ]
            return self._logged(
                V2Result(self._ack(header, sender, "AR", problems), "AR"), sender, started
            )
        except Conflict:
            problem = Problem(
                "206", "the referral was changed concurrently; send the message again", None
            )
            return self._logged(
                V2Result(self._ack(header, sender, "AR", [problem]), "AR"), sender, started
            )
        except FhirError as exc:
            problems = [
                Problem(ISSUE_CODES.get(i.code, "207"), i.diagnostics, _where(i, read.locations))
                for i in exc.issues
            ]
            ack = self._ack(header, sender, "AE", problems)
            self._audit_refusal(sender, peer, exc.status, "HL7 v2 referral refused")
            self._record_alone(key, ack, "AE")
            return self._logged(V2Result(ack, "AE"), sender, started)
        except Exception:
            log.exception("v2 referral failed", extra={"sender": sender.name})
            problem = Problem("207", "internal error; send the message again later", None)
            return self._logged(
                V2Result(self._ack(header, sender, "AR", [problem]), "AR"), sender, started
            )
        return self._logged(V2Result(ack, "AA"), sender, started)

    # ------------------------------------------------------------------ senders

    def _authenticate(self, header: Header, peer: Peer) -> V2Sender | None:
        application = header.sending_application[0] if header.sending_application else ""
        facility = header.sending_facility[0] if header.sending_facility else ""
        for sender in self.senders.values():
            if (sender.sending_application, sender.sending_facility) != (application, facility):
                continue
            if peer.certificate_sha256 and peer.certificate_sha256 in sender.certificate_sha256:
                return sender
            try:
                address = ipaddress.ip_address(peer.address)
            except ValueError:
                return None
            if any(address in network for network in sender.addresses):
                return sender
            return None
        return None

    def _access(self, sender: V2Sender) -> Access:
        client = self.clients.get(sender.client_id)
        if client is None:  # the registry is loaded with the senders: never at run time
            raise RuntimeError(f"v2 sender {sender.name}: client {sender.client_id} vanished")
        principal = Principal(
            client_id=client.client_id,
            role=client.role,
            scopes=client.scopes,
            organization=client.organization,
            purpose=client.purpose,
            token_id=f"mllp:{sender.name}",
        )
        return Access(principal, self.consent, self.clock)

    # ------------------------------------------------------------------ answers

    def _ack(
        self, header: Header, sender: V2Sender | None, code: str, problems: list[Problem]
    ) -> str:
        seed = f"{sender.name if sender else '?'}|{header.control_id}|{code}"
        control = uuid.uuid5(ACK_NAMESPACE, seed).hex[:20]
        return build_ack(header, code, problems, now=self.clock(), control_id=control)

    def _finish(
        self,
        header: Header,
        code: str,
        problems: list[Problem],
        sender: V2Sender | None,
        started: float,
    ) -> V2Result:
        return self._logged(
            V2Result(self._ack(header, sender, code, problems), code), sender, started
        )

    def _finish_replay(
        self, recorded: dict[str, Any], sender: V2Sender, peer: Peer, started: float
    ) -> V2Result:
        result = V2Result(str(recorded["ack"]), str(recorded["code"]), replayed=True)
        # A re-sent message is answered from the record and writes nothing, but it is an
        # access like any other: audited (the audit trail names every request).
        status = 200 if result.code == "AA" else 422
        detail = f"HL7 v2 message re-sent: its recorded {result.code} again; {NOTHING_WRITTEN}"
        self._audit_refusal(sender, peer, status, detail)
        return self._logged(result, sender, started)

    def _record_alone(self, key: str, ack: str, code: str) -> None:
        with self.store.write() as tx:
            tx.lock(f"message|{key}")
            if recorded_answer(tx, key) is None:
                record_answer(tx, key, {"ack": ack, "code": code}, self.clock())

    def _logged(self, result: V2Result, sender: V2Sender | None, started: float) -> V2Result:
        # Never message content: the sender's configured name, the outcome, the time.
        log.info(
            "v2 message",
            extra={
                "sender": sender.name if sender else None,
                "ack": result.code,
                "replayed": result.replayed,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return result

    # ------------------------------------------------------------------ audit

    def _audit_record(
        self, sender: V2Sender | None, peer: Peer, status: int, detail: str
    ) -> AuditRecord:
        client = self.clients.get(sender.client_id) if sender else None
        return AuditRecord(
            interaction="create",
            client_id=client.client_id if client else None,
            role=client.role if client else None,
            purpose=client.purpose if client else None,
            address=peer.address,
            status=status,
            detail=detail,
            security=client is None,
        )

    def _audit_refusal(self, sender: V2Sender | None, peer: Peer, status: int, detail: str) -> None:
        """An AuditEvent of its own transaction: for what wrote nothing (a refusal, a replay)."""
        event = build_audit_event(self._audit_record(sender, peer, status, detail), self.clock())
        with self.store.write() as tx:
            write_audit_event_in(tx, event)


def _context(sender: V2Sender, organization: str) -> SenderContext:
    """The sender's registered organisation ("system|value") is the referring clinic: a v2
    referral is always in its own organisation's name."""
    system, _, value = organization.partition("|")
    return SenderContext(
        name=sender.name,
        organization_system=system,
        organization_value=value,
        organization_name=sender.organization_name,
        referral_identifier_system=sender.referral_identifier_system,
        timezone=sender.timezone,
    )


def _where(problem: Issue, locations: Mapping[str, Location]) -> Location | None:
    for expression in problem.expression:
        found = locate(locations, expression) or FHIR_LOCATIONS.get(expression)
        if found is not None:
            return found
    return None
