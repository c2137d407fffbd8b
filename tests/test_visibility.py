"""One visibility rule on every path (docs/security.md, "One visibility rule").

Two clinics each refer a participant; the health authority may see the first by consent, not
the second. For every way data or its existence leaves the service, a caller who may not see a
resource gets exactly what it gets for an id never stored — and the audit trail records the
refusal. Then what no client may do to grant itself access: forged consents and referrals,
referrals in another clinic's name, data about patients it never referred, workflow moves."""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.artifacts.schemas import bc_phn_check_digit
from fhir_kat.mapping.engine import deterministic_id
from fhir_kat.security.identity import PUBLIC_NAMESPACE
from tests.conftest import client_as
from tests.support.responses import response

FHIR = "application/fhir+json"
ORG_SYSTEM = "https://fhir-kat.example.org/fhir/sid/organization"
PURPOSES = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PHQ9_TOTAL = {"system": "http://loinc.org", "code": "44261-6"}
NEVER = "0b9e3c55-0000-4000-8000-000000000000"  # an id nothing has


def phn(seed: int) -> str:
    """A valid synthetic BC PHN (Mod 11 check digit)."""
    for n in range(seed, seed + 50):
        first = f"9{n:08d}"
        digit = bc_phn_check_digit(first)
        if digit is not None:
            return first + str(digit)
    raise AssertionError("no valid PHN near the seed")


PHN_A, PHN_B = phn(11111111), phn(22222222)
#: BC PHN (DOMAIN.md).
PHN_SYSTEM = "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id"


def fhir(c: FlaskClient, method: str, path: str, body: Any = None, **headers: str) -> Any:
    data = json.dumps(body) if body is not None else None
    return c.open(path, method=method, data=data, content_type=FHIR, headers=headers)


def native(c: FlaskClient, kind: str, body: dict[str, Any]) -> Any:
    return c.post(f"/api/v1/{kind}", data=json.dumps(body), content_type="application/json")


def example(kind: str) -> dict[str, Any]:
    with open(f"docs/examples/{kind}.json", encoding="utf-8") as fh:
        loaded: dict[str, Any] = json.load(fh)
    return loaded


def referral(clinic: str, number: str, phn_value: str, **patient: Any) -> dict[str, Any]:
    body = example("referrals")
    body["source_id"] = f"INTAKE-{clinic}-{number}"
    body["referral_identifier"] = {"system": f"https://emr.{clinic.lower()}.ca/r", "value": number}
    body["patient"] = body["patient"] | {"phn": phn_value} | patient
    body["referrer"] = copy.deepcopy(body["referrer"])
    body["referrer"]["organization"]["identifier"]["value"] = clinic
    body["referrer"]["licence_number"] = {"CLINIC-7": "99001", "CLINIC-8": "99002"}[clinic]
    return body


def consent_for(patient: str, organisation: str, **provision: Any) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "dateTime": "2026-01-01",
        "provision": {
            "type": "permit",
            "purpose": [{"system": PURPOSES, "code": "HOPERAT"}],
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": {"identifier": {"system": ORG_SYSTEM, "value": organisation}},
                }
            ],
            **provision,
        },
    }


def observation(patient: str, when: str = "2026-02-01", value: int = 12) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "survey",
                    }
                ]
            }
        ],
        "code": {"coding": [PHQ9_TOTAL]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "valueInteger": value,
    }


class World:
    """CLINIC-7 (``referrer``) referred A, CLINIC-8 (``other-referrer``) referred B; A's
    consent permits the health authority, B has none."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.staff = client_as(app, "staff")
        self.ha = client_as(app, "ha")
        self.referrer = client_as(app, "referrer")
        self.other = client_as(app, "other-referrer")
        self.admin = client_as(app, "admin")
        assert (
            native(self.referrer, "referrals", referral("CLINIC-7", "A1", PHN_A)).status_code == 201
        )
        assert native(self.other, "referrals", referral("CLINIC-8", "B1", PHN_B)).status_code == 201
        self.patient = {
            key: self.task(c)["for"]["reference"].split("/")[1]
            for key, c in (("A", self.referrer), ("B", self.other))
        }
        self.task_id = {
            key: self.task(c)["id"] for key, c in (("A", self.referrer), ("B", self.other))
        }
        r = fhir(self.staff, "POST", "/fhir/Consent", consent_for(self.patient["A"], "HA-ISLAND"))
        assert r.status_code == 201, r.get_json()
        self.obs = {}
        for key in ("A", "B"):
            r = fhir(self.staff, "POST", "/fhir/Observation", observation(self.patient[key]))
            assert r.status_code == 201
            self.obs[key] = r.get_json()["id"]
        members = [{"entity": {"reference": f"Patient/{p}"}} for p in self.patient.values()]
        group = {"resourceType": "Group", "id": "cohort", "type": "person", "actual": True}
        r = fhir(
            self.staff, "PUT", "/fhir/Group/cohort", group | {"member": members, "quantity": 2}
        )
        assert r.status_code == 201

    @staticmethod
    def task(c: FlaskClient) -> dict[str, Any]:
        bundle = c.get("/fhir/Task").get_json()
        assert bundle["total"] == 1, bundle
        found: dict[str, Any] = bundle["entry"][0]["resource"]
        return found


@pytest.fixture
def world(app: Flask) -> World:
    return World(app)


# ------------------------------------------------------------------ hidden == never stored


def _normalised(response: Any, hidden: str) -> tuple[int, Any]:
    """Status and body, with the hidden id and the never-stored id written alike and the
    per-answer Bundle id dropped."""
    text = response.get_data(as_text=True).replace(hidden, "X").replace(NEVER, "X")
    body = json.loads(text) if text else None
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        body.pop("id", None)
        for entry in body.get("entry", []):
            inner = entry.get("resource")
            if isinstance(inner, dict) and inner.get("resourceType") == "Bundle":
                inner.pop("id", None)
    return response.status_code, body


PATHS: dict[str, Callable[[FlaskClient, str, str], Any]] = {
    "read": lambda c, t, i: c.get(f"/fhir/{t}/{i}"),
    "vread": lambda c, t, i: c.get(f"/fhir/{t}/{i}/_history/1"),
    "history": lambda c, t, i: c.get(f"/fhir/{t}/{i}/_history"),
    "search by _id": lambda c, t, i: c.get(f"/fhir/{t}?_id={i}"),
    "count": lambda c, t, i: c.get(f"/fhir/{t}?_id={i}&_summary=count"),
    "POST _search": lambda c, t, i: c.post(f"/fhir/{t}/_search", data={"_id": i}),
    "transaction GET": lambda c, t, i: fhir(
        c,
        "POST",
        "/fhir",
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"request": {"method": "GET", "url": f"{t}/{i}"}}],
        },
    ),
    "batch GET": lambda c, t, i: fhir(
        c,
        "POST",
        "/fhir",
        {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"request": {"method": "GET", "url": f"{t}/{i}"}},
                {"request": {"method": "GET", "url": f"{t}?_id={i}"}},
            ],
        },
    ),
}

#: (caller, what it may not see) — a type it may read, an instance it may not.
HIDDEN = [
    ("ha", "Patient", "B"),
    ("referrer", "Patient", "B"),
    ("other-referrer", "Patient", "A"),
    ("ha", "Observation", "B"),
    ("referrer", "Task", "B"),
    ("other-referrer", "Task", "A"),
    ("other-referrer", "ServiceRequest", "A"),
]


def _hidden_id(world: World, rtype: str, key: str) -> str:
    if rtype == "Patient":
        return world.patient[key]
    if rtype == "Observation":
        return world.obs[key]
    task = world.staff.get(f"/fhir/Task/{world.task_id[key]}").get_json()
    if rtype == "Task":
        return str(task["id"])
    return str(task["focus"]["reference"].split("/")[1])


@pytest.mark.parametrize(("who", "rtype", "key"), HIDDEN, ids=[f"{h[0]}-{h[1]}" for h in HIDDEN])
def test_what_a_caller_may_not_see_answers_as_never_stored(
    world: World, who: str, rtype: str, key: str
) -> None:
    caller = client_as(world.app, who)
    hidden = _hidden_id(world, rtype, key)
    assert world.staff.get(f"/fhir/{rtype}/{hidden}").status_code == 200  # it is there
    for path, ask in PATHS.items():
        assert _normalised(ask(caller, rtype, hidden), hidden) == _normalised(
            ask(caller, rtype, NEVER), hidden
        ), path


def test_a_hidden_read_is_audited_as_a_denial(world: World) -> None:
    hidden = world.patient["B"]
    world.ha.get(f"/fhir/Patient/{hidden}")
    world.ha.get(f"/fhir/Patient/{NEVER}")
    events = world.admin.get("/fhir/AuditEvent?_count=500").get_json()["entry"]

    def outcome_for(rid: str) -> list[str]:
        return [
            e["resource"].get("outcomeDesc", "")
            for e in events
            if any(
                ent.get("what", {}).get("reference") == f"Patient/{rid}"
                for ent in e["resource"].get("entity", [])
            )
            and e["resource"]["subtype"][0]["code"] == "read"
        ]

    assert outcome_for(hidden) == ["denied: not visible to this client"]
    assert outcome_for(NEVER) == ["HTTP 404"]


def test_includes_and_revincludes_bring_nothing_hidden(world: World) -> None:
    a, b = world.patient["A"], world.patient["B"]
    # The cohort Group names both; the authority's include of its members brings A only.
    bundle = world.ha.get("/fhir/Group?_id=cohort&_include=Group:member").get_json()
    included = {e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "include"}
    assert included == {a}
    bundle = world.ha.get(
        f"/fhir/Patient?_id={a},{b}&_revinclude=Observation:subject&_count=50"
    ).get_json()
    patients = [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    subjects = {
        e["resource"]["subject"]["reference"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
    }
    assert patients == [a] and bundle["total"] == 1
    assert subjects == {f"Patient/{a}"}  # A's referral findings and score; nothing of B
    # The referrer includes nothing of the other clinic's referral through its own Task.
    bundle = world.referrer.get("/fhir/Task?_include=Task:focus&_revinclude=Task:focus").get_json()
    assert {e["resource"]["id"] for e in bundle["entry"]} <= {
        world.task_id["A"],
        world.staff.get(f"/fhir/Task/{world.task_id['A']}").get_json()["focus"]["reference"][15:],
    }


def test_a_cohort_group_lists_only_members_who_consented(world: World) -> None:
    seen = world.ha.get("/fhir/Group/cohort").get_json()
    assert [m["entity"]["reference"] for m in seen["member"]] == [f"Patient/{world.patient['A']}"]
    assert "quantity" not in seen
    assert {"code": "REDACTED"}.items() <= seen["meta"]["security"][-1].items()
    full = world.staff.get("/fhir/Group/cohort").get_json()
    assert len(full["member"]) == 2 and full["quantity"] == 2
    bundle = world.ha.get("/fhir/Group").get_json()
    assert bundle["entry"][0]["resource"]["member"] == seen["member"]


def test_small_cells_are_withheld_from_the_health_authority(world: World) -> None:
    # The measure counts program timelines and totals derived from program responses (issue
    # 17): both participants in a 12-week cohort, positive at baseline, responding after.
    members = [
        {
            "entity": {"reference": f"Patient/{p}"},
            "period": {"start": "2026-03-02", "end": "2026-05-25"},
        }
        for p in world.patient.values()
    ]
    group = {"resourceType": "Group", "id": "cohort", "type": "person", "actual": True}
    r = fhir(world.staff, "PUT", "/fhir/Group/cohort", group | {"member": members, "quantity": 2})
    assert r.status_code == 200, r.get_json()
    for p in world.patient.values():
        for when, total in (("2026-02-20", 15), ("2026-05-30", 5)):
            r = fhir(
                world.staff,
                "POST",
                "/fhir/QuestionnaireResponse",
                response("phq9", p, when, total=total),
            )
            assert r.status_code == 201, r.get_json()
    query = (
        "/fhir/Measure/kat-program-outcomes/$evaluate-measure?periodStart=2026-01-01"
        "&periodEnd=2026-12-31&subject=Group/cohort"
    )
    staff = world.staff.get(query).get_json()
    ha = world.ha.get(query).get_json()
    for report, masked in ((staff, False), (ha, True)):
        phq9 = next(g for g in report["group"] if g["code"]["coding"][0]["code"] == "44249-1")
        initial = phq9["population"][0]
        assert ("count" not in initial) is masked, report
        if masked:
            assert initial["extension"][0]["valueCode"] == "masked"
    assert world.ha.get(query.replace("Group/cohort", "Group/nope")).status_code == 404


# ------------------------------------------------------------------ conditional create


def test_conditional_create_matches_only_what_the_caller_may_see(world: World) -> None:
    # CLINIC-8 names CLINIC-7's referral identifier: for it, no such Task exists.
    task_a = world.staff.get(f"/fhir/Task/{world.task_id['A']}").get_json()
    ident = task_a["identifier"][0]
    own_role = world.task(world.other)["requester"]
    probe = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "identifier": [ident],
        "requester": own_role,
    }
    criteria = f"identifier={ident['system']}|{ident['value']}"
    r = fhir(world.other, "POST", "/fhir/Task", probe, **{"If-None-Exist": criteria})
    assert r.status_code == 201, r.get_json()  # created: nothing matched, nothing revealed
    assert r.get_json()["id"] != task_a["id"] and "for" not in r.get_json()
    # Its own re-send matches its own Task now; the other clinic's stays untouched.
    again = fhir(world.other, "POST", "/fhir/Task", probe, **{"If-None-Exist": criteria})
    assert again.status_code == 200 and again.get_json()["id"] == r.get_json()["id"]
    assert world.staff.get(f"/fhir/Task/{task_a['id']}").get_json() == task_a


def test_several_matches_are_never_counted(app: Flask) -> None:
    staff = client_as(app, "staff")
    for _ in range(3):
        fhir(staff, "POST", "/fhir/Patient", {"resourceType": "Patient", "gender": "other"})
    r = fhir(
        staff,
        "POST",
        "/fhir/Patient",
        {"resourceType": "Patient"},
        **{"If-None-Exist": "gender=other"},
    )
    assert r.status_code == 412
    assert not re.search(r"\d", r.get_json()["issue"][0]["diagnostics"])


def test_a_batch_honours_if_none_exist(app: Flask) -> None:
    staff = client_as(app, "staff")
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": "1"}]}
    entry = {
        "resource": patient,
        "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:t|1"},
    }
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry, copy.deepcopy(entry)]}
    r = fhir(staff, "POST", "/fhir", bundle)
    assert [e["response"]["status"] for e in r.get_json()["entry"]] == ["201 Created", "200 OK"]
    assert staff.get("/fhir/Patient?identifier=urn:t|1").get_json()["total"] == 1


def test_a_matched_conditional_create_is_audited_as_a_create(app: Flask) -> None:
    staff = client_as(app, "staff")
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": "2"}]}
    for _ in range(2):
        fhir(staff, "POST", "/fhir/Patient", body, **{"If-None-Exist": "identifier=urn:t|2"})
    events = client_as(app, "admin").get("/fhir/AuditEvent?_count=100").get_json()["entry"]
    subtypes = [
        e["resource"]["subtype"][0]["code"]
        for e in events
        if e["resource"]["type"]["code"] == "rest"
        and any(
            x.get("what", {}).get("reference", "").startswith("Patient/")
            for x in e["resource"].get("entity", [])
        )
    ]
    assert subtypes == ["create", "create"]


# ------------------------------------------------------------------ no self-granted access


def _sr_and_consent(
    world: World, patient: str, consent: dict[str, Any], program: bool
) -> dict[str, Any]:
    """A throw-away ServiceRequest for ``patient`` in CLINIC-8's name plus a Consent."""
    code = {
        "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-service",
        "code": "kat-program",
    }
    sr = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"coding": [code if program else {"system": "urn:x", "code": "other"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "requester": world.task(world.other)["requester"],
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": sr, "request": {"method": "POST", "url": "ServiceRequest"}},
            {"resource": consent, "request": {"method": "POST", "url": "Consent"}},
        ],
    }


def test_a_referrer_cannot_forge_consent(world: World) -> None:
    a = world.patient["A"]
    consents = world.staff.get("/fhir/Consent?_summary=count").get_json()["total"]
    requests = world.staff.get("/fhir/ServiceRequest?_summary=count").get_json()["total"]
    # A permit opening A to another party; a deny cutting the authority off; a permit for
    # itself hung on a ServiceRequest that is not a program referral (refused before the
    # Consent is looked at: a referrer's ServiceRequest must carry the program's service code,
    # issue 17 — 422 naming the code to send).
    deny_all = consent_for(a, "HA-ISLAND", type="deny")
    deny_all["provision"].pop("actor")
    for consent, program in (
        (consent_for(a, "HA-ISLAND"), True),
        (deny_all, True),
        (consent_for(a, "CLINIC-8"), False),
    ):
        r = fhir(world.other, "POST", "/fhir", _sr_and_consent(world, a, consent, program))
        assert r.status_code == (403 if program else 422), r.get_json()
        if not program:
            assert "kat-service|kat-program" in r.get_json()["issue"][0]["diagnostics"]
    assert world.staff.get("/fhir/Consent?_summary=count").get_json()["total"] == consents
    assert world.staff.get("/fhir/ServiceRequest?_summary=count").get_json()["total"] == requests
    assert world.ha.get(f"/fhir/Patient/{a}").status_code == 200  # A's real consent holds


def test_a_forged_task_output_opens_no_document(world: World) -> None:
    own = world.task(world.other)
    forged = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": own["code"],
        "for": own["for"],
        "requester": own["requester"],
        "output": [
            {
                "type": {"text": "x"},
                "valueReference": {"reference": "Composition/anything"},
            }
        ],
    }
    r = fhir(world.other, "POST", "/fhir/Task", forged)
    assert r.status_code == 403  # workflow elements are the program's


def test_workflow_moves_are_staff_decisions_on_every_route(world: World) -> None:
    task = world.task(world.referrer)
    hold = world.staff.get(f"/fhir/Task/{task['id']}").get_json()
    hold.pop("meta")
    forward = hold | {"status": "accepted" if hold["status"] != "accepted" else "in-progress"}
    forward.pop("statusReason", None)
    r = fhir(world.referrer, "PUT", f"/fhir/Task/{task['id']}", forward)
    assert r.status_code == 403, r.get_json()
    for kind in ("transaction", "batch"):
        bundle = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [
                {"resource": forward, "request": {"method": "PUT", "url": f"Task/{task['id']}"}}
            ],
        }
        r = fhir(world.referrer, "POST", "/fhir", bundle)
        status = (
            r.status_code
            if kind == "transaction"
            else int(r.get_json()["entry"][0]["response"]["status"][:3])
        )
        assert status == 403, (kind, r.get_json())
    # An intake step moves the referral: staff record it, never the referrer.
    step = {
        "resourceType": "Observation",
        "status": "final",
        "code": {
            "coding": [
                {
                    "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-intake",
                    "code": "nurse-intake",
                }
            ]
        },
        "subject": task["for"],
        "focus": [{"reference": f"Task/{task['id']}"}],
        "valueCodeableConcept": {
            "coding": [
                {
                    "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-intake",
                    "code": "cleared",
                }
            ]
        },
    }
    assert fhir(world.referrer, "POST", "/fhir/Observation", step).status_code == 403
    assert world.staff.get(f"/fhir/Task/{task['id']}").get_json()["status"] == hold["status"]
    # Withdrawing its own referral, with a reason, is the referrer's to do.
    withdraw = hold | {"status": "cancelled", "statusReason": {"text": "Patient moved away"}}
    r = fhir(world.referrer, "PUT", f"/fhir/Task/{task['id']}", withdraw)
    assert r.status_code == 200, r.get_json()


def test_a_referral_is_always_in_the_senders_own_name(world: World) -> None:
    before = world.staff.get("/fhir/ServiceRequest?_summary=count").get_json()["total"]
    r = native(world.referrer, "referrals", referral("CLINIC-8", "X1", phn(33333333)))
    assert r.status_code == 403
    assert r.get_json()["issue"][0]["expression"] == ["referrer.organization.identifier"]
    # Through FHIR: a ServiceRequest whose requester is the other clinic's PractitionerRole.
    bundle = _sr_and_consent(
        world, world.patient["A"], consent_for(world.patient["A"], "CLINIC-7"), True
    )
    bundle["entry"] = bundle["entry"][:1]
    r = fhir(world.referrer, "POST", "/fhir", bundle)
    assert r.status_code == 403
    assert world.staff.get("/fhir/ServiceRequest?_summary=count").get_json()["total"] == before


def test_a_referrer_records_data_only_about_its_own_referrals_patients(world: World) -> None:
    flags = world.staff.get("/fhir/Flag?_summary=count").get_json()["total"]
    qr = example("questionnaire-responses") | {"patient_phn": PHN_B, "source_id": "QR-X"}
    qr["answers"] = [
        a | {"answer": "LA6571-9"} if a["item"] == "phq9-9" else a for a in qr["answers"]
    ]
    assert native(world.referrer, "questionnaire-responses", qr).status_code == 403
    r = fhir(world.referrer, "POST", "/fhir/Observation", observation(world.patient["B"]))
    assert r.status_code == 403
    assert world.staff.get("/fhir/Flag?_summary=count").get_json()["total"] == flags
    # Its own patient: fine.
    assert (
        fhir(
            world.referrer, "POST", "/fhir/Observation", observation(world.patient["A"])
        ).status_code
        == 201
    )


def test_an_identity_refusal_confirms_no_demographic(world: World) -> None:
    changed = referral("CLINIC-8", "B2", PHN_A, birth_date="1990-01-01")
    r = native(world.other, "referrals", changed)
    assert r.status_code == 422
    issues = r.get_json()["issue"]
    assert len(issues) == 1 and issues[0]["expression"] == ["Patient"]
    assert "birth" not in issues[0]["diagnostics"].lower()
    # Program staff, who read Patients anyway, are told which element differs.
    r = native(world.staff, "referrals", changed)
    assert r.status_code == 422 and r.get_json()["issue"][0]["expression"] == ["Patient.birthDate"]


def test_ids_cannot_be_computed_from_a_phn(world: World) -> None:
    assert world.patient["A"] != deterministic_id("Patient", PHN_A, namespace=PUBLIC_NAMESPACE)
    uuid.UUID(world.patient["A"])  # still a uuid, still the same for every re-send
    again = native(world.referrer, "referrals", referral("CLINIC-7", "A1", PHN_A))
    assert again.status_code == 200
    assert world.task(world.referrer)["for"]["reference"] == f"Patient/{world.patient['A']}"


# ------------------------------------------------------------------ a referrer's Patients


def test_a_referrer_reads_the_patients_of_its_own_referrals(world: World) -> None:
    """ADR 0027: the person each of its program referrals is about, on every path; another
    clinic referring the same person sees the same Patient and nothing of this referral."""
    a, b = world.patient["A"], world.patient["B"]
    mine = world.referrer.get(f"/fhir/Patient/{a}")
    assert mine.status_code == 200
    assert mine.get_json()["identifier"][0]["value"] == PHN_A
    bundle = world.referrer.get("/fhir/Task?_include=Task:patient").get_json()
    assert {e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "include"} == {a}
    found = world.referrer.get(f"/fhir/Patient?identifier={PHN_SYSTEM}|{PHN_B}").get_json()
    assert found["total"] == 0  # B's PHN: for CLINIC-7 no such person is held
    # CLINIC-8 refers A too: both read A, each only its own referral of A.
    assert native(world.other, "referrals", referral("CLINIC-8", "A2", PHN_A)).status_code == 201
    assert world.other.get(f"/fhir/Patient/{a}").status_code == 200
    for c, other_clinic in ((world.referrer, "clinic-8"), (world.other, "clinic-7")):
        bundle = c.get(
            f"/fhir/Patient?_id={a}&_revinclude=ServiceRequest:subject&_revinclude=Task:patient"
        ).get_json()
        assert other_clinic not in json.dumps(bundle)
        assert len([e for e in bundle["entry"] if e["search"]["mode"] == "include"]) == 2
    # The conditional create a referral Bundle makes: its own patient is answered (200, with
    # the Patient); a person it did not refer is not matched, and the answer shows nothing of
    # the one held (ADR 0015).
    for c, expected in ((world.referrer, a), (world.other, a)):
        patient = {
            "resourceType": "Patient",
            "identifier": [{"system": PHN_SYSTEM, "value": PHN_A}],
        }
        r = fhir(c, "POST", "/fhir/Patient", patient, **{"If-None-Exist": _phn(PHN_A)})
        assert r.status_code == 200 and r.get_json()["id"] == expected
    # B's PHN is held, but not as CLINIC-7's: answered as a PHN never held (a Patient of
    # nobody it referred: 403, nothing stored), through REST and a batch alike.
    patients = world.staff.get("/fhir/Patient?_summary=count").get_json()["total"]
    never = phn(66666666)
    for value in (PHN_B, never):
        body = {"resourceType": "Patient", "identifier": [{"system": PHN_SYSTEM, "value": value}]}
        r = fhir(world.referrer, "POST", "/fhir/Patient", body, **{"If-None-Exist": _phn(value)})
        assert r.status_code == 403 and "Testcase" not in r.get_data(as_text=True)
        entry = {
            "resource": body,
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": _phn(value)},
        }
        r = fhir(
            world.referrer,
            "POST",
            "/fhir",
            {"resourceType": "Bundle", "type": "batch", "entry": [entry]},
        )
        assert [e["response"]["status"][:3] for e in r.get_json()["entry"]] == ["403"]
    assert world.staff.get("/fhir/Patient?_summary=count").get_json()["total"] == patients
    # An identity mismatch names the differing element to the clinic that referred the person.
    r = native(
        world.referrer, "referrals", referral("CLINIC-7", "A3", PHN_A, birth_date="1990-01-01")
    )
    assert r.status_code == 422 and r.get_json()["issue"][0]["expression"] == ["Patient.birthDate"]
    # Entered in error: that referral never was. CLINIC-8 no longer reads A; CLINIC-7 still does.
    theirs = world.staff.get("/fhir/Task?identifier=https://emr.clinic-8.ca/r|A2").get_json()
    sr_id = theirs["entry"][0]["resource"]["focus"]["reference"].split("/")[1]
    sr = world.staff.get(f"/fhir/ServiceRequest/{sr_id}").get_json()
    sr.pop("meta")
    r = fhir(
        world.staff, "PUT", f"/fhir/ServiceRequest/{sr_id}", sr | {"status": "entered-in-error"}
    )
    assert r.status_code == 200, r.get_json()
    assert world.other.get(f"/fhir/Patient/{a}").status_code == 404
    assert world.referrer.get(f"/fhir/Patient/{a}").status_code == 200
    # A withdrawal keeps it: the clinic still follows its own (withdrawn) referral.
    task = world.staff.get(f"/fhir/Task/{world.task_id['A']}").get_json()
    task.pop("meta")
    task |= {"status": "cancelled", "statusReason": {"text": "Patient moved away"}}
    r = fhir(world.referrer, "PUT", f"/fhir/Task/{task['id']}", task)
    assert r.status_code == 200, r.get_json()
    assert world.referrer.get(f"/fhir/Patient/{a}").status_code == 200
    # A ServiceRequest that is not the program's referral (refused anyway) and a made-up Task
    # open nothing.
    forged = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "for": {"reference": f"Patient/{b}"},
        "requester": world.task(world.referrer)["requester"],
    }
    fhir(world.referrer, "POST", "/fhir/Task", forged)
    assert world.referrer.get(f"/fhir/Patient/{b}").status_code == 404


def _phn(value: str) -> str:
    return f"identifier={PHN_SYSTEM}|{value}"


# ------------------------------------------------------------------ narrowed consents


@pytest.mark.parametrize(
    "narrowing",
    [
        {
            "action": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                            "code": "collect",
                        }
                    ]
                }
            ]
        },
        {
            "securityLabel": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
            ]
        },
        {"code": [{"coding": [PHQ9_TOTAL]}]},
        {"data": [{"meaning": "related", "reference": {"reference": "Observation/x"}}]},
    ],
    ids=["action-collect", "securityLabel", "code", "data-related"],
)
def test_a_permit_narrowed_in_a_way_not_evaluated_opens_nothing(
    world: World, narrowing: dict[str, Any]
) -> None:
    b = world.patient["B"]
    assert (
        fhir(
            world.staff, "POST", "/fhir/Consent", consent_for(b, "HA-ISLAND", **narrowing)
        ).status_code
        == 201
    )
    assert world.ha.get(f"/fhir/Patient/{b}").status_code == 404
    assert world.ha.get(f"/fhir/Observation?subject=Patient/{b}").get_json()["total"] == 0


def test_a_permit_for_reading_opens_like_an_unrestricted_one(world: World) -> None:
    b = world.patient["B"]
    action = {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}
        ]
    }
    assert (
        fhir(
            world.staff, "POST", "/fhir/Consent", consent_for(b, "HA-ISLAND", action=[action])
        ).status_code
        == 201
    )
    assert world.ha.get(f"/fhir/Patient/{b}").status_code == 200


def test_a_permit_for_named_data_opens_only_that(world: World) -> None:
    b = world.patient["B"]
    second = fhir(
        world.staff, "POST", "/fhir/Observation", observation(b, "2026-03-01")
    ).get_json()["id"]
    data = [{"meaning": "instance", "reference": {"reference": f"Observation/{world.obs['B']}"}}]
    assert (
        fhir(
            world.staff, "POST", "/fhir/Consent", consent_for(b, "HA-ISLAND", data=data)
        ).status_code
        == 201
    )
    bundle = world.ha.get(f"/fhir/Observation?subject=Patient/{b}").get_json()
    assert bundle["total"] == 1 and bundle["entry"][0]["resource"]["id"] == world.obs["B"]
    assert world.ha.get(f"/fhir/Observation/{second}").status_code == 404
    assert world.ha.get(f"/fhir/Patient/{b}").status_code == 404  # not named: not opened


def test_a_permit_for_a_data_period_opens_what_happened_in_it(world: World) -> None:
    b = world.patient["B"]
    late = fhir(world.staff, "POST", "/fhir/Observation", observation(b, "2026-09-01")).get_json()[
        "id"
    ]
    period = {"start": "2026-06-01", "end": "2026-12-31"}
    assert (
        fhir(
            world.staff, "POST", "/fhir/Consent", consent_for(b, "HA-ISLAND", dataPeriod=period)
        ).status_code
        == 201
    )
    ids = {
        e["resource"]["id"] for e in world.ha.get("/fhir/Observation?_count=50").get_json()["entry"]
    }
    assert late in ids and world.obs["B"] not in ids
    assert world.ha.get(f"/fhir/Observation/{late}").status_code == 200
    assert world.ha.get(f"/fhir/Observation/{world.obs['B']}").status_code == 404


def test_history_judges_each_version_by_its_own_patient(world: World) -> None:
    a, b = world.patient["A"], world.patient["B"]
    r = fhir(world.staff, "POST", "/fhir/Observation", observation(b))
    oid = r.get_json()["id"]
    moved = r.get_json() | {"subject": {"reference": f"Patient/{a}"}}
    moved.pop("meta")
    assert fhir(world.staff, "PUT", f"/fhir/Observation/{oid}", moved).status_code == 200
    history = world.ha.get(f"/fhir/Observation/{oid}/_history").get_json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2"]
    assert history["total"] == 1
    assert world.ha.get(f"/fhir/Observation/{oid}/_history/1").status_code == 404
    assert world.ha.get(f"/fhir/Observation/{oid}/_history/2").status_code == 200
