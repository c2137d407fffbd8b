"""What a caller may read, in the form the store enforces it.

Owns: ``ReadScope`` (the rows of one resource type a caller may see) and the ``Viewer``
protocol a transaction opened for a caller asks. Must not: decide anything — who may see what
is decided once per request in ``fhir_kat.services.access`` (role × scopes × organisation ×
consent); the store only applies the answer to every row it returns, counts or matches, so no
read path can show more than another (docs/security.md, "One visibility rule").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fhir_kat.store.store import StoredResource, Tx


@dataclass(frozen=True)
class PatientSlice:
    """The part of one patient's data a narrowed consent opens: specific resources
    (``provision.data`` with meaning ``instance``) and/or resources last written within a
    period (``provision.dataPeriod``). Both empty: nothing."""

    references: frozenset[str] = frozenset()  # "Type/id"
    #: (start, end) in naive UTC, either open; a resource is inside when every range of its
    #: ``period_param`` date lies within one of them.
    periods: tuple[tuple[datetime | None, datetime | None], ...] = ()
    #: The date search parameter that says when this type's data happened (None: the type
    #: has none, so no period opens it).
    period_param: str | None = None


@dataclass(frozen=True)
class ReadScope:
    """The rows of one resource type a caller may see. Every restriction holds at once."""

    #: False: none at all (the role or the scopes do not allow reading the type).
    readable: bool = True
    #: Patient data only of these patients (None: any patient's); rows outside any patient's
    #: compartment are not restricted by it.
    patients: frozenset[str] | None = None
    #: Patients of whom only a slice is visible (a narrowed consent), beside ``patients``.
    slices: Mapping[str, PatientSlice] = field(default_factory=dict)
    #: Only these ids (None: any).
    ids: frozenset[str] | None = None
    #: Only resources whose reference parameter ``owned_by[0]`` points at one of
    #: ``owned_by[1]`` ((type, id) pairs): a referrer's own referrals.
    owned_by: tuple[str, tuple[tuple[str, str], ...]] | None = None
    #: The viewer reshapes rows of this type (``Viewer.shape``): every row passes through it.
    shaped: bool = False

    @property
    def unrestricted(self) -> bool:
        return (
            self.readable
            and self.patients is None
            and self.ids is None
            and not self.owned_by
            and not self.shaped
        )


EVERYTHING = ReadScope()
NOTHING = ReadScope(readable=False)


class Viewer(Protocol):
    """The caller a transaction was opened for (``Store.read(viewer=…)``)."""

    def scope(self, tx: Tx, rtype: str) -> ReadScope:
        """What of ``rtype`` the caller may see; ``tx`` is the unrestricted transaction."""
        ...

    def reads(self, rtype: str) -> bool:
        """Whether the caller may read ``rtype`` at all (its role and scopes, no data): the
        store moves the audit journal before a caller who may read AuditEvents reads."""
        ...

    def shape(self, tx: Tx, stored: StoredResource) -> StoredResource:
        """``stored`` as this caller may see it (e.g. a Group without the members it may not
        see); ``stored`` itself when nothing is withheld."""
        ...
