"""Artifact schemas (marshmallow, ``unknown=RAISE``), the program-local codes they carry, and the
JSON Schema of each kind.

Owns: the shape of each kind and ``validate_artifact`` — every schema problem, then every code
outside its ValueSet, as Issues, together with the part of the artifact that is valid (so the
mapping layer can report its own problems in the same answer). Must not: know FHIR output,
store, or echo submitted values in diagnostics (field paths, rules and code-shaped codes only).

Error paths (``Issue.expression``) are field paths into the artifact: dotted names, list indexes
in brackets, no root prefix — ``patient.phn``, ``diagnoses[1].code``,
``vital_signs_before.systolic_mmhg``, ``answers[0].answer``; ``$`` is the artifact itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, ClassVar

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from fhir_kat.clinical.protocol import ProgramProtocol, load_protocol
from fhir_kat.errors import Issue, Unprocessable, issue
from fhir_kat.terminology import BASE, UnmappedCode, canonical, load_terminology, safe_code
from fhir_kat.validation.strings import FORBIDDEN, FORBIDDEN_CHARACTERS, forbidden_message
from fhir_kat.validation.temporal import OFFSET_PATTERN, offset_fits

#: BC PHN issuers accepted on input; output always uses the Infoway naming system (DOMAIN.md).
PHN_SYSTEMS = (
    "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id",
    "http://hlth.gov.bc.ca/fhir/client/id-issuer/BC",
)
ONE_LINE = validate.Length(min=1, max=200)
FREE_TEXT = validate.Length(min=1, max=4000)
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

# ---------------------------------------------------------------------------- FHIR-safe values
# Every string of an artifact ends up in a FHIR string (or markdown, uri, code) element, and
# every date-time in a FHIR dateTime: what FHIR cannot hold is refused here, naming the field,
# rather than mapped into a resource a partner's validator rejects.

#: Characters no artifact string may hold: those no FHIR string may (``validation.strings``).
_FORBIDDEN = FORBIDDEN
#: The published JSON Schema of every string without a pattern of its own.
FHIR_STRING_PATTERN = "^[^" + FORBIDDEN_CHARACTERS[1:-1] + "]*$"
#: FHIR's dateTime allows offsets from -14:00 to +14:00 in whole minutes (R4 datatypes.html
#: #dateTime): the FHIR door's rule (``validation.temporal.offset_fits``), and the same rule
#: for the published JSON Schema (a ``date-time`` allows any offset up to 23:59).
DATE_TIME_OFFSET_PATTERN = OFFSET_PATTERN


def _fhir_string(value: Any) -> None:
    """Refuses a string FHIR cannot hold, naming the first offending code point (a control
    or space character, never part of a name or number a reader could recognise)."""
    if isinstance(value, str) and (found := _FORBIDDEN.search(value)):
        raise ValidationError(forbidden_message(found))


def _fhir_offset(value: Any) -> None:
    offset = value.utcoffset() if isinstance(value, datetime) else None
    if offset is not None and not offset_fits(offset):
        raise ValidationError(
            "has a UTC offset FHIR cannot hold: a dateTime's offset is -14:00 to +14:00, "
            "in whole minutes"
        )


def _guard(fld: fields.Field[Any]) -> None:
    """Adds the FHIR value rules to a bound field (and a list's items), once."""
    if isinstance(fld, fields.List):
        _guard(fld.inner)
        return
    rule = (
        _fhir_string
        if isinstance(fld, fields.String)
        else _fhir_offset
        if isinstance(fld, fields.DateTime)
        else None
    )
    if rule is not None and rule not in fld.validators:
        fld.validators.append(rule)


#: BC PHN check-digit weights for digits 2-9 (powers of 2 mod 11). Source: BC Ministry of
#: Health, Professional and Software Conformance Standards, Vol. 4B (client registry), as
#: implemented by python-stdnum ``stdnum.ca.bc_phn`` (2023). The first digit is always 9.
PHN_WEIGHTS = (2, 4, 8, 5, 10, 9, 7, 3)


def bc_phn_check_digit(first_nine: str) -> int | None:
    """The check digit of a PHN's first nine digits; None when no valid PHN starts with them
    (remainder 1 would need a check digit of 10)."""
    total = sum(int(d) * w for d, w in zip(first_nine[1:9], PHN_WEIGHTS, strict=True))
    digit = (11 - total % 11) % 11
    # Remainder 0 → check digit 0, as python-stdnum computes it. Another reading ("11 is
    # invalid") would reject those PHNs; accepting them only forgoes a check, never refuses a
    # PHN that one of the two readings considers valid.
    return None if digit == 10 else digit


def bc_phn_valid(value: str) -> bool:
    if len(value) != 10 or not value.isascii() or not value.isdigit() or value[0] != "9":
        return False
    return bc_phn_check_digit(value[:9]) == int(value[9])


class Phn(fields.String):
    """A BC Personal Health Number: 10 digits, first digit 9, Mod 11 check digit."""

    default_error_messages = {  # noqa: RUF012 (marshmallow's own class-level convention)
        "phn": "must be a BC PHN: 10 digits starting with 9, with a valid check digit"
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not bc_phn_valid(text):
            raise self.make_error("phn")
        return text


def local_code(value_set: str, **kwargs: Any) -> fields.String:
    """A program-local code: any string here; membership of ``value_set`` (a ValueSet in
    ``mappings/terminology/``) is checked by ``validate_artifact`` so the issue can name the
    ValueSet, and the JSON Schema lists the ValueSet's codes as its ``enum``."""
    return fields.String(validate=ONE_LINE, metadata={"value_set": value_set}, **kwargs)


class _Strict(Schema):
    """Unknown keys refused; every string and date-time held to what FHIR can carry (``_guard``:
    one place, so a new field cannot forget it)."""

    class Meta:
        unknown = RAISE

    def on_bind_field(self, field_name: str, field_obj: fields.Field[Any]) -> None:
        _guard(field_obj)


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
    phn = Phn(required=True)
    phn_system = fields.String(load_default=PHN_SYSTEMS[0], validate=validate.OneOf(PHN_SYSTEMS))
    birth_date = fields.Date(required=True)
    sex = local_code("kat-sex", required=True)
    contact = fields.Nested(ContactSchema)


class OrganizationSchema(_Strict):
    name = fields.String(required=True, validate=ONE_LINE)
    identifier = fields.Nested(IdentifierSchema, required=True)


class ReferrerSchema(PersonNameSchema):
    #: CPSBC licence number (system ca-bc-license-physician, DOMAIN.md)
    licence_number = fields.String(required=True, validate=validate.Regexp(r"^[A-Za-z0-9-]{2,20}$"))
    organization = fields.Nested(OrganizationSchema, required=True)
    fhir_endpoint = fields.Url(schemes={"https", "http"}, require_tld=False)
    contact = fields.Nested(ContactSchema)


class DiagnosisSchema(_Strict):
    code = local_code("kat-diagnosis", required=True)


class ContraindicationSchema(_Strict):
    code = local_code("kat-contraindication", required=True)


#: Code systems a referrer's other coded conditions may use, with the shape of their codes:
#: what triage's criterion ValueSets classify (mappings/terminology/criteria/).
CONDITION_SYSTEMS = {
    "http://snomed.info/sct": re.compile(r"^[1-9][0-9]{5,17}$"),
    "http://hl7.org/fhir/sid/icd-10": re.compile(r"^[A-Z][0-9]{2}(\.[0-9A-Z]{1,4})?$"),
    "http://hl7.org/fhir/sid/icd-10-ca": re.compile(r"^[A-Z][0-9]{2}(\.[0-9A-Z]{1,4})?$"),
}


class CodedConditionSchema(_Strict):
    """A condition from the referrer's problem list, coded as its EMR holds it."""

    system = fields.String(required=True, validate=validate.OneOf(sorted(CONDITION_SYSTEMS)))
    code = fields.String(required=True, validate=validate.Length(min=1, max=40))
    display = fields.String(validate=ONE_LINE)
    # HL7 condition-clinical and condition-ver-status codes (FHIR's own, not local codes).
    clinical_status = fields.String(
        load_default="active",
        validate=validate.OneOf(
            ["active", "recurrence", "relapse", "inactive", "remission", "resolved"]
        ),
    )
    verification_status = fields.String(
        load_default="confirmed",
        validate=validate.OneOf(["confirmed", "unconfirmed", "provisional", "differential"]),
    )

    @validates_schema(skip_on_field_errors=False)  # reads only valid fields
    def _code_shape(self, data: Mapping[str, Any], **_: Any) -> None:
        shape = CONDITION_SYSTEMS.get(data.get("system", ""))
        if shape is not None and "code" in data and not shape.match(data["code"]):
            raise ValidationError("is not a code of that system", "code")


class FlagSchema(_Strict):
    code = local_code("kat-referral-flag", required=True)
    value = fields.Boolean(required=True)


class ReferralSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    referral_identifier = fields.Nested(IdentifierSchema, required=True)
    authored_on = fields.AwareDateTime(required=True)
    patient = fields.Nested(PatientSchema, required=True)
    referrer = fields.Nested(ReferrerSchema, required=True)
    reason = fields.String(validate=FREE_TEXT)
    diagnoses = fields.List(fields.Nested(DiagnosisSchema), load_default=list)
    prior_treatment_failure = fields.Boolean(allow_none=True, load_default=None)
    contraindications = fields.List(fields.Nested(ContraindicationSchema), load_default=list)
    conditions = fields.List(fields.Nested(CodedConditionSchema), load_default=list)
    ketamine_hypersensitivity = fields.Boolean(allow_none=True, load_default=None)
    flags = fields.List(fields.Nested(FlagSchema), load_default=list)
    # FHIR request-priority codes (ServiceRequest.priority's required binding), not local codes.
    urgency = fields.String(
        load_default="routine", validate=validate.OneOf(["routine", "urgent", "asap", "stat"])
    )
    notes = fields.String(validate=FREE_TEXT)


class PractitionerSchema(PersonNameSchema):
    identifier = fields.Nested(IdentifierSchema, required=True)


class FindingSchema(_Strict):
    criterion = local_code("kat-eligibility-criterion", required=True)
    met = fields.Boolean(required=True)
    note = fields.String(validate=FREE_TEXT)


class ScreeningSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    referral_identifier = fields.Nested(IdentifierSchema, required=True)
    patient_phn = Phn(required=True)
    step = local_code("kat-intake-step", required=True)
    performer = fields.Nested(PractitionerSchema, required=True)
    date = fields.AwareDateTime(required=True)
    decision = local_code("kat-intake-decision", required=True)
    findings = fields.List(fields.Nested(FindingSchema), load_default=list)
    notes = fields.String(validate=FREE_TEXT)


class PeriodSchema(_Strict):
    start = fields.Date(required=True)
    end = fields.Date()

    @validates_schema(skip_on_field_errors=False)  # reads only valid fields
    def _ordered(self, data: Mapping[str, Any], **_: Any) -> None:
        if data.get("end") and data.get("start") and data["end"] < data["start"]:
            raise ValidationError("must not be before start", "end")


class AttachmentSchema(_Strict):
    json_schema_rules: ClassVar[dict[str, Any]] = {
        "oneOf": [{"required": ["url"]}, {"required": ["data_base64"]}]
    }

    content_type = fields.String(
        required=True, validate=validate.OneOf(["application/pdf", "image/png", "image/jpeg"])
    )
    title = fields.String(validate=ONE_LINE)
    url = fields.Url(schemes={"https", "http"}, require_tld=False)
    # FHIR base64Binary (HL7's JSON schema: groups of four base64 characters); any other text
    # would be stored as a non-conformant Attachment.data.
    data_base64 = fields.String(
        validate=[
            validate.Length(min=4, max=4_000_000),
            validate.Regexp(
                r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$",
                error="must be base64 (RFC 4648, groups of four characters)",
            ),
        ]
    )

    @validates_schema
    def _one_source(self, data: Mapping[str, Any], **_: Any) -> None:
        if ("url" in data) == ("data_base64" in data):
            raise ValidationError("give exactly one of url and data_base64", "url")


def _privacy_consent(kind: Any) -> bool:
    """Does this consent kind map to scope patient-privacy (a data-sharing consent)?"""
    try:
        scopes = load_terminology().translate("kat-consent-kind-to-scope", str(kind))
    except UnmappedCode:
        return False  # an unknown kind is reported on its own
    return any(c["code"] == "patient-privacy" for c in scopes)


class ConsentSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    # Required for every kind: R4's "a privacy consent needs a patient" never fires by itself.
    patient_phn = Phn(required=True)
    kind = local_code("kat-consent-kind", required=True)
    # FHIR consent-state-codes the program uses, not local codes.
    status = fields.String(
        load_default="active", validate=validate.OneOf(["active", "inactive", "rejected"])
    )
    signed_at = fields.AwareDateTime(required=True)
    period = fields.Nested(PeriodSchema)
    session_number = fields.Integer(validate=validate.Range(min=1, max=12))
    permitted_party = fields.Nested(OrganizationSchema)
    purposes = fields.List(local_code("kat-purpose-of-use"), load_default=list)
    form = fields.Nested(AttachmentSchema)

    @validates_schema
    def _party(self, data: Mapping[str, Any], **_: Any) -> None:
        if "kind" not in data:
            return
        sharing = _privacy_consent(data["kind"])
        if sharing and "session_number" in data:
            # A session is what a treatment consent is signed for; sharing has none.
            raise ValidationError(
                "only a treatment consent names the KaT session it was signed for",
                "session_number",
            )
        if sharing and "permitted_party" not in data:
            raise ValidationError(
                "a data-sharing consent names the permitted party", "permitted_party"
            )
        if sharing and not data.get("purposes"):
            raise ValidationError("a data-sharing consent names at least one purpose", "purposes")
        if not sharing and "permitted_party" in data:
            raise ValidationError("a treatment consent has no permitted party", "permitted_party")


class VitalsSchema(_Strict):
    json_schema_rules: ClassVar[dict[str, Any]] = {
        "dependentRequired": {
            "systolic_mmhg": ["diastolic_mmhg"],
            "diastolic_mmhg": ["systolic_mmhg"],
        }
    }

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
        if data.get("diastolic_mmhg", 0) > data.get("systolic_mmhg", 10_000):
            # Physiologically impossible: a transposed or mistyped reading, never a signal.
            raise ValidationError(
                "the diastolic is above the systolic: an entry error, correct the reading",
                "diastolic_mmhg",
            )


class AdverseEventSchema(_Strict):
    kind = local_code("kat-adverse-event", required=True)
    description = fields.String(validate=FREE_TEXT)
    serious = fields.Boolean(load_default=False)
    onset = fields.AwareDateTime()
    # R4 codes (AdverseEvent.severity and .outcome: required bindings), listed as ValueSets.
    severity = local_code("kat-ae-severity")
    outcome = local_code("kat-ae-outcome")


class OverrideSchema(_Strict):
    reason = fields.String(required=True, validate=FREE_TEXT)
    clinician = fields.Nested(PractitionerSchema, required=True)


class MedicationAdministrationSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    patient_phn = Phn(required=True)
    session_number = fields.Integer(required=True, validate=validate.Range(min=1, max=12))
    start = fields.AwareDateTime(required=True)
    end = fields.AwareDateTime()
    body_weight_kg = fields.Float(validate=validate.Range(min=25, max=300))
    dose_mg = fields.Float(
        required=True, validate=validate.Range(min=0, min_inclusive=False, max=1000)
    )
    route = local_code("kat-route", required=True)
    administered_by = fields.Nested(PractitionerSchema, required=True)
    vital_signs_before = fields.Nested(VitalsSchema)
    vital_signs_after = fields.Nested(VitalsSchema)
    adverse_events = fields.List(fields.Nested(AdverseEventSchema), load_default=list)
    dose_override = fields.Nested(OverrideSchema)
    #: A session off the protocol's schedule (a route the session does not allow, a session
    #: number the protocol has not), recorded with why and who was responsible.
    schedule_deviation = fields.Nested(OverrideSchema)

    @validates_schema(skip_on_field_errors=False)  # reads only valid fields
    def _times(self, data: Mapping[str, Any], **_: Any) -> None:
        if data.get("end") and data.get("start") and data["end"] < data["start"]:
            raise ValidationError("must not be before start", "end")


class AdverseEventReportSchema(_Strict):
    """An adverse event reported on its own — days after a session, or outside one."""

    source_id = fields.String(required=True, validate=ONE_LINE)
    patient_phn = Phn(required=True)
    #: The dosing session it followed: the medication-administrations artifact's source_id.
    session_source_id = fields.String(validate=ONE_LINE)
    kind = local_code("kat-adverse-event", required=True)
    description = fields.String(validate=FREE_TEXT)
    onset = fields.AwareDateTime()
    #: R4 adverse-event-seriousness: Serious, one of its criteria, or Non-serious.
    seriousness = local_code("kat-ae-seriousness", required=True)
    # R4 codes (AdverseEvent.severity and .outcome: required bindings), listed as ValueSets.
    severity = local_code("kat-ae-severity")
    outcome = local_code("kat-ae-outcome")
    reported_by = fields.Nested(PractitionerSchema, required=True)
    reported_at = fields.AwareDateTime(required=True)

    @validates_schema(skip_on_field_errors=False)  # reads only valid fields
    def _times(self, data: Mapping[str, Any], **_: Any) -> None:
        if data.get("onset") and data.get("reported_at") and data["onset"] > data["reported_at"]:
            raise ValidationError("must not be after reported_at", "onset")


class AnswerSchema(_Strict):
    item = fields.String(required=True, validate=ONE_LINE)
    # Any JSON here: the Questionnaire decides the type, so that a wrong one is refused naming
    # the item (``mapping.functions.questionnaire_issues``), not as a bare schema error. The
    # published schema names what the Questionnaires take: an answer code, or the total.
    answer = fields.Raw(
        required=True,
        metadata={
            "json_schema": {
                "type": ["string", "number"],
                "description": "the option's code; for the total item, the total as a number",
            }
        },
    )


class QuestionnaireResponseSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    patient_phn = Phn(required=True)
    # Keys of the shipped Questionnaires (mappings/questionnaires/), not terminology.
    instrument = fields.String(
        required=True, validate=validate.OneOf(["phq9", "gad7", "pcl5", "bipf"])
    )
    authored = fields.AwareDateTime(required=True)
    status = fields.String(
        load_default="completed", validate=validate.OneOf(["completed", "in-progress"])
    )
    answers = fields.List(fields.Nested(AnswerSchema), required=True)


class FlagActionSchema(_Strict):
    """``POST /api/v1/flags/<id>/$acknowledge`` and ``$resolve``: who, and a note."""

    by = fields.Nested(PractitionerSchema, required=True)
    note = fields.String(validate=FREE_TEXT)


def load_flag_action(payload: Any) -> dict[str, Any]:
    """The body of a Flag acknowledgement or resolution, or one Unprocessable naming every
    problem (field paths as for artifacts)."""
    if not isinstance(payload, dict):
        raise Unprocessable(issue("structure", "the body must be a JSON object", "$"))
    try:
        loaded: dict[str, Any] = FlagActionSchema().load(payload)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise Unprocessable(_issues(messages)) from None
    return loaded


SCHEMAS: dict[str, type[Schema]] = {
    "referrals": ReferralSchema,
    "screenings": ScreeningSchema,
    "consents": ConsentSchema,
    "medication-administrations": MedicationAdministrationSchema,
    "questionnaire-responses": QuestionnaireResponseSchema,
    "adverse-events": AdverseEventReportSchema,
}
#: The kinds, as they appear in URLs (``POST /api/v1/<kind>``).
KINDS: tuple[str, ...] = tuple(SCHEMAS)


# ---------------------------------------------------------------------------- HL7 v2 referrals
# The "v2" kind: a REF^I12/I13 message as ``fhir_kat.v2.referral`` reads it, mapped by
# ``mappings/v2/*.yaml``. Built by the MLLP receiver, never posted to /api/v1. It shares the
# native referral's fields where v2 says the same thing (so both map to the same ids), and
# carries coded data as sent (system + code): triage classifies it, or sends it to review.


#: A FHIR dateTime as v2 gives one: a date, or a date and time with offset.
FHIR_DATE_TIME = validate.Regexp(
    r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:\d{2}|Z))?$"
)


#: A system URI as v2 universal ids give them: a URL, or an OID / UUID URN.
SYSTEM_URI = validate.Regexp(r"^(https?://\S+|urn:oid:[0-2](\.\d+)+|urn:uuid:[0-9a-f-]{36})$")


class V2IdentifierSchema(_Strict):
    system = fields.String(required=True, validate=SYSTEM_URI)
    value = fields.String(required=True, validate=ONE_LINE)


class CodingSchema(_Strict):
    #: absent for a coding system the receiver does not know (triage never classifies it)
    system = fields.String(validate=SYSTEM_URI)
    code = fields.String(required=True, validate=ONE_LINE)
    display = fields.String(validate=FREE_TEXT)


class CodedSchema(_Strict):
    """A v2 CE/CWE: its codings in known systems, its text; ``key`` names it in ids."""

    key = fields.String(required=True, validate=ONE_LINE)
    codings = fields.List(fields.Nested(CodingSchema), load_default=list)
    text = fields.String(validate=FREE_TEXT)


class LooseIdentifierSchema(_Strict):
    """A v2 CX/EI kept as sent: a system only when the message gives a universal id."""

    system = fields.String(validate=SYSTEM_URI)
    value = fields.String(required=True, validate=ONE_LINE)
    type = fields.String(validate=validate.Length(min=1, max=20))
    assigner = fields.String(validate=ONE_LINE)


class V2PatientSchema(PatientSchema):
    other_identifiers = fields.List(fields.Nested(LooseIdentifierSchema), load_default=list)


class V2ReferrerSchema(ReferrerSchema):
    #: CTD of the referring provider: contact for this referral at the clinic
    role_contact = fields.Nested(ContactSchema)


class V2ConditionSchema(CodedSchema):
    recorded = fields.String(validate=FHIR_DATE_TIME)


class V2AllergySchema(CodedSchema):
    category = fields.String(validate=validate.OneOf(["food", "medication", "environment"]))


class QuantitySchema(_Strict):
    value = fields.Float(required=True, allow_nan=False)
    unit = fields.String(validate=ONE_LINE)
    system = fields.String(validate=SYSTEM_URI)
    code = fields.String(validate=ONE_LINE)


class V2ObservationSchema(CodedSchema):
    # FHIR observation-status codes the receiver maps v2 table 0085 onto
    status = fields.String(
        required=True,
        validate=validate.OneOf(["final", "corrected", "amended", "preliminary"]),
    )
    value_quantity = fields.Nested(QuantitySchema)
    value_string = fields.String(validate=FREE_TEXT)
    value_coded = fields.Nested(CodedSchema)
    value_date_time = fields.AwareDateTime()
    effective = fields.String(validate=FHIR_DATE_TIME)
    notes = fields.List(fields.String(validate=FREE_TEXT), load_default=list)


class EncounterClassSchema(_Strict):
    code = fields.String(required=True, validate=ONE_LINE)
    display = fields.String(validate=ONE_LINE)


class V2EncounterSchema(_Strict):
    patient_class = fields.Nested(EncounterClassSchema, required=True)
    identifier = fields.Nested(LooseIdentifierSchema)
    start = fields.String(validate=FHIR_DATE_TIME)


class V2ReferralSchema(_Strict):
    source_id = fields.String(required=True, validate=ONE_LINE)
    event = fields.String(required=True, validate=validate.OneOf(["I12", "I13"]))
    referral_identifier = fields.Nested(V2IdentifierSchema, required=True)
    other_referral_identifiers = fields.List(
        fields.Nested(LooseIdentifierSchema), load_default=list
    )
    authored_on = fields.AwareDateTime(required=True)
    patient = fields.Nested(V2PatientSchema, required=True)
    referrer = fields.Nested(V2ReferrerSchema, required=True)
    reason = fields.String(validate=FREE_TEXT)
    conditions = fields.List(fields.Nested(V2ConditionSchema), load_default=list)
    allergies = fields.List(fields.Nested(V2AllergySchema), load_default=list)
    prior_treatment_failure = fields.Boolean(allow_none=True, load_default=None)
    flags = fields.List(fields.Nested(FlagSchema), load_default=list)
    observations = fields.List(fields.Nested(V2ObservationSchema), load_default=list)
    encounter = fields.Nested(V2EncounterSchema)
    urgency = fields.String(
        load_default="routine", validate=validate.OneOf(["routine", "urgent", "asap", "stat"])
    )
    notes = fields.List(fields.String(validate=FREE_TEXT), load_default=list)


#: Every kind the mapping engine maps: the native five and those built by receivers.
MAPPED_SCHEMAS: dict[str, type[Schema]] = {**SCHEMAS, "v2": V2ReferralSchema}


# ---------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Validated:
    """An artifact after validation: ``data`` holds only the values that passed (a field with
    a problem is left out, a list item with a problem becomes None, so indexes keep their
    meaning); ``invalid`` names every field path with a problem (and each of its parents)."""

    data: dict[str, Any]
    issues: list[Issue] = field(default_factory=list)
    invalid: frozenset[str] = frozenset()


def validate_artifact(kind: str, payload: Any) -> Validated:
    """Schema problems first (marshmallow), then codes outside their ValueSets."""
    if not isinstance(payload, dict):
        return Validated({}, [issue("structure", "an artifact must be a JSON object", "$")])
    schema = _schema(kind)
    try:
        data: dict[str, Any] = schema.load(payload)
        problems: list[Issue] = []
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        problems = _issues(messages)
        valid = exc.valid_data if isinstance(exc.valid_data, dict) else {}
        data = _without_invalid(valid, payload, messages)
    problems += _code_issues(type(schema), data, "")
    invalid = {p for i in problems for e in i.expression for p in _parents(e)}
    return Validated(data, problems, frozenset(invalid))


@cache
def _schema(kind: str) -> Schema:
    """One instance per kind: loading keeps no state on the instance, and building one costs
    more than loading a typical artifact."""
    return MAPPED_SCHEMAS[kind]()


def load_artifact(kind: str, payload: Any) -> dict[str, Any]:
    """The validated artifact (dates parsed), or one Unprocessable listing every problem."""
    result = validate_artifact(kind, payload)
    if result.issues:
        raise Unprocessable(result.issues)
    return result.data


def _parents(path: str) -> list[str]:
    """``a.b[2].c`` → ``a``, ``a.b``, ``a.b[2]``, ``a.b[2].c``."""
    out, current = [], ""
    for token in re.findall(r"\[\d+\]|[^.\[\]]+", path):
        current = current + token if token.startswith("[") or not current else f"{current}.{token}"
        out.append(current)
    return out


def _without_invalid(valid: Any, raw: Any, messages: Mapping[Any, Any]) -> Any:
    if not isinstance(valid, dict):
        return valid
    out = dict(valid)
    for key, message in messages.items():
        if key == "_schema" or key not in out:
            continue
        if isinstance(message, list):
            del out[key]
        elif isinstance(out[key], list):
            raw_list = raw.get(key) if isinstance(raw, dict) else None
            if not isinstance(raw_list, list) or len(raw_list) != len(out[key]):
                del out[key]  # items were dropped: the indexes no longer line up
                continue
            items = list(out[key])
            for index, item_message in message.items():
                if isinstance(index, int) and 0 <= index < len(items):
                    items[index] = (
                        None
                        if isinstance(item_message, list)
                        else _without_invalid(items[index], raw_list[index], item_message)
                    )
            out[key] = items
        else:
            sub_raw = raw.get(key) if isinstance(raw, dict) else None
            out[key] = _without_invalid(out[key], sub_raw, message)
    return out


def _issues(messages: Any, path: str = "") -> list[Issue]:
    out: list[Issue] = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "_schema":
                out += _issues(value, path)
                continue
            if isinstance(key, int):
                sub = f"{path}[{key}]"
            else:
                # An unknown key is the sender's text: named only when it looks like a field.
                name = key if _FIELD_NAME.match(str(key)) else "<field>"
                sub = f"{path}.{name}" if path else name
            out += _issues(value, sub)
    elif isinstance(messages, list):
        for message in messages:
            if isinstance(message, str):
                if message == "Unknown field.":
                    out.append(issue("structure", "unknown field", path or "$"))
                    continue
                code = "required" if message == "Missing data for required field." else "value"
                # marshmallow's messages name the rule, never the value ("Not a valid date.")
                out.append(issue(code, message, path or "$"))
            else:
                out += _issues(message, path)
    return out


def _code_issues(schema_cls: type[Schema], data: Any, path: str) -> list[Issue]:
    """Every value of a ``local_code(...)`` field that is not in its ValueSet (``data`` holds
    only values that passed the schema, so nothing is reported twice)."""
    if not isinstance(data, Mapping):
        return []
    out: list[Issue] = []
    for name, fld in schema_cls._declared_fields.items():
        where = f"{path}.{name}" if path else name
        if name not in data:
            continue
        value = data[name]
        if isinstance(fld, fields.List):
            inner = fld.inner
            for i, item in enumerate(value or []):
                out += _field_code_issues(inner, item, f"{where}[{i}]")
        else:
            out += _field_code_issues(fld, value, where)
    return out


def _field_code_issues(fld: Any, value: Any, where: str) -> list[Issue]:
    if value is None:
        return []
    if isinstance(fld, fields.Nested):
        return _code_issues(type(fld.schema), value, where)
    value_set = fld.metadata.get("value_set")
    if not value_set or load_terminology().validate_code(value_set, None, str(value)):
        return []
    return [issue("code-invalid", _not_in_value_set(str(value), value_set), where)]


def _not_in_value_set(value: str, value_set: str) -> str:
    """Names the code, the ValueSet and the ConceptMaps that translate its codes."""
    url = canonical("ValueSet", value_set)
    maps = sorted(
        m.url for m in load_terminology().concept_maps.values() if m.source_value_set == url
    )
    via = f" (the source of ConceptMap {', '.join(maps)})" if maps else ""
    return f"code '{safe_code(value)}' is not in ValueSet {url}{via}"


# ---------------------------------------------------------------------------- JSON Schema

_SIMPLE: dict[type[fields.Field[Any]], dict[str, Any]] = {
    fields.String: {"type": "string"},
    fields.Integer: {"type": "integer"},
    fields.Float: {"type": "number"},
    fields.Boolean: {"type": "boolean"},
    fields.Date: {"type": "string", "format": "date"},
    fields.AwareDateTime: {"type": "string", "format": "date-time"},
    fields.Url: {"type": "string", "format": "uri"},
    fields.Email: {"type": "string", "format": "email"},
}


def _field_schema(fld: fields.Field[Any]) -> dict[str, Any]:
    if isinstance(fld, fields.Nested):
        return _object_schema(type(fld.schema))
    if isinstance(fld, fields.List):
        return {"type": "array", "items": _field_schema(fld.inner)}
    out: dict[str, Any] = dict(fld.metadata.get("json_schema", {}))
    for cls in type(fld).__mro__:
        if cls in _SIMPLE and not out:
            out = dict(_SIMPLE[cls])
            break
    if isinstance(fld, Phn):
        out["pattern"] = r"^9\d{9}$"
        out["description"] = "BC PHN (the Mod 11 check digit is verified on receipt)"
    if fld.metadata.get("value_set"):
        out["enum"] = load_terminology().value_set_codes(fld.metadata["value_set"])
        out["description"] = (
            f"a code of ValueSet {canonical('ValueSet', fld.metadata['value_set'])}"
        )
    for v in fld.validators:
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
    # What _guard adds to every bound field, said the way JSON Schema can.
    if isinstance(fld, fields.DateTime):
        out["pattern"] = DATE_TIME_OFFSET_PATTERN
        out["description"] = "ISO 8601 with seconds and a UTC offset from -14:00 to +14:00"
    elif out.get("type") == "string" and "pattern" not in out:
        out["pattern"] = FHIR_STRING_PATTERN
    if fld.allow_none and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _object_schema(schema_cls: type[Schema]) -> dict[str, Any]:
    declared = schema_cls._declared_fields
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: _field_schema(f) for name, f in declared.items()},
        "required": sorted(name for name, f in declared.items() if f.required),
        # Rules across fields the schema class states itself (oneOf, dependentRequired).
        **getattr(schema_cls, "json_schema_rules", {}),
    }


def json_schema(kind: str, protocol: ProgramProtocol | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a kind, derived from its marshmallow schema, with the
    rules of the shipped Questionnaires (each instrument's items and their answer codes) and of
    ``protocol`` (the program's session/route pairs; the shipped protocol by default). It is
    the contract for program systems; what it cannot say (a dose range against a body weight,
    an item answered twice, the required items of a completed response, a total that must be
    the service's own, a consent's party) is checked on receipt (docs/artifacts.md)."""
    body = _object_schema(SCHEMAS[kind])
    if kind == "questionnaire-responses":
        body["allOf"] = _instrument_rules()
    elif kind == "medication-administrations":
        body["allOf"] = [_schedule_rule(protocol or load_protocol())]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{BASE.removesuffix('/fhir')}/api/v1/schemas/{kind}.json",
        "title": f"fhir_kat {kind} artifact",
        **body,
    }


def _instrument_rules() -> list[dict[str, Any]]:
    """Per instrument (``if`` it is named, ``then``): each answer names one of its items that
    takes an answer, with one of that item's option codes (or, for the total, a number)."""
    # Imported here: the mapping layer imports this module (same layer, no cycle at load).
    from fhir_kat.instruments.definitions import load_catalogue
    from fhir_kat.instruments.scoring import takes_answers
    from fhir_kat.mapping.functions import INSTRUMENT_FILES, questionnaire

    catalogue = load_catalogue()
    rules = []
    for key in INSTRUMENT_FILES:
        answers = []
        for item in questionnaire(key)["item"]:
            if not takes_answers(item, catalogue.instruments[key]):
                continue
            answer: dict[str, Any]
            if item["type"] == "choice":
                answer = {"enum": [o["valueCoding"]["code"] for o in item["answerOption"]]}
            else:
                answer = {"type": "integer" if item["type"] == "integer" else "number"}
            answers.append({"properties": {"item": {"const": item["linkId"]}, "answer": answer}})
        rules.append(
            {
                "if": {"properties": {"instrument": {"const": key}}, "required": ["instrument"]},
                "then": {"properties": {"answers": {"items": {"anyOf": answers}}}},
            }
        )
    return rules


def _schedule_rule(protocol: ProgramProtocol) -> dict[str, Any]:
    """Unless a ``schedule_deviation`` or a ``dose_override`` records the departure
    (``clinical.dose``), the session number and route are one of the protocol's pairs
    (``mappings/program/protocol.yaml``: configuration, so it is read, never copied)."""
    return {
        "if": {
            "not": {
                "anyOf": [{"required": ["schedule_deviation"]}, {"required": ["dose_override"]}]
            }
        },
        "then": {
            "anyOf": [
                {
                    "properties": {
                        "session_number": {"const": number},
                        "route": {"enum": list(routes)},
                    }
                }
                for number, routes in sorted(protocol.session_routes.items())
            ]
        },
    }
