"""The fhir-kat command line: validate, outcomes (table + SVG chart), help texts, exit codes."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
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
                    "derivedFrom": [{"reference": f"QuestionnaireResponse/{pid}-{when}"}],
                },
            )
    program = {"start": "2026-01-12", "end": "2026-03-30"}  # 12 weeks
    service.update(
        "Group",
        "cohort",
        {
            "resourceType": "Group",
            "id": "cohort",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{p}"}, "period": program} for p in "abc"],
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


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json"))}


def test_generate_writes_byte_identical_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--participants", "9", "--seed", "5", "--out"]
    assert main([*args, str(tmp_path / "a")]) == 0
    assert main([*args, str(tmp_path / "b")]) == 0
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second and len(first) > 9 * 5
    manifest = json.loads(first["manifest.json"])
    assert manifest["participants"] == 9 and set(manifest["cohorts"]) == {"1", "2", "3"}
    assert manifest["send_order"][0]["kind"] == "referrals"
    assert all((tmp_path / "a" / e["file"]).exists() for e in manifest["send_order"])
    assert "wrote" in capsys.readouterr().out
    # A folder in the way is a usage error, unless --force.
    assert main([*args, str(tmp_path / "a")]) == 2
    assert main([*args, str(tmp_path / "a"), "--force"]) == 0
    assert _tree(tmp_path / "a") == second
    assert main(["generate", "--participants", "0", "--out", str(tmp_path / "c")]) == 2


def test_demo_runs_a_program_through_the_http_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fhir_kat.instruments.chart import outcome_table
    from fhir_kat.instruments.definitions import load_catalogue
    from fhir_kat.services.outcomes import OutcomeService
    from fhir_kat.store import Store

    # The demo ignores the environment's database: it must never write to a configured one.
    monkeypatch.setenv("FHIR_KAT_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/x")
    data_dir = tmp_path / "demo"
    chart = tmp_path / "chart.svg"
    code = main(
        [
            "demo",
            "--participants",
            "4",
            "--seed",
            "2",
            "--data-dir",
            str(data_dir),
            "--chart",
            str(chart),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "sending artifacts" in out.err and "all cohorts" in out.out
    assert "FHIR resources: Patient: 4," in out.err  # one Patient per referral, via search
    assert ET.fromstring(chart.read_text()).tag.endswith("svg")  # noqa: S314 (our own output)
    # The table printed from $evaluate-measure over HTTP equals the service's own arithmetic
    # over the demo's database.
    first_line = out.out.splitlines()[0]
    period = first_line.rsplit("period ", 1)[1].split(" to ")
    store = Store(f"sqlite:///{data_dir / 'fhir_kat.sqlite3'}")
    try:
        results = OutcomeService(store, load_catalogue({}), datetime.now).results(
            period[0], period[1], None
        )
    finally:
        store.dispose()
    assert outcome_table(results) in out.out
    assert sum(r.initial_population for r in results) > 0
    # A second run on the same folder is refused instead of mixing two programs.
    assert main(["demo", "--participants", "3", "--data-dir", str(data_dir)]) == 2


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_is_a_bar_on_a_terminal_and_tenths_otherwise() -> None:
    from fhir_kat.cli import Progress

    bar = _Stream(tty=True)
    progress = Progress(4, "sending", bar)
    for _ in range(4):
        progress.advance(note="referrals")
    progress.finish()
    assert bar.getvalue().count("\r") == 4
    assert "[" + "#" * 30 + "] 4/4 referrals\n" in bar.getvalue()

    log = _Stream(tty=False)
    progress = Progress(100, "sending", log)
    for _ in range(100):
        progress.advance()
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1] == "sending: 100/100"  # 1, 10, 20, … 100
    assert "\r" not in log.getvalue()


def test_demo_renews_an_expired_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A long demo outlives its 300 s token: a 401 gets a new token and the same request again.
    Played here by handing out an unusable token first."""
    from fhir_kat import cli

    real = cli._TokenCache.__call__
    handed: list[bool] = []

    def first_one_stale(self: cli._TokenCache, renew: bool) -> str:
        handed.append(renew)
        return "stale" if len(handed) == 1 else real(self, renew)

    monkeypatch.setattr(cli._TokenCache, "__call__", first_one_stale)
    assert main(["demo", "--participants", "1", "--data-dir", str(tmp_path / "d")]) == 0, (
        capsys.readouterr().err
    )
    assert handed[:2] == [False, True]


def test_deliveries_command_lists_counts_retries_and_cancels(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fhir_kat.exchange import outbox
    from fhir_kat.store import Store

    store = Store(database_url)
    store.create_schema()
    with store.write() as tx:
        first = outbox.enqueue(tx, "ha-ehr", "bundle", {"resourceType": "Bundle"}, "p1")
        second = outbox.enqueue(tx, "ha-ehr", "bundle", {"resourceType": "Bundle"}, "p2")
    claimed = {d.id: d for d in outbox.claim(store, "w1", 10)}
    assert outbox.mark_dead(store, claimed[first], "refused by the partner")
    assert outbox.release(store, claimed[second], datetime.now(UTC))
    store.dispose()
    monkeypatch.setenv("FHIR_KAT_DATABASE_URL", database_url)

    assert main(["deliveries", "list", "--status", "dead", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["id"], d["status"]) for d in listed] == [(first, "dead")]
    assert all("payload" not in d for d in listed)  # payloads are PHI: never shown

    assert main(["deliveries", "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["dead"] == 1

    assert main(["deliveries", "retry", str(first)]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "pending"
    assert main(["deliveries", "cancel", str(second)]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    assert main(["deliveries", "cancel", str(second)]) == 1  # already final: 409
    assert main(["deliveries", "retry", "999999"]) == 1  # unknown
    assert main(["deliveries", "retry"]) == 2  # no id
    assert "needs a delivery id" in capsys.readouterr().err

    # A dead delivery a later one of the same patient superseded stays dead unless forced.
    store = Store(database_url)
    with store.write() as tx:
        older = outbox.enqueue(tx, "ha-ehr", "bundle", {"resourceType": "Bundle"}, "p3")
        newer = outbox.enqueue(tx, "ha-ehr", "bundle", {"resourceType": "Bundle"}, "p3")
    (claimed,) = [d for d in outbox.claim(store, "w1", 10) if d.id == older]
    assert outbox.mark_dead(store, claimed, "refused by the partner")
    (claimed,) = [d for d in outbox.claim(store, "w1", 10) if d.id == newer]
    assert outbox.mark_delivered(store, claimed)
    store.dispose()
    capsys.readouterr()
    assert main(["deliveries", "retry-dead"]) == 1
    err = capsys.readouterr().err
    assert f"left dead: {older}" in err and "--force" in err
    assert main(["deliveries", "retry", str(older)]) == 1  # 409: superseded
    assert main(["deliveries", "retry-dead", "--force"]) == 0
    assert "1 dead deliveries queued again" in capsys.readouterr().err
