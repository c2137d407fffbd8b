"""The referral form as data: which artifact fields it shows, with which labels and widgets.

Constraints (required, pattern, lengths, formats, enumerations) are not repeated here: they come
from the artifact's JSON Schema (``fhir_kat.artifacts.json_schema``), so the form can never
drift from what ``POST /api/v1/referrals`` accepts. Code lists get their displays from our
CodeSystems (the enum's ValueSet is named in the schema's ``description``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fhir_kat.terminology import load_terminology

#: (legend, [(path, label, widget, hint)]); widget is one of text, textarea, names, date,
#: email, select, codes (checkboxes), bool3 (yes/no/unknown radios), flags, hidden (a value the
#: page derives from the signed-in clinic: no physician types a URI), clinic (hidden when the
#: signed-in caller belongs to a clinic, else asked).
REFERRAL_FORM: list[tuple[str, list[tuple[str, str, str, str]]]] = [
    (
        "Referral",
        [
            (
                "referral_identifier.value",
                "Your referral number",
                "text",
                "The number your clinic gives this referral: it names the referral on your "
                "referrals page.",
            ),
            ("referral_identifier.system", "", "hidden", ""),
            ("urgency", "Urgency", "select", ""),
            ("reason", "Reason for referral", "textarea", ""),
        ],
    ),
    (
        "Patient",
        [
            ("patient.family_name", "Family name", "text", ""),
            ("patient.given_names", "Given names", "names", "Separate several with spaces."),
            ("patient.phn", "Personal Health Number (PHN)", "text", "10 digits starting with 9."),
            ("patient.birth_date", "Date of birth", "date", ""),
            ("patient.sex", "Sex", "select", ""),
            ("patient.contact.phone", "Phone", "text", ""),
            ("patient.contact.email", "Email", "email", ""),
        ],
    ),
    (
        "Referring provider",
        [
            ("referrer.family_name", "Your family name", "text", ""),
            ("referrer.given_names", "Your given names", "names", ""),
            ("referrer.licence_number", "Licence number", "text", ""),
            ("referrer.organization.name", "Clinic name", "text", ""),
            ("referrer.organization.identifier.system", "", "hidden", ""),
            (
                "referrer.organization.identifier.value",
                "Clinic number",
                "clinic",
                "The clinic's number in the program's list of clinics.",
            ),
            ("referrer.contact.phone", "Your phone", "text", ""),
            ("referrer.contact.email", "Your email", "email", ""),
        ],
    ),
    (
        "Clinical information",
        [
            ("diagnoses", "Diagnoses", "codes", ""),
            ("prior_treatment_failure", "Prior treatment failed?", "bool3", ""),
            ("ketamine_hypersensitivity", "Known ketamine hypersensitivity?", "bool3", ""),
            ("contraindications", "Known contraindications", "codes", ""),
            ("flags", "Screening questions", "flags", ""),
            ("notes", "Notes", "textarea", ""),
        ],
    ),
]


#: FHIR request-priority codes (ServiceRequest.priority) in words a physician uses.
URGENCY_LABELS = {
    "routine": "Routine",
    "urgent": "Urgent",
    "asap": "As soon as possible",
    "stat": "Immediately (stat)",
}


@dataclass(frozen=True)
class Option:
    value: str
    label: str


@dataclass(frozen=True)
class Field:
    path: str
    label: str
    widget: str
    hint: str
    required: bool
    attrs: dict[str, str]
    options: tuple[Option, ...]

    @property
    def dom_id(self) -> str:
        return "f-" + self.path.replace(".", "-").replace("_", "-")


def _sub_schema(schema: dict[str, Any], path: str) -> tuple[dict[str, Any], bool]:
    """The property schema at ``path`` and whether every step down to it is required."""
    node, required = schema, True
    for step in path.split("."):
        required = required and step in node.get("required", [])
        node = node["properties"][step]
    return node, required


def _options(node: dict[str, Any]) -> tuple[Option, ...]:
    if node.get("type") == "array":
        node = node["items"]
        node = node.get("properties", {}).get("code", node)
    codes = node.get("enum", [])
    if set(codes) == set(URGENCY_LABELS):
        return tuple(Option(c, URGENCY_LABELS[c]) for c in URGENCY_LABELS)
    match = re.search(r"ValueSet/([\w-]+)", node.get("description", ""))
    terminology = load_terminology()
    out = []
    for code in codes:
        label = code
        if match:
            system = terminology.system_of(match.group(1), code)
            label = (terminology.display(system, code) if system else None) or code
        out.append(Option(code, label))
    return tuple(out)


def referral_fields(
    schema: dict[str, Any], *, clinic_known: bool = False
) -> list[tuple[str, list[Field]]]:
    """The form's sections; ``clinic_known``: the signed-in caller's clinic is known, so its
    number is not asked."""
    sections = []
    for legend, specs in REFERRAL_FORM:
        fields = []
        for path, label, spec_widget, hint in specs:
            widget = spec_widget
            if widget == "clinic":
                widget = "hidden" if clinic_known else "text"
            node, required = _sub_schema(schema, path)
            attrs: dict[str, str] = {}
            if "pattern" in node:
                attrs["pattern"] = node["pattern"].removeprefix("^").removesuffix("$")
            if "maxLength" in node:
                attrs["maxlength"] = str(node["maxLength"])
            if "minLength" in node and node["minLength"] > 1:
                attrs["minlength"] = str(node["minLength"])
            options = _options(node) if widget in ("select", "codes", "flags") else ()
            fields.append(Field(path, label, widget, hint, required, attrs, options))
        sections.append((legend, fields))
    return sections
