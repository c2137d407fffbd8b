"""Terminology operations on the service's own CodeSystems, ValueSets and ConceptMaps:
``ValueSet/$expand``, ``ValueSet/$validate-code``, ``CodeSystem/$lookup``,
``ConceptMap/$translate`` — type and instance level, GET with query parameters or POST with a
``Parameters`` resource. Parse → ``fhir_kat.terminology.operations`` → serialise.

Any signed-in caller may use them: they answer from the program's published definitions, which
describe no patient (the bearer check of ``auth.install`` still applies).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, request

from fhir_kat.api.auth import audit_record
from fhir_kat.api.body import read_json
from fhir_kat.api.fhir import json_response
from fhir_kat.terminology import operations as ops

bp = Blueprint("terminology", __name__, url_prefix="/fhir")

#: operation -> (resource type it belongs to, what answers it)
Answer = Callable[[ops.Params, dict[str, Any] | None], dict[str, Any]]


def _params(operation: str) -> ops.Params:
    if request.method == "GET":
        return ops.params_from_query(operation, request.args.items(multi=True))
    return ops.params_from_body(operation, read_json(request))


def _run(rtype: str, operation: str, answer: Answer, rid: str | None) -> Response:
    record = audit_record()
    record.interaction = "operation"
    instance = ops.resource_by_id(rtype, rid) if rid is not None else None
    if rid is not None:
        record.entities.append(f"{rtype}/{rid}")
    result = answer(_params(operation), instance)
    return json_response(json.dumps(result, separators=(",", ":"), ensure_ascii=False))


def _expand(params: ops.Params, instance: dict[str, Any] | None) -> dict[str, Any]:
    return ops.expand(params, current_app.extensions["fhir_kat"].clock(), instance)


_METHODS = ["GET", "POST"]


@bp.route("/ValueSet/$expand", methods=_METHODS)
@bp.route("/ValueSet/<rid>/$expand", methods=_METHODS)
def expand(rid: str | None = None) -> Response:
    return _run("ValueSet", "expand", _expand, rid)


@bp.route("/ValueSet/$validate-code", methods=_METHODS)
@bp.route("/ValueSet/<rid>/$validate-code", methods=_METHODS)
def validate_code(rid: str | None = None) -> Response:
    return _run("ValueSet", "validate-code", ops.validate_code, rid)


@bp.route("/CodeSystem/$lookup", methods=_METHODS)
@bp.route("/CodeSystem/<rid>/$lookup", methods=_METHODS)
def lookup(rid: str | None = None) -> Response:
    return _run("CodeSystem", "lookup", ops.lookup, rid)


@bp.route("/ConceptMap/$translate", methods=_METHODS)
@bp.route("/ConceptMap/<rid>/$translate", methods=_METHODS)
def translate(rid: str | None = None) -> Response:
    return _run("ConceptMap", "translate", ops.translate, rid)
