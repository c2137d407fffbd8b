"""The referral form as a SMART App Launch 2.x app: the EHRs registered to launch it, their
authorization servers, and the launch itself (docs/integrators.md, "SMART app").

Owns: the ``[smart.ehrs.<name>]`` registrations (checked at start-up, every problem at once),
the EHR's ``{iss}/.well-known/smart-configuration`` (fetched on first use, cached, checked), the
authorization request (authorization code, PKCE S256, ``aud`` = the EHR's FHIR base, ``launch``
for an EHR launch, ``launch/patient`` for a standalone one), the token exchange as a confidential
client (client secret, or ``private_key_jwt``), the ID token's validation against the
authorization server's JWKS (``security/oidc.py``'s rules: the same code) and the launch context
(``patient``, ``fhirUser``) the EHR gives. The physician becomes a person with the grant the
registration names (referrer, the EHR's organisation), never one a claim chooses.

Must not: touch flask or the database, log a token, a claim value or a patient id, or follow an
``iss`` that is not registered (a launch never chooses where the service connects).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from fhir_kat.security.clients import DEFAULT_PURPOSE, PURPOSES
from fhir_kat.security.oidc import (
    HTTP_TIMEOUT_SECONDS,
    ID_TOKEN_ALGORITHMS,
    Authorization,
    OpenIdClient,
    Provider,
    RoleGrant,
    SignInError,
    _secret,
    secure_url,
)
from fhir_kat.security.scopes import covered_by, parse_scopes
from fhir_kat.security.tokens import Principal
from fhir_kat.settings import SettingsError

#: The client id a launched physician's requests carry (``Principal.client_id``): the referral
#: form as registered at that EHR. The prefix keeps it apart from API clients and ``oidc:``.
CLIENT_PREFIX = "smart:"
EHR_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
#: What the form reads (SMART 2.0 ``.rs`` scopes; the EHR may grant less, the form then shows
#: less). ``launch`` is sent on an EHR launch, ``launch/patient`` on a standalone one.
DEFAULT_SCOPES = (
    "launch",
    "launch/patient",
    "openid",
    "fhirUser",
    "patient/Patient.rs",
    "patient/Condition.rs",
    "patient/MedicationRequest.rs",
    "patient/Observation.rs",
    "patient/AllergyIntolerance.rs",
)
#: Private-key client authentication (SMART's asymmetric confidential clients).
KEY_ALGORITHMS = ("RS384", "ES384")
_PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # a FHIR id
_REFUSED = "The launch from your EMR could not be completed. Please launch the form again."


@dataclass(frozen=True)
class SmartEhr:
    """One EHR registered to launch the referral form."""

    id: str
    title: str
    #: The EHR's FHIR base: the only ``iss`` accepted for this registration.
    iss: str
    client_id: str
    client_secret: str = field(repr=False)
    #: ``client_secret_basic``, ``client_secret_post`` or ``private_key_jwt``.
    auth_method: str
    key_id: str | None
    algorithm: str
    scopes: tuple[str, ...]
    #: The grant the EHR's physicians get here (role referrer, the EHR's organisation).
    grant: RoleGrant

    @property
    def principal_client_id(self) -> str:
        return f"{CLIENT_PREFIX}{self.id}"


def load_ehrs(tables: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, SmartEhr]:
    """``[smart.ehrs.<name>]`` registrations; ``SettingsError`` naming every problem."""
    problems: list[str] = []
    ehrs: dict[str, SmartEhr] = {}
    for key in tables:
        if key != "ehrs":
            problems.append(f"[smart]: unknown key {key}")
    ehr_tables = tables.get("ehrs", {})
    if not isinstance(ehr_tables, Mapping):
        problems.append("[smart.ehrs] must be a table of EHRs")
        ehr_tables = {}
    for ehr_id, spec in ehr_tables.items():
        where = f"[smart.ehrs.{ehr_id}]"
        if not isinstance(spec, Mapping):
            problems.append(f"{where} must be a table")
            continue
        if not EHR_ID.match(str(ehr_id)):
            problems.append(f"{where}: the name must be 1-40 lowercase letters, digits or '-'")
        ehr = _ehr(str(ehr_id), spec, environ, problems)
        if ehr is not None:
            ehrs[ehr.id] = ehr
    seen: dict[str, str] = {}
    for ehr in ehrs.values():
        if ehr.iss in seen:
            problems.append(f"[smart.ehrs.{ehr.id}]: iss is already registered for {seen[ehr.iss]}")
        seen[ehr.iss] = ehr.id
    if problems:
        raise SettingsError("invalid SMART EHR registrations:\n  " + "\n  ".join(problems))
    return ehrs


def _ehr(
    ehr_id: str, spec: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> SmartEhr | None:
    where = f"[smart.ehrs.{ehr_id}]"
    known = {
        "title",
        "iss",
        "client_id",
        "client_secret_env",
        "client_secret_file",
        "private_key_file",
        "key_id",
        "algorithm",
        "token_endpoint_auth_method",
        "scopes",
        "organization",
        "referrer_scopes",
        "purpose_of_use",
    }
    for key in spec:
        if key not in known:
            problems.append(f"{where}: unknown key {key}")
    iss = str(spec.get("iss") or "").rstrip("/")
    if not iss:
        problems.append(f"{where}: iss (the EHR's FHIR base URL) is required")
    elif not secure_url(iss) or urlsplit(iss).query or urlsplit(iss).fragment:
        problems.append(f"{where}: iss must be an https URL (http only on loopback), no query")
    client_id = str(spec.get("client_id") or "")
    if not client_id:
        problems.append(f"{where}: client_id is required")
    secret, method, key_id, algorithm = _client_auth(where, spec, env, problems)
    scopes = tuple(str(s) for s in spec.get("scopes", DEFAULT_SCOPES))
    for needed in ("openid", "fhirUser"):
        if needed not in scopes:
            problems.append(f"{where}: scopes must include {needed} (the physician's identity)")
    if "launch" not in scopes and "launch/patient" not in scopes:
        problems.append(f"{where}: scopes must include launch or launch/patient")
    organization = spec.get("organization")
    if not isinstance(organization, str) or "|" not in organization:
        problems.append(
            f"{where}: organization ('system|value': the clinic this EHR's physicians refer "
            "for) is required"
        )
    granted, bad = parse_scopes(spec.get("referrer_scopes", []))
    for text in bad:
        problems.append(f"{where}: referrer_scopes: not a SMART system scope: {text}")
    if not granted:
        problems.append(
            f"{where}: referrer_scopes (what a launched physician may do here, as for a "
            "client) needs at least one scope"
        )
    purpose = spec.get("purpose_of_use", DEFAULT_PURPOSE.get("referrer", "TREAT"))
    if purpose not in PURPOSES:
        problems.append(f"{where}: purpose_of_use must be one of {', '.join(PURPOSES)}")
    if not iss or not client_id or secret is None or not isinstance(organization, str):
        return None
    return SmartEhr(
        id=ehr_id,
        title=str(spec.get("title") or ehr_id),
        iss=iss,
        client_id=client_id,
        client_secret=secret,
        auth_method=method,
        key_id=key_id,
        algorithm=algorithm,
        scopes=scopes,
        grant=RoleGrant("referrer", tuple(granted), organization, str(purpose)),
    )


def _client_auth(
    where: str, spec: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> tuple[str | None, str, str | None, str]:
    """(secret or private key PEM, method, key id, algorithm): a shared secret from the
    environment or a file, or a private key file (``private_key_jwt``); never from the TOML."""
    if spec.get("private_key_file"):
        algorithm = str(spec.get("algorithm", "RS384"))
        if algorithm not in KEY_ALGORITHMS:
            problems.append(f"{where}: algorithm must be one of {', '.join(KEY_ALGORITHMS)}")
        if "client_secret_env" in spec or "client_secret_file" in spec:
            problems.append(f"{where}: a private key or a client secret, not both")
        try:
            pem = Path(str(spec["private_key_file"])).read_text(encoding="utf-8")
            _private_key(pem, algorithm)
        except (OSError, JoseError, ValueError, TypeError) as exc:
            problems.append(f"{where}: cannot read private_key_file ({type(exc).__name__})")
            return None, "private_key_jwt", None, algorithm
        return pem, "private_key_jwt", spec.get("key_id") and str(spec["key_id"]), algorithm
    method = str(spec.get("token_endpoint_auth_method", "client_secret_basic"))
    if method not in ("client_secret_basic", "client_secret_post"):
        problems.append(
            f"{where}: token_endpoint_auth_method must be client_secret_basic or "
            "client_secret_post (or give private_key_file for private_key_jwt)"
        )
    return _secret(where, spec, env, problems), method, None, "RS384"


def _private_key(pem: str, algorithm: str) -> RSAKey | ECKey:
    if algorithm.startswith("ES"):
        return ECKey.import_key(pem)
    return RSAKey.import_key(pem)


# ---------------------------------------------------------------------------- the launch


@dataclass(frozen=True)
class Launch:
    """A completed launch: who the physician is, which patient, and the EHR's access token
    (kept server-side only, ``security/sessions.py``; never in a page, a cookie or a log)."""

    ehr: str
    issuer: str
    subject: str
    name: str
    #: The ``fhirUser`` claim, as the EHR sent it (``Practitioner/…``, absolute or relative).
    fhir_user: str
    patient: str
    access_token: str = field(repr=False)
    scope: str
    expires_at: int


class EhrAuthorizationServer(OpenIdClient):
    """The referral form as a confidential client of one EHR's authorization server. The
    OpenID Connect work (PKCE, token request, the ID token's rules) is ``OpenIdClient``'s; its
    metadata is the EHR's ``smart-configuration``, whose ``issuer`` signs the ID tokens."""

    def __init__(self, ehr: SmartEhr, http: requests.Session | None = None) -> None:
        provider = Provider(
            id=ehr.id,
            title=ehr.title,
            issuer="",  # the smart-configuration names it (from the registered iss)
            client_id=ehr.client_id,
            client_secret=ehr.client_secret,
            scopes=ehr.scopes,
            role_claim="fhirUser",  # without it in the ID token, UserInfo is asked
            name_claims=("name", "preferred_username"),
            token_endpoint_auth_method=ehr.auth_method,
            roles={},
        )
        super().__init__(provider, http, f"{ehr.iss}/.well-known/smart-configuration")
        self.ehr = ehr

    def metadata(self) -> dict[str, Any]:
        doc = super().metadata()
        if "id_token_signing_alg_values_supported" not in doc:
            # A smart-configuration need not list them (OpenID discovery's default, RS256
            # alone, would refuse an EHR signing with RS384 or ES384): every asymmetric
            # algorithm, still checked against the EHR's own keys.
            return {**doc, "id_token_signing_alg_values_supported": list(ID_TOKEN_ALGORITHMS)}
        return doc

    def _metadata_problems(self, doc: Mapping[str, Any]) -> list[str]:
        """SMART App Launch 2.x discovery: an OpenID issuer with its keys (``sso-openid-
        connect``), both endpoints, PKCE S256, and a confidential client's capability."""
        problems = []
        issuer = doc.get("issuer")
        if not isinstance(issuer, str) or not secure_url(issuer):
            problems.append("issuer missing or not https (needed for the physician's identity)")
        else:
            # Exactly as named: the ID token's iss must equal it (OIDC Core 3.1.3.7).
            self.provider = replace(self.provider, issuer=issuer)
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = doc.get(key)
            if not isinstance(value, str) or not secure_url(value):
                problems.append(f"{key} missing or not https")
        if "S256" not in (doc.get("code_challenge_methods_supported") or []):
            problems.append("PKCE S256 is not offered (SMART 2.0 requires it)")
        capabilities = doc.get("capabilities") or []
        wanted = (
            "client-confidential-asymmetric"
            if self.ehr.auth_method == "private_key_jwt"
            else "client-confidential-symmetric"
        )
        if wanted not in capabilities:
            problems.append(f"capability {wanted} is not offered")
        if "sso-openid-connect" not in capabilities:
            problems.append("capability sso-openid-connect is not offered")
        return problems

    def _client_auth(self, session: Any) -> None:
        if self.ehr.auth_method != "private_key_jwt":
            return
        # Authlib signs the assertion (aud = the token endpoint, a fresh jti, exp ≤ 5 min).
        session.client_secret = _private_key(self.ehr.client_secret, self.ehr.algorithm)
        headers = {"kid": self.ehr.key_id} if self.ehr.key_id else None
        session.register_client_auth_method(
            PrivateKeyJWT(
                str(self.metadata()["token_endpoint"]), headers=headers, alg=self.ehr.algorithm
            )
        )

    def revoke(self, access_token: str) -> bool:
        """Ask the EHR to revoke a launch's access token (RFC 7009), when its configuration
        names a ``revocation_endpoint``: the token is then dead at the EHR too, not only
        forgotten here. Best effort: False when not offered or not done (the token still
        expires at the EHR); never raises, never logs the token."""
        try:
            endpoint = self.metadata().get("revocation_endpoint")
            if not isinstance(endpoint, str) or not secure_url(endpoint):
                return False
            with self._session("") as session:
                response = session.revoke_token(
                    endpoint,
                    token=access_token,
                    token_type_hint="access_token",  # noqa: S106 (RFC 7009 hint, not a secret)
                    timeout=HTTP_TIMEOUT_SECONDS,
                )
            return bool(response.status_code == 200)
        except Exception:  # revocation is a courtesy: the launch is forgotten here regardless
            return False

    def begin_launch(self, redirect_uri: str, launch: str | None) -> Authorization:
        """An EHR launch (``launch`` given: scope ``launch``) or a standalone one (the patient
        picked at the EHR: scope ``launch/patient``); ``aud`` is the EHR's FHIR base."""
        capabilities = self.metadata().get("capabilities") or []
        kind = "launch-ehr" if launch is not None else "launch-standalone"
        if kind not in capabilities:
            raise SignInError(
                f"EHR does not offer {kind}",
                f"{self.ehr.title} does not offer this kind of launch "
                f"({'from inside the EMR' if launch is not None else 'standalone'}).",
                502,
            )
        drop = "launch/patient" if launch is not None else "launch"
        scopes = [s for s in self.ehr.scopes if s != drop]
        extra = {"aud": self.ehr.iss, "scope": " ".join(scopes)}
        if launch is not None:
            extra["launch"] = launch
        return self.begin(redirect_uri, extra)

    def finish_launch(
        self,
        params: Mapping[str, str],
        *,
        redirect_uri: str,
        nonce: str,
        code_verifier: str,
        now: int,
    ) -> Launch:
        """The completed launch from the callback's parameters (``state`` already matched by
        the caller); ``SignInError`` when the EHR refused, or gave no patient or user."""
        if params.get("error") == "access_denied":
            raise SignInError(
                "EHR answered access_denied",
                f"The form was not given access at {self.ehr.title} (you, or the EMR, "
                "declined). Nothing was read and nothing was sent.",
                403,
            )
        claims, token = self.finish_with_token(
            params, redirect_uri=redirect_uri, nonce=nonce, code_verifier=code_verifier, now=now
        )
        patient = token.get("patient")
        if not isinstance(patient, str) or not _PATIENT_ID.match(patient):
            raise SignInError("token response without a patient in context", _NO_PATIENT, 502)
        fhir_user = claims.get("fhirUser")
        if not isinstance(fhir_user, str) or not _user_reference(fhir_user, self.ehr.iss):
            raise SignInError("no usable fhirUser claim", _NO_USER, 502)
        expires_in = token.get("expires_in")
        lifetime = int(expires_in) if isinstance(expires_in, int | float) else 300
        name = next(
            (
                str(claims[n])
                for n in ("name", "preferred_username")
                if isinstance(claims.get(n), str)
            ),
            "",
        ).strip()
        return Launch(
            ehr=self.ehr.id,
            issuer=self.provider.issuer,
            subject=str(claims["sub"]),
            name=name[:200],
            fhir_user=fhir_user,
            patient=patient,
            access_token=str(token["access_token"]),
            scope=str(token.get("scope") or ""),
            expires_at=now + max(0, min(lifetime, 3600)),
        )


_NO_PATIENT = (
    "Your EMR did not say which patient the referral is for. Open the form again from the "
    "patient's chart."
)
_NO_USER = (
    "Your EMR did not say who you are (no fhirUser), so the referral cannot be sent in your "
    "name. Ask your EMR administrator to grant the form the fhirUser scope."
)
_USER_TYPES = ("Practitioner", "PractitionerRole")


def _user_reference(fhir_user: str, iss: str) -> str | None:
    """The physician's resource path relative to the EHR's FHIR base (``Practitioner/<id>``),
    from a relative ``fhirUser`` or an absolute one under the registered ``iss``; None for a
    patient, a person elsewhere, or anything else (a referral is sent by a practitioner)."""
    path = fhir_user
    if "://" in fhir_user:
        if not fhir_user.startswith(iss + "/"):
            return None
        path = fhir_user[len(iss) + 1 :]
    rtype, _, rid = path.partition("/")
    if rtype not in _USER_TYPES or not _PATIENT_ID.match(rid):
        return None
    return f"{rtype}/{rid}"


def user_path(fhir_user: str, iss: str) -> str | None:
    """The physician's resource to read at the EHR (``Practitioner/<id>``), or None."""
    return _user_reference(fhir_user, iss)


def launch_grant_configured(
    servers: Mapping[str, EhrAuthorizationServer], principal: Principal
) -> bool:
    """Is ``principal`` (a launched physician's) the grant its EHR's registration still gives?
    Asked on every use of the person's access token, as for ``oidc.grant_configured``."""
    person = principal.person
    if person is None or not principal.client_id.startswith(CLIENT_PREFIX):
        return False
    server = servers.get(principal.client_id.removeprefix(CLIENT_PREFIX))
    if server is None:
        return False
    grant = server.ehr.grant
    return (
        grant.role == principal.role
        and grant.organization == principal.organization
        and grant.purpose == principal.purpose
        and all(covered_by(scope, grant.scopes) for scope in principal.scopes)
    )
