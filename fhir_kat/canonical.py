"""The deployment's canonical home: the one base URL of everything this service defines
(CodeSystems, ValueSets, ConceptMaps, Questionnaires, the Measure, extensions, profiles) and
the base of the identifier systems it assigns (``<identifier base>/<kind>``).

Owns: the process's two bases (settings ``canonical_base`` and ``identifier_base``, read once
through ``fhir_kat.settings``: environment, then the TOML file, then the default — ADR 0021),
and ``read_definition``, which every loader of ``mappings/`` uses so that the files name the
bases symbolically (``$canonical/CodeSystem/kat-route``, ``$identifiers/consents``) and
no file carries a deployment's address.

The bases are fixed for a process: they are part of every mapping's output, of the identifier
systems deterministic ids are derived from, and of module constants computed at import.
``create_app`` refuses settings that name another base than the process's, and a database
written under other bases (``check_recorded``, called at start-up).

Must not: import anything of fhir_kat but settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fhir_kat.settings import Settings, SettingsError, load_settings

#: How the files of ``mappings/`` (and the other definitions shipped with the package) name
#: the two bases.
CANONICAL_SYMBOL = "$canonical"
IDENTIFIERS_SYMBOL = "$identifiers"
#: The bases a database held before they were configurable (fhir_kat up to issue 22).
LEGACY_CANONICAL_BASE = "https://fhir-kat.example.org/fhir"
LEGACY_IDENTIFIER_BASE = f"{LEGACY_CANONICAL_BASE}/sid"


@dataclass(frozen=True)
class Bases:
    canonical: str
    identifiers: str


def bases_of(settings: Settings) -> Bases:
    return Bases(settings.effective_canonical_base, settings.effective_identifier_base)


@cache
def process_bases() -> Bases:
    """The bases of this process: from the environment and ``FHIR_KAT_CONFIG``, read once."""
    return bases_of(load_settings())


def canonical_base() -> str:
    """``https://kat.example-ha.ca/fhir``: the base of every canonical URL of ours."""
    return process_bases().canonical


def identifier_base() -> str:
    """The base of the identifier systems this service assigns (``<base>/consents``, ...)."""
    return process_bases().identifiers


def expand(text: str) -> str:
    """``text`` with the symbolic bases replaced by this process's."""
    bases = process_bases()
    return text.replace(CANONICAL_SYMBOL, bases.canonical).replace(
        IDENTIFIERS_SYMBOL, bases.identifiers
    )


def read_definition(path: Path) -> str:
    """A definition file of ``mappings/`` as text, its symbolic bases expanded."""
    return expand(path.read_text(encoding="utf-8"))


def check_settings(settings: Settings) -> None:
    """Settings handed to ``create_app`` must not name other bases than the process runs
    with: module constants and loaded mappings already carry the process's. (Settings built
    by hand that name none run with the process's.)"""
    current = process_bases()
    named = [
        (value, own)
        for value, own in (
            (settings.canonical_base, current.canonical),
            (settings.identifier_base, current.identifiers),
        )
        if value and value != own
    ]
    if named:
        raise SettingsError(
            "invalid settings:\n  canonical_base/identifier_base "
            f"({', '.join(v for v, _ in named)}) differ from the ones this process was "
            f"started with ({', '.join(o for _, o in named)}): set them in the environment "
            "(FHIR_KAT_CANONICAL_BASE, FHIR_KAT_IDENTIFIER_BASE) or the FHIR_KAT_CONFIG "
            "file, which every part of the process reads"
        )


def refusal(recorded: Bases) -> str | None:
    """Why this process must not open a database written under ``recorded``, or None."""
    current = process_bases()
    if recorded == current:
        return None
    return (
        f"this database was written with canonical base {recorded.canonical} and identifier "
        f"base {recorded.identifiers}, but the service is configured with {current.canonical} "
        f"and {current.identifiers}. Its CodeSystems, identifiers and the ids derived from "
        "them (one PHN, one Patient; a re-sent referral, the same Task) depend on them: "
        "changing the base would store second copies and break every reference partners hold. "
        f"Set FHIR_KAT_CANONICAL_BASE={recorded.canonical} and "
        f"FHIR_KAT_IDENTIFIER_BASE={recorded.identifiers} (or [service] canonical_base / "
        "identifier_base in the FHIR_KAT_CONFIG file) to keep serving this database "
        "(ADR 0021)."
    )


__all__ = [
    "CANONICAL_SYMBOL",
    "IDENTIFIERS_SYMBOL",
    "LEGACY_CANONICAL_BASE",
    "LEGACY_IDENTIFIER_BASE",
    "Bases",
    "bases_of",
    "canonical_base",
    "check_settings",
    "expand",
    "identifier_base",
    "process_bases",
    "read_definition",
    "refusal",
]
