"""R4 rest-hook Subscriptions, the exchange side: who owns a Subscription, and what one
notification is on the wire.

Owns: the ``subscription_owner`` table (the client that created each Subscription, with the
role, organisation, purpose and scopes it had then: the identity every notification is
checked against), the parsing of ``channel.header`` values, and ``resolve``, which turns a
queued ``rest-hook`` delivery into the HTTP request to make *now*, from the stored
Subscription (a deleted, switched-off or ended one gets none).

The wire form follows R4 (subscription.html, "rest-hook"): without ``channel.payload`` an
empty ``POST`` to ``channel.endpoint`` (a ping: the subscriber searches for what changed);
with ``channel.payload`` = ``application/fhir+json`` a ``PUT [endpoint]/[type]/[id]`` of the
version that matched, with the ``channel.header`` values on both.

Must not: decide whether a resource matches (``services/subscriptions.py`` does, with the
search index), make HTTP calls (``client.py``), or log an endpoint, a header or any content.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, DateTime, String, Table, Text, select

from fhir_kat.exchange.outbox import SUBSCRIPTION_PREFIX
from fhir_kat.search import parse_date_range, utc_naive
from fhir_kat.store import Tx
from fhir_kat.store.schema import metadata

#: The one payload type besides "none" (an empty ping) this server sends.
FULL_RESOURCE = "application/fhir+json"
#: Headers a subscriber may not set: the HTTP framing and content belong to the sender.
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "expect"}
)
#: ``subscription:<id>`` must fit the outbox's 64-character partner column.
MAX_SUBSCRIPTION_ID = 64 - len(SUBSCRIPTION_PREFIX)

subscription_owner = Table(
    "subscription_owner",
    metadata,
    Column("subscription_id", String(64), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("role", String(32), nullable=False),
    Column("organization", String(256), nullable=True),
    Column("purpose", String(16), nullable=False),
    Column("scopes", Text, nullable=False),  # the granted scopes, space-separated
    Column("created_at", DateTime, nullable=False),
)


@dataclass(frozen=True)
class Owner:
    client_id: str
    role: str
    organization: str | None
    purpose: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Notification:
    method: str  # "POST" (ping) or "PUT" (full resource)
    url: str
    body: bytes | None
    headers: dict[str, str]


def partner_name(subscription_id: str) -> str:
    return f"{SUBSCRIPTION_PREFIX}{subscription_id}"


def subscription_id(partner: str) -> str | None:
    return partner[len(SUBSCRIPTION_PREFIX) :] if partner.startswith(SUBSCRIPTION_PREFIX) else None


def get_owner(tx: Tx, sid: str) -> Owner | None:
    row = tx.conn.execute(
        select(subscription_owner).where(subscription_owner.c.subscription_id == sid)
    ).first()
    if row is None:
        return None
    return Owner(row.client_id, row.role, row.organization, row.purpose, tuple(row.scopes.split()))


def set_owner(tx: Tx, sid: str, owner: Owner, now: datetime) -> None:
    """Record who owns ``sid`` (once: the owner of a Subscription never changes)."""
    tx.conn.execute(
        subscription_owner.insert().values(
            subscription_id=sid,
            client_id=owner.client_id,
            role=owner.role,
            organization=owner.organization,
            purpose=owner.purpose,
            scopes=" ".join(owner.scopes),
            created_at=utc_naive(now),
        )
    )


def owned_ids(tx: Tx, client_id: str) -> list[str]:
    rows = tx.conn.execute(
        select(subscription_owner.c.subscription_id).where(
            subscription_owner.c.client_id == client_id
        )
    )
    return [str(r.subscription_id) for r in rows]


def parse_header(value: Any) -> tuple[str, str] | None:
    """``"Name: value"`` -> (name, value); None for anything else or a reserved name."""
    if not isinstance(value, str) or "\r" in value or "\n" in value:
        return None
    name, sep, text = value.partition(":")
    name = name.strip()
    if not sep or not name or any(c.isspace() for c in name) or not name.isascii():
        return None
    if name.lower() in RESERVED_HEADERS:
        return None
    return name, text.strip()


def is_live(doc: dict[str, Any], now: datetime) -> bool:
    """``active`` and not past its ``end``."""
    if doc.get("status") != "active":
        return False
    end = doc.get("end")
    if isinstance(end, str):
        span = parse_date_range(end)
        if span is not None and utc_naive(now) > span[1]:
            return False
    return True


def mark_error(tx: Tx, sid: str, reason: str) -> bool:
    """Set an active Subscription to ``error`` (R4: the server does, when it cannot deliver),
    so nothing more is queued for it; its owner resumes it by sending ``status: requested``.
    False when it is already gone, off, ended or in error."""
    stored = tx.get("Subscription", sid, for_update=True)
    if stored is None or stored.deleted:
        return False
    doc = stored.json()
    if doc.get("status") != "active":
        return False
    doc["status"] = "error"
    doc["error"] = reason
    tx.put(doc, current=stored)
    return True


def resolve(tx: Tx, payload: dict[str, Any], now: datetime) -> Notification | str:
    """The request a queued notification makes now, or why it makes none (the delivery is
    then cancelled: a subscriber that unsubscribed gets nothing more)."""
    sid = str(payload.get("subscription", ""))
    stored = tx.get("Subscription", sid)
    if stored is None or stored.deleted:
        return "the subscription no longer exists"
    doc = stored.json()
    if not is_live(doc, now):
        return f"the subscription is {doc.get('status')} or has ended"
    channel = doc.get("channel") or {}
    endpoint = channel.get("endpoint")
    if channel.get("type") != "rest-hook" or not isinstance(endpoint, str):
        return "the subscription has no rest-hook endpoint"
    headers = dict(h for h in map(parse_header, channel.get("header") or []) if h is not None)
    if not channel.get("payload"):
        return Notification("POST", endpoint, None, headers)
    rtype, rid = str(payload.get("type", "")), str(payload.get("id", ""))
    version = tx.vread(rtype, rid, int(payload.get("versionId", 0)))
    if version is None or version.deleted:
        return "the notified version no longer exists"
    return Notification(
        "PUT", f"{endpoint.rstrip('/')}/{rtype}/{rid}", version.content.encode(), headers
    )


__all__ = [
    "FULL_RESOURCE",
    "MAX_SUBSCRIPTION_ID",
    "RESERVED_HEADERS",
    "Notification",
    "Owner",
    "get_owner",
    "is_live",
    "mark_error",
    "owned_ids",
    "parse_header",
    "partner_name",
    "resolve",
    "set_owner",
    "subscription_id",
    "subscription_owner",
]
