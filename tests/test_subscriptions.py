"""R4 rest-hook Subscriptions, on SQLite and PostgreSQL: what a client may subscribe to, which
writes notify whom (exactly what the owner's own search returns), delivery through the outbox
to a real subscriber on loopback (in order, also after the subscriber was down), and
consent-blocked deliveries released by a later Consent."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from fhir_kat.app import create_app
from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.netguard import networks
from fhir_kat.exchange.outbox import RetryPolicy
from fhir_kat.exchange.partners import PartnerConfig
from fhir_kat.exchange.worker import DeliveryWorker
from fhir_kat.services.delivery import make_consent_gate, make_delivery_audit
from fhir_kat.settings import Settings
from fhir_kat.store import Store
from tests.conftest import HA_ORG, TEST_CLIENTS, _registration, client_as
from tests.support.conformance import assert_conformant

PHQ9 = "44261-6"  # PHQ-9 total score (DOMAIN.md)
GAD7 = "70274-6"  # GAD-7 total score (DOMAIN.md)
LOINC = "http://loinc.org"
PURPOSES = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ORG_SYSTEM = "https://fhir-kat.example.org/fhir/sid/organization"
LOOPBACK = "127.0.0.0/8"


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test clients, and the health authority's subscriber: it reads as the health
    authority does and may manage its Subscriptions (the plain ``ha`` client may not)."""
    ha = _registration(
        "health-authority",
        ["system/*.rs", "system/Subscription.cruds"],
        "ha-sub-secret",
        organization=HA_ORG,
    )
    return replace(
        settings,
        extra={
            "clients": {**TEST_CLIENTS, "ha-sub": ha},
            # The subscribers here listen on loopback, which only an operator can allow.
            "exchange": {"subscription_endpoint_networks": [LOOPBACK]},
        },
    )


def post(c: FlaskClient, path: str, body: Any) -> Any:
    return c.post(path, data=json.dumps(body), content_type="application/fhir+json")


def put(c: FlaskClient, path: str, body: Any) -> Any:
    return c.put(path, data=json.dumps(body), content_type="application/fhir+json")


def created(c: FlaskClient, path: str, body: Any) -> dict[str, Any]:
    r = post(c, path, body)
    assert r.status_code == 201, r.get_json()
    doc: dict[str, Any] = r.get_json()
    return doc


def subscription(criteria: str, endpoint: str, **channel: Any) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "follow outcomes",
        "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": endpoint, **channel},
    }


def observation(patient: str | None, code: str = PHQ9, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "valueInteger": 7,
        **extra,
    }
    if patient:
        body["subject"] = {"reference": f"Patient/{patient}"}
    return body


def consent(patient: str, org_id: str, status: str = "active") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
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
                    "reference": {"reference": f"Organization/{org_id}"},
                }
            ],
        },
    }


def store_of(app: Flask) -> Store:
    s: Store = app.extensions["fhir_kat"].store
    return s


def queued(app: Flask, sid: str) -> list[dict[str, Any]]:
    """The notifications queued for one Subscription, in queue order."""
    with store_of(app).read() as tx:
        rows = tx.conn.execute(
            select(ob.outbox.c.payload)
            .where(ob.outbox.c.partner == f"subscription:{sid}")
            .order_by(ob.outbox.c.id)
        )
        return [json.loads(r.payload) for r in rows]


def statuses(app: Flask, partner: str) -> list[str]:
    return [d.status for d in reversed(ob.list_deliveries(store_of(app), partner=partner))]


class Subscriber:
    """A subscriber's endpoint on 127.0.0.1 that records every request it gets, in order.
    ``stop()`` closes the port (connections are refused); ``start()`` opens the same one."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[tuple[str, str, bytes, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner.lock:
                    owner.received.append((self.command, self.path, body, dict(self.headers)))
                # No keep-alive: a stopped subscriber must refuse the very next request.
                self.close_connection = True
                self.send_response(owner.status)
                self.send_header("Connection", "close")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _record

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        assert self.server is not None and self.thread is not None
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def paths(self) -> list[str]:
        with self.lock:
            return [f"{m} {p}" for m, p, _, _ in self.received]


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    s = Subscriber()
    yield s
    s.stop()


class Clock:
    """Wall-clock time plus an offset the test moves (to let backoffs run out)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def make_worker(
    app: Flask, clock: Clock, partners: dict[str, PartnerConfig] | None = None
) -> DeliveryWorker:
    state = app.extensions["fhir_kat"]
    return DeliveryWorker(
        state.store,
        partners or {},
        make_consent_gate(state.store, state.consent, clock),
        clock,
        lambda _s: None,
        worker_id="test",
        on_outcome=make_delivery_audit(state.store, clock),
        subscription_policy=RetryPolicy(max_attempts=6, base_seconds=1, cap_seconds=2),
        subscription_timeout_seconds=5,
        endpoint_policy=networks([LOOPBACK]),
    )


def drain(worker: DeliveryWorker, limit: int = 50) -> None:
    for _ in range(limit):
        if worker.run_once().claimed == 0:
            return
    raise AssertionError("the outbox did not drain")


@pytest.fixture
def world(app: Flask) -> dict[str, Any]:
    """Staff, the health authority's Organization, a patient who consents to share with it
    and one who does not."""
    staff = client_as(app, "staff")
    system, value = HA_ORG.split("|")
    org = created(
        staff,
        "/fhir/Organization",
        {"resourceType": "Organization", "identifier": [{"system": system, "value": value}]},
    )["id"]
    shared = created(staff, "/fhir/Patient", {"resourceType": "Patient"})["id"]
    private = created(staff, "/fhir/Patient", {"resourceType": "Patient"})["id"]
    created(staff, "/fhir/Consent", consent(shared, org))
    return {
        "staff": staff,
        "ha": client_as(app, "ha-sub"),
        "org": org,
        "shared": shared,
        "private": private,
    }


# ------------------------------------------------------------------------------ creating one


def test_a_requested_subscription_becomes_active(app: Flask, subscriber: Subscriber) -> None:
    ha = client_as(app, "ha-sub")
    r = post(ha, "/fhir/Subscription", subscription(f"Observation?code={PHQ9}", subscriber.url))
    assert r.status_code == 201
    assert r.get_json()["status"] == "active"
    assert_conformant(r.get_json())
    # ... and "off" stays off (a subscriber may pause itself)
    off = dict(r.get_json(), status="off")
    assert put(ha, f"/fhir/Subscription/{off['id']}", off).get_json()["status"] == "off"


@pytest.mark.parametrize(
    ("change", "expression"),
    [
        ({"channel": {"type": "websocket"}}, "Subscription.channel.type"),
        (
            {"channel": {"type": "email", "endpoint": "mailto:a@b.example"}},
            "Subscription.channel.type",
        ),
        (
            {"channel": {"type": "rest-hook", "endpoint": "ftp://x.example/h"}},
            "Subscription.channel.endpoint",
        ),
        (
            {
                "channel": {
                    "type": "rest-hook",
                    "endpoint": "https://x.example/h",
                    "payload": "text/plain",
                }
            },
            "Subscription.channel.payload",
        ),
        (
            {
                "channel": {
                    "type": "rest-hook",
                    "endpoint": "https://x.example/h",
                    "header": ["Host: evil"],
                }
            },
            "Subscription.channel.header[0]",
        ),
        ({"criteria": "Patient?gender=female"}, "Subscription.criteria"),
        ({"criteria": "Observation?nonsense=1"}, "Subscription.criteria"),
        ({"criteria": "Observation?code=1&_include=Observation:patient"}, "Subscription.criteria"),
        ({"status": "error"}, "Subscription.status"),
    ],
)
def test_bad_subscriptions_are_refused_with_an_outcome(
    app: Flask, change: dict[str, Any], expression: str
) -> None:
    body = {**subscription(f"Observation?code={PHQ9}", "https://x.example/h"), **change}
    r = post(client_as(app, "ha-sub"), "/fhir/Subscription", body)
    assert r.status_code == 422, r.get_json()
    outcome = r.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [i["expression"] for i in outcome["issue"]] == [[expression]]
    with store_of(app).read() as tx:
        assert tx.search(_all("Subscription"))[1] == 0  # nothing half-stored


def _all(rtype: str) -> Any:
    from fhir_kat.search import SearchQuery

    return SearchQuery(rtype, count=10)


def test_only_the_right_roles_subscribe_and_only_owners_see_them(app: Flask) -> None:
    url = "https://subscriber.example/hook"
    # staff and admin may read Subscriptions, not create them; a referrer may not search
    # Observations, so it may not subscribe to them either
    assert (
        post(client_as(app, "staff"), "/fhir/Subscription", subscription("Task?", url)).status_code
        == 403
    )
    r = post(
        client_as(app, "referrer"),
        "/fhir/Subscription",
        subscription(f"Observation?code={PHQ9}", url),
    )
    assert r.status_code == 403 and r.get_json()["issue"][0]["expression"] == [
        "Subscription.criteria"
    ]
    mine = created(
        client_as(app, "referrer"), "/fhir/Subscription", subscription("Task?status=accepted", url)
    )
    other = client_as(app, "other-referrer")
    assert other.get(f"/fhir/Subscription/{mine['id']}").status_code == 404  # not its own
    assert other.get("/fhir/Subscription").get_json()["total"] == 0
    assert (
        put(other, f"/fhir/Subscription/{mine['id']}", dict(mine, status="off")).status_code == 403
    )
    assert other.delete(f"/fhir/Subscription/{mine['id']}").status_code == 403
    assert client_as(app, "referrer").get("/fhir/Subscription").get_json()["total"] == 1
    assert client_as(app, "admin").get(f"/fhir/Subscription/{mine['id']}").status_code == 200
    assert client_as(app, "referrer").delete(f"/fhir/Subscription/{mine['id']}").status_code == 204


# ------------------------------------------------------------------------------ matching


CRITERIA = [
    f"Observation?code={LOINC}|{PHQ9}",  # token with system
    f"Observation?code={GAD7}",  # token without system
    f"Observation?code={PHQ9},{GAD7}&status=final",  # OR within, AND across parameters
    f"Observation?code:not={PHQ9}",
    "Observation?subject=Patient/{shared}",  # reference
    "Observation?date=ge2026-03-01",  # date on effective[x]
    "Observation?_lastUpdated=gt2000-01-01",  # every new version
    "Observation?_lastUpdated=lt2000-01-01",  # none
    "Observation?status=amended",
    "Observation",  # every Observation the owner may see
]


def test_notifications_are_exactly_what_the_owners_search_returns(
    app: Flask, world: dict[str, Any]
) -> None:
    ha, staff = world["ha"], world["staff"]
    subs = {}
    for criteria in CRITERIA:
        text = criteria.format(shared=world["shared"])
        subs[text] = created(ha, "/fhir/Subscription", subscription(text, "https://s.example/h"))[
            "id"
        ]
    written = []
    for patient in (world["shared"], world["private"], None):
        for code in (PHQ9, GAD7):
            for when in ("2026-02-10", "2026-03-10"):
                body = observation(patient, code, effectiveDateTime=when)
                written.append(created(staff, "/fhir/Observation", body)["id"])
        created(staff, "/fhir/Flag", _flag(patient)) if patient else None
    amended = created(staff, "/fhir/Observation", observation(world["shared"], status="amended"))
    written.append(amended["id"])

    for criteria, sid in subs.items():
        notified = [n["id"] for n in queued(app, sid)]
        query = criteria.partition("?")[2]
        bundle = ha.get(f"/fhir/Observation?{query}&_count=1000").get_json()
        found = {e["resource"]["id"] for e in bundle.get("entry", [])} & set(written)
        assert sorted(notified) == sorted(found), criteria
        assert len(notified) == len(set(notified))
    # the patient who did not consent is never notified about, whatever the criteria
    everything = queued(app, subs["Observation"])
    assert world["private"] not in {n["patient"] for n in everything}
    assert len(everything) == 2 * 4 + 1  # shared patient's 4 + 4 without a patient + amended
    assert {n["versionId"] for n in everything} == {1}


def _flag(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Flag",
        "status": "active",
        "code": {"text": "safety review"},
        "subject": {"reference": f"Patient/{patient}"},
    }


def test_each_matching_version_notifies_and_a_failed_transaction_queues_nothing(
    app: Flask, world: dict[str, Any]
) -> None:
    ha, staff = world["ha"], world["staff"]
    final = created(
        ha, "/fhir/Subscription", subscription("Observation?status=final", "https://s.example/h")
    )["id"]
    amended = created(
        ha, "/fhir/Subscription", subscription("Observation?status=amended", "https://s.example/h")
    )["id"]
    obs = created(staff, "/fhir/Observation", observation(world["shared"]))
    assert (
        put(staff, f"/fhir/Observation/{obs['id']}", dict(obs, status="amended")).status_code == 200
    )
    assert [(n["id"], n["versionId"]) for n in queued(app, final)] == [(obs["id"], 1)]
    assert [(n["id"], n["versionId"]) for n in queued(app, amended)] == [(obs["id"], 2)]
    # a transaction that fails stores nothing and queues nothing
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": observation(world["shared"]),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": {"resourceType": "Observation"},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    assert post(staff, "/fhir", bundle).status_code == 400
    assert len(queued(app, final)) == 1


def test_a_referrer_is_notified_only_about_its_own_tasks(app: Flask) -> None:
    staff = client_as(app, "staff")
    roles = {}
    for value in ("CLINIC-7", "CLINIC-8"):  # the referrer's organisation, and another one
        org = created(
            staff,
            "/fhir/Organization",
            {
                "resourceType": "Organization",
                "identifier": [{"system": ORG_SYSTEM, "value": value}],
            },
        )["id"]
        roles[value] = created(
            staff,
            "/fhir/PractitionerRole",
            {
                "resourceType": "PractitionerRole",
                "organization": {"reference": f"Organization/{org}"},
            },
        )["id"]
    referrer = client_as(app, "referrer")
    url = "https://clinic-7.example/hook"
    own = created(
        referrer,
        "/fhir/Subscription",
        subscription(f"Task?requester=PractitionerRole/{roles['CLINIC-7']}", url),
    )["id"]
    broad = created(
        referrer, "/fhir/Subscription", subscription("Task?status=requested,accepted", url)
    )["id"]
    foreign = created(
        referrer,
        "/fhir/Subscription",
        subscription(f"Task?requester=PractitionerRole/{roles['CLINIC-8']}", url),
    )["id"]
    tasks: dict[str, list[str]] = {"CLINIC-7": [], "CLINIC-8": []}
    for value in ("CLINIC-7", "CLINIC-8", "CLINIC-7", "CLINIC-8"):
        task = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "requester": {"reference": f"PractitionerRole/{roles[value]}"},
        }
        tasks[value].append(created(staff, "/fhir/Task", task)["id"])
    first = tasks["CLINIC-7"][0]
    task = staff.get(f"/fhir/Task/{first}").get_json()
    assert put(staff, f"/fhir/Task/{first}", dict(task, status="accepted")).status_code == 200

    mine = [tasks["CLINIC-7"][0], tasks["CLINIC-7"][1], first]
    assert [n["id"] for n in queued(app, own)] == mine
    assert [n["id"] for n in queued(app, broad)] == mine
    assert queued(app, foreign) == []
    # what the referrer would find by polling is the same
    polled = referrer.get("/fhir/Task?status=requested,accepted").get_json()
    assert {e["resource"]["id"] for e in polled["entry"]} == set(tasks["CLINIC-7"])


# ------------------------------------------------------------------------------ delivery


def test_a_live_subscriber_gets_every_notification_in_order_also_after_being_down(
    app: Flask, world: dict[str, Any], subscriber: Subscriber
) -> None:
    ha, staff = world["ha"], world["staff"]
    full = created(
        ha,
        "/fhir/Subscription",
        subscription(
            f"Observation?code={PHQ9}",
            subscriber.url,
            payload="application/fhir+json",
            header=["Authorization: Bearer subscriber-secret"],
        ),
    )["id"]
    ping = created(
        ha, "/fhir/Subscription", subscription(f"Observation?code={GAD7}", subscriber.url)
    )["id"]
    clock = Clock()
    worker = make_worker(app, clock)
    expected: list[str] = []

    def write(n: int) -> None:
        for _ in range(n):
            obs = created(staff, "/fhir/Observation", observation(world["shared"]))
            expected.append(f"PUT /hook/Observation/{obs['id']}")
            created(staff, "/fhir/Observation", observation(world["shared"], GAD7))
            expected.append("POST /hook")

    write(3)
    drain(worker)
    assert subscriber.paths() == expected

    subscriber.stop()  # the subscriber goes down; the program keeps writing
    write(3)
    report = worker.run_once()  # one claim per subscriber: each waits behind its oldest
    assert report.delivered == 0 and report.retried == 2
    assert ob.stats(store_of(app)).pending == 6
    subscriber.start()  # back on the same port
    clock.offset += timedelta(minutes=10)  # past every backoff
    drain(worker)
    worker.close()

    assert subscriber.paths() == expected  # in order, nothing lost, nothing twice
    assert statuses(app, f"subscription:{full}") == ["delivered"] * 6
    assert statuses(app, f"subscription:{ping}") == ["delivered"] * 6
    for method, path, body, headers in subscriber.received:
        if method == "PUT":
            assert headers["Authorization"] == "Bearer subscriber-secret"
            assert headers["Content-Type"] == "application/fhir+json"
            sent = json.loads(body)
            stored = staff.get(f"/fhir/{path.removeprefix('/hook/')}").get_json()
            assert sent == stored
        else:
            assert body == b"" and "Authorization" not in headers
    # every disclosure is audited with its patient
    events = client_as(app, "admin").get(
        f"/fhir/AuditEvent?patient=Patient/{world['shared']}&_count=500"
    )
    details = [e["resource"].get("outcomeDesc", "") for e in events.get_json().get("entry", [])]
    assert sum("subscription:" in d for d in details) == 12


def test_a_deleted_or_switched_off_subscription_is_not_notified(
    app: Flask, world: dict[str, Any], subscriber: Subscriber
) -> None:
    ha, staff = world["ha"], world["staff"]
    gone = created(ha, "/fhir/Subscription", subscription("Observation", subscriber.url))
    paused = created(ha, "/fhir/Subscription", subscription("Observation", subscriber.url))
    created(staff, "/fhir/Observation", observation(world["shared"]))
    assert ha.delete(f"/fhir/Subscription/{gone['id']}").status_code == 204
    assert (
        put(ha, f"/fhir/Subscription/{paused['id']}", dict(paused, status="off")).status_code == 200
    )
    worker = make_worker(app, Clock())
    drain(worker)
    worker.close()
    assert subscriber.received == []
    assert statuses(app, f"subscription:{gone['id']}") == ["cancelled"]
    assert statuses(app, f"subscription:{paused['id']}") == ["cancelled"]
    created(staff, "/fhir/Observation", observation(world["shared"]))
    assert queued(app, paused["id"])[1:] == []  # off: nothing more is queued


# ------------------------------------------------------------------------------ consent later


def test_a_consent_that_arrives_later_releases_blocked_deliveries(
    app: Flask, world: dict[str, Any], subscriber: Subscriber
) -> None:
    ha, staff = world["ha"], world["staff"]
    store = store_of(app)
    # (1) a partner delivery queued before the patient consented to sharing with it
    partner = PartnerConfig(name="ha-ehr", base_url=subscriber.url, organization=HA_ORG)
    check = {
        "patient": world["private"],
        "partner": "ha-ehr",
        "actor": HA_ORG,
        "purpose": "HOPERAT",
    }
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    with store.write() as tx:
        ob.enqueue(tx, "ha-ehr", "bundle", bundle, world["private"], check)
    # (2) a notification queued while consent held, then revoked before it was sent
    sub = created(ha, "/fhir/Subscription", subscription("Observation", subscriber.url))["id"]
    created(staff, "/fhir/Observation", observation(world["shared"]))
    shared_consent = staff.get(f"/fhir/Consent?patient=Patient/{world['shared']}").get_json()
    revoked = dict(shared_consent["entry"][0]["resource"], status="inactive")
    assert put(staff, f"/fhir/Consent/{revoked['id']}", revoked).status_code == 200

    clock = Clock()
    worker = make_worker(app, clock, {"ha-ehr": partner})
    drain(worker)
    assert statuses(app, "ha-ehr") == ["blocked-consent"]
    assert statuses(app, f"subscription:{sub}") == ["blocked-consent"]
    assert subscriber.received == []

    # A Consent for someone else releases nothing.
    other = created(staff, "/fhir/Patient", {"resourceType": "Patient"})["id"]
    created(staff, "/fhir/Consent", consent(other, world["org"]))
    assert statuses(app, "ha-ehr") == ["blocked-consent"]
    # The patient's Consent arrives: its write puts the delivery back in the queue ...
    created(staff, "/fhir/Consent", consent(world["private"], world["org"]))
    assert statuses(app, "ha-ehr") == ["pending"]
    assert statuses(app, f"subscription:{sub}") == ["blocked-consent"]
    # ... and a Consent that still says no sends nothing: the gate asks again at send time.
    assert (
        put(
            staff, f"/fhir/Consent/{revoked['id']}", dict(revoked, dateTime="2026-01-02")
        ).status_code
        == 200
    )
    assert statuses(app, f"subscription:{sub}") == ["pending"]
    drain(worker)
    assert statuses(app, "ha-ehr") == ["delivered"]
    assert statuses(app, f"subscription:{sub}") == ["blocked-consent"]
    # Consent given again: the notification goes out.
    assert (
        put(staff, f"/fhir/Consent/{revoked['id']}", dict(revoked, status="active")).status_code
        == 200
    )
    drain(worker)
    worker.close()
    assert statuses(app, f"subscription:{sub}") == ["delivered"]
    assert subscriber.paths() == ["POST /hook", "POST /hook"]


# ------------------------------------------------------------------------------ issue 5 (b)


def test_the_referrer_hears_every_status_change_of_its_referral_in_order(
    app: Flask, subscriber: Subscriber
) -> None:
    from tests.test_referral_workflow import example, send

    referrer, staff = client_as(app, "referrer"), client_as(app, "staff")
    fulfil = "Task?code=http://hl7.org/fhir/CodeSystem/task-code|fulfill"
    created(
        referrer,
        "/fhir/Subscription",
        subscription(fulfil, subscriber.url, payload="application/fhir+json"),
    )
    # another clinic's subscription on the same criteria hears nothing about this referral
    other = created(
        client_as(app, "other-referrer"), "/fhir/Subscription", subscription(fulfil, subscriber.url)
    )
    assert send(referrer, "referrals", example("referrals")).status_code == 201
    screening = example("screenings")
    assert send(staff, "screenings", screening).status_code == 201
    for step in ("psychiatrist-clearance", "contraindication-check"):
        assert (
            send(
                staff, "screenings", screening | {"step": step, "source_id": f"S-{step}"}
            ).status_code
            == 201
        )
    assert (
        send(staff, "medication-administrations", example("medication-administrations")).status_code
        == 201
    )
    worker = make_worker(app, Clock())
    drain(worker)
    worker.close()

    (task,) = [e["resource"] for e in referrer.get(f"/fhir/{fulfil}").get_json()["entry"]]
    history = referrer.get(f"/fhir/Task/{task['id']}/_history").get_json()["entry"]
    versions = sorted((e["resource"] for e in history), key=lambda t: int(t["meta"]["versionId"]))
    got = [json.loads(body) for _, _, body, _ in subscriber.received]
    # Version 1 ("received") and its triage (version 2) commit together: only what a reader
    # could ever see is notified; every later change is, in order, exactly as stored.
    assert versions[0]["status"] == "requested"
    assert subscriber.paths() == [f"PUT /hook/Task/{task['id']}"] * (len(versions) - 1)
    assert got == versions[1:]
    assert [(t["status"], t["businessStatus"]["coding"][0]["code"]) for t in got] == [
        ("received", "eligible"),
        ("received", "nurse-intake-cleared"),
        ("received", "psychiatrist-cleared"),
        ("accepted", "intake-complete"),
        ("in-progress", "participating"),
    ]
    assert queued(app, other["id"]) == []


def test_an_owner_that_loses_its_registration_or_scopes_is_not_notified(
    app: Flask, world: dict[str, Any]
) -> None:
    sid = created(
        world["ha"], "/fhir/Subscription", subscription("Observation", "https://s.example/h")
    )["id"]
    registry = app.extensions["fhir_kat"].clients.clients
    created(world["staff"], "/fhir/Observation", observation(None))
    assert len(queued(app, sid)) == 1
    # the registration now grants Patient reads only: the old token's Observation scope is gone
    registry["ha-sub"] = replace(registry["ha-sub"], scopes=registry["staff-readonly"].scopes)
    created(world["staff"], "/fhir/Observation", observation(None))
    del registry["ha-sub"]
    created(world["staff"], "/fhir/Observation", observation(None))
    assert len(queued(app, sid)) == 1


# ------------------------------------------------------------------------ endpoint addresses


PRIVATE_ENDPOINTS = [
    "http://127.0.0.1:8080/hook",
    "http://localhost/hook",
    "http://api.localhost/hook",
    "http://169.254.169.254/latest/meta-data",  # a cloud metadata service
    "http://10.1.2.3/hook",
    "https://192.168.0.10/hook",
    "http://100.64.0.1/hook",  # carrier-grade NAT
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",  # loopback dressed as IPv6
    "http://[fd00::1]/hook",
    "http://0.0.0.0/hook",
]


def test_endpoints_on_private_addresses_are_refused_unless_the_operator_allows_them(
    settings: Settings,
) -> None:
    strict = create_app(replace(settings, extra={"clients": settings.extra["clients"]}))
    try:
        ha = client_as(strict, "ha-sub")
        for url in PRIVATE_ENDPOINTS:
            r = post(ha, "/fhir/Subscription", subscription("Observation", url))
            assert r.status_code == 422, url
            (problem,) = r.get_json()["issue"]
            assert problem["expression"] == ["Subscription.channel.endpoint"]
            assert "subscription_endpoint_networks" in problem["diagnostics"]
        for url in ("https://x.example/hook", "https://93.184.216.34/hook"):
            r = post(ha, "/fhir/Subscription", subscription("Observation", url))
            assert r.status_code == 201, url
    finally:
        strict.extensions["fhir_kat"].export.shutdown()
        strict.extensions["fhir_kat"].store.dispose()


def test_the_worker_never_connects_to_an_address_its_policy_refuses(
    app: Flask, world: dict[str, Any], subscriber: Subscriber
) -> None:
    """The service allowed loopback when the Subscription was written, the worker does not (as
    when a public name starts resolving to a private address): checked on the connected
    socket, the notification never reaches the address and is dead at once (no retries)."""
    ha, staff = world["ha"], world["staff"]
    sid = created(ha, "/fhir/Subscription", subscription("Observation", subscriber.url))["id"]
    created(staff, "/fhir/Observation", observation(world["shared"]))
    state = app.extensions["fhir_kat"]
    clock = Clock()
    strict = DeliveryWorker(
        state.store,
        {},
        make_consent_gate(state.store, state.consent, clock),
        clock,
        lambda _s: None,
        worker_id="strict",
    )
    try:
        report = strict.run_once()
    finally:
        strict.close()
    assert report.dead == 1 and report.retried == 0
    assert subscriber.received == []
    (dead,) = ob.list_deliveries(store_of(app), partner=f"subscription:{sid}")
    assert dead.status == "dead"
    assert "private or reserved address" in json.dumps(dead.last_error)


def test_an_open_and_a_closed_internal_port_end_alike_and_unconnected(
    app: Flask, world: dict[str, Any], subscriber: Subscriber
) -> None:
    """What the worker records for a refused address says nothing about the port: the open
    subscriber port and a closed one end dead with the same error, and neither is connected."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    ha, staff = world["ha"], world["staff"]
    open_sid = created(ha, "/fhir/Subscription", subscription("Observation", subscriber.url))["id"]
    closed_url = f"http://127.1:{closed}/hook"  # a short form of the same loopback address
    closed_sid = created(ha, "/fhir/Subscription", subscription("Observation", closed_url))["id"]
    created(staff, "/fhir/Observation", observation(world["shared"]))
    state = app.extensions["fhir_kat"]
    clock = Clock()
    strict = DeliveryWorker(
        state.store,
        {},
        make_consent_gate(state.store, state.consent, clock),
        clock,
        lambda _s: None,
        worker_id="strict",
    )
    try:
        report = strict.run_once()
    finally:
        strict.close()
    assert report.dead == 2 and report.retried == 0 and subscriber.received == []
    errors = [
        ob.list_deliveries(store_of(app), partner=f"subscription:{sid}")[0].last_error
        for sid in (open_sid, closed_sid)
    ]
    assert errors[0] == errors[1]


def test_a_dead_notification_puts_the_subscription_in_error_until_its_owner_resumes_it(
    app: Flask, world: dict[str, Any], subscriber: Subscriber
) -> None:
    ha, staff = world["ha"], world["staff"]
    sid = created(ha, "/fhir/Subscription", subscription("Observation", subscriber.url))["id"]
    subscriber.status = 410  # the subscriber's endpoint is gone: a permanent answer
    created(staff, "/fhir/Observation", observation(world["shared"]))
    worker = make_worker(app, Clock())
    drain(worker)
    stored = ha.get(f"/fhir/Subscription/{sid}").get_json()
    assert stored["status"] == "error"
    assert "could not be delivered" in stored["error"]
    assert world["shared"] not in stored["error"]  # no patient in the reason
    assert_conformant(stored)
    # in error, nothing more is queued for it
    created(staff, "/fhir/Observation", observation(world["shared"]))
    assert len(queued(app, sid)) == 1
    # a client cannot claim the error itself, and resumes the Subscription with "requested"
    assert put(ha, f"/fhir/Subscription/{sid}", stored).status_code == 422
    resumed = put(ha, f"/fhir/Subscription/{sid}", dict(stored, status="requested")).get_json()
    assert resumed["status"] == "active" and "error" not in resumed
    subscriber.status = 200
    created(staff, "/fhir/Observation", observation(world["shared"]))
    drain(worker)
    worker.close()
    assert statuses(app, f"subscription:{sid}") == ["dead", "delivered"]
    assert len(subscriber.received) == 2
