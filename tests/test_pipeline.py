"""The write pipeline (fhir_kat/services/pipeline.py): one ordered list of checks and steps that
every write path runs, each step limited to what its row says it stores."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.services.pipeline import (
    Check,
    Step,
    WritePipeline,
    install,
    write_pipeline,
)
from fhir_kat.store import StoredResource, Tx
from tests.conftest import client_as
from tests.test_artifacts_api import example, send
from tests.test_messaging import as_message, process, referral, transform

FHIR = "application/fhir+json"


def services(app: Flask) -> Any:
    return app.extensions["fhir_kat"].services


def with_extra(app: Flask, *, step: Step | None = None, check: Check | None = None) -> None:
    """Install the app's own pipeline with one more step (last) or check (first), strictly."""
    base = write_pipeline(services(app))
    pipeline = replace(
        base,
        steps=base.steps + ((step,) if step else ()),
        checks=((check,) if check else ()) + base.checks,
    )
    install(services(app).fhir, pipeline, strict=True)


def patient(pid: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "name": [{"family": "Testperson", "given": ["Pat"]}],
        "birthDate": "1980-02-03",
    }
    if pid:
        body["id"] = pid
    return body


def post(c: FlaskClient, body: dict[str, Any], path: str = "/fhir/Patient") -> Any:
    return c.post(path, data=json.dumps(body), content_type=FHIR)


# ------------------------------------------------------------------ the order, as documented


def test_the_pipeline_runs_in_the_documented_order(app: Flask) -> None:
    """STYLE.md and the module's docstring name the order; the app runs exactly that list."""
    pipeline = write_pipeline(services(app))
    assert [s.name for s in pipeline.steps] == [
        "referral workflow",
        "scoring and extraction",
        "referral form",
        "safety signals",
        "referrer feedback",
        "subscriptions",
        "consent re-queue",
        "partner copies",
    ]
    fhir = services(app).fhir
    assert len(fhir.write_hooks) == len(pipeline.steps)
    assert len(fhir.write_rules) == len(pipeline.checks)
    assert [r for r in fhir.delete_rules] == [d.rule for d in pipeline.delete_checks]
    text = pipeline.describe().split("After a version is stored")[1]
    positions = [text.index(f". {s.name}:") for s in pipeline.steps]
    assert positions == sorted(positions)
    # Only the checks whose row says so may change what they check.
    assert [c.name for c in pipeline.checks if c.changes] == [
        "referral form",
        "subscriptions",
        "profiles",
    ]


# ------------------------------------------------------------------ every path passes it


def test_every_write_path_runs_the_steps(app: Flask, client: FlaskClient) -> None:
    """REST create/update/delete, conditional create, transaction, batch, native artifacts,
    $process-message and each hook's own derived writes all run the same steps."""
    seen: list[tuple[str, str, bool]] = []

    def record(tx: Tx, stored: StoredResource, created: bool) -> None:
        seen.append((stored.type, stored.id, stored.deleted))

    with_extra(app, step=Step("spy", "records", record))
    expected: set[tuple[str, str, bool]] = set()

    created = post(client, patient())
    assert created.status_code == 201
    pid = created.get_json()["id"]
    expected.add(("Patient", pid, False))
    put_id = str(uuid.uuid4())
    assert (
        client.put(
            f"/fhir/Patient/{put_id}", data=json.dumps(patient(put_id)), content_type=FHIR
        ).status_code
        == 201
    )
    expected.add(("Patient", put_id, False))
    cond = client.post(
        "/fhir/Patient",
        data=json.dumps(dict(patient(), identifier=[{"system": "urn:test", "value": "c1"}])),
        content_type=FHIR,
        headers={"If-None-Exist": "identifier=urn:test|c1"},
    )
    assert cond.status_code == 201
    expected.add(("Patient", cond.get_json()["id"], False))
    for kind in ("transaction", "batch"):
        bid = str(uuid.uuid4())
        bundle = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{bid}",
                    "resource": patient(bid),
                    "request": {"method": "PUT", "url": f"Patient/{bid}"},
                }
            ],
        }
        answer = post(client, bundle, "/fhir")
        assert answer.status_code == 200, answer.get_json()
        expected.add(("Patient", bid, False))
    assert client.delete(f"/fhir/Patient/{put_id}").status_code in (200, 204)
    expected.add(("Patient", put_id, True))
    assert {e for e in seen if e[:2] in {x[:2] for x in expected}} >= expected

    # A native artifact: every resource it stores passes the steps, and so does what the
    # hooks derive from it (the referral's Task, written by the workflow step).
    seen.clear()
    answer = send(client, "referrals", example("referrals"))
    assert answer.status_code in (200, 201), answer.get_json()
    stored = {e["response"]["location"].split("/_history")[0] for e in answer.get_json()["entry"]}
    assert stored <= {f"{t}/{i}" for t, i, _ in seen}
    assert "Task" in {t for t, _, _ in seen}

    # A FHIR message from a referrer's EMR.
    seen.clear()
    referrer = client_as(app, "referrer")
    message = as_message(transform(referrer, referral(number="PIPE-1", own_patient=True)))
    assert process(referrer, message).status_code == 200
    assert {"ServiceRequest", "Task", "Patient"} <= {t for t, _, _ in seen}


# ------------------------------------------------------------------ each row's limits hold


def test_a_step_storing_what_its_row_does_not_name_fails_loudly(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    fhir = services(app).fhir

    def writes_an_organization(tx: Tx, stored: StoredResource, created: bool) -> None:
        if stored.type == "Patient" and created:
            fhir.update_in(
                tx,
                {
                    "resourceType": "Organization",
                    "id": str(uuid.uuid4()),
                    "name": "Pipeline Test Org",
                },
            )

    with_extra(app, step=Step("rogue", "stores an unnamed type", writes_an_organization))
    with caplog.at_level(logging.ERROR):
        refused = post(client, patient())
    assert refused.status_code == 500
    assert refused.get_json()["resourceType"] == "OperationOutcome"
    assert "step 'rogue' stored Organization" in caplog.text
    # Nothing of the refused request was stored.
    assert client.get("/fhir/Patient?family=Testperson").get_json()["total"] == 0
    assert client.get("/fhir/Organization?name=Pipeline").get_json()["total"] == 0


def test_deferred_work_keeps_the_step_that_deferred_it(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Work a step defers to the end of the transaction (tx.defer) runs under that step's row:
    deferring cannot launder a write the step may not make."""
    fhir = services(app).fhir

    def defers_an_organization(tx: Tx, stored: StoredResource, created: bool) -> None:
        if stored.type == "Patient" and created:
            body = {
                "resourceType": "Organization",
                "id": str(uuid.uuid4()),
                "name": "Pipeline Test Org",
            }
            tx.defer("rogue", lambda t: fhir.update_in(t, body))

    with_extra(app, step=Step("deferring", "defers an unnamed type", defers_an_organization))
    with caplog.at_level(logging.ERROR):
        assert post(client, patient()).status_code == 500
    assert "step 'deferring' stored Organization" in caplog.text
    assert client.get("/fhir/Organization?name=Pipeline").get_json()["total"] == 0


def test_a_step_may_store_what_its_row_names(app: Flask, client: FlaskClient) -> None:
    fhir = services(app).fhir
    made: list[str] = []

    def writes_an_organization(tx: Tx, stored: StoredResource, created: bool) -> None:
        if stored.type == "Patient" and created:
            bid = str(uuid.uuid4())
            fhir.update_in(
                tx, {"resourceType": "Organization", "id": bid, "name": "Pipeline Test Org"}
            )
            made.append(bid)

    with_extra(
        app,
        step=Step(
            "named",
            "stores Organization",
            writes_an_organization,
            stores=frozenset({"Organization"}),
        ),
    )
    assert post(client, patient()).status_code == 201
    assert client.get(f"/fhir/Organization/{made[0]}").status_code == 200


def test_a_check_that_changes_what_it_checks_fails_loudly(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    def meddles(tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
        body["gender"] = "unknown"

    with_extra(app, check=Check("meddling", "nothing", meddles))
    with caplog.at_level(logging.ERROR):
        assert post(client, patient()).status_code == 500
    assert "check 'meddling' changed the Patient" in caplog.text
    assert client.get("/fhir/Patient?family=Testperson").get_json()["total"] == 0


def test_outside_strict_mode_a_violation_is_logged_and_the_write_goes_on(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Clinical data is never lost to a bookkeeping rule: in production the finding is logged
    (no PHI: the step and the type only) and the write is stored."""
    fhir = services(app).fhir

    def writes_an_organization(tx: Tx, stored: StoredResource, created: bool) -> None:
        if stored.type == "Patient" and created:
            fhir.update_in(
                tx,
                {
                    "resourceType": "Organization",
                    "id": str(uuid.uuid4()),
                    "name": "Pipeline Test Org",
                },
            )

    base: WritePipeline = write_pipeline(services(app))
    install(
        fhir,
        replace(
            base, steps=(*base.steps, Step("rogue", "stores Organization", writes_an_organization))
        ),
        strict=False,
    )
    with caplog.at_level(logging.ERROR, logger="fhir_kat.pipeline"):
        created = post(client, patient())
    assert created.status_code == 201
    assert client.get("/fhir/Organization?name=Pipeline").get_json()["total"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "fhir_kat.pipeline"]
    assert messages == [
        "write pipeline: step 'rogue' stored Organization, which its row does not name"
    ]
    assert "Testperson" not in caplog.text


def test_the_readme_shows_the_pipeline_the_app_runs(app: Flask) -> None:
    """README.md's "The write pipeline" block is ``WritePipeline.describe()`` of the running
    app: the page a newcomer reads cannot drift from the code."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- pipeline:start -->")
    block = readme[start : readme.index("<!-- pipeline:end -->")]
    shown = block.split("```text\n", 1)[1].rsplit("```", 1)[0].strip()
    assert shown == write_pipeline(services(app)).describe().strip()
