"""A whole synthetic program through the real service (``fhir-kat demo``) in a subprocess, and
what it stored: for tests that hold everything the service writes to a rule."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_demo(
    data_dir: Path, *, participants: int, seed: int = 1, env: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The resources (current versions) and the ``store_meta`` rows of the demo's database."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhir_kat.cli",
            "demo",
            "--participants",
            str(participants),
            "--seed",
            str(seed),
            "--data-dir",
            str(data_dir),
        ],
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    db = sqlite3.connect(data_dir / "fhir_kat.sqlite3")
    try:
        stored = [json.loads(row[0]) for row in db.execute("SELECT content FROM resources")]
        meta = dict(db.execute("SELECT name, value FROM store_meta").fetchall())
    finally:
        db.close()
    return stored, meta
