"""Routing an artifact to partners inside the caller's transaction."""

from __future__ import annotations

import pytest

from fhir_kat.errors import Unprocessable
from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.partners import parse_partners
from fhir_kat.exchange.routing import enqueue_artifact, resolver, wire_form
from fhir_kat.store import Store

from .conftest import BASE, artifact

RAW = {
    "ha": {"base_url": BASE, "organization": "https://example.org/sid/org|HA-ISLAND"},
    "screening-only": {"base_url": BASE, "artifact_kinds": ["screenings"]},
    "consents-only": {"base_url": BASE, "resource_types": ["Consent"]},
    "off": {"base_url": BASE, "enabled": False},
    "registry": {"base_url": BASE, "write_mode": "put"},
}
PARTNERS = parse_partners(RAW)


def test_each_interested_partner_gets_its_own_wire_form(store: Store) -> None:
    with store.write() as tx:
        queued = enqueue_artifact(tx, PARTNERS, "screenings", artifact(1), "pt-0001", "TREAT")
    assert sorted(queued) == ["ha", "registry", "screening-only"]
    batch = {d.partner: d for d in ob.claim(store, "w", 10)}
    with store.read() as tx:
        form = {
            name: wire_form(d.kind, d.payload, PARTNERS[name], resolver(tx))
            for name, d in batch.items()
        }
    assert form["ha"]["entry"][0]["request"]["method"] == "POST"
    assert form["registry"]["entry"][0]["request"]["method"] == "PUT"
    assert batch["ha"].consent_check == {
        "patient": "pt-0001",
        "partner": "ha",
        "actor": "https://example.org/sid/org|HA-ISLAND",
        "purpose": "TREAT",
    }
    assert batch["registry"].consent_check is not None
    assert batch["registry"].consent_check["actor"] is None
    with store.write() as tx:
        assert sorted(
            enqueue_artifact(tx, PARTNERS, "medication-administrations", artifact(2), None)
        ) == [
            "ha",
            "registry",
        ]


def test_what_a_partner_can_take_is_decided_at_send_time_never_at_enqueue(store: Store) -> None:
    broken = artifact(3)
    del broken["entry"][2]["resource"]["identifier"]
    del broken["entry"][1]["resource"]["id"]
    strict = parse_partners(
        {"strict": {"base_url": BASE, "without_identifier": "dead-letter"}, **RAW}
    )
    with store.write() as tx:  # nothing here refuses: the caller's write commits
        queued = enqueue_artifact(tx, strict, "screenings", broken, "pt-0003")
    assert "strict" in queued and ob.stats(store).pending == len(queued)
    delivery = next(d for d in ob.claim(store, "w", 10) if d.partner == "strict")
    with store.read() as tx, pytest.raises(Unprocessable) as err:
        wire_form(delivery.kind, delivery.payload, strict["strict"], resolver(tx))
    assert [i.expression for i in err.value.issues] == [("entry[1]",)]
    with pytest.raises(ValueError, match="patient_key"), store.write() as tx:
        enqueue_artifact(tx, PARTNERS, "screenings", artifact(4), None, "TREAT")


def test_the_care_team_gets_no_consent_check(store: Store) -> None:
    team = parse_partners(
        {"team": {"base_url": BASE, "artifact_kinds": ["safety-flags"], "care_team": True}}
    )
    with store.write() as tx:
        enqueue_artifact(tx, team, "safety-flags", artifact(5), "pt-0005", "TREAT")
    (delivery,) = ob.claim(store, "w", 10)
    assert delivery.consent_check is None
