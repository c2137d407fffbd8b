"""The one error model: every problem leaves the service as a FHIR OperationOutcome.

Owns: the ``Issue`` value and the ``FhirError`` family, each carrying its HTTP status as a typed
attribute. Must not: import flask, touch the store, or put PHI into ``diagnostics`` (callers name
elements and codes, never the values a person typed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Issue:
    """One problem, as one ``OperationOutcome.issue``.

    ``code`` is from the required IssueType value set (invalid, structure, required, value,
    invariant, security, login, forbidden, not-found, conflict, processing, not-supported,
    too-costly, exception, throttled, business-rule, code-invalid, duplicate, incomplete, ...).
    """

    code: str
    diagnostics: str
    expression: tuple[str, ...] = ()
    severity: str = "error"

    def to_fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        if self.diagnostics:
            out["diagnostics"] = self.diagnostics
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def issue(code: str, diagnostics: str, *expression: str, severity: str = "error") -> Issue:
    """Shorthand used across the package: ``issue("required", "missing", "Task.status")``."""
    return Issue(
        code=code, diagnostics=diagnostics, expression=tuple(expression), severity=severity
    )


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


@dataclass
class FhirError(Exception):
    """Base of every error the service reports; ``status`` is the HTTP status to send."""

    issues: Sequence[Issue]
    headers: dict[str, str] = field(default_factory=dict)
    status: ClassVar[int] = 400
    default_code: ClassVar[str] = "invalid"

    def __init__(
        self,
        issues: Sequence[Issue] | Issue | str,
        *,
        headers: dict[str, str] | None = None,
        expression: str | None = None,
    ) -> None:
        if isinstance(issues, str):
            expr = (expression,) if expression else ()
            issues = [Issue(code=self.default_code, diagnostics=issues, expression=expr)]
        elif isinstance(issues, Issue):
            issues = [issues]
        if not issues:
            raise ValueError("a FhirError needs at least one issue")
        self.issues = list(issues)
        self.headers = dict(headers or {})
        super().__init__("; ".join(i.diagnostics for i in self.issues))

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class BadRequest(FhirError):
    status = 400
    default_code = "invalid"


class Unauthorized(FhirError):
    status = 401
    default_code = "login"


class Forbidden(FhirError):
    status = 403
    default_code = "forbidden"


class NotFound(FhirError):
    status = 404
    default_code = "not-found"


class Hidden(NotFound):
    """A 404 for something that exists but the caller may not see: answered exactly as one
    never stored (same status, same OperationOutcome), and audited as a denied access."""

    audit_detail: ClassVar[str] = "denied: not visible to this client"


class MethodNotAllowed(FhirError):
    status = 405
    default_code = "not-supported"


class NotAcceptable(FhirError):
    status = 406
    default_code = "not-supported"


class Conflict(FhirError):
    status = 409
    default_code = "conflict"


class Gone(FhirError):
    status = 410
    default_code = "deleted"


class PreconditionFailed(FhirError):
    status = 412
    default_code = "conflict"


class PayloadTooLarge(FhirError):
    status = 413
    default_code = "too-costly"


class UnsupportedMediaType(FhirError):
    status = 415
    default_code = "not-supported"


class Unprocessable(FhirError):
    status = 422
    default_code = "processing"


class TooManyRequests(FhirError):
    status = 429
    default_code = "throttled"


class ServerError(FhirError):
    status = 500
    default_code = "exception"


class ServiceUnavailable(FhirError):
    status = 503
    default_code = "transient"
