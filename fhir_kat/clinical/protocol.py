"""The program protocol — sessions, the route each session allows, dose limits per route — read
from ``mappings/program/protocol.yaml`` (or the file the settings name).

Owns: parsing and checking that file into an immutable ``ProgramProtocol``. Must not: hold a
default schedule or dose range in code (a program without a range configures none, and the dose
rules then ask for a clinician override), store, call HTTP, or read the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fhir_kat.canonical import read_definition
from fhir_kat.terminology import load_terminology

DEFAULT = Path(__file__).resolve().parents[2] / "mappings" / "program" / "protocol.yaml"
ROUTES_VALUE_SET = "kat-route"
_TOP = {"id", "version", "program", "weeks", "sessions", "dose_limits"}
_LIMIT_KEYS = {"mg_per_kg", "mg"}


@dataclass(frozen=True)
class DoseRange:
    min: float
    max: float
    unit: str  # "mg/kg" or "mg"

    def text(self) -> str:
        return f"{self.min:g}-{self.max:g} {self.unit}"


@dataclass(frozen=True)
class RouteLimits:
    """How doses on one route are checked. ``mg_per_kg`` → weight-based; neither → every dose
    needs a clinician override (no range configured)."""

    route: str
    mg_per_kg: DoseRange | None = None
    mg: DoseRange | None = None

    @property
    def weight_based(self) -> bool:
        return self.mg_per_kg is not None

    @property
    def configured(self) -> bool:
        return self.mg_per_kg is not None or self.mg is not None


@dataclass(frozen=True)
class SessionRule:
    number: int
    routes: tuple[str, ...]
    typical_week: int | None = None


@dataclass(frozen=True)
class ProgramProtocol:
    id: str
    version: str
    program_name: str
    program_org_system: str
    program_org_value: str
    weeks: int | None
    sessions: Mapping[int, SessionRule]
    dose_limits: Mapping[str, RouteLimits]

    @property
    def session_routes(self) -> dict[int, tuple[str, ...]]:
        return {n: s.routes for n, s in self.sessions.items()}

    @property
    def reference(self) -> str:
        """How mapped resources name the protocol version they were checked against."""
        return f"{self.id}#v{self.version}"


class ProtocolError(ValueError):
    """The protocol file is wrong: the service must not start with it."""


def load_protocol(path: Path | None = None) -> ProgramProtocol:
    """The protocol at ``path`` (default ``mappings/program/protocol.yaml``); every problem of
    the file in one ``ProtocolError``."""
    source = path or DEFAULT
    data = yaml.safe_load(read_definition(source))
    if not isinstance(data, dict):
        raise ProtocolError(f"{source}: not a YAML mapping")
    problems: list[str] = [f"unknown key '{k}'" for k in sorted(set(data) - _TOP)]
    for key in ("id", "version", "program", "sessions", "dose_limits"):
        if key not in data:
            problems.append(f"missing '{key}'")
    if problems:
        raise ProtocolError(f"{source}: " + "; ".join(problems))
    routes = set(load_terminology().value_set_codes(ROUTES_VALUE_SET))
    limits = _limits(data["dose_limits"], routes, problems)
    sessions = _sessions(data["sessions"], routes, limits, problems)
    program = data["program"]
    org = program.get("organization", {}) if isinstance(program, dict) else {}
    if not isinstance(program, dict) or not program.get("name") or not org.get("system"):
        problems.append("program needs a name and an organization {system, value}")
    if problems:
        raise ProtocolError(f"{source}: " + "; ".join(problems))
    return ProgramProtocol(
        id=str(data["id"]),
        version=str(data["version"]),
        program_name=str(program["name"]),
        program_org_system=str(org["system"]),
        program_org_value=str(org["value"]),
        weeks=int(data["weeks"]) if data.get("weeks") is not None else None,
        sessions=sessions,
        dose_limits=limits,
    )


def _range(spec: Any, unit: str, where: str, problems: list[str]) -> DoseRange | None:
    if not isinstance(spec, dict) or set(spec) != {"min", "max"}:
        problems.append(f"{where}: give exactly min and max")
        return None
    low, high = float(spec["min"]), float(spec["max"])
    if not 0 < low <= high:
        problems.append(f"{where}: must satisfy 0 < min <= max")
        return None
    return DoseRange(low, high, unit)


def _limits(raw: Any, routes: set[str], problems: list[str]) -> dict[str, RouteLimits]:
    out: dict[str, RouteLimits] = {}
    if not isinstance(raw, dict):
        problems.append("dose_limits: a mapping of route -> limits")
        return out
    for route, spec in raw.items():
        where = f"dose_limits.{route}"
        if route not in routes:
            problems.append(f"{where}: not a code of ValueSet {ROUTES_VALUE_SET}")
        spec = spec or {}
        unknown = set(spec) - _LIMIT_KEYS if isinstance(spec, dict) else {"?"}
        if unknown:
            problems.append(f"{where}: only mg_per_kg or mg")
            continue
        if len(spec) > 1:
            problems.append(f"{where}: mg_per_kg or mg, not both")
        out[route] = RouteLimits(
            route=route,
            mg_per_kg=_range(spec["mg_per_kg"], "mg/kg", where, problems)
            if "mg_per_kg" in spec
            else None,
            mg=_range(spec["mg"], "mg", where, problems) if "mg" in spec else None,
        )
    return out


def _sessions(
    raw: Any, routes: set[str], limits: Mapping[str, RouteLimits], problems: list[str]
) -> dict[int, SessionRule]:
    out: dict[int, SessionRule] = {}
    if not isinstance(raw, dict) or not raw:
        problems.append("sessions: at least one session")
        return out
    for number, spec in raw.items():
        where = f"sessions.{number}"
        allowed = tuple(spec.get("routes", ())) if isinstance(spec, dict) else ()
        if not allowed:
            problems.append(f"{where}: needs routes")
        for route in allowed:
            if route not in routes:
                problems.append(f"{where}: route '{route}' is not in ValueSet {ROUTES_VALUE_SET}")
            elif route not in limits:
                # "No range" must be written down (dose_limits: {route: {}}), never implied.
                problems.append(f"{where}: route '{route}' has no entry in dose_limits")
        week = spec.get("typical_week") if isinstance(spec, dict) else None
        out[int(number)] = SessionRule(int(number), allowed, int(week) if week else None)
    return out
