"""Run fhir_kat on the embedded default: ``python server.py [--host H] [--port P]``.

A thin entry point: settings come from FHIR_KAT_* variables and FHIR_KAT_CONFIG (see README);
the development server is for local use — production runs gunicorn (docs/deployment.md).
"""

from __future__ import annotations

import sys

from fhir_kat.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
