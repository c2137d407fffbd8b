"""The partner client: one HTTP conversation with one partner EHR, and what its answer means.

Owns: access tokens (OAuth 2.0 client credentials with a secret, or SMART Backend Services with a
signed JWT client assertion), cached until shortly before they expire; sending a delivery; and the
one choke point (``_exchange``) that turns every HTTP outcome into a typed ``SendResult``:

- ``Delivered``: 2xx; the partner's ids and versions from the transaction-response ``location``s;
- ``Retryable``: connection error, timeout, 408, 409 (a lost race at the partner), 429 (with its
  ``Retry-After``), 5xx, and failures to obtain a token (a credential problem an operator fixes,
  not a fault of the resource);
- ``Permanent``: any other 4xx, with the partner's own OperationOutcome kept verbatim.

A 401 on a request triggers exactly one re-authentication and one retry of that request.

Must not: touch the database, sleep, retry on its own beyond that one re-authentication (the
outbox owns retries), or log a body, a token, a secret or anything from a resource. Log lines
carry partner name, HTTP status, delivery id and outcome only.
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import jwt
import requests

from fhir_kat.exchange.netguard import EndpointRefused
from fhir_kat.exchange.partners import PartnerConfig

log = logging.getLogger("fhir_kat.exchange.client")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"
#: SMART caps a client assertion at 5 minutes; 4 leaves room for clocks a minute apart.
ASSERTION_LIFETIME_SECONDS = 240
#: A token is renewed this long before the ``expires_in`` it came with runs out.
TOKEN_RENEW_MARGIN_SECONDS = 30
#: Partners that send no ``expires_in`` get the SMART Backend Services maximum.
DEFAULT_TOKEN_LIFETIME_SECONDS = 300
#: Longest error text kept from a partner that answers without an OperationOutcome.
MAX_ERROR_CHARS = 2000

Kind = str  # "bundle" (a transaction Bundle to [base]) or "notification" ($process-message)


@dataclass(frozen=True)
class Delivered:
    status: int
    #: One item per transaction entry: our fullUrl, the partner's type/id/version, entry status.
    entries: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Retryable:
    reason: str  # short, PHI-free: "timeout", "HTTP 503", "token endpoint: HTTP 401 …"
    status: int | None = None
    #: Seconds the partner asked us to wait (``Retry-After``), if it said.
    retry_after: float | None = None


@dataclass(frozen=True)
class Permanent:
    status: int
    #: The partner's OperationOutcome, or one we build around its status when it sent none.
    outcome: dict[str, Any]


SendResult = Delivered | Retryable | Permanent


class TokenError(Exception):
    """No access token could be had; ``retry_after`` when the token endpoint said when."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class PartnerClient:
    def __init__(
        self,
        partner: PartnerConfig,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.partner = partner
        self.session = session or requests.Session()
        self.clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = threading.Lock()

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------ sending

    def send(self, kind: Kind, payload: Mapping[str, Any], delivery_id: int | str) -> SendResult:
        """Send one delivery; never raises for what a partner or the network does."""
        if kind == "notification":
            url = f"{self.partner.base_url}/$process-message"
        elif kind == "bundle":
            url = self.partner.base_url
        else:
            return Permanent(0, _outcome("not-supported", f"unknown delivery kind {kind!r}"))
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        result = self._exchange("POST", url, body, delivery_id)
        if isinstance(result, requests.Response):
            return self._delivered(result, payload, kind, delivery_id)
        return result

    def notify(
        self,
        method: str,
        url: str,
        body: bytes | None,
        delivery_id: int | str,
        headers: Mapping[str, str] | None = None,
    ) -> SendResult:
        """One R4 rest-hook notification: an empty ``POST`` (id-only ping) or a ``PUT`` of the
        resource; ``headers`` are the subscriber's ``channel.header`` values. Answers mean what
        they mean for a partner (2xx delivered; 408/409/429/5xx and network errors retryable;
        any other 4xx permanent)."""
        result = self._exchange(method, url, body, delivery_id, headers)
        if isinstance(result, requests.Response):
            status = result.status_code
            result.close()
            self._log(delivery_id, status, "delivered")
            return Delivered(status, [])
        return result

    def _exchange(
        self,
        method: str,
        url: str,
        body: bytes | None,
        delivery_id: int | str,
        extra_headers: Mapping[str, str] | None = None,
    ) -> requests.Response | Retryable | Permanent:
        """The one place an HTTP outcome gets its meaning (cf. fhirpy's ``_do_request``)."""
        reauthenticated = False
        while True:
            try:
                headers = self._headers(delivery_id)
                if body is None:
                    del headers["Content-Type"]  # an empty rest-hook ping has no content
                headers.update(extra_headers or {})
            except TokenError as exc:
                self._log(delivery_id, None, "token-failed")
                return Retryable(exc.reason, None, exc.retry_after)
            try:
                response = self.session.request(
                    method,
                    url,
                    data=body,
                    headers=headers,
                    timeout=self.partner.timeout_seconds,
                    allow_redirects=False,
                )
            except EndpointRefused as exc:
                # A client-chosen endpoint on a forbidden address: no retry will change that.
                self._log(delivery_id, None, "endpoint-refused")
                return Permanent(0, _outcome("forbidden", str(exc)))
            except requests.Timeout:
                self._log(delivery_id, None, "timeout")
                return Retryable("timeout")
            except requests.ConnectionError:
                self._log(delivery_id, None, "connection-error")
                return Retryable("connection error")
            except requests.RequestException as exc:
                self._log(delivery_id, None, "request-error")
                return Retryable(f"request failed: {type(exc).__name__}")
            status = response.status_code
            if status == 401 and self.partner.auth.kind != "none" and not reauthenticated:
                # An expired or revoked token: drop it and try once more with a fresh one.
                self._log(delivery_id, status, "reauthenticate")
                self.invalidate_token()
                reauthenticated = True
                response.close()
                continue
            if 200 <= status < 300:
                return response
            self._log(delivery_id, status, "failed")
            if status == 401:
                # Credentials, not the resource: retrying after an operator's fix will work.
                reason = "HTTP 401 after re-authentication" if reauthenticated else "HTTP 401"
                return Retryable(reason, 401)
            if status in (408, 409, 429) or status >= 500:
                return Retryable(f"HTTP {status}", status, self._retry_after(response))
            if 300 <= status < 400:
                return Permanent(status, _outcome("not-supported", f"unexpected HTTP {status}"))
            return Permanent(status, _partner_outcome(response))

    def _delivered(
        self,
        response: requests.Response,
        payload: Mapping[str, Any],
        kind: Kind,
        delivery_id: int | str,
    ) -> SendResult:
        status = response.status_code
        if kind != "bundle":
            self._log(delivery_id, status, "delivered")
            return Delivered(status, [])
        try:
            answer = response.json() if response.content else {}
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        sent = payload.get("entry", [])
        got = answer.get("entry", [])
        if answer and len(got) != len(sent):
            # A transaction-response has one entry per request entry, in order; anything else
            # means we cannot tell what the partner stored. It did commit (2xx), so no retry.
            self._log(delivery_id, status, "delivered-unmatched")
            return Delivered(status, [{"note": f"{len(got)} response entries for {len(sent)}"}])
        entries: list[dict[str, Any]] = []
        for request_entry, response_entry in zip(sent, got, strict=False):
            outcome = response_entry.get("response", {}) if isinstance(response_entry, dict) else {}
            entry_status = str(outcome.get("status", ""))
            if entry_status[:1] in ("4", "5"):
                # A server that answers 200 to a transaction with a failed entry broke the
                # all-or-nothing rule; treat it as a refusal so a person looks at it.
                self._log(delivery_id, status, "entry-failed")
                kept = outcome.get("outcome")
                return Permanent(
                    int(entry_status[:3]) if entry_status[:3].isdigit() else status,
                    kept
                    if isinstance(kept, dict)
                    else _outcome("processing", f"entry failed: {entry_status}"),
                )
            entries.append(_entry_record(request_entry, outcome))
        self._log(delivery_id, status, "delivered")
        return Delivered(status, entries)

    # ------------------------------------------------------------------ tokens

    def _headers(self, delivery_id: int | str) -> dict[str, str]:
        headers = {
            "Content-Type": FHIR_JSON,
            "Accept": FHIR_JSON,
            # Only ids and versions are read back; the partner need not echo PHI.
            "Prefer": "return=minimal",
            "X-Request-ID": f"fhir-kat-delivery-{delivery_id}-{uuid.uuid4().hex[:8]}",
        }
        if self.partner.auth.kind != "none":
            headers["Authorization"] = f"Bearer {self.access_token()}"
        return headers

    def invalidate_token(self) -> None:
        with self._token_lock:
            self._token = None
            self._token_expires = 0.0

    def access_token(self) -> str:
        """A cached token, or a new one when it is missing or about to expire."""
        with self._token_lock:
            now = self.clock()
            if self._token is not None and now < self._token_expires:
                return self._token
            token, lifetime = self._request_token(now)
            margin = min(TOKEN_RENEW_MARGIN_SECONDS, lifetime / 10)
            self._token, self._token_expires = token, now + lifetime - margin
            return token

    def client_assertion(self, now: float) -> str:
        """The SMART Backend Services client assertion (a signed JWT, ≤ 5 minutes)."""
        auth = self.partner.auth
        claims = {
            "iss": auth.client_id,
            "sub": auth.client_id,
            "aud": auth.token_url,
            "iat": int(now),
            "exp": int(now) + ASSERTION_LIFETIME_SECONDS,
            "jti": uuid.uuid4().hex,  # never reused: token endpoints refuse a replayed jti
        }
        return jwt.encode(
            claims,
            auth.private_key,  # type: ignore[arg-type]  # checked at configuration time
            algorithm=auth.algorithm,
            headers={"kid": auth.kid, "typ": "JWT"},
        )

    def _request_token(self, now: float) -> tuple[str, float]:
        auth = self.partner.auth
        form: dict[str, str] = {"grant_type": "client_credentials"}
        if auth.scopes:
            form["scope"] = " ".join(auth.scopes)
        basic: tuple[str, str] | None = None
        if auth.kind == "smart_backend":
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = self.client_assertion(now)
        else:
            basic = (auth.client_id, auth.client_secret)  # client_secret_basic (RFC 6749 2.3.1)
        try:
            response = self.session.post(
                auth.token_url,
                data=form,
                auth=basic,
                headers={"Accept": "application/json"},
                timeout=self.partner.timeout_seconds,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise TokenError("token endpoint: timeout") from None
        except requests.RequestException:
            raise TokenError("token endpoint: connection error") from None
        with response:
            if response.status_code != 200:
                error = ""
                try:
                    doc = response.json()
                    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
                        error = " " + doc["error"][:64]  # the RFC 6749 code, not the description
                except ValueError:
                    pass
                log.warning(
                    "token request refused",
                    extra={"partner": self.partner.name, "status": response.status_code},
                )
                raise TokenError(
                    f"token endpoint: HTTP {response.status_code}{error}",
                    self._retry_after(response),
                )
            try:
                doc = response.json()
                token = doc["access_token"]
                lifetime = float(doc.get("expires_in", DEFAULT_TOKEN_LIFETIME_SECONDS))
            except (ValueError, KeyError, TypeError):
                raise TokenError("token endpoint: answer without access_token") from None
        if not isinstance(token, str) or not token:
            raise TokenError("token endpoint: answer without access_token")
        return token, max(lifetime, 1.0)

    # ------------------------------------------------------------------ helpers

    def _retry_after(self, response: requests.Response) -> float | None:
        return parse_retry_after(response.headers.get("Retry-After"), self.clock())

    def _log(self, delivery_id: int | str, status: int | None, outcome: str) -> None:
        level = logging.INFO if outcome in ("delivered", "reauthenticate") else logging.WARNING
        log.log(
            level,
            "partner exchange",
            extra={
                "partner": self.partner.name,
                "delivery_id": delivery_id,
                "status": status,
                "outcome": outcome,
            },
        )


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now)


def _entry_record(request_entry: Mapping[str, Any], outcome: Mapping[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"status": str(outcome.get("status", ""))}
    full = request_entry.get("fullUrl")
    if isinstance(full, str):
        record["fullUrl"] = full
    location = outcome.get("location")
    if isinstance(location, str) and location:
        parts = location.split("?")[0].rstrip("/").split("/")
        version = None
        if len(parts) >= 2 and parts[-2] == "_history":
            version, parts = parts[-1], parts[:-2]
        if len(parts) >= 2:
            record["type"], record["id"] = parts[-2], parts[-1]
        if version is not None:
            record["versionId"] = version
    etag = outcome.get("etag")
    if "versionId" not in record and isinstance(etag, str) and etag:
        record["versionId"] = etag.removeprefix("W/").strip('"')
    return record


def _partner_outcome(response: requests.Response) -> dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        return doc
    return _outcome("processing", f"partner answered HTTP {response.status_code}")


def _outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": code, "diagnostics": diagnostics[:MAX_ERROR_CHARS]}
        ],
    }


__all__ = [
    "ASSERTION_TYPE",
    "Delivered",
    "PartnerClient",
    "Permanent",
    "Retryable",
    "SendResult",
    "TokenError",
    "parse_retry_after",
]
