#!/usr/bin/env bash
# Quick start wrapper. Needs only python3 (and npm for the HL7 test packages).
#   ./run.sh serve [--host H] [--port P]   run the service on the embedded SQLite default
#   ./run.sh test  [pytest args]           lint, type-check and run the whole test suite
# The virtual environment (.venv) is created and refreshed whenever pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "run.sh: preparing $VENV (first run or dependencies changed)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  serve)
    exec "$VENV/bin/python" server.py "$@"
    ;;
  test)
    "$VENV/bin/python" tools/hl7_packages.py fetch
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy"
    exec "$VENV/bin/python" -m pytest -n "${FHIR_KAT_TEST_WORKERS:-2}" "$@"
    ;;
  *)
    echo "usage: ./run.sh serve [--host H] [--port P] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
