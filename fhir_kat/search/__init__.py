"""Search parameters as data: definitions, write-time index extraction and query parsing.

Owns: what each search parameter means (``parameters.yaml``), how index rows are pulled out of a
resource, and turning a query string into a ``SearchQuery``. Must not: touch SQL (``store`` turns a
``SearchQuery`` into one) or flask.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import cache
from importlib import resources
from typing import Any

import yaml

from fhir_kat.canonical import expand
from fhir_kat.errors import BadRequest, Issue, issue
from fhir_kat.validation.temporal import offset_fits

PARAM_TYPES = ("token", "reference", "date", "string", "uri", "number", "quantity")

#: Bumped when ``extract_index`` changes what it writes for unchanged parameter definitions;
#: with each type's definitions it makes the fingerprint the store compares at start-up to
#: rebuild stale index rows (``Store.create_schema``).
INDEX_FORMAT = 2

#: Internal parameters (``internal: true`` in parameters.yaml): indexed at write time for the
#: service's own queries, never searchable by clients nor listed in the CapabilityStatement.
#: The ``internal:`` prefix keeps them apart from any FHIR name (a query-string key
#: ``internal:x`` would parse as parameter ``internal`` with a modifier).
INTERNAL_PREFIX = "internal:"
#: ``Observation.effectiveDateTime`` alone: the standard ``date`` parameter also indexes
#: effectivePeriod and effectiveInstant, which the outcome measure does not count.
EFFECTIVE_DATETIME = "internal:effective-datetime"
#: ``Observation.valueInteger``: R4's ``value-quantity`` covers Quantity (and SampledData) only,
#: and the outcome measure also counts a total score sent as an integer.
VALUE_INTEGER = "internal:value-integer"


@dataclass(frozen=True)
class ParamDef:
    name: str
    type: str
    paths: tuple[tuple[str, ...], ...]
    targets: frozenset[str] = frozenset()
    internal: bool = False
    #: Canonical of our own SearchParameter, for the few parameters R4 does not define
    #: (``definition:`` in parameters.yaml); None = the official R4 one.
    definition: str | None = None


@cache
def all_params() -> dict[str, dict[str, ParamDef]]:
    """Every indexed parameter per resource type, internal ones included."""
    text = expand(resources.files("fhir_kat.search").joinpath("parameters.yaml").read_text("utf-8"))
    raw = yaml.safe_load(text)
    out: dict[str, dict[str, ParamDef]] = {}
    for rtype, params in raw.items():
        out[rtype] = {}
        for name, spec in params.items():
            if spec["type"] not in PARAM_TYPES:
                raise ValueError(f"{rtype}.{name}: unknown parameter type {spec['type']}")
            internal = bool(spec.get("internal", False))
            if internal != name.startswith(INTERNAL_PREFIX):
                raise ValueError(
                    f"{rtype}.{name}: internal parameters, and only they, are named "
                    f"{INTERNAL_PREFIX}…"
                )
            out[rtype][name] = ParamDef(
                name=name,
                type=spec["type"],
                paths=tuple(tuple(p.split(".")) for p in spec["path"]),
                targets=frozenset(spec.get("target", ())),
                internal=internal,
                definition=spec.get("definition"),
            )
    return out


@cache
def params_for(resource_type: str) -> dict[str, ParamDef]:
    """The parameters clients may search ``resource_type`` by (internal ones left out)."""
    return {n: p for n, p in all_params().get(resource_type, {}).items() if not p.internal}


def index_fingerprint(resource_type: str) -> str:
    """A digest of what ``extract_index`` writes for ``resource_type``: index rows written
    under another fingerprint are stale (a parameter added, a path changed)."""
    defs = [
        [p.name, p.type, [".".join(path) for path in p.paths], sorted(p.targets), p.internal]
        for p in sorted(all_params().get(resource_type, {}).values(), key=lambda p: p.name)
    ]
    text = json.dumps([INDEX_FORMAT, defs], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- index extraction


@dataclass
class IndexRows:
    tokens: list[tuple[str, str, str]] = field(default_factory=list)  # param, system, code
    references: list[tuple[str, str, str]] = field(default_factory=list)  # param, type, id
    dates: list[tuple[str, datetime, datetime]] = field(default_factory=list)  # param, low, high
    strings: list[tuple[str, str]] = field(default_factory=list)  # param, normalised value
    # param, value, unit system, unit code, human unit ("" for a plain number)
    numbers: list[tuple[str, float, str, str, str]] = field(default_factory=list)


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, path)
        return
    if not path:
        yield node
        return
    if not isinstance(node, dict):
        return
    head, rest = path[0], path[1:]
    if head.endswith("[x]"):
        stem = head[:-3]
        for key, value in node.items():
            if key.startswith(stem) and key[len(stem) : len(stem) + 1].isupper():
                yield from _walk(value, rest)
    elif head in node:
        yield from _walk(node[head], rest)


def split_reference(ref: str) -> tuple[str, str] | None:
    """``Patient/1``, ``http://x/fhir/Patient/1`` or ``Patient/1/_history/2`` -> (type, id)."""
    if not ref or ref.startswith(("#", "urn:")):
        return None
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-2][:1].isupper():
        return None
    return parts[-2], parts[-1]


def iter_references(node: Any, path: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Every ``Reference``-like object under ``node`` (not inside ``contained``), with its
    FHIRPath-style location (``<path>.subject.reference``)."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node, f"{path}.reference"
        for key, value in node.items():
            if key != "contained":
                yield from iter_references(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from iter_references(item, f"{path}[{i}]")


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def extract_index(resource: dict[str, Any]) -> IndexRows:
    rows = IndexRows()
    for param in all_params().get(resource["resourceType"], {}).values():
        for path in param.paths:
            for value in _walk(resource, path):
                _index_value(rows, param, value)
    return rows


def _index_value(rows: IndexRows, param: ParamDef, value: Any) -> None:
    name = param.name
    if param.type == "token":
        if isinstance(value, bool):
            rows.tokens.append((name, "", "true" if value else "false"))
        elif isinstance(value, str):
            rows.tokens.append((name, "", value))
        elif isinstance(value, dict):
            if "coding" in value or ("text" in value and "system" not in value):
                for coding in value.get("coding", []):
                    if coding.get("code"):
                        rows.tokens.append((name, coding.get("system", ""), coding["code"]))
            elif "value" in value and "code" not in value:  # Identifier
                rows.tokens.append((name, value.get("system", ""), str(value["value"])))
            elif value.get("code"):  # Coding
                rows.tokens.append((name, value.get("system", ""), value["code"]))
    elif param.type == "reference":
        ref = value.get("reference") if isinstance(value, dict) else value
        if isinstance(ref, str):
            target = split_reference(ref)
            if target and (not param.targets or target[0] in param.targets):
                rows.references.append((name, target[0], target[1]))
    elif param.type == "date":
        for low, high in _date_ranges(value):
            rows.dates.append((name, low, high))
    elif param.type == "string":
        if isinstance(value, str):
            rows.strings.append((name, _normalise(value)))
        elif isinstance(value, dict):  # HumanName / Address: every part is searchable
            for part in ("text", "family", "given", "prefix", "suffix", "line", "city"):
                got = value.get(part)
                for text in got if isinstance(got, list) else [got]:
                    if isinstance(text, str):
                        rows.strings.append((name, _normalise(text)))
    elif param.type == "uri" and isinstance(value, str):
        rows.strings.append((name, value))
    elif param.type == "number":
        number = _finite(value)
        if number is not None:
            rows.numbers.append((name, number, "", "", ""))
    elif param.type == "quantity" and isinstance(value, dict):
        # Quantity only: R4's value-quantity also names SampledData, which has no one value.
        # Units are indexed as sent (no UCUM canonicalisation).
        number = _finite(value.get("value"))
        if number is not None:
            rows.numbers.append(
                (
                    name,
                    number,
                    _text(value.get("system")),
                    _text(value.get("code")),
                    _text(value.get("unit")),
                )
            )


def _finite(value: Any) -> float | None:
    """A JSON number as a float (what the outcome measure computes with); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _date_ranges(value: Any) -> Iterable[tuple[datetime, datetime]]:
    if isinstance(value, str):
        parsed = parse_date_range(value)
        if parsed:
            yield parsed
    elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        start = parse_date_range(value["start"]) if "start" in value else None
        end = parse_date_range(value["end"]) if "end" in value else None
        yield (start[0] if start else datetime.min, end[1] if end else datetime.max)


_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


_INSTANT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.(\d+))?(?:Z|[+-]\d{2}:\d{2})")


def parse_date_range(text: str) -> tuple[datetime, datetime] | None:
    """A FHIR date/dateTime/instant as the inclusive UTC range its precision implies; None
    for what is not one (also a UTC offset beyond ±14:00, which R4's grammar cannot write).

    Values without a time zone are taken as UTC (the program runs in one jurisdiction and the
    service stores UTC); the returned datetimes are naive UTC so SQLite and PostgreSQL compare
    them the same way.
    """
    text = text.strip()
    instant = _INSTANT_RE.fullmatch(text)
    if instant is not None:
        # The common case (a full dateTime with seconds and a zone), five times faster through
        # the C parser; tests/test_search_dates.py checks it agrees with the general path.
        fraction = instant.group(1) or ""
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
        offset = moment.utcoffset()
        if offset is not None and not offset_fits(offset):
            return None  # R4 offsets stay within ±14:00 (validation.temporal)
        low = moment.replace(tzinfo=None) - offset if offset else moment.replace(tzinfo=None)
        step = timedelta(microseconds=10 ** max(0, 6 - len(fraction))) if fraction else _SECOND
        return low, low + step - _MICROSECOND
    return _parse_date_range(text)


_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)


def _parse_date_range(text: str) -> tuple[datetime, datetime] | None:
    match = _DATE_RE.match(text)
    if not match:
        return None
    g = match.groupdict()
    try:
        year = int(g["y"])
        if g["m"] is None:
            low = datetime(year, 1, 1)
            high = datetime(year + 1, 1, 1)
        elif g["d"] is None:
            month = int(g["m"])
            low = datetime(year, month, 1)
            high = datetime(year + month // 12, month % 12 + 1, 1)
        elif g["H"] is None:
            low = datetime(year, int(g["m"]), int(g["d"]))
            high = low + timedelta(days=1)
        else:
            fraction = g["f"] or ""
            micro = int((fraction + "000000")[:6]) if fraction else 0
            low = datetime(
                year, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), int(g["S"] or 0), micro
            )
            if fraction:
                step = timedelta(microseconds=10 ** max(0, 6 - len(fraction)))
            elif g["S"] is not None:
                step = timedelta(seconds=1)
            else:
                step = timedelta(minutes=1)
            high = low + step
            tz = g["tz"]
            if tz and tz != "Z":
                sign = 1 if tz[0] == "+" else -1
                offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])) * sign
                if not offset_fits(offset):
                    return None  # R4 offsets stay within ±14:00 (validation.temporal)
                low, high = low - offset, high - offset
    except ValueError:
        return None
    return low, high - timedelta(microseconds=1)


def utc_naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


# --------------------------------------------------------------------------- query parsing

RESULT_PARAMS = {
    "_count",
    "_sort",
    "_include",
    "_revinclude",
    "_summary",
    "_total",
    "_format",
    "_pretty",
    "_cursor",
}
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
#: Number and quantity prefixes supported (R4 also defines sa, eb and ap: refused with 400).
NUMBER_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le")
MODIFIERS = {
    "token": {"", "not", "missing"},
    "reference": {"", "missing"},
    "date": {"", "missing"},
    "string": {"", "exact", "contains", "missing"},
    "uri": {"", "missing"},
    "number": {"", "missing"},
    "quantity": {"", "missing"},
}


@dataclass(frozen=True)
class Criterion:
    """One AND-ed search criterion; ``values`` are OR-ed."""

    name: str  # parameter name, or "_id" / "_lastUpdated"
    type: str
    modifier: str
    values: tuple[Any, ...]
    raw: str  # the query-string pair, for the self link


@dataclass(frozen=True)
class Include:
    source_type: str
    param: str
    target_type: str | None
    reverse: bool
    raw: str


@dataclass(frozen=True)
class SearchQuery:
    resource_type: str
    criteria: tuple[Criterion, ...] = ()
    count: int = 50
    sort_desc: bool = False
    includes: tuple[Include, ...] = ()
    summary_count: bool = False
    cursor: int | None = None
    ignored: tuple[str, ...] = ()

    def self_params(self) -> list[tuple[str, str]]:
        """The parameters actually used, in canonical form (for Bundle.link[self])."""
        out: list[tuple[str, str]] = []
        for c in self.criteria:
            if not c.raw:
                continue  # added by the server (access rules), not by the client
            key, _, value = c.raw.partition("=")
            out.append((key, value))
        for inc in self.includes:
            key, _, value = inc.raw.partition("=")
            out.append((key, value))
        if self.sort_desc:
            out.append(("_sort", "-_lastUpdated"))
        if self.summary_count:
            out.append(("_summary", "count"))
        out.append(("_count", str(self.count)))
        return out


#: Most query parameters one search takes (also the most any request takes: api/inputs.py),
#: and most comma-separated values one parameter takes: a search past them is refused (400)
#: rather than sent to the database as a query too deep to plan (SQLite's expression depth).
MAX_PARAMETERS = 100
MAX_OR_VALUES = 100
#: ``_count`` and ``_cursor`` above this many digits cannot be rows of this store.
_MAX_DIGITS = 18
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def _split_values(text: str) -> list[str]:
    parts = re.split(r"(?<!\\),", text)
    return [p.replace("\\,", ",") for p in parts]


def parse_search(
    resource_type: str,
    pairs: Iterable[tuple[str, str]],
    *,
    strict: bool,
    default_count: int,
    max_count: int,
) -> SearchQuery:
    """Parse query-string pairs. Problems with known parameters are always 400; unknown
    parameters are 400 under ``Prefer: handling=strict`` and otherwise ignored (and left out of
    the self link), as the FHIR search page specifies."""
    defs = params_for(resource_type)
    criteria: list[Criterion] = []
    includes: list[Include] = []
    problems: list[Issue] = []
    ignored: list[str] = []
    count = default_count
    sort_desc = False
    summary_count = False
    cursor: int | None = None

    pairs = list(pairs)
    if len(pairs) > MAX_PARAMETERS:
        raise BadRequest(
            issue("too-costly", f"a search takes at most {MAX_PARAMETERS} parameters", "url")
        )
    for key, value in pairs:
        if _CONTROL.search(key) or _CONTROL.search(value):
            # NUL, other control characters, unpaired surrogates: never a value to search for.
            where = "a parameter name" if _CONTROL.search(key) else f'parameter "{key[:64]}"'
            problems.append(
                issue("value", f"{where} holds a control character or is not Unicode", "url")
            )
            continue
        name, _, modifier = key.partition(":")
        raw = f"{key}={value}"
        if value.count(",") >= MAX_OR_VALUES and len(_split_values(value)) > MAX_OR_VALUES:
            problems.append(
                issue("too-costly", f"{name} takes at most {MAX_OR_VALUES} values", key)
            )
            continue
        if name == "_count":
            if not (value.isascii() and value.isdigit()):
                problems.append(issue("value", "_count must be a non-negative integer", "_count"))
            else:
                count = max_count if len(value) > _MAX_DIGITS else min(int(value), max_count)
        elif name == "_sort":
            if value in ("_lastUpdated", "-_lastUpdated"):
                sort_desc = value.startswith("-")
            else:
                problems.append(
                    issue("not-supported", "only _sort=_lastUpdated or -_lastUpdated", "_sort")
                )
        elif name in ("_include", "_revinclude"):
            inc = _parse_include(value, reverse=name == "_revinclude", raw=raw)
            if isinstance(inc, Issue):
                problems.append(inc)
            elif not inc.reverse and inc.source_type != resource_type:
                problems.append(issue("value", f"{name} must start with {resource_type}", name))
            else:
                includes.append(inc)
        elif name == "_summary":
            if value == "count":
                summary_count = True
            elif value != "false":
                problems.append(issue("not-supported", "only _summary=count is supported", name))
        elif name == "_cursor":
            if not (value.isascii() and value.isdigit()) or len(value) > _MAX_DIGITS:
                problems.append(issue("value", "invalid paging cursor", "_cursor"))
            else:
                cursor = int(value)
        elif name in RESULT_PARAMS:
            continue  # _format, _pretty, _total: accepted, no effect on the result set
        elif name == "_id":
            criteria.append(Criterion("_id", "id", modifier, tuple(_split_values(value)), raw))
        elif name == "_lastUpdated":
            parsed = [_parse_date_value(v, key) for v in _split_values(value)]
            bad = [p for p in parsed if isinstance(p, Issue)]
            problems.extend(bad)
            if not bad:
                criteria.append(Criterion(name, "lastUpdated", modifier, tuple(parsed), raw))
        elif name in defs:
            param = defs[name]
            if modifier and modifier not in MODIFIERS[param.type]:
                if param.type == "reference" and modifier[:1].isupper():
                    pass  # reference type modifier, e.g. subject:Patient=123
                else:
                    problems.append(
                        issue("not-supported", f"modifier :{modifier} is not supported", key)
                    )
                    continue
            criterion = _parse_criterion(param, modifier, value, raw)
            if isinstance(criterion, Issue):
                problems.append(criterion)
            else:
                criteria.append(criterion)
        elif strict:
            problems.append(
                issue("not-supported", f"unknown search parameter {name} for {resource_type}", key)
            )
        else:
            ignored.append(key)
    if problems:
        raise BadRequest(problems)
    return SearchQuery(
        resource_type=resource_type,
        criteria=tuple(criteria),
        count=count,
        sort_desc=sort_desc,
        includes=tuple(includes),
        summary_count=summary_count,
        cursor=cursor,
        ignored=tuple(ignored),
    )


def _parse_include(value: str, *, reverse: bool, raw: str) -> Include | Issue:
    parts = value.split(":")
    key = "_revinclude" if reverse else "_include"
    if len(parts) not in (2, 3):
        return issue("value", f"{key} must be Type:parameter[:targetType]", key)
    source, param = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    definition = params_for(source).get(param)
    if definition is None or definition.type != "reference":
        return issue("not-supported", f"{key}={source}:{param} is not a supported reference", key)
    return Include(source, param, target, reverse, raw)


def _parse_date_value(value: str, key: str) -> tuple[str, datetime, datetime] | Issue:
    prefix = value[:2] if value[:2] in DATE_PREFIXES else "eq"
    text = value[2:] if value[:2] in DATE_PREFIXES else value
    parsed = parse_date_range(text)
    if parsed is None:
        return issue("value", f"{key}: not a FHIR date, dateTime or instant", key)
    return prefix, parsed[0], parsed[1]


def _parse_criterion(param: ParamDef, modifier: str, value: str, raw: str) -> Criterion | Issue:
    values = _split_values(value)
    if modifier == "missing":
        if value not in ("true", "false"):
            return issue("value", f"{param.name}:missing must be true or false", raw.split("=")[0])
        return Criterion(param.name, param.type, modifier, (value == "true",), raw)
    parsed: list[Any] = []
    for v in values:
        if param.type == "token":
            if "|" in v:
                system, _, code = v.partition("|")
                parsed.append((system if system else "", code, True))
            else:
                parsed.append((None, v, False))
        elif param.type == "reference":
            target = split_reference(v)
            if target is None:
                if "/" in v or not v:
                    return issue("value", f"{param.name}: not a reference", param.name)
                ttype = modifier if modifier[:1].isupper() else None
                parsed.append((ttype, v))
            else:
                parsed.append(target)
        elif param.type == "date":
            got = _parse_date_value(v, param.name)
            if isinstance(got, Issue):
                return got
            parsed.append(got)
        elif param.type == "string":
            parsed.append(v if modifier == "exact" else _normalise(v))
        elif param.type in ("number", "quantity"):
            got_number = _parse_number_value(v, param)
            if isinstance(got_number, Issue):
                return got_number
            parsed.append(got_number)
        else:
            parsed.append(v)
    return Criterion(param.name, param.type, modifier, tuple(parsed), raw)


@dataclass(frozen=True)
class NumberValue:
    """A number or quantity search value: ``prefix`` against ``number``, whose implicit range
    is [``low``, ``high``) (half a unit of its last digit either side: ``100`` → [99.5,
    100.5), ``100.00`` → [99.995, 100.005)); ``eq`` and ``ne`` use the range, the other
    prefixes the number itself (FHIR R4 search, "number"). ``system``/``code`` are a
    quantity's unit: ``system`` None matches any system, and then ``code`` the unit code or
    the human unit (``5.4||mg``); both None: any unit."""

    prefix: str
    number: float
    low: float
    high: float
    system: str | None = None
    code: str | None = None


def _parse_number_value(value: str, param: ParamDef) -> NumberValue | Issue:
    text, system, code = value, None, None
    if param.type == "quantity" and "|" in value:
        parts = value.split("|")
        if len(parts) != 3:
            return issue("value", f"{param.name}: expected [prefix]number|system|code", param.name)
        text, system, code = parts[0], parts[1] or None, parts[2] or None
    prefix = "eq"
    if text[:2].isalpha():
        prefix, text = text[:2], text[2:]
        if prefix in ("sa", "eb", "ap"):
            return issue(
                "not-supported",
                f"{param.name}: the prefixes supported are {', '.join(NUMBER_PREFIXES)}",
                param.name,
            )
        if prefix not in NUMBER_PREFIXES:
            return issue("value", f"{param.name}: not a number", param.name)
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        return issue("value", f"{param.name}: not a number", param.name)
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # a finite Decimal's exponent
    half = Decimal(5).scaleb(exponent - 1)
    return NumberValue(
        prefix, float(number), float(number - half), float(number + half), system, code
    )
