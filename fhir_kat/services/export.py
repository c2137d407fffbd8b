"""Bulk Data ``$export`` (FHIR Bulk Data Access IG, async pattern): kick-off, status, cancel,
NDJSON files.

Owns: export jobs (a table any process can answer polls from), the runner that streams stored
JSON to one NDJSON file per type in bounded batches (memory does not grow with the export), and
consent filtering per patient — the same decision point as searches. Must not: parse HTTP.

``transactionTime`` is the kick-off instant. Each type is read by one query in one read
transaction (``Tx.scan_batches``), so each file is a consistent snapshot taken when that type's
turn comes: every resource appears exactly once, in the version it had then (the keyset pages
this replaced could write a resource updated mid-export twice, old and new version), and the
consent decision comes from the same snapshot. Changes after the kick-off but before a type's
turn are included (no snapshot spans types). The price: one connection and transaction held
while a type streams (PostgreSQL's vacuum horizon waits for it; SQLite's WAL cannot checkpoint
past it until it ends).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import insert, select, update

from fhir_kat.errors import BadRequest, Forbidden, NotFound, ServerError, issue
from fhir_kat.search import SearchQuery, parse_date_range, parse_search, utc_naive
from fhir_kat.security.policy import role_allows
from fhir_kat.services.access import Access
from fhir_kat.store import Store
from fhir_kat.store.schema import export_jobs
from fhir_kat.store.store import format_instant
from fhir_kat.validation.resource import SUPPORTED_TYPES

log = logging.getLogger("fhir_kat.export")

BATCH = 1000  # rows per fetch and write: ~0.4 MB of JSON at a time, whatever the size
HEARTBEAT_EVERY = timedelta(seconds=10)  # well inside STALE_AFTER
#: Never exported: the audit trail and subscriptions are operational, not clinical data.
NOT_EXPORTED = frozenset({"AuditEvent", "Subscription"})
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
STALE_AFTER = timedelta(minutes=2)
#: Beside each ``<type>.ndjson``: the patient ids it holds (never served; read for the audit).
PATIENTS_SUFFIX = ".patients.json"

#: RFC 6750 §3.1: a token that lacks the scope says so (as every other scope refusal).
INSUFFICIENT_SCOPE = {"WWW-Authenticate": 'Bearer realm="fhir_kat", error="insufficient_scope"'}


def _skipped_outcome(skipped: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "warning",
                "code": skipped["code"],
                "diagnostics": f"{skipped['text']}: left out (Prefer: handling=lenient)",
                "expression": ["_type"],
            }
        ],
    }


@dataclass(frozen=True)
class JobStatus:
    status: str
    progress: str | None = None
    manifest: dict[str, Any] | None = None
    error: str | None = None


class ExportService:
    def __init__(
        self,
        store: Store,
        export_dir: Path,
        clock: Callable[[], datetime],
        *,
        workers: int = 2,
    ) -> None:
        self.store = store
        self.export_dir = export_dir
        self.clock = clock
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="export")
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ kick-off

    def kick_off(
        self,
        *,
        level: str,
        group_id: str | None,
        pairs: Iterable[tuple[str, str]],
        access: Access,
        request_url: str,
        file_base: str,
        lenient: bool = False,
    ) -> str:
        """Start an export; ``lenient`` (``Prefer: handling=lenient``): ``_type`` values that
        cannot be exported (not held, or not readable by the caller) are left out and reported
        in the manifest's ``error`` file instead of refusing the request."""
        params = self._parse(level, pairs, access, lenient=lenient)
        if level == "group":
            params["group"] = group_id
            self._group_members(group_id or "", access)  # 404/403 now, not later
        job_id = str(uuid.uuid4())
        now = utc_naive(self.clock())
        with self.store.write() as tx:
            tx.conn.execute(
                insert(export_jobs).values(
                    id=job_id,
                    client_id=access.principal.actor,
                    status="accepted",
                    request_url=request_url,
                    params=json.dumps(params),
                    created_at=now,
                    heartbeat_at=now,
                    transaction_time=format_instant(now),
                )
            )
        self.executor.submit(self._run_safely, job_id, params, access, file_base)
        return job_id

    def _parse(
        self, level: str, pairs: Iterable[tuple[str, str]], access: Access, *, lenient: bool
    ) -> dict[str, Any]:
        problems = []
        types: list[str] | None = None
        since: str | None = None
        filters: list[str] = []
        for key, value in pairs:
            if key == "_outputFormat":
                if value not in OUTPUT_FORMATS:
                    problems.append(issue("not-supported", "_outputFormat must be ndjson", key))
            elif key == "_type":
                types = (types or []) + [t for t in value.split(",") if t]
            elif key == "_since":
                if parse_date_range(value) is None or "T" not in value:
                    problems.append(issue("value", "_since must be a FHIR instant", key))
                since = value
            elif key == "_typeFilter":
                filters += [f for f in value.split(",") if f]
            else:
                problems.append(issue("not-supported", f"unsupported $export parameter {key}", key))
        allowed = [t for t in SUPPORTED_TYPES if t not in NOT_EXPORTED and access.can(t, "r")]
        skipped: list[dict[str, str]] = []
        by_scope = False  # a refusal because a granted scope lacks a type (insufficient_scope)
        for t in types or []:
            if t not in SUPPORTED_TYPES or t in NOT_EXPORTED:
                found = issue("not-supported", f"_type {t} cannot be exported", "_type")
            elif not access.can(t, "r"):
                found = issue("forbidden", f"you may not read {t}", "_type")
                by_scope = by_scope or role_allows(access.role, t, "r")
            else:
                continue
            if lenient:
                skipped.append({"type": t, "code": found.code, "text": found.diagnostics})
            else:
                problems.append(found)
        if types is not None:
            types = [t for t in types if t not in {s["type"] for s in skipped}]
        for f in filters:
            rtype, _, query = f.partition("?")
            if rtype not in SUPPORTED_TYPES or not query:
                problems.append(issue("value", "_typeFilter must be Type?search", "_typeFilter"))
                continue
            try:
                parse_search(rtype, parse_qsl(query), strict=True, default_count=1, max_count=1)
            except BadRequest as exc:
                problems.extend(exc.issues)
        if problems:
            if all(p.code == "forbidden" for p in problems):
                raise Forbidden(problems, headers=INSUFFICIENT_SCOPE if by_scope else {})
            raise BadRequest(problems)
        return {
            "level": level,
            "types": types if types is not None else allowed,
            "since": since,
            "filters": filters,
            "skipped": skipped,
        }

    def _group_members(self, group_id: str, access: Access) -> set[str]:
        """The Group's active Patient members, as far as ``access`` may see them (a cohort
        Group read by a party outside the program lists only consenting members).

        A Group export needs the *role's* right to read Groups, not a Group scope: the Group
        only selects whose data is exported, and every exported type is checked against the
        granted scopes (SMART Fetch and cumulus-etl ask for the types they export, and cannot
        add ``system/Group.rs``). The Group resource itself leaves only when ``_type`` names
        it and a scope covers it (docs/integrators.md, "Bulk export")."""
        if not role_allows(access.role, "Group", "r"):
            raise Forbidden(
                issue("forbidden", f"role {access.role} may not export Groups", "Group")
            )
        with self.store.read(viewer=access.for_group_membership()) as tx:
            group = tx.get("Group", group_id)
            if group is None or group.deleted:
                raise NotFound(issue("not-found", "no such Group", "Group"))
            members = set()
            for member in group.json().get("member", []):
                ref = member.get("entity", {}).get("reference", "")
                if ref.startswith("Patient/") and not member.get("inactive", False):
                    members.add(ref.split("/", 1)[1])
            return members

    # ------------------------------------------------------------------ status, cancel, files

    def _job(self, job_id: str, access: Access) -> Any:
        with self.store.read() as tx:
            row = tx.conn.execute(select(export_jobs).where(export_jobs.c.id == job_id)).first()
        if row is None or row.status == "cancelled":
            raise NotFound(issue("not-found", "no such export job", "job"))
        if row.client_id != access.principal.actor:
            raise Forbidden(issue("forbidden", "this export belongs to another client", "job"))
        return row

    def status(self, job_id: str, access: Access) -> JobStatus:
        row = self._job(job_id, access)
        if row.status in ("accepted", "in-progress"):
            if utc_naive(self.clock()) - row.heartbeat_at > STALE_AFTER:
                self._finish(job_id, "error", error="the export stopped (its process ended)")
                raise ServerError(issue("exception", "the export stopped; start a new one"))
            return JobStatus(row.status, progress=row.progress)
        if row.status == "error":
            raise ServerError(issue("exception", row.error or "the export failed"))
        return JobStatus("completed", manifest=json.loads(row.manifest))

    def cancel(self, job_id: str, access: Access) -> None:
        self._job(job_id, access)
        with self._lock:
            self._cancelled.add(job_id)
        self._update(job_id, force=True, status="cancelled")
        shutil.rmtree(self.export_dir / job_id, ignore_errors=True)

    def file(self, job_id: str, name: str, access: Access) -> Path:
        row = self._job(job_id, access)
        if row.status != "completed":
            raise NotFound(issue("not-found", "the export is not complete", "job"))
        path = (self.export_dir / job_id / name).resolve()
        if (
            path.parent != (self.export_dir / job_id).resolve()
            or not name.endswith(".ndjson")
            or not path.is_file()
        ):
            raise NotFound(issue("not-found", "no such export file", "file"))
        return path

    def file_patients(self, path: Path) -> list[str]:
        """The patients whose data the export file at ``path`` (from ``file``) holds: the
        download's AuditEvent lists them (what left, about whom)."""
        listed = path.with_name(path.name.removesuffix(".ndjson") + PATIENTS_SUFFIX)
        try:
            patients: list[str] = json.loads(listed.read_text())
        except FileNotFoundError:
            return []
        return patients

    # ------------------------------------------------------------------ runner

    def _run_safely(self, job_id: str, params: dict[str, Any], access: Access, base: str) -> None:
        try:
            self._run(job_id, params, access, base)
        except Exception:
            log.exception("export failed", extra={"job": job_id})
            self._finish(job_id, "error", error="the export failed; see the server log")

    def _run(self, job_id: str, params: dict[str, Any], access: Access, base: str) -> None:
        self._update(job_id, status="in-progress", progress="starting")
        folder = self.export_dir / job_id
        folder.mkdir(parents=True, exist_ok=True)
        since = None
        if params["since"]:
            parsed = parse_date_range(params["since"])
            since = parsed[0] if parsed else None
        patients = None
        if params["level"] == "group":
            patients = self._group_members(params["group"], access)
        filters: dict[str, list[SearchQuery]] = {}
        for f in params["filters"]:
            rtype, _, query = f.partition("?")
            filters.setdefault(rtype, []).append(
                parse_search(rtype, parse_qsl(query), strict=True, default_count=1, max_count=1)
            )
        output = []
        types = params["types"]
        for index, rtype in enumerate(types):
            if self._is_cancelled(job_id):
                return
            queries = filters.get(rtype) or [SearchQuery(rtype)]
            count = 0
            path = folder / f"{rtype}.ndjson"
            disclosed: set[str] = set()  # whose data the file holds, for the download's audit
            with path.open("w", encoding="utf-8") as out:
                for query in queries:  # _typeFilter queries are OR-ed, duplicates dropped
                    count += self._write_type(
                        out,
                        query,
                        access,
                        since,
                        patients,
                        params["level"],
                        job_id,
                        seen=set() if len(queries) > 1 else None,
                        disclosed=disclosed,
                    )
            if count:
                output.append(
                    {"type": rtype, "url": f"{base}/{job_id}/{rtype}.ndjson", "count": count}
                )
                (folder / f"{rtype}{PATIENTS_SUFFIX}").write_text(json.dumps(sorted(disclosed)))
            else:
                path.unlink()
            self._update(job_id, progress=f"{index + 1} of {len(types)} types")
        with self.store.read() as tx:
            row = tx.conn.execute(select(export_jobs).where(export_jobs.c.id == job_id)).one()
        errors = []
        if params.get("skipped"):
            # Prefer: handling=lenient: what was asked for and left out, as OperationOutcomes.
            path = folder / "OperationOutcome.ndjson"
            path.write_text(
                "".join(json.dumps(_skipped_outcome(s)) + "\n" for s in params["skipped"]),
                encoding="utf-8",
            )
            errors.append({"type": "OperationOutcome", "url": f"{base}/{job_id}/{path.name}"})
        manifest = {
            "transactionTime": row.transaction_time,
            "request": row.request_url,
            "requiresAccessToken": True,
            "output": output,
            "error": errors,
        }
        if not self._is_cancelled(job_id):
            self._finish(job_id, "completed", manifest=manifest)

    def _write_type(
        self,
        out: Any,
        query: SearchQuery,
        access: Access,
        since: datetime | None,
        patients: set[str] | None,
        level: str,
        job_id: str,
        seen: set[int] | None,
        disclosed: set[str] | None = None,
    ) -> int:
        """Stream one query's rows to ``out``: one read transaction and one query per type
        (``Tx.scan_batches``), written a batch of ``BATCH`` rows at a time (one join, one
        write: the stored JSON is the line), with the cancel check per batch and a heartbeat
        every ``HEARTBEAT_EVERY``. The caller's scope is taken once, at the query's start, from
        the same snapshot the rows come from."""
        count = 0
        disclosed = set() if disclosed is None else disclosed  # patient ids written
        last_beat = self.clock()
        with self.store.read(viewer=access) as tx:
            # The caller's transaction: consent, ownership and shaping (a cohort Group's
            # members) are the store's, exactly as for a search.
            batches = tx.scan_batches(query, batch=BATCH, since=since, patients=patients)
            with closing(batches):
                for batch in batches:
                    if seen is None and level == "system":  # the common case: every row
                        lines = [row[1] for row in batch]
                        disclosed.update(row[2] for row in batch if row[2] is not None)
                    else:
                        lines = []
                        for seq, content, patient_id in batch:
                            if level != "system" and patient_id is None:
                                continue  # patient-level exports: patient-compartment data only
                            if seen is not None:
                                if seq in seen:
                                    continue
                                seen.add(seq)
                            lines.append(content)
                            if patient_id is not None:
                                disclosed.add(patient_id)
                    if lines:
                        out.write("\n".join(lines))
                        out.write("\n")
                        count += len(lines)
                    if self._is_cancelled(job_id):
                        return count
                    now = self.clock()
                    if now - last_beat >= HEARTBEAT_EVERY:
                        self._update(job_id)  # heartbeat: a write per 10 s, not per batch
                        last_beat = now
        return count

    def _is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def _update(self, job_id: str, *, force: bool = False, **values: Any) -> None:
        values["heartbeat_at"] = utc_naive(self.clock())
        stmt = update(export_jobs).where(export_jobs.c.id == job_id)
        if not force:  # a cancelled job stays cancelled, whatever its runner does next
            stmt = stmt.where(export_jobs.c.status != "cancelled")
        with self.store.write() as tx:
            tx.conn.execute(stmt.values(**values))

    def _finish(self, job_id: str, status: str, **values: Any) -> None:
        if "manifest" in values:
            values["manifest"] = json.dumps(values["manifest"])
        self._update(job_id, status=status, **values)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def after_fork(self) -> None:
        """In a child process: a thread pool of its own (the parent's threads do not exist
        here, and its lock may have been held at the fork)."""
        workers = self.executor._max_workers
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="export")
        self._lock = threading.Lock()
