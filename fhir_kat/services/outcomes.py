"""``$evaluate-measure`` for the program-outcome Measure, and keeping the shipped Measure stored.

Owns: reading total-score Observations (status final/amended/corrected, effective in the period,
optionally only a cohort Group's members) and handing them to ``instruments.outcomes``. The
report is aggregate (counts and means, never a person's data): it counts every participant,
and what leaves the program has its small cells withheld (``security.disclosure``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fhir_kat.errors import BadRequest, NotFound, issue
from fhir_kat.instruments.definitions import Catalogue
from fhir_kat.instruments.outcomes import (
    MEASURE_ID,
    Fold,
    GroupResult,
    ScorePoint,
    evaluate_fold,
    measure_report,
    measure_resource,
)
from fhir_kat.search import parse_date_range, split_reference
from fhir_kat.security.disclosure import suppress_small_cells
from fhir_kat.security.policy import OUTSIDE_PROGRAM
from fhir_kat.services.access import Access
from fhir_kat.store import Store, Tx
from fhir_kat.store.observations import observation_values
from fhir_kat.store.store import format_instant

FINAL = ("final", "amended", "corrected")
#: Cohorts up to this size are filtered in SQL (an IN list); larger ones while reading.
MEMBERS_IN_SQL = 500


class OutcomeService:
    def __init__(
        self,
        store: Store,
        catalogue: Catalogue,
        clock: Callable[[], datetime],
        min_cell_size: int = 1,
    ) -> None:
        self.store = store
        self.catalogue = catalogue
        self.clock = clock
        self.min_cell_size = min_cell_size

    def install_measure(self) -> None:
        """Store the Measure generated from the definitions (a new version only on change)."""
        resource = measure_resource(self.catalogue)
        with self.store.write() as tx:
            tx.lock("install-definitions")  # processes starting together take turns
            tx.put(resource, current=tx.get("Measure", MEASURE_ID), skip_if_unchanged=True)

    def results(
        self,
        period_start: str,
        period_end: str,
        subject: str | None,
        access: Access | None = None,
    ) -> list[GroupResult]:
        """One result per instrument for the period (and the cohort Group, if given: one
        ``access`` may see, else 404). The figures are over every member of the cohort: the
        aggregate is the program's, protected by ``suppress_small_cells`` where it leaves."""
        start = parse_date_range(period_start)
        end = parse_date_range(period_end)
        problems = []
        if start is None:
            problems.append(issue("required", "periodStart must be a date", "periodStart"))
        if end is None:
            problems.append(issue("required", "periodEnd must be a date", "periodEnd"))
        if problems or start is None or end is None:
            raise BadRequest(problems)
        with self.store.read(viewer=access) as tx:
            members = self._members(tx, subject) if subject else None
            folds = self._folds(tx, start[0], end[1], members)
        return [
            evaluate_fold(inst, folds[inst.key]) for inst in self.catalogue.instruments.values()
        ]

    def evaluate_measure(
        self,
        measure_id: str,
        period_start: str | None,
        period_end: str | None,
        subject: str | None,
        access: Access | None = None,
    ) -> dict[str, Any]:
        """The summary MeasureReport; for a caller outside the program with its small cells
        withheld (``min_cell_size``)."""
        if measure_id != MEASURE_ID:
            raise NotFound(issue("not-found", "only Measure/kat-program-outcomes is evaluated"))
        start, end = period_start or "", period_end or ""
        report: dict[str, Any] = measure_report(
            self.results(start, end, subject, access),
            period_start=start,
            period_end=end,
            date=format_instant(self.clock()),
            subject=subject,
        )
        if access is not None and access.role in OUTSIDE_PROGRAM:
            report = suppress_small_cells(report, self.min_cell_size)
        report["id"] = str(uuid.uuid4())
        return report

    def _members(self, tx: Tx, subject: str) -> set[str]:
        target = split_reference(subject)
        if target is None or target[0] != "Group":
            raise BadRequest(issue("value", "subject must be Group/<id>", "subject"))
        if tx.get(*target) is None:  # the caller's view: a Group it may not see is unknown
            raise NotFound(issue("not-found", "no such Group", "subject"))
        group = tx.system.get(*target)  # the cohort itself: every member counts
        if group is None or group.deleted:
            raise NotFound(issue("not-found", "no such Group", "subject"))
        return {
            m["entity"]["reference"].split("/", 1)[1]
            for m in group.json().get("member", [])
            if m.get("entity", {}).get("reference", "").startswith("Patient/")
            and not m.get("inactive", False)
        }

    def _folds(
        self, tx: Tx, low: datetime, high: datetime, members: set[str] | None
    ) -> dict[str, Fold]:
        """Each instrument's baseline and post per participant, from its total scores in the
        period, fed in write order.

        One scan of the ``observation_values`` covering rows (``store/observations.py``: one
        narrow row per current Observation with a code, status, effectiveDateTime and value,
        written with its index rows), every instrument at once, never parsing a stored
        resource. The scores are those of the search ``Observation?code=…&status=final,
        amended,corrected&date=ge…&date=le…`` restricted to effectiveDateTime, valued by
        ``valueQuantity.value`` or ``valueInteger`` — tests/test_measure_values.py and
        tests/test_store_performance_paths.py compare the MeasureReport with a reading of the
        stored JSON through that search, on generated cohorts full of edge cases."""
        instruments = list(self.catalogue.instruments.values())
        folds = {inst.key: Fold() for inst in instruments}
        by_code: dict[tuple[str, str], list[Fold]] = {}
        for inst in instruments:
            by_code.setdefault((inst.total["system"], inst.total["code"]), []).append(
                folds[inst.key]
            )
        in_sql = members if members is not None and len(members) <= MEMBERS_IN_SQL else None
        rows = observation_values(tx, list(by_code), FINAL, low, high, patients=in_sql)
        for code, patient, when, value in rows:
            if members is not None and patient not in members:
                continue
            point = ScorePoint(patient, when, value)
            for fold in by_code[code]:
                fold.add(point)
        return folds
