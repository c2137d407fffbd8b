"""Routing an artifact to partners inside the caller's transaction."""

from __future__ import annotations

import pytest

from fhir_kat.errors import Unprocessable
from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.partners import parse_partners
from fhir_kat.exchange.routing import enqueue_artifact
from fhir_kat.store import Store

from .conftest import BASE, artifact

PARTNERS = parse_partners(
    {
        "ha": {"base_url": BASE, "organization": "https://example.org/sid/org|HA-ISLAND"},
        "screening-only": {"base_url": BASE, "artifact_kinds": ["screenings"]},
        "consents-only": {"base_url": BASE, "resource_types": ["Consent"]},
        "off": {"base_url": BASE, "enabled": False},
        "registry": {"base_url": BASE, "write_mode": "put"},
    }
)


def test_each_interested_partner_gets_its_own_wire_form(store: Store) -> None:
    with store.write() as tx:
        queued = enqueue_artifact(tx, PARTNERS, "screenings", artifact(1), "pt-0001", "TREAT")
    assert sorted(queued) == ["ha", "registry", "screening-only"]
    batch = {d.partner: d for d in ob.claim(store, "w", 10)}
    assert batch["ha"].payload["entry"][0]["request"]["method"] == "POST"
    assert batch["registry"].payload["entry"][0]["request"]["method"] == "PUT"
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


def test_an_undeliverable_artifact_rolls_the_whole_write_back(store: Store) -> None:
    broken = artifact(3)
    del broken["entry"][2]["resource"]["identifier"]
    with pytest.raises(Unprocessable), store.write() as tx:
        enqueue_artifact(tx, PARTNERS, "screenings", broken, "pt-0003")
    assert ob.stats(store).pending == 0
    with pytest.raises(ValueError, match="patient_key"), store.write() as tx:
        enqueue_artifact(tx, PARTNERS, "screenings", artifact(4), None, "TREAT")
