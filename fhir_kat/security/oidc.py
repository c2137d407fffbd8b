"""Signing people in through their organisation's OpenID Provider: OpenID Connect authorization
code flow with PKCE (S256), for the web pages (docs/security.md, "Signing people in").

Owns: the ``[oidc.<id>]`` registrations (checked at start-up, every problem at once), each
provider's discovery document and keys (fetched on first use and cached; the keys fetched again
once when a token names an unknown ``kid``: key rotation), the authorization request, the token
exchange, the ID token's validation, the UserInfo claims, and mapping the person's claims to a
grant (role, organisation, scopes, purpose of use). The protocol work is Authlib's (the
authorization URL with the S256 challenge, the token request, the ID token claim rules) and
joserfc's (the signature against the provider's JWKS); this module decides what is required.

Must not: touch flask or the database, see a password (MFA and passwords stay with the
provider), log a token or a claim value, or give a person a role its provider's mapping does not
name — a person whose claims map to no role, or to several different ones, is refused.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.oidc.core import CodeIDToken
from joserfc import jwt as jose_jwt
from joserfc.errors import InvalidKeyIdError, JoseError, MissingKeyError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from fhir_kat.security.clients import DEFAULT_PURPOSE, PURPOSES
from fhir_kat.security.policy import ROLES
from fhir_kat.security.scopes import Scope, covered_by, parse_scopes
from fhir_kat.security.tokens import Principal
from fhir_kat.settings import SettingsError

#: Signature algorithms accepted on ID tokens: asymmetric only. ``none`` is never accepted,
#: and HS* is refused too (a MAC keyed with the client secret proves nothing the token
#: endpoint's TLS answer does not, and would make the secret a signing key).
ID_TOKEN_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
)
#: Clock skew tolerated on ``exp``/``iat`` (seconds): the provider's clock is not ours.
LEEWAY_SECONDS = 60
#: An ID token issued longer ago than this is refused (a replayed, not a fresh, sign-in).
MAX_ID_TOKEN_AGE_SECONDS = 10 * 60
#: Discovery documents are fetched again after this long (new endpoints, new keys).
METADATA_TTL_SECONDS = 60 * 60
#: Keys are fetched again for an unknown ``kid`` at most this often.
JWKS_REFRESH_SECONDS = 60
HTTP_TIMEOUT_SECONDS = 10
DEFAULT_SCOPES = ("openid", "profile", "email")
PROVIDER_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
AUTH_METHODS = ("client_secret_basic", "client_secret_post")
#: The client id a person's requests carry (``Principal.client_id``): the web pages as
#: registered at that provider. The prefix keeps it apart from registered API clients.
CLIENT_PREFIX = "oidc:"


class SignInError(Exception):
    """A sign-in that cannot complete. ``reason`` goes to the audit trail (never a token or a
    claim value); ``message`` is what the person is told; ``status`` the page's HTTP status."""

    def __init__(self, reason: str, message: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason, self.message, self.status = reason, message, status


@dataclass(frozen=True)
class RoleGrant:
    """What a person may do: exactly what an API client with this registration may do."""

    role: str
    scopes: tuple[Scope, ...]
    organization: str | None
    purpose: str

    @property
    def scope_text(self) -> str:
        return " ".join(s.text for s in self.scopes)


@dataclass(frozen=True)
class Identity:
    """A person as the provider vouched for it in a validated ID token (and UserInfo)."""

    provider: str
    issuer: str
    subject: str
    name: str
    #: The values of the provider's ``role_claim`` the person holds (what the grant came from).
    role_values: tuple[str, ...]


@dataclass(frozen=True)
class Provider:
    id: str
    title: str
    issuer: str
    client_id: str
    client_secret: str = field(repr=False)
    scopes: tuple[str, ...]
    role_claim: str
    name_claims: tuple[str, ...]
    token_endpoint_auth_method: str
    #: claim value -> the grant a person holding it gets
    roles: Mapping[str, RoleGrant]

    @property
    def principal_client_id(self) -> str:
        return f"{CLIENT_PREFIX}{self.id}"

    def grant_for(self, values: tuple[str, ...]) -> RoleGrant:
        """The one grant the person's claim values map to. None mapped: refused (unknown
        means refused, never a default role); several different ones: refused too (which
        one the person meant is not ours to guess)."""
        grants = {self.roles[v] for v in values if v in self.roles}
        if not grants:
            raise SignInError(
                "no role mapped for this person",
                "Your account is not given a role in this service. Ask your administrator "
                f"to add you to one of the groups mapped for {self.title}.",
                403,
            )
        if len(grants) > 1:
            raise SignInError(
                "claims map to several roles",
                "Your account maps to more than one role in this service; ask your "
                "administrator to keep you in one of its groups.",
                403,
            )
        return next(iter(grants))


# ---------------------------------------------------------------------------- registrations


def load_providers(tables: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Provider]:
    problems: list[str] = []
    providers: dict[str, Provider] = {}
    for provider_id, spec in tables.items():
        where = f"[oidc.{provider_id}]"
        if not isinstance(spec, Mapping):
            problems.append(f"{where} must be a table")
            continue
        if not PROVIDER_ID.match(str(provider_id)):
            problems.append(f"{where}: the id must be 1-40 lowercase letters, digits or '-'")
        provider = _provider(str(provider_id), spec, environ, problems)
        if provider is not None:
            providers[provider.id] = provider
    if problems:
        raise SettingsError("invalid identity providers:\n  " + "\n  ".join(problems))
    return providers


def _provider(
    provider_id: str, spec: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> Provider | None:
    where = f"[oidc.{provider_id}]"
    known = {
        "title",
        "issuer",
        "client_id",
        "client_secret_env",
        "client_secret_file",
        "scopes",
        "role_claim",
        "name_claims",
        "token_endpoint_auth_method",
        "roles",
    }
    for key in spec:
        if key not in known:
            problems.append(f"{where}: unknown key {key}")
    issuer = str(spec.get("issuer", "")).rstrip("/") if spec.get("issuer") else ""
    if not issuer:
        problems.append(f"{where}: issuer is required")
    elif not secure_url(issuer):
        problems.append(f"{where}: issuer must be an https URL (http only on loopback)")
    client_id = str(spec.get("client_id", ""))
    if not client_id:
        problems.append(f"{where}: client_id is required")
    secret = _secret(where, spec, env, problems)
    scopes = tuple(str(s) for s in spec.get("scopes", DEFAULT_SCOPES))
    if "openid" not in scopes:
        problems.append(f"{where}: scopes must include openid")
    method = str(spec.get("token_endpoint_auth_method", "client_secret_basic"))
    if method not in AUTH_METHODS:
        problems.append(f"{where}: token_endpoint_auth_method must be one of {AUTH_METHODS}")
    name_claims = spec.get("name_claims", ["name", "preferred_username", "email"])
    if not isinstance(name_claims, list) or not all(isinstance(n, str) for n in name_claims):
        problems.append(f"{where}: name_claims must be a list of claim names")
        name_claims = ["name"]
    roles = _roles(where, spec.get("roles"), problems)
    if not isinstance(issuer, str) or not client_id or secret is None:
        return None
    return Provider(
        id=provider_id,
        title=str(spec.get("title") or provider_id),
        issuer=issuer,
        client_id=client_id,
        client_secret=secret,
        scopes=scopes,
        role_claim=str(spec.get("role_claim", "groups")),
        name_claims=tuple(name_claims),
        token_endpoint_auth_method=method,
        roles=roles,
    )


def _secret(
    where: str, spec: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> str | None:
    """The client secret: from an environment variable or a file, never from the TOML."""
    if "client_secret" in spec:
        problems.append(f"{where}: put the secret in client_secret_env or client_secret_file")
        return None
    if spec.get("client_secret_env"):
        value = env.get(str(spec["client_secret_env"]), "")
        if not value:
            problems.append(f"{where}: environment variable {spec['client_secret_env']} is not set")
            return None
        return value
    if spec.get("client_secret_file"):
        try:
            value = Path(str(spec["client_secret_file"])).read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(f"{where}: cannot read client_secret_file ({type(exc).__name__})")
            return None
        if not value:
            problems.append(f"{where}: client_secret_file is empty")
            return None
        return value
    problems.append(f"{where}: needs client_secret_env or client_secret_file")
    return None


def _roles(where: str, table: Any, problems: list[str]) -> dict[str, RoleGrant]:
    if not isinstance(table, Mapping) or not table:
        problems.append(f"{where}: roles must map at least one claim value to a role")
        return {}
    roles: dict[str, RoleGrant] = {}
    for value, spec in table.items():
        at = f"{where}.roles.{value}"
        if not isinstance(spec, Mapping):
            problems.append(f"{at} must be a table")
            continue
        for key in spec:
            if key not in {"role", "organization", "scopes", "purpose_of_use"}:
                problems.append(f"{at}: unknown key {key}")
        role = spec.get("role")
        if role not in ROLES:
            problems.append(f"{at}: role must be one of {', '.join(ROLES)}")
            continue
        scopes, bad = parse_scopes(spec.get("scopes", []))
        for text in bad:
            problems.append(f"{at}: not a SMART system scope: {text}")
        if not scopes:
            problems.append(f"{at}: at least one scope is needed (as for a client)")
        organization = spec.get("organization")
        if organization is not None and (
            not isinstance(organization, str) or "|" not in organization
        ):
            problems.append(f"{at}: organization must be 'system|value'")
        if role in ("referrer", "health-authority") and not organization:
            problems.append(f"{at}: a {role} must name the organization it acts for")
        purpose = spec.get("purpose_of_use", DEFAULT_PURPOSE.get(str(role), "TREAT"))
        if purpose not in PURPOSES:
            problems.append(f"{at}: purpose_of_use must be one of {', '.join(PURPOSES)}")
        roles[str(value)] = RoleGrant(str(role), tuple(scopes), organization, str(purpose))
    return roles


def secure_url(url: str) -> bool:
    """https, or http to a loopback address (a provider on this machine: tests, local use)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------- the flow


@dataclass(frozen=True)
class Authorization:
    """A sign-in begun: where to send the browser, and what the callback must match."""

    url: str
    state: str
    nonce: str
    code_verifier: str


class OpenIdClient:
    """The web pages as a relying party of one provider (one per provider, per process)."""

    def __init__(
        self,
        provider: Provider,
        http: requests.Session | None = None,
        discovery_url: str | None = None,
    ) -> None:
        self.provider = provider
        self.http = http or requests.Session()
        #: Where the provider's metadata is read: OpenID Connect Discovery, or (a SMART EHR's
        #: authorization server, ``security/smart.py``) the FHIR server's smart-configuration.
        self.discovery_url = discovery_url or f"{provider.issuer}/.well-known/openid-configuration"
        self._lock = threading.Lock()
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._keys_at = 0.0

    # ------------------------------------------------------------------ discovery

    def metadata(self) -> dict[str, Any]:
        with self._lock:
            fresh = time.monotonic() - self._metadata_at < METADATA_TTL_SECONDS
            if self._metadata is not None and fresh:
                return self._metadata
        doc = self._get_json(self.discovery_url, "discovery document")
        problems = self._metadata_problems(doc)
        if problems:
            raise SignInError(
                "provider metadata refused: " + "; ".join(problems),
                f"{self.provider.title} cannot be used for sign-in right now (its "
                "configuration does not match this service's); tell your administrator.",
                502,
            )
        with self._lock:
            self._metadata, self._metadata_at = doc, time.monotonic()
            self._keys = None  # new metadata may name a new key set
        return doc

    def _metadata_problems(self, doc: Mapping[str, Any]) -> list[str]:
        return _metadata_problems(doc, self.provider.issuer)

    def _key_set(self, refresh: bool = False) -> KeySet:
        with self._lock:
            keys, fetched = self._keys, self._keys_at
        if keys is not None and not (refresh and time.monotonic() - fetched > JWKS_REFRESH_SECONDS):
            return keys
        doc = self._get_json(str(self.metadata()["jwks_uri"]), "key set")
        try:
            keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError):
            raise SignInError(
                "provider key set unreadable",
                f"{self.provider.title} sent keys this service cannot read; try again later.",
                502,
            ) from None
        with self._lock:
            self._keys, self._keys_at = keys, time.monotonic()
        return keys

    def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            response = self.http.get(url, timeout=HTTP_TIMEOUT_SECONDS)
            response.raise_for_status()
            doc = response.json()
        except (requests.RequestException, ValueError):
            raise SignInError(
                f"provider {what} unavailable",
                f"{self.provider.title} cannot be reached right now; try again in a minute.",
                502,
            ) from None
        if not isinstance(doc, dict):
            raise SignInError(
                f"provider {what} is not a JSON object",
                f"{self.provider.title} answered in a way this service cannot use.",
                502,
            )
        return doc

    # ------------------------------------------------------------------ authorization request

    def _session(self, redirect_uri: str) -> Any:
        session = OAuth2Session(
            client_id=self.provider.client_id,
            client_secret=self.provider.client_secret,
            scope=" ".join(self.provider.scopes),
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method=self.provider.token_endpoint_auth_method,
        )
        self._client_auth(session)
        # The provider's own TLS and proxy settings, as for every other request of ours.
        session.trust_env = self.http.trust_env
        return session

    def _client_auth(self, session: Any) -> None:
        """Hook for another client authentication (SMART's private_key_jwt)."""

    def begin(self, redirect_uri: str, extra: Mapping[str, str] | None = None) -> Authorization:
        """A new authorization request: fresh state, nonce and PKCE verifier (S256); ``extra``
        parameters go along (SMART's ``aud`` and ``launch``)."""
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 characters, within RFC 7636's 43-128
        with self._session(redirect_uri) as session:
            url, _ = session.create_authorization_url(
                self.metadata()["authorization_endpoint"],
                state=state,
                code_verifier=verifier,
                nonce=nonce,
                **dict(extra or {}),
            )
        return Authorization(str(url), state, nonce, verifier)

    # ------------------------------------------------------------------ the callback

    def finish(
        self,
        params: Mapping[str, str],
        *,
        redirect_uri: str,
        nonce: str,
        code_verifier: str,
        now: int,
    ) -> Identity:
        """The person the provider signed in, from the callback's parameters (whose ``state``
        the caller has already matched to the request it made). Raises ``SignInError``."""
        claims, _ = self.finish_with_token(
            params, redirect_uri=redirect_uri, nonce=nonce, code_verifier=code_verifier, now=now
        )
        return self._identity(claims)

    def finish_with_token(
        self,
        params: Mapping[str, str],
        *,
        redirect_uri: str,
        nonce: str,
        code_verifier: str,
        now: int,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``finish``'s work, answering the validated claims (ID token, then UserInfo) and the
        whole token response (a SMART EHR's carries the launch context beside the tokens)."""
        metadata = self.metadata()
        issuer_param = params.get("iss")
        if issuer_param is not None and issuer_param != self.provider.issuer:
            # RFC 9207: the answer names who sent it (a mix-up between providers).
            raise SignInError("authorization response from another issuer", _REFUSED)
        if issuer_param is None and metadata.get("authorization_response_iss_parameter_supported"):
            raise SignInError("authorization response without its issuer", _REFUSED)
        if params.get("error"):
            error = re.sub(r"[^a-z_]", "", str(params["error"]))[:40] or "error"
            message = (
                "You cancelled the sign-in."
                if error == "access_denied"
                else f"{self.provider.title} did not sign you in ({error})."
            )
            raise SignInError(f"provider answered {error}", message)
        code = params.get("code")
        if not code:
            raise SignInError("no authorization code", _REFUSED, 400)
        token = self._exchange(code, redirect_uri, code_verifier)
        claims = self._id_token_claims(token, nonce, now)
        merged = dict(claims)
        if not self._has_claims(merged) and metadata.get("userinfo_endpoint"):
            merged.update(self._userinfo(str(metadata["userinfo_endpoint"]), token, claims))
        return merged, token

    def _exchange(self, code: str, redirect_uri: str, code_verifier: str) -> dict[str, Any]:
        endpoint = str(self.metadata()["token_endpoint"])
        try:
            with self._session(redirect_uri) as session:
                token = session.fetch_token(
                    endpoint,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=code_verifier,
                    timeout=HTTP_TIMEOUT_SECONDS,
                )
        except requests.RequestException:
            raise SignInError(
                "token endpoint unavailable",
                f"{self.provider.title} cannot be reached right now; try again in a minute.",
                502,
            ) from None
        except Exception as exc:  # Authlib's OAuthError and its JSON/shape errors
            error = re.sub(r"[^a-z_]", "", str(getattr(exc, "error", "") or ""))[:40]
            raise SignInError(
                f"token request refused ({error or type(exc).__name__})", _REFUSED
            ) from None
        if not isinstance(token, dict) or not token.get("id_token"):
            raise SignInError("token response without an ID token", _REFUSED)
        if str(token.get("token_type", "")).lower() != "bearer":
            raise SignInError("token response is not a bearer token", _REFUSED)
        return dict(token)

    def _id_token_claims(self, token: Mapping[str, Any], nonce: str, now: int) -> dict[str, Any]:
        """OIDC Core 3.1.3.7: signature by the provider's key, an accepted algorithm, ``iss``
        exactly the provider's, ``aud`` this client alone (``azp`` this client when present),
        ``exp`` not passed, ``iat`` recent, ``nonce`` the one this sign-in sent, ``at_hash``
        matching when present."""
        raw = str(token["id_token"])
        metadata = self.metadata()
        offered = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [a for a in ID_TOKEN_ALGORITHMS if a in offered]
        registry = JWSRegistry(algorithms=algorithms)
        try:
            try:
                decoded = jose_jwt.decode(raw, self._key_set(), registry=registry)
            except (InvalidKeyIdError, MissingKeyError):
                decoded = jose_jwt.decode(raw, self._key_set(refresh=True), registry=registry)
        except (JoseError, ValueError, TypeError) as exc:
            raise SignInError(f"ID token refused ({type(exc).__name__})", _REFUSED) from None
        claims = CodeIDToken(
            decoded.claims,
            decoded.header,
            {
                "iss": {"essential": True, "value": self.provider.issuer},
                "aud": {"essential": True, "value": self.provider.client_id},
                "sub": {"essential": True},
                "nonce": {"essential": True, "value": nonce},
            },
            {
                "nonce": nonce,
                "client_id": self.provider.client_id,
                "access_token": token.get("access_token"),
            },
        )
        try:
            claims.validate(now=now, leeway=LEEWAY_SECONDS)
        except JoseError as exc:
            name = getattr(exc, "claim", None) or type(exc).__name__
            raise SignInError(f"ID token refused ({name})", _REFUSED) from None
        audience = claims["aud"]
        if isinstance(audience, list) and audience != [self.provider.client_id]:
            # OIDC Core 3.1.3.7 (3): an audience this service does not trust is a refusal.
            raise SignInError("ID token refused (aud names other parties)", _REFUSED)
        if not isinstance(claims.get("iat"), int | float):
            raise SignInError("ID token refused (iat)", _REFUSED)
        if claims["iat"] > now + LEEWAY_SECONDS or claims["iat"] < now - MAX_ID_TOKEN_AGE_SECONDS:
            raise SignInError("ID token refused (iat not recent)", _REFUSED)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise SignInError("ID token refused (sub)", _REFUSED)
        return dict(claims)

    def _has_claims(self, claims: Mapping[str, Any]) -> bool:
        named = any(claims.get(n) for n in self.provider.name_claims)
        return named and claims.get(self.provider.role_claim) is not None

    def _userinfo(
        self, endpoint: str, token: Mapping[str, Any], id_claims: Mapping[str, Any]
    ) -> dict[str, Any]:
        try:
            response = self.http.get(
                endpoint,
                headers={
                    "Authorization": f"Bearer {token.get('access_token', '')}",
                    "Accept": "application/json",
                },
                timeout=HTTP_TIMEOUT_SECONDS,
            )
            response.raise_for_status()
            info = response.json()
        except (requests.RequestException, ValueError):
            raise SignInError(
                "userinfo unavailable",
                f"{self.provider.title} did not say who you are; try again in a minute.",
                502,
            ) from None
        if not isinstance(info, dict) or info.get("sub") != id_claims.get("sub"):
            # OIDC Core 5.3.4: a UserInfo answer about someone else is not used.
            raise SignInError("userinfo about another subject", _REFUSED)
        # The ID token's registered claims stay as validated; UserInfo adds the others.
        return {k: v for k, v in info.items() if k not in _ID_TOKEN_ONLY}

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        name = next(
            (str(claims[n]) for n in self.provider.name_claims if isinstance(claims.get(n), str)),
            "",
        ).strip()
        raw = claims.get(self.provider.role_claim)
        if isinstance(raw, str):
            values: tuple[str, ...] = (raw,)
        elif isinstance(raw, list):
            values = tuple(str(v) for v in raw if isinstance(v, str | int))
        else:
            values = ()
        return Identity(
            provider=self.provider.id,
            issuer=self.provider.issuer,
            subject=str(claims["sub"]),
            name=(name or str(claims["sub"]))[:200],
            role_values=values,
        )


_REFUSED = "The sign-in could not be completed. Please start again."
_ID_TOKEN_ONLY = frozenset(
    {"iss", "aud", "exp", "iat", "nbf", "nonce", "azp", "at_hash", "c_hash", "auth_time", "jti"}
)


def _metadata_problems(doc: Mapping[str, Any], issuer: str) -> list[str]:
    problems = []
    if doc.get("issuer") != issuer:
        # OpenID Connect Discovery 4.3: the document must name exactly the issuer asked for.
        problems.append("issuer differs from the configured one")
    for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = doc.get(key)
        if not isinstance(value, str) or not secure_url(value):
            problems.append(f"{key} missing or not https")
    userinfo = doc.get("userinfo_endpoint")
    if userinfo is not None and (not isinstance(userinfo, str) or not secure_url(userinfo)):
        problems.append("userinfo_endpoint not https")
    if "code" not in (doc.get("response_types_supported") or []):
        problems.append("the code flow is not supported")
    methods = doc.get("code_challenge_methods_supported")
    if methods is not None and "S256" not in methods:
        problems.append("PKCE S256 is not supported")
    offered = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
    if not any(a in ID_TOKEN_ALGORITHMS for a in offered):
        problems.append("no asymmetric ID token signature algorithm")
    return problems


ClientFactory = Callable[[Provider], OpenIdClient]


def grant_configured(clients: Mapping[str, OpenIdClient], principal: Principal) -> bool:
    """Is ``principal`` (a person's) a grant its provider's mapping still gives? Asked on
    every use of a person's access token (``TokenService.person_grant_configured``)."""
    person = principal.person
    if person is None or not principal.client_id.startswith(CLIENT_PREFIX):
        return False
    oidc = clients.get(principal.client_id.removeprefix(CLIENT_PREFIX))
    if oidc is None or person.issuer != oidc.provider.issuer:
        return False
    return any(
        grant.role == principal.role
        and grant.organization == principal.organization
        and grant.purpose == principal.purpose
        and all(covered_by(scope, grant.scopes) for scope in principal.scopes)
        for grant in oidc.provider.roles.values()
    )
