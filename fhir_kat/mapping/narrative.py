"""The generated narrative of each mapped resource (R4 dom-6: "A resource should have narrative
for robust management"), so that an EMR that shows only narrative shows something true.

Owns: ``narrative(resource)`` — a plain XHTML table of the resource's own elements, rendered
from the resource alone (nothing added, nothing inferred), valid under txt-1/txt-2
(``validation.narrative``: only ``div``, ``p``, ``b``, ``table``, ``tr``, ``th``, ``td``, text
escaped). Must not: render an element another step of the service changes after mapping (the
referral Task's workflow elements: ``WORKFLOW_OWNED``), since a narrative that is not refreshed
with them would stop being true; read the clock; or look anything up.
"""

from __future__ import annotations

from html import escape
from typing import Any

XHTML = "http://www.w3.org/1999/xhtml"
#: Elements never rendered: bookkeeping (id, meta, the narrative itself), and long or
#: machine-only content (base64 data, contained resources, extensions).
_SKIPPED = frozenset(
    ["resourceType", "id", "meta", "text", "contained", "extension", "modifierExtension", "data"]
)
#: Elements of a type that later steps change (``services.referrals``: triage, intake, the
#: first session and $end move the Task; ``keep_workflow_state`` keeps them on a re-send).
WORKFLOW_OWNED: dict[str, frozenset[str]] = {
    "Task": frozenset(
        ["status", "businessStatus", "statusReason", "output", "executionPeriod", "lastModified"]
    ),
}
#: Extensions a reader needs, rendered under a name (the others stay machine-only): a Flag's
#: priority (core R4 extension flag-priority; docs/safety.md, "Urgency").
NAMED_EXTENSIONS = {"http://hl7.org/fhir/StructureDefinition/flag-priority": "priority"}
_MAX_ROWS = 40
_MAX_TEXT = 300


def narrative(resource: dict[str, Any]) -> dict[str, str]:
    """``Resource.text``: status ``generated`` and a table of the resource's elements."""
    rtype = str(resource.get("resourceType", ""))
    owned = WORKFLOW_OWNED.get(rtype, frozenset())
    rows = []
    for name, value in resource.items():
        if name in _SKIPPED or name in owned:
            continue
        shown = _render(value)
        if shown:
            rows.append(f"<tr><th>{escape(_label(name))}</th><td>{escape(shown)}</td></tr>")
        if len(rows) >= _MAX_ROWS:
            break
    for ext in resource.get("extension") or []:
        label = NAMED_EXTENSIONS.get(ext.get("url", "")) if isinstance(ext, dict) else None
        value = _render(ext.get("valueCodeableConcept")) if label else ""
        if label and value and len(rows) < _MAX_ROWS:
            rows.append(f"<tr><th>{escape(label)}</th><td>{escape(value)}</td></tr>")
    table = f"<table>{''.join(rows)}</table>" if rows else ""
    div = f'<div xmlns="{XHTML}"><p><b>{escape(rtype)}</b></p>{table}</div>'
    return {"status": "generated", "div": div}


def _label(name: str) -> str:
    """``effectiveDateTime`` → ``effective date time``."""
    out = "".join(f" {c.lower()}" if c.isupper() else c for c in name).strip()
    return out or name


def _render(value: Any) -> str:
    text = _text(value)
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list):
        return "; ".join(t for t in (_text(v) for v in value) if t)
    if not isinstance(value, dict):
        return ""
    return _complex(value)


def _complex(value: dict[str, Any]) -> str:
    """A datatype as a reader says it: a concept by its text or displays, a reference by its
    display or target, a quantity with its unit, a name as written, a period as a range."""
    if "coding" in value or ("text" in value and len(value) == 1):
        if value.get("text"):
            return str(value["text"])
        return _text(value.get("coding", []))
    if "code" in value and "system" in value and "value" not in value:  # a Coding
        return str(value.get("display") or value["code"])
    if "reference" in value or ("display" in value and "identifier" not in value):
        return str(value.get("display") or value.get("reference", ""))
    if "value" in value and ("unit" in value or "code" in value):  # a Quantity
        return f"{value['value']} {value.get('unit') or value.get('code', '')}".strip()
    if "value" in value and "system" in value:  # an Identifier or a ContactPoint
        return f"{value['value']} ({value['system']})"
    if "family" in value or "given" in value:  # a HumanName
        return " ".join([*value.get("given", []), value.get("family", "")]).strip()
    if set(value) <= {"start", "end"}:  # a Period
        return f"{value.get('start', '…')} – {value.get('end', '…')}"
    parts = []
    for key, inner in value.items():
        if key in _SKIPPED:
            continue
        shown = _text(inner)
        if shown:
            parts.append(f"{_label(key)}: {shown}")
    return ", ".join(parts)
