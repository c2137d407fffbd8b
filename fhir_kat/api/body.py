"""Reading request bodies as FHIR JSON, within the configured limits (size, depth, Bundle
entries), and refusing what JSON allows but FHIR and the databases do not: NaN and Infinity,
numbers too long to be one, and strings holding a NUL or another control character (R4 strings
allow tab, CR and LF only; PostgreSQL cannot store NUL) or an unpaired surrogate (not Unicode
text: it cannot be stored or sent on). Each is a 400 naming where it is, never a 500."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

from flask import Request, current_app

from fhir_kat.errors import BadRequest, Issue, PayloadTooLarge, UnsupportedMediaType, issue

#: Longest number literal accepted: a FHIR decimal needs far fewer digits (R4 asks for 18).
MAX_NUMBER_CHARS = 64
#: Escapes that can decode to what ``bad_text`` refuses (``\u`` controls and surrogates,
#: ``\b``, ``\f``): only a body holding one is walked string by string.
_SUSPECT_ESCAPE = re.compile(rb"\\(?:u(?:00[01][0-9a-fA-F]|[dD][89a-fA-F][0-9a-fA-F]{2})|[bf])")
_BAD_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
MAX_ISSUES = 10


class _BadNumber(ValueError):
    pass


def bad_text(text: str) -> str | None:
    """What is wrong with ``text`` as FHIR text, or None: a NUL or other control character
    (tab, CR and LF are allowed) or an unpaired surrogate."""
    found = _BAD_CHARACTER.search(text)
    if found is None:
        return None
    code = ord(found.group())
    if code == 0:
        return "a NUL character"
    if code < 32:
        return f"control character U+{code:04X}"
    return f"an unpaired surrogate (U+{code:04X}), not Unicode text"


def _integer(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _BadNumber(f"a number with more than {MAX_NUMBER_CHARS} characters")
    return int(text)


def _number(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _BadNumber(f"a number with more than {MAX_NUMBER_CHARS} characters")
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber("a number too large to be a decimal")
    return value


def _constant(name: str) -> Any:
    raise _BadNumber(f"{name} (JSON has no NaN or Infinity)")


def text_issues(document: Any, root: str) -> list[Issue]:
    """One issue per string (or object key) of ``document`` that ``bad_text`` refuses."""
    problems = []
    for where, problem in _bad_strings(document, root):
        problems.append(issue("value", f"the body holds {problem}", where))
        if len(problems) >= MAX_ISSUES:
            break
    return problems


def _bad_strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    stack: list[tuple[Any, str]] = [(node, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if (problem := bad_text(value)) is not None:
                yield where, problem
        elif isinstance(value, dict):
            for key, child in value.items():
                if (problem := bad_text(key)) is not None:
                    yield where, f"{problem} in a property name"
                    continue
                stack.append((child, f"{where}.{key}"))
        elif isinstance(value, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(value))


JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
FHIR_JSON = "application/fhir+json; charset=utf-8"


def read_json(request: Request, *, text_checks: bool = True) -> Any:
    """The body as JSON within the limits. ``text_checks=False`` leaves the strings to a
    reader that holds every one of them to a stricter rule and names the field as its sender
    knows it (native artifacts: ``fhir_kat.artifacts``, 422 per field)."""
    mimetype = request.mimetype or ""
    if "xml" in mimetype:
        raise UnsupportedMediaType(
            issue("not-supported", "only FHIR JSON is supported; XML is not", "Content-Type")
        )
    if mimetype and mimetype not in JSON_TYPES:
        raise UnsupportedMediaType(
            issue("not-supported", "Content-Type must be application/fhir+json", "Content-Type")
        )
    limit: int = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(issue("too-costly", f"request body exceeds {limit} bytes"))
    raw = request.get_data(cache=False)
    if len(raw) > limit:
        raise PayloadTooLarge(issue("too-costly", f"request body exceeds {limit} bytes"))
    if not raw.strip():
        raise BadRequest(issue("required", "the request body is empty"))
    try:
        document = json.loads(
            raw, parse_int=_integer, parse_float=_number, parse_constant=_constant
        )
    except RecursionError:
        raise BadRequest(issue("structure", "JSON nesting is too deep")) from None
    except UnicodeDecodeError:
        raise BadRequest(issue("structure", "the body is not UTF-8")) from None
    except json.JSONDecodeError as exc:
        # Position only: the message of JSONDecodeError can quote the document.
        where = f" at line {exc.lineno} column {exc.colno}"
        raise BadRequest(issue("structure", f"the body is not valid JSON{where}")) from None
    except _BadNumber as exc:
        raise BadRequest(issue("value", f"the body holds {exc}")) from None
    max_depth: int = current_app.config["KAT_MAX_JSON_DEPTH"]
    if json_depth(document, max_depth) > max_depth:
        raise BadRequest(issue("structure", f"JSON nesting deeper than {max_depth} levels"))
    root = document.get("resourceType") if isinstance(document, dict) else None
    root = root if isinstance(root, str) and not bad_text(root) else "$"
    if text_checks and _SUSPECT_ESCAPE.search(raw) and (problems := text_issues(document, root)):
        raise BadRequest(problems)
    _check_bundle_size(document)
    return document


def _check_bundle_size(document: Any) -> None:
    """A Bundle (transaction, batch, message) holds at most ``max_bundle_entries`` entries:
    each is a write, a validation and index rows, all in one request."""
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        return
    entries = document.get("entry")
    limit: int = current_app.config["KAT_MAX_BUNDLE_ENTRIES"]
    if isinstance(entries, list) and len(entries) > limit:
        raise PayloadTooLarge(
            issue(
                "too-costly",
                f"a Bundle may hold at most {limit} entries; send it in parts",
                "Bundle.entry",
            )
        )


def json_depth(document: Any, stop_at: int) -> int:
    """Nesting depth of a parsed document, stopping early once it exceeds ``stop_at``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > stop_at:
                return deepest
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return deepest
