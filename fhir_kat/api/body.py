"""Reading request bodies as FHIR JSON, within the configured size and depth limits."""

from __future__ import annotations

import json
from typing import Any

from flask import Request, current_app

from fhir_kat.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, issue

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
FHIR_JSON = "application/fhir+json; charset=utf-8"


def read_json(request: Request) -> Any:
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
        document = json.loads(raw)
    except RecursionError:
        raise BadRequest(issue("structure", "JSON nesting is too deep")) from None
    except UnicodeDecodeError:
        raise BadRequest(issue("structure", "the body is not UTF-8")) from None
    except json.JSONDecodeError as exc:
        # Position only: the message of JSONDecodeError can quote the document.
        where = f" at line {exc.lineno} column {exc.colno}"
        raise BadRequest(issue("structure", f"the body is not valid JSON{where}")) from None
    max_depth: int = current_app.config["KAT_MAX_JSON_DEPTH"]
    if json_depth(document, max_depth) > max_depth:
        raise BadRequest(issue("structure", f"JSON nesting deeper than {max_depth} levels"))
    return document


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
