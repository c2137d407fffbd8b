"""``$evaluate-measure`` for the program-outcome Measure, and keeping the shipped Measure stored.

Owns: each participant's program timeline (``timelines``: the cohort Group's ``member.period``,
else the referral Task's ``executionPeriod``; completed, or dropped out when the Task ended
cancelled or failed), reading the total-score Observations derived from QuestionnaireResponses
(status final/amended/corrected) around the timelines of the participants whose program ended
in the period (optionally only a cohort Group's members), and handing both to
``instruments.outcomes``. The report is aggregate (counts and means, never a person's data): it
counts every participant, and what leaves the program has its small cells withheld
(``security.disclosure``), in each stratum too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any

from fhir_kat.errors import BadRequest, NotFound, issue
from fhir_kat.instruments.definitions import Catalogue
from fhir_kat.instruments.outcomes import (
    MEASURE_ID,
    Fold,
    GroupResult,
    ScorePoint,
    Timeline,
    counted,
    evaluate_fold,
    measure_report,
    measure_resource,
    read_range,
    windows,
)
from fhir_kat.search import Criterion, SearchQuery, parse_date_range, split_reference
from fhir_kat.security.disclosure import suppress_small_cells
from fhir_kat.security.policy import OUTSIDE_PROGRAM
from fhir_kat.services.access import Access
from fhir_kat.store import Store, Tx
from fhir_kat.store.observations import observation_values
from fhir_kat.store.store import format_instant

FINAL = ("final", "amended", "corrected")
TASK_CODES = "http://hl7.org/fhir/CodeSystem/task-code"
#: Referral Task statuses that end the program: completed, or dropped out.
ENDED = {"completed": True, "cancelled": False, "failed": False}
#: Cohorts up to this size are filtered in SQL (an IN list); larger ones while reading.
MEMBERS_IN_SQL = 500
Range = tuple[datetime, datetime]


def _range(value: object) -> Range | None:
    return _parsed(value) if isinstance(value, str) and value else None


@lru_cache(maxsize=4096)
def _parsed(value: str) -> Range | None:
    """Program dates repeat (a cohort shares its start and end): parsed once each."""
    return parse_date_range(value)


def _later(end: Range | None, than: Range | None) -> bool:
    """Does ``end`` replace ``than`` (an ended program over an ongoing one, a later end)?"""
    return end is not None and (than is None or end > than)


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
            tx.put(resource, current=tx.get("Measure", MEASURE_ID))

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
        rules = self.catalogue.measure
        with self.store.read(viewer=access) as tx:
            members = self._members(tx, subject) if subject else None
            # The program's timelines, whoever asks: the figures are the program's aggregate.
            lines = counted(self.timelines(tx.system, members), start[0], end[1])
            span = read_range(lines.values(), rules)
            folds = (
                self._folds(tx, span[0], span[1], lines)
                if span is not None
                else {inst.key: Fold(lines, rules) for inst in self.catalogue.instruments.values()}
            )
        return [
            evaluate_fold(inst, folds[inst.key], lines, rules)
            for inst in self.catalogue.instruments.values()
        ]

    def timelines(self, tx: Tx, members: set[str] | None = None) -> dict[str, Timeline]:
        """Each participant's program. Start and end: the cohort Group's ``member.period``
        where one is recorded, else the referral Task's ``executionPeriod`` (the workflow sets
        it at the first KaT session and at program end; a Task that ended without one ends at
        its last update). Completed or dropped out: the referral Task's end status (completed;
        cancelled or failed), else — no ended Task — the Group membership (inactive = dropped
        out). No end: ongoing, not counted."""
        tasks: dict[str, tuple[Range | None, Range | None, bool | None]] = {}
        task_query = SearchQuery(
            "Task", criteria=(Criterion("code", "token", "", ((TASK_CODES, "fulfill", True),), ""),)
        )
        in_sql = members if members is not None and len(members) <= MEMBERS_IN_SQL else None
        for batch in tx.scan_batches(task_query, batch=2000, patients=in_sql):
            for _, content, patient in batch:
                if patient is None or (members is not None and patient not in members):
                    continue
                task = json.loads(content)
                status = str(task.get("status", ""))
                period = task.get("executionPeriod") or {}
                start = _range(period.get("start"))
                end = (
                    _range(period.get("end") or task.get("meta", {}).get("lastUpdated"))
                    if status in ENDED
                    else None
                )
                previous = tasks.get(patient)
                if previous is None or _later(end, previous[1]):
                    tasks[patient] = (start, end, ENDED.get(status))
        groups = self._group_periods(tx, members)
        found: dict[str, Timeline] = {}
        for patient in set(tasks) | set(groups):
            t_start, t_end, t_completed = tasks.get(patient, (None, None, None))
            g_start, g_end, g_inactive = groups.get(patient, (None, None, False))
            start = g_start or t_start
            if start is None:
                continue
            end = g_end or t_end
            completed = t_completed if t_completed is not None else not g_inactive
            found[patient] = Timeline(start, end, completed)
        return found

    def _group_periods(
        self, tx: Tx, members: set[str] | None
    ) -> dict[str, tuple[Range, Range | None, bool]]:
        """(start, end, inactive) of every Group member with a ``period.start`` (the latest
        ending membership when a participant is in several cohorts)."""
        out: dict[str, tuple[Range, Range | None, bool]] = {}
        for batch in tx.scan_batches(SearchQuery("Group"), batch=200):
            for _, content, _ in batch:
                for m in json.loads(content).get("member", []):
                    ref = m.get("entity", {}).get("reference", "")
                    if not ref.startswith("Patient/"):
                        continue
                    patient = ref.split("/", 1)[1]
                    if members is not None and patient not in members:
                        continue
                    period = m.get("period") or {}
                    start, end = _range(period.get("start")), _range(period.get("end"))
                    if start is None:
                        continue
                    previous = out.get(patient)
                    if previous is None or _later(end, previous[1]):
                        out[patient] = (start, end, bool(m.get("inactive", False)))
        return out

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
            report = suppress_small_strata(report, self.min_cell_size)
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
        # Inactive members too: a cohort's drop-outs are reported, as their own stratum.
        return {
            m["entity"]["reference"].split("/", 1)[1]
            for m in group.json().get("member", [])
            if m.get("entity", {}).get("reference", "").startswith("Patient/")
        }

    def _folds(
        self, tx: Tx, low: datetime, high: datetime, timelines: dict[str, Timeline]
    ) -> dict[str, Fold]:
        """Each instrument's baseline and post per participant of ``timelines``, from the total
        scores derived from responses between ``low`` and ``high``, fed in write order.

        One scan of the ``observation_values`` covering rows (``store/observations.py``: one
        narrow row per current Observation with a code, status, effectiveDateTime and value,
        written with its index rows), every instrument at once, never parsing a stored
        resource. The scores are those of the search ``Observation?code=…&status=final,
        amended,corrected&derived-from:missing=false&date=ge…&date=le…`` (derived from a
        QuestionnaireResponse) restricted to effectiveDateTime, valued by
        ``valueQuantity.value`` or ``valueInteger`` — tests/test_measure_values.py and
        tests/test_store_performance_paths.py compare the MeasureReport with a reading of the
        stored JSON through that search, on generated cohorts full of edge cases."""
        instruments = list(self.catalogue.instruments.values())
        shared = windows(timelines, self.catalogue.measure)
        folds = {
            inst.key: Fold(timelines, self.catalogue.measure, windows=shared)
            for inst in instruments
        }
        members = set(timelines)
        by_code: dict[tuple[str, str], list[Fold]] = {}
        for inst in instruments:
            by_code.setdefault((inst.total["system"], inst.total["code"]), []).append(
                folds[inst.key]
            )
        in_sql = members if len(members) <= MEMBERS_IN_SQL else None
        rows = observation_values(tx, list(by_code), FINAL, low, high, patients=in_sql)
        for code, patient, when, value in rows:
            if patient not in members:
                continue
            point = ScorePoint(patient, when, value)
            for fold in by_code[code]:
                fold.add(point)
        return folds


def suppress_small_strata(report: dict[str, Any], min_cell: int) -> dict[str, Any]:
    """The strata of each group with their small cells withheld as ``suppress_small_cells``
    withholds a group's, and a population withheld in one stratum withheld in every stratum of
    its stratifier (the headline and one stratum would otherwise give the other by
    difference)."""
    if min_cell <= 1:
        return report
    for group in report.get("group", []):
        for stratifier in group.get("stratifier", []):
            strata = stratifier.get("stratum", [])
            guarded = suppress_small_cells({"group": strata}, min_cell)["group"]
            masked = {
                _population_code(p)
                for s in guarded
                for p in s.get("population", [])
                if "count" not in p
            }
            for stratum in guarded:
                for population in stratum.get("population", []):
                    if _population_code(population) in masked and "count" in population:
                        population.pop("count")
                        population["extension"] = [
                            *population.get("extension", []),
                            {
                                "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                "valueCode": "masked",
                            },
                        ]
                if masked & {"numerator", "denominator"}:
                    stratum.pop("measureScore", None)
            stratifier["stratum"] = guarded
    return report


def _population_code(population: dict[str, Any]) -> str:
    return next((str(c.get("code")) for c in population.get("code", {}).get("coding", [])), "")
