"""The write step that holds resources to the program's profiles (ADR 0022).

Owns: ``profile_rule``, the last write rule every version passes (``FhirService._put``): a
resource declaring one of our profiles is checked against it (422, one issue per violation,
naming profile and element); one the service itself writes, that the profiles select and
that conforms, gets the profile in ``meta.profile``. Must not: refuse a resource that declares
none of ours (base R4 stays accepted: outbound never vetoes inbound) or change anything but
``meta.profile``.
"""

from __future__ import annotations

from typing import Any

from fhir_kat.errors import Unprocessable
from fhir_kat.profiles import check_declared, declare, declared
from fhir_kat.services.fhir_rest import caller_of
from fhir_kat.store import StoredResource, Tx


def profile_rule(tx: Tx, body: dict[str, Any], current: StoredResource | None) -> None:
    problems = check_declared(body)
    if problems:
        raise Unprocessable(problems)
    if caller_of(tx) is None or (current is not None and declared(current.json())):
        # The service's own writes (extracted scores, Flags, the feedback document, the Task
        # it adds) declare their profile, and so do later versions of what declared one (a
        # Task moved on by staff); a client's own resource is stored as it was sent (read
        # back unchanged). Mapped artifacts declare theirs in the mapping engine.
        declare(body)


__all__ = ["profile_rule"]
