"""CDS Clients (EHRs calling the CDS Hooks services) and how their requests are trusted.

Owns: the ``[cds_hooks]`` table of the TOML file (the EHRs, their JWKS and FHIR servers, the
referral app's link, the order codes ``order-select`` answers) and verifying the JWT each
CDS Hooks request carries, as CDS Hooks 2.0 ("Trusting CDS Clients") says: ``Authorization:
Bearer <JWT>`` signed ES384 or RS384 by the EHR, ``iss`` a registered EHR, the key found by
``kid`` in that EHR's registered JWKS (a ``jku`` header is never followed: the JWKS is
exchanged out of band, here the TOML file), ``aud`` the URL of the service called, ``exp`` at
most 5 minutes ahead, ``jti`` never reused. All cryptography is PyJWT's.
Must not: parse HTTP or fetch anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt

from fhir_kat.security.tokens import JwtRefused, SignerKey, find_key, verify_signed_jwt
from fhir_kat.settings import SettingsError
from fhir_kat.store import Store

ALGORITHMS = ("ES384", "RS384")
MAX_LIFETIME = timedelta(minutes=5)
#: One answer for every failure before the signature is verified: the answer does not tell
#: whether an issuer is registered.
UNTRUSTED = (
    "the CDS Hooks JWT is not valid: unknown issuer, no registered key for it, or a bad signature"
)


#: How a refused JWT is answered (``verify_signed_jwt``'s reasons).
_REFUSALS = {
    "not-jwt": "the bearer token is not a JWT",
    "algorithm": "the CDS Hooks JWT must be signed ES384 or RS384",
    "untrusted": UNTRUSTED,
    "expired": "the CDS Hooks JWT has expired",
    "audience": "the CDS Hooks JWT's aud must be the URL of the service called",
    "invalid": "the CDS Hooks JWT is not valid ({detail})",
    "lifetime": "the CDS Hooks JWT's exp is more than 5 minutes ahead",
    "replayed": "the CDS Hooks JWT's jti was already used",
}


class CdsAuthError(Exception):
    """A request the service does not trust (401); the text names what is wrong, no more."""


@dataclass(frozen=True)
class CdsClient:
    """A registered EHR: ``[cds_hooks.clients.<name>]``."""

    name: str
    issuer: str
    jwks: Mapping[str, Any]
    #: FHIR base URLs the service may query with the hook's ``fhirAuthorization`` (the hook's
    #: ``fhirServer`` must be one of them: the service never calls an address a request picks).
    fhir_servers: tuple[str, ...] = ()


#: Hook calls per EHR per minute and process by default: an EHR fires ``patient-view`` on every
#: chart opened, so a clinic's worth of physicians stays far below it.
DEFAULT_RATE_LIMIT = 600


@dataclass(frozen=True)
class CdsHooksConfig:
    clients: Mapping[str, CdsClient]  # by issuer
    #: The referral app a card links to; empty = the service's own ``/app/referrals/new``.
    referral_app_url: str = ""
    #: ``system|code`` of the orders that make ``order-select`` look at the chart (the
    #: program's own service code always does).
    order_codes: tuple[tuple[str, str], ...] = ()
    #: Hook and feedback calls per registered EHR per minute and process (0 = off): beyond it
    #: 429 with Retry-After. Failed authentications are held up per source by the sign-in
    #: limiter (``FHIR_KAT_AUTH_FAILURE_LIMIT`` / ``_SOURCE_LIMIT``).
    rate_limit_per_minute: int = DEFAULT_RATE_LIMIT

    def by_issuer(self, issuer: str) -> CdsClient | None:
        return self.clients.get(issuer)


def load_cds_hooks(table: Mapping[str, Any]) -> CdsHooksConfig:
    """Validated ``[cds_hooks]``; ``SettingsError`` naming every problem."""
    problems: list[str] = []
    known = {"clients", "referral_app_url", "order_codes", "rate_limit_per_minute"}
    for key in sorted(set(table) - known):
        problems.append(f"[cds_hooks].{key}: unknown setting")
    clients: dict[str, CdsClient] = {}
    raw_clients = table.get("clients", {})
    if not isinstance(raw_clients, Mapping):
        problems.append("[cds_hooks.clients] must be a table of tables")
        raw_clients = {}
    for name, spec in raw_clients.items():
        where = f"[cds_hooks.clients.{name}]"
        if not isinstance(spec, Mapping):
            problems.append(f"{where} must be a table")
            continue
        for key in sorted(set(spec) - {"issuer", "jwks", "jwks_file", "fhir_servers"}):
            problems.append(f"{where}: unknown key {key}")
        issuer = spec.get("issuer")
        if not isinstance(issuer, str) or not issuer:
            problems.append(f"{where}: issuer (the JWT's iss) is required")
            continue
        jwks: Any = None
        if "jwks" in spec:
            try:
                jwks = (
                    spec["jwks"] if isinstance(spec["jwks"], Mapping) else json.loads(spec["jwks"])
                )
            except ValueError:
                problems.append(f"{where}: jwks is not JSON")
        elif "jwks_file" in spec:
            try:
                jwks = json.loads(Path(str(spec["jwks_file"])).read_text())
            except (OSError, ValueError) as exc:
                problems.append(f"{where}: cannot read jwks_file ({type(exc).__name__})")
        else:
            problems.append(f"{where}: needs jwks or jwks_file (the EHR's public keys)")
        if jwks is not None and not (
            isinstance(jwks, Mapping) and isinstance(jwks.get("keys"), list)
        ):
            problems.append(f"{where}: a JWKS needs a 'keys' list")
            jwks = None
        servers = spec.get("fhir_servers", [])
        if not isinstance(servers, list) or not all(
            isinstance(s, str) and s.startswith(("https://", "http://")) for s in servers
        ):
            problems.append(f"{where}: fhir_servers must be a list of http(s) FHIR base URLs")
            servers = []
        if issuer in clients:
            problems.append(f"{where}: issuer {issuer} is registered twice")
        if jwks is not None:
            clients[issuer] = CdsClient(
                str(name), issuer, jwks, tuple(s.rstrip("/") for s in servers)
            )
    app_url = table.get("referral_app_url", "")
    if not isinstance(app_url, str) or (
        app_url and not app_url.startswith(("https://", "http://"))
    ):
        problems.append("[cds_hooks].referral_app_url: an http(s) URL")
        app_url = ""
    codes: list[tuple[str, str]] = []
    for text in table.get("order_codes", []):
        system, bar, code = str(text).rpartition("|")
        if not bar or not system or not code:
            problems.append(f"[cds_hooks].order_codes: {text!r} is not 'system|code'")
        else:
            codes.append((system, code))
    rate = table.get("rate_limit_per_minute", DEFAULT_RATE_LIMIT)
    if not isinstance(rate, int) or isinstance(rate, bool) or rate < 0:
        problems.append("[cds_hooks].rate_limit_per_minute: a whole number, 0 or more (0 = off)")
        rate = DEFAULT_RATE_LIMIT
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    return CdsHooksConfig(clients, app_url, tuple(codes), rate)


class CdsRequestVerifier:
    """Verifies the JWT of one CDS Hooks request against the registered EHRs."""

    def __init__(self, config: CdsHooksConfig, store: Store) -> None:
        self.config = config
        self.store = store  # the jti of every JWT, until it expires (one table for all hosts)

    @staticmethod
    def presented_issuer(authorization: str) -> str:
        """The ``iss`` a request's JWT claims, unverified: what failed attempts are counted
        against (with the source), never a reason to trust it. "" when there is none."""
        token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
        try:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            return ""
        return iss[:128] if isinstance(iss, str) else ""

    def verify(self, authorization: str, audience: str) -> CdsClient:
        """The EHR that signed ``authorization`` (the header's value) for ``audience`` (the
        URL of the service called); ``CdsAuthError`` otherwise."""
        if not authorization.lower().startswith("bearer "):
            raise CdsAuthError("a CDS Hooks request needs 'Authorization: Bearer <JWT>'")
        token = authorization[7:].strip()

        def signer(
            alg: str, header: dict[str, Any], unverified: dict[str, Any]
        ) -> SignerKey | None:
            client = self.config.by_issuer(str(unverified.get("iss", "")))
            key = find_key(client.jwks, header.get("kid"), alg) if client is not None else None
            if client is None or key is None:
                return None
            return SignerKey(key, client.issuer, f"cds:{client.name}")

        try:
            claims = verify_signed_jwt(
                token,
                algorithms=ALGORITHMS,
                signer=signer,
                audience=audience,
                require=("iss", "aud", "exp", "iat", "jti"),
                max_lifetime=MAX_LIFETIME,
                store=self.store,
            )
        except JwtRefused as exc:
            raise CdsAuthError(_REFUSALS[exc.reason].format(detail=exc.detail)) from None
        client = self.config.by_issuer(str(claims["iss"]))  # the verified issuer: registered
        if client is None:
            raise CdsAuthError(UNTRUSTED)
        return client
