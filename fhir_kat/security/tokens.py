"""Access tokens and client assertions (SMART Backend Services, OAuth 2.0 client credentials).

Owns: the server's signing key, issuing and verifying access tokens (JWT, ES256, ≤ 300 s), and
verifying ``private_key_jwt`` client assertions (RS384/ES384 against the client's registered
JWKS; ``aud`` = the token URL; ``exp`` at most 5 minutes ahead; ``jti`` never reused). All
cryptography is PyJWT's and ``cryptography``'s; nothing here is hand-rolled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError

from fhir_kat.security.clients import Client, ClientRegistry
from fhir_kat.security.scopes import Scope, covered_by, parse_scopes
from fhir_kat.store import Store
from fhir_kat.store.schema import auth_jti

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = ("RS384", "ES384")
MAX_ASSERTION_LIFETIME = timedelta(minutes=5)
ACCESS_ALGORITHM = "ES256"
#: Every failure before an assertion's signature is verified (unknown client, unregistered key,
#: bad signature) gets this one answer, so the answer does not tell whether a client id exists.
INVALID_ASSERTION = (
    "client_assertion is invalid: unknown client, no registered key for it, or a bad signature"
)
#: How a refused client assertion is answered (``verify_signed_jwt``'s reasons).
_ASSERTION_REFUSALS = {
    "not-jwt": "client_assertion is not a JWT",
    "algorithm": "client_assertion must be RS384 or ES384",
    "untrusted": INVALID_ASSERTION,
    "expired": "client_assertion has expired",
    "audience": "client_assertion aud must be the token URL",
    "invalid": "client_assertion is invalid",
    "lifetime": "client_assertion exp is more than 5 minutes ahead",
    "replayed": "client_assertion jti was already used",
}
#: Access tokens verified lately (per process): a client sends the same token with every
#: request for up to its lifetime, and a signature check costs more than a small search.
VERIFIED_CACHE_SIZE = 4096


class OAuthError(Exception):
    """An RFC 6749 §5.2 error: ``error`` is the OAuth code, ``status`` the HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@dataclass(frozen=True)
class Person:
    """A person signed in through an OpenID Provider (``security/oidc.py``): who the provider
    says it is (``issuer`` + ``subject``: the provider's own stable identifier) and the name it
    gave. A person acts with exactly the grant its provider's role mapping gave at sign-in."""

    issuer: str
    subject: str
    name: str


@dataclass(frozen=True)
class Principal:
    client_id: str
    role: str
    scopes: tuple[Scope, ...]
    organization: str | None
    purpose: str
    token_id: str
    #: The person acting through ``client_id`` (a web-page sign-in through an OpenID
    #: Provider); None for a client acting for itself.
    person: Person | None = None

    @property
    def actor(self) -> str:
        """Whose requests these are, for what is kept per caller (rate limits, export jobs):
        the client, or the person within the client (by a digest of the provider's id)."""
        if self.person is None:
            return self.client_id
        digest = hashlib.sha256(f"{self.person.issuer}\n{self.person.subject}".encode())
        return f"{self.client_id}#{digest.hexdigest()[:24]}"


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the EC P-256 signing key, creating it (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Write beside the target, then link it into place: several processes starting at
        # once (gunicorn workers) end up with one key, and none reads a half-written file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won; use its key
        finally:
            tmp.unlink()
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: the token signing key must be an EC P-256 private key")
    return loaded


class TokenService:
    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str,
        lifetime_seconds: int,
        store: Store,
        clock: Callable[[], datetime],
        clients: ClientRegistry,
    ) -> None:
        self.key = key
        self.public_key = key.public_key()
        self.issuer = issuer
        self.lifetime = lifetime_seconds
        self.store = store
        self.clock = clock
        #: Asked on every use of a token (``verify``), whatever the cache holds.
        self.clients = clients
        #: For a person's token (minted by a browser session): does its provider's role
        #: mapping still give exactly this grant? Set by the app (``security/oidc.py``); until
        #: then no person's token is accepted.
        self.person_grant_configured: Callable[[Principal], bool] = lambda _principal: False
        self._verified: OrderedDict[bytes, tuple[Principal, int]] = OrderedDict()
        self._verified_lock = threading.Lock()
        self._unheld: dict[str, dict[str, Any]] = {}
        self._unheld_lock = threading.Lock()  # not the cache's: making an RSA key takes a while

    # ------------------------------------------------------------------ access tokens

    def issue(self, client: Client, scopes: tuple[Scope, ...]) -> tuple[str, int]:
        return self.issue_grant(
            client.client_id, client.role, scopes, client.organization, client.purpose
        )

    def issue_grant(
        self,
        subject: str,
        role: str,
        scopes: tuple[Scope, ...],
        organization: str | None,
        purpose: str,
        person: Person | None = None,
    ) -> tuple[str, int]:
        """An access token for ``subject`` (a client id) with exactly this grant; with
        ``person``, for a person acting through it (minted only by the browser session)."""
        now = self.clock()
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.issuer,
            "sub": subject,
            "iat": int(now.timestamp()),
            "exp": int(now.timestamp()) + self.lifetime,
            "jti": str(uuid.uuid4()),
            "scope": " ".join(s.text for s in scopes),
            "role": role,
            "org": organization,
            "pou": purpose,
        }
        if person is not None:
            claims["usr"] = {"iss": person.issuer, "sub": person.subject, "name": person.name}
        return jwt.encode(claims, self.key, algorithm=ACCESS_ALGORITHM), self.lifetime

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; raises ``jwt.PyJWTError`` for anything else.

        A token found valid before is not checked again: its principal is remembered (by
        digest, bounded) with its ``exp``, which is still enforced on every use exactly as
        PyJWT does (expired once ``now >= exp``). Only successes are remembered; every failure
        is a fresh check. The client registry is asked on every use, cached or not
        (``_still_registered``): a client removed, or registered with another role,
        organisation, purpose or narrower scopes — in this process or before a restart with
        the same signing key — loses its tokens at once."""
        key = hashlib.blake2b(token.encode(), digest_size=20).digest()
        with self._verified_lock:
            known = self._verified.get(key)
            if known is not None:
                self._verified.move_to_end(key)
        if known is not None:
            principal, exp = known
            if exp <= time.time():
                raise jwt.ExpiredSignatureError("Signature has expired")
        else:
            principal, exp = self._decode(token)
            with self._verified_lock:
                self._verified[key] = (principal, exp)
                while len(self._verified) > VERIFIED_CACHE_SIZE:
                    self._verified.popitem(last=False)
        self._still_registered(principal)
        return principal

    def _still_registered(self, principal: Principal) -> None:
        if principal.person is not None:
            # A person acts through the web pages' registration at its provider, not through
            # a registered client: its grant must still be one the provider's mapping gives.
            if not self.person_grant_configured(principal):
                raise jwt.InvalidTokenError("the person's grant is no longer configured")
            return
        client = self.clients.get(principal.client_id)
        if (
            client is None
            or client.role != principal.role
            or client.organization != principal.organization
            or client.purpose != principal.purpose
            or not all(covered_by(scope, client.scopes) for scope in principal.scopes)
        ):
            raise jwt.InvalidTokenError("the token's client is not registered as it says")

    def _decode(self, token: str) -> tuple[Principal, int]:
        claims = jwt.decode(
            token,
            self.public_key,
            algorithms=[ACCESS_ALGORITHM],
            audience=self.issuer,
            issuer=self.issuer,
            options={"require": ["exp", "iat", "sub", "jti"]},
            leeway=0,
            # PyJWT checks exp against the real clock; our clock matters for tests only
        )
        scopes, _ = parse_scopes(str(claims.get("scope", "")).split())
        user = claims.get("usr")
        person = (
            Person(str(user["iss"]), str(user["sub"]), str(user.get("name") or ""))
            if isinstance(user, dict)
            else None
        )
        principal = Principal(
            client_id=claims["sub"],
            role=claims["role"],
            scopes=tuple(scopes),
            organization=claims.get("org"),
            purpose=claims.get("pou", "TREAT"),
            token_id=claims["jti"],
            person=person,
        )
        return principal, int(claims["exp"])

    # ------------------------------------------------------------------ client assertions

    def verify_assertion(self, assertion: str, client: Client | None, token_url: str) -> Client:
        """The client a ``private_key_jwt`` assertion authenticates; ``OAuthError`` otherwise.

        Until the signature is verified every failure gives one answer: an unknown client id
        (None), a client without a JWKS, a ``kid`` it has not registered and a bad signature all
        run one signature check (against a key nobody holds when there is no registered one)
        and answer "client_assertion is invalid". Only the key holder learns more (expired,
        ``aud``, replayed ``jti``)."""

        def signer(alg: str, header: dict[str, Any], _: dict[str, Any]) -> SignerKey | None:
            if client is None or not client.jwks:
                return None
            key = find_key(client.jwks, header.get("kid"), alg)
            return SignerKey(key, client.client_id, client.client_id) if key else None

        try:
            claims = verify_signed_jwt(
                assertion,
                algorithms=ASSERTION_ALGORITHMS,
                signer=signer,
                audience=token_url,
                require=("exp", "jti", "iss", "sub", "aud"),
                max_lifetime=MAX_ASSERTION_LIFETIME,
                store=self.store,
                decoy=lambda alg: find_key(self._unheld_jwks(alg), None, alg),
            )
        except JwtRefused as exc:
            raise OAuthError("invalid_client", _ASSERTION_REFUSALS[exc.reason], 401) from None
        if client is None or claims["sub"] != client.client_id:  # (a signer implies a client)
            raise OAuthError("invalid_client", "client_assertion sub must equal iss", 401)
        return client

    def _unheld_jwks(self, alg: str) -> dict[str, Any]:
        """A JWKS of one public key of ``alg``'s type whose private half was discarded."""
        with self._unheld_lock:
            jwks = self._unheld.get(alg)
            if jwks is None:
                if alg.startswith("RS"):
                    private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
                else:
                    private = ec.generate_private_key(ec.SECP384R1())
                    jwk = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
                jwks = self._unheld[alg] = {"keys": [{**jwk, "alg": alg}]}
        return jwks


class JwtRefused(Exception):
    """Why ``verify_signed_jwt`` refused a JWT: ``reason`` is one of ``REFUSALS``, which each
    caller words for its protocol (OAuth ``invalid_client``, CDS Hooks 401); ``detail`` the
    PyJWT error's class name for ``invalid``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


#: not-jwt: unreadable; algorithm: not one allowed; untrusted: no registered key, or a bad
#: signature (one reason: the answer must not tell them apart); expired; audience; invalid
#: (a required claim missing, a wrong issuer, ...); lifetime: exp too far ahead; replayed: jti.
REFUSALS = (
    "not-jwt",
    "algorithm",
    "untrusted",
    "expired",
    "audience",
    "invalid",
    "lifetime",
    "replayed",
)


@dataclass(frozen=True)
class SignerKey:
    """Who signed a JWT, as the caller's registry says: the key, the ``iss`` it must carry,
    and the name its ``jti`` is remembered under."""

    key: Any
    issuer: str
    owner: str


def verify_signed_jwt(
    token: str,
    *,
    algorithms: Collection[str],
    signer: Callable[[str, dict[str, Any], dict[str, Any]], SignerKey | None],
    audience: str,
    require: Sequence[str],
    max_lifetime: timedelta,
    store: Store,
    decoy: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """The claims of a JWT signed by a registered party (SMART client assertions, CDS Hooks
    requests: the one place their PyJWT calls live); ``JwtRefused`` otherwise. ``signer``
    finds the registered key from the algorithm, the header and the unverified claims (None:
    not registered). ``decoy``: a key nobody holds, checked when no key is registered, so an
    unknown party costs the same signature check as a known one."""
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise JwtRefused("not-jwt") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        raise JwtRefused("algorithm")
    found = signer(alg, header, unverified)
    if found is None:
        if decoy is not None:
            with contextlib.suppress(jwt.PyJWTError):
                jwt.decode(token, decoy(alg), [alg])
        raise JwtRefused("untrusted")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            found.key,
            algorithms=[alg],
            audience=audience,
            issuer=found.issuer,
            options={"require": list(require)},
        )
    except jwt.InvalidSignatureError:
        raise JwtRefused("untrusted") from None
    except jwt.ExpiredSignatureError:
        raise JwtRefused("expired") from None
    except jwt.InvalidAudienceError:
        raise JwtRefused("audience") from None
    except jwt.PyJWTError as exc:
        raise JwtRefused("invalid", type(exc).__name__) from None
    now = datetime.now(UTC)
    expires = datetime.fromtimestamp(int(claims["exp"]), UTC)
    if expires - now > max_lifetime + timedelta(seconds=5):
        raise JwtRefused("lifetime")
    if not remember_jti(store, str(claims["jti"]), found.owner, expires, now):
        raise JwtRefused("replayed")
    return claims


def remember_jti(store: Store, jti: str, client_id: str, expires: datetime, now: datetime) -> bool:
    """Record a signed JWT's ``jti`` until it expires (shared by every process through the
    database); False when ``client_id`` already used it (a replay)."""
    naive_now = now.replace(tzinfo=None)
    try:
        with store.write() as tx:
            tx.conn.execute(delete(auth_jti).where(auth_jti.c.expires_at < naive_now))
            tx.conn.execute(
                insert(auth_jti).values(
                    jti=f"{client_id}:{jti}"[:255],
                    client_id=client_id,
                    expires_at=expires.replace(tzinfo=None),
                )
            )
    except IntegrityError:
        return False
    return True


def find_key(jwks: Any, kid: str | None, alg: str) -> Any:
    """The verification key of ``alg``'s type in ``jwks`` (the one with ``kid`` when given)."""
    for jwk in jwks.get("keys", []):
        if kid is not None and jwk.get("kid") != kid:
            continue
        if jwk.get("alg") not in (None, alg):
            continue
        expected_kty = "RSA" if alg.startswith("RS") else "EC"
        if jwk.get("kty") != expected_kty:
            continue
        try:
            return jwt.PyJWK(jwk, algorithm=alg).key
        except jwt.PyJWTError:
            continue
    return None


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return data
