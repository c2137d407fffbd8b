"""Reading an HL7 v2 referral (REF^I12 new, REF^I13 modified; v2.3, 2.3.1, 2.4, 2.5, 2.5.1).

Owns: decoding the bytes (MSH-18), parsing the ER7 with python-hl7, the header checks a v2
receiver makes (message type, event, version, processing id: an AR), the segment rules of
``mappings/workflow/v2-referrals.yaml`` and the fields read from each mapped segment, into the
``v2`` referral artifact (``fhir_kat.artifacts.schemas.V2ReferralSchema``) that
``mappings/v2/*.yaml`` map — together with the v2 location (segment, occurrence, field,
repetition, component) of every value, so that any later refusal (schema, terminology,
storage) names the place in the message. Codes pass through as sent: a coding-system name
the rules do not know leaves a coding without a system, which triage never classifies.

Must not: authenticate, store, read a clock, or put message content (names, PHNs, free text)
into a problem's text: texts name fields, rules and code-shaped codes only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import hl7
import yaml

from fhir_kat.canonical import read_definition
from fhir_kat.terminology import safe_code

RULES_FILE = Path(__file__).resolve().parents[2] / "mappings" / "workflow" / "v2-referrals.yaml"
#: Table 0357 code per FHIR issue code, for problems found after reading (schema, codes).
ISSUE_CODES = {
    "required": "101",
    "value": "102",
    "structure": "100",
    "code-invalid": "103",
    "invalid": "102",
}
#: The referral facts a 99KAT OBX carries (kat-intake codes); every other 99KAT code is a flag
#: checked against ValueSet kat-referral-flag by the artifact schema.
PRIOR_FAILURE = "prior-treatment-failure"
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
#: What FHIR text may not hold (as on the HTTP routes, docs/adr/0010-hostile-input.md): a NUL
#: or another control character; tab is allowed, CR separates segments, LF is tolerated there.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TS = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<f>\d{1,4}))?(?P<tz>[+-]\d{4})?$"
)
_CHARSETS = {
    "": "ascii",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
}


@cache
def rules(path: Path = RULES_FILE) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(read_definition(path))
    return data


@dataclass(frozen=True)
class Location:
    """Where a value is in the message (ERR-2, ERL): 1-based, as HL7 counts."""

    segment: str
    sequence: int = 1
    field: int | None = None
    repetition: int | None = None
    component: int | None = None

    def at(self, component: int | None) -> Location:
        return Location(self.segment, self.sequence, self.field, self.repetition, component)


@dataclass(frozen=True)
class Problem:
    code: str  # v2 table 0357
    text: str
    location: Location | None = None
    severity: str = "E"  # v2 table 0516: E error, W warning


class Refused(Exception):
    """The message is answered ``ack_code`` (AE: its content; AR: type, version, sender)."""

    def __init__(self, ack_code: str, problems: list[Problem]) -> None:
        super().__init__(ack_code)
        self.ack_code = ack_code
        self.problems = problems


@dataclass(frozen=True)
class Header:
    """MSH, as far as it could be read (components of HD fields as sent)."""

    sending_application: tuple[str, ...] = ()
    sending_facility: tuple[str, ...] = ()
    receiving_application: tuple[str, ...] = ()
    receiving_facility: tuple[str, ...] = ()
    control_id: str = ""
    message_type: str = ""
    event: str = ""
    processing_id: str = ""
    version: str = ""
    charset: str = ""
    sent_at: str = ""  # MSH-7 as sent (TS)


@dataclass(frozen=True)
class SenderContext:
    """What the receiver knows of the authenticated sender that the message does not say."""

    name: str
    organization_system: str
    organization_value: str
    organization_name: str
    referral_identifier_system: str = ""
    timezone: str = ""


@dataclass
class Read:
    payload: dict[str, Any]
    locations: dict[str, Location]
    warnings: list[Problem] = field(default_factory=list)


# ---------------------------------------------------------------------------- bytes and MSH


def decode(raw: bytes) -> str:
    """The message text in the character set MSH-18 names (ASCII when it names none)."""
    head = raw[:1024].split(b"\r", 1)[0].split(b"\n", 1)[0]
    parts = head.split(head[3:4]) if head.startswith(b"MSH") and len(head) > 3 else []
    declared = (
        parts[17].split(b"^")[0].decode("ascii", "replace").strip() if len(parts) > 17 else ""
    )
    codec = _CHARSETS.get(declared.upper())
    if codec is None:
        raise Refused(
            "AE",
            [Problem("103", "unsupported character set", Location("MSH", 1, 18))],
        )
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        where = Location("MSH", 1, 18)
        text = (
            "bytes outside ASCII: declare the character set in MSH-18 (UNICODE UTF-8 or 8859/1)"
            if not declared
            else "the message is not in the character set MSH-18 declares"
        )
        raise Refused("AE", [Problem("102", text, where)]) from None


def parse(text: str) -> hl7.Message:
    """python-hl7's parse of the ER7 (segments split on CR; LF tolerated as senders send it)."""
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH") or len(text) < 8:
        raise Refused("AR", [Problem("100", "a message starts with MSH", Location("MSH"))])
    try:
        return hl7.parse(text)
    except Exception:  # python-hl7 raises several types on malformed ER7
        raise Refused(
            "AR", [Problem("100", "not an ER7-encoded HL7 v2 message", Location("MSH"))]
        ) from None


def read_header(message: hl7.Message) -> Header:
    msh = _Seg(message, message[0], 1)
    kind = msh.components(9)
    return Header(
        sending_application=msh.components(3),
        sending_facility=msh.components(4),
        receiving_application=msh.components(5),
        receiving_facility=msh.components(6),
        control_id=msh.value(10),
        message_type=kind[0] if kind else "",
        event=kind[1] if len(kind) > 1 else "",
        processing_id=msh.value(11),
        version=msh.value(12),
        charset=msh.value(18),
        sent_at=msh.value(7),
    )


def check_header(header: Header, processing_ids: tuple[str, ...]) -> None:
    """What makes a message one this receiver does not take at all (AR, table 0357 2xx)."""
    spec = rules()
    if header.version not in spec["versions"]:
        raise Refused(
            "AR",
            [
                Problem(
                    "203",
                    f"version {safe_code(header.version)} is not taken; send one of "
                    + ", ".join(spec["versions"]),
                    Location("MSH", 1, 12),
                )
            ],
        )
    if header.message_type != spec["message_type"]:
        raise Refused(
            "AR",
            [
                Problem(
                    "200",
                    f"message type {safe_code(header.message_type)} is not taken; send REF",
                    Location("MSH", 1, 9, None, 1),
                )
            ],
        )
    if header.event not in spec["events"]:
        raise Refused(
            "AR",
            [
                Problem(
                    "201",
                    f"event {safe_code(header.event)} is not taken; send "
                    + " or ".join(f"REF^{e}" for e in spec["events"]),
                    Location("MSH", 1, 9, None, 2),
                )
            ],
        )
    if header.processing_id not in processing_ids:
        raise Refused(
            "AR",
            [
                Problem(
                    "202",
                    f"processing id {safe_code(header.processing_id)} is not taken here; send "
                    + " or ".join(processing_ids),
                    Location("MSH", 1, 11),
                )
            ],
        )
    if not header.control_id:
        raise Refused(
            "AE",
            [Problem("101", "MSH-10 (message control id) is required", Location("MSH", 1, 10))],
        )


# ---------------------------------------------------------------------------- the referral


def read_referral(message: hl7.Message, header: Header, sender: SenderContext) -> Read:
    """The v2 referral artifact, or ``Refused("AE", …)`` naming every problem found."""
    return _Reader(message, header, sender).read()


def locate(locations: Mapping[str, Location], expression: str) -> Location | None:
    """The location of an artifact field path (``conditions[1].codings``), or of the nearest
    enclosing value that has one."""
    path = expression
    while path:
        if path in locations:
            return locations[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None


class _Seg:
    """One segment, its fields normalised (python-hl7 nests only where separators occur)."""

    def __init__(self, message: hl7.Message, segment: Any, sequence: int) -> None:
        self.message = message
        self.segment = segment
        self.id = str(segment[0])
        self.sequence = sequence

    def loc(
        self, field: int, repetition: int | None = None, component: int | None = None
    ) -> Location:
        return Location(self.id, self.sequence, field, repetition, component)

    def repetitions(self, n: int) -> list[list[list[str]]]:
        """Field ``n``: repetitions → components → subcomponents, as sent (escaped)."""
        if n >= len(self.segment):
            return []
        raw = self.segment[n]
        if self.id == "MSH" and n in (1, 2):
            return [[[str(raw)]]]
        reps: list[list[list[str]]] = []
        items = [raw] if isinstance(raw, str) else list(raw)
        simple = all(isinstance(x, str) for x in items)
        if simple:
            text = "".join(items)
            return [] if text in ("", '""') else [[[text]]]
        for rep in items:
            if isinstance(rep, str):
                reps.append([[rep]])
                continue
            comps: list[list[str]] = []
            for comp in rep:
                comps.append([comp] if isinstance(comp, str) else [str(s) for s in comp])
            reps.append(comps)
        return [r for r in reps if any(any(s for s in c) for c in r)]

    def components(self, n: int, repetition: int = 0) -> tuple[str, ...]:
        reps = self.repetitions(n)
        if len(reps) <= repetition:
            return ()
        return tuple(self._text(c[0]) if c else "" for c in reps[repetition])

    def subcomponents(self, n: int, repetition: int, component: int) -> tuple[str, ...]:
        reps = self.repetitions(n)
        if len(reps) <= repetition or len(reps[repetition]) < component:
            return ()
        return tuple(self._text(s) for s in reps[repetition][component - 1])

    def value(self, n: int, component: int = 1, repetition: int = 0) -> str:
        comps = self.components(n, repetition)
        return comps[component - 1] if len(comps) >= component else ""

    def _text(self, raw: str) -> str:
        if raw == '""':
            return ""  # the HL7 null: nothing to store
        text = str(self.message.unescape(raw)) if "\\" in raw else raw
        return text.replace("\r", "\n").strip()


def _component(comps: tuple[str, ...], n: int) -> str:
    return comps[n - 1] if len(comps) >= n else ""


class _Reader:
    def __init__(self, message: hl7.Message, header: Header, sender: SenderContext) -> None:
        self.message = message
        self.header = header
        self.sender = sender
        self.spec = rules()
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.locations: dict[str, Location] = {}
        self.tz: tzinfo | None = ZoneInfo(sender.timezone) if sender.timezone else None

    # ------------------------------------------------------------------ walk

    def read(self) -> Read:
        segments = self._segments()
        payload: dict[str, Any] = {
            "source_id": f"{self.sender.name}|{self.header.control_id}"[:200],
            "event": self.header.event,
        }
        self.locations["source_id"] = Location("MSH", 1, 10)
        self.locations["event"] = Location("MSH", 1, 9, None, 2)
        counts: dict[str, int] = {}
        for seg in segments:
            counts[seg.id] = counts.get(seg.id, 0) + 1
        for required in self.spec["segments"]["required_once"]:
            if counts.get(required, 0) == 0:
                self.problems.append(
                    Problem("100", f"required segment {required} is missing", Location(required))
                )
            elif counts[required] > 1:
                self.problems.append(
                    Problem("100", f"only one {required} segment is taken", Location(required, 2))
                )
        rf1 = next((s for s in segments if s.id == "RF1"), None)
        pid = next((s for s in segments if s.id == "PID"), None)
        if rf1 is not None:
            self._rf1(rf1, payload)
        if pid is not None:
            payload["patient"] = self._pid(pid)
        payload["referrer"] = self._referrer(segments)
        self._rest(segments, payload)
        if self.problems:
            raise Refused("AE", self.problems)
        return Read(payload, self.locations, self.warnings)

    def _segments(self) -> list[_Seg]:
        mapped = set(self.spec["segments"]["mapped"])
        not_stored = set(self.spec["segments"]["not_stored"])
        counts: dict[str, int] = {}
        out: list[_Seg] = []
        for index, segment in enumerate(self.message):
            name = str(segment[0]) if len(segment) else ""
            if not _SEGMENT_ID.match(name):
                self.problems.append(
                    Problem(
                        "100",
                        f"line {index + 1} is not a segment (a segment id is three capitals "
                        "or digits)",
                        None,
                    )
                )
                continue
            counts[name] = counts.get(name, 0) + 1
            seg = _Seg(self.message, segment, counts[name])
            for n in range(1, len(segment)):
                found = _CONTROL.search(str(segment[n]))
                if found is not None:
                    self.problems.append(
                        Problem(
                            "102",
                            f"control character U+{ord(found.group()):04X} (refused, never "
                            "cleaned)",
                            seg.loc(n),
                        )
                    )
            if index > 0 and name == "MSH":
                self.problems.append(
                    Problem("100", "one message per MLLP frame (MSH once)", Location(name, 2))
                )
            elif name in not_stored:
                self.warnings.append(
                    Problem(
                        "0",
                        f"segment {name} accepted, not stored (the referral record does not "
                        "hold it)",
                        Location(name, counts[name]),
                        "W",
                    )
                )
            elif name not in mapped:
                self.problems.append(
                    Problem(
                        "100",
                        f"segment {name} is not expected in REF^I12 (Z-segments included: "
                        "their meaning cannot be known)",
                        Location(name, counts[name]),
                    )
                )
            else:
                out.append(seg)
        return out

    # ------------------------------------------------------------------ RF1

    def _rf1(self, rf1: _Seg, payload: dict[str, Any]) -> None:
        status = rf1.value(1)
        if status and status not in self.spec["referral_status"]:
            self._table(rf1.loc(1, 1, 1), status, "0283", "a referral pending (P) or accepted (A)")
        priority = rf1.value(2)
        if priority:
            if priority in self.spec["priority"]:
                payload["urgency"] = self.spec["priority"][priority]
            else:
                self._table(rf1.loc(2, 1, 1), priority, "0280", "R, A or S")
        self.locations["urgency"] = rf1.loc(2)
        ident = rf1.components(6)
        value = _component(ident, 1)
        if not value:
            self.problems.append(
                Problem("101", "RF1-6 (originating referral identifier) is required", rf1.loc(6))
            )
        else:
            system = _universal(_component(ident, 3), _component(ident, 4))
            system = system or self.sender.referral_identifier_system
            if not system:
                self.problems.append(
                    Problem(
                        "101",
                        "RF1-6 needs a universal id (EI-3 with EI-4 URI or ISO), or a "
                        "referral_identifier_system configured for this sender",
                        rf1.loc(6, 1, 3),
                    )
                )
            else:
                payload["referral_identifier"] = {"system": system, "value": value}
        self.locations["referral_identifier"] = rf1.loc(6, 1)
        authored = self._datetime(rf1.value(7), rf1.loc(7), required=False, needs_time=True)
        if authored is None:
            authored = self._datetime(
                self.header.sent_at, Location("MSH", 1, 7), required=True, needs_time=True
            )
            self.locations["authored_on"] = Location("MSH", 1, 7)
        else:
            self.locations["authored_on"] = rf1.loc(7)
        if authored is not None:
            payload["authored_on"] = authored
        reason = rf1.components(10)
        text = _component(reason, 2)
        code = _component(reason, 1)
        tables = {"O": "Provider Ordered", "P": "Patient Preference", "S": "Second Opinion"}
        tables["W"] = "Work Load"  # v2 table 0336 displays (HL7's R4 package)
        if text:
            payload["reason"] = text
        elif code:
            if code in tables:
                payload["reason"] = tables[code]
            else:
                self._table(rf1.loc(10, 1, 1), code, "0336", "O, P, S or W")
        self.locations["reason"] = rf1.loc(10)
        others: list[dict[str, Any]] = []
        for i, _ in enumerate(rf1.repetitions(11)):
            comps = rf1.components(11, i)
            if not _component(comps, 1):
                continue
            self.locations[f"other_referral_identifiers[{len(others)}]"] = rf1.loc(11, i + 1)
            others.append(
                _drop_empty(
                    {
                        "value": _component(comps, 1),
                        "assigner": _component(comps, 2),
                        "system": _universal(_component(comps, 3), _component(comps, 4)),
                    }
                )
            )
        payload["other_referral_identifiers"] = others

    # ------------------------------------------------------------------ PID

    def _pid(self, pid: _Seg) -> dict[str, Any]:
        patient: dict[str, Any] = {}
        phn_spec = self.spec["phn"]
        others: list[dict[str, Any]] = []
        found: list[tuple[int, str]] = []
        for i, _ in enumerate(pid.repetitions(3)):
            comps = pid.components(3, i)
            authority = pid.subcomponents(3, i, 4)
            namespace = _component(authority, 1)
            kind = _component(comps, 5)
            if namespace in phn_spec["assigning_authorities"]:
                if kind and kind not in phn_spec["identifier_types"]:
                    self._table(pid.loc(3, i + 1, 5), kind, "0203", "JHN for the BC PHN")
                found.append((i, _component(comps, 1)))
                continue
            if not _component(comps, 1):
                continue
            self.locations[f"patient.other_identifiers[{len(others)}]"] = pid.loc(3, i + 1)
            others.append(
                _drop_empty(
                    {
                        "value": _component(comps, 1),
                        "type": kind,
                        "assigner": namespace,
                        "system": _universal(_component(authority, 2), _component(authority, 3)),
                    }
                )
            )
        if not found:
            self.problems.append(
                Problem(
                    "101",
                    "PID-3 needs the BC PHN (assigning authority "
                    + "/".join(phn_spec["assigning_authorities"])
                    + ")",
                    pid.loc(3),
                )
            )
        elif len({v for _, v in found}) > 1:
            self.problems.append(
                Problem("102", "PID-3 carries two different BC PHNs", pid.loc(3, found[1][0] + 1))
            )
        else:
            patient["phn"] = found[0][1]
            self.locations["patient.phn"] = pid.loc(3, found[0][0] + 1, 1)
        patient["other_identifiers"] = others
        name = pid.components(5)
        family = _component(pid.subcomponents(5, 0, 1), 1)
        if family:
            patient["family_name"] = family
        given = [g for g in (_component(name, 2), _component(name, 3)) if g]
        patient["given_names"] = given
        self.locations["patient.family_name"] = pid.loc(5, 1, 1)
        self.locations["patient.given_names"] = pid.loc(5, 1, 2)
        birth = pid.value(7)
        self.locations["patient.birth_date"] = pid.loc(7)
        if birth:
            parsed = _TS.match(birth)
            if parsed is None or not parsed["d"]:
                self.problems.append(
                    Problem("102", "PID-7 needs a full date of birth (YYYYMMDD)", pid.loc(7))
                )
            else:
                patient["birth_date"] = f"{parsed['y']}-{parsed['mo']}-{parsed['d']}"
        sex = pid.value(8)
        self.locations["patient.sex"] = pid.loc(8)
        if sex:
            if sex in self.spec["sex"]:
                patient["sex"] = self.spec["sex"][sex]
            else:
                self._table(pid.loc(8), sex, "0001", "F, M, O or U")
        contact = self._telecom(pid, 13, "patient.contact")
        if contact:
            patient["contact"] = contact
        return patient

    # ------------------------------------------------------------------ PRD / CTD

    def _referrer(self, segments: list[_Seg]) -> dict[str, Any]:
        referrer: dict[str, Any] = {
            "organization": {
                "name": self.sender.organization_name,
                "identifier": {
                    "system": self.sender.organization_system,
                    "value": self.sender.organization_value,
                },
            }
        }
        referring: _Seg | None = None
        current: _Seg | None = None
        for seg in segments:
            if seg.id == "PRD":
                current = seg
                if seg.value(1) == "RP" and referring is None:
                    referring = seg
                elif seg.value(1) == "RP":
                    self.problems.append(
                        Problem("100", "one referring provider (PRD-1 RP) is taken", seg.loc(1))
                    )
                else:
                    self.warnings.append(
                        Problem(
                            "0",
                            "a provider other than the referring one (PRD-1 not RP) is not stored",
                            seg.loc(1),
                            "W",
                        )
                    )
            elif seg.id == "CTD":
                if current is not None and current is referring:
                    role = self._telecom(seg, 5, "referrer.role_contact")
                    if role:
                        referrer["role_contact"] = role
                else:
                    self.warnings.append(
                        Problem(
                            "0",
                            "a contact not of the referring provider is not stored",
                            seg.loc(1),
                            "W",
                        )
                    )
            elif seg.id not in ("NTE",):
                current = None
        if referring is None:
            self.problems.append(
                Problem(
                    "100",
                    "a PRD for the referring provider (PRD-1 RP) is required",
                    Location("PRD"),
                )
            )
            return referrer
        family = _component(referring.subcomponents(2, 0, 1), 1)
        if family:
            referrer["family_name"] = family
        name = referring.components(2)
        referrer["given_names"] = [g for g in (_component(name, 2), _component(name, 3)) if g]
        self.locations["referrer.family_name"] = referring.loc(2, 1, 1)
        self.locations["referrer.given_names"] = referring.loc(2, 1, 2)
        self.locations["referrer.organization"] = Location("MSH", 1, 4)
        contact = self._telecom(referring, 5, "referrer.contact")
        if contact:
            referrer["contact"] = contact
        spec = self.spec["licence"]
        for i, _ in enumerate(referring.repetitions(7)):
            comps = referring.components(7, i)
            if _component(comps, 2) in spec["identifier_types"] and (
                not _component(comps, 3) or _component(comps, 3) in spec["issuers"]
            ):
                referrer["licence_number"] = _component(comps, 1)
                self.locations["referrer.licence_number"] = referring.loc(7, i + 1, 1)
                break
        else:
            self.problems.append(
                Problem(
                    "101",
                    "PRD-7 needs the referring provider's CPSBC licence (PI-2 "
                    + " or ".join(spec["identifier_types"])
                    + ")",
                    referring.loc(7),
                )
            )
        return referrer

    # ------------------------------------------------------------------ the rest

    def _rest(self, segments: list[_Seg], payload: dict[str, Any]) -> None:
        conditions: list[dict[str, Any]] = []
        allergies: list[dict[str, Any]] = []
        observations: list[dict[str, Any]] = []
        flags: list[dict[str, Any]] = []
        notes: list[str] = []
        last: _Seg | None = None
        last_observation: dict[str, Any] | None = None
        for seg in segments:
            if seg.id == "DG1":
                item = self._coded(seg, 3, f"conditions[{len(conditions)}]", fallback_text=4)
                if item is not None:
                    recorded = self._when(seg.value(5), seg.loc(5))
                    if recorded:
                        item["recorded"] = recorded
                    conditions.append(item)
            elif seg.id == "AL1":
                item = self._coded(seg, 3, f"allergies[{len(allergies)}]")
                if item is not None:
                    category = self.spec["allergen_type"].get(seg.value(2))
                    if category:
                        item["category"] = category
                    allergies.append(item)
            elif seg.id == "OBX":
                last_observation = self._obx(seg, payload, flags, observations)
            elif seg.id == "PV1":
                self._pv1(seg, payload)
            elif seg.id == "NTE":
                text = "\n".join(seg.value(3, 1, i) for i in range(len(seg.repetitions(3)))).strip()
                if text:
                    if last is not None and last.id == "OBX" and last_observation is not None:
                        last_observation.setdefault("notes", []).append(text)
                        continue
                    self.locations[f"notes[{len(notes)}]"] = seg.loc(3)
                    notes.append(text)
                continue  # an NTE does not end the segment it annotates
            last = seg
            if seg.id != "OBX":
                last_observation = None
        payload.update(
            conditions=conditions,
            allergies=allergies,
            observations=observations,
            flags=flags,
            notes=notes,
        )

    def _obx(
        self,
        seg: _Seg,
        payload: dict[str, Any],
        flags: list[dict[str, Any]],
        observations: list[dict[str, Any]],
    ) -> dict[str, Any] | None:
        code = seg.components(3)
        system_name = _component(code, 3)
        if system_name == "99KAT":
            self._fact(seg, _component(code, 1), payload, flags)
            return None
        where = f"observations[{len(observations)}]"
        item = self._coded(seg, 3, where)
        if item is None:
            return None
        sub_id = seg.value(4)
        if sub_id:
            item["key"] = f"{item['key']}|{sub_id}"[:200]
        status = seg.value(11)
        if not status:
            self.problems.append(Problem("101", "OBX-11 (result status) is required", seg.loc(11)))
        elif status in self.spec["result_status"]:
            item["status"] = self.spec["result_status"][status]
        else:
            self._table(seg.loc(11), status, "0085", "F, C, A, P or R")
        self.locations[f"{where}.status"] = seg.loc(11)
        value_type = seg.value(2)
        types = self.spec["value_types"]
        values = seg.repetitions(5)
        self.locations[f"{where}.value_quantity"] = seg.loc(5)
        self.locations[f"{where}.value_string"] = seg.loc(5)
        self.locations[f"{where}.value_coded"] = seg.loc(5)
        self.locations[f"{where}.value_date_time"] = seg.loc(5)
        if len(values) > 1:
            self.problems.append(Problem("102", "one value per OBX is taken", seg.loc(5, 2)))
        elif not values:
            pass  # a result without a value (e.g. status X) is the code and status alone
        elif value_type in types["quantity"]:
            text = seg.value(5)
            try:
                number = float(text)
            except ValueError:
                self.problems.append(Problem("102", "OBX-5 is not a number (OBX-2 NM)", seg.loc(5)))
            else:
                item["value_quantity"] = self._quantity(seg, number)
        elif value_type in types["string"]:
            item["value_string"] = "\n".join(seg.value(5, 1, i) for i in range(len(values))).strip()
        elif value_type in types["coded"]:
            coded = self._coded(seg, 5, f"{where}.value_coded")
            if coded is not None:
                item["value_coded"] = coded
        elif value_type in types["datetime"]:
            when = self._datetime(seg.value(5), seg.loc(5), needs_time=True)
            if when:
                item["value_date_time"] = when
        else:
            self.problems.append(
                Problem(
                    "102",
                    f"OBX-2 value type {safe_code(value_type)} is not taken here",
                    seg.loc(2),
                )
            )
        effective = self._when(seg.value(14), seg.loc(14))
        if effective:
            item["effective"] = effective
        observations.append(item)
        return item

    def _fact(
        self, seg: _Seg, code: str, payload: dict[str, Any], flags: list[dict[str, Any]]
    ) -> None:
        """A 99KAT OBX: a referral fact the referrer states, yes or no (as the native flags)."""
        answer = seg.value(5)
        status = seg.value(11)
        if status not in ("F", "C"):
            self.problems.append(
                Problem("103", "a referral fact is final (OBX-11 F or C)", seg.loc(11))
            )
        value = self.spec["yes_no"].get(answer)
        if value is None:
            self.problems.append(
                Problem("103", "a referral fact is answered Y or N (table 0136)", seg.loc(5))
            )
            return
        if code == PRIOR_FAILURE:
            if "prior_treatment_failure" in payload:
                self.problems.append(
                    Problem("100", "prior-treatment-failure is given twice", seg.loc(3))
                )
            payload["prior_treatment_failure"] = value
            self.locations["prior_treatment_failure"] = seg.loc(5)
            return
        self.locations[f"flags[{len(flags)}].code"] = seg.loc(3, 1, 1)
        self.locations[f"flags[{len(flags)}]"] = seg.loc(5)
        flags.append({"code": code, "value": value})

    def _pv1(self, seg: _Seg, payload: dict[str, Any]) -> None:
        patient_class = seg.value(2)
        if not patient_class or patient_class in self.spec["patient_class_none"]:
            return
        mapped = self.spec["patient_class"].get(patient_class)
        if mapped is None:
            self._table(seg.loc(2), patient_class, "0004", "E, I, O, P, N or U")
            return
        encounter: dict[str, Any] = {"patient_class": dict(mapped)}
        self.locations["encounter"] = seg.loc(2)
        visit = seg.components(19)
        if _component(visit, 1):
            authority = seg.subcomponents(19, 0, 4)
            encounter["identifier"] = _drop_empty(
                {
                    "value": _component(visit, 1),
                    "type": _component(visit, 5),
                    "assigner": _component(authority, 1),
                    "system": _universal(_component(authority, 2), _component(authority, 3)),
                }
            )
            self.locations["encounter.identifier"] = seg.loc(19)
        start = self._when(seg.value(44), seg.loc(44))
        if start:
            encounter["start"] = start
        payload["encounter"] = encounter

    # ------------------------------------------------------------------ datatypes

    def _coded(
        self, seg: _Seg, n: int, where: str, fallback_text: int | None = None
    ) -> dict[str, Any] | None:
        """A CE/CWE: both triplets as codings (a system only for a coding-system name the
        rules know), the text, and a key naming it in ids."""
        comps = seg.components(n)
        systems = self.spec["coding_systems"]
        codings = []
        for offset in (0, 3):
            code = _component(comps, 1 + offset)
            if not code:
                continue
            display = _component(comps, 2 + offset)
            name = _component(comps, 3 + offset)
            coding = {"code": code, "display": display, "system": systems.get(name, "")}
            codings.append(_drop_empty(coding) | {"_name": name})
        text = _component(comps, 2) or (seg.value(fallback_text) if fallback_text else "")
        if not codings and not text:
            self.problems.append(Problem("101", f"{seg.id}-{n} needs a code or a text", seg.loc(n)))
            return None
        first = codings[0] if codings else None
        key = f"{first['_name']}|{first['code']}" if first else f"text|{text}"
        self.locations[where] = seg.loc(n)
        for i in range(len(codings)):
            self.locations[f"{where}.codings[{i}]"] = seg.loc(n, 1, 1 + 3 * i)
        return _drop_empty(
            {
                "key": key[:200],
                "codings": [{k: v for k, v in c.items() if k != "_name"} for c in codings],
                "text": text,
            }
        )

    def _quantity(self, seg: _Seg, number: float) -> dict[str, Any]:
        units = seg.components(6)
        system = self.spec["coding_systems"].get(_component(units, 3), "")
        quantity: dict[str, Any] = {"value": number}
        unit = _component(units, 2) or _component(units, 1)
        if unit:
            quantity["unit"] = unit
        if system and _component(units, 1):
            quantity["system"] = system
            quantity["code"] = _component(units, 1)
        return quantity

    def _telecom(self, seg: _Seg, n: int, where: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for i, _ in enumerate(seg.repetitions(n)):
            comps = seg.components(n, i)
            email = _component(comps, 4)
            if email and (_component(comps, 2) == "NET" or _component(comps, 3) == "Internet"):
                if "email" not in out:
                    out["email"] = email
                    self.locations[f"{where}.email"] = seg.loc(n, i + 1, 4)
                continue
            phone = _component(comps, 1)
            if not phone and _component(comps, 7):
                area = _component(comps, 6)
                phone = f"{area}-{_component(comps, 7)}" if area else _component(comps, 7)
                if _component(comps, 8):
                    phone += f" x{_component(comps, 8)}"
            if phone and "phone" not in out:
                out["phone"] = phone
                self.locations[f"{where}.phone"] = seg.loc(n, i + 1)
        return out

    def _when(self, text: str, where: Location) -> str | None:
        """A TS as a FHIR dateTime: the date alone when the message gives no time."""
        parsed = _TS.match(text) if text else None
        if parsed is not None and parsed["d"] and not parsed["h"]:
            return f"{parsed['y']}-{parsed['mo']}-{parsed['d']}"
        return self._datetime(text, where, needs_time=True)

    def _datetime(
        self,
        text: str,
        where: Location,
        *,
        required: bool = False,
        needs_time: bool = False,
    ) -> str | None:
        """A TS/DTM as an ISO date-time with offset: the message's own offset, else the
        sender's configured time zone; neither is a refusal (never a guessed offset). A value
        without a time is None where a time is needed (the caller falls back or leaves it)."""
        if not text:
            if required:
                self.problems.append(Problem("101", "a date and time is required", where))
            return None
        parsed = _TS.match(text)
        if parsed is None:
            self.problems.append(
                Problem("102", "not an HL7 date/time (YYYYMMDDHHMM[SS][+ZZZZ])", where)
            )
            return None
        if needs_time and not parsed["mi"]:
            if required:
                self.problems.append(
                    Problem("102", "a date and time to the minute is required", where)
                )
            return None
        try:
            naive = datetime(
                int(parsed["y"]),
                int(parsed["mo"] or 1),
                int(parsed["d"] or 1),
                int(parsed["h"] or 0),
                int(parsed["mi"] or 0),
                int(parsed["s"] or 0),
            )
        except ValueError:
            self.problems.append(Problem("102", "not a valid date/time", where))
            return None
        if parsed["tz"]:
            sign = 1 if parsed["tz"][0] == "+" else -1
            hours, minutes = int(parsed["tz"][1:3]), int(parsed["tz"][3:5])
            offset = timezone(sign * timedelta(hours=hours, minutes=minutes))
            return naive.replace(tzinfo=offset).isoformat()
        if self.tz is None:
            self.problems.append(
                Problem(
                    "102",
                    "a date/time without a UTC offset (+ZZZZ): send one, or configure this "
                    "sender's timezone",
                    where,
                )
            )
            return None
        return naive.replace(tzinfo=self.tz).isoformat()

    def _table(self, where: Location, value: str, table: str, expected: str) -> None:
        self.problems.append(
            Problem(
                "103",
                f"{safe_code(value)} is not a value of table {table} taken here ({expected})",
                where,
            )
        )


def _universal(universal_id: str, kind: str) -> str:
    """An HD/EI universal id as a URI: ``URI`` as is, ``ISO`` (an OID) as ``urn:oid:``."""
    if not universal_id:
        return ""
    if kind == "URI":
        return universal_id
    if kind == "ISO" and re.fullmatch(r"[0-2](\.(0|[1-9]\d*))+", universal_id):
        return f"urn:oid:{universal_id}"
    return ""


def _drop_empty(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v not in ("", None, [], {})}
