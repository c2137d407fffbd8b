"""Run fhir_kat on the embedded default: ``python server.py [--host H] [--port P]``.

A thin entry point: settings come from FHIR_KAT_* variables and FHIR_KAT_CONFIG (see README);
the development server is for local use — production runs gunicorn (docs/deployment.md).
Started with an interpreter that lacks the dependencies (a plain ``python3 server.py``), it
hands over to the project's ``.venv`` when ``./run.sh`` has made one, and otherwise says how.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE / ".venv" / "bin" / "python"


def _main() -> int:
    try:
        from fhir_kat.cli import main
    except ModuleNotFoundError as exc:
        in_venv = Path(sys.prefix).resolve() == VENV_PYTHON.parent.parent.resolve()
        if VENV_PYTHON.exists() and not in_venv:
            # The fixed interpreter of this checkout, with this same script: no shell involved.
            os.execv(  # noqa: S606
                str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]]
            )
        print(
            f"server.py: {exc.name} is not installed for {sys.executable}; run ./run.sh serve "
            "once (it creates .venv and installs fhir_kat), or pip install -e . yourself",
            file=sys.stderr,
        )
        return 2
    return main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(_main())
