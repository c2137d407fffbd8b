"""Browser sessions kept in the database, so that every process agrees when one ends.

Owns: the ``browser_sessions`` table (one row per sign-in: who — a registered client, or a
person through a client — with which grant, its CSRF token, when it began, when it was last
used, when it ended and why) and ``browser_signins`` (an OpenID Connect sign-in under way: the
``state``, ``nonce`` and PKCE verifier it must be finished with, bound to the browser that began
it, usable once, for ten minutes). The cookie holds a random session id; the database holds only
its SHA-256, so a copy of the table opens no session. A session ends at sign-out (the row says
so: a copied cookie stops working in every process at once), after ``idle_seconds`` without a
request, and ``absolute_seconds`` after sign-in — both on the service clock.

``smart_launches`` holds what a SMART launch (``security/smart.py``) needs until the referral is
sent: the EHR, the patient in context, the physician's ``fhirUser`` and the EHR's access token,
sealed (AES-GCM) with a key derived from the session's cookie value — which the database never
holds — so a copy of the table reveals no EHR token and no patient id. One row per session, gone
when the referral is sent, at sign-out, when the session ends, and when the EHR's token expires.

Must not: decide what a session may do (the grant is recorded here; the bearer check and
``Access`` enforce it), or log a session id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Column, DateTime, String, Table, Text, delete, insert, select, update

from fhir_kat.search import utc_naive
from fhir_kat.security.tokens import Person
from fhir_kat.store import Store
from fhir_kat.store.schema import metadata

#: A session's last use is written at most this often (seconds): a page and the API calls its
#: script makes would otherwise each write a row. The idle timeout is therefore kept to within
#: this much (a session idle for ``idle_seconds`` minus this may already be over).
TOUCH_AFTER_SECONDS = 60
#: How long a sign-in at the identity provider may take, from the button to the callback.
SIGNIN_SECONDS = 10 * 60

browser_sessions = Table(
    "browser_sessions",
    metadata,
    Column("id", String(64), primary_key=True),  # SHA-256 of the cookie's session id
    Column("client_id", String(128), nullable=False),
    Column("person_issuer", String(255), nullable=True),
    Column("person_subject", String(255), nullable=True),
    Column("person_name", String(200), nullable=True),
    Column("role", String(32), nullable=False),
    Column("organization", String(256), nullable=True),
    Column("scopes", Text, nullable=False),  # the granted scopes, space-separated
    Column("purpose", String(16), nullable=False),
    # What the grant came from (JSON list: the role claim values of a person; empty for a
    # client) and the client's credential fingerprint (a rotated secret ends its sessions).
    Column("grant_source", Text, nullable=False),
    Column("credential", String(64), nullable=True),
    Column("csrf", String(64), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("seen_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False, index=True),  # the absolute end
    Column("ended_at", DateTime, nullable=True),
    Column("end_reason", String(32), nullable=True),
)

browser_signins = Table(
    "browser_signins",
    metadata,
    Column("state", String(64), primary_key=True),  # SHA-256 of the ``state`` sent
    Column("browser", String(64), nullable=False),  # SHA-256 of the binding cookie's value
    Column("provider", String(64), nullable=False),
    Column("nonce", String(128), nullable=False),
    Column("code_verifier", String(128), nullable=False),
    Column("next_path", Text, nullable=False),
    Column("expires_at", DateTime, nullable=False, index=True),
)


smart_launches = Table(
    "smart_launches",
    metadata,
    Column("session", String(64), primary_key=True),  # the browser session row's id
    Column("sealed", Text, nullable=False),  # AES-GCM under a key only the cookie yields
    Column("expires_at", DateTime, nullable=False, index=True),  # the EHR token's expiry
)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class BrowserSession:
    key: str  # the row's id (the cookie value's digest), never the cookie value itself
    client_id: str
    role: str
    organization: str | None
    scopes: tuple[str, ...]
    purpose: str
    person: Person | None
    grant_source: tuple[str, ...]
    credential: str | None
    csrf: str
    created_at: datetime
    seen_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class PendingSignIn:
    provider: str
    nonce: str
    code_verifier: str
    next_path: str


class SessionStore:
    def __init__(self, store: Store, *, idle_seconds: int, absolute_seconds: int) -> None:
        self.store = store
        self.idle = timedelta(seconds=idle_seconds)
        self.absolute = timedelta(seconds=absolute_seconds)

    # ------------------------------------------------------------------ sessions

    def create(
        self,
        now: datetime,
        *,
        client_id: str,
        role: str,
        scopes: tuple[str, ...],
        organization: str | None,
        purpose: str,
        person: Person | None = None,
        grant_source: tuple[str, ...] = (),
        credential: str | None = None,
    ) -> tuple[str, BrowserSession]:
        """A new session (always a new id: a sign-in never continues an older one); returns
        the cookie value and the session."""
        cookie = secrets.token_urlsafe(32)
        at = utc_naive(now)
        row = {
            "id": digest(cookie),
            "client_id": client_id,
            "person_issuer": person.issuer if person else None,
            "person_subject": person.subject if person else None,
            "person_name": person.name if person else None,
            "role": role,
            "organization": organization,
            "scopes": " ".join(scopes),
            "purpose": purpose,
            "grant_source": json.dumps(list(grant_source)),
            "credential": credential,
            "csrf": secrets.token_urlsafe(32),
            "created_at": at,
            "seen_at": at,
            "expires_at": at + self.absolute,
        }
        with self.store.write() as tx:
            # Rows of sessions over for a day are of no more use (the audit trail keeps who
            # signed in and out); removed by whoever signs in next.
            tx.conn.execute(
                delete(browser_sessions).where(browser_sessions.c.expires_at < at - timedelta(1))
            )
            tx.conn.execute(insert(browser_sessions).values(**row))
        return cookie, _session(row)

    def find(self, cookie: str, now: datetime) -> BrowserSession | None:
        """The live session of this cookie value; None when unknown, ended or expired."""
        if not cookie or len(cookie) > 200:
            return None
        with self.store.read(transaction=False) as tx:
            row = tx.conn.execute(
                select(browser_sessions).where(browser_sessions.c.id == digest(cookie))
            ).first()
        if row is None or row.ended_at is not None:
            return None
        at = utc_naive(now)
        if at >= row.expires_at or at >= row.seen_at + self.idle:
            return None
        return _session(row._asdict())

    def touch(self, session: BrowserSession, now: datetime) -> bool:
        """Record a use (at most every ``TOUCH_AFTER_SECONDS``); True when written."""
        at = utc_naive(now)
        if at - session.seen_at < timedelta(seconds=TOUCH_AFTER_SECONDS):
            return False
        with self.store.write() as tx:
            tx.conn.execute(
                update(browser_sessions)
                .where(browser_sessions.c.id == session.key, browser_sessions.c.ended_at.is_(None))
                .values(seen_at=at)
            )
        return True

    def end(self, key: str, now: datetime, reason: str) -> None:
        with self.store.write() as tx:
            tx.conn.execute(
                update(browser_sessions)
                .where(browser_sessions.c.id == key, browser_sessions.c.ended_at.is_(None))
                .values(ended_at=utc_naive(now), end_reason=reason[:32])
            )
            # A launch's EHR token never outlives the session it was given to.
            tx.conn.execute(delete(smart_launches).where(smart_launches.c.session == key))

    # ------------------------------------------------------------------ SMART launches

    def keep_launch(
        self, cookie: str, context: Mapping[str, str], expires_at: datetime, now: datetime
    ) -> None:
        """Keep a launch's context (the EHR token among it) for the session of ``cookie``,
        sealed with a key derived from the cookie value; replaces an earlier launch's."""
        key = digest(cookie)
        nonce = secrets.token_bytes(12)
        sealed = nonce + AESGCM(_launch_key(cookie)).encrypt(
            nonce, json.dumps(dict(context)).encode(), key.encode()
        )
        with self.store.write() as tx:
            tx.conn.execute(
                delete(smart_launches).where(smart_launches.c.expires_at < utc_naive(now))
            )
            tx.conn.execute(delete(smart_launches).where(smart_launches.c.session == key))
            tx.conn.execute(
                insert(smart_launches).values(
                    session=key,
                    sealed=base64.b64encode(sealed).decode(),
                    expires_at=utc_naive(expires_at),
                )
            )

    def open_launch(self, cookie: str, now: datetime) -> dict[str, str] | None:
        """The live launch of the session of ``cookie``; None when there is none, it has
        expired (the row is removed), or it does not open with this cookie."""
        key = digest(cookie)
        with self.store.read(transaction=False) as tx:
            row = tx.conn.execute(
                select(smart_launches).where(smart_launches.c.session == key)
            ).first()
        if row is None:
            return None
        if utc_naive(now) >= row.expires_at:
            self.drop_launch(key)
            return None
        raw = base64.b64decode(row.sealed)
        try:
            opened = AESGCM(_launch_key(cookie)).decrypt(raw[:12], raw[12:], key.encode())
        except (InvalidTag, ValueError):
            return None
        context: dict[str, str] = json.loads(opened)
        return context

    def drop_launch(self, session_key: str) -> bool:
        """Forget the launch of a session (its EHR token with it); True when there was one."""
        with self.store.write() as tx:
            gone = tx.conn.execute(
                delete(smart_launches).where(smart_launches.c.session == session_key)
            )
        return bool(gone.rowcount)

    # ------------------------------------------------------------------ sign-ins under way

    def begin_signin(
        self,
        now: datetime,
        *,
        state: str,
        provider: str,
        nonce: str,
        code_verifier: str,
        next_path: str,
    ) -> str:
        """Remember a sign-in begun; returns the value of the cookie binding it to this
        browser (a callback in another browser — a login CSRF — finds nothing)."""
        binding = secrets.token_urlsafe(32)
        at = utc_naive(now)
        with self.store.write() as tx:
            tx.conn.execute(delete(browser_signins).where(browser_signins.c.expires_at < at))
            tx.conn.execute(
                insert(browser_signins).values(
                    state=digest(state),
                    browser=digest(binding),
                    provider=provider,
                    nonce=nonce,
                    code_verifier=code_verifier,
                    next_path=next_path,
                    expires_at=at + timedelta(seconds=SIGNIN_SECONDS),
                )
            )
        return binding

    def take_signin(self, state: str, binding: str, now: datetime) -> PendingSignIn | None:
        """The sign-in ``state`` belongs to, if this browser began it and it is not over;
        used up either way (a replayed or forged callback finds nothing)."""
        if not state or not binding or len(state) > 200 or len(binding) > 200:
            return None
        key = digest(state)
        with self.store.write() as tx:
            row = tx.conn.execute(
                select(browser_signins).where(browser_signins.c.state == key)
            ).first()
            if row is None:
                return None
            taken = tx.conn.execute(delete(browser_signins).where(browser_signins.c.state == key))
            if taken.rowcount != 1:
                return None  # another request took it first
        if row.browser != digest(binding) or utc_naive(now) >= row.expires_at:
            return None
        return PendingSignIn(row.provider, row.nonce, row.code_verifier, row.next_path)


def _launch_key(cookie: str) -> bytes:
    """The AES key sealing a session's launch: HKDF of the cookie value (random, 256 bits),
    which only the browser holds."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"fhir_kat smart launch"
    ).derive(cookie.encode())


def _session(row: Mapping[str, object]) -> BrowserSession:
    person = None
    if row["person_issuer"] is not None:
        person = Person(
            str(row["person_issuer"]), str(row["person_subject"]), str(row["person_name"] or "")
        )
    organization = row["organization"]
    credential = row["credential"]
    return BrowserSession(
        key=str(row["id"]),
        client_id=str(row["client_id"]),
        role=str(row["role"]),
        organization=str(organization) if organization is not None else None,
        scopes=tuple(str(row["scopes"]).split()),
        purpose=str(row["purpose"]),
        person=person,
        grant_source=tuple(json.loads(str(row["grant_source"]))),
        credential=str(credential) if credential is not None else None,
        csrf=str(row["csrf"]),
        created_at=_moment(row["created_at"]),
        seen_at=_moment(row["seen_at"]),
        expires_at=_moment(row["expires_at"]),
    )


def _moment(value: object) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime column, got {type(value).__name__}")
    return value
