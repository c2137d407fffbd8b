"""The program's published definitions, read-only: ``GET /fhir/<type>/<id>`` and
``GET /fhir/<type>?url=…`` for the StructureDefinitions, OperationDefinitions,
SearchParameters, CodeSystems, ValueSets, ConceptMaps and the ImplementationGuide of the
package (``fhir_kat.services.ig``), and the package itself at
``GET /fhir/ImplementationGuide/fhir-kat/$package`` (``application/gzip``).

Any signed-in caller may read them: they describe no patient. Questionnaires and the Measure
stay in the store, where they always were.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response

from fhir_kat.api.auth import audit_record
from fhir_kat.api.fhir import json_response
from fhir_kat.errors import BadRequest, NotFound, issue
from fhir_kat.services.capability import DEFINITION_TYPES
from fhir_kat.services.ig import (
    IG_ID,
    PACKAGE_NAME,
    PACKAGE_VERSION,
    package_tarball,
    served_resources,
)

bp = Blueprint("definitions", __name__, url_prefix="/fhir")


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _of_type(rtype: str) -> list[dict[str, Any]]:
    return [r for r in served_resources() if r["resourceType"] == rtype]


@bp.get("/ImplementationGuide/<rid>/$package")
def package(rid: str) -> Response:
    audit_record().interaction = "operation"
    if rid != IG_ID:
        raise NotFound(issue("not-found", f"ImplementationGuide/{rid} is not one of ours"))
    return Response(
        package_tarball(),
        content_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{PACKAGE_NAME}-{PACKAGE_VERSION}.tgz"'
        },
    )


def _read(rtype: str, rid: str) -> Response:
    audit_record().interaction = "read"
    found = next((r for r in _of_type(rtype) if r["id"] == rid), None)
    if found is None:
        raise NotFound(issue("not-found", f"{rtype}/{rid} is not one of ours", rtype))
    return json_response(_dump(found))


def _search(rtype: str) -> Response:
    from flask import request

    audit_record().interaction = "search-type"
    unknown = sorted(set(request.args) - {"url", "_id", "_format"})
    if unknown:
        raise BadRequest(
            [issue("not-supported", f"unknown search parameter {u}", u) for u in unknown]
        )
    found = _of_type(rtype)
    if "url" in request.args:
        url, _, version = request.args["url"].partition("|")
        found = [r for r in found if r["url"] == url and (not version or r["version"] == version)]
    if "_id" in request.args:
        found = [r for r in found if r["id"] == request.args["_id"]]
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(found),
        "entry": [
            {
                "fullUrl": f"{r['resourceType']}/{r['id']}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in found
        ],
    }
    return json_response(_dump(bundle))


for _type in DEFINITION_TYPES:
    bp.add_url_rule(
        f"/{_type}/<rid>", f"read_{_type}", lambda rid, _t=_type: _read(_t, rid), methods=["GET"]
    )
    bp.add_url_rule(f"/{_type}", f"search_{_type}", lambda _t=_type: _search(_t), methods=["GET"])
