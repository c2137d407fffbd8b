"""What a FHIR string may not hold, for every way data enters: native artifacts (their schemas,
``fhir_kat.artifacts.schemas``) and FHIR resources (``validation.resource``).

Characters no FHIR string may hold, as one regular-expression class (Python's ``re`` and
ECMA-262 read it alike, so the published JSON Schemas carry it as their ``pattern``):
- C0 controls but tab, LF and CR: R4 datatypes.html#string, "Strings SHALL NOT contain Unicode
  character points below 32, except for u0009 (horizontal tab), u0010 (carriage return) and
  u0013 (line feed)" (decimal 10 and 13 meant: U+000A and U+000D);
- DEL and the C1 controls (U+007F-U+009F): control codes, never text; XML 1.0 (the FHIR XML
  format) discourages them and NEL (U+0085) is whitespace to the schema below;
- whitespace other than space, tab, LF and CR (ECMA-262 ``\\s``: VT, FF, NBSP, U+1680,
  U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000, U+FEFF): HL7's R4 JSON schema types
  every string as ``^[ \\r\\n\\t\\S]+$``, so any other whitespace makes the resource
  non-conformant;
- lone surrogates (U+D800-U+DFFF, which JSON's ``\\u`` escapes can carry but UTF-8 cannot) and
  the non-characters U+FFFE and U+FFFF (not XML characters).
The narrative's XHTML (``text.div``) is not a FHIR string (HL7's schema gives it no pattern)
and is checked by ``validation.narrative``.
"""

from __future__ import annotations

import re
from typing import Any

from fhir_kat.errors import Issue, issue

FORBIDDEN_CHARACTERS = (
    "[\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u00a0\\u1680"
    "\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff\\ud800-\\udfff"
    "\\ufffe\\uffff]"
)
FORBIDDEN = re.compile(FORBIDDEN_CHARACTERS)


def forbidden_message(found: re.Match[str]) -> str:
    """Names the code point and its position, never the text around it (it may be PHI)."""
    return (
        f"holds character U+{ord(found.group()):04X} at position {found.start() + 1}: "
        "FHIR strings take no control characters and no whitespace but space, tab, "
        "line feed and carriage return"
    )


def string_issues(resource: Any, where: str) -> list[Issue]:
    """One issue per string of ``resource`` (at any depth) that FHIR cannot hold."""
    out: list[Issue] = []

    def walk(value: Any, path: str, key: str) -> None:
        if isinstance(value, str):
            found = FORBIDDEN.search(value)
            if found and not (key == "div" and path.endswith(".text.div")):
                out.append(issue("value", f"{path} {forbidden_message(found)}", path))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}", k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]", key)

    if isinstance(resource, dict):
        for k, v in resource.items():
            if k != "resourceType":
                walk(v, f"{where}.{k}", k)
    return out
