"""The first check of every request: what no endpoint can use is refused before any of them
runs — a NUL or other control character, or an unpaired surrogate, in the URL path, a query or
form parameter or a header, and more parameters than any search or operation needs. Each is a
400 OperationOutcome naming where the problem is (never quoting it), instead of a 500 from the
database (PostgreSQL cannot store NUL) or a search too large to plan.

Bodies have their own checks (``body.read_json``); query strings inside bodies and headers
(``If-None-Exist``, transaction URLs, Subscription criteria) are checked by ``parse_search``.
"""

from __future__ import annotations

from flask import Flask, request

from fhir_kat.api.body import MAX_ISSUES, bad_text
from fhir_kat.errors import BadRequest, Issue, issue
from fhir_kat.search import MAX_PARAMETERS

FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


def request_issues() -> list[Issue]:
    problems = []
    if (problem := bad_text(request.path)) is not None:
        problems.append(issue("value", f"the URL path holds {problem}", "url"))
    pairs = list(request.args.items(multi=True))
    if request.mimetype in FORMS:
        pairs += list(request.form.items(multi=True))
    if len(pairs) > MAX_PARAMETERS:
        problems.append(
            issue("too-costly", f"at most {MAX_PARAMETERS} parameters are accepted", "url")
        )
    for key, value in pairs:
        if (problem := bad_text(key)) is not None:
            problems.append(issue("value", f"a parameter name holds {problem}", "url"))
        elif (problem := bad_text(value)) is not None:
            problems.append(issue("value", f'parameter "{key[:64]}" holds {problem}', key[:64]))
    for name, value in request.headers.items():
        if (problem := bad_text(value.replace("\t", " "))) is not None:
            problems.append(issue("value", f'header "{name[:64]}" holds {problem}', name[:64]))
    return problems[:MAX_ISSUES]


def install(app: Flask) -> None:
    @app.before_request
    def _check_inputs() -> None:
        problems = request_issues()
        if problems:
            raise BadRequest(problems)
