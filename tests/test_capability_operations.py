"""Every FHIR operation the app serves is declared in its CapabilityStatement (the class, not a
list kept by hand): the Flask url_map's ``/fhir`` routes with a ``$`` segment are enumerated and
each must appear as a system operation (``rest.operation``) or on its resource type
(``rest.resource[type].operation``), under the name the route carries. A new operation route
without its declaration fails here."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import client_as

#: ``$`` routes that are not operations: the Bulk Data status and file URLs a ``$export``
#: answers with (Content-Location, the manifest's ``output[].url``); the Bulk Data IG names
#: them server-chosen URLs, not operations.
NOT_OPERATIONS = frozenset({"export-status", "export-file"})


def _served(app: Flask) -> set[tuple[str | None, str]]:
    """(resource type or None for system level, operation name) of every /fhir $ route."""
    out: set[tuple[str | None, str]] = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/fhir/") or "$" not in rule.rule:
            continue
        parts = rule.rule.removeprefix("/fhir/").split("/")
        [op] = [p[1:] for p in parts if p.startswith("$")]
        if op in NOT_OPERATIONS:
            continue
        out.add((None if parts[0].startswith("$") else parts[0], op))
    return out


def _declared(c: FlaskClient) -> dict[tuple[str | None, str], str]:
    statement = c.get("/fhir/metadata").get_json()
    [rest] = statement["rest"]
    found = {(None, o["name"]): o["definition"] for o in rest.get("operation", [])}
    for resource in rest["resource"]:
        for o in resource.get("operation", []):
            found[(resource["type"], o["name"])] = o["definition"]
    return found


def test_every_served_operation_is_declared(app: Flask) -> None:
    served = _served(app)
    assert (None, "export") in served and ("Questionnaire", "populate") in served  # it reads
    declared = _declared(client_as(app, "staff"))
    assert sorted(served - set(declared), key=str) == []
    # Nothing is declared that is not served either.
    assert sorted(set(declared) - served, key=str) == []


def test_sdc_operations_name_the_sdc_definitions(app: Flask) -> None:
    declared = _declared(client_as(app, "staff"))
    sdc = "http://hl7.org/fhir/uv/sdc/OperationDefinition"
    assert declared[("Questionnaire", "populate")] == f"{sdc}/Questionnaire-populate"
    assert declared[("QuestionnaireResponse", "extract")] == f"{sdc}/QuestionnaireResponse-extract"
    # The program's own operation resolves to the OperationDefinition it serves.
    own = declared[("ImplementationGuide", "package")]
    staff = client_as(app, "staff")
    found = staff.get(f"/fhir/OperationDefinition?url={own}").get_json()
    assert found["total"] == 1 and found["entry"][0]["resource"]["code"] == "package"
