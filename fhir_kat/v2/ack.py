"""Original-mode acknowledgements (HL7 v2 chapter 2): ``ACK`` with MSA and ERR.

Owns: the ACK's ER7 text in the version of the message it answers — from v2.5 one ERR per
problem (ERR-2 location, ERR-3 table 0357, ERR-4 severity, ERR-8 user message); in 2.3 and 2.4
one ERR whose repeating ERR-1 (ELD: segment^sequence^field^code) names each error (warnings
have no place there and are left out). Must not: decide the acknowledgement code (the service
does) or echo message content: problem texts are PHI-free by construction
(``fhir_kat.v2.referral``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from fhir_kat.v2.referral import Header, Location, Problem, rules

#: v2 table 0357 (HL7's R4 package, CodeSystem v2-0357), the codes this receiver sends.
ERROR_NAMES = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}
#: Who answers when the message did not say whom it addressed (MSH-5/6).
RECEIVER = ("FHIR_KAT",)
DEFAULT_VERSION = "2.5.1"


def build_ack(
    header: Header,
    code: str,
    problems: Sequence[Problem],
    *,
    now: datetime,
    control_id: str,
) -> str:
    """The ACK answering ``header``'s message with MSA-1 ``code`` (AA, AE or AR)."""
    version = header.version if header.version in rules()["versions"] else DEFAULT_VERSION
    structure = "" if version == "2.3" else "^ACK"
    event = header.event if header.event and header.event.isalnum() else ""
    msh = [
        "MSH",
        "^~\\&",
        _hd(header.receiving_application or RECEIVER),
        _hd(header.receiving_facility),
        _hd(header.sending_application),
        _hd(header.sending_facility),
        _timestamp(now),
        "",
        f"ACK^{_escape(event)}{structure}" if event else "ACK",
        _escape(control_id),
        _escape(header.processing_id or "P"),
        version,
    ]
    if header.charset:
        msh += ["", "", "", "", "", _escape(header.charset)]
    errors = [p for p in problems if p.severity != "W"]
    text = errors[0].text if errors else ""
    msa = ["MSA", code, _escape(header.control_id), _escape(text[:80])]
    segments = ["|".join(msh), "|".join(msa).rstrip("|")]
    if version in ("2.5", "2.5.1"):
        for problem in problems:
            segments.append(
                "|".join(
                    [
                        "ERR",
                        "",
                        _erl(problem.location),
                        f"{problem.code}^{ERROR_NAMES.get(problem.code, '')}^HL70357",
                        problem.severity,
                        "",
                        "",
                        "",
                        _escape(problem.text),
                    ]
                ).rstrip("|")
            )
    elif errors:
        segments.append("ERR|" + "~".join(_eld(p) for p in errors))
    return "\r".join(segments) + "\r"


def _erl(location: Location | None) -> str:
    if location is None:
        return ""
    parts = [
        location.segment,
        str(location.sequence),
        *(
            str(p) if p is not None else ""
            for p in (location.field, location.repetition, location.component)
        ),
    ]
    # A component without a repetition still needs the repetition slot (1 = the first).
    if location.component is not None and location.repetition is None:
        parts[3] = "1"
    return "^".join(parts).rstrip("^")


def _eld(problem: Problem) -> str:
    where = problem.location
    code = f"{problem.code}&{ERROR_NAMES.get(problem.code, '')}&HL70357"
    if where is None:
        return f"^^^{code}"
    field = str(where.field) if where.field is not None else ""
    return f"{where.segment}^{where.sequence}^{field}^{code}"


def _hd(components: Sequence[str]) -> str:
    return "^".join(_escape(c) for c in components).rstrip("^")


def _timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _escape(text: str) -> str:
    """HL7 escapes for the standard encoding characters this ACK declares (``|^~\\&``)."""
    out = text.replace("\\", "\\E\\")
    for char, escape in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, escape)
    return out.replace("\r", "\\.br\\").replace("\n", "\\.br\\")
