"""GET /api/v1/openapi.json: a valid OpenAPI 3.1 document that lists every /api/v1 route the
application registers (compared with Flask's URL map, so the two cannot drift) and carries the
artifact JSON Schemas the service validates against."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flask import Flask
from openapi_spec_validator import validate

from fhir_kat.artifacts import KINDS, json_schema, validate_artifact
from tests.conftest import client_as

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _document(app: Flask) -> dict[str, Any]:
    response = client_as(app, "referrer").get("/api/v1/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.get_json()
    return document


def test_document_is_valid_openapi(app: Flask) -> None:
    document = _document(app)
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["servers"][0]["url"].startswith("http://localhost")


def _concrete(rule: str) -> list[str]:
    path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule)
    return [path.replace("{kind}", k) for k in KINDS] if "{kind}" in path else [path]


def test_every_registered_route_is_documented(app: Flask) -> None:
    paths = _document(app)["paths"]
    expected = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/") or rule.endpoint == "auth.token":
            for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
                expected |= {(p, method.lower()) for p in _concrete(rule.rule)}
    listed = {(p, m) for p, item in paths.items() for m in item}
    assert listed == expected
    undocumented = [
        f"{m.upper()} {p}"
        for p, item in paths.items()
        for m, op in item.items()
        if op["summary"] == "undocumented"
    ]
    assert not undocumented, "add them to fhir_kat.api.openapi.OPERATIONS"
    assert paths["/auth/token"]["post"]["security"] == []


def test_artifact_bodies_are_the_served_json_schemas(app: Flask) -> None:
    document = _document(app)
    schemas = document["components"]["schemas"]
    client = client_as(app, "staff")
    for kind in KINDS:
        op = document["paths"][f"/api/v1/{kind}"]["post"]
        body = op["requestBody"]["content"]["application/json"]
        name = body["schema"]["$ref"].rsplit("/", 1)[-1]
        served = json.loads(client.get(f"/api/v1/schemas/{kind}.json").data)
        served.pop("$schema")
        assert (
            schemas[name]
            == served
            == {k: v for k, v in json_schema(kind).items() if k != "$schema"}
        )
        # The example in the document is the shipped one, and it is a valid artifact.
        assert body["example"] == json.loads((EXAMPLES / f"{kind}.json").read_text())
        assert not validate_artifact(kind, body["example"]).issues
        assert {"201", "422"} <= set(op["responses"])


def test_needs_a_token(app: Flask) -> None:
    response = client_as(app, None).get("/api/v1/openapi.json")
    assert response.status_code == 401
    assert response.get_json()["resourceType"] == "OperationOutcome"
