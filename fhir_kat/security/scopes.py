"""SMART scopes (v2 ``system/Observation.rs``, ``system/*.cruds``; v1 ``system/*.read``).

A scope grants letters c (create), r (read), u (update), d (delete), s (search) on one resource
type or ``*``. Only ``system/`` scopes exist here: fhir_kat serves backend clients, no users.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_SCOPE = re.compile(r"^system/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<perm>[cruds]+|read|write|\*)$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class Scope:
    resource_type: str  # a type or "*"
    letters: frozenset[str]
    text: str

    def allows(self, resource_type: str, letter: str) -> bool:
        return self.resource_type in ("*", resource_type) and letter in self.letters


def parse_scope(text: str) -> Scope | None:
    match = _SCOPE.match(text)
    if not match:
        return None
    perm = match["perm"]
    letters = _V1.get(perm, perm)
    if perm not in _V1 and "".join(sorted(set(perm), key="cruds".index)) != perm:
        return None  # v2 letters must be in c-r-u-d-s order, each once
    return Scope(match["type"], frozenset(letters), text)


def parse_scopes(texts: Iterable[str]) -> tuple[list[Scope], list[str]]:
    good, bad = [], []
    for text in texts:
        scope = parse_scope(text)
        if scope is None:
            bad.append(text)
        else:
            good.append(scope)
    return good, bad


def allows(scopes: Iterable[Scope], resource_type: str, letter: str) -> bool:
    return any(s.allows(resource_type, letter) for s in scopes)


def covered_by(requested: Scope, allowed: Iterable[Scope]) -> bool:
    """Whether every permission of ``requested`` is within some allowed scope."""
    return all(
        any(
            a.resource_type in ("*", requested.resource_type) and letter in a.letters
            for a in allowed
        )
        for letter in requested.letters
    ) and (requested.resource_type != "*" or any(a.resource_type == "*" for a in allowed))
