"""The referral Task state machine (``referral-task.yaml``): which status changes are allowed and
which need a reason."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fhir_kat.canonical import read_definition

FILE = Path(__file__).resolve().parents[2] / "mappings" / "workflow" / "referral-task.yaml"


@cache
def machine(path: Path = FILE) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(read_definition(path))
    return data


def allowed(current: str, new: str) -> bool:
    return new == current or new in machine()["transitions"].get(current, [])


def needs_reason(status: str) -> bool:
    return status in machine()["needs_reason"]


def business_status(code: str) -> dict[str, Any]:
    m = machine()
    entry = m["business_status"][code]
    return {
        "coding": [
            {"system": m["business_status_system"], "code": code, "display": entry["display"]}
        ],
        "text": entry["display"],
    }


def intake() -> dict[str, Any]:
    """The three-step intake (``referral-task.yaml``, ``intake``): steps in the paper's order
    with their roles and businessStatus codes, the completion and override codes."""
    data: dict[str, Any] = machine()["intake"]
    return data


def step_display(step: str) -> str:
    """``contraindication-check`` → "contraindication check (physician specialised in …)"."""
    role = intake()["steps"].get(step, {}).get("role")
    name = step.replace("-", " ")
    return f"{name} ({role})" if role else name


def referrer_may_set(current: str) -> list[str]:
    """The statuses a referrer may give its own referral from ``current`` (withdrawing it)."""
    return list(machine().get("referrer_may", {}).get(current, []))
