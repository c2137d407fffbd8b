"""A FHIR terminology server's ``CodeSystem/$subsumes``, for triage's criterion ValueSets.

Owns: ``TerminologyServer.subsumes`` — ``GET [base]/CodeSystem/$subsumes?system=…&codeA=…&
codeB=…`` (FHIR R4 codesystem-operation-subsumes), answered ``True`` for ``subsumes`` or
``equivalent``, ``False`` for ``subsumed-by`` or ``not-subsumed``, and ``None`` when the server
cannot say (an error, a timeout, an unknown code): triage then treats the code as unclassified
and sends the referral to a clinician — a server that is down never accepts anything. Answers
are remembered per process (terminology is stable within a release). Configured by
``[program.triage] terminology_server`` (off by default: the criterion ValueSets' listed codes
decide). Must not: decide eligibility or be reached from the pure layers directly (they see the
``Subsumption`` protocol only).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import requests

log = logging.getLogger("fhir_kat.terminology")

#: Each look-up waits at most this long (seconds): triage runs inside a write transaction.
TIMEOUT = 3.0
#: Remembered answers per process.
CACHE_SIZE = 50_000


class TerminologyServer:
    def __init__(self, base_url: str, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        self._answers: dict[tuple[str, str, str], bool | None] = {}
        self._lock = threading.Lock()

    def subsumes(self, system: str, ancestor: str, code: str) -> bool | None:
        key = (system, ancestor, code)
        with self._lock:
            if key in self._answers:
                return self._answers[key]
        answer = self._ask(system, ancestor, code)
        if answer is not None:  # a failure is asked again next time
            with self._lock:
                if len(self._answers) >= CACHE_SIZE:
                    self._answers.clear()
                self._answers[key] = answer
        return answer

    def _ask(self, system: str, ancestor: str, code: str) -> bool | None:
        try:
            r = self.session.get(
                f"{self.base_url}/CodeSystem/$subsumes",
                params={"system": system, "codeA": ancestor, "codeB": code},
                headers={"Accept": "application/fhir+json"},
                timeout=TIMEOUT,
            )
        except requests.RequestException as exc:
            log.warning("terminology server unreachable", extra={"error": type(exc).__name__})
            return None
        if r.status_code != 200:
            log.warning("terminology server refused $subsumes", extra={"status": r.status_code})
            return None
        try:
            body: Any = r.json()
        except ValueError:
            return None
        outcome = _outcome(body)
        if outcome in ("subsumes", "equivalent"):
            return True
        if outcome in ("subsumed-by", "not-subsumed"):
            return False
        return None


def _outcome(body: Any) -> str | None:
    """``Parameters.parameter[name=outcome].valueCode``."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        return None
    for p in body.get("parameter", []):
        if isinstance(p, dict) and p.get("name") == "outcome":
            value = p.get("valueCode")
            return value if isinstance(value, str) else None
    return None


__all__ = ["TerminologyServer"]
