"""A FHIR Bulk Data ($export) client: kick-off, polling, download of the NDJSON files.

Owns: the Bulk Data conversation as the HL7 Bulk Data Access IG describes it — kick-off with
``Prefer: respond-async`` (202 + ``Content-Location``), polling the status URL honouring
``Retry-After`` (and ``X-Progress`` for display), the manifest, and each output file fetched
with the access token when ``requiresAccessToken`` says so — written to a temporary name and
renamed when complete, so a folder never holds half a file under its final name.

Used by ``fhir-kat export`` against fhir_kat's own ``$export``; it works with any Bulk Data
server. Must not: print (callers get progress through a callback), keep a token in a log line,
or write outside the folder it is given.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from fhir_kat.exchange.client import parse_retry_after

#: File names we write: the manifest's names when they are plain, a counter otherwise.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.ndjson$")
DEFAULT_RETRY_AFTER = 2.0
#: Longest single wait between polls, whatever Retry-After says (the budget still applies).
MAX_POLL_WAIT = 60.0


class BulkError(Exception):
    """The server refused or failed the export; ``outcome`` is its OperationOutcome if any."""

    def __init__(self, message: str, status: int | None = None, outcome: Any = None) -> None:
        super().__init__(message)
        self.status, self.outcome = status, outcome


class Unreachable(BulkError):
    """No HTTP answer at all (connection refused, DNS, timeout)."""


@dataclass
class Downloaded:
    type: str
    path: Path
    lines: int


@dataclass
class ExportResult:
    manifest: dict[str, Any]
    files: list[Downloaded] = field(default_factory=list)
    errors: list[Downloaded] = field(default_factory=list)


class BulkClient:
    def __init__(
        self,
        base_url: str,
        token: Callable[[bool], str],
        *,
        session: requests.Session | None = None,
        timeout: float = 60.0,
        sleep: Callable[[float], None] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        """``token(renew)`` returns an access token; ``renew=True`` after a 401."""
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.session = session or requests.Session()
        self.timeout = timeout
        # Looked up at call time, so a test can replace time.sleep for the whole command.
        self.sleep = sleep or (lambda seconds: time.sleep(seconds))
        self.monotonic = monotonic or (lambda: time.monotonic())

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, url: str, **kw: Any) -> requests.Response:
        renewed = False
        while True:
            headers = {"Authorization": f"Bearer {self.token(renewed)}", **kw.pop("headers", {})}
            try:
                response = self.session.request(
                    method, url, headers=headers, timeout=self.timeout, **kw
                )
            except requests.RequestException as exc:
                raise Unreachable(f"{type(exc).__name__} talking to {_origin(url)}") from None
            if response.status_code == 401 and not renewed:
                renewed = True  # an expired token: one more try with a fresh one
                kw["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
                continue
            return response

    # ------------------------------------------------------------------ steps

    def kick_off(
        self,
        *,
        types: Sequence[str] = (),
        since: str | None = None,
        type_filters: Sequence[str] = (),
        group: str | None = None,
        patient_level: bool = False,
    ) -> str:
        """Start an export; returns the status URL."""
        if group:
            url = f"{self.base_url}/Group/{group}/$export"
        elif patient_level:
            url = f"{self.base_url}/Patient/$export"
        else:
            url = f"{self.base_url}/$export"
        params: list[tuple[str, str]] = []
        if types:
            params.append(("_type", ",".join(types)))
        if since:
            params.append(("_since", since))
        params += [("_typeFilter", f) for f in type_filters]
        response = self._request(
            "GET",
            url,
            params=params,
            headers={"Accept": "application/fhir+json", "Prefer": "respond-async"},
        )
        if response.status_code != 202:
            raise _refusal("kick-off", response)
        location = response.headers.get("Content-Location")
        if not location:
            raise BulkError("the server accepted the export but sent no Content-Location", 202)
        return location

    def wait(
        self,
        status_url: str,
        *,
        on_progress: Callable[[str], None] = lambda _: None,
        budget_seconds: float = 3600.0,
    ) -> dict[str, Any]:
        """Poll until the manifest is ready, sleeping as ``Retry-After`` asks (bounded by the
        budget); ``BulkError`` when the export fails or the budget runs out."""
        deadline = self.monotonic() + budget_seconds
        while True:
            response = self._request("GET", status_url, headers={"Accept": "application/json"})
            if response.status_code == 200:
                try:
                    manifest: dict[str, Any] = response.json()
                except ValueError:
                    raise BulkError("the manifest is not JSON", 200) from None
                return manifest
            if response.status_code not in (202, 429):
                raise _refusal("status", response)
            on_progress(response.headers.get("X-Progress") or "in progress")
            wait = parse_retry_after(response.headers.get("Retry-After"), time.time())
            wait = min(DEFAULT_RETRY_AFTER if wait is None else wait, MAX_POLL_WAIT)
            left = deadline - self.monotonic()
            if left <= 0:
                raise BulkError(f"not finished within {budget_seconds:g} s; status: {status_url}")
            self.sleep(min(max(wait, 0.1), left))

    def download(
        self,
        manifest: dict[str, Any],
        out_dir: Path,
        *,
        on_file: Callable[[Downloaded], None] = lambda _: None,
    ) -> ExportResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        result = ExportResult(manifest)
        auth = bool(manifest.get("requiresAccessToken", True))
        used: set[str] = set()
        for section, into in (("output", result.files), ("error", result.errors)):
            for index, item in enumerate(manifest.get(section) or []):
                rtype = str(item.get("type", "unknown"))
                name = str(item.get("url", "")).rsplit("/", 1)[-1].split("?")[0]
                if not _SAFE_NAME.match(name) or name in used:
                    name = f"{re.sub(r'[^A-Za-z0-9]', '', rtype) or 'file'}.{index + 1}.ndjson"
                used.add(name)
                target = out_dir / ("errors" if section == "error" else "") / name
                done = self._fetch(str(item["url"]), target, rtype, auth)
                into.append(done)
                on_file(done)
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return result

    def _fetch(self, url: str, target: Path, rtype: str, auth: bool) -> Downloaded:
        headers = {"Accept": "application/fhir+ndjson"}
        if auth:
            response = self._request("GET", url, headers=headers, stream=True)
        else:
            try:
                response = self.session.get(url, headers=headers, timeout=self.timeout, stream=True)
            except requests.RequestException as exc:
                raise Unreachable(f"{type(exc).__name__} talking to {_origin(url)}") from None
        with response:
            if response.status_code != 200:
                raise _refusal(f"download of {target.name}", response)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            lines = 0
            with open(partial, "wb") as fh:
                for chunk in response.iter_content(chunk_size=65536):
                    fh.write(chunk)
                    lines += chunk.count(b"\n")
            partial.replace(target)
        return Downloaded(rtype, target, lines)

    def cancel(self, status_url: str) -> None:
        self._request("DELETE", status_url)


def _origin(url: str) -> str:
    """Scheme, host and port only: query strings can carry identifiers."""
    match = re.match(r"^[a-z]+://[^/?#]+", url)
    return match.group(0) if match else "the server"


def _refusal(step: str, response: requests.Response) -> BulkError:
    outcome = None
    try:
        doc = response.json()
        if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
            outcome = doc
    except ValueError:
        pass
    detail = ""
    if outcome:
        texts = [str(i.get("diagnostics", i.get("code", ""))) for i in outcome.get("issue", [])]
        detail = ": " + "; ".join(t for t in texts if t)[:500]
    return BulkError(
        f"{step} failed with HTTP {response.status_code}{detail}", response.status_code, outcome
    )


__all__ = ["BulkClient", "BulkError", "Downloaded", "ExportResult", "Unreachable"]
