"""The deployment's canonical home (ADR 0021): one configured canonical base and identifier
base; the shipped files name them only symbolically; a whole synthetic program run under
another base carries that base everywhere and example.org nowhere; a database written under
one base is refused, with the reason, by a service configured with another."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fhir_kat.canonical import (
    CANONICAL_SYMBOL,
    LEGACY_CANONICAL_BASE,
    expand,
    process_bases,
    read_definition,
)
from fhir_kat.settings import LOCAL_CANONICAL_BASE, SettingsError, load_settings
from tests.support.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("fhir_kat", "mappings")
#: The one place the old base may stay: what databases written before ADR 0021 hold.
ALLOWED = {Path("fhir_kat/canonical.py")}


def test_defaults_and_precedence() -> None:
    assert load_settings({}).effective_canonical_base == LOCAL_CANONICAL_BASE
    public = load_settings({"FHIR_KAT_PUBLIC_BASE_URL": "https://kat.ha.test/fhir"})
    assert public.effective_canonical_base == "https://kat.ha.test/fhir"
    assert public.effective_identifier_base == "https://kat.ha.test/fhir/sid"
    both = load_settings(
        {
            "FHIR_KAT_PUBLIC_BASE_URL": "https://kat.ha.test/fhir",
            "FHIR_KAT_CANONICAL_BASE": "https://defs.ha.test/kat/",
            "FHIR_KAT_IDENTIFIER_BASE": "https://ids.ha.test/kat",
        }
    )
    assert both.effective_canonical_base == "https://defs.ha.test/kat"
    assert both.effective_identifier_base == "https://ids.ha.test/kat"


@pytest.mark.parametrize(
    "value", ["kat.ha.test/fhir", "https://kat.ha.test/fhir?x=1", 'https://a"b', "ftp://x/y"]
)
def test_bad_base_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="canonical_base"):
        load_settings({"FHIR_KAT_CANONICAL_BASE": value})


def test_shipped_files_name_no_deployment() -> None:
    found = []
    for top in SHIPPED:
        for path in (ROOT / top).rglob("*"):
            rel = path.relative_to(ROOT)
            if not path.is_file() or path.suffix == ".pyc" or rel in ALLOWED:
                continue
            if "fhir-kat.example.org" in path.read_text(encoding="utf-8", errors="replace"):
                found.append(str(rel))
    assert not found, f"name the base symbolically ({CANONICAL_SYMBOL}): {found}"


def test_every_symbol_is_expanded() -> None:
    for path in (ROOT / "mappings").rglob("*"):
        if path.suffix in (".json", ".yaml"):
            assert "$canonical" not in read_definition(path)
            assert "$identifiers" not in read_definition(path)
    assert expand("$canonical/x $identifiers/y") == (
        f"{process_bases().canonical}/x {process_bases().identifiers}/y"
    )


def _env(base: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_KAT_")}
    env.update(FHIR_KAT_CANONICAL_BASE=base, FHIR_KAT_DATA_DIR=str(data_dir))
    return env


def _serve(base: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``fhir-kat serve`` on a database configured with ``base``: expected to refuse."""
    return subprocess.run(
        [sys.executable, "-m", "fhir_kat.cli", "serve", "--port", "1"],
        env=_env(base, data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_program_under_another_base_and_a_changed_base_refused(tmp_path: Path) -> None:
    base = "https://kat.ha.test/fhir"
    data = tmp_path / "data"
    stored, meta = run_demo(data, participants=3, env=_env(base, tmp_path / "unused"))
    contents = [json.dumps(r) for r in stored]
    assert len(contents) > 100
    leaked = [c for c in contents if "example.org" in c and "fhir-kat" in c]
    assert not leaked, leaked[0][:500]
    joined = "\n".join(contents)
    assert f"{base}/CodeSystem/" in joined and f"{base}/Questionnaire/" in joined
    assert f"{base}/sid/" in joined
    assert meta["setting:canonical_base"] == base
    assert meta["setting:identifier_base"] == f"{base}/sid"

    refused = _serve("https://other.ha.test/fhir", data)
    assert refused.returncode == 2
    assert f"FHIR_KAT_CANONICAL_BASE={base}" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_database_from_before_the_setting_keeps_its_base(tmp_path: Path) -> None:
    """A database that held data before the bases were recorded was written with the old
    example.org base: it is served under that base only."""
    data = tmp_path / "data"
    data.mkdir()
    from fhir_kat.store import Store

    store = Store(f"sqlite:///{data / 'fhir_kat.sqlite3'}")
    store.create_schema()
    with store.write() as tx:
        tx.put({"resourceType": "Organization", "id": "old", "name": "Held before"}, current=None)
    store.dispose()
    refused = _serve(LOCAL_CANONICAL_BASE, data)
    assert refused.returncode == 2
    assert re.search(
        rf"written with canonical base {re.escape(LEGACY_CANONICAL_BASE)}", refused.stderr
    )


@pytest.mark.parametrize(
    "command",
    [
        ["worker", "--once"],
        ["deliveries", "list"],
        ["outcomes", "--start", "2026-01-01", "--end", "2026-12-31"],
        ["reindex", "--type", "Organization"],
    ],
)
def test_commands_that_open_the_store_refuse_another_base(
    tmp_path: Path, command: list[str]
) -> None:
    """The worker and the commands that open the database check its recorded bases as the
    server does at start-up: under another base they would write (or count) second copies."""
    data = tmp_path / "data"
    data.mkdir()
    from fhir_kat.store import Store

    store = Store(f"sqlite:///{data / 'fhir_kat.sqlite3'}")
    store.create_schema()
    with store.write() as tx:
        tx.put({"resourceType": "Organization", "id": "old", "name": "Held before"}, current=None)
    store.dispose()
    refused = subprocess.run(
        [sys.executable, "-m", "fhir_kat.cli", *command],
        env=_env(LOCAL_CANONICAL_BASE, data),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert re.search(
        rf"written with canonical base {re.escape(LEGACY_CANONICAL_BASE)}", refused.stderr
    )
    assert "Traceback" not in refused.stderr
    # Under the base it was written with, the same command runs.
    accepted = subprocess.run(
        [sys.executable, "-m", "fhir_kat.cli", *command],
        env=_env(LEGACY_CANONICAL_BASE, data),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert accepted.returncode == 0, accepted.stderr[-2000:]
