"""The ``fhir-kat`` command line. Each sub-command is a thin shell over a service.

Exit codes (every command):

- 0 success;
- 1 the command ran and reported a failure: a refused artifact or file (``map``,
  ``validate``), lint problems (``mappings lint``), a failed check (``sandbox-check``), an
  export that failed or was refused (``export``), a demo step the service refused (``demo``);
- 2 usage or configuration error: bad arguments, invalid settings or TOML, an unknown partner,
  missing credentials, an unreadable input file, an output folder in the way;
- 3 the service or partner could not be reached (``sandbox-check``, ``export``);
- 130 interrupted (Ctrl-C).

Progress of long operations goes to stderr (a bar on a terminal, a line per tenth otherwise);
results go to stdout, so ``fhir-kat export … > log`` keeps both readable.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

from fhir_kat.settings import SettingsError, host_derived_urls_problem, load_settings

Command = Callable[[argparse.Namespace], int]


def _serve(args: argparse.Namespace) -> int:
    from fhir_kat.app import create_app

    overrides = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    settings = load_settings(**overrides)
    problem = host_derived_urls_problem(settings, settings.host)
    if problem is not None:
        raise SettingsError(problem)
    if not settings.public_base_url and settings.allow_host_derived_urls:
        print(
            "fhir-kat: WARNING: FHIR_KAT_PUBLIC_BASE_URL is not set; links, the token URL and "
            "the accepted client-assertion aud follow each request's Host header",
            file=sys.stderr,
        )
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
    from werkzeug.serving import make_server

    server = make_server(
        settings.host, settings.port, app, threaded=True, request_handler=_private_handler()
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _private_handler() -> Any:
    """Werkzeug's development-server handler without its own log lines: they quote the request
    line (the query string: PHNs, names) and, for a malformed request, whatever was sent. The
    service logs every request itself (JSON, the route pattern only: ``fhir_kat.logging``)."""
    import logging

    from werkzeug.serving import WSGIRequestHandler

    log = logging.getLogger("fhir_kat.http")

    class PrivateRequestHandler(WSGIRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass

        def log(self, type: str, message: str, *args: Any) -> None:
            if type == "error":  # the arguments can quote the request: never logged
                log.warning("http server refused a malformed request")

    return PrivateRequestHandler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-kat",
        description="FHIR R4 adapter for ketamine-assisted therapy programs.",
        epilog="Examples: fhir-kat demo | fhir-kat serve --port 8080 | fhir-kat <command> --help. "
        "Exit codes: 0 success, 1 the command reported a failure, 2 usage or configuration "
        "error, 3 service or partner unreachable, 130 interrupted. Integrators: "
        "docs/integrators.md.",
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
        epilog="Example: fhir-kat map referrals docs/examples/referrals.json > bundle.json "
        "&& fhir-kat validate bundle.json",
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

    reindex = sub.add_parser(
        "reindex",
        help="rebuild the search index from the stored resources",
        description="Rewrites the search-index rows of every current resource (of --type) from "
        "its stored JSON, as a write of it would. The service does this by itself at start-up "
        "for resource types whose search parameters changed (a new parameter, a database from "
        "an older version); run it ahead of starting a new version on a large database, or "
        "after a rolling upgrade during which older processes kept writing.",
        epilog="Example: fhir-kat reindex --type Observation",
    )
    reindex.add_argument(
        "--type", action="append", dest="types", help="only this resource type (repeatable)"
    )
    reindex.set_defaults(func=_reindex)

    deliveries = sub.add_parser(
        "deliveries",
        help="inspect and act on the delivery outbox (operators)",
        description="list: newest first (--status, --partner; payloads are never shown). "
        "stats: pending, in flight, dead-lettered, consent-blocked and the oldest pending age. "
        "retry ID: send a dead, consent-blocked or cancelled delivery again from attempt 0. "
        "cancel ID: never send it. retry-dead: requeue every dead delivery (of --partner). "
        "Both leave a delivery dead when a later one of the same patient already reached the "
        "partner (sent now, it would replace newer content there) unless --force. "
        "Exit 1 when the delivery is unknown or cannot move from its state, or when "
        "retry-dead left some dead.",
        epilog="Example: fhir-kat deliveries list --status dead && fhir-kat deliveries retry 42",
    )
    deliveries.add_argument("action", choices=["list", "stats", "retry", "cancel", "retry-dead"])
    deliveries.add_argument("id", nargs="?", type=int, help="delivery id (retry, cancel)")
    deliveries.add_argument("--status", help="list only this status (e.g. dead, pending)")
    deliveries.add_argument("--partner", help="only this partner (or subscription:<id>)")
    deliveries.add_argument("--limit", type=int, default=50, help="list at most this many")
    deliveries.add_argument("--json", action="store_true", help="list as JSON lines")
    deliveries.add_argument(
        "--force",
        action="store_true",
        help="retry, retry-dead: also deliveries a later delivery of the same patient has "
        "superseded at the partner (their older content would replace the newer)",
    )
    deliveries.set_defaults(func=_deliveries)

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

    mllp = sub.add_parser(
        "mllp",
        help="run the HL7 v2 MLLP listener (REF^I12/I13 referrals)",
        description="Listen for HL7 v2 referrals (REF^I12 new, REF^I13 modified; v2.3-2.5.1) "
        "over MLLP, optionally TLS, from the senders configured as [v2_senders.<name>]; "
        "answer each with an original-mode ACK. Settings: FHIR_KAT_MLLP_* and FHIR_KAT_CONFIG "
        "(docs/integrators.md).",
        epilog="Example: FHIR_KAT_CONFIG=kat.toml fhir-kat mllp --port 2575",
    )
    mllp.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    mllp.add_argument("--port", type=int, help="port (default 2575)")
    mllp.set_defaults(func=_mllp)

    generate = sub.add_parser(
        "generate",
        help="write a reproducible synthetic program as artifact JSON files",
        description="Generates N synthetic participants over three cohorts (referral, intake, "
        "consents, baseline and post PHQ-9/GAD-7/PCL-5/B-IPF, the protocol's KaT sessions with "
        "vital signs and adverse events; some exclusions, drop-outs and missing data) and "
        "writes them as <out>/<kind>/<name>.json plus <out>/manifest.json (the order to send "
        "them in). The same seed always writes byte-identical files.",
        epilog="Example: fhir-kat generate --participants 94 --seed 7 --out synthetic/",
    )
    generate.add_argument("--participants", type=int, default=94, help="default 94")
    generate.add_argument("--seed", type=int, default=1, help="default 1")
    generate.add_argument("--out", required=True, help="folder to write (new or empty)")
    generate.add_argument(
        "--force", action="store_true", help="write into a folder that is not empty"
    )
    generate.set_defaults(func=_generate)

    demo = sub.add_parser(
        "demo",
        help="run a synthetic program through the real API and print its outcomes",
        description="Starts the service on a free loopback port over the embedded SQLite "
        "database (a new temporary folder unless --data-dir), sends a synthetic program's "
        "artifacts through POST /api/v1/<kind> over HTTP, puts each cohort in a Group, then "
        "prints the outcome table from $evaluate-measure (overall and per cohort) and writes "
        "the chart of mean baseline vs post scores. Ignores FHIR_KAT_* settings.",
        epilog="Example: fhir-kat demo --participants 30 --seed 7 --chart demo.svg",
    )
    demo.add_argument("--participants", type=int, default=30, help="default 30")
    demo.add_argument("--seed", type=int, default=1, help="default 1")
    demo.add_argument("--data-dir", help="keep the database here (default: a temporary folder)")
    demo.add_argument(
        "--chart", help="SVG file to write (default: <data-dir>/outcomes.svg when it is kept)"
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (database, local credentials); --data-dir is always kept",
    )
    demo.set_defaults(func=_demo)

    export = sub.add_parser(
        "export",
        help="Bulk Data $export client: NDJSON files into a folder",
        description="Starts a Bulk Data export (Prefer: respond-async), polls its status "
        "honouring Retry-After while showing progress, then downloads every NDJSON file of the "
        "manifest with the access token into --out (plus manifest.json). Credentials: "
        "--client-id or FHIR_KAT_CLIENT_ID; the secret from --client-secret-file or "
        "FHIR_KAT_CLIENT_SECRET_FILE (a file with just the secret, or the local-credentials.txt "
        "that fhir-kat serve writes), or FHIR_KAT_CLIENT_SECRET — never on the command line.",
        epilog="Example: FHIR_KAT_CLIENT_ID=local-staff fhir-kat export "
        "--client-secret-file var/local-credentials.txt --type Patient,Observation "
        "--since 2026-01-01 --out export/",
    )
    export.add_argument(
        "--url",
        default=None,
        help="FHIR base URL (default FHIR_KAT_URL or http://127.0.0.1:8080/fhir)",
    )
    export.add_argument("--out", required=True, help="folder for the NDJSON files (new or empty)")
    export.add_argument(
        "--type", action="append", default=[], help="resource types (repeat or comma-separate)"
    )
    export.add_argument(
        "--since",
        type=_since_instant,
        help="only resources changed since this FHIR instant, or a date (its start, UTC)",
    )
    export.add_argument("--type-filter", action="append", default=[], help="_typeFilter query")
    export.add_argument("--group", help="export one Group's members (Group/<id>/$export)")
    export.add_argument("--client-id", help="OAuth client id (default FHIR_KAT_CLIENT_ID)")
    export.add_argument("--client-secret-file", help="file holding the client secret")
    export.add_argument("--token-url", help="default: from .well-known/smart-configuration")
    export.add_argument(
        "--timeout", type=float, default=3600.0, help="give up after this many seconds"
    )
    export.set_defaults(func=_export)

    sandbox = sub.add_parser(
        "sandbox-check",
        help="check a configured partner FHIR server (e.g. a vendor sandbox)",
        description="Reads the partner's CapabilityStatement and reports whether it supports "
        "the resource types and interactions fhir_kat will use with it (from its "
        "[partners.<name>] table: artifact_kinds, resource_types, write_mode), then does a "
        "create -> search -> read round trip with a synthetic Patient and deletes it where the "
        "server allows. Exit 0 pass, 1 a check failed, 2 configuration error (unknown "
        "partner, bad TOML, missing secret), 3 the server could not be reached.",
        epilog="Example: FHIR_KAT_CONFIG=kat.toml fhir-kat sandbox-check island-ehr",
    )
    sandbox.add_argument("partner", help="name of a [partners.<name>] table")
    sandbox.set_defaults(func=_sandbox_check)

    partners = sub.add_parser(
        "partners",
        help="list what each configured partner will receive, and how",
        description="Reads [partners.*] (FHIR_KAT_CONFIG) and prints, per partner, the kinds "
        "and resource types it receives, the wire form (conditional create or PUT, and what "
        "happens to a resource without a business identifier) and the consent each delivery "
        "asks for; then who receives safety Flags, and warnings. The same lines are logged "
        "when the service and the worker start. Exit 0, 1 when there are warnings, 2 for a "
        "configuration that can never deliver.",
        epilog="Example: fhir-kat partners",
    )
    partners.set_defaults(func=_partners)

    ig = sub.add_parser(
        "ig",
        help="the program's implementation guide (profiles, terminology) as a FHIR package",
        description="build: write <out>/package/ (package.json, .index.json, one file a "
        "StructureDefinition, OperationDefinition, SearchParameter, CodeSystem, ValueSet, "
        "ConceptMap, Questionnaire, the Measure, CapabilityStatement and ImplementationGuide; "
        "example/ one example per profile) and <out>/<name>-<version>.tgz, under the "
        "configured canonical base (ADR 0021, 0022). With --core (a folder of R4 "
        "StructureDefinition-<Type>.json files, e.g. HL7's hl7.fhir.r4.core package) the "
        "profiles carry snapshots. With --docs, also the page of each profile.",
        epilog="Example: fhir-kat ig build --out build/ig",
    )
    ig.add_argument("action", choices=["build"])
    ig.add_argument("--out", required=True, help="folder to write (package/ and the .tgz)")
    ig.add_argument("--core", help="folder of the R4 base StructureDefinitions (snapshots)")
    ig.add_argument("--docs", help="folder for the generated profile pages")
    ig.set_defaults(func=_ig)
    return parser


def _ig(args: argparse.Namespace) -> int:
    from fhir_kat.profiles import ProfileError
    from fhir_kat.services.ig import build_package, write_docs

    core = Path(args.core) if args.core else None
    if core is not None and not (core / "StructureDefinition-Observation.json").is_file():
        print(f"fhir-kat: --core {core} holds no R4 StructureDefinitions", file=sys.stderr)
        return 2
    try:
        built = build_package(Path(args.out), core)
    except ProfileError as exc:
        print(f"fhir-kat: {exc}", file=sys.stderr)
        return 1
    print(
        f"{built.folder}: {built.resources} resources, {built.examples} examples; {built.tarball}"
    )
    if args.docs:
        pages = write_docs(Path(args.docs))
        print(f"{args.docs}: {len(pages)} profile pages")
    return 0


def _partners(args: argparse.Namespace) -> int:
    from fhir_kat.exchange import load_partners
    from fhir_kat.exchange.plan import describe_partners, partner_warnings

    configured = load_partners(load_settings())
    for line in describe_partners(configured):
        print(line)
    warnings = partner_warnings(configured)
    for line in warnings:
        print(f"warning: {line}")
    return 1 if warnings else 0


def _worker(args: argparse.Namespace) -> int:
    from fhir_kat.exchange.worker import main as worker_main
    from fhir_kat.security.consent import ConsentDecisionPoint
    from fhir_kat.services.delivery import make_consent_gate, make_delivery_audit
    from fhir_kat.store import Store

    settings = load_settings()
    store = Store(settings.effective_database_url)
    try:
        store.claim_bases()  # as the server does at start-up (ADR 0021)
        gate = make_consent_gate(store, ConsentDecisionPoint(), _now)
        return worker_main(
            args.worker_args, consent_gate=gate, on_outcome=make_delivery_audit(store, _now)
        )
    finally:
        store.dispose()


def _mllp(args: argparse.Namespace) -> int:
    from fhir_kat.api.mllp import MllpListener, config_from_settings
    from fhir_kat.app import create_app

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["mllp_host"] = args.host
    if args.port is not None:
        overrides["mllp_port"] = args.port
    settings = load_settings(**overrides)
    config = config_from_settings(settings)
    app = create_app(settings)
    state = app.extensions["fhir_kat"]
    service = state.services.v2
    if not service.senders:
        print(
            "fhir-kat: no [v2_senders.*] configured: every message would be refused (AR)",
            file=sys.stderr,
        )
    listener = MllpListener(config, service.receive)
    host, port = listener.address
    scheme = "MLLP over TLS" if config.ssl_context else "MLLP"
    print(
        f"fhir_kat listening for HL7 v2 referrals ({scheme}) on {host}:{port}; "
        f"{len(service.senders)} sender(s)",
        file=sys.stderr,
    )
    try:
        listener.serve_forever()
    finally:
        listener.stop()
        state.store.dispose()
    return 0


def _deliveries(args: argparse.Namespace) -> int:
    """The operator's view of the outbox: the CLI twin of ``/api/v1/deliveries`` (admin)."""
    import json

    from fhir_kat.errors import FhirError
    from fhir_kat.exchange import outbox
    from fhir_kat.store import Store

    settings = load_settings()
    store = Store(settings.effective_database_url)
    try:
        store.create_schema()  # a new database has an empty outbox, not a missing table
        store.claim_bases()  # as the server does at start-up (ADR 0021)
        if args.action == "list":
            rows = outbox.list_deliveries(store, args.status, args.limit, partner=args.partner)
            if args.json:
                for info in rows:
                    print(json.dumps(info.to_json(), separators=(",", ":")))
                return 0
            print(f"{'id':>8}  {'partner':<24} {'kind':<12} {'status':<16} {'tries':>5}  next")
            for info in rows:
                due = f"{info.next_attempt_at:%Y-%m-%d %H:%M:%S}"
                print(
                    f"{info.id:>8}  {info.partner[:24]:<24} {info.kind[:12]:<12} "
                    f"{info.status:<16} {info.attempts:>5}  {due}"
                )
            return 0
        if args.action == "stats":
            print(json.dumps(outbox.stats(store, partner=args.partner).to_json(), indent=2))
            return 0
        if args.action == "retry-dead":
            result = outbox.retry_dead(store, partner=args.partner, force=args.force)
            print(f"{result.requeued} dead deliveries queued again", file=sys.stderr)
            if result.superseded:
                print(
                    f"fhir-kat: left dead: {', '.join(map(str, result.superseded))} — a later "
                    "delivery of the same patient already reached the partner, and sending "
                    "these now would replace its newer content; check the partner, then "
                    "retry them with --force",
                    file=sys.stderr,
                )
                return 1
            return 0
        if args.id is None:
            print(f"fhir-kat: deliveries {args.action} needs a delivery id", file=sys.stderr)
            return 2
        if args.action == "retry":
            info = outbox.requeue(store, args.id, force=args.force)
        else:
            info = outbox.cancel(store, args.id)
        print(json.dumps(info.to_json(), indent=2))
        return 0
    except FhirError as exc:  # unknown id (404), a state that cannot move (409), bad filter
        print(f"fhir-kat: {exc}", file=sys.stderr)
        return 1
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
    catalogue = load_catalogue(program.get("instruments", {}), outcomes=program.get("outcomes"))
    service = OutcomeService(store, catalogue, _now)
    try:
        store.create_schema()  # the measure reads the search index: bring it up to date first
        store.claim_bases()  # as the server does at start-up (ADR 0021)
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


def _reindex(args: argparse.Namespace) -> int:
    from fhir_kat.search import all_params
    from fhir_kat.store import Store
    from fhir_kat.store.reindex import reindex

    known = sorted(all_params())
    types = args.types or known
    unknown = sorted(set(types) - set(known))
    if unknown:
        print(f"fhir-kat: no search parameters for {', '.join(unknown)}", file=sys.stderr)
        return 2
    settings = load_settings()
    store = Store(settings.effective_database_url)
    try:
        store.create_schema()  # also brings stale types up to date
        store.claim_bases()  # as the server does at start-up (ADR 0021)
        with store.write() as tx:
            done = reindex(
                tx.conn,
                types,
                lambda rtype, n: print(f"reindex: {rtype} {n}", file=sys.stderr),
            )
    finally:
        store.dispose()
    print(f"reindexed {done} resources", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- progress


class Progress:
    """A progress bar on stderr when it is a terminal; otherwise a line per tenth, so logs
    stay readable. Never writes to stdout (results go there)."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.total, self.label, self.done = max(total, 0), label, 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_tenth = -1

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.tty:
            width = 30
            filled = width * self.done // self.total if self.total else width
            self.stream.write(
                f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total} {note}".rstrip()
                + "\033[K"  # clear what a longer earlier line left on the right
            )
            self.stream.flush()
            return
        tenth = 10 * self.done // self.total if self.total else 10
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            print(f"{self.label}: {self.done}/{self.total} {note}".rstrip(), file=self.stream)

    def status(self, text: str) -> None:
        """An indeterminate step (e.g. an export still running)."""
        if self.tty:
            self.stream.write(f"\r{self.label}: {text}\033[K")
            self.stream.flush()
        else:
            print(f"{self.label}: {text}", file=self.stream)

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------- generate


def _write_json(path: Path, document: Any) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def _generate(args: argparse.Namespace) -> int:
    from fhir_kat.synthetic import MAX_PARTICIPANTS, generate_program

    if not 1 <= args.participants <= MAX_PARTICIPANTS:
        print(f"fhir-kat: --participants must be between 1 and {MAX_PARTICIPANTS}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        print(f"fhir-kat: {out} exists and is not empty (use --force)", file=sys.stderr)
        return 2
    program = generate_program(args.participants, args.seed)
    artifacts = list(program.artifacts())
    progress = Progress(len(artifacts), "writing")
    order = []
    for artifact in artifacts:
        relative = f"{artifact.kind}/{artifact.name}.json"
        _write_json(out / relative, artifact.payload)
        order.append({"kind": artifact.kind, "file": relative})
        progress.advance()
    progress.finish()
    _write_json(
        out / "manifest.json",
        {
            "generator": "fhir_kat.synthetic",
            "seed": program.seed,
            "participants": len(program.participants),
            "outcomes": program.counts(),
            "cohorts": {
                str(c): [p.phn for p in program.participants if p.cohort == c]
                for c in sorted({p.cohort for p in program.participants})
            },
            "send_order": order,
        },
    )
    counts = program.counts()
    print(
        f"wrote {len(artifacts)} artifacts for {len(program.participants)} participants to "
        f"{out} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
    )
    return 0


# ---------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    if not 1 <= args.participants <= 500:
        print("fhir-kat: --participants must be between 1 and 500", file=sys.stderr)
        return 2
    temporary = not args.data_dir
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="fhir-kat-demo-"))
    if (data_dir / "fhir_kat.sqlite3").exists():
        print(f"fhir-kat: {data_dir} already holds a database; give a new folder", file=sys.stderr)
        return 2
    try:
        return _demo_in(args, data_dir, keep=args.keep or not temporary)
    finally:
        if temporary and not args.keep:
            # It holds the local clients' secrets: nothing of it stays behind.
            shutil.rmtree(data_dir, ignore_errors=True)
            print(f"fhir-kat demo: removed {data_dir} (--keep keeps it)", file=sys.stderr)


def _demo_in(args: argparse.Namespace, data_dir: Path, *, keep: bool) -> int:
    import threading

    import requests
    from werkzeug.serving import make_server

    from fhir_kat.app import create_app

    # The clinics' EMRs, on loopback: every status change of their referrals is pushed there.
    from fhir_kat.exchange.standin_emr import StandInEmr
    from fhir_kat.instruments.chart import outcome_chart_svg, outcome_table
    from fhir_kat.security.clients import LOCAL_CREDENTIALS, ensure_local_clients
    from fhir_kat.synthetic import CLINICS, ORG_SYSTEM, generate_program

    emr = StandInEmr()
    partners = {
        f"demo-{clinic[4].lower()}-emr": {
            "base_url": f"{emr.url}/{clinic[4]}/fhir",
            "organization": f"{ORG_SYSTEM}|{clinic[4]}",
            "artifact_kinds": ["referral-status"],
            "timeout_seconds": 10,
        }
        for clinic in CLINICS
    }
    # The embedded default, whatever FHIR_KAT_* says: the demo never touches a real database.
    settings = load_settings({}, data_dir=str(data_dir), log_level="WARNING")
    settings = replace(settings, extra={**settings.extra, "partners": partners})
    ensure_local_clients(data_dir)
    secret = _credential_from_file(data_dir / LOCAL_CREDENTIALS, "local-staff")
    app = create_app(settings)

    class QuietHandler(_private_handler()):  # type: ignore[misc]
        protocol_version = "HTTP/1.1"  # keep-alive: one connection for the whole run

        def log(self, type: str, message: str, *args: Any) -> None:
            pass  # the progress display is the demo's output; the service logs JSON itself

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    base = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"fhir-kat demo: service at {base}/fhir, database in {data_dir}", file=sys.stderr)
    session = requests.Session()
    tokens = _TokenCache(session, f"{base}/auth/token", "local-staff", secret)

    def authorize(renew: bool = False) -> None:
        session.headers["Authorization"] = f"Bearer {tokens(renew)}"

    try:
        program = generate_program(args.participants, args.seed)
        authorize()
        code = _run_demo(
            session,
            base,
            program,
            data_dir if keep else None,
            args.chart,
            outcome_table,
            outcome_chart_svg,
            authorize,
        )
        if code == 0:
            code = _push_statuses(app, emr)
        return code
    except PermissionError as exc:
        print(f"fhir-kat: {exc}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        print(
            f"fhir-kat: the demo service stopped answering ({type(exc).__name__})",
            file=sys.stderr,
        )
        return 1
    finally:
        session.close()
        server.shutdown()
        thread.join(timeout=10)
        app.extensions["fhir_kat"].export.shutdown()
        app.extensions["fhir_kat"].store.dispose()
        emr.stop()


def _push_statuses(app: Any, emr: Any, rounds: int = 400) -> int:
    """Send what the outbox holds for the clinics' EMRs (bounded), and say what arrived."""
    from fhir_kat.exchange.worker import DeliveryWorker
    from fhir_kat.services.delivery import make_consent_gate, make_delivery_audit

    state = app.extensions["fhir_kat"]
    worker = DeliveryWorker(
        state.store,
        state.partners,
        make_consent_gate(state.store, state.consent, state.clock),
        sleep=lambda _: None,
        on_outcome=make_delivery_audit(state.store, state.clock),
        batch_size=50,
    )
    delivered = blocked = 0
    for _ in range(rounds):
        report = worker.run_once()
        delivered += report.delivered
        blocked += report.blocked
        if not report.claimed:
            break
    tasks, documents = len(emr.resources("Task")), len(emr.resources("Bundle"))
    print(
        f"\nstatus pushes: {tasks} referral status updates and {documents} feedback documents "
        f"delivered to {len(emr.clinics())} clinics' EMRs"
        + (f"; {blocked} held back for want of the participant's consent" if blocked else "")
    )
    return 0


def _run_demo(
    session: Any,
    base: str,
    program: Any,
    data_dir: Path | None,
    chart: str | None,
    outcome_table: Callable[..., str],
    outcome_chart_svg: Callable[..., str],
    authorize: Callable[[bool], None],
) -> int:
    import json

    from fhir_kat.instruments.definitions import load_catalogue

    artifacts = list(program.artifacts())
    progress = Progress(len(artifacts), "sending artifacts")
    patient_ids: dict[str, str] = {}  # PHN -> Patient id, from each referral's response
    task_ids: dict[str, str] = {}  # PHN -> referral Task id
    for artifact in artifacts:
        url = f"{base}/api/v1/{artifact.kind}"
        response = session.post(url, json=artifact.payload, timeout=60)
        if response.status_code == 401:  # the token expired (they live 300 s): a new one
            authorize(True)
            response = session.post(url, json=artifact.payload, timeout=60)
        if response.status_code not in (200, 201):
            progress.finish()
            print(f"{artifact.name}: HTTP {response.status_code}", file=sys.stderr)
            print(response.text[:2000], file=sys.stderr)
            return 1
        if artifact.kind == "referrals":
            for entry in response.json().get("entry", []):
                location = entry.get("response", {}).get("location", "")
                phn = artifact.payload["patient"]["phn"]
                if location.startswith("Patient/"):
                    patient_ids[phn] = location.split("/")[1]
                elif location.startswith("Task/"):
                    task_ids[phn] = location.split("/")[1]
        progress.advance(note=artifact.kind)
    progress.finish()

    # Participants who finished agree that the program shares its feedback with their
    # referring clinic (a sharing consent naming the clinic, purpose TREAT): their feedback
    # documents reach the clinic; a participant who withdrew gave no such consent.
    clinics = {
        a.payload["patient"]["phn"]: a.payload["referrer"]["organization"]
        for a in artifacts
        if a.kind == "referrals"
    }
    for p in program.participants:
        if p.ended != "completed" or p.phn not in clinics or p.program_start is None:
            continue
        consent = {
            "source_id": f"DEMO-share-referrer-{p.phn}",
            "patient_phn": p.phn,
            "kind": "share-referrer",
            "signed_at": f"{p.program_start.isoformat()}T10:00:00-08:00",
            "permitted_party": clinics[p.phn],
            "purposes": ["TREAT"],
        }
        r = session.post(f"{base}/api/v1/consents", json=consent, timeout=60)
        if r.status_code not in (200, 201):
            print(f"sharing consent {p.number}: HTTP {r.status_code}", file=sys.stderr)
            print(r.text[:2000], file=sys.stderr)
            return 1

    # The program as it ran: staff end each started referral (on the day it ended), and each
    # cohort Group records its members' program periods — the outcome measure's timeline.
    for p in program.participants:
        if p.ended is None or p.phn not in task_ids:
            continue
        r = session.post(
            f"{base}/api/v1/referrals/{task_ids[p.phn]}/$end",
            json={
                "outcome": p.ended,
                "date": p.program_end.isoformat(),
                **({"reason": "Synthetic: left the program"} if p.ended != "completed" else {}),
            },
            timeout=60,
        )
        if r.status_code != 200:
            print(f"ending referral {p.number}: HTTP {r.status_code}", file=sys.stderr)
            print(r.text[:2000], file=sys.stderr)
            return 1
    cohorts: dict[int, list[dict[str, Any]]] = {}
    for p in program.participants:
        if p.phn in patient_ids:
            member: dict[str, Any] = {"entity": {"reference": f"Patient/{patient_ids[p.phn]}"}}
            if p.program_start is not None:
                member["period"] = {"start": p.program_start.isoformat()}
                if p.program_end is not None:
                    member["period"]["end"] = p.program_end.isoformat()
                if p.ended == "cancelled":
                    member["inactive"] = True
            cohorts.setdefault(p.cohort, []).append(member)
    for number, members in sorted(cohorts.items()):
        group = {
            "resourceType": "Group",
            "id": f"demo-cohort-{number}",
            "type": "person",
            "actual": True,
            "name": f"Synthetic cohort {number}",
            "quantity": len(members),
            "member": members,
        }
        r = session.put(
            f"{base}/fhir/Group/demo-cohort-{number}",
            data=json.dumps(group),
            headers={"Content-Type": "application/fhir+json"},
            timeout=60,
        )
        if r.status_code not in (200, 201):
            print(f"Group for cohort {number}: HTTP {r.status_code}", file=sys.stderr)
            return 1

    attested = _attest_feedback(session, base)
    if attested < 0:
        return 1
    print(_fhir_summary(session, base), file=sys.stderr)
    start, end = program.period()
    catalogue = load_catalogue({})
    sections = [("all cohorts", None)] + [
        (f"cohort {n}", f"Group/demo-cohort-{n}") for n in sorted(cohorts)
    ]
    overall: list[Any] = []
    counts = program.counts()
    print(
        f"Synthetic program: {len(program.participants)} participants "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}), "
        f"{len(artifacts)} artifacts sent, period {start} to {end}"
    )
    for title, subject in sections:
        params = {"periodStart": start, "periodEnd": end}
        if subject:
            params["subject"] = subject
        r = session.get(
            f"{base}/fhir/Measure/kat-program-outcomes/$evaluate-measure",
            params=params,
            timeout=60,
        )
        if r.status_code != 200:
            print(f"$evaluate-measure ({title}): HTTP {r.status_code}", file=sys.stderr)
            return 1
        results = results_from_report(r.json(), catalogue)
        if subject is None:
            overall = results
        print(f"\n{title}\n{outcome_table(results)}")
    ended = {
        k: sum(1 for p in program.participants if p.ended == k) for k in ("completed", "cancelled")
    }
    print(
        f"\nreferrals ended: {ended['completed']} completed, {ended['cancelled']} withdrawn; "
        f"{attested} feedback documents attested by the program clinician"
    )
    print("cohorts (for fhir-kat outcomes --group, fhir-kat export --group):")
    for n in sorted(cohorts):
        print(f"  cohort {n}: Group/demo-cohort-{n}  (--group demo-cohort-{n})")
    if chart is None and data_dir is None:
        print("\nchart: not written (give --chart FILE, or --keep)")
        return 0
    path = Path(chart) if chart else (data_dir or Path(".")) / "outcomes.svg"
    path.write_text(
        outcome_chart_svg(
            overall, f"Synthetic program: mean scores before and after ({start} to {end})"
        ),
        encoding="utf-8",
    )
    print(f"\nchart: {path}")
    return 0


#: The demo's program clinician, who attests the feedback documents.
_DEMO_CLINICIAN = {
    "resourceType": "Practitioner",
    "id": "demo-program-clinician",
    "name": [{"family": "Clinician", "given": ["Demo"]}],
}
#: LOINC 18776-5 "Plan of care note": the feedback section a clinician writes before attesting.
_PLAN_SECTION = "18776-5"


def _attest_feedback(session: Any, base: str) -> int:
    """The program clinician writes the plan into every drafted feedback document and attests
    it (status final): then it is linked from the referral and sent where consent permits.
    Returns how many were attested, or -1 (reported) when the service refused one."""
    import json

    headers = {"Content-Type": "application/fhir+json"}
    r = session.put(
        f"{base}/fhir/Practitioner/{_DEMO_CLINICIAN['id']}",
        data=json.dumps(_DEMO_CLINICIAN),
        headers=headers,
        timeout=60,
    )
    if r.status_code not in (200, 201):
        print(f"demo clinician: HTTP {r.status_code}", file=sys.stderr)
        return -1
    drafts = session.get(
        f"{base}/fhir/Composition", params={"status": "preliminary", "_count": 500}, timeout=60
    ).json()
    done = 0
    for entry in drafts.get("entry", []):
        doc = entry["resource"]
        doc.pop("meta", None)
        for section in doc.get("section", []):
            codes = [c.get("code") for c in section.get("code", {}).get("coding", [])]
            if _PLAN_SECTION in codes:
                section.pop("emptyReason", None)
                section["text"] = {
                    "status": "additional",
                    "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>Synthetic: continue '
                    "with the alumni community of practice; review in primary care.</p></div>",
                }
        doc["status"] = "final"
        doc["attester"] = [
            {
                "mode": "professional",
                "time": doc.get("date", "2027-01-01"),
                "party": {"reference": f"Practitioner/{_DEMO_CLINICIAN['id']}"},
            }
        ]
        r = session.put(
            f"{base}/fhir/Composition/{doc['id']}",
            data=json.dumps(doc),
            headers=headers,
            timeout=60,
        )
        if r.status_code != 200:
            print(f"attesting a feedback document: HTTP {r.status_code}", file=sys.stderr)
            print(r.text[:2000], file=sys.stderr)
            return -1
        done += 1
    return done


#: What the demo counts in the FHIR store afterwards (type, status filter or None).
_SUMMARY = (
    ("Patient", None),
    ("Task", "requested"),
    ("Task", "received"),
    ("Task", "accepted"),
    ("Task", "on-hold"),
    ("Task", "rejected"),
    ("Task", "in-progress"),
    ("Task", "completed"),
    ("Task", "cancelled"),
    ("Composition", "final"),
    ("QuestionnaireResponse", None),
    ("Observation", None),
    ("MedicationAdministration", None),
    ("AdverseEvent", None),
    ("Flag", "active"),
)


def _fhir_summary(session: Any, base: str) -> str:
    """What the artifacts became, counted with FHIR searches (``_summary=count``)."""
    parts = []
    for rtype, status in _SUMMARY:
        params = {"_summary": "count"}
        if status:
            params["status"] = status
        r = session.get(f"{base}/fhir/{rtype}", params=params, timeout=60)
        total = r.json().get("total", "?") if r.status_code == 200 else f"HTTP {r.status_code}"
        label = f"{rtype} {status}" if status else rtype
        parts.append(f"{label}: {total}")
    return "FHIR resources: " + ", ".join(parts)


def results_from_report(report: Any, catalogue: Any) -> list[Any]:
    """The MeasureReport of $evaluate-measure back as ``GroupResult``s (for the table and
    the chart), matched to the catalogue's instruments by panel code."""
    from fhir_kat.instruments.outcomes import GroupResult

    by_panel = {(i.panel["system"], i.panel["code"]): i for i in catalogue.instruments.values()}
    out = []
    for group in report.get("group", []):
        coding = group["code"]["coding"][0]
        instrument = by_panel[(coding["system"], coding["code"])]
        counts = {
            p["code"]["coding"][0]["code"]: int(p.get("count", 0))
            for p in group.get("population", [])
        }
        means = {
            e["url"].rsplit("/", 1)[-1]: float(e["valueQuantity"]["value"])
            for e in group.get("extension", [])
        }
        out.append(
            GroupResult(
                instrument,
                counts.get("initial-population", 0),
                counts.get("denominator", 0),
                counts.get("numerator", 0),
                means.get("mean-baseline"),
                means.get("mean-post"),
            )
        )
    return out


# ---------------------------------------------------------------------------- sandbox-check


def _sandbox_check(args: argparse.Namespace) -> int:
    from fhir_kat.exchange.partners import load_partners
    from fhir_kat.exchange.sandbox import check_partner

    partners = load_partners(load_settings())  # SettingsError → 2 in main
    partner = partners.get(args.partner)
    if partner is None:
        known = ", ".join(sorted(partners)) or "none (set FHIR_KAT_CONFIG to a TOML file)"
        print(f"fhir-kat: no partner {args.partner!r}; configured: {known}", file=sys.stderr)
        return 2
    print(f"checking {partner.name} at {partner.base_url} ...", file=sys.stderr)
    report = check_partner(partner)
    width = max((len(c.name) for c in report.checks), default=10)
    print(f"sandbox-check {partner.name} ({partner.base_url})")
    for check in report.checks:
        print(f"  {check.outcome.upper():<5} {check.name:<{width}}  {check.detail}")
    failed = sum(c.outcome == "fail" for c in report.checks)
    warned = sum(c.outcome in ("warn", "skip") for c in report.checks)
    verdict = "PASS" if report.passed else "FAIL"
    print(f"{verdict}: {len(report.checks)} checks, {failed} failed, {warned} warnings")
    if report.unreachable:
        return 3
    return 0 if report.passed else 1


# ---------------------------------------------------------------------------- export


def _export(args: argparse.Namespace) -> int:
    import os

    import requests

    from fhir_kat.exchange.bulk import BulkClient, BulkError, Downloaded, Unreachable

    base = (args.url or os.environ.get("FHIR_KAT_URL") or "http://127.0.0.1:8080/fhir").rstrip("/")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"fhir-kat: {out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        client_id, secret = _client_credentials(args)
    except ValueError as exc:
        print(f"fhir-kat: {exc}", file=sys.stderr)
        return 2
    session = requests.Session()
    try:
        token_url = args.token_url or _discover_token_url(session, base)
        tokens = _TokenCache(session, token_url, client_id, secret)
        client = BulkClient(base, tokens, session=session)
        types = [t for group in args.type for t in group.split(",") if t]
        status_url = client.kick_off(
            types=types, since=args.since, type_filters=args.type_filter, group=args.group
        )
        progress = Progress(0, "export")
        progress.status("started")
        manifest = client.wait(status_url, on_progress=progress.status, budget_seconds=args.timeout)
        progress.status("complete")
        progress.finish()
        files = Progress(len(manifest.get("output") or []), "downloading")

        def shown(done: Downloaded) -> None:
            files.advance(note=done.path.name)

        result = client.download(manifest, out, on_file=shown)
        files.finish()
    except PermissionError as exc:
        print(f"fhir-kat: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"fhir-kat: cannot reach the service ({exc})", file=sys.stderr)
        return 3
    except BulkError as exc:
        print(f"fhir-kat: {exc}", file=sys.stderr)
        return 1
    finally:
        session.close()
    for f in result.files:
        print(f"{f.type}\t{f.lines}\t{f.path}")
    for f in result.errors:
        print(f"errors\t{f.lines}\t{f.path}")
    total = sum(f.lines for f in result.files)
    print(f"exported {total} resources in {len(result.files)} files to {out}", file=sys.stderr)
    return 1 if result.errors else 0


class _TokenCache:
    """Client-credentials tokens for the export client: one at a time, renewed on request."""

    def __init__(self, session: Any, token_url: str, client_id: str, secret: str) -> None:
        self.session, self.token_url = session, token_url
        self.client_id, self._secret = client_id, secret
        self._token: str | None = None

    def __call__(self, renew: bool) -> str:
        if self._token is None or renew:
            self._token = _client_credentials_token(
                self.session, self.token_url, self.client_id, self._secret
            )
        return self._token


def _discover_token_url(session: Any, base: str) -> str:
    """The token endpoint from SMART discovery, or ``<origin>/auth/token`` (fhir_kat's own)."""
    import requests

    from fhir_kat.exchange.bulk import Unreachable

    try:
        r = session.get(f"{base}/.well-known/smart-configuration", timeout=30)
    except requests.RequestException as exc:
        raise Unreachable(type(exc).__name__) from None
    if r.status_code == 200:
        try:
            url = r.json().get("token_endpoint")
        except ValueError:
            url = None
        if isinstance(url, str) and url:
            return url
    return base.rsplit("/fhir", 1)[0] + "/auth/token"


def _client_credentials(args: argparse.Namespace) -> tuple[str, str]:
    """Client id and secret from arguments, files and environment — never a literal secret."""
    import os

    client_id = args.client_id or os.environ.get("FHIR_KAT_CLIENT_ID", "")
    if not client_id:
        raise ValueError("give --client-id or FHIR_KAT_CLIENT_ID")
    secret_file = args.client_secret_file or os.environ.get("FHIR_KAT_CLIENT_SECRET_FILE")
    if secret_file:
        try:
            return client_id, _credential_from_file(Path(secret_file), client_id)
        except OSError as exc:
            raise ValueError(f"cannot read {secret_file} ({exc.strerror})") from None
    secret = os.environ.get("FHIR_KAT_CLIENT_SECRET", "")
    if not secret:
        raise ValueError(
            "give the secret in --client-secret-file, FHIR_KAT_CLIENT_SECRET_FILE or "
            "FHIR_KAT_CLIENT_SECRET"
        )
    return client_id, secret


# ---------------------------------------------------------------------------- credentials


def _credential_from_file(path: Path, client_id: str) -> str:
    """A secret from a file: either ``fhir-kat serve``'s ``local-credentials.txt`` (lines of
    ``client_id secret``) or a file holding only the secret."""
    text = path.read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == client_id:
            return parts[1]
    if len(lines) == 1 and len(lines[0].split()) == 1:
        return lines[0]
    raise ValueError(f"no secret for {client_id} in {path}")


def _client_credentials_token(session: Any, token_url: str, client_id: str, secret: str) -> str:
    """An access token by OAuth client credentials (client_secret_basic)."""
    r = session.post(
        token_url,
        data={"grant_type": "client_credentials"},
        auth=(client_id, secret),
        headers={"Accept": "application/json"},
        timeout=30,
    )
    if r.status_code != 200:
        error = ""
        with contextlib.suppress(ValueError):
            error = str(r.json().get("error", ""))[:64]
        raise PermissionError(f"token endpoint refused ({r.status_code} {error})".strip())
    token: str = r.json()["access_token"]
    return token


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


def _since_instant(text: str) -> str:
    """``--since``: a FHIR instant as given, or a date (YYYY-MM-DD) as its first instant in UTC
    (Bulk Data's ``_since`` takes instants only)."""
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            date.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a date: {text}") from None
        return f"{text}T00:00:00Z"
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", text):
        return text
    raise argparse.ArgumentTypeError(
        f"--since takes a date (2026-01-01) or an instant (2026-01-01T00:00:00Z), not {text}"
    )


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
    except KeyboardInterrupt:
        print("fhir-kat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
