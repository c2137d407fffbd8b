"""R4 rest-hook Subscriptions, the service side: who may subscribe to what, and which writes
notify whom.

Owns: the write rule that checks a Subscription (criteria, channel, status ``requested`` ->
``active``, ownership) and the write hook that, for every stored version of a subscribable type,
queues a ``rest-hook`` delivery per matching Subscription **in the same transaction**.

Matching is a search: the Subscription's ``criteria`` parsed by ``parse_search`` (strict: an
unknown parameter would widen the match) plus ``_id`` = the written resource, run against the
search index inside the write transaction, narrowed by the owner's access exactly as that
owner's own search would be (role and scopes; a referrer only its own Tasks; patients whose
consent does not permit the owner left out). The owner is the client that created the
Subscription, recorded with it (``exchange/subscriptions.py``); consent is asked again at send
time by the worker's gate.

Must not: send anything (the worker does), or trust a caller it was not given: a Subscription
write without a caller (``bind_caller``) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy import false, select

from fhir_kat.errors import BadRequest, Forbidden, Issue, Unprocessable, issue
from fhir_kat.exchange.netguard import EndpointPolicy
from fhir_kat.exchange.outbox import enqueue
from fhir_kat.exchange.subscriptions import (
    FULL_RESOURCE,
    MAX_SUBSCRIPTION_ID,
    Owner,
    get_owner,
    is_live,
    parse_header,
    partner_name,
    set_owner,
)
from fhir_kat.search import Criterion, SearchQuery, parse_search
from fhir_kat.security.clients import ClientRegistry
from fhir_kat.security.consent import ConsentDecisionPoint
from fhir_kat.security.scopes import covered_by, parse_scopes
from fhir_kat.security.tokens import Principal
from fhir_kat.services.access import Access
from fhir_kat.store import StoredResource, Tx
from fhir_kat.store.schema import resources

# Is any Subscription stored (not deleted)? Most writes happen where none is: this probe
# (the resources table's type index, built once) spares each of them the criteria search.
_ANY_SUBSCRIPTION = (
    select(resources.c.seq)
    .where(resources.c.res_type == "Subscription", resources.c.deleted == false())
    .limit(1)
)
_ANY_KEY = "subscriptions:any"

#: What a Subscription may watch (issue #7): the program's outcome and workflow resources.
SUBSCRIBABLE = ("Observation", "Task", "MeasureReport", "Flag", "QuestionnaireResponse")
#: Result parameters mean nothing for "does this one resource match".
_RESULT_PARAMS = frozenset(
    {"_count", "_sort", "_include", "_revinclude", "_summary", "_cursor", "_elements", "_total"}
)
#: The outbox ordering key of every notification: one queue per subscriber, in write order.
ORDER_KEY = "subscriber"
#: Who acts in this request (set by the API layer for every /fhir request).
_CALLER: ContextVar[Principal | None] = ContextVar("fhir_kat_subscription_caller", default=None)


@contextmanager
def bind_caller(principal: Principal | None) -> Iterator[None]:
    token = _CALLER.set(principal)
    try:
        yield
    finally:
        _CALLER.reset(token)


def set_caller(principal: Principal | None) -> Any:
    """For request hooks that cannot hold a ``with``: returns the token ``reset_caller`` takes."""
    return _CALLER.set(principal)


def reset_caller(token: Any) -> None:
    _CALLER.reset(token)


def parse_criteria(criteria: Any) -> tuple[str, list[tuple[str, str]]] | Issue:
    """``Type?query`` -> (type, pairs), or the problem with it."""
    where = "Subscription.criteria"
    if not isinstance(criteria, str) or not criteria.strip():
        return issue("required", "criteria must be a search such as Task?status=accepted", where)
    rtype, _, query = criteria.strip().partition("?")
    if rtype not in SUBSCRIBABLE:
        return issue(
            "not-supported",
            f"criteria must search one of {', '.join(SUBSCRIBABLE)}",
            where,
        )
    pairs = parse_qsl(query, keep_blank_values=True)
    result = sorted({k.partition(":")[0] for k, _ in pairs} & _RESULT_PARAMS)
    if result:
        return issue("not-supported", f"criteria cannot use {', '.join(result)}", where)
    return rtype, pairs


def check_subscription(body: dict[str, Any], policy: EndpointPolicy | None = None) -> list[Issue]:
    """Service rules for a Subscription (structure is already valid R4). ``policy``: which
    endpoint addresses are allowed (default: public ones only; ``exchange.netguard``)."""
    problems: list[Issue] = []
    rid = body.get("id")
    if isinstance(rid, str) and len(rid) > MAX_SUBSCRIPTION_ID:
        problems.append(
            issue("value", f"a Subscription id has at most {MAX_SUBSCRIPTION_ID} characters", "id")
        )
    if body.get("status") == "error":
        problems.append(
            issue(
                "value", "status error is set by the server, not by a client", "Subscription.status"
            )
        )
    parsed = parse_criteria(body.get("criteria"))
    if isinstance(parsed, Issue):
        problems.append(parsed)
    else:
        try:
            parse_search(parsed[0], parsed[1], strict=True, default_count=1, max_count=1)
        except BadRequest as exc:
            problems.extend(
                issue("invalid", f"criteria: {i.diagnostics}", "Subscription.criteria")
                for i in exc.issues
            )
    channel = body.get("channel") or {}
    if channel.get("type") != "rest-hook":
        problems.append(
            issue(
                "not-supported",
                "only channel.type rest-hook is supported",
                "Subscription.channel.type",
            )
        )
    else:
        problems.extend(_check_rest_hook(channel, policy or EndpointPolicy()))
    return problems


def _check_rest_hook(channel: dict[str, Any], policy: EndpointPolicy) -> list[Issue]:
    problems: list[Issue] = []
    endpoint = channel.get("endpoint")
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(
            issue(
                "required",
                "channel.endpoint must be an http(s) URL",
                "Subscription.channel.endpoint",
            )
        )
    elif (refused := policy.endpoint_problem(str(endpoint))) is not None:
        problems.append(issue("value", refused, "Subscription.channel.endpoint"))
    payload = channel.get("payload")
    if payload is not None and payload != FULL_RESOURCE:
        problems.append(
            issue(
                "not-supported",
                f"channel.payload must be absent (an empty ping) or {FULL_RESOURCE}",
                "Subscription.channel.payload",
            )
        )
    for i, header in enumerate(channel.get("header") or []):
        if parse_header(header) is None:
            problems.append(
                issue(
                    "value",
                    "a header must be 'Name: value' and not set the HTTP framing or content type",
                    f"Subscription.channel.header[{i}]",
                )
            )
    return problems


class SubscriptionService:
    def __init__(
        self,
        consent: ConsentDecisionPoint,
        clock: Callable[[], datetime],
        clients: ClientRegistry | None = None,
        endpoint_policy: EndpointPolicy | None = None,
    ) -> None:
        self.consent = consent
        self.clock = clock
        self.clients = clients
        self.endpoint_policy = endpoint_policy or EndpointPolicy()

    # ------------------------------------------------------------------ the Subscription

    def check_rule(self, tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
        """Refuse a bad or foreign Subscription; turn ``requested`` into ``active``."""
        if body.get("resourceType") != "Subscription":
            return
        problems = check_subscription(body, self.endpoint_policy)
        if problems:
            raise Unprocessable(problems)
        caller = _CALLER.get()
        if caller is None:
            raise Forbidden(
                issue("forbidden", "Subscriptions are created by a client through /fhir")
            )
        if caller.person is not None:
            # A Subscription outlives the browser session that would create it, and its
            # notifications go to a registered client's endpoint: people do not own them.
            raise Forbidden(
                issue("forbidden", "Subscriptions are created by a registered client, not a person")
            )
        rtype, _ = parse_criteria(body["criteria"])  # type: ignore[misc]  # checked above
        access = Access(caller, self.consent, self.clock)
        if not (access.can(rtype, "s") and access.can(rtype, "r")):
            raise Forbidden(
                issue(
                    "forbidden",
                    f"your role or scopes do not allow searching {rtype}",
                    "Subscription.criteria",
                )
            )
        sid = str(body["id"])
        owner = get_owner(tx, sid)
        if owner is None:
            set_owner(
                tx,
                sid,
                Owner(
                    caller.client_id,
                    caller.role,
                    caller.organization,
                    caller.purpose,
                    tuple(s.text for s in caller.scopes),
                ),
                self.clock(),
            )
        elif owner.client_id != caller.client_id:
            raise Forbidden(
                issue("forbidden", "only the client that created a Subscription may change it")
            )
        if body.get("status") == "requested":
            # Checked above (criteria, channel, rights): R4 has the server activate it, and a
            # Subscription resumed after an error no longer carries the old error.
            body["status"] = "active"
            body.pop("error", None)

    # ------------------------------------------------------------------ matching writes

    def on_write(self, tx: Tx, stored: StoredResource, _created: bool) -> None:
        if stored.type == "Subscription":
            tx.memo.pop(_ANY_KEY, None)  # the probe below is answered again
            if stored.deleted:
                self._check_delete(tx, stored.id)
            return
        if stored.type not in SUBSCRIBABLE:
            return
        # At the end of the transaction: the version that commits is the one that notifies
        # (a referral's triage, for one, rewrites its Task before the commit).
        rtype, rid = stored.type, stored.id

        def at_commit(t: Tx) -> None:
            self.notify(t, rtype, rid)

        tx.defer(f"subscriptions:{rtype}/{rid}", at_commit)

    def _check_delete(self, tx: Tx, sid: str) -> None:
        caller = _CALLER.get()
        owner = get_owner(tx, sid)
        if caller is not None and owner is not None and owner.client_id != caller.client_id:
            raise Forbidden(
                issue("forbidden", "only the client that created a Subscription may delete it")
            )

    def notify(self, tx: Tx, rtype: str, rid: str) -> list[int]:
        """Queue a notification of ``rtype/rid`` (its current version) for every live
        Subscription that matches it and whose owner may see it; returns the delivery ids."""
        if not self._any_subscription(tx):
            return []  # no Subscription stored at all: nothing to match
        current = tx.get(rtype, rid)
        if current is None or current.deleted:
            return []
        now = self.clock()
        queued: list[int] = []
        for sub in self._subscriptions_on(tx, rtype):
            doc = sub.json()
            if not is_live(doc, now):
                continue
            parsed = parse_criteria(doc.get("criteria"))
            if isinstance(parsed, Issue) or parsed[0] != rtype:
                continue
            access = self._owner_access(tx, sub.id)
            if access is None or not (access.can(rtype, "s") and access.can(rtype, "r")):
                continue
            try:
                query = parse_search(rtype, parsed[1], strict=True, default_count=1, max_count=1)
            except BadRequest:
                continue  # a parameter that was dropped since: matches nothing
            probe = SearchQuery(
                rtype, criteria=(*query.criteria, Criterion("_id", "id", "", (rid,), "")), count=1
            )
            # Exactly what the owner's own search would return, in this transaction (a
            # Consent written by it counts: the owner's scope reads this transaction's state).
            _, total, _ = tx.seen_by(access).search(probe)
            if not total:
                continue
            consent_applies = bool(current.patient_id) and access.consent_applies(rtype)
            check = None
            if consent_applies:
                check = {
                    "patient": current.patient_id,
                    "partner": partner_name(sub.id),
                    "actor": access.principal.organization,
                    "purpose": access.principal.purpose,
                    "type": rtype,
                }
            payload = {
                "subscription": sub.id,
                "type": rtype,
                "id": rid,
                "versionId": current.version_id,
                "patient": current.patient_id,
            }
            queued.append(enqueue(tx, partner_name(sub.id), "rest-hook", payload, ORDER_KEY, check))
        return queued

    def _any_subscription(self, tx: Tx) -> bool:
        """Whether any Subscription is stored: one indexed probe per transaction (a write of
        a Subscription in it clears the answer, ``on_write``) instead of a criteria search for
        every resource written."""
        if _ANY_KEY not in tx.memo:
            tx.memo[_ANY_KEY] = tx.conn.execute(_ANY_SUBSCRIPTION).first() is not None
        return bool(tx.memo[_ANY_KEY])

    def _subscriptions_on(self, tx: Tx, rtype: str) -> Iterator[StoredResource]:
        # ``criteria`` is a string parameter: a prefix match; the exact type is checked after.
        query = parse_search(
            "Subscription",
            [("status", "active"), ("criteria", rtype)],
            strict=True,
            default_count=500,
            max_count=500,
        )
        while True:
            rows, _, more = tx.search(query)
            yield from rows
            if not more or not rows:
                return
            query = SearchQuery(
                query.resource_type, criteria=query.criteria, count=query.count, cursor=rows[-1].seq
            )

    def _owner_access(self, tx: Tx, sid: str) -> Access | None:
        owner = get_owner(tx, sid)
        if owner is None:
            return None
        scopes, _ = parse_scopes(owner.scopes)
        if self.clients is not None:
            client = self.clients.get(owner.client_id)
            if client is None or client.role != owner.role:
                return None  # the owner lost its registration (or its role): nothing more
            # The scopes granted then, as far as the registration still allows them now.
            scopes = [s for s in scopes if covered_by(s, client.scopes)]
        principal = Principal(
            client_id=owner.client_id,
            role=owner.role,
            scopes=tuple(scopes),
            organization=owner.organization,
            purpose=owner.purpose,
            token_id=f"subscription:{sid}",
        )
        return Access(principal, self.consent, self.clock)


__all__ = [
    "ORDER_KEY",
    "SUBSCRIBABLE",
    "SubscriptionService",
    "bind_caller",
    "check_subscription",
    "parse_criteria",
    "reset_caller",
    "set_caller",
]
