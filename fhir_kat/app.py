"""The application factory: ``create_app(settings)`` wires settings, store, services and
blueprints. State lives in ``app.extensions["fhir_kat"]``, never in module globals."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from fhir_kat.api.errors import register_error_handlers
from fhir_kat.canonical import (
    check_settings,
)
from fhir_kat.clinical.protocol import load_protocol
from fhir_kat.clinical.safety import SafetyRulesError, load_safety_rules
from fhir_kat.exchange import PartnerConfig, load_partners
from fhir_kat.exchange.netguard import policy_from_settings
from fhir_kat.exchange.plan import log_partner_plan
from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.logging import configure_logging
from fhir_kat.security.cds_clients import CdsRequestVerifier, load_cds_hooks
from fhir_kat.security.clients import ClientRegistry, load_clients
from fhir_kat.security.consent import ConsentDecisionPoint
from fhir_kat.security.identity import (
    PUBLIC_NAMESPACE,
    fingerprint,
    install_namespace,
    load_id_secret,
)
from fhir_kat.security.oidc import OpenIdClient, grant_configured, load_providers
from fhir_kat.security.ratelimit import FailureLimiter, RateLimiter
from fhir_kat.security.sessions import SessionStore
from fhir_kat.security.smart import EhrAuthorizationServer, launch_grant_configured, load_ehrs
from fhir_kat.security.tokens import Principal, TokenService, load_signing_key
from fhir_kat.services.artifacts import ArtifactService, install_referral_form
from fhir_kat.services.export import ExportService
from fhir_kat.services.fhir_rest import FhirService
from fhir_kat.services.instruments import InstrumentService
from fhir_kat.services.outcomes import OutcomeService
from fhir_kat.services.pipeline import Services, build_services, write_pipeline
from fhir_kat.services.pipeline import install as install_pipeline
from fhir_kat.services.smart_launch import LaunchChart
from fhir_kat.services.v2_referrals import load_senders
from fhir_kat.settings import Settings, SettingsError, load_settings
from fhir_kat.store import Store
from fhir_kat.workflow.triage import triage_settings

log = logging.getLogger("fhir_kat.http")
#: A client-sent ``X-Request-Id`` worth keeping; anything else is replaced by a new UUID.
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class KatState:
    settings: Settings
    store: Store
    #: The domain services (typed; fhir_kat/services/pipeline.py builds them).
    services: Services
    clock: Callable[[], datetime]
    clients: ClientRegistry
    tokens: TokenService
    consent: ConsentDecisionPoint
    rate_limiter: RateLimiter
    auth_failures: FailureLimiter
    export: ExportService
    partners: Mapping[str, PartnerConfig]
    #: Browser sessions (web pages) and the OpenID Providers people sign in through.
    sessions: SessionStore | None = None
    identity_providers: dict[str, OpenIdClient] = field(default_factory=dict)
    #: Verifies the JWT of an EMR calling the CDS Hooks services (``[cds_hooks.clients.*]``).
    cds_verifier: CdsRequestVerifier | None = None
    #: Hook calls per registered EHR (``[cds_hooks] rate_limit_per_minute``).
    cds_rate_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))
    #: EHRs that launch the referral form as a SMART app (``[smart.ehrs.*]``), by name, and
    #: the prefill read from their charts (services/smart_launch.py).
    smart_ehrs: dict[str, EhrAuthorizationServer] = field(default_factory=dict)
    smart_chart: LaunchChart | None = None

    # The services most routes use, by their short names.
    @property
    def fhir(self) -> FhirService:
        return self.services.fhir

    @property
    def outcomes(self) -> OutcomeService:
        return self.services.outcomes

    @property
    def artifacts(self) -> ArtifactService:
        return self.services.artifacts

    @property
    def instruments(self) -> InstrumentService:
        return self.services.instruments


def create_app(
    settings: Settings | None = None,
    *,
    clock: Any = None,
) -> Flask:
    settings = settings or load_settings()
    check_settings(settings)
    configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    now: Callable[[], datetime] = clock or utcnow
    # Every configuration problem is found before anything opens a database connection.
    partners = load_partners(settings)
    log_partner_plan(partners)
    endpoint_policy = policy_from_settings(settings)
    clients = load_clients(settings.extra.get("clients", {}), settings.data_dir)
    v2_senders = load_senders(settings.extra.get("v2_senders", {}), clients)
    identity_providers = {
        pid: OpenIdClient(provider)
        for pid, provider in load_providers(settings.extra.get("oidc", {}), os.environ).items()
    }
    cds_hooks = load_cds_hooks(settings.extra.get("cds_hooks", {}))
    smart_ehrs = {
        name: EhrAuthorizationServer(ehr)
        for name, ehr in load_ehrs(settings.extra.get("smart", {}), os.environ).items()
    }
    program = settings.extra.get("program", {})
    catalogue = load_catalogue(program.get("instruments", {}), outcomes=program.get("outcomes"))
    try:
        triage_config = triage_settings(program.get("triage", {}))
    except ValueError as exc:
        raise SettingsError(f"invalid settings:\n  {exc}") from None
    protocol = load_protocol(Path(settings.program_protocol) if settings.program_protocol else None)
    try:
        safety_rules = load_safety_rules(
            program.get("safety", {}),
            Path(settings.safety_rules) if settings.safety_rules else None,
        )
    except SafetyRulesError as exc:
        raise SettingsError(f"[program.safety]: {exc}") from None
    store = Store(settings.effective_database_url, clock=now)
    store.create_schema()  # fhir_kat.exchange (imported above) adds the outbox table
    store.claim_bases()  # the bases it was written with are this process's (ADR 0021)
    id_namespace = _id_namespace(settings, store)
    consent = ConsentDecisionPoint()
    services = build_services(
        store,
        clock=now,
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
        catalogue=catalogue,
        min_cell_size=settings.min_cell_size,
        triage=triage_config,
        protocol=protocol,
        safety_rules=safety_rules,
        partners=partners,
        clients=clients,
        consent=consent,
        endpoint_policy=endpoint_policy,
        id_namespace=id_namespace,
        v2_senders=v2_senders,
        mllp_processing_ids=tuple(
            p.strip() for p in settings.mllp_processing_ids.split(",") if p.strip()
        ),
        cds_hooks=cds_hooks,
    )
    # What a write sets off, in order: fhir_kat/services/pipeline.py.
    install_pipeline(services.fhir, write_pipeline(services), strict=settings.pipeline_strict)
    services.outcomes.install_measure()
    services.instruments.install_questionnaires()
    install_referral_form(services.fhir)  # Questionnaire/kat-referral, the referral as an SDC form
    key_path = Path(settings.signing_key_file or settings.data_dir / "token-signing-key.pem")
    tokens = TokenService(
        load_signing_key(key_path),
        issuer=settings.public_base_url or "urn:fhir-kat",
        lifetime_seconds=settings.token_lifetime_seconds,
        store=store,
        clock=now,
        clients=clients,
    )
    tokens.person_grant_configured = partial(
        _person_grant_configured, identity_providers, smart_ehrs
    )

    app = Flask("fhir_kat")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["KAT_MAX_JSON_DEPTH"] = settings.max_json_depth
    app.config["KAT_MAX_BUNDLE_ENTRIES"] = settings.max_bundle_entries
    app.config["KAT_PUBLIC_BASE_URL"] = settings.public_base_url
    app.extensions["fhir_kat"] = KatState(
        settings=settings,
        store=store,
        services=services,
        clock=now,
        clients=clients,
        tokens=tokens,
        consent=consent,
        rate_limiter=RateLimiter(settings.rate_limit_per_minute),
        auth_failures=FailureLimiter(
            settings.auth_failure_limit, source_failures=settings.auth_failure_source_limit
        ),
        export=ExportService(
            store, Path(settings.export_dir or settings.data_dir / "exports"), now
        ),
        partners=partners,
        sessions=SessionStore(
            store,
            idle_seconds=settings.session_idle_seconds,
            absolute_seconds=settings.session_absolute_seconds,
        ),
        identity_providers=identity_providers,
        cds_verifier=CdsRequestVerifier(cds_hooks, store),
        cds_rate_limiter=RateLimiter(cds_hooks.rate_limit_per_minute),
        smart_ehrs=smart_ehrs,
        smart_chart=LaunchChart(catalogue),
    )

    from fhir_kat.api import auth
    from fhir_kat.api.artifacts import bp as artifacts_bp
    from fhir_kat.api.cds_hooks import bp as cds_hooks_bp
    from fhir_kat.api.definitions import bp as definitions_bp
    from fhir_kat.api.deliveries import bp as deliveries_bp
    from fhir_kat.api.export import bp as export_bp
    from fhir_kat.api.feedback import bp as feedback_bp
    from fhir_kat.api.fhir import bp as fhir_bp
    from fhir_kat.api.flags import bp as flags_bp
    from fhir_kat.api.health import bp as health_bp
    from fhir_kat.api.instruments import bp as instruments_bp
    from fhir_kat.api.measure import bp as measure_bp
    from fhir_kat.api.messaging import bp as messaging_bp
    from fhir_kat.api.openapi import bp as openapi_bp
    from fhir_kat.api.terminology import bp as terminology_bp

    app.register_blueprint(auth.bp)
    app.register_blueprint(export_bp)
    app.register_blueprint(artifacts_bp)
    app.register_blueprint(deliveries_bp)
    app.register_blueprint(openapi_bp)
    app.register_blueprint(measure_bp)
    app.register_blueprint(messaging_bp)
    app.register_blueprint(feedback_bp)
    app.register_blueprint(flags_bp)
    app.register_blueprint(instruments_bp)
    app.register_blueprint(terminology_bp)
    app.register_blueprint(definitions_bp)
    app.register_blueprint(fhir_bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(cds_hooks_bp)
    register_error_handlers(app)
    _install_request_logging(app)
    from fhir_kat.api import inputs

    inputs.install(app)  # before the session and bearer checks: unusable input is a 400 first
    # The web pages' session check (fhir_kat/web) must run before auth.install's bearer check.
    from fhir_kat.web import register as register_web

    register_web(app)
    auth.install(app)
    if settings.proxy_hops:
        # The client address (failed sign-in limits, logs) from the proxies' X-Forwarded-For;
        # public URLs come from public_base_url, not from forwarded host headers.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops)  # type: ignore[method-assign]
    return app


def _person_grant_configured(
    providers: Mapping[str, OpenIdClient],
    ehrs: Mapping[str, EhrAuthorizationServer],
    principal: Principal,
) -> bool:
    """A person's grant is still what its sign-in (OpenID Provider) or launch (SMART EHR)
    registration gives."""
    return grant_configured(providers, principal) or launch_grant_configured(ehrs, principal)


def _id_namespace(settings: Settings, store: Store) -> uuid.UUID:
    """The namespace of ids derived from business identifiers: keyed by this installation's
    secret, so a PHN does not give away its Patient's id (docs/security.md). A database that
    held data before it had one keeps the repository's namespace (its ids must not change);
    a database written under another secret is refused: its re-sent referrals would become
    second copies."""
    path = Path(settings.id_secret_file or settings.data_dir / "id-secret")
    namespace = install_namespace(load_id_secret(path))
    recorded = store.claim_id_namespace(fingerprint(namespace))
    if recorded == "legacy":
        log.warning(
            "this database's ids were derived without an installation secret: a PHN's Patient "
            "id can be computed by anyone who has the repository (docs/security.md, "
            '"Identifiers")'
        )
        return PUBLIC_NAMESPACE
    if recorded != fingerprint(namespace):
        raise SettingsError(
            f"id secret {path} is not the one this database was written with: its "
            "deterministic ids (one PHN, one Patient) would change and re-sent referrals "
            "would be stored twice. Restore that secret (FHIR_KAT_ID_SECRET_FILE)."
        )
    return namespace


def _install_request_logging(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.kat_started = time.perf_counter()
        # A client's own id is kept only in a safe, bounded form: it is logged and echoed.
        sent = request.headers.get("X-Request-Id", "")
        g.kat_request_id = sent if REQUEST_ID.fullmatch(sent) else str(uuid.uuid4())

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("kat_request_id", "")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        # The route pattern, never the URL: query strings and paths can carry identifiers.
        rule = request.url_rule.rule if request.url_rule else "<unmatched>"
        elapsed = (time.perf_counter() - g.get("kat_started", time.perf_counter())) * 1000
        log.info(
            "request",
            extra={
                "request_id": g.get("kat_request_id"),
                "method": request.method,
                "route": rule,
                "status": response.status_code,
                "ms": round(elapsed, 1),
            },
        )
        return response


def utcnow() -> datetime:
    return datetime.now(UTC)
