"""``$evaluate-measure`` for the program-outcome Measure, and keeping the shipped Measure stored.

Owns: reading total-score Observations (status final/amended/corrected, effective in the period,
optionally only a cohort Group's members) and handing them to ``instruments.outcomes``. The
report is aggregate, so consent filtering does not apply (issue: "aggregate MeasureReports
always"); it discloses counts and means only.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime

from fhir_kat.errors import BadRequest, NotFound, issue
from fhir_kat.instruments.definitions import Catalogue, Instrument
from fhir_kat.instruments.outcomes import (
    MEASURE_ID,
    GroupResult,
    ScorePoint,
    evaluate,
    measure_report,
    measure_resource,
)
from fhir_kat.search import parse_date_range, split_reference
from fhir_kat.store import Store, Tx
from fhir_kat.store.store import format_instant

FINAL = ("final", "amended", "corrected")
#: Cohorts up to this size are filtered in SQL (an IN list); larger ones while reading.
MEMBERS_IN_SQL = 500


class OutcomeService:
    def __init__(self, store: Store, catalogue: Catalogue, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.catalogue = catalogue
        self.clock = clock

    def install_measure(self) -> None:
        """Store the Measure generated from the definitions (a new version only on change)."""
        resource = measure_resource(self.catalogue)
        with self.store.write() as tx:
            tx.lock("install-definitions")  # processes starting together take turns
            tx.put(resource, current=tx.get("Measure", MEASURE_ID), skip_if_unchanged=True)

    def results(self, period_start: str, period_end: str, subject: str | None) -> list[GroupResult]:
        """One result per instrument for the period (and the cohort Group, if given)."""
        start = parse_date_range(period_start)
        end = parse_date_range(period_end)
        problems = []
        if start is None:
            problems.append(issue("required", "periodStart must be a date", "periodStart"))
        if end is None:
            problems.append(issue("required", "periodEnd must be a date", "periodEnd"))
        if problems or start is None or end is None:
            raise BadRequest(problems)
        with self.store.read() as tx:
            members = self._members(tx, subject) if subject else None
            return [
                evaluate(inst, self._points(tx, inst, start[0], end[1], members))
                for inst in self.catalogue.instruments.values()
            ]

    def evaluate_measure(
        self,
        measure_id: str,
        period_start: str | None,
        period_end: str | None,
        subject: str | None,
    ) -> dict[str, object]:
        if measure_id != MEASURE_ID:
            raise NotFound(issue("not-found", "only Measure/kat-program-outcomes is evaluated"))
        start, end = period_start or "", period_end or ""
        report = measure_report(
            self.results(start, end, subject),
            period_start=start,
            period_end=end,
            date=format_instant(self.clock()),
            subject=subject,
        )
        report["id"] = str(uuid.uuid4())
        return report

    def _members(self, tx: Tx, subject: str) -> set[str]:
        target = split_reference(subject)
        if target is None or target[0] != "Group":
            raise BadRequest(issue("value", "subject must be Group/<id>", "subject"))
        group = tx.get(*target)
        if group is None or group.deleted:
            raise NotFound(issue("not-found", "no such Group", "subject"))
        return {
            m["entity"]["reference"].split("/", 1)[1]
            for m in group.json().get("member", [])
            if m.get("entity", {}).get("reference", "").startswith("Patient/")
            and not m.get("inactive", False)
        }

    def _points(
        self, tx: Tx, inst: Instrument, low: datetime, high: datetime, members: set[str] | None
    ) -> Iterator[ScorePoint]:
        """The instrument's total scores in the period, in write order.

        One pass: the code index drives a single streamed join (``Tx.by_token``); status and
        effective date are checked on the JSON parsed anyway for the score. The result is the
        same as the search ``Observation?code=…&status=final,amended,corrected&date=ge…&date=
        le…`` (the ``date`` parameter indexes the same ``parse_date_range`` of
        ``effectiveDateTime``) — tests/test_outcomes.py compares both on a generated cohort —
        but costs O(n) instead of re-evaluating four index sub-queries per batch."""
        in_sql = members if members is not None and len(members) <= MEMBERS_IN_SQL else None
        rows = tx.by_token(
            "Observation", "code", inst.total["system"], inst.total["code"], patients=in_sql
        )
        loads = json.loads
        for _, content, patient in rows:
            if members is not None and patient not in members:
                continue
            obs = loads(content)
            if obs.get("status") not in FINAL:
                continue
            value = obs.get("valueQuantity", {}).get("value", obs.get("valueInteger"))
            when = obs.get("effectiveDateTime")
            parsed = parse_date_range(when) if isinstance(when, str) else None
            if value is None or parsed is None:
                continue
            if parsed[1] < low or parsed[0] > high:  # date=ge<low> & date=le<high>
                continue
            yield ScorePoint(patient, parsed[0], float(value))
