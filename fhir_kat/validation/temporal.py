"""What a FHIR date, dateTime or instant may be, for every element of those types anywhere in a
resource — found by type from the R4B models' own element definitions (``fhir.resources``:
each field's annotation names ``Date``, ``DateTime`` or ``Instant``; complex elements, choice
elements, extensions, primitive extensions ``_x`` and contained resources are walked by their
model), so a new element or resource type needs nothing here.

The grammar is R4's (https://hl7.org/fhir/R4/datatypes.html, the regexes of ``date``,
``dateTime`` and ``instant``): a year of four digits (not 0000), optional month and day, and for
a time, seconds, optional fractions and a UTC offset from -14:00 to +14:00 in whole minutes.
Python's ``datetime`` takes offsets up to ±23:59, which is how such values slipped in where
the models are not run (a transaction, batch or message Bundle's own elements: its
``timestamp``, ``meta.lastUpdated``, ``entry.request.ifModifiedSince``, ``entry.response
.lastModified``). The native door holds its date-times to the same offset range
(``fhir_kat.artifacts.schemas``: ``MAX_OFFSET``).

Issues as ``validation.strings`` words them: one per element, code ``value`` (400: not valid
FHIR), naming the element's path and what the type takes, never the value (it may be PHI).

Must not: import anything of fhir_kat but errors.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from datetime import timedelta
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir_core import types as fhir_types

from fhir_kat.errors import Issue, issue

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH = r"(0[1-9]|1[0-2])"
_DAY = r"(0[1-9]|[1-2][0-9]|3[0-1])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_OFFSET = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
#: The largest UTC offset R4 allows (``_OFFSET``), for doors that parse a date-time first (the
#: native artifacts' schemas): whole minutes, at most this far from UTC either way.
MAX_OFFSET = timedelta(hours=14)
#: ``_OFFSET`` for published JSON Schemas: how a date-time value must end.
OFFSET_PATTERN = "(?:[Zz]|[+-](?:(?:0[0-9]|1[0-3]):[0-5][0-9]|14:00))$"


def offset_fits(offset: timedelta) -> bool:
    """Whether a parsed UTC offset is one R4's grammar can write."""
    return abs(offset) <= MAX_OFFSET and offset.seconds % 60 == 0 and not offset.microseconds


#: R4 datatypes.html, verbatim (``re.fullmatch``: the whole value, no trailing newline).
GRAMMAR: dict[str, re.Pattern[str]] = {
    "date": re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?"),
    "dateTime": re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_OFFSET})?)?)?"),
    "instant": re.compile(rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_OFFSET}"),
}
#: What each type takes, in the words of an issue.
TAKES = {
    "date": "YYYY, YYYY-MM or YYYY-MM-DD",
    "dateTime": "YYYY, YYYY-MM, YYYY-MM-DD, or YYYY-MM-DDThh:mm:ss[.fff] with a UTC offset "
    "(Z or from -14:00 to +14:00)",
    "instant": "YYYY-MM-DDThh:mm:ss[.fff] with a UTC offset (Z or from -14:00 to +14:00)",
}
_KINDS: dict[type, str] = {
    fhir_types.Date: "date",
    fhir_types.DateTime: "dateTime",
    fhir_types.Instant: "instant",
}
#: A field's JSON name -> (temporal kind, or the model of a complex element, or RESOURCE).
RESOURCE = "Resource"
Field = str | type


def temporal_issues(
    resource: Any, where: str, *, skip_entry_resources: bool = False
) -> list[Issue]:
    """One issue per date, dateTime or instant of ``resource`` (at any depth) that R4's
    grammar refuses. ``skip_entry_resources``: a Bundle's own elements only (its entries'
    resources are checked on their own, as each is written)."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return []
    model = _model(resource["resourceType"])
    if model is None:
        return []
    out: list[Issue] = []
    for path, kind, value in _walk(resource, model, where, skip_entry_resources):
        if not isinstance(value, str) or not GRAMMAR[kind].fullmatch(value):
            out.append(issue("value", f"{path} is not an R4 {kind}: it takes {TAKES[kind]}", path))
    return out


def _walk(
    node: dict[str, Any], model: type, path: str, skip_entry_resources: bool
) -> Iterator[tuple[str, str, Any]]:
    fields = _fields(model)
    for key, value in node.items():
        spec = fields.get(key)
        if spec is None or value is None:
            continue  # not an element (the models refuse it where they run)
        for item_path, item in _items(f"{path}.{key}", value):
            if isinstance(spec, str) and spec != RESOURCE:
                yield item_path, spec, item
            elif spec == RESOURCE:
                if skip_entry_resources and key == "resource":
                    continue
                if isinstance(item, dict) and isinstance(item.get("resourceType"), str):
                    inner = _model(item["resourceType"])
                    if inner is not None:
                        yield from _walk(item, inner, item_path, False)
            elif isinstance(item, dict) and isinstance(spec, type):
                yield from _walk(item, spec, item_path, skip_entry_resources)


def _items(path: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            if item is not None:
                yield f"{path}[{i}]", item
    else:
        yield path, value


@cache
def _model(resource_type: str) -> type | None:
    try:
        model: type = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError):
        return None
    return model


@cache
def _fields(model: type) -> dict[str, Field]:
    """The model's elements that are, or may hold, a date, dateTime or instant."""
    out: dict[str, Field] = {}
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        spec = _spec(info.annotation)
        if spec is not None:
            out[info.alias or name] = spec
    return out


def _spec(annotation: Any) -> Field | None:
    """What an annotation holds: a temporal kind, a complex element's model, RESOURCE."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        for meta in typing.get_args(annotation)[1:]:
            kind = _KINDS.get(type(meta))
            if kind is not None:
                return kind
        return None
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _spec(arg)
            if found is not None:
                return found
        return None
    get_klass = getattr(annotation, "get_model_klass", None)
    if get_klass is None:
        return None
    klass: type = get_klass()
    if klass.__name__ in ("Resource", "DomainResource"):
        return RESOURCE
    return klass
