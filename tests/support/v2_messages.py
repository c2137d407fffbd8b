"""HL7 v2 referral messages for tests and benchmarks: a native referral artifact written as the
REF^I12 an EMR would send, and python-hl7's MLLP client to send it to a live listener.

The conversion is the one docs/integrators.md describes: diagnoses and contraindications as DG1
with their SNOMED CT codes (from the program's own ConceptMaps, as a GP's EMR would code them),
a ketamine hypersensitivity as AL1 (SNOMED CT 373464007), prior treatment failure and the
referral flags as OBX with the program's local coding system 99KAT, answered Y or N.
"""

from __future__ import annotations

import socket
from datetime import datetime
from typing import Any

import hl7
import hl7.client

from fhir_kat.terminology import load_terminology

START, END = b"\x0b", b"\x1c\r"
SEX = {"female": "F", "male": "M", "other": "O", "unknown": "U"}
PRIORITY = {"routine": "R", "asap": "A", "stat": "S", "urgent": "A"}


def ts(iso: str) -> str:
    """An ISO date-time with offset as an HL7 TS (YYYYMMDDHHMMSS+ZZZZ)."""
    when = datetime.fromisoformat(iso)
    return when.strftime("%Y%m%d%H%M%S%z")


def esc(text: str) -> str:
    out = text.replace("\\", "\\E\\")
    for char, escape in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, escape)
    return out


def snomed(concept_map: str, code: str) -> tuple[str, str]:
    coding = next(
        c
        for c in load_terminology().translate(concept_map, code)
        if c["system"] == "http://snomed.info/sct"
    )
    return coding["code"], coding.get("display", "")


def referral_message(
    native: dict[str, Any],
    control_id: str,
    *,
    version: str = "2.5.1",
    event: str = "I12",
    application: str = "OSCAR",
    facility: str = "CLINIC7",
    processing_id: str = "P",
) -> str:
    """``native`` (a referrals artifact) as REF^``event`` ER7 text, segments ended by CR."""
    ref = native["referral_identifier"]
    patient = native["patient"]
    referrer = native["referrer"]
    # MSH-9's third component (message structure) exists from v2.3.1 on.
    structure = f"REF^{event}" if version == "2.3" else f"REF^{event}^REF_I12"
    given = "^".join(esc(g) for g in patient.get("given_names", [])[:2])
    phone = patient.get("contact", {}).get("phone", "")
    segments = [
        f"MSH|^~\\&|{application}|{facility}|FHIR_KAT|KAT_PROGRAM|{ts(native['authored_on'])}||"
        f"{structure}|{control_id}|{processing_id}|{version}",
        # RF1-1 status, -2 priority, -3 type, -6 referral id, -7 effective date, -10 reason
        "RF1|P^Pending^HL70283|"
        f"{PRIORITY[native.get('urgency', 'routine')]}^^HL70280|Psy^Psychiatric^HL70281|||"
        f"{esc(ref['value'])}^^{esc(ref['system'])}^URI|{ts(native['authored_on'])}|||"
        + (f"O^{esc(native['reason'])}^HL70336" if native.get("reason") else ""),
        f"PRD|RP^Referring Provider^HL70286|{esc(referrer['family_name'])}^"
        + "^".join(esc(g) for g in referrer.get("given_names", [])[:2])
        + f"|||||{esc(referrer['licence_number'])}^MD^CPSBC",
        f"PID|1||{patient['phn']}^^^BC^JHN||{esc(patient['family_name'])}^{given}||"
        f"{patient['birth_date'].replace('-', '')}|{SEX[patient['sex']]}|||||"
        + (f"{esc(phone)}^PRN^PH" if phone else ""),
    ]
    dg1 = 0
    for diagnosis in native.get("diagnoses", []):
        dg1 += 1
        code, display = snomed("kat-diagnosis-to-snomed", diagnosis["code"])
        segments.append(f"DG1|{dg1}||{code}^{esc(display)}^SCT||||W")
    for contraindication in native.get("contraindications", []):
        dg1 += 1
        code, display = snomed("kat-contraindication-to-snomed", contraindication["code"])
        segments.append(f"DG1|{dg1}||{code}^{esc(display)}^SCT||||W")
    if native.get("ketamine_hypersensitivity"):
        segments.append("AL1|1|DA|373464007^Ketamine^SCT")
    facts = []
    if native.get("prior_treatment_failure") is not None:
        facts.append(("prior-treatment-failure", native["prior_treatment_failure"]))
    facts += [(f["code"], f["value"]) for f in native.get("flags", [])]
    for n, (code, value) in enumerate(facts, start=1):
        answer = "Y^Yes^HL70136" if value else "N^No^HL70136"
        segments.append(f"OBX|{n}|CE|{code}^^99KAT||{answer}||||||F")
    if native.get("notes"):
        segments.append(f"NTE|1||{esc(native['notes'])}")
    return "\r".join(segments) + "\r"


def send(port: int, message: str | bytes, *, timeout: float = 30.0) -> hl7.Message:
    """Send one message with python-hl7's MLLP client; the ACK, parsed."""
    return hl7.parse(send_raw(port, message, timeout=timeout).decode("utf-8"))


def send_raw(port: int, message: str | bytes, *, timeout: float = 30.0) -> bytes:
    """The ACK's bytes (framing removed). python-hl7's client reads once; a longer ACK is read
    to its end block here."""
    with hl7.client.MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(timeout)
        reply: bytes = client.send_message(message)
        while not reply.endswith(END):
            more = client.socket.recv(65536)
            if not more:
                break
            reply += more
    assert reply.startswith(START) and reply.endswith(END), reply[:80]
    return reply[1:-2]


def send_many(port: int, messages: list[str], *, timeout: float = 30.0) -> list[bytes]:
    """Several messages on one connection, each ACK read before the next is sent."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for message in messages:
            sock.sendall(START + message.encode("utf-8") + END)
            reply = b""
            while not reply.endswith(END):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("listener closed the connection")
                reply += chunk
            out.append(reply[1:-2])
    return out


def ack_code(ack: hl7.Message) -> str:
    return str(ack.segment("MSA")[1])


def errors(ack: hl7.Message) -> list[str]:
    """Each ERR segment as ER7 text (v2.5: one per problem)."""
    return [str(s) for s in ack if str(s[0]) == "ERR"]
