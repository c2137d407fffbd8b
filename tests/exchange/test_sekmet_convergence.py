"""A partner's copy converges to the program's record (issue 18), against a real FHIR server
(SEKMET on loopback): a referral goes out before triage, then its Task moves through intake,
the first session and program end, a safety Flag is raised and resolved, a questionnaire
response brings its scores — with the worker sending between the steps, the partner ends
holding every resource it was sent in the state stored now, scores included."""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select

from fhir_kat.app import create_app
from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.bundles import NO_IDENTIFIER_SEARCH, identifier_query
from fhir_kat.exchange.copies import partner_copy
from fhir_kat.exchange.worker import DeliveryWorker
from fhir_kat.settings import Settings
from fhir_kat.store import Store
from tests.conftest import token_for

from .conftest import SekmetServer

KINDS = [
    "referrals",
    "screenings",
    "medication-administrations",
    "questionnaire-responses",
    "safety-flags",
]

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
FHIR = "application/fhir+json"


def _example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_text())
    return loaded


def _post(c: FlaskClient, path: str, body: dict[str, Any], status: int = 201) -> Any:
    r = c.post(path, data=json.dumps(body), content_type="application/json")
    assert r.status_code == status, r.get_json()
    return r.get_json()


def _comparable(resource: dict[str, Any]) -> Any:
    """A resource as both sides must agree on: without ids, meta and references (each server
    has its own ids; the references were checked by the partner's transaction)."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items() if k not in ("id", "meta", "reference")}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(resource)


def _converged(
    store: Store, name: str, partner: SekmetServer, *, by_identifier: bool
) -> Counter[str]:
    """Every resource ``name`` was sent is at the partner once, equal to what is stored now;
    returns how many were compared, per type."""
    with store.read() as tx:
        sent = [
            (r.resource_type, r.resource_id)
            for r in tx.conn.execute(select(partner_copy).where(partner_copy.c.partner == name))
        ]
        current = {key: tx.get(*key) for key in sent}
    compared: Counter[str] = Counter()
    for (rtype, rid), stored in sorted(current.items()):
        assert stored is not None and not stored.deleted
        ours = stored.json()
        query = (
            identifier_query(ours) if by_identifier and rtype not in NO_IDENTIFIER_SEARCH else None
        )
        if query is None:
            theirs = partner.get(f"{rtype}/{rid}")  # sent by PUT with our id
        else:
            found = partner.search_all(rtype, **dict([query.split("=", 1)]))
            assert len(found) == 1, (rtype, query, len(found))
            theirs = found[0]
        assert _comparable(theirs) == _comparable(ours), (name, rtype)
        compared[rtype] += 1
    return compared


def _drain(worker: DeliveryWorker) -> None:
    for _ in range(30):
        if not worker.run_once().claimed:
            return
    raise AssertionError("the outbox did not drain in 30 batches")


def test_the_partner_ends_with_every_resource_in_its_current_state(
    settings: Settings, sekmet_factory: Callable[..., SekmetServer]
) -> None:
    ehr, registry = sekmet_factory(), sekmet_factory()
    partners = {
        # Conditional create (the default): later versions go as conditional updates. SEKMET
        # has no identifier search on QuestionnaireResponse, so that kind goes to the other.
        "ehr": {
            "base_url": ehr.base,
            "timeout_seconds": 10,
            "artifact_kinds": [k for k in KINDS if k != "questionnaire-responses"],
            "care_team": True,  # no consent asked: this test is about versions
        },
        "registry": {
            "base_url": registry.base,
            "timeout_seconds": 10,
            "write_mode": "put",
            "artifact_kinds": KINDS,
            "care_team": True,
        },
    }
    app = create_app(replace(settings, extra={**settings.extra, "partners": partners}))
    state = app.extensions["fhir_kat"]
    worker = DeliveryWorker(state.store, state.partners, lambda _c: True, batch_size=5)
    try:
        c = app.test_client()
        c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app, 'staff')}"
        _post(c, "/api/v1/referrals", _example("referrals"))
        _drain(worker)
        screening = _example("screenings")
        _post(c, "/api/v1/screenings", screening)
        _drain(worker)
        for step in ("psychiatrist-clearance", "contraindication-check"):
            _post(
                c,
                "/api/v1/screenings",
                copy.deepcopy(screening) | {"step": step, "source_id": f"S-{step}"},
            )
        session = _example("medication-administrations")
        session["vital_signs_before"]["systolic_mmhg"] = 190  # raises a safety Flag
        _post(c, "/api/v1/medication-administrations", session)
        _drain(worker)
        _post(c, "/api/v1/questionnaire-responses", _example("questionnaire-responses"))
        flags = c.get("/fhir/Flag?category=safety").get_json()["entry"]
        assert flags
        for entry in flags:  # a clinician resolves them
            flag = entry["resource"]
            flag.pop("meta")
            flag["status"] = "inactive"
            flag["period"] = dict(flag["period"], end="2026-03-03")
            flag["extension"] = [
                *flag.get("extension", []),
                {
                    "url": "https://fhir-kat.example.org/fhir/StructureDefinition/flag-resolution",
                    "extension": [
                        {"url": "by", "valueReference": {"display": "Program psychiatrist"}},
                        {"url": "at", "valueDateTime": "2026-03-03"},
                    ],
                },
            ]
            r = c.put(f"/fhir/Flag/{flag['id']}", data=json.dumps(flag), content_type=FHIR)
            assert r.status_code == 200, r.get_json()
        task = c.get("/fhir/Task?code=http://hl7.org/fhir/CodeSystem/task-code|fulfill")
        task_id = task.get_json()["entry"][0]["resource"]["id"]
        _post(
            c,
            f"/api/v1/referrals/{task_id}/$end",
            {"outcome": "completed", "date": "2026-06-01"},
            status=200,
        )
        _drain(worker)

        infos = ob.list_deliveries(state.store, limit=200)
        assert {i.status for i in infos} == {"delivered"}, [(i.id, i.last_error) for i in infos]
        task_now = _converged(state.store, "ehr", ehr, by_identifier=True)
        assert task_now["Task"] >= 1 and task_now["Flag"] >= 1
        counts = _converged(state.store, "registry", registry, by_identifier=False)
        assert counts["QuestionnaireResponse"] == 1
        # Every score the response yielded reached the partner with it.
        with state.store.read() as tx:
            qr_id = next(
                r.resource_id
                for r in tx.conn.execute(
                    select(partner_copy).where(
                        partner_copy.c.resource_type == "QuestionnaireResponse"
                    )
                )
            )
        scores = [
            o
            for o in registry.search_all("Observation")
            if any(
                d.get("reference") == f"QuestionnaireResponse/{qr_id}"
                for d in o.get("derivedFrom", [])
            )
        ]
        assert scores, "no score Observation reached the partner"
        task = c.get(f"/fhir/Task/{task_id}").get_json()
        assert task["status"] == "completed"
        at_ehr = ehr.search_all("Task", **dict([identifier_query(task).split("=", 1)]))  # type: ignore[union-attr]
        assert at_ehr[0]["status"] == "completed"
        assert at_ehr[0]["businessStatus"] == task["businessStatus"]
    finally:
        worker.close()
        state.export.shutdown()
        state.store.dispose()
