"""The ``fhir-kat`` command line. Each sub-command is a thin shell over a service.

Exit codes: 0 success, 1 the command ran and reported failure (e.g. a refused artifact),
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fhir_kat.settings import SettingsError, load_settings

Command = Callable[[argparse.Namespace], int]


def _serve(args: argparse.Namespace) -> int:
    from fhir_kat.app import create_app

    overrides = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    settings = load_settings(**overrides)
    from fhir_kat.security.clients import ensure_local_clients

    notes = ensure_local_clients(  # before create_app loads the registry
        settings.data_dir, f"http://{settings.host}:{settings.port}/auth/token"
    )
    app = create_app(settings)
    where = settings.effective_database_url.split("@")[-1]  # never print a password
    print(
        f"fhir_kat serving FHIR R4 at http://{settings.host}:{settings.port}/fhir "
        f"(database: {where})",
        file=sys.stderr,
    )
    for line in notes:
        print(line, file=sys.stderr)
    app.run(host=settings.host, port=settings.port, threaded=True, use_reloader=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-kat",
        description="FHIR R4 adapter for ketamine-assisted therapy programs.",
        epilog="Example: fhir-kat serve --port 8080",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the service (development server)",
        description="Run the FHIR service. Settings: FHIR_KAT_* variables and FHIR_KAT_CONFIG.",
        epilog="Example: fhir-kat serve --host 127.0.0.1 --port 8080",
    )
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.set_defaults(func=_serve)

    hashed = sub.add_parser(
        "hash-secret",
        help="print the stored form of a client secret for the TOML file",
        description="Reads a client secret from standard input and prints its PBKDF2 hash for "
        "secret_hash in a [clients.<id>] table. The secret itself never goes into a file.",
        epilog='Example: printf %s "$SECRET" | fhir-kat hash-secret',
    )
    hashed.set_defaults(func=_hash_secret)
    return parser


def _hash_secret(args: argparse.Namespace) -> int:
    from fhir_kat.security.secrets import hash_secret

    secret = sys.stdin.read().strip()
    if not secret:
        print("fhir-kat: no secret on standard input", file=sys.stderr)
        return 2
    print(hash_secret(secret))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except SettingsError as exc:
        print(f"fhir-kat: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
