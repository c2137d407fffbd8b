"""The ``fhir-kat`` command line. Each sub-command is a thin shell over a service.

Exit codes: 0 success, 1 the command ran and reported failure (e.g. a refused artifact),
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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

    validate = sub.add_parser(
        "validate",
        help="check FHIR JSON files the way the service would",
        description="Validates each file (a resource or a Bundle) with the R4B models and the "
        "required bindings of HL7's R4 definitions. Exit 1 when any file is refused; the "
        "OperationOutcome of each refused file goes to stderr.",
        epilog="Example: fhir-kat validate examples/*.json",
    )
    validate.add_argument("files", nargs="+", help="FHIR R4 JSON files")
    validate.set_defaults(func=_validate)

    outcomes = sub.add_parser(
        "outcomes",
        help="print the program-outcome table (and write a chart)",
        description="Evaluates Measure/kat-program-outcomes over the configured database for a "
        "period (and optionally a cohort Group) and prints the table; --chart writes an SVG of "
        "mean baseline vs post per instrument.",
        epilog="Example: fhir-kat outcomes --start 2026-01-01 --end 2026-12-31 --chart out.svg",
    )
    outcomes.add_argument("--start", required=True, help="period start (FHIR date)")
    outcomes.add_argument("--end", required=True, help="period end (FHIR date)")
    outcomes.add_argument("--group", help="cohort Group id")
    outcomes.add_argument("--chart", help="write an SVG chart to this file")
    outcomes.set_defaults(func=_outcomes)

    mappings = sub.add_parser(
        "mappings",
        help="work with the declarative mapping files",
        description="lint: check every mappings/<kind>/*.yaml (source fields, FHIR types, "
        "ConceptMaps, CodeSystems, references, functions).",
        epilog="Example: fhir-kat mappings lint",
    )
    mappings.add_argument("action", choices=["lint"])
    mappings.set_defaults(func=_mappings)

    map_cmd = sub.add_parser(
        "map",
        help="map an artifact file to FHIR (stdout), without storing it",
        description="Artifact JSON in, FHIR transaction Bundle out. Exit 1 with the "
        "OperationOutcome on stderr when the artifact is refused.",
        epilog="Example: fhir-kat map referrals docs/examples/referrals.json",
    )
    map_cmd.add_argument("kind")
    map_cmd.add_argument("file")
    map_cmd.set_defaults(func=_map)

    worker = sub.add_parser(
        "worker",
        help="run the delivery worker (outbox -> partners)",
        description="Sends queued deliveries to the configured [partners.*], checking each "
        "patient's consent at send time. Several workers may share one PostgreSQL.",
        epilog="Example: FHIR_KAT_CONFIG=kat.toml fhir-kat worker",
        add_help=False,
    )
    worker.set_defaults(func=_worker)
    return parser


def _worker(args: argparse.Namespace) -> int:
    from fhir_kat.exchange.worker import main as worker_main
    from fhir_kat.security.consent import ConsentDecisionPoint
    from fhir_kat.services.delivery import make_consent_gate, make_delivery_audit
    from fhir_kat.store import Store

    settings = load_settings()
    store = Store(settings.effective_database_url)
    try:
        gate = make_consent_gate(store, ConsentDecisionPoint(), _now)
        return worker_main(
            args.worker_args, consent_gate=gate, on_outcome=make_delivery_audit(store, _now)
        )
    finally:
        store.dispose()


def _mappings(args: argparse.Namespace) -> int:
    from fhir_kat.mapping import lint_mappings

    problems = lint_mappings()
    for p in problems:
        print(f"{', '.join(p.expression)}: {p.diagnostics}", file=sys.stderr)
    if not problems:
        print("mappings: ok")
    return 1 if problems else 0


def _map(args: argparse.Namespace) -> int:
    import json

    from fhir_kat.artifacts import KINDS
    from fhir_kat.clinical.protocol import load_protocol
    from fhir_kat.errors import FhirError
    from fhir_kat.mapping import MappingContext, map_artifact

    if args.kind not in KINDS:
        print(f"fhir-kat: kind must be one of {', '.join(KINDS)}", file=sys.stderr)
        return 2
    try:
        with open(args.file, encoding="utf-8") as fh:
            payload = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"fhir-kat: cannot read {args.file} ({type(exc).__name__})", file=sys.stderr)
        return 2
    settings = load_settings()
    protocol = load_protocol(Path(settings.program_protocol) if settings.program_protocol else None)
    try:
        bundle = map_artifact(args.kind, payload, MappingContext(_now(), "cli", protocol))
    except FhirError as exc:
        print(json.dumps(exc.outcome(), indent=2), file=sys.stderr)
        return 1
    print(json.dumps(bundle, indent=2, ensure_ascii=False))
    return 0


def _validate(args: argparse.Namespace) -> int:
    import json

    from fhir_kat.errors import operation_outcome
    from fhir_kat.validation.resource import validate_document

    refused = 0
    for name in args.files:
        try:
            with open(name, encoding="utf-8") as fh:
                document = json.load(fh)
        except (OSError, ValueError) as exc:
            print(f"{name}: cannot read JSON ({type(exc).__name__})", file=sys.stderr)
            refused += 1
            continue
        problems = validate_document(document)
        if problems:
            refused += 1
            print(f"{name}: refused", file=sys.stderr)
            print(json.dumps(operation_outcome(problems), indent=2), file=sys.stderr)
        else:
            print(f"{name}: ok")
    return 1 if refused else 0


def _outcomes(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fhir_kat.errors import FhirError
    from fhir_kat.instruments.chart import outcome_chart_svg, outcome_table
    from fhir_kat.instruments.definitions import load_catalogue
    from fhir_kat.services.outcomes import OutcomeService
    from fhir_kat.store import Store

    settings = load_settings()
    store = Store(settings.effective_database_url)
    program = settings.extra.get("program", {})
    service = OutcomeService(store, load_catalogue(program.get("instruments", {})), _now)
    try:
        results = service.results(
            args.start, args.end, f"Group/{args.group}" if args.group else None
        )
    except FhirError as exc:
        print(f"fhir-kat: {exc}", file=sys.stderr)
        return 2
    finally:
        store.dispose()
    print(outcome_table(results))
    if args.chart:
        title = f"Mean scores before and after, {args.start} to {args.end}"
        Path(args.chart).write_text(outcome_chart_svg(results, title), encoding="utf-8")
        print(f"chart written to {args.chart}", file=sys.stderr)
    return 0


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


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
    args, extra = parser.parse_known_args(argv)
    if args.command == "worker":
        args.worker_args = extra  # the worker has its own options (see fhir-kat worker --help)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func: Command = args.func
    try:
        return func(args)
    except SettingsError as exc:
        print(f"fhir-kat: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
