"""The wire form: deterministic transaction Bundles for conditional create and PUT."""

from __future__ import annotations

import json

import pytest

from fhir_kat.errors import Unprocessable
from fhir_kat.exchange.bundles import full_url_for, identifier_query, to_transaction

from .conftest import OBS_SYSTEM, PID_SYSTEM, artifact


def test_conditional_create_entries() -> None:
    bundle = to_transaction(artifact(7), "conditional-create")
    assert bundle["type"] == "transaction"
    patient, obs, _ = bundle["entry"]
    assert patient["request"] == {
        "method": "POST",
        "url": "Patient",
        "ifNoneExist": f"identifier={PID_SYSTEM}|P0007",
    }
    assert patient["fullUrl"] == full_url_for("Patient", "pt-0007")
    assert "id" not in patient["resource"]
    # The reference to the Patient now points at its entry, for the partner to resolve.
    assert obs["resource"]["subject"]["reference"] == patient["fullUrl"]
    assert obs["request"]["ifNoneExist"] == f"identifier={OBS_SYSTEM}|O0007-0"


def test_the_same_artifact_always_gives_the_same_bundle() -> None:
    first = json.dumps(to_transaction(artifact(3), "conditional-create"), sort_keys=True)
    again = json.dumps(to_transaction(artifact(3), "conditional-create"), sort_keys=True)
    assert first == again


def test_put_mode_keeps_our_ids() -> None:
    bundle = to_transaction(artifact(1), "put", partner_base_url="https://ehr.example.test/fhir")
    patient, obs, _ = bundle["entry"]
    assert patient["request"] == {"method": "PUT", "url": "Patient/pt-0001"}
    assert patient["fullUrl"] == "https://ehr.example.test/fhir/Patient/pt-0001"
    assert patient["resource"]["id"] == "pt-0001"
    assert obs["resource"]["subject"]["reference"] == "Patient/pt-0001"


def test_identifier_query_escapes_and_encodes() -> None:
    resource = {"identifier": [{"value": "no-system"}, {"system": "urn:x", "value": "a|b,c&d e"}]}
    assert identifier_query(resource) == "identifier=urn:x|a%5C|b%5C%2Cc%26d%20e"
    assert identifier_query({"identifier": [{"system": "urn:x"}]}) is None


def test_resources_without_identifier_go_by_put_or_are_refused_as_configured() -> None:
    art = artifact(2)
    del art["entry"][1]["resource"]["identifier"]
    # Default: the resource without a business identifier goes by PUT with our id, in the
    # same transaction; the entries that refer to it use that id.
    bundle = to_transaction(art, "conditional-create")
    patient, obs, third = bundle["entry"]
    assert patient["request"]["method"] == "POST"
    assert obs["request"] == {
        "method": "PUT",
        "url": f"Observation/{art['entry'][1]['resource']['id']}",
    }
    assert obs["resource"]["id"] == art["entry"][1]["resource"]["id"]
    assert obs["resource"]["subject"]["reference"] == patient["fullUrl"]
    assert third["request"]["method"] == "POST"
    with pytest.raises(Unprocessable) as err:
        to_transaction(art, "conditional-create", without_identifier="dead-letter")
    assert err.value.issues[0].expression == ("Bundle.entry[1].resource.identifier",)
    assert "conditional creates only" in err.value.issues[0].diagnostics
    del art["entry"][0]["resource"]["id"]
    with pytest.raises(Unprocessable):
        to_transaction(art, "put")


def test_a_filter_that_cuts_a_reference_is_refused() -> None:
    only_obs = frozenset({"Observation"})
    with pytest.raises(Unprocessable) as err:
        to_transaction(artifact(4), "conditional-create", resource_types=only_obs)
    assert "Patient that this partner does not accept" in str(err.value)
    with pytest.raises(Unprocessable):
        to_transaction(artifact(4), "put", resource_types=frozenset({"Consent"}))
    patients_only = to_transaction(
        artifact(4), "conditional-create", resource_types=frozenset({"Patient"})
    )
    assert [e["request"]["url"] for e in patients_only["entry"]] == ["Patient"]


def test_source_identifier_system_covers_resources_without_a_business_identifier() -> None:
    system = "https://fhir-kat.example.org/fhir/sid/resource"
    resources = [
        {"resourceType": "Encounter", "id": "enc-1", "status": "finished"},
        {"resourceType": "QuestionnaireResponse", "id": "qr-1", "status": "completed"},
        {"resourceType": "Observation", "id": "o-1", "identifier": [{"value": "no-system"}]},
    ]
    bundle = to_transaction(resources, "conditional-create", source_identifier_system=system)
    enc, qr, obs = (e["resource"] for e in bundle["entry"])
    assert enc["identifier"] == [{"system": system, "value": "enc-1"}]
    assert qr["identifier"] == {"system": system, "value": "qr-1"}  # 0..1 in R4
    assert obs["identifier"] == [{"value": "no-system"}, {"system": system, "value": "o-1"}]
    assert bundle["entry"][1]["request"]["ifNoneExist"] == f"identifier={system}|qr-1"
    # A business identifier, where there is one, stays the one matched on.
    assert to_transaction(artifact(5), "conditional-create", source_identifier_system=system) == (
        to_transaction(artifact(5), "conditional-create")
    )
    provenance = {"resourceType": "Provenance", "id": "prov-1", "recorded": "2026-01-01T00:00:00Z"}
    with pytest.raises(Unprocessable, match="Provenance has no identifier element"):
        to_transaction(
            [provenance],
            "conditional-create",
            source_identifier_system=system,
            without_identifier="dead-letter",
        )
    by_put = to_transaction([provenance], "conditional-create", source_identifier_system=system)
    assert by_put["entry"][0]["request"] == {"method": "PUT", "url": "Provenance/prov-1"}
    assert to_transaction([provenance], "put")["entry"][0]["request"]["url"] == "Provenance/prov-1"


def test_references_to_stored_resources_become_conditional_references() -> None:
    system = "https://fhir-kat.example.org/fhir/sid/resource"
    stored = {
        ("Patient", "pt-0001"): artifact(1)["entry"][0]["resource"],
        ("Encounter", "enc-1"): {"resourceType": "Encounter", "id": "enc-1"},
    }
    obs = {
        "resourceType": "Observation",
        "id": "o-9",
        "identifier": [{"system": OBS_SYSTEM, "value": "O9"}],
        "subject": {"reference": "Patient/pt-0001"},
        "encounter": {"reference": "Encounter/enc-1"},
        "performer": [{"reference": "Practitioner/unknown"}],
    }
    bundle = to_transaction(
        [obs],
        "conditional-create",
        resolve=lambda t, i: stored.get((t, i)),
        source_identifier_system=system,
    )
    sent = bundle["entry"][0]["resource"]
    assert sent["subject"] == {"reference": f"Patient?identifier={PID_SYSTEM}|P0001"}
    assert sent["encounter"] == {"reference": f"Encounter?identifier={system}|enc-1"}
    assert sent["performer"] == [{"reference": "Practitioner/unknown"}]  # not ours: as it was
    put = to_transaction([obs], "put", resolve=lambda t, i: stored.get((t, i)))
    assert put["entry"][0]["resource"]["subject"] == {"reference": "Patient/pt-0001"}


def test_a_type_r4_cannot_search_by_identifier_goes_by_put() -> None:
    """R4 has no AdverseEvent?identifier: a conditional create on it is refused by a conformant
    server, so it travels under our id, and references to it stay literal."""
    ae = {
        "resourceType": "AdverseEvent",
        "id": "ae-1",
        "identifier": {
            "system": "https://fhir-kat.example.org/fhir/sid/adverse-events",
            "value": "A1",
        },
        "actuality": "actual",
        "subject": {"reference": "Patient/pt-0001"},
    }
    flag = {
        "resourceType": "Flag",
        "id": "f-1",
        "identifier": [
            {"system": "https://fhir-kat.example.org/fhir/sid/safety-flags", "value": "f-1"}
        ],
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/flag-detail",
                "valueReference": {"reference": "AdverseEvent/ae-9"},
            }
        ],
    }
    bundle = to_transaction([ae, flag], "conditional-create", resolve=lambda t, i: {"id": i})
    sent_ae, sent_flag = bundle["entry"]
    assert sent_ae["request"] == {"method": "PUT", "url": "AdverseEvent/ae-1"}
    assert sent_flag["request"]["method"] == "POST"
    detail = sent_flag["resource"]["extension"][0]["valueReference"]
    assert detail == {"reference": "AdverseEvent/ae-9"}  # not AdverseEvent?identifier=…
    with pytest.raises(Unprocessable, match="no identifier search parameter"):
        to_transaction([ae], "conditional-create", without_identifier="dead-letter")
