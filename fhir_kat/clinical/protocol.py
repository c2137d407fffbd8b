"""The program protocol (sessions, routes, weight-based dose ranges) as configuration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT = Path(__file__).resolve().parents[2] / "mappings" / "program" / "protocol.yaml"


@dataclass(frozen=True)
class DoseRange:
    min: float
    max: float


@dataclass(frozen=True)
class ProgramProtocol:
    version: int
    program_name: str
    program_org_system: str
    program_org_value: str
    session_routes: Mapping[int, tuple[str, ...]]
    dose_ranges: Mapping[str, DoseRange]


def load_protocol(path: Path | None = None) -> ProgramProtocol:
    source = path or DEFAULT
    data: dict[str, Any] = yaml.safe_load(source.read_text(encoding="utf-8"))
    problems = []
    ranges = {}
    for route, spec in (data.get("dose_ranges_mg_per_kg") or {}).items():
        low, high = float(spec["min"]), float(spec["max"])
        if not 0 < low <= high:
            problems.append(f"{source}: dose range for {route} must satisfy 0 < min <= max")
        ranges[route] = DoseRange(low, high)
    sessions = {int(k): tuple(v["routes"]) for k, v in (data.get("sessions") or {}).items()}
    if not sessions:
        problems.append(f"{source}: no sessions configured")
    if problems:
        raise ValueError("; ".join(problems))
    org = data["program"]["organization"]
    return ProgramProtocol(
        version=int(data["version"]),
        program_name=str(data["program"]["name"]),
        program_org_system=str(org["system"]),
        program_org_value=str(org["value"]),
        session_routes=sessions,
        dose_ranges=ranges,
    )
