"""The program's implementation guide as an NPM-format FHIR package (ADR 0022).

Owns: assembling every conformance resource the service defines — the profiles' Structure-
Definitions, the OperationDefinitions and SearchParameters of its own, the CodeSystems,
ValueSets (the triage criteria too), ConceptMaps, Questionnaires and the Measure, the
CapabilityStatement and an ImplementationGuide describing them, with one example per profile —
and writing them as ``package/`` (``package.json``, ``.index.json``, one file a resource,
``example/``) plus its ``.tgz``, and a documentation page per profile. The same resources are
served by ``/fhir/ImplementationGuide``, ``/fhir/StructureDefinition`` and friends.

Must not: invent content. Everything comes from the files of ``mappings/`` and the modules that
already serve it; the snapshot of a StructureDefinition is computed only from the R4 base
definitions it is given (``--core``), never approximated.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fhir_kat import __version__
from fhir_kat.canonical import read_definition
from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.instruments.outcomes import measure_resource
from fhir_kat.mapping.functions import all_questionnaires
from fhir_kat.profiles import FOLDER as PROFILES
from fhir_kat.profiles import Profile, load_profiles, structure_definition
from fhir_kat.search import all_params
from fhir_kat.security.discovery import AUTH
from fhir_kat.services.capability import capability_statement
from fhir_kat.terminology import BASE, load_terminology
from fhir_kat.terminology.criteria import criterion_documents

PACKAGE_NAME = "fhir-kat.program"
IG_ID = "fhir-kat"
#: The package version follows the service's: a release publishes its definitions.
PACKAGE_VERSION = __version__
CORE_PACKAGE = "hl7.fhir.r4.core"
EXAMPLES = PROFILES / "examples"
_OPERATION = "OperationDefinition"


@dataclass(frozen=True)
class Built:
    folder: Path  # <out>/package
    tarball: Path  # <out>/<name>-<version>.tgz
    resources: int
    examples: int


def _param(
    name: str,
    use: str,
    type_: str,
    doc: str,
    *,
    min_: int = 0,
    max_: str = "1",
) -> dict[str, Any]:
    return {
        "name": name,
        "use": use,
        "min": min_,
        "max": max_,
        "documentation": doc,
        "type": type_,
    }


def operation_definitions() -> list[dict[str, Any]]:
    """The operations the service defines or uses, as it implements them."""

    def op(
        oid: str,
        code: str,
        title: str,
        description: str,
        resources: list[str],
        params: list[dict[str, Any]],
        *,
        system: bool = False,
        type_: bool = True,
        instance: bool = False,
        base: str | None = None,
        affects_state: bool = False,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "resourceType": _OPERATION,
            "id": oid,
            "url": f"{BASE}/{_OPERATION}/{oid}",
            "version": "1",
            "name": "".join(p.title() for p in oid.split("-")),
            "title": title,
            "status": "active",
            "kind": "operation",
            "publisher": "fhir_kat",
            "description": description,
            "affectsState": affects_state,
            "code": code,
            "resource": resources,
            "system": system,
            "type": type_,
            "instance": instance,
            "parameter": params,
        }
        if base:
            out["base"] = base
        return out

    return [
        op(
            "kat-transform",
            "transform",
            "Map a program artifact without storing it",
            "POST /api/v1/<kind>/$transform: the native artifact (referrals, screenings, "
            "consents, medication-administrations, adverse-events, questionnaire-responses) in "
            "its JSON form, the FHIR transaction Bundle the service would store out "
            "(docs/artifacts.md). Refused artifacts get an OperationOutcome, one issue each.",
            ["Bundle"],
            [
                _param(
                    "artifact", "in", "Binary", "The artifact's JSON (the request body)", min_=1
                ),
                _param("return", "out", "Bundle", "The transaction Bundle", min_=1),
            ],
            system=True,
            type_=False,
        ),
        op(
            "kat-end",
            "end",
            "End a referral (program end)",
            "POST /api/v1/referrals/<task id>/$end: staff end the referral's Task "
            "(completed, withdrawn or discontinued), which drafts the feedback Composition for "
            "the referrer (docs/referrals.md).",
            ["Task"],
            [
                _param("outcome", "in", "code", "completed | withdrawn | discontinued", min_=1),
                _param("reason", "in", "string", "Why (needed unless completed)"),
                _param("return", "out", "Task", "The ended Task", min_=1),
            ],
            type_=False,
            instance=True,
            affects_state=True,
        ),
        op(
            "kat-extract",
            "extract",
            "Extract Observations from a QuestionnaireResponse",
            "QuestionnaireResponse/$extract (SDC, as used): the total with its band and "
            "screen result and one Observation per answered item — for a response to "
            "Questionnaire/kat-referral, the referral's transaction Bundle — returned and "
            "not stored.",
            ["QuestionnaireResponse"],
            [
                _param(
                    "questionnaire-response",
                    "in",
                    "QuestionnaireResponse",
                    "The response (type level; instance level reads the stored one)",
                ),
                _param(
                    "return",
                    "out",
                    "Bundle",
                    "A transaction Bundle of Observations (or of the referral)",
                    min_=1,
                ),
            ],
            instance=True,
            base="http://hl7.org/fhir/uv/sdc/OperationDefinition/QuestionnaireResponse-extract",
        ),
        op(
            "kat-evaluate-measure",
            "evaluate-measure",
            "Program outcomes for a period",
            "Measure/kat-program-outcomes/$evaluate-measure: a summary MeasureReport (profile "
            "kat-outcome-measurereport), one group per instrument stratified into completers "
            "and drop-outs, small cells withheld (docs/security.md).",
            ["Measure"],
            [
                _param("periodStart", "in", "date", "Start of the period", min_=1),
                _param("periodEnd", "in", "date", "End of the period", min_=1),
                _param("subject", "in", "string", "Group/<id>: a cohort"),
                _param("reportType", "in", "code", "summary (the only one)"),
                _param("return", "out", "MeasureReport", "The report", min_=1),
            ],
            type_=False,
            instance=True,
            base="http://hl7.org/fhir/OperationDefinition/Measure-evaluate-measure",
        ),
        op(
            "kat-package",
            "package",
            "The implementation guide as an NPM package",
            "ImplementationGuide/fhir-kat/$package: the program's FHIR package (package.json, "
            "the definitions, the examples) as application/gzip, what fhir-kat ig build "
            "writes with differential profiles (ADR 0022).",
            ["ImplementationGuide"],
            [_param("return", "out", "Binary", "The package (.tgz)", min_=1)],
            type_=False,
            instance=True,
        ),
    ]


def search_parameters() -> list[dict[str, Any]]:
    """The search parameters of our own (R4 defines no such parameter)."""
    out = []
    for rtype, params in sorted(all_params().items()):
        for name, p in sorted(params.items()):
            if p.definition is None or p.internal:
                continue
            sid = p.definition.rsplit("/", 1)[-1]
            out.append(
                {
                    "resourceType": "SearchParameter",
                    "id": sid,
                    "url": p.definition,
                    "version": "1",
                    "name": sid.replace("-", ""),
                    "status": "active",
                    "publisher": "fhir_kat",
                    "description": f"{rtype}.{'.'.join(p.paths[0])} as a {p.type} "
                    "(not an R4 search parameter)",
                    "code": name,
                    "base": [rtype],
                    "type": p.type,
                    "expression": " | ".join(f"{rtype}.{'.'.join(path)}" for path in p.paths),
                }
            )
    return out


def examples() -> dict[str, dict[str, Any]]:
    """profile id -> its example (``mappings/profiles/examples/<profile id>.json``, captured
    from the synthetic program's real output), declaring the profile."""
    out = {}
    for profile in load_profiles():
        path = EXAMPLES / f"{profile.id}.json"
        example = json.loads(read_definition(path))
        example["meta"] = {"profile": [profile.url]}
        out[profile.id] = example
    return out


def _core(core: Path | None, rtype: str) -> dict[str, Any] | None:
    if core is None:
        return None
    path = core / f"StructureDefinition-{rtype}.json"
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def conformance_resources(core: Path | None = None) -> list[dict[str, Any]]:
    """Every conformance and terminology resource of the package, in a stable order."""
    profiles = [structure_definition(p, _core(core, p.type)) for p in load_profiles()]
    terminology = [dict(r) for r in load_terminology().resources]
    return [
        *profiles,
        *operation_definitions(),
        *search_parameters(),
        *terminology,
        *(dict(d) for d in criterion_documents()),
        *(dict(q) for q in all_questionnaires()),
        dict(measure_resource(load_catalogue({}))),
    ]


def implementation_guide(resources: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    listed = []
    for r in resources:
        entry: dict[str, Any] = {
            "reference": {"reference": f"{r['resourceType']}/{r['id']}"},
            "name": str(r.get("title") or r.get("name") or r["id"]),
            "exampleBoolean": False,
        }
        if r["resourceType"] != "StructureDefinition" and "meta" in r and r["meta"].get("profile"):
            entry["exampleCanonical"] = r["meta"]["profile"][0]
            entry.pop("exampleBoolean")
        listed.append(entry)
    return {
        "resourceType": "ImplementationGuide",
        "id": IG_ID,
        "url": f"{BASE}/ImplementationGuide/{IG_ID}",
        "version": PACKAGE_VERSION,
        "name": "FhirKatProgram",
        "title": "fhir_kat: ketamine-assisted therapy program",
        "status": "active",
        "publisher": "fhir_kat",
        "description": "What a ketamine-assisted therapy program's FHIR adapter sends and "
        "accepts: referral, scores, dosing, safety, consent, feedback and outcome profiles, "
        "with the program's terminology, instruments and measure.",
        "packageId": PACKAGE_NAME,
        "license": "CC0-1.0",
        "fhirVersion": ["4.0.1"],
        "dependsOn": [
            {
                "id": "hl7_fhir_r4_core",
                "uri": "http://hl7.org/fhir/ImplementationGuide/hl7.fhir.r4.core",
                "packageId": CORE_PACKAGE,
                "version": "4.0.1",
            }
        ],
        "definition": {"resource": listed},
    }


def package_contents(
    core: Path | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The package's definitions (the CapabilityStatement and the ImplementationGuide last)
    and its examples."""
    definitions = conformance_resources(core)
    capability = capability_statement(BASE, AUTH.capability_security(f"{BASE}/auth/token"))
    capability["id"] = "fhir-kat-server"
    capability["url"] = f"{BASE}/CapabilityStatement/fhir-kat-server"
    definitions.append(capability)
    example_list = list(examples().values())
    definitions.append(implementation_guide([*definitions, *example_list]))
    return definitions, example_list


@cache
def served_resources() -> tuple[dict[str, Any], ...]:
    """The definitions the service serves read-only (differential profiles); the examples
    travel in the package."""
    return tuple(package_contents()[0])


def package_json() -> dict[str, Any]:
    return {
        "name": PACKAGE_NAME,
        "version": PACKAGE_VERSION,
        "type": "fhir.ig",
        "title": "fhir_kat: ketamine-assisted therapy program",
        "description": "Profiles, operations, terminology, instruments and measure of a "
        "fhir_kat deployment",
        "canonical": BASE,
        "url": f"{BASE}/ImplementationGuide/{IG_ID}",
        "fhirVersions": ["4.0.1"],
        "dependencies": {CORE_PACKAGE: "4.0.1"},
        "author": "fhir_kat",
        "license": "CC0-1.0",
        "jurisdiction": "urn:iso:std:iso:3166#CA",
    }


def _file_name(resource: Mapping[str, Any]) -> str:
    return f"{resource['resourceType']}-{resource['id']}.json"


def _index(resources: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    files = []
    for r in resources:
        entry = {"filename": _file_name(r), "resourceType": r["resourceType"], "id": r["id"]}
        for key in ("url", "version", "kind", "type"):
            if isinstance(r.get(key), str):
                entry[key] = r[key]
        files.append(entry)
    return {"index-version": 1, "files": files}


def build_package(out: Path, core: Path | None = None) -> Built:
    """Write ``out/package/`` and ``out/<name>-<version>.tgz``. With ``core`` (a folder of
    R4 ``StructureDefinition-<Type>.json`` files, e.g. HL7's R4 package) the profiles carry
    snapshots; without, differentials only (validators that generate snapshots load both)."""
    folder = out / "package"
    (folder / "example").mkdir(parents=True, exist_ok=True)
    definitions, example_list = package_contents(core)
    files = _files(definitions, example_list)
    for name, data in files.items():
        (out / name).write_bytes(data)
    tarball = out / f"{PACKAGE_NAME}-{PACKAGE_VERSION}.tgz"
    tarball.write_bytes(_tgz(files))
    return Built(folder, tarball, len(definitions), len(example_list))


def _files(
    definitions: Iterable[Mapping[str, Any]], example_list: Iterable[Mapping[str, Any]]
) -> dict[str, bytes]:
    """The package's files by their name in the tarball (``package/...``)."""
    definitions, example_list = list(definitions), list(example_list)
    files: dict[str, bytes] = {"package/package.json": _dump(package_json())}
    for r in definitions:
        files[f"package/{_file_name(r)}"] = _dump(r)
    files["package/.index.json"] = _dump(_index(definitions))
    for r in example_list:
        files[f"package/example/{_file_name(r)}"] = _dump(r)
    files["package/example/.index.json"] = _dump(_index(example_list))
    return files


def _dump(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _tgz(files: Mapping[str, bytes]) -> bytes:
    """A reproducible tarball: sorted names, no timestamps, no owners."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return buffer.getvalue()


@cache
def package_tarball() -> bytes:
    """The package as the service serves it (differential profiles)."""
    return _tgz(_files(*package_contents()))


# ---------------------------------------------------------------------------------- docs


def profile_page(profile: Profile) -> str:
    """The human-readable page of one profile (docs/profiles/<id>.md), generated."""
    lines = [
        f"# {profile.title}",
        "",
        "<!-- generated by `fhir-kat ig build --docs docs/profiles`: do not edit -->",
        "",
        f"Profile `{profile.id}` (version {profile.version}) of {profile.type}: "
        f"`$canonical/StructureDefinition/{profile.id}`, defined in "
        f"`mappings/profiles/{profile.file}`.",
        "",
        " ".join(profile.description.split()),
        "",
    ]
    if profile.applies:
        lines += ["The service declares it on every resource it writes that has:", ""]
        lines += [f"- `{path}` = `{_symbolic(value)}`" for path, value in profile.applies]
        lines += ["", "and conforms; a resource declaring it is held to it (422 otherwise).", ""]
    lines += ["| element | cardinality | constraint |", "|---|---|---|"]
    for c in profile.constraints:
        card = " ".join(
            part
            for part in (
                f"min {c.min}" if c.min is not None else "",
                f"max {c.max}" if c.max is not None else "",
            )
            if part
        )
        parts = []
        if c.fixed is not None:
            parts.append(f"fixed `{_symbolic(c.fixed)}`")
        if c.pattern is not None and c.slice is not None:
            parts.append(f"slice `{c.slice}`: a repetition contains `{_symbolic(c.pattern)}`")
        elif c.pattern is not None:
            parts.append(f"contains `{_symbolic(c.pattern)}`")
        if c.binding is not None:
            parts.append(f"{c.binding['strength']} binding to `{_symbolic(c.binding['valueSet'])}`")
        if c.short:
            parts.append(c.short)
        lines.append(f"| `{c.path}` | {card} | {'; '.join(parts)} |")
    lines += ["", f"Example: `mappings/profiles/examples/{profile.id}.json`.", ""]
    return "\n".join(lines)


def _symbolic(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text.replace(BASE, "$canonical")


def write_docs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    index = ["# Profiles", "", "<!-- generated by `fhir-kat ig build --docs docs/profiles` -->", ""]
    for profile in load_profiles():
        path = folder / f"{profile.id}.md"
        path.write_text(profile_page(profile), encoding="utf-8")
        written.append(path)
        index.append(f"- [{profile.title}]({profile.id}.md) — {profile.type}")
    (folder / "README.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    return written


__all__ = [
    "PACKAGE_NAME",
    "PACKAGE_VERSION",
    "Built",
    "build_package",
    "conformance_resources",
    "examples",
    "implementation_guide",
    "operation_definitions",
    "package_contents",
    "package_json",
    "package_tarball",
    "profile_page",
    "search_parameters",
    "served_resources",
    "write_docs",
]
