"""Bad input gets a clear answer, never a 500, on both databases and every entry: a NUL or
other control character and unpaired surrogates (in JSON, query strings, form posts, paths and
headers), numbers no decimal can be (5,000 digits, 1e400, NaN), thousands of search parameters
or OR values, and Bundles past the configured size. Property tests: hostile values are put
anywhere in otherwise valid requests; the answer is always a 4xx OperationOutcome (or the web
pages' error page) naming where, and nothing is stored."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_kat.api.body import bad_text
from fhir_kat.app import create_app
from fhir_kat.search import MAX_OR_VALUES, MAX_PARAMETERS
from fhir_kat.settings import Settings
from tests.conftest import client_as
from tests.test_messaging import as_message, referral, transform

FHIR = "application/fhir+json"
PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

#: Characters no FHIR string may hold: NUL, the other C0 controls but tab/CR/LF, surrogates.
bad_char = st.one_of(
    st.just("\x00"),
    st.sampled_from([chr(c) for c in range(32) if chr(c) not in "\t\r\n"]),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
)


@st.composite
def bad_strings(draw: st.DrawFn) -> str:
    before = draw(st.text(alphabet="abcXYZ 019-", max_size=6))
    after = draw(st.text(alphabet="abcXYZ 019-", max_size=6))
    return before + draw(bad_char) + after


#: Number literals JSON parsers accept and no FHIR decimal or integer can be.
BAD_NUMBERS = ["9" * 5000, "-" + "1" * 4301, "1" * 65, "1e400", "-1E999", "NaN", "Infinity"]


def _outcome(r: Any) -> dict[str, Any]:
    assert r.status_code != 500, r.get_data(as_text=True)[:500]
    assert 400 <= r.status_code < 500, (r.status_code, r.get_data(as_text=True)[:500])
    if r.mimetype == "text/html":
        return {}
    body: dict[str, Any] = r.get_json()
    if "error" in body and "resourceType" not in body:  # the token endpoint answers as OAuth
        return {}
    assert body["resourceType"] == "OperationOutcome", body
    return body


def _count(c: FlaskClient, rtype: str) -> int:
    total: int = c.get(f"/fhir/{rtype}?_summary=count").get_json()["total"]
    return total


# ------------------------------------------------------------------ JSON bodies


def _patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "https://example.org/phn", "value": "9123456782"}],
        "name": [{"family": "Quill", "given": ["Ada"]}],
        "gender": "female",
        "birthDate": "1980-02-03",
    }


def _places(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a string, number or property name in ``doc``."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.append((*path, ("key", key)))
            found += _places(value, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _places(value, (*path, i))
    elif isinstance(doc, str | int | float) and not isinstance(doc, bool):
        found.append(path)
    return found


MARK = "@@HOSTILE@@"


def _inject(doc: Any, place: tuple[Any, ...], value: str, number: bool) -> str:
    """``doc`` as JSON text with ``value`` at ``place`` (a raw literal when ``number``)."""
    copy = json.loads(json.dumps(doc))
    *parents, last = place
    node = copy
    for step in parents:
        node = node[step]
    if isinstance(last, tuple):  # a property name
        node[value if not number else last[1] + "x"] = node.pop(last[1])
        return json.dumps(copy)  # ensure_ascii: a surrogate travels as \\udXXX, as attackers send
    node[last] = MARK
    text = json.dumps(copy)
    return text.replace(f'"{MARK}"', value if number else json.dumps(value))


def _hostile(doc: Any) -> st.SearchStrategy[str]:
    places = _places(doc)
    strings = st.tuples(st.sampled_from(places), bad_strings(), st.just(False))
    numbers = st.tuples(
        st.sampled_from([p for p in places if not isinstance(p[-1], tuple)]),
        st.sampled_from(BAD_NUMBERS),
        st.just(True),
    )
    return st.one_of(strings, numbers).map(lambda t: _inject(doc, *t))


@PROPERTY
@given(body=_hostile(_patient()))
def test_hostile_values_anywhere_in_a_resource(app: Flask, body: str) -> None:
    staff = client_as(app, "staff")
    for method, path in (("post", "/fhir/Patient"), ("put", "/fhir/Patient/p1")):
        r = getattr(staff, method)(path, data=body, content_type=FHIR)
        outcome = _outcome(r)
        assert r.status_code == 400 and outcome["issue"][0]["code"] == "value", outcome
    assert _count(staff, "Patient") == 0


def _transaction() -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:7f1c2a3e-1111-4c1e-9d0a-000000000001",
                "resource": _patient(),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "weight"},
                    "subject": {"reference": "urn:uuid:7f1c2a3e-1111-4c1e-9d0a-000000000001"},
                    "valueQuantity": {"value": 71.5, "unit": "kg"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }


@PROPERTY
@given(body=_hostile(_transaction()), kind=st.sampled_from(["transaction", "batch"]))
def test_hostile_values_anywhere_in_a_transaction_or_batch(
    app: Flask, body: str, kind: str
) -> None:
    staff = client_as(app, "staff")
    body = body.replace('"transaction"', f'"{kind}"', 1)
    _outcome(staff.post("/fhir", data=body, content_type=FHIR))
    assert _count(staff, "Patient") == 0 and _count(staff, "Observation") == 0


@pytest.fixture
def message_and_native(app: Flask) -> tuple[dict[str, Any], dict[str, Any]]:
    native = referral()
    return as_message(transform(client_as(app, "referrer"), native)), native


@PROPERTY
@given(data=st.data())
def test_hostile_values_in_messages_and_native_artifacts(
    app: Flask, message_and_native: tuple[dict[str, Any], dict[str, Any]], data: st.DataObject
) -> None:
    message, native = message_and_native
    referrer = client_as(app, "referrer")
    body = data.draw(_hostile(message))
    _outcome(referrer.post("/fhir/$process-message", data=body, content_type=FHIR))
    body = data.draw(_hostile(native))
    for path in ("/api/v1/referrals", "/api/v1/referrals/$transform"):
        _outcome(referrer.post(path, data=body, content_type="application/json"))
    assert _count(client_as(app, "staff"), "ServiceRequest") == 0


def test_each_problem_is_named_where_it_is(app: Flask) -> None:
    staff = client_as(app, "staff")
    body = '{"resourceType":"Patient","name":[{"family":"a\\u0000","given":["\\ud800x"]}]}'
    issues = _outcome(staff.post("/fhir/Patient", data=body, content_type=FHIR))["issue"]
    assert sorted(i["expression"][0] for i in issues) == [
        "Patient.name[0].family",
        "Patient.name[0].given[0]",
    ]
    huge = '{"resourceType":"Observation","valueInteger":' + "9" * 5000 + "}"
    (problem,) = _outcome(staff.post("/fhir/Observation", data=huge, content_type=FHIR))["issue"]
    assert "more than 64 characters" in problem["diagnostics"]
    # two-sided: tabs, line breaks, escaped emoji and long decimals still go through
    fine = {
        **_patient(),
        "name": [{"family": "Quill\u00e9 \U0001f600", "given": ["A\tB"]}],
        "extension": [{"url": "https://example.org/x", "valueDecimal": 12345678.123456789}],
    }
    assert staff.post("/fhir/Patient", data=json.dumps(fine), content_type=FHIR).status_code == 201


# ------------------------------------------------------------------ query strings, forms, paths


ENDPOINTS = [
    ("staff", "get", "/fhir/Patient"),
    ("staff", "get", "/fhir/Observation"),
    ("staff", "post", "/fhir/Patient/_search"),
    ("staff", "get", "/fhir/$export"),
    ("staff", "get", "/fhir/Measure/kat-program-outcomes/$evaluate-measure"),
    ("admin", "get", "/api/v1/deliveries"),
    ("staff", "get", "/fhir/Patient/p1/_history"),
    (None, "post", "/auth/token"),
    (None, "post", "/app/login"),
]
names = st.sampled_from(["name", "identifier", "_id", "_count", "_cursor", "partner", "_type",
                         "client_id", "periodStart", "value-quantity", "_typeFilter"])  # fmt: skip


@PROPERTY
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    key=st.one_of(names, bad_strings()),
    value=st.one_of(bad_strings(), st.sampled_from(["9" * 5000, "1e400"])),
    in_key=st.booleans(),
)
def test_hostile_parameters_on_every_entry(
    app: Flask, endpoint: tuple[str | None, str, str], key: str, value: str, in_key: bool
) -> None:
    who, method, path = endpoint
    c = client_as(app, who)
    name, sent = (value, key) if in_key else (key, value)
    # As a client sends it: UTF-8, percent-encoded (a surrogate arrives as invalid UTF-8, which
    # the server reads as U+FFFD: not Unicode text, but harmless and never stored as sent).
    encoded = f"{_pct(name)}={_pct(sent)}"
    if method == "post":
        r = c.post(
            path,
            data=encoded,
            content_type="application/x-www-form-urlencoded",
            headers={"Origin": "http://localhost"},
        )
    else:
        r = c.get(f"{path}?{encoded}", headers={"Prefer": "respond-async"})
    if bad_text(_as_read(name)) or bad_text(_as_read(sent)):
        assert r.status_code == 400, (endpoint, r.get_data(as_text=True)[:300])
    if r.status_code >= 400:
        _outcome(r)


def _pct(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _as_read(text: str) -> str:
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


@PROPERTY
@given(rid=bad_strings(), vid=st.one_of(bad_strings(), st.just("9" * 5000), st.just("²")))
def test_hostile_paths(app: Flask, rid: str, vid: str) -> None:
    staff = client_as(app, "staff")
    for path in (f"/fhir/Patient/{rid}", f"/fhir/Patient/p1/_history/{vid}", f"/app/{rid}"):
        r = staff.get(_pct(path).replace("%2F", "/"))
        if bad_text(_as_read(path)):
            assert r.status_code == 400, path
        elif r.status_code != 303:  # /app/... without a session: to the sign-in page
            _outcome(r)


HEADERS = ["If-None-Exist", "If-Match", "Prefer", "X-Request-Id", "Accept", "X-Forwarded-For"]


@PROPERTY
@given(header=st.sampled_from(HEADERS), value=bad_strings())
def test_hostile_headers(app: Flask, header: str, value: str) -> None:
    staff = client_as(app, "staff")
    # Werkzeug's test client sends str headers as latin-1: keep what it can carry.
    value = value.encode("utf-8", "surrogatepass").decode("latin-1")
    body = json.dumps(_patient())
    r = staff.post("/fhir/Patient", data=body, content_type=FHIR, headers={header: value})
    if bad_text(value.replace("\t", " ")):
        assert r.status_code == 400
        assert _outcome(r)["issue"][0]["expression"] == [header]
    else:
        assert r.status_code != 500


def test_encoded_nul_in_conditional_headers_and_bundle_urls(app: Flask) -> None:
    staff = client_as(app, "staff")
    body = json.dumps(_patient())
    r = staff.post("/fhir/Patient", data=body, content_type=FHIR,
                   headers={"If-None-Exist": "identifier=a%00b"})  # fmt: skip
    assert r.status_code == 400 and "control character" in json.dumps(_outcome(r))
    tx = _transaction()
    tx["entry"][0]["request"]["ifNoneExist"] = "identifier=%00"
    _outcome(staff.post("/fhir", data=json.dumps(tx), content_type=FHIR))
    assert _count(staff, "Patient") == 0


# ------------------------------------------------------------------ sizes


def test_too_many_parameters_or_values_are_refused_and_the_limit_still_works(app: Flask) -> None:
    staff = client_as(app, "staff")
    many = "&".join(f"name=a{i}" for i in range(3000))
    assert _outcome(staff.get(f"/fhir/Patient?{many}"))["issue"][0]["code"] == "too-costly"
    ors = ",".join(f"a{i}" for i in range(5000))
    for param in ("name", "_id", "identifier", "birthdate"):
        r = staff.get(f"/fhir/Patient?{param}={ors}")
        assert r.status_code == 400 and _outcome(r)["issue"][0]["expression"] == [param]
    at_limit = "&".join(f"name=a{i}" for i in range(MAX_PARAMETERS))
    assert staff.get(f"/fhir/Patient?{at_limit}").status_code == 200
    values = ",".join(f"a{i}" for i in range(MAX_OR_VALUES))
    assert staff.get(f"/fhir/Patient?name={values}&_id={values}").status_code == 200
    inner = "&".join(f"name=a{i}" for i in range(MAX_PARAMETERS + 1))
    r = staff.post("/fhir/Patient", data=json.dumps(_patient()), content_type=FHIR,
                   headers={"If-None-Exist": inner})  # fmt: skip
    assert r.status_code == 400


def test_bundles_past_the_configured_size_are_refused(settings: Settings) -> None:
    app = create_app(replace(settings, max_bundle_entries=3))
    try:
        staff = client_as(app, "staff")
        entry = {
            "resource": {"resourceType": "Patient"},
            "request": {"method": "POST", "url": "Patient"},
        }
        for kind in ("transaction", "batch"):
            bundle = {"resourceType": "Bundle", "type": kind, "entry": [entry] * 4}
            r = staff.post("/fhir", data=json.dumps(bundle), content_type=FHIR)
            assert r.status_code == 413
            assert _outcome(r)["issue"][0]["expression"] == ["Bundle.entry"]
            bundle["entry"] = [entry] * 3
            assert (
                staff.post("/fhir", data=json.dumps(bundle), content_type=FHIR).status_code == 200
            )
        message = {"resourceType": "Bundle", "type": "message", "id": "m", "entry": [entry] * 4}
        r = staff.post("/fhir/$process-message", data=json.dumps(message), content_type=FHIR)
        assert r.status_code == 413
    finally:
        app.extensions["fhir_kat"].export.shutdown()
        app.extensions["fhir_kat"].store.dispose()


@pytest.mark.parametrize("char", ["\u0085", "\u00a0", "\u2028", "\u3000", "\u009c", "\ufeff"])
def test_a_fhir_string_fhir_cannot_hold_is_refused_naming_the_field(
    client: FlaskClient, char: str
) -> None:
    """The FHIR door refuses what the native door refuses (HL7's R4 JSON schema: no control
    character, no whitespace but space/tab/LF/CR): 400 as any other invalid FHIR value, one
    issue per field, the code point named and the text not quoted; in a transaction nothing is
    stored."""
    patient = {
        "resourceType": "Patient",
        "name": [{"family": f"Doe{char}Secretname", "given": ["Ann", f"B{char}"]}],
    }
    answer = client.post("/fhir/Patient", data=json.dumps(patient), content_type=FHIR)
    assert answer.status_code == 400, answer.get_json()
    issues = answer.get_json()["issue"]
    assert sorted(i["expression"][0] for i in issues) == [
        "Patient.name[0].family",
        "Patient.name[0].given[1]",
    ]
    assert all(f"U+{ord(char):04X}" in i["diagnostics"] for i in issues)
    assert "Secretname" not in answer.get_data(as_text=True)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "gender": "female"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {"resource": patient, "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    refused = client.post("/fhir", data=json.dumps(bundle), content_type=FHIR)
    assert refused.status_code in (400, 422), refused.get_json()
    assert "Bundle.entry[1].resource.name[0].family" in json.dumps(refused.get_json())
    assert client.get("/fhir/Patient").get_json()["total"] == 0
    # A narrative's XHTML is not a FHIR string: a no-break space there is fine.
    ok = dict(
        patient,
        name=[{"family": "Doe"}],
        text={
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">a\u00a0b</div>',
        },
    )
    assert client.post("/fhir/Patient", data=json.dumps(ok), content_type=FHIR).status_code == 201
