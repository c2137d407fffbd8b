"""The outcome measure read from the ``observation_values`` covering rows gives, byte for byte,
the MeasureReport of a straightforward reading of the stored JSON.

The reference below parses every current Observation, Task and Group and applies the measure's
definition directly (status final/amended/corrected, derived from a QuestionnaireResponse, a
Patient subject, the instrument's total code, ``effectiveDateTime``, ``valueQuantity.value``
else ``valueInteger``; each participant's program from the Group's ``member.period``, else the
referral Task's ``executionPeriod`` or last update; counted when the program ended in the
period; baseline = the latest response within 31 days before the start, post = the first
within 14 days after the end, of equal times the first written; completers headline, both
strata), on cohorts with every kind of write the covering rows must follow: bulk and single
creates, updates that move an Observation in or out of the measure or to another patient or
instrument, deletions, re-creation after a deletion, several versions in one transaction.
Also: existing databases get the rows at start-up, and ``value_rows`` on its own. No timings
here (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, false, func, select, update

from fhir_kat.instruments.definitions import Catalogue, load_catalogue
from fhir_kat.instruments.outcomes import Counts, GroupResult, measure_report
from fhir_kat.search import extract_index, index_fingerprint, parse_date_range, split_reference
from fhir_kat.services import outcomes
from fhir_kat.services.outcomes import FINAL, OutcomeService
from fhir_kat.store import Store
from fhir_kat.store import reindex as reindex_module
from fhir_kat.store.observations import observation_values as read_values
from fhir_kat.store.observations import value_rows
from fhir_kat.store.reindex import current_fingerprints, recorded_fingerprints, stale_types
from fhir_kat.store.schema import observation_values, resources, store_meta
from fhir_kat.store.store import patient_of
from tests.conftest import FakeClock
from tests.support.scores import set_score_value
from tests.support.store_dump import dump_tables

CATALOGUE = load_catalogue()
REPORT_DATE = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
PERIODS = [
    ("2026-01-01", "2026-12-31"),
    ("2026-01-10", "2026-04-10"),
    ("2026-02", "2026-02"),  # only the drop-outs' programs end in February
    ("2026-04-05", "2026-04-05"),  # one day: the completers' end
    ("2026-03", "2026-03"),  # nobody's
]
T0 = datetime(2026, 1, 10, 9, 30, tzinfo=UTC)
#: Programs start at noon UTC on T0's day: a score at T0 (09:30Z) is before it, the same wall
#: time at -08:00 (17:30Z) after it. Completers end on 04-05 (the +90-day scores are post),
#: drop-outs on 02-15 (the +45-day scores are post).
PROGRAM_START = "2026-01-10T12:00:00Z"
COMPLETED_END, DROPPED_END = "2026-04-05", "2026-02-15T00:00:00Z"
TASK = {"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}


def _when(rng: random.Random) -> str:
    moment = T0 + timedelta(days=rng.choice((-20, 0, 0, 0, 45, 45, 90, 90, 90, 90, 400)))
    shape = rng.random()
    if shape < 0.1:
        return moment.date().isoformat()
    if shape < 0.14:
        return moment.strftime("%Y-%m")
    if shape < 0.24:
        return moment.astimezone(UTC).isoformat().replace("+00:00", "-08:00")
    if shape < 0.28:
        return (moment + timedelta(milliseconds=rng.randrange(3))).isoformat()
    return moment.isoformat()  # many exact ties in time: write order decides


def _observation(rng: random.Random, rid: str, pid: str, key: str) -> dict[str, Any]:
    inst = CATALOGUE.instruments[key]
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": rng.choice((*FINAL, "final", "final", "preliminary", "entered-in-error")),
        "code": {"coding": [dict(inst.total)]},
        "subject": {"reference": f"Patient/{pid}"},
    }
    extra = rng.random()
    if extra < 0.05:  # two instruments' totals on one Observation: it counts for both
        other = rng.choice([i for i in CATALOGUE.instruments.values() if i.key != key])
        obs["code"]["coding"].append(dict(other.total))
    elif extra < 0.08:
        obs["code"] = {"coding": [{"system": "urn:other", "code": inst.total["code"]}]}
    elif extra < 0.1:
        obs["code"]["coding"].insert(0, {"system": "urn:local", "code": "total"})
    subject = rng.random()
    if subject < 0.04:
        del obs["subject"]
    elif subject < 0.07:
        obs["subject"] = {"reference": "Group/cohort"}
    elif subject < 0.1:
        obs["subject"] = {"reference": f"https://example.org/fhir/Patient/{pid}"}
    shape = rng.random()
    if shape < 0.04:
        obs["effectiveInstant"] = (T0 + timedelta(days=45)).isoformat()
    elif shape < 0.08:
        obs["effectivePeriod"] = {"start": T0.isoformat()}
    elif shape >= 0.1:  # else none at all
        obs["effectiveDateTime"] = _when(rng)
    score = rng.randint(int(inst.min), int(inst.max))
    set_score_value(obs, score, rng, none_above=0.96, offsets=(0, 0, 0.5, 0.25, 0.1, -score))
    if rng.random() < 0.9:  # else typed in by hand: never a program score
        kind = "QuestionnaireResponse" if rng.random() < 0.97 else "Observation"
        obs["derivedFrom"] = [{"reference": f"{kind}/q-{rid}"}]
    return obs


def _cohort(participants: int, seed: int) -> Iterator[dict[str, Any]]:
    """Patients with 0-4 scores per instrument (some with a baseline only, some with none),
    and a program each: in the cohort Group (completed, or inactive: dropped out), through a
    referral Task (completed, cancelled, in progress, or ended without an executionPeriod.end)
    or none."""
    rng = random.Random(seed)
    n = 0
    members = []
    for i in range(participants):
        pid = f"p{i}"
        yield {"resourceType": "Patient", "id": pid}
        how = rng.random()
        if how < 0.55:
            dropped = rng.random() < 0.25
            members.append(
                {
                    "entity": {"reference": f"Patient/{pid}"},
                    "period": {
                        "start": PROGRAM_START,
                        "end": DROPPED_END if dropped else COMPLETED_END,
                    },
                    **({"inactive": True} if dropped else {}),
                }
            )
        elif how < 0.95:
            status = rng.choice(("completed", "completed", "cancelled", "failed", "in-progress"))
            period = {"start": PROGRAM_START}
            if status != "in-progress" and rng.random() < 0.9:
                period["end"] = COMPLETED_END if status == "completed" else DROPPED_END
            yield {
                "resourceType": "Task",
                "id": f"t{i}",
                "status": status,
                "intent": "order",
                "code": {"coding": [dict(TASK)]},
                "for": {"reference": f"Patient/{pid}"},
                "executionPeriod": period,
            }
        for key in CATALOGUE.instruments:
            for _ in range(rng.choice((0, 1, 2, 2, 3, 3, 3, 4, 4))):
                n += 1
                yield _observation(rng, f"o{n}", pid, key)
    yield {
        "resourceType": "Group",
        "id": "program",
        "type": "person",
        "actual": True,
        "member": members,
    }


def _store(database_url: str, participants: int, seed: int) -> Store:
    """The cohort written every way the store writes, then edited every way that moves an
    Observation in or out of the measure."""
    rng = random.Random(seed + 1)
    store = Store(database_url, clock=FakeClock())
    store.create_schema()
    items = list(_cohort(participants, seed))
    half = len(items) // 2
    with store.write() as tx:
        tx.create_many(items[:half])
    for start in range(half, len(items), 25):
        with store.write() as tx:
            for item in items[start : start + 25]:
                tx.put(item, current=None)
    observations = [o["id"] for o in items if o["resourceType"] == "Observation"]
    totals = [inst.total for inst in CATALOGUE.instruments.values()]
    edits: list[Any] = [
        lambda o: o.pop("derivedFrom", None),
        lambda o: o.update(derivedFrom=[{"reference": "QuestionnaireResponse/later"}]),
        lambda o: o.update(status="entered-in-error"),
        lambda o: o.update(status="amended"),
        lambda o: o.update(status="corrected"),
        lambda o: o.update(status="preliminary"),
        lambda o: o.update(valueQuantity={"value": rng.randint(0, 27) + 0.5}),
        lambda o: (o.pop("valueQuantity", None), o.update(valueInteger=rng.randint(0, 27))),
        lambda o: o.pop("valueQuantity", None),
        lambda o: o.update(effectiveDateTime=_when(rng)),
        lambda o: o.update(effectiveDateTime="2031-01-01"),
        lambda o: o.update(effectivePeriod={"start": o.pop("effectiveDateTime", "2026-02-01")}),
        lambda o: o.update(subject={"reference": f"Patient/p{rng.randrange(participants)}"}),
        lambda o: o.pop("subject", None),
        lambda o: o.update(code={"coding": [dict(rng.choice(totals))]}),
    ]
    edited = rng.sample(observations, len(observations) // 3)
    for start in range(0, len(edited), 20):
        with store.write() as tx:
            for rid in edited[start : start + 20]:
                current = tx.get("Observation", rid)
                assert current is not None
                if rng.random() < 0.15:
                    tx.delete(current)
                    continue
                changed = current.json()
                rng.choice(edits)(changed)
                stored, _ = tx.put(changed, current=current)
                if rng.random() < 0.2:  # a second version in the same transaction
                    again = stored.json()
                    rng.choice(edits)(again)
                    tx.put(again, current=stored)
    with store.write() as tx:  # deleted, then created again under the same id
        deleted = [
            r.res_id
            for r in tx.conn.execute(
                select(resources.c.res_id).where(
                    resources.c.res_type == "Observation", resources.c.deleted.is_(True)
                )
            )
        ]
        for rid in deleted[:5]:
            current = tx.get("Observation", rid)
            assert current is not None
            tx.put(_observation(rng, rid, "p1", "phq9"), current=current)
    return store


def _day(text: Any) -> tuple[datetime, datetime] | None:
    return parse_date_range(text) if isinstance(text, str) and text else None


def _reference_timelines(
    docs: list[dict[str, Any]],
) -> dict[str, tuple[tuple[datetime, datetime], tuple[datetime, datetime] | None, bool]]:
    """(start, end, completed) per patient, read from the stored Tasks and Groups as the
    definition says (Group period first; the Task's end status decides completion)."""
    ended = {"completed": True, "cancelled": False, "failed": False}
    tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for doc in docs:
        if doc["resourceType"] == "Task":
            codes = [
                (c.get("system"), c.get("code")) for c in doc.get("code", {}).get("coding", [])
            ]
            ref = doc.get("for", {}).get("reference", "")
            if (TASK["system"], TASK["code"]) not in codes or not ref.startswith("Patient/"):
                continue
            status = doc.get("status")
            period = doc.get("executionPeriod", {})
            end = _day(period.get("end") or doc["meta"]["lastUpdated"]) if status in ended else None
            tasks[ref[8:]] = (_day(period.get("start")), end, ended.get(status))
        elif doc["resourceType"] == "Group":
            for m in doc.get("member", []):
                ref = m["entity"]["reference"]
                period = m.get("period", {})
                if ref.startswith("Patient/") and _day(period.get("start")):
                    groups[ref[8:]] = (
                        _day(period["start"]),
                        _day(period.get("end")),
                        m.get("inactive", False),
                    )
    out = {}
    for pid in set(tasks) | set(groups):
        t_start, t_end, t_done = tasks.get(pid, (None, None, None))
        g_start, g_end, g_inactive = groups.get(pid, (None, None, False))
        start = g_start or t_start
        if start is not None:
            out[pid] = (start, g_end or t_end, t_done if t_done is not None else not g_inactive)
    return out


def _reference_results(
    store: Store, catalogue: Catalogue, start: str, end: str, members: set[str] | None
) -> list[GroupResult]:
    """The measure's definition applied to every current resource's stored JSON."""
    low, high = parse_date_range(start), parse_date_range(end)
    assert low is not None and high is not None
    with store.read() as tx:
        rows = tx.conn.execute(
            select(resources.c.seq, resources.c.content)
            .where(
                resources.c.res_type.in_(["Observation", "Task", "Group"]),
                resources.c.deleted == false(),
            )
            .order_by(resources.c.seq)
        ).all()
    docs = [json.loads(content) for _, content in rows]
    timelines = {
        pid: line
        for pid, line in _reference_timelines(docs).items()
        if line[1] is not None
        and low[0] <= line[1][0] <= high[1]
        and (members is None or pid in members)
    }
    scores: dict[str, dict[str, list[tuple[datetime, float]]]] = {
        key: {} for key in catalogue.instruments
    }
    for obs in docs:
        if obs["resourceType"] != "Observation" or obs.get("status") not in FINAL:
            continue
        if not any(
            d.get("reference", "").startswith("QuestionnaireResponse/")
            for d in obs.get("derivedFrom", [])
        ):
            continue
        subject = split_reference(obs.get("subject", {}).get("reference", ""))
        if subject is None or subject[0] != "Patient" or subject[1] not in timelines:
            continue
        when = _day(obs.get("effectiveDateTime"))
        value = obs.get("valueQuantity", {}).get("value", obs.get("valueInteger"))
        if when is None or value is None:
            continue
        codings = {(c.get("system"), c.get("code")) for c in obs.get("code", {}).get("coding", [])}
        for key, inst in catalogue.instruments.items():
            if (inst.total["system"], inst.total["code"]) in codings:
                scores[key].setdefault(subject[1], []).append((when[0], float(value)))
    rules = catalogue.measure
    results = []
    for key, inst in catalogue.instruments.items():
        tallies = {"completed": [0, 0, 0, 0.0, 0.0], "dropped-out": [0, 0, 0, 0.0, 0.0]}
        for pid in sorted(timelines):
            (s_low, s_high), (e_low, e_high), completed = timelines[pid]
            points = scores[key].get(pid, [])  # in write order
            before = [p for p in points if s_low - timedelta(days=31) <= p[0] <= s_high]
            after = [p for p in points if e_low <= p[0] <= e_high + timedelta(days=14)]
            if not before:
                continue
            latest = max(p[0] for p in before)
            baseline = next(p for p in before if p[0] == latest)  # of equal times, the first
            if not inst.positive(baseline[1]):
                continue
            tally = tallies["completed" if completed else "dropped-out"]
            tally[0] += 1
            if not after:
                continue
            earliest = min(p[0] for p in after)
            post = next(p for p in after if p[0] == earliest)
            tally[1] += 1
            tally[3] += baseline[1]
            tally[4] += post[1]
            tally[2] += int(inst.improved(baseline[1], post[1]))

        def counts(t: list[Any]) -> Counts:
            d = t[1]
            return Counts(
                t[0], d, t[2], round(t[3] / d, 2) if d else None, round(t[4] / d, 2) if d else None
            )

        assert rules.population == "completers"
        head = counts(tallies["completed"])
        results.append(
            GroupResult(
                inst,
                head.initial_population,
                head.denominator,
                head.numerator,
                head.mean_baseline,
                head.mean_post,
                {name: counts(t) for name, t in tallies.items()},
            )
        )
    return results


def _reference_report(
    store: Store, start: str, end: str, subject: str | None, members: set[str] | None
) -> str:
    report = measure_report(
        _reference_results(store, CATALOGUE, start, end, members),
        period_start=start,
        period_end=end,
        date="2026-06-01T12:00:00.000Z",
        subject=subject,
    )
    return json.dumps(report)


def _service_report(store: Store, start: str, end: str, subject: str | None) -> str:
    service = OutcomeService(store, CATALOGUE, lambda: REPORT_DATE)
    report = service.evaluate_measure("kat-program-outcomes", start, end, subject)
    assert isinstance(report.pop("id"), str)
    return json.dumps(report)


@pytest.mark.parametrize("group", ["none", "small", "large"])
def test_measure_report_equals_the_reference_reading(
    database_url: str, group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if group == "large":  # a cohort too large for an IN list is filtered while reading
        monkeypatch.setattr(outcomes, "MEMBERS_IN_SQL", 5)
    store = _store(database_url, participants=90, seed=21)
    try:
        members = None
        subject = None
        if group != "none":
            members = {f"p{i}" for i in range(0, 90, 2)}
            with store.write() as tx:
                tx.put(
                    {
                        "resourceType": "Group",
                        "id": "cohort",
                        "type": "person",
                        "actual": True,
                        "member": [
                            *({"entity": {"reference": f"Patient/{m}"}} for m in sorted(members)),
                            {"entity": {"reference": "Patient/p1"}, "inactive": True},
                        ],
                    },
                    current=None,
                )
            members.add("p1")  # an inactive member is in the cohort: a drop-out, reported
            subject = "Group/cohort"
        with store.read() as tx:
            stored = tx.conn.execute(select(func.count()).select_from(observation_values))
            assert stored.scalar_one() > 100
        for start, end in PERIODS:
            got = _service_report(store, start, end, subject)
            assert got == _reference_report(store, start, end, subject, members), (start, end)
        # The cohort exercises the arithmetic: people in every population, and some left out.
        full = json.loads(_service_report(store, *PERIODS[0], subject))
        counts = [p["count"] for g in full["group"] for p in g["population"]]
        assert all(counts[i] > counts[i + 1] > 0 for i in range(0, len(counts), 3)), counts
        dropped = [
            p["count"]
            for g in full["group"]
            for st in g["stratifier"][0]["stratum"]
            if st["value"]["coding"][0]["code"] == "dropped-out"
            for p in st["population"]
        ]
        assert sum(dropped) > 0
    finally:
        store.drop_schema()
        store.dispose()


def test_rows_follow_every_write(database_url: str) -> None:
    """After the edits, the table holds exactly the rows a rebuild from the stored JSON makes."""
    store = _store(database_url, participants=40, seed=5)
    try:
        written = dump_tables(store)["observation_values"]
        with store.write() as tx:
            reindex_module.reindex(tx.conn, ["Observation"])
        assert dump_tables(store)["observation_values"] == written
        assert len(written) > 40
    finally:
        store.drop_schema()
        store.dispose()


def test_rows_written_in_the_same_transaction_are_read(database_url: str) -> None:
    store = Store(database_url, clock=FakeClock())
    store.create_schema()
    total = CATALOGUE.instruments["phq9"].total
    try:
        with store.write() as tx:
            tx.put(
                {
                    "resourceType": "Observation",
                    "id": "o1",
                    "status": "final",
                    "code": {"coding": [dict(total)]},
                    "subject": {"reference": "Patient/p"},
                    "effectiveDateTime": "2026-02-01",
                    "valueInteger": 12,
                    "derivedFrom": [{"reference": "QuestionnaireResponse/q"}],
                },
                current=None,
            )
            got = list(
                read_values(
                    tx,
                    [(total["system"], total["code"])],
                    FINAL,
                    datetime(2026, 1, 1),
                    datetime(2027, 1, 1),
                )
            )
        key = (total["system"], total["code"])
        assert got == [(key, "p", datetime(2026, 2, 1), 12.0)]
    finally:
        store.drop_schema()
        store.dispose()


def test_an_existing_database_gets_the_rows_at_start_up(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written before ``observation_values`` existed recorded Observation's bare
    index fingerprint: ``create_schema`` rebuilds Observation alone and fills the table."""
    store = _store(database_url, participants=30, seed=8)
    try:
        written = dump_tables(store)
        want = [_service_report(store, s, e, None) for s, e in PERIODS]
        with store.write() as tx:  # the database as the previous version left it
            tx.conn.execute(delete(observation_values))
            recorded = recorded_fingerprints(tx.conn)
            recorded["Observation"] = index_fingerprint("Observation")
            tx.conn.execute(
                update(store_meta)
                .values(value=json.dumps(recorded))
                .where(store_meta.c.name == "index")
            )
            assert stale_types(tx.conn) == ["Observation"]
        assert _service_report(store, *PERIODS[0], None) != want[0]
        calls: list[list[str]] = []
        original = reindex_module.reindex
        monkeypatch.setattr(
            reindex_module,
            "reindex",
            lambda conn, types, *a: (calls.append(list(types)), original(conn, types, *a))[1],
        )
        store.create_schema()
        assert calls == [["Observation"]]
        assert dump_tables(store) == written
        assert [_service_report(store, s, e, None) for s, e in PERIODS] == want
        with store.read() as tx:
            assert recorded_fingerprints(tx.conn) == current_fingerprints()
    finally:
        store.drop_schema()
        store.dispose()


def _rows(resource: dict[str, Any], seq: int = 7) -> list[dict[str, Any]]:
    index = extract_index(resource)
    return value_rows(
        resource["resourceType"],
        resource["id"],
        index,
        seq=seq,
        patient_id=patient_of(resource, index),
    )


def test_value_rows() -> None:
    total = dict(CATALOGUE.instruments["gad7"].total)
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "o",
        "status": "amended",
        "code": {"coding": [total, total, {"system": "urn:x", "code": "y"}]},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2026-02-01T10:00:00-08:00",
        "valueQuantity": {"value": 5.5, "unit": "{score}"},
        "valueInteger": 9,
        "derivedFrom": [{"reference": "QuestionnaireResponse/q"}],
    }
    rows = _rows(obs)
    assert [(r["system"], r["code"]) for r in rows] == [
        (total["system"], total["code"]),
        ("urn:x", "y"),
    ]
    assert rows[0] == {
        "res_type": "Observation",
        "res_id": "o",
        "system": total["system"],
        "code": total["code"],
        "seq": 7,
        "patient_id": "p",
        "status": "amended",
        "low": datetime(2026, 2, 1, 18, 0),
        "high": datetime(2026, 2, 1, 18, 0, 0, 999999),
        "value": 5.5,  # the quantity wins
    }
    assert _rows({**obs, "valueQuantity": {"unit": "{score}"}})[0]["value"] == 9.0
    for missing in ("status", "effectiveDateTime", "subject", "code", "derivedFrom"):
        assert _rows({k: v for k, v in obs.items() if k != missing}) == []
    # Derived from something else than a response: typed in, not a program score.
    assert _rows({**obs, "derivedFrom": [{"reference": "Observation/o2"}]}) == []
    assert _rows({k: v for k, v in obs.items() if not k.startswith("value")}) == []
    assert _rows({**obs, "subject": {"reference": "Group/g"}}) == []
    assert _rows({**obs, "effectiveDateTime": None, "effectivePeriod": {"start": "2026"}}) == []
    assert _rows({"resourceType": "Patient", "id": "p"}) == []
    # Codes equal once truncated as the token index stores them: one row (a primary key).
    long = [{"system": "urn:x", "code": "c" * 300 + tail} for tail in ("a", "b")]
    assert len(_rows({**obs, "code": {"coding": long}})) == 1


def test_truncated_codes_store_once(database_url: str) -> None:
    store = Store(database_url, clock=FakeClock())
    store.create_schema()
    try:
        with store.write() as tx:
            tx.put(
                {
                    "resourceType": "Observation",
                    "id": "long",
                    "status": "final",
                    "code": {"coding": [{"system": "urn:x", "code": "c" * 300 + t} for t in "ab"]},
                    "subject": {"reference": "Patient/p"},
                    "effectiveDateTime": "2026-02-01",
                    "valueInteger": 1,
                    "derivedFrom": [{"reference": "QuestionnaireResponse/q"}],
                },
                current=None,
            )
        with store.read() as tx:
            count = tx.conn.execute(select(func.count()).select_from(observation_values))
            assert count.scalar_one() == 1
    finally:
        store.drop_schema()
        store.dispose()
