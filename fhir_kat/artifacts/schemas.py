"""Artifact schemas. Error paths are dotted field paths into the artifact with list indexes in
brackets (``patient.phn``, ``diagnoses[1].code``), the same convention the mapping layer uses."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from fhir_kat.errors import Issue, Unprocessable, issue
from fhir_kat.terminology import load_terminology

# Ten digits. The BC check-digit rule is not verified here, so it is not enforced (never guess).
PHN_RE = re.compile(r"^\d{10}$")
#: BC PHN issuers accepted on input; output always uses the Infoway naming system (DOMAIN.md).
PHN_SYSTEMS = (
    "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id",
    "http://hlth.gov.bc.ca/fhir/client/id-issuer/BC",
)
ONE_LINE = validate.Length(min=1, max=200)
FREE_TEXT = validate.Length(min=1, max=4000)


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class IdentifierSchema(_Strict):
    system = fields.Url(required=True, schemes={"http", "https", "urn"}, require_tld=False)
    value = fields.String(required=True, validate=ONE_LINE)


class PersonNameSchema(_Strict):
    family_name = fields.String(required=True, validate=ONE_LINE)
    given_names = fields.List(fields.String(validate=ONE_LINE), load_default=list)


class ContactSchema(_Strict):
    phone = fields.String(validate=validate.Length(min=3, max=40))
    email = fields.Email()


class PatientSchema(PersonNameSchema):
    phn = fields.String(
        required=True, validate=validate.Regexp(PHN_RE, error="must be a 10-digit BC PHN")
    )
    phn_system = fields.String(load_default=PHN_SYSTEMS[0], validate=validate.OneOf(PHN_SYSTEMS))
    birth_date = fields.Date(required=True)
    sex = fields.String(required=True)
    contact = fields.Nested(ContactSchema)


class OrganizationSchema(_Strict):
    name = fields.String(required=True, validate=ONE_LINE)
    identifier = fields.Nested(IdentifierSchema, required=True)


class ReferrerSchema(PersonNameSchema):
    licence_number = fields.String(required=True, validate=validate.Regexp(r"^[A-Za-z0-9-]{2,20}$"))
    organization = fields.Nested(OrganizationSchema, required=True)
    fhir_endpoint = fields.Url(schemes={"https", "http"}, require_tld=False)
    contact = fields.Nested(ContactSchema)


class CodeSchema(_Strict):
    code = fields.String(required=True, validate=ONE_LINE)


class FlagSchema(_Strict):
    #: a code of CodeSystem kat-intake: extreme-emotional-lability, recent-mood-medication-change,
    #: uncontrolled-hypertension, aneurysm
    code = fields.String(required=True, validate=ONE_LINE)
    value = fields.Boolean(required=True)


class ReferralSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    referral_identifier = fields.Nested(IdentifierSchema, required=True)
    authored_on = fields.AwareDateTime(required=True)
    patient = fields.Nested(PatientSchema, required=True)
    referrer = fields.Nested(ReferrerSchema, required=True)
    reason = fields.String(validate=FREE_TEXT)
    diagnoses = fields.List(fields.Nested(CodeSchema), load_default=list)
    prior_treatment_failure = fields.Boolean(allow_none=True, load_default=None)
    contraindications = fields.List(fields.Nested(CodeSchema), load_default=list)
    ketamine_hypersensitivity = fields.Boolean(allow_none=True, load_default=None)
    flags = fields.List(fields.Nested(FlagSchema), load_default=list)
    urgency = fields.String(
        load_default="routine", validate=validate.OneOf(["routine", "urgent", "asap", "stat"])
    )
    notes = fields.String(validate=FREE_TEXT)


class PractitionerSchema(PersonNameSchema):
    identifier = fields.Nested(IdentifierSchema, required=True)


class FindingSchema(_Strict):
    criterion = fields.String(required=True, validate=ONE_LINE)
    met = fields.Boolean(required=True)
    note = fields.String(validate=FREE_TEXT)


class ScreeningSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    referral_identifier = fields.Nested(IdentifierSchema, required=True)
    patient_phn = fields.String(
        required=True, validate=validate.Regexp(PHN_RE, error="must be a 10-digit BC PHN")
    )
    step = fields.String(
        required=True,
        validate=validate.OneOf(
            ["nurse-intake", "psychiatrist-clearance", "contraindication-check"]
        ),
    )
    performer = fields.Nested(PractitionerSchema, required=True)
    date = fields.AwareDateTime(required=True)
    decision = fields.String(
        required=True, validate=validate.OneOf(["cleared", "declined", "needs-review"])
    )
    findings = fields.List(fields.Nested(FindingSchema), load_default=list)
    notes = fields.String(validate=FREE_TEXT)


class PeriodSchema(_Strict):
    start = fields.Date(required=True)
    end = fields.Date()

    @validates_schema
    def _ordered(self, data: Mapping[str, Any], **_: Any) -> None:
        if data.get("end") and data["end"] < data["start"]:
            raise ValidationError("must not be before start", "end")


class AttachmentSchema(_Strict):
    content_type = fields.String(
        required=True, validate=validate.OneOf(["application/pdf", "image/png", "image/jpeg"])
    )
    title = fields.String(validate=ONE_LINE)
    url = fields.Url(schemes={"https", "http"}, require_tld=False)
    data_base64 = fields.String(validate=validate.Length(min=4, max=4_000_000))

    @validates_schema
    def _one_source(self, data: Mapping[str, Any], **_: Any) -> None:
        if ("url" in data) == ("data_base64" in data):
            raise ValidationError("give exactly one of url and data_base64", "url")


class ConsentSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    patient_phn = fields.String(
        required=True, validate=validate.Regexp(PHN_RE, error="must be a 10-digit BC PHN")
    )
    kind = fields.String(
        required=True,
        validate=validate.OneOf(["treatment", "share-health-authority", "share-referrer"]),
    )
    status = fields.String(
        load_default="active", validate=validate.OneOf(["active", "inactive", "rejected"])
    )
    signed_at = fields.AwareDateTime(required=True)
    period = fields.Nested(PeriodSchema)
    session_number = fields.Integer(validate=validate.Range(min=1, max=12))
    permitted_party = fields.Nested(OrganizationSchema)
    purposes = fields.List(
        fields.String(
            validate=validate.OneOf(load_terminology().value_set_codes("kat-purpose-of-use"))
        ),
        load_default=list,
    )
    form = fields.Nested(AttachmentSchema)

    @validates_schema
    def _party(self, data: Mapping[str, Any], **_: Any) -> None:
        sharing = data.get("kind", "").startswith("share-")
        if sharing and "permitted_party" not in data:
            raise ValidationError(
                "a data-sharing consent names the permitted party", "permitted_party"
            )
        if sharing and not data.get("purposes"):
            raise ValidationError("a data-sharing consent names at least one purpose", "purposes")
        if not sharing and "permitted_party" in data:
            raise ValidationError("a treatment consent has no permitted party", "permitted_party")


class VitalsSchema(_Strict):
    measured_at = fields.AwareDateTime(required=True)
    systolic_mmhg = fields.Integer(validate=validate.Range(min=40, max=300))
    diastolic_mmhg = fields.Integer(validate=validate.Range(min=20, max=200))
    heart_rate_per_min = fields.Integer(validate=validate.Range(min=20, max=250))
    spo2_percent = fields.Integer(validate=validate.Range(min=50, max=100))
    respiratory_rate_per_min = fields.Integer(validate=validate.Range(min=4, max=60))

    @validates_schema
    def _bp_pair(self, data: Mapping[str, Any], **_: Any) -> None:
        if ("systolic_mmhg" in data) != ("diastolic_mmhg" in data):
            raise ValidationError("systolic and diastolic come together", "systolic_mmhg")


class AdverseEventSchema(_Strict):
    kind = fields.String(required=True, validate=ONE_LINE)
    description = fields.String(validate=FREE_TEXT)
    serious = fields.Boolean(load_default=False)
    onset = fields.AwareDateTime()


class OverrideSchema(_Strict):
    reason = fields.String(required=True, validate=FREE_TEXT)
    clinician = fields.Nested(PractitionerSchema, required=True)


class MedicationAdministrationSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    patient_phn = fields.String(
        required=True, validate=validate.Regexp(PHN_RE, error="must be a 10-digit BC PHN")
    )
    session_number = fields.Integer(required=True, validate=validate.Range(min=1, max=12))
    start = fields.AwareDateTime(required=True)
    end = fields.AwareDateTime()
    body_weight_kg = fields.Float(validate=validate.Range(min=25, max=300))
    dose_mg = fields.Float(
        required=True, validate=validate.Range(min=0, min_inclusive=False, max=1000)
    )
    route = fields.String(required=True, validate=ONE_LINE)
    administered_by = fields.Nested(PractitionerSchema, required=True)
    vital_signs_before = fields.Nested(VitalsSchema)
    vital_signs_after = fields.Nested(VitalsSchema)
    adverse_events = fields.List(fields.Nested(AdverseEventSchema), load_default=list)
    dose_override = fields.Nested(OverrideSchema)

    @validates_schema
    def _times(self, data: Mapping[str, Any], **_: Any) -> None:
        if data.get("end") and data.get("start") and data["end"] < data["start"]:
            raise ValidationError("must not be before start", "end")


class AnswerSchema(_Strict):
    item = fields.String(required=True, validate=ONE_LINE)
    answer = fields.Raw(required=True)


class QuestionnaireResponseSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    patient_phn = fields.String(
        required=True, validate=validate.Regexp(PHN_RE, error="must be a 10-digit BC PHN")
    )
    instrument = fields.String(
        required=True, validate=validate.OneOf(["phq9", "gad7", "pcl5", "bipf"])
    )
    authored = fields.AwareDateTime(required=True)
    status = fields.String(
        load_default="completed", validate=validate.OneOf(["completed", "in-progress"])
    )
    answers = fields.List(fields.Nested(AnswerSchema), required=True)


SCHEMAS: dict[str, type[Schema]] = {
    "referrals": ReferralSchema,
    "screenings": ScreeningSchema,
    "consents": ConsentSchema,
    "medication-administrations": MedicationAdministrationSchema,
    "questionnaire-responses": QuestionnaireResponseSchema,
}
KINDS = tuple(SCHEMAS)


def load_artifact(kind: str, payload: Any) -> dict[str, Any]:
    """The validated artifact (dates parsed), or one Unprocessable listing every problem."""
    if not isinstance(payload, dict):
        raise Unprocessable(issue("structure", "an artifact must be a JSON object", "$"))
    try:
        loaded: dict[str, Any] = SCHEMAS[kind]().load(payload)
    except ValidationError as exc:
        raise Unprocessable(_issues(exc.messages)) from None
    return loaded


def _issues(messages: Any, path: str = "") -> list[Issue]:
    out: list[Issue] = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "_schema":
                out += _issues(value, path)
                continue
            sub = (
                f"{path}[{key}]"
                if isinstance(key, int)
                else (f"{path}.{key}" if path else str(key))
            )
            out += _issues(value, sub)
    elif isinstance(messages, list):
        for message in messages:
            if isinstance(message, str):
                code = (
                    "required"
                    if "required" in message.lower()
                    else ("structure" if message == "Unknown field." else "value")
                )
                # marshmallow's messages name the rule, not the value (e.g. "Not a valid date.")
                out.append(issue(code, message, path or "$"))
            else:
                out += _issues(message, path)
    return out


# ---------------------------------------------------------------------------- JSON Schema

_SIMPLE = {
    fields.String: {"type": "string"},
    fields.Integer: {"type": "integer"},
    fields.Float: {"type": "number"},
    fields.Boolean: {"type": "boolean"},
    fields.Date: {"type": "string", "format": "date"},
    fields.AwareDateTime: {"type": "string", "format": "date-time"},
    fields.Url: {"type": "string", "format": "uri"},
    fields.Email: {"type": "string", "format": "email"},
}


def _field_schema(field: fields.Field[Any]) -> dict[str, Any]:
    if isinstance(field, fields.Nested):
        nested = field.schema
        return _object_schema(type(nested))
    if isinstance(field, fields.List):
        return {"type": "array", "items": _field_schema(field.inner)}
    out: dict[str, Any] = {}
    for cls in type(field).__mro__:
        if cls in _SIMPLE:
            out = dict(_SIMPLE[cls])
            break
    for v in field.validators:
        if isinstance(v, validate.OneOf):
            out["enum"] = list(v.choices)
        elif isinstance(v, validate.Regexp):
            out["pattern"] = v.regex.pattern
        elif isinstance(v, validate.Length):
            if v.min is not None:
                out["minLength"] = v.min
            if v.max is not None:
                out["maxLength"] = v.max
        elif isinstance(v, validate.Range):
            if v.min is not None:
                out["minimum" if v.min_inclusive else "exclusiveMinimum"] = v.min
            if v.max is not None:
                out["maximum" if v.max_inclusive else "exclusiveMaximum"] = v.max
    if getattr(field, "allow_none", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _object_schema(schema_cls: type[Schema]) -> dict[str, Any]:
    declared = schema_cls._declared_fields
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: _field_schema(f) for name, f in declared.items()},
        "required": sorted(name for name, f in declared.items() if f.required),
    }


def json_schema(kind: str) -> dict[str, Any]:
    body = _object_schema(SCHEMAS[kind])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://fhir-kat.example.org/api/v1/schemas/{kind}.json",
        "title": f"fhir_kat {kind} artifact",
        **body,
    }
