"""The FHIR REST API on both databases: interactions, versioning, conditional create, search,
paging, _include, transactions, batches and every refusal path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

FHIR = "application/fhir+json"


def post(client: FlaskClient, path: str, body: Any, **headers: str) -> Any:
    return client.post(path, data=json.dumps(body), content_type=FHIR, headers=headers)


def put(client: FlaskClient, path: str, body: Any, **headers: str) -> Any:
    return client.put(path, data=json.dumps(body), content_type=FHIR, headers=headers)


def patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "gender": "female",
        "name": [{"family": "Testperson"}],
        **extra,
    }


def observation(subject: str, code: str = "44261-6", when: str = "2026-01-10") -> dict[str, Any]:
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
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "effectiveDateTime": when,
        "valueInteger": 12,
    }


def assert_outcome(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.data
    assert response.content_type.startswith(FHIR)
    body: dict[str, Any] = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"]
    if code:
        assert code in {i["code"] for i in body["issue"]}, body
    return body


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


# ------------------------------------------------------------------------------ metadata, health


def test_metadata_lists_what_is_implemented(client: FlaskClient) -> None:
    r = client.get("/fhir/metadata")
    assert r.status_code == 200 and r.content_type.startswith(FHIR)
    cap = r.get_json()
    assert cap["fhirVersion"] == "4.0.1"
    rest = cap["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    task = next(x for x in rest["resource"] if x["type"] == "Task")
    assert "Task:focus" in task["searchInclude"]
    assert {"_id", "_lastUpdated", "identifier", "status", "focus"} <= {
        p["name"] for p in task["searchParam"]
    }
    assert task["conditionalCreate"] is True
    obs = next(x for x in rest["resource"] if x["type"] == "Observation")
    assert "Observation:patient" in obs["searchInclude"]


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}


# ------------------------------------------------------------------------------ CRUD and versions


def test_create_read_update_vread_history(client: FlaskClient) -> None:
    r = post(client, "/fhir/Patient", patient(id="client-chosen"))
    assert r.status_code == 201
    created = r.get_json()
    pid = created["id"]
    assert pid != "client-chosen"  # the server assigns ids on create
    assert r.headers["Location"].endswith(f"/fhir/Patient/{pid}/_history/1")
    assert r.headers["ETag"] == 'W/"1"'
    assert created["meta"]["versionId"] == "1" and created["meta"]["lastUpdated"].endswith("Z")

    got = client.get(f"/fhir/Patient/{pid}")
    assert got.status_code == 200 and got.get_json() == created

    updated = dict(created, gender="male")
    r = put(client, f"/fhir/Patient/{pid}", updated, **{"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"'
    assert r.get_json()["meta"]["versionId"] == "2"

    stale = put(client, f"/fhir/Patient/{pid}", updated, **{"If-Match": 'W/"1"'})
    assert_outcome(stale, 412, "conflict")

    v1 = client.get(f"/fhir/Patient/{pid}/_history/1").get_json()
    assert v1["gender"] == "female"
    assert client.get(f"/fhir/Patient/{pid}/_history/9").status_code == 404

    hist = client.get(f"/fhir/Patient/{pid}/_history").get_json()
    assert hist["type"] == "history" and hist["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == ["2", "1"]
    assert [e["request"]["method"] for e in hist["entry"]] == ["PUT", "POST"]


def test_update_creates_with_client_id_and_delete_then_gone(client: FlaskClient) -> None:
    r = put(client, "/fhir/Patient/abc-1", patient(id="abc-1"))
    assert r.status_code == 201
    assert client.delete("/fhir/Patient/abc-1").status_code == 204
    assert_outcome(client.get("/fhir/Patient/abc-1"), 410, "deleted")
    assert client.delete("/fhir/Patient/abc-1").status_code == 204
    hist = client.get("/fhir/Patient/abc-1/_history").get_json()
    assert [e["request"]["method"] for e in hist["entry"]] == ["DELETE", "PUT"]
    assert "resource" not in hist["entry"][0]


def test_prefer_return_minimal(client: FlaskClient) -> None:
    r = post(client, "/fhir/Patient", patient(), Prefer="return=minimal")
    assert r.status_code == 201 and r.data == b"" and r.headers["Location"]


def test_conditional_create(client: FlaskClient) -> None:
    body = patient(identifier=[{"system": "urn:test", "value": "42"}])
    first = post(client, "/fhir/Patient", body, **{"If-None-Exist": "identifier=urn:test|42"})
    second = post(client, "/fhir/Patient", body, **{"If-None-Exist": "identifier=urn:test|42"})
    assert first.status_code == 201 and second.status_code == 200
    assert first.get_json()["id"] == second.get_json()["id"]
    post(client, "/fhir/Patient", body)  # now two match
    r = post(client, "/fhir/Patient", body, **{"If-None-Exist": "identifier=urn:test|42"})
    assert_outcome(r, 412, "multiple-matches")
    r = post(client, "/fhir/Patient", body, **{"If-None-Exist": "nonsense=1"})
    assert_outcome(r, 400)


# ------------------------------------------------------------------------------ refusals


def test_invalid_resources_are_refused_with_one_issue_per_problem(client: FlaskClient) -> None:
    bad = {"resourceType": "Patient", "gender": 5, "birthDate": "1990-13-45", "bogus": True}
    body = assert_outcome(post(client, "/fhir/Patient", bad), 400)
    expressions = {e for i in body["issue"] for e in i.get("expression", [])}
    assert {"Patient.gender", "Patient.birthDate", "Patient.bogus"} <= expressions
    assert len(body["issue"]) == 3
    search = client.get("/fhir/Patient").get_json()
    assert search["total"] == 0  # nothing stored


def test_required_binding_is_enforced(client: FlaskClient) -> None:
    task = {"resourceType": "Task", "status": "bogus", "intent": "order"}
    body = assert_outcome(post(client, "/fhir/Task", task), 400, "code-invalid")
    assert body["issue"][0]["expression"] == ["Task.status"]


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b'{"resourceType": "Patient", bad', FHIR, 400),
        (b"", FHIR, 400),
        (b"[1, 2]", FHIR, 400),
        (b"<Patient xmlns='http://hl7.org/fhir'/>", "application/fhir+xml", 415),
        (b"gender=female", "application/x-www-form-urlencoded", 415),
        (b'{"a":' * 200 + b"1" + b"}" * 200, FHIR, 400),
        (b"[" * 100_000 + b"]" * 100_000, FHIR, 400),
    ],
)
def test_malformed_bodies(client: FlaskClient, data: bytes, content_type: str, status: int) -> None:
    assert_outcome(client.post("/fhir/Patient", data=data, content_type=content_type), status)


def test_body_over_limit_is_413(client: FlaskClient) -> None:
    limit = client.application.config["MAX_CONTENT_LENGTH"]
    big = json.dumps(patient(text={"status": "generated", "div": "x" * limit}))
    assert_outcome(client.post("/fhir/Patient", data=big, content_type=FHIR), 413, "too-costly")


def test_wrong_type_unknown_type_and_id_mismatch(client: FlaskClient) -> None:
    assert_outcome(post(client, "/fhir/Observation", patient()), 400, "invalid")
    assert_outcome(post(client, "/fhir/Unicorn", {"resourceType": "Unicorn"}), 404)
    assert_outcome(client.get("/fhir/Patient/does-not-exist"), 404, "not-found")
    assert_outcome(put(client, "/fhir/Patient/a1", patient(id="b2")), 400)
    assert_outcome(put(client, "/fhir/Patient/a1", patient()), 400)


def test_xml_accept_is_406_and_unknown_route_is_outcome(client: FlaskClient) -> None:
    assert_outcome(client.get("/fhir/metadata", headers={"Accept": "application/fhir+xml"}), 406)
    assert_outcome(client.get("/fhir/metadata?_format=xml"), 406)
    assert_outcome(client.get("/nowhere"), 404)
    assert_outcome(client.patch("/fhir/Patient/x"), 405)


def test_unexpected_error_is_500_with_correlation_id(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    svc = client.application.extensions["fhir_kat"].fhir

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals: Jane Doe 9876543210")

    monkeypatch.setattr(svc, "read", boom)
    r = client.get("/fhir/Patient/x")
    body = assert_outcome(r, 500, "exception")
    text = json.dumps(body)
    assert "secret" not in text and "Jane" not in text
    assert r.headers["X-Correlation-Id"] in text
    assert "Jane" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ search


@pytest.fixture
def seeded(client: FlaskClient) -> dict[str, Any]:
    p1 = post(client, "/fhir/Patient", patient(identifier=[{"system": "urn:phn", "value": "1"}]))
    p2 = post(client, "/fhir/Patient", patient(identifier=[{"system": "urn:phn", "value": "2"}]))
    a, b = p1.get_json()["id"], p2.get_json()["id"]
    o1 = post(client, "/fhir/Observation", observation(f"Patient/{a}", "44261-6", "2026-01-10"))
    o2 = post(client, "/fhir/Observation", observation(f"Patient/{a}", "70274-6", "2026-03-05"))
    o3 = post(
        client, "/fhir/Observation", observation(f"Patient/{b}", "44261-6", "2026-02-01T10:00:00Z")
    )
    sr = post(
        client,
        "/fhir/ServiceRequest",
        {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{a}"},
            "authoredOn": "2026-01-02",
        },
    ).get_json()
    task = post(
        client,
        "/fhir/Task",
        {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "focus": {"reference": f"ServiceRequest/{sr['id']}"},
            "for": {"reference": f"Patient/{a}"},
            "authoredOn": "2026-01-02T08:00:00Z",
        },
    ).get_json()
    return {
        "a": a,
        "b": b,
        "obs": [o.get_json()["id"] for o in (o1, o2, o3)],
        "sr": sr["id"],
        "task": task["id"],
    }


def test_search_by_token_reference_and_date(client: FlaskClient, seeded: dict[str, Any]) -> None:
    a, b = seeded["a"], seeded["b"]
    o1, o2, o3 = seeded["obs"]
    get = lambda q: client.get(f"/fhir/{q}").get_json()  # noqa: E731
    assert ids(get("Patient?identifier=urn:phn|1")) == [a]
    assert ids(get("Patient?identifier=2")) == [b]
    assert ids(get("Patient?identifier=urn:other|1")) == []
    assert ids(get(f"Patient?_id={a},{b}")) == [a, b]
    assert ids(get(f"Observation?patient={a}")) == [o1, o2]
    assert ids(get(f"Observation?subject=Patient/{b}")) == [o3]
    assert ids(get("Observation?code=http://loinc.org|44261-6")) == [o1, o3]
    assert ids(get("Observation?code=44261-6,70274-6&status=final")) == [o1, o2, o3]
    assert ids(get("Observation?code:not=44261-6")) == [o2]
    assert ids(get("Observation?date=2026-01-10")) == [o1]
    assert ids(get("Observation?date=ge2026-02-01&date=lt2026-03-01")) == [o3]
    assert ids(get("Observation?date=gt2026-02")) == [o2]
    assert ids(get("Observation?date=le2026-01-31")) == [o1]
    assert ids(get("Observation?date=2026-02")) == [o3]
    assert ids(get("ServiceRequest?authored=2026-01-02&intent=order")) == [seeded["sr"]]
    assert ids(get("Patient?name=testp")) == [a, b]
    assert ids(get("Patient?family:exact=testperson")) == [a, b]
    assert get("Observation?_summary=count")["total"] == 3
    assert "entry" not in get("Observation?_summary=count")


def test_last_updated_and_sort(client: FlaskClient, seeded: dict[str, Any]) -> None:
    all_obs = client.get("/fhir/Observation?_sort=-_lastUpdated").get_json()
    assert ids(all_obs) == list(reversed(seeded["obs"]))
    stamp = all_obs["entry"][-1]["resource"]["meta"]["lastUpdated"]
    later = client.get(f"/fhir/Observation?_lastUpdated=gt{stamp}").get_json()
    assert ids(later) == seeded["obs"][1:]


def test_include_and_revinclude(client: FlaskClient, seeded: dict[str, Any]) -> None:
    b = client.get(f"/fhir/Task?_id={seeded['task']}&_include=Task:focus").get_json()
    assert ids(b) == [seeded["task"]] and ids(b, "include") == [seeded["sr"]]
    b = client.get(
        f"/fhir/Observation?patient={seeded['a']}&_include=Observation:patient"
    ).get_json()
    assert ids(b, "include") == [seeded["a"]]
    assert b["total"] == 2  # includes are not counted
    b = client.get("/fhir/ServiceRequest?_revinclude=Task:focus").get_json()
    assert ids(b, "include") == [seeded["task"]]
    r = client.get("/fhir/Task?_include=Task:nonsense")
    assert_outcome(r, 400)


def test_unknown_parameters_strict_and_lenient(client: FlaskClient, seeded: dict[str, Any]) -> None:
    lenient = client.get("/fhir/Patient?foo=bar&gender=female").get_json()
    assert len(ids(lenient)) == 2
    self_link = lenient["link"][0]["url"]
    assert "gender=female" in self_link and "foo" not in self_link
    strict = client.get("/fhir/Patient?foo=bar", headers={"Prefer": "handling=strict"})
    body = assert_outcome(strict, 400, "not-supported")
    assert body["issue"][0]["expression"] == ["foo"]
    assert_outcome(client.get("/fhir/Observation?date=notadate"), 400, "value")
    assert_outcome(client.get("/fhir/Observation?_count=x"), 400, "value")


def test_paging_is_stable_while_data_is_added(client: FlaskClient) -> None:
    created = [post(client, "/fhir/Patient", patient()).get_json()["id"] for _ in range(7)]
    seen: list[str] = []
    url = "/fhir/Patient?_count=3"
    pages = 0
    while url:
        page = client.get(url).get_json()
        seen += ids(page)
        pages += 1
        if pages == 1:  # new data arrives between page 1 and page 2
            created.append(post(client, "/fhir/Patient", patient()).get_json()["id"])
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = nxt[0].split("localhost", 1)[1] if nxt else ""
        assert pages < 10
    assert seen == created  # nothing skipped, nothing repeated, new data at the end
    post_search = client.post("/fhir/Patient/_search", data={"_count": "2"}).get_json()
    assert len(ids(post_search)) == 2


# ------------------------------------------------------------------------------ bundles


def _txn(*entries: dict[str, Any], btype: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": btype, "entry": list(entries)}


def test_transaction_resolves_urn_uuids_and_conditional_create(client: FlaskClient) -> None:
    pid = "urn:uuid:3c1a2b9e-0000-4000-8000-000000000001"
    bundle = _txn(
        {
            "fullUrl": pid,
            "resource": patient(identifier=[{"system": "urn:phn", "value": "77"}]),
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:phn|77"},
        },
        {
            "fullUrl": "urn:uuid:3c1a2b9e-0000-4000-8000-000000000002",
            "resource": observation(pid),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    r = post(client, "/fhir", bundle)
    assert r.status_code == 200, r.data
    out = r.get_json()
    assert out["type"] == "transaction-response"
    assert [e["response"]["status"] for e in out["entry"]] == ["201 Created", "201 Created"]
    new_pid = out["entry"][0]["response"]["location"].split("/Patient/")[1].split("/")[0]
    obs = client.get(f"/fhir/Observation?patient={new_pid}").get_json()
    assert obs["total"] == 1
    assert obs["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{new_pid}"

    again = post(client, "/fhir", bundle).get_json()  # the patient matches; not created twice
    assert again["entry"][0]["response"]["status"] == "200 OK"
    assert client.get("/fhir/Patient?identifier=urn:phn|77").get_json()["total"] == 1


def test_transaction_is_all_or_nothing(client: FlaskClient) -> None:
    good = {"resource": patient(), "request": {"method": "POST", "url": "Patient"}}
    bad = {
        "resource": {"resourceType": "Task", "status": "bogus", "intent": "order"},
        "request": {"method": "POST", "url": "Task"},
    }
    body = assert_outcome(post(client, "/fhir", _txn(good, bad)), 400, "code-invalid")
    assert body["issue"][0]["expression"] == ["Bundle.entry[1].resource.status"]
    assert client.get("/fhir/Patient").get_json()["total"] == 0

    dangling = {
        "resource": observation("urn:uuid:00000000-0000-4000-8000-00000000dead"),
        "request": {"method": "POST", "url": "Observation"},
    }
    body = assert_outcome(post(client, "/fhir", _txn(good, dangling)), 422, "not-found")
    assert body["issue"][0]["expression"] == ["Bundle.entry[1].resource.subject.reference"]

    stale = {
        "resource": patient(id="p-9"),
        "request": {"method": "PUT", "url": "Patient/p-9", "ifMatch": 'W/"4"'},
    }
    assert_outcome(post(client, "/fhir", _txn(good, stale)), 412)
    assert client.get("/fhir/Patient").get_json()["total"] == 0


def test_batch_entries_are_independent(client: FlaskClient) -> None:
    bundle = _txn(
        {"resource": patient(), "request": {"method": "POST", "url": "Patient"}},
        {
            "resource": {"resourceType": "Task", "status": "bogus", "intent": "order"},
            "request": {"method": "POST", "url": "Task"},
        },
        {"request": {"method": "GET", "url": "Patient?gender=female"}},
        {"request": {"method": "GET", "url": "Patient/missing"}},
        btype="batch",
    )
    out = post(client, "/fhir", bundle).get_json()
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses[0] == "201 Created" and statuses[1] == "400"
    assert out["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert statuses[2] == "200 OK" and out["entry"][2]["resource"]["total"] == 1
    assert statuses[3] == "404"


def test_bundle_refusals(client: FlaskClient) -> None:
    assert_outcome(post(client, "/fhir", patient()), 400)
    assert_outcome(post(client, "/fhir", {"resourceType": "Bundle", "type": "collection"}), 400)
    no_request = _txn({"resource": patient()})
    assert_outcome(post(client, "/fhir", no_request), 400, "required")
    patch = _txn({"request": {"method": "PATCH", "url": "Patient/1"}})
    assert_outcome(post(client, "/fhir", patch), 400, "not-supported")
