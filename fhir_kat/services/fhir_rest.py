"""The FHIR RESTful interactions: read, vread, history, create, update, delete, search,
conditional create, transaction and batch.

Owns: the semantics of each interaction (status codes, versioning, conditional logic, Bundle
processing order, reference resolution inside transactions). Must not: parse HTTP (the api layer
hands it plain values) or build SQL (the store does).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from sqlalchemy.exc import IntegrityError

from fhir_kat.errors import (
    BadRequest,
    Conflict,
    FhirError,
    Forbidden,
    Gone,
    Hidden,
    Issue,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    Unprocessable,
    issue,
)
from fhir_kat.mapping.narrative import narrative
from fhir_kat.search import (
    Criterion,
    SearchQuery,
    extract_index,
    iter_references,
    parse_search,
    split_reference,
)
from fhir_kat.security.policy import role_allows
from fhir_kat.services.access import Access
from fhir_kat.services.bundles import RawBundle, RawEntry
from fhir_kat.store import Store, StoredResource, Tx, same_content
from fhir_kat.store.store import ConcurrentUpdate, format_instant
from fhir_kat.validation.resource import SUPPORTED_TYPES, is_valid_id, validate_resource
from fhir_kat.validation.temporal import temporal_issues

#: A hook run inside the write transaction after each stored version (outbox, workflow, ...).
WriteHook = Callable[[Tx, StoredResource, bool], None]
#: A rule checked inside the write transaction before a version is stored: (tx, the new
#: resource, the current version or None). It raises a FhirError to refuse the write.
WriteRule = Callable[[Tx, dict[str, Any], StoredResource | None], None]
#: A rule checked before a stored resource is deleted; it raises a FhirError to refuse.
DeleteRule = Callable[[Tx, StoredResource], None]


@dataclass(frozen=True)
class WriteResult:
    stored: StoredResource
    created: bool  # 201 vs 200
    changed: bool = True  # False: conditional create matched, or identical re-send
    #: False: the caller may not read ``stored`` (a conditional create matched what it may
    #: change but not read): answer with its location and version, never its content.
    disclose: bool = True


#: Writes a request's audit record inside its write's own transaction (``FhirService.create``).
WriteAudit = Callable[[Tx, WriteResult], None]


def _audited(tx: Tx, result: WriteResult, audit: WriteAudit | None) -> WriteResult:
    if audit is not None:
        audit(tx, result)
    return result


def require_type(resource_type: str) -> None:
    if resource_type not in SUPPORTED_TYPES:
        raise NotFound(
            issue("not-supported", f"resource type {resource_type} is not supported", resource_type)
        )


def require_id(resource_id: str) -> None:
    if not is_valid_id(resource_id):
        raise BadRequest(issue("value", "invalid resource id", "id"))


def parse_etag(value: str) -> int:
    """``W/"3"`` or ``"3"`` -> 3."""
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest(issue("value", 'If-Match must be an ETag like W/"3"', "If-Match"))
    return int(text)


_LETTER = {"read": "r", "search": "s", "create": "c", "update": "u", "delete": "d"}


def require_access(access: Access | None, rtype: str, interaction: str, where: str = "") -> None:
    """403 unless the caller's role and scopes allow ``interaction`` on ``rtype``."""
    if access is None or access.can(rtype, _LETTER[interaction]):
        return
    role_ok = role_allows(access.principal.role, rtype, _LETTER[interaction])
    raise Forbidden(
        issue(
            "forbidden",
            f"{interaction} on {rtype} is not allowed "
            + ("by the granted scopes" if role_ok else f"for role {access.principal.role}"),
            where or rtype,
        ),
        # RFC 6750 §3.1: a token that lacks the scope says so in WWW-Authenticate.
        headers={"WWW-Authenticate": 'Bearer realm="fhir_kat", error="insufficient_scope"'}
        if role_ok
        else {},
    )


class FhirService:
    def __init__(
        self,
        store: Store,
        *,
        default_page_size: int,
        max_page_size: int,
        write_hooks: Iterable[WriteHook] = (),
        write_rules: Iterable[WriteRule] = (),
    ) -> None:
        self.store = store
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        self.write_hooks = list(write_hooks)
        self.write_rules = list(write_rules)
        self.delete_rules: list[DeleteRule] = []
        #: Called with each body before its rules: the write pipeline's guard on what the
        #: running step may store (fhir_kat/services/pipeline.py).
        self.write_guard: Callable[[dict[str, Any]], None] | None = None

    # ---------------------------------------------------------------- reads

    def read(self, rtype: str, rid: str, access: Access | None = None) -> StoredResource:
        require_type(rtype)
        require_access(access, rtype, "read")
        with self.store.read(transaction=False, viewer=access) as tx:
            return self._read(tx, rtype, rid)

    def _read(self, tx: Tx, rtype: str, rid: str) -> StoredResource:
        found = tx.get(rtype, rid)
        if found is None:
            raise _unknown(tx, rtype, rid, f"{rtype}/{rid} is not known")
        if found.deleted:
            raise Gone(issue("deleted", f"{rtype}/{rid} has been deleted", rtype))
        return found

    def vread(
        self, rtype: str, rid: str, version: str, access: Access | None = None
    ) -> StoredResource:
        require_type(rtype)
        require_access(access, rtype, "read")
        if not (version.isascii() and version.isdigit()) or len(version) > 18:
            raise NotFound(issue("not-found", "no such version", f"{rtype}.meta.versionId"))
        with self.store.read(transaction=False, viewer=access) as tx:
            found = tx.vread(rtype, rid, int(version))
            if found is None:
                raise _unknown(tx, rtype, rid, f"{rtype}/{rid} has no version {version}")
        if found.deleted:
            raise Gone(issue("deleted", f"version {version} of {rtype}/{rid} is a deletion", rtype))
        return found

    def history(
        self,
        rtype: str,
        rid: str,
        base: str,
        count: int | None = None,
        access: Access | None = None,
    ) -> RawBundle:
        require_type(rtype)
        require_access(access, rtype, "read")
        limit = min(count or self.max_page_size, self.max_page_size)
        with self.store.read(transaction=False, viewer=access) as tx:
            versions = tx.history(rtype, rid, limit)
            if not versions:
                raise _unknown(tx, rtype, rid, f"{rtype}/{rid} is not known")
        bundle = RawBundle(
            {
                "resourceType": "Bundle",
                "id": str(uuid.uuid4()),
                "type": "history",
                "total": len(versions),
                "link": [{"relation": "self", "url": f"{base}/{rtype}/{rid}/_history"}],
            }
        )
        for stored, method in versions:
            fields: dict[str, Any] = {
                "fullUrl": f"{base}/{rtype}/{rid}",
                "request": {
                    "method": method,
                    "url": rtype if method == "POST" else f"{rtype}/{rid}",
                },
                "response": {
                    "status": {"POST": "201 Created", "PUT": "200 OK", "DELETE": "204 No Content"}[
                        method
                    ],
                    "etag": stored.etag,
                    "lastModified": format_instant(stored.last_updated),
                },
            }
            if stored.patient_id:
                bundle.patients.add(stored.patient_id)
            bundle.entries.append(RawEntry(fields, None if stored.deleted else stored.content))
        return bundle

    # ---------------------------------------------------------------- search

    def parse_query(
        self, rtype: str, pairs: Iterable[tuple[str, str]], *, strict: bool
    ) -> SearchQuery:
        require_type(rtype)
        return parse_search(
            rtype,
            pairs,
            strict=strict,
            default_count=self.default_page_size,
            max_count=self.max_page_size,
        )

    def search(
        self,
        rtype: str,
        pairs: Iterable[tuple[str, str]],
        base: str,
        *,
        strict: bool,
        access: Access | None = None,
    ) -> RawBundle:
        require_type(rtype)
        require_access(access, rtype, "search")
        query = self.parse_query(rtype, pairs, strict=strict)
        with self.store.read(transaction=False, viewer=access) as tx:
            return self._search(tx, query, base)

    def _search(self, tx: Tx, query: SearchQuery, base: str) -> RawBundle:
        """A searchset of what ``tx``'s caller may see: matches, total and includes alike."""
        rows, total, has_more = tx.search(query)
        rtype = query.resource_type
        params = query.self_params()
        self_params = list(params)
        if query.cursor is not None:
            self_params.append(("_cursor", str(query.cursor)))
        links = [{"relation": "self", "url": f"{base}/{rtype}?{urlencode(self_params)}"}]
        if has_more and rows:
            next_params = [*params, ("_cursor", str(rows[-1].seq))]
            links.append({"relation": "next", "url": f"{base}/{rtype}?{urlencode(next_params)}"})
        bundle = RawBundle(
            {
                "resourceType": "Bundle",
                "id": str(uuid.uuid4()),
                "type": "searchset",
                "total": total,
                "link": links,
            }
        )
        for row in rows:
            bundle.disclosed.append(f"{row.type}/{row.id}")
            if row.patient_id:
                bundle.patients.add(row.patient_id)
            bundle.entries.append(
                RawEntry(
                    {"fullUrl": f"{base}/{row.type}/{row.id}", "search": {"mode": "match"}},
                    row.content,
                )
            )
        for included in self._includes(tx, query, rows):
            bundle.disclosed.append(f"{included.type}/{included.id}")
            if included.patient_id:
                bundle.patients.add(included.patient_id)
            bundle.entries.append(
                RawEntry(
                    {
                        "fullUrl": f"{base}/{included.type}/{included.id}",
                        "search": {"mode": "include"},
                    },
                    included.content,
                )
            )
        return bundle

    def _includes(
        self, tx: Tx, query: SearchQuery, rows: list[StoredResource]
    ) -> list[StoredResource]:
        if not query.includes or not rows:
            return []
        seen = {(r.type, r.id) for r in rows}
        wanted: list[tuple[str, str]] = []
        ids = [r.id for r in rows]
        for inc in query.includes:
            if inc.reverse:
                keys = tx.referencing(inc.source_type, inc.param, query.resource_type, ids)
            else:
                keys = tx.references_from(inc.source_type, ids, inc.param, inc.target_type)
            for key in keys:
                if key not in seen:
                    seen.add(key)
                    wanted.append(key)
        found = {(r.type, r.id): r for r in tx.get_many(wanted)}
        return [found[k] for k in wanted if k in found]

    # ---------------------------------------------------------------- writes

    def create(
        self,
        rtype: str,
        resource: Any,
        *,
        if_none_exist: str | None = None,
        access: Access | None = None,
        audit: WriteAudit | None = None,
    ) -> WriteResult:
        """``audit`` runs inside the write's own database transaction with its result, so the
        request's AuditEvent commits with the data (one commit, not two), as a transaction's."""
        require_type(rtype)
        require_access(access, rtype, "create")
        problems = validate_resource(resource, rtype)
        if problems:
            raise _status_for(problems)(problems)
        with self._write(access) as tx:
            return _audited(tx, self._create(tx, resource, if_none_exist), audit)

    def _create(self, tx: Tx, resource: dict[str, Any], if_none_exist: str | None) -> WriteResult:
        rtype = resource["resourceType"]
        if if_none_exist:
            existing = self._conditional_match(tx, rtype, if_none_exist)
            if existing is not None:
                access = caller_of(tx)
                readable = access is None or access.can(rtype, "r")
                return WriteResult(existing, created=False, changed=False, disclose=readable)
        body = dict(resource)
        body["id"] = str(uuid.uuid4())  # the server assigns ids on create (FHIR R4 3.1.0.4)
        stored, _ = self._put(tx, body, None, method="POST")
        return WriteResult(stored, created=True)

    def _put(
        self,
        tx: Tx,
        body: dict[str, Any],
        current: StoredResource | None,
        *,
        method: str,
    ) -> tuple[StoredResource, bool]:
        """The one path every version takes: rules (as the caller: ``tx.viewer``, None for the
        service's own writes), store, hooks (as the service: ``tx.system``) — the write
        pipeline, fhir_kat/services/pipeline.py. An update that changes nothing writes nothing
        (``Tx.put``) and runs no hook: no version, no workflow, no delivery — the caller's
        audit record still names it (ADR 0020)."""
        if self.write_guard is not None:
            self.write_guard(body)
        for rule in self.write_rules:
            rule(tx, body, current)
        body = _narrated(tx, body, current)
        stored, changed = tx.put(body, current=current, method=method)
        if changed:
            access = caller_of(tx)
            if access is not None:
                access.after_write(tx, stored)  # what a referrer may write: docs/security.md
            self._after_write(tx, stored, current is None or current.deleted)
        return stored, changed

    def _conditional_match(
        self, tx: Tx, rtype: str, criteria: str, where: str = "If-None-Exist"
    ) -> StoredResource | None:
        """The one resource ``criteria`` match among those ``tx``'s caller may see (None: no
        match; 412 for several). A resource the caller may not see is never matched, counted
        or revealed: for the caller it does not exist, so its request creates. A type it may
        write but not read (a referrer's Patient) is matched among what it may change: its
        re-sends stay idempotent, and the answer names the match without its content."""
        query = _conditional_query(rtype, criteria, where)
        # Serialise conditional creates with the same criteria (PostgreSQL advisory lock):
        # without it two parallel requests both see "no match" and both create. Conditional
        # updates take the same lock: one may create what the other matches.
        tx.lock(_lock_key(query))
        return _the_one(self.match(tx, query), rtype, where)

    def _conditional_matches(
        self, tx: Tx, wanted: Sequence[tuple[str, str, str]]
    ) -> list[StoredResource | None]:
        """``_conditional_match`` of each (type, criteria, where) of a transaction, the same
        answers in fewer queries: every criteria that is one ``system|code`` token (the
        ``identifier=system|value`` loaders and partner deliveries send) is looked up with
        the others of its type and parameter, up to 100 in one query through the same
        ``match`` (the caller's view); any other criteria on its own. Locks: all at once."""
        queries = [_conditional_query(*w) for w in wanted]
        tx.lock_many([_lock_key(q) for q in queries])
        found: list[StoredResource | None] = [None] * len(queries)
        groups: dict[tuple[str, str], list[tuple[int, tuple[str, str]]]] = {}
        access = caller_of(tx)
        for i, query in enumerate(queries):
            token = _single_token(query)
            # A type the caller writes but cannot read is matched among what it may change,
            # filtered after the query: one by one, so no match hides behind others' rows.
            if token is None or (access is not None and not access.can(query.resource_type, "r")):
                found[i] = _the_one(self.match(tx, query), query.resource_type, wanted[i][2])
            else:
                key = (query.resource_type, query.criteria[0].name)
                groups.setdefault(key, []).append((i, token))
        for (rtype, param), members in groups.items():
            for start in range(0, len(members), _MAX_TOGETHER):
                chunk = members[start : start + _MAX_TOGETHER]
                codes = sorted({code for _, (_, code) in chunk})
                limit = 2 * len(codes) + 1
                # By code alone (``code IN (…)`` on the token index, where ``(system, code)``
                # pairs OR-ed scan every row of the parameter); the systems are compared below.
                together = SearchQuery(
                    rtype,
                    criteria=(
                        Criterion(param, "token", "", tuple((None, c, False) for c in codes), ""),
                    ),
                    count=limit,
                )
                rows = self.match(tx, together)
                if len(rows) >= limit:  # more matches than can be told apart: one by one
                    for i, _ in chunk:
                        found[i] = _the_one(self.match(tx, queries[i]), rtype, wanted[i][2])
                    continue
                holders: dict[tuple[str, str], list[StoredResource]] = {}
                for row in rows:
                    for token in _tokens_of(row, param):
                        holders.setdefault(token, []).append(row)
                for i, token in chunk:
                    found[i] = _the_one(holders.get(token, []), rtype, wanted[i][2])
        return found

    def match(self, tx: Tx, query: SearchQuery) -> list[StoredResource]:
        """The first matches (up to ``query.count``) of ``query`` for an idempotent write by
        ``tx``'s caller: among what it may see; for a type it may write but not read, among
        what it may change. Nothing else is ever matched, so nothing else is revealed."""
        access = caller_of(tx)
        if access is None or access.can(query.resource_type, "r"):
            return tx.matches(query)
        found = tx.system.matches(dataclasses.replace(query, count=max(query.count, 50)))
        return [r for r in found if access.may_change(tx, r)][: query.count]

    def update(
        self,
        rtype: str,
        rid: str,
        resource: Any,
        *,
        if_match: str | None = None,
        access: Access | None = None,
        audit: WriteAudit | None = None,
    ) -> WriteResult:
        require_type(rtype)
        require_access(access, rtype, "update")
        require_id(rid)
        problems = validate_resource(resource, rtype)
        if not problems and resource.get("id") != rid:
            problems = [
                issue("value", "the resource id must equal the id in the URL", f"{rtype}.id")
            ]
        if problems:
            raise _status_for(problems)(problems)
        expected = parse_etag(if_match) if if_match else None
        with self._write(access) as tx:
            return _audited(tx, self._update(tx, resource, expected), audit)

    def conditional_update(
        self,
        rtype: str,
        criteria: str,
        resource: Any,
        *,
        if_match: str | None = None,
        access: Access | None = None,
        audit: WriteAudit | None = None,
    ) -> WriteResult:
        """``PUT Type?criteria`` (FHIR R4 3.1.0.4.3): the one match among what the caller may
        see is updated (an identical body writes nothing); no match creates (with the body's
        id, else a new one); several are 412."""
        require_type(rtype)
        require_access(access, rtype, "update")
        problems = validate_resource(resource, rtype)
        if problems:
            raise _status_for(problems)(problems)
        expected = parse_etag(if_match) if if_match else None
        with self._write(access) as tx:
            body = dict(resource)
            match = self._conditional_match(tx, rtype, criteria, "request.url")
            body["id"] = _conditional_id(match, body.get("id"), f"{rtype}.id")
            return _audited(tx, self._update(tx, body, expected), audit)

    def update_in(
        self,
        tx: Tx,
        resource: dict[str, Any],
        *,
        if_match: int | None = None,
    ) -> WriteResult:
        """Update (or create with its id) inside a transaction another service opened, as
        the caller that transaction was opened for (``FhirService.write(access)``; a hook's
        ``tx.system`` writes as the service)."""
        self.check(resource)
        return self._update(tx, resource, if_match)

    @staticmethod
    def check(resource: dict[str, Any]) -> None:
        """Refuse ``resource`` (the error ``update_in`` would raise) unless it is valid. Checked
        before a write transaction opens, the same content is then found valid in the
        validation cache inside it: the check's CPU time is spent outside the write lock."""
        problems = validate_resource(resource, resource.get("resourceType"))
        if problems:
            raise _status_for(problems)(problems)

    def write(self, access: Access | None = None) -> Any:
        """A write transaction whose lost races become 409 OperationOutcomes; with
        ``access``, opened for that caller (it reads only what the caller may see, and its
        writes are the caller's: ``Access.may_change`` and the write policy apply)."""
        return _WriteContext(self.store, access)

    def _update(
        self,
        tx: Tx,
        resource: dict[str, Any],
        expected_version: int | None,
    ) -> WriteResult:
        rtype, rid = resource["resourceType"], resource["id"]
        current = tx.system.get(rtype, rid, for_update=True)
        _require_may_change(tx, caller_of(tx), current, resource)
        if expected_version is not None:
            if current is None:
                raise PreconditionFailed(
                    issue(
                        "not-found", f"If-Match given but {rtype}/{rid} does not exist", "If-Match"
                    )
                )
            if current.version_id != expected_version:
                raise PreconditionFailed(
                    issue(
                        "conflict",
                        f"version conflict: current version is {current.version_id}",
                        "If-Match",
                    )
                )
        stored, changed = self._put(tx, resource, current, method="PUT")
        return WriteResult(stored, created=current is None or current.deleted, changed=changed)

    def delete(self, rtype: str, rid: str, access: Access | None = None) -> StoredResource | None:
        require_type(rtype)
        require_access(access, rtype, "delete")
        with self._write(access) as tx:
            return self._delete(tx, rtype, rid)

    def _delete(self, tx: Tx, rtype: str, rid: str) -> StoredResource | None:
        if rtype == "AuditEvent":
            raise MethodNotAllowed(
                issue("not-supported", "audit records cannot be deleted", "AuditEvent")
            )
        current = tx.system.get(rtype, rid, for_update=True)
        if current is None or current.deleted:
            return None  # deleting what is not there succeeds (FHIR R4 3.1.0.7)
        access = caller_of(tx)
        if access is not None and not access.may_change(tx, current):
            raise Forbidden(_not_yours(rtype))
        for rule in self.delete_rules:
            rule(tx, current)
        stored = tx.delete(current)
        self._after_write(tx, stored, False)
        return stored

    def _after_write(self, tx: Tx, stored: StoredResource, created: bool) -> None:
        for hook in self.write_hooks:
            hook(tx.system, stored, created)

    def _write(self, access: Access | None = None) -> Any:
        return _WriteContext(self.store, access)

    # ---------------------------------------------------------------- bundles

    def process_bundle(
        self,
        bundle: Any,
        base: str,
        access: Access | None = None,
        audit: Callable[[Tx, RawBundle], None] | None = None,
    ) -> RawBundle:
        """A transaction or batch Bundle. ``audit`` runs inside a transaction's own database
        transaction with its response, so the audit record commits with the data (a batch
        commits per entry: it is audited at response time)."""
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise BadRequest(issue("invalid", "POST to the base needs a Bundle", "Bundle"))
        btype = bundle.get("type")
        if btype not in ("transaction", "batch"):
            raise BadRequest(
                issue("value", "Bundle.type must be transaction or batch", "Bundle.type")
            )
        entries = bundle.get("entry", [])
        if not isinstance(entries, list):
            raise BadRequest(issue("structure", "Bundle.entry must be an array", "Bundle.entry"))
        # The Bundle's own elements (its entries' resources are checked as each is written).
        problems = temporal_issues(bundle, "Bundle", skip_entry_resources=True)
        if problems:
            raise BadRequest(problems)
        if btype == "transaction":
            return self.transaction(entries, base, access, audit)
        return self.batch(entries, base, access)

    def transaction(
        self,
        entries: list[Any],
        base: str,
        access: Access | None = None,
        audit: Callable[[Tx, RawBundle], None] | None = None,
    ) -> RawBundle:
        """All or nothing (FHIR R4 3.1.0.11.2): any failing entry rolls back every entry."""
        plans = [_plan_entry(i, e, base) for i, e in enumerate(entries)]
        denied: list[Issue] = []
        for plan in plans:
            try:
                _authorize_entry(access, plan)
            except Forbidden as exc:
                denied.extend(exc.issues)
        if denied:
            raise Forbidden(denied)
        problems = [p for plan in plans for p in plan.problems]
        full_urls = [p.full_url for p in plans if p.full_url]
        if len(full_urls) != len(set(full_urls)):
            problems.append(issue("duplicate", "two entries share one fullUrl", "Bundle.entry"))
        if problems:
            raise _status_for(problems)(problems)
        results: list[dict[str, Any] | None] = [None] * len(plans)
        with self._write(access) as tx:
            id_map = self._assign_ids(tx, plans)
            unresolved: list[Issue] = []
            for plan in plans:
                if plan.resource is not None:
                    _rewrite_references(plan.resource, id_map, plan.where, unresolved)
            if unresolved:
                raise Unprocessable(unresolved)
            for plan in sorted(plans, key=lambda p: _ORDER[p.method]):
                try:
                    results[plan.index] = self._execute(tx, plan, base)
                except FhirError as exc:
                    located = [
                        Issue(i.code, f"entry {plan.index}: {i.diagnostics}", i.expression)
                        for i in exc.issues
                    ]
                    raise type(exc)(located, headers=exc.headers) from None
            response = _response_bundle("transaction-response", results)
            if audit is not None:
                audit(tx, response)
        return response

    def batch(self, entries: list[Any], base: str, access: Access | None = None) -> RawBundle:
        """Each entry on its own (FHIR R4 3.1.0.11.1): one failing entry does not stop others."""
        results: list[dict[str, Any] | None] = []
        for i, entry in enumerate(entries):
            plan = _plan_entry(i, entry, base)
            try:
                _authorize_entry(access, plan)
                if plan.problems:
                    raise _status_for(plan.problems)(plan.problems)
                if plan.resource is not None:
                    unresolved: list[Issue] = []
                    _rewrite_references(plan.resource, {}, plan.where, unresolved)
                    if unresolved:
                        raise Unprocessable(unresolved)
                with self._write(access) as tx:
                    # Each entry on its own, with the same conditional create as anywhere else.
                    self._assign_ids(tx, [plan])
                    result = self._execute(tx, plan, base)
                # Answered only once committed: the checks run at the end of the transaction
                # (a referrer's write policy) may still refuse it, and then nothing is stored.
                results.append(result)
            except FhirError as exc:
                results.append(
                    {
                        "response": {
                            "status": str(exc.status),
                            "outcome": exc.outcome(),
                        }
                    }
                )
        return _response_bundle("batch-response", results)

    def _assign_ids(self, tx: Tx, plans: list[_EntryPlan]) -> dict[str, str]:
        id_map: dict[str, str] = {}
        conditional = [
            p for p in plans if p.method == "POST" and p.resource is not None and p.if_none_exist
        ]
        matches = dict(
            zip(
                (p.index for p in conditional),
                self._conditional_matches(
                    tx,
                    [
                        (
                            p.rtype,
                            p.if_none_exist or "",
                            f"Bundle.entry[{p.index}].request.ifNoneExist",
                        )
                        for p in conditional
                    ],
                ),
                strict=True,
            )
        )
        for plan in plans:
            if plan.method == "POST" and plan.resource is not None:
                if plan.if_none_exist:
                    match = matches[plan.index]
                    if match is not None:
                        plan.existing = match
                        if plan.full_url:
                            id_map[plan.full_url] = f"{match.type}/{match.id}"
                        continue
                plan.new_id = str(uuid.uuid4())
                if plan.full_url:
                    id_map[plan.full_url] = f"{plan.rtype}/{plan.new_id}"
            elif plan.method == "PUT" and plan.resource is not None:
                if plan.rid is None:  # conditional update: the match, or the id it creates
                    match = self._conditional_match(
                        tx, plan.rtype, urlencode(plan.query or []), f"{plan.where}.request.url"
                    )
                    plan.rid = _conditional_id(match, plan.resource.get("id"), f"{plan.where}.id")
                    plan.resource = {**plan.resource, "id": plan.rid}
                if plan.full_url:
                    id_map[plan.full_url] = f"{plan.rtype}/{plan.rid}"
        return id_map

    def _execute(self, tx: Tx, plan: _EntryPlan, base: str) -> dict[str, Any]:
        if plan.method == "GET":
            if plan.rid:
                found = self._read(tx, plan.rtype, plan.rid)
                return {
                    "resource": found.json(),
                    "response": _response_of(found, "200 OK"),
                    _TOUCHED: found,
                }
            query = self.parse_query(plan.rtype, plan.query or [], strict=False)
            return {
                "resource": self._search(tx, query, base).to_dict(),
                "response": {"status": "200 OK"},
            }
        if plan.method == "DELETE":
            gone = self._delete(tx, plan.rtype, plan.rid or "")
            return {"response": {"status": "204 No Content"}, _TOUCHED: gone}
        assert plan.resource is not None
        if plan.method == "POST":
            if plan.existing is not None:
                return {
                    "response": _response_of(plan.existing, "200 OK", base),
                    _TOUCHED: plan.existing,
                }
            body = dict(plan.resource)
            body["id"] = plan.new_id
            stored, _ = self._put(tx, body, None, method="POST")
            return {"response": _response_of(stored, "201 Created", base), _TOUCHED: stored}
        body = dict(plan.resource)
        if body.get("id") != plan.rid:
            raise BadRequest(
                issue("value", "resource id must match request.url", f"{plan.where}.id")
            )
        expected = parse_etag(plan.if_match) if plan.if_match else None
        result = self._update(tx, body, expected)
        status = "201 Created" if result.created else "200 OK"
        return {"response": _response_of(result.stored, status, base), _TOUCHED: result.stored}


class _WriteContext:
    """``store.write()`` that turns lost races into FHIR errors instead of 500s."""

    def __init__(self, store: Store, access: Access | None) -> None:
        self.store = store
        self.access = access
        self._cm: Any = None

    def __enter__(self) -> Tx:
        self._cm = self.store.write(viewer=self.access)
        tx: Tx = self._cm.__enter__()
        return tx

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        try:
            self._cm.__exit__(exc_type, exc, tb)
        except (IntegrityError, ConcurrentUpdate):
            raise Conflict(
                issue("conflict", "the resource was changed concurrently; retry the request")
            ) from None
        if isinstance(exc, IntegrityError | ConcurrentUpdate):
            raise Conflict(
                issue("conflict", "the resource was changed concurrently; retry the request")
            ) from None
        return False


_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}


@dataclass
class _EntryPlan:
    index: int
    method: str
    rtype: str = ""
    rid: str | None = None
    query: list[tuple[str, str]] | None = None
    full_url: str | None = None
    resource: dict[str, Any] | None = None
    if_none_exist: str | None = None
    if_match: str | None = None
    problems: tuple[Issue, ...] = ()
    new_id: str | None = None
    existing: StoredResource | None = None

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}].resource"


def _plan_entry(index: int, entry: Any, base: str) -> _EntryPlan:
    where = f"Bundle.entry[{index}]"
    if not isinstance(entry, dict):
        return _EntryPlan(
            index, "GET", problems=(issue("structure", "entry must be an object", where),)
        )
    request = entry.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("method"), str):
        return _EntryPlan(
            index,
            "GET",
            problems=(issue("required", "entry.request.method is required", f"{where}.request"),),
        )
    method = request["method"]
    url = request.get("url")
    if method not in _ORDER:
        return _EntryPlan(
            index,
            "GET",
            problems=(
                issue(
                    "not-supported",
                    f"request.method {method} is not supported",
                    f"{where}.request.method",
                ),
            ),
        )
    if not isinstance(url, str) or not url:
        return _EntryPlan(
            index,
            method,
            problems=(issue("required", "request.url is required", f"{where}.request.url"),),
        )
    if url.startswith(base + "/"):
        url = url[len(base) + 1 :]
    path, _, qs = url.partition("?")
    parts = [p for p in path.split("/") if p]
    plan = _EntryPlan(
        index,
        method,
        rtype=parts[0] if parts else "",
        rid=parts[1] if len(parts) > 1 else None,
        query=parse_qsl(qs, keep_blank_values=True),
        full_url=entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None,
        if_none_exist=request.get("ifNoneExist"),
        if_match=request.get("ifMatch"),
    )
    problems: list[Issue] = []
    if plan.rtype not in SUPPORTED_TYPES:
        problems.append(
            issue(
                "not-supported",
                f"resource type {plan.rtype} is not supported",
                f"{where}.request.url",
            )
        )
    elif method == "DELETE" and (not plan.rid or qs):
        problems.append(
            issue(
                "not-supported",
                "DELETE needs Type/id (conditional DELETE is not supported)",
                f"{where}.request.url",
            )
        )
    elif method == "PUT" and (bool(plan.rid) == bool(qs)):
        problems.append(
            issue(
                "value",
                "PUT needs Type/id, or Type?criteria for a conditional update",
                f"{where}.request.url",
            )
        )
    elif method == "POST" and (plan.rid or qs):
        problems.append(
            issue("value", "POST request.url must be the resource type", f"{where}.request.url")
        )
    if method in ("POST", "PUT"):
        resource = entry.get("resource")
        problems.extend(validate_resource(resource, plan.rtype or None, prefix=f"{where}.resource"))
        if isinstance(resource, dict):
            plan.resource = resource
    plan.problems = tuple(problems)
    return plan


def _authorize_entry(access: Access | None, plan: _EntryPlan) -> None:
    if access is None or plan.rtype not in SUPPORTED_TYPES:
        return
    interaction = {
        "POST": "create",
        "PUT": "update",
        "DELETE": "delete",
        "GET": "read" if plan.rid else "search",
    }[plan.method]
    require_access(access, plan.rtype, interaction, f"Bundle.entry[{plan.index}].request")


def caller_of(tx: Tx) -> Access | None:
    """The caller ``tx`` was opened for (None: the service itself)."""
    viewer = tx.viewer
    return viewer if isinstance(viewer, Access) else None


def _unknown(tx: Tx, rtype: str, rid: str, text: str) -> NotFound:
    """404 for what ``tx``'s caller cannot find. Whether it exists but is hidden from the
    caller changes nothing in the answer, only the audit record (``Hidden``)."""
    hidden = tx.viewer is not None and tx.system.get(rtype, rid) is not None
    return (Hidden if hidden else NotFound)(issue("not-found", text, rtype))


def _not_yours(rtype: str) -> Issue:
    # Names the type only: never the id, the patient or anything from the content.
    return issue("forbidden", f"this {rtype} is not yours to change", rtype)


#: Tokens looked up in one query by ``_conditional_matches`` (a search's own limit too).
_MAX_TOGETHER = 100
#: What the token index keeps of a system or code (``store._index_params``).
_TOKEN_CHARS = 255


def _narrated(tx: Tx, body: dict[str, Any], current: StoredResource | None) -> dict[str, Any]:
    """R4 dom-6, kept true: what the service writes itself carries a generated narrative of its
    own elements (``mapping.narrative``), and a narrative the service generated is generated
    again when its resource changes (a Flag resolved, a Task updated) — unless the writer sent
    a narrative of its own. A client's narrative is never touched."""
    text = body.get("text")
    if text is None and caller_of(tx) is None:
        return {**body, "text": narrative(body)}
    if text is None or current is None or current.deleted:
        return body
    before = current.json()
    if text != before.get("text") or same_content(body, before):
        return body  # a narrative of the writer's own, or nothing changed (no render needed)
    if not _generated_here(before):
        return body
    fresh = narrative({k: v for k, v in body.items() if k != "text"})
    return body if fresh == text else {**body, "text": fresh}


def _generated_here(resource: dict[str, Any]) -> bool:
    """Is ``resource``'s narrative the one the service generates for its elements?"""
    text = resource.get("text")
    return isinstance(text, dict) and text == narrative(
        {k: v for k, v in resource.items() if k != "text"}
    )


def _conditional_query(rtype: str, criteria: str, where: str) -> SearchQuery:
    pairs = parse_qsl(criteria.lstrip("?"), keep_blank_values=True)
    if not pairs:
        raise BadRequest(issue("value", f"{where} has no search criteria", where))
    # Unknown criteria would match everything: always strict here.
    return parse_search(rtype, pairs, strict=True, default_count=2, max_count=2)


def _lock_key(query: SearchQuery) -> str:
    return f"conditional-create|{query.resource_type}|{sorted(query.self_params())}"


def _the_one(rows: Sequence[StoredResource], rtype: str, where: str) -> StoredResource | None:
    if len(rows) > 1:
        # Never how many: a count of what the criteria match is a value oracle.
        raise PreconditionFailed(
            issue("multiple-matches", f"{where} matched more than one {rtype}", where)
        )
    return rows[0] if rows else None


def _single_token(query: SearchQuery) -> tuple[str, str] | None:
    """(system, code) when ``query`` is exactly one ``param=system|code`` token criterion,
    both non-empty and short enough that the index holds them whole; else None."""
    if len(query.criteria) != 1 or query.includes or query.summary_count:
        return None
    c = query.criteria[0]
    if c.type != "token" or c.modifier or len(c.values) != 1:
        return None
    system, code, has_pipe = c.values[0]
    if not (has_pipe and system and code) or max(len(system), len(code)) > _TOKEN_CHARS:
        return None
    return system, code


def _tokens_of(stored: StoredResource, param: str) -> set[tuple[str, str]]:
    """The (system, code) tokens of ``param`` the index holds for ``stored``."""
    return {
        (system[:_TOKEN_CHARS], code[:_TOKEN_CHARS])
        for name, system, code in extract_index(stored.json()).tokens
        if name == param
    }


def _conditional_id(match: StoredResource | None, given: Any, where: str) -> str:
    """The id a conditional update writes: the match's (a body id must then be the same,
    R4 3.1.0.4.3), else the body's own (update as create), else a new one."""
    if match is not None:
        if given is not None and given != match.id:
            raise BadRequest(
                issue("value", "the resource id is not that of the resource matched", where)
            )
        return match.id
    if isinstance(given, str) and given:
        return given
    return str(uuid.uuid4())


def _require_may_change(
    tx: Tx, access: Access | None, current: StoredResource | None, body: dict[str, Any]
) -> None:
    """Passes when the caller may change ``current`` (or it does not exist: creating is
    decided elsewhere), or when it may not but ``body`` says exactly what is stored (a
    re-sent referral naming, say, the program's Organization: a no-op update, nothing is
    written); otherwise 403 before any write rule runs, so the answer tells nothing about
    the stored resource."""
    if access is None or current is None or current.deleted or access.may_change(tx, current):
        return
    if not same_content(current.json(), body):
        raise Forbidden(_not_yours(current.type))


def _status_for(problems: Sequence[Issue]) -> type[FhirError]:
    """400 when the content is not valid FHIR (structure, cardinality, types, required
    bindings); 422 when it is valid FHIR that breaks a rule of this service (FHIR R4 http.html,
    "Create": 400 vs 422)."""
    return BadRequest if any(p.code in _STRUCTURAL for p in problems) else Unprocessable


_STRUCTURAL = frozenset(
    {"structure", "required", "value", "invalid", "code-invalid", "not-supported", "duplicate"}
)


def _rewrite_references(
    resource: dict[str, Any], id_map: dict[str, str], where: str, unresolved: list[Issue]
) -> None:
    for holder, path in iter_references(resource, where):
        ref = holder["reference"]
        if ref in id_map:
            holder["reference"] = id_map[ref]
        elif ref.startswith(("urn:uuid:", "urn:oid:")):
            unresolved.append(
                issue("not-found", "reference to an entry that is not in this Bundle", path)
            )


def _response_of(stored: StoredResource, status: str, base: str = "") -> dict[str, Any]:
    location = f"{stored.type}/{stored.id}/_history/{stored.version_id}"
    return {
        "status": status,
        "location": f"{base}/{location}" if base else location,
        "etag": stored.etag,
        "lastModified": format_instant(stored.last_updated),
    }


#: The key of an entry result holding the resource the entry wrote, matched, left unchanged,
#: read or deleted: never sent, named in the request's audit record.
_TOUCHED = "_touched"


def _response_bundle(btype: str, results: list[dict[str, Any] | None]) -> RawBundle:
    """The response Bundle; its ``disclosed``/``patients`` name every resource an entry
    touched, so the request's AuditEvent names what a transaction or batch wrote — and what
    it left unchanged (a no-op update is audited like any update)."""
    bundle = RawBundle({"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": btype})
    for result in results:
        assert result is not None
        resource = result.pop("resource", None)
        touched: StoredResource | None = result.pop(_TOUCHED, None)
        if touched is not None:
            bundle.disclosed.append(f"{touched.type}/{touched.id}")
            if touched.patient_id:
                bundle.patients.add(touched.patient_id)
        bundle.entries.append(RawEntry(result, resource=resource))
    return bundle


__all__ = ["FhirService", "WriteHook", "WriteResult", "parse_etag", "split_reference"]
