"""Reads from an EHR's FHIR server with the access token a CDS Hooks request carries (or a
SMART launch obtained: ``services/smart_launch.py``).

Owns: ``EhrFhirReader`` — a read (``Patient/<id>``) or a search (``Condition?patient=…``)
against the hook's ``fhirServer`` with its ``fhirAuthorization`` bearer token, answering the
resource, the search's resources (following ``next`` links up to a bound), or ``None`` when the
EHR cannot say (an error status, a timeout, an answer that is not the FHIR it asked for). The
caller decides what ``None`` means (a CDS Hooks service answers that it could not get the data);
nothing is retried and nothing is kept. Must not: choose the server (the service allows only
the EHR's registered ``fhir_servers``) or log anything of the answers (they are PHI).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urljoin

import requests

log = logging.getLogger("fhir_kat.ehr_fhir")  # used by CDS Hooks and SMART launches

#: A CDS Hooks answer is expected within a few hundred milliseconds: each read waits this long.
TIMEOUT = 5.0
#: Pages of one search followed at most (a chart of more is read in part: the caller is told).
MAX_PAGES = 5


class EhrFhirReader:
    def __init__(
        self, base_url: str, access_token: str, session: requests.Session | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.headers = {
            "Authorization": f"Bearer {access_token}",
            "Accept": "application/fhir+json",
        }
        self.session = session or requests.Session()

    def get(self, path: str) -> dict[str, Any] | None:
        """``path`` relative to the FHIR base: the resource read, or a searchset Bundle whose
        pages (at most ``MAX_PAGES``) are joined into one; ``None`` when the EHR cannot say."""
        url = urljoin(self.base_url, path.lstrip("/"))
        first = self._fetch(url)
        if first is None or first.get("resourceType") != "Bundle":
            return first
        entries = list(first.get("entry", []))
        page = first
        for _ in range(MAX_PAGES - 1):
            nxt = next(
                (
                    link.get("url")
                    for link in page.get("link", [])
                    if link.get("relation") == "next"
                ),
                None,
            )
            if not nxt or not str(nxt).startswith(self.base_url):
                break  # a next link elsewhere is not followed with the EHR's token
            fetched = self._fetch(str(nxt))
            if fetched is None or fetched.get("resourceType") != "Bundle":
                return None
            entries += fetched.get("entry", [])
            page = fetched
        return {**first, "entry": entries}

    def _fetch(self, url: str) -> dict[str, Any] | None:
        try:
            response = self.session.get(url, headers=self.headers, timeout=TIMEOUT)
        except requests.RequestException as exc:
            log.warning("EHR FHIR server unreachable", extra={"error": type(exc).__name__})
            return None
        if response.status_code != 200:
            log.warning("EHR FHIR server refused a read", extra={"status": response.status_code})
            return None
        try:
            body = response.json()
        except ValueError:
            return None
        return (
            body if isinstance(body, dict) and isinstance(body.get("resourceType"), str) else None
        )


def search_matches(bundle: Any, rtype: str) -> list[dict[str, Any]] | None:
    """The ``rtype`` resources a searchset Bundle returned as matches (``_include``d ones and
    OperationOutcomes left out); None when ``bundle`` is not a Bundle at all."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return None
    return [
        e["resource"]
        for e in bundle.get("entry") or []
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == rtype
        and (e.get("search") or {}).get("mode", "match") == "match"
    ]
