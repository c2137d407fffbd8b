"""Instrument bands and the program-outcome measure: every band boundary, the improvement
definitions, and $evaluate-measure over a synthetic cohort whose true figures are known."""

from __future__ import annotations

import json
import random
from datetime import datetime
from typing import Any

import pytest
from flask import Flask

from fhir_kat.instruments.definitions import MeasureRules, load_catalogue
from fhir_kat.instruments.outcomes import Fold, ScorePoint, Timeline, evaluate_fold
from fhir_kat.search import parse_date_range
from fhir_kat.security.disclosure import suppress_small_cells
from fhir_kat.services.outcomes import suppress_small_strata
from tests.conftest import client_as

CAT = load_catalogue()


@pytest.mark.parametrize(
    ("key", "score", "band", "positive"),
    [
        ("phq9", 0, "minimal", False),
        ("phq9", 4, "minimal", False),
        ("phq9", 5, "mild", False),
        ("phq9", 9, "mild", False),
        ("phq9", 10, "moderate", True),
        ("phq9", 14, "moderate", True),
        ("phq9", 15, "moderately-severe", True),
        ("phq9", 19, "moderately-severe", True),
        ("phq9", 20, "severe", True),
        ("phq9", 27, "severe", True),
        ("gad7", 4, "minimal", False),
        ("gad7", 5, "mild", False),
        ("gad7", 9, "mild", False),
        ("gad7", 10, "moderate", True),
        ("gad7", 14, "moderate", True),
        ("gad7", 15, "severe", True),
        ("gad7", 21, "severe", True),
        ("pcl5", 32, "below-cutoff", False),
        ("pcl5", 33, "probable-ptsd", True),
        ("pcl5", 80, "probable-ptsd", True),
        ("bipf", 33.2, "below-threshold", False),
        ("bipf", 33.3, "impaired", True),
        ("bipf", 100, "impaired", True),
    ],
)
def test_band_boundaries(key: str, score: float, band: str, positive: bool) -> None:
    inst = CAT.instruments[key]
    assert inst.band(score).code == band and inst.positive(score) is positive


def test_improvement_definitions() -> None:
    phq = CAT.instruments["phq9"]
    assert phq.improved(14, 9)  # drop of 5
    assert phq.improved(10, 9)  # moderate -> mild: a milder band, only 1 point
    assert not phq.improved(14, 10)  # 4 points, same band
    pcl = CAT.instruments["pcl5"]
    assert pcl.improved(60, 32) and not pcl.improved(40, 33)
    bipf = CAT.instruments["bipf"]  # no milder category: crossing 33.3 % is not improvement
    assert not bipf.improved(35.7, 31.0) and bipf.improved(40.0, 35.0)


def test_cut_offs_are_configuration() -> None:
    cat = load_catalogue({"pcl5": {"positive_at": 31}})
    assert cat.instruments["pcl5"].positive(31) and not CAT.instruments["pcl5"].positive(31)
    with pytest.raises(ValueError, match="not overridable"):
        load_catalogue({"pcl5": {"bands": []}})
    with pytest.raises(ValueError, match="unknown instruments"):
        load_catalogue({"phq8": {"positive_at": 10}})


def _range(text: str) -> tuple[datetime, datetime]:
    found = parse_date_range(text)
    assert found is not None
    return found


def test_evaluate_on_the_program_timeline() -> None:
    rules = MeasureRules()  # 31 days before the start, 0-14 days after the end, completers
    t = {
        "2025-11": datetime(2025, 11, 1),
        "jan": datetime(2026, 1, 20),
        "mid": datetime(2026, 3, 1),
        "post": datetime(2026, 5, 1),
        "late": datetime(2026, 9, 1),
    }
    timeline = Timeline(_range("2026-02-02"), _range("2026-04-27"), completed=True)
    dropout = Timeline(_range("2026-02-02"), _range("2026-03-01"), completed=False)
    lines = {"a": timeline, "b": timeline, "c": timeline, "d": timeline, "e": dropout}
    fold = Fold(lines, rules)
    for p in [
        ScorePoint("a", t["jan"], 15),
        ScorePoint("a", t["mid"], 3),  # mid-program: neither baseline nor post
        ScorePoint("a", t["post"], 8),  # improved
        ScorePoint("a", t["late"], 20),  # a follow-up: not the post score
        ScorePoint("b", t["jan"], 12),
        ScorePoint("b", t["post"], 11),  # positive, not improved
        ScorePoint("c", t["2025-11"], 16),  # outside the baseline window: no baseline
        ScorePoint("c", t["post"], 1),
        ScorePoint("d", t["jan"], 4),  # negative at baseline
        ScorePoint("d", t["post"], 1),
        ScorePoint("e", t["jan"], 18),  # a drop-out who improved mid-program
        ScorePoint("e", datetime(2026, 2, 20), 2),
    ]:
        fold.add(p)
    r = evaluate_fold(CAT.instruments["phq9"], fold, lines, rules)
    assert (r.initial_population, r.denominator, r.numerator) == (2, 2, 1)
    assert r.score == 0.5 and r.mean_baseline == 13.5 and r.mean_post == 9.5
    assert r.strata["dropped-out"].initial_population == 1
    assert r.strata["dropped-out"].denominator == 0
    everyone = evaluate_fold(CAT.instruments["phq9"], fold, lines, MeasureRules(population="all"))
    assert everyone.initial_population == 3 and everyone.denominator == 2


def test_measure_rules_are_configuration() -> None:
    cat = load_catalogue(
        outcomes={"baseline_days_before_start": 60, "post_days_after_end": [7, 14]}
    )
    assert cat.measure == MeasureRules(60, (7, 14), "completers")
    for bad in (
        {"baseline_days_before_start": -1},
        {"post_days_after_end": [14, 7]},
        {"population": "everyone"},
        {"window": 3},
    ):
        with pytest.raises(ValueError, match=r"\[program.outcomes\]"):
            load_catalogue(outcomes=bad)


def _obs(pid: str, inst: str, when: str, score: float) -> dict[str, Any]:
    total = CAT.instruments[inst].total
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "survey",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": total["system"], "code": total["code"]}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": score, "unit": CAT.instruments[inst].unit},
        # Scores count only as the program's: derived from a QuestionnaireResponse.
        "derivedFrom": [{"reference": f"QuestionnaireResponse/{pid}-{inst}-{when}"}],
    }


def test_evaluate_measure_over_a_synthetic_cohort(app: Flask) -> None:
    """A reproducible cohort (seed 20260101) whose true figures the generator knows."""
    rng = random.Random(20260101)
    staff = client_as(app, "staff")
    truth = {k: {"initial": 0, "denominator": 0, "numerator": 0} for k in CAT.instruments}
    entries = []
    members = []
    for i in range(40):
        pid = f"syn-{i}"
        entries.append(
            {
                "resource": {"resourceType": "Patient", "id": pid},
                "request": {"method": "PUT", "url": f"Patient/{pid}"},
            }
        )
        if i % 4 != 3:
            members.append(pid)
        for key, inst in CAT.instruments.items():
            baseline = round(rng.uniform(inst.min, inst.max))
            has_post = rng.random() < 0.8
            post = round(min(inst.max, max(inst.min, baseline - rng.uniform(-3, 15))))
            entries.append(
                {
                    "resource": _obs(pid, key, "2026-01-10", baseline),
                    "request": {"method": "POST", "url": "Observation"},
                }
            )
            if has_post:
                entries.append(
                    {
                        "resource": _obs(pid, key, "2026-04-20", post),
                        "request": {"method": "POST", "url": "Observation"},
                    }
                )
            if i % 4 != 3 and inst.positive(baseline):
                truth[key]["initial"] += 1
                if has_post:
                    truth[key]["denominator"] += 1
                    truth[key]["numerator"] += int(inst.improved(baseline, post))
    entries.append(
        {
            "resource": _obs("syn-0", "phq9", "2025-06-01", 27),  # outside the period
            "request": {"method": "POST", "url": "Observation"},
        }
    )
    entries.append(
        {
            "resource": {
                "resourceType": "Group",
                "id": "cohort-1",
                "type": "person",
                "actual": True,
                # The program ran 2026-01-15 to 04-15: baselines (01-10) within a month
                # before, posts (04-20) within two weeks after.
                "member": [
                    {
                        "entity": {"reference": f"Patient/{m}"},
                        "period": {"start": "2026-01-15", "end": "2026-04-15"},
                    }
                    for m in members
                ],
            },
            "request": {"method": "PUT", "url": "Group/cohort-1"},
        }
    )
    r = staff.post(
        "/fhir",
        data=json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        content_type="application/fhir+json",
    )
    assert r.status_code == 200, r.data[:500]

    query = (
        "/fhir/Measure/kat-program-outcomes/$evaluate-measure?periodStart=2026-01-01"
        "&periodEnd=2026-12-31&subject=Group/cohort-1"
    )
    report = staff.get(query).get_json()
    # The health authority gets the same aggregate over every member (no consent needed for
    # counts), with its small cells withheld.
    seen_by_ha = client_as(app, "ha").get(query).get_json()
    min_cell = app.extensions["fhir_kat"].settings.min_cell_size
    expected_ha = suppress_small_strata(suppress_small_cells(report, min_cell), min_cell)
    for body in (seen_by_ha, expected_ha):
        body.pop("id"), body.pop("date")
    assert seen_by_ha == expected_ha
    assert report["resourceType"] == "MeasureReport" and report["type"] == "summary"
    by_code = {g["code"]["coding"][0]["code"]: g for g in report["group"]}
    for key, inst in CAT.instruments.items():
        group = by_code[inst.panel["code"]]
        counts = {p["code"]["coding"][0]["code"]: p["count"] for p in group["population"]}
        expected = truth[key]
        assert counts == {
            "initial-population": expected["initial"],
            "denominator": expected["denominator"],
            "numerator": expected["numerator"],
        }, key
        if expected["denominator"]:
            assert group["measureScore"]["value"] == round(
                expected["numerator"] / expected["denominator"], 4
            )
    post = staff.post(
        "/fhir/Measure/kat-program-outcomes/$evaluate-measure",
        data=json.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "periodStart", "valueDate": "2026-01-01"},
                    {"name": "periodEnd", "valueDate": "2026-12-31"},
                ],
            }
        ),
        content_type="application/fhir+json",
    )
    assert post.status_code == 200
    measure = staff.get("/fhir/Measure/kat-program-outcomes").get_json()
    assert len(measure["group"]) == 4 and "baseline" in measure["group"][0]["description"]


def test_evaluate_measure_refusals(app: Flask) -> None:
    ha = client_as(app, "ha")
    base = "/fhir/Measure/kat-program-outcomes/$evaluate-measure"
    assert ha.get(base).status_code == 400
    assert (
        ha.get(f"{base}?periodStart=2026-01-01&periodEnd=2026-12-31&subject=Patient/x").status_code
        == 400
    )
    assert (
        ha.get("/fhir/Measure/other/$evaluate-measure?periodStart=2026&periodEnd=2026").status_code
        == 404
    )
    assert (
        client_as(app, "referrer").get(f"{base}?periodStart=2026&periodEnd=2026").status_code == 403
    )
