"""The fhir-kat command line: validate, outcomes (table + SVG chart), help texts, exit codes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fhir_kat.app import create_app
from fhir_kat.cli import build_parser, main
from fhir_kat.settings import load_settings


def test_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"resourceType": "Patient", "gender": "female"}))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [
                    {"resource": {"resourceType": "Task", "status": "bogus", "intent": "order"}}
                ],
            }
        )
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad), str(broken)]) == 1
    out = capsys.readouterr()
    assert "good.json: ok" in out.out
    assert '"Bundle.entry[0].resource.status"' in out.err and "broken.json" in out.err


def test_outcomes_table_and_chart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'kat.sqlite3'}"
    app = create_app(load_settings({}, database_url=url, data_dir=str(tmp_path)))
    service = app.extensions["fhir_kat"].fhir
    for pid, (before, after) in {"a": (15, 6), "b": (12, 11), "c": (3, 2)}.items():
        service.update("Patient", pid, {"resourceType": "Patient", "id": pid})
        for when, score in (("2026-01-05", before), ("2026-04-05", after)):
            service.create(
                "Observation",
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
                    "subject": {"reference": f"Patient/{pid}"},
                    "effectiveDateTime": when,
                    "valueQuantity": {"value": score},
                },
            )
    app.extensions["fhir_kat"].store.dispose()
    monkeypatch.setenv("FHIR_KAT_DATABASE_URL", url)
    chart = tmp_path / "chart.svg"
    assert (
        main(["outcomes", "--start", "2026-01-01", "--end", "2026-12-31", "--chart", str(chart)])
        == 0
    )
    table = capsys.readouterr().out
    phq = next(line for line in table.splitlines() if line.startswith("PHQ-9"))
    assert phq.split()[1:5] == ["2", "2", "1", "50"]
    svg = ET.fromstring(chart.read_text())  # noqa: S314 (our own output)
    assert svg.tag.endswith("svg") and "PHQ-9 (n=2)" in chart.read_text()
    assert main(["outcomes", "--start", "nonsense", "--end", "2026"]) == 2


def test_every_command_has_help_with_an_example() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():  # type: ignore[union-attr]
        assert command.epilog and "Example" in command.epilog, name


def test_map_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "consents.json"
    assert main(["map", "consents", str(example)]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "transaction"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"source_id": "x"}))
    assert main(["map", "consents", str(bad)]) == 1
    assert "OperationOutcome" in capsys.readouterr().err
    assert main(["map", "unicorns", str(bad)]) == 2
