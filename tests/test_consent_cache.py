"""The consent decision point's cache holds committed state only: Consents a write transaction
saw and then rolled back must never answer a later request (SQLite reuses a rolled-back write
sequence, so a later commit can land on the same cache key)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from fhir_kat.security.consent import Actor, ConsentDecisionPoint
from fhir_kat.store import Store

NOW = datetime(2026, 6, 1, tzinfo=UTC)
HA = Actor(references=frozenset({"Organization/ha"}), identifiers=frozenset())


def _consent(cid: str, patient: str, decision: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": cid,
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
        "provision": {
            "type": decision,
            "actor": [{"reference": {"reference": "Organization/ha"}}],
            "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HOPERAT"}
            ],
        },
    }


class _Rollback(Exception):
    pass


def test_a_rolled_back_consent_never_answers_later(database_url: str) -> None:
    store = Store(database_url)
    store.create_schema()
    pdp = ConsentDecisionPoint()
    with store.write() as tx:
        tx.put(_consent("c0", "p0", "permit"), current=None)

    with pytest.raises(_Rollback), store.write() as tx:
        tx.put(_consent("c1", "p1", "permit"), current=None)
        assert pdp.permits(tx, "p1", HA, "HOPERAT", "Observation", NOW)  # its own write
        raise _Rollback

    # A different Consent commits: same count, and on SQLite the same write sequence.
    with store.write() as tx:
        tx.put(_consent("c2", "p1", "deny"), current=None)
    with store.read() as tx:
        assert not pdp.permits(tx, "p1", HA, "HOPERAT", "Observation", NOW)
        assert pdp.permits(tx, "p0", HA, "HOPERAT", "Observation", NOW)
    store.dispose()
