"""Service settings: one frozen value built from ``FHIR_KAT_*`` variables and an optional TOML file.

Owns: defaults, parsing and validation of every setting, with one clear message listing every bad
value. Must not: import flask or the store, or read settings anywhere but here (the app factory
receives a ``Settings``; nothing reads the environment behind its back).

Precedence: environment variable > TOML file named by ``FHIR_KAT_CONFIG`` > default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

#: The canonical base of a deployment that names none (the Quick start): a name under the
#: reserved ``.localhost`` domain (RFC 6761), which says "this machine, published nowhere" and
#: can never collide with a real organisation's URLs (ADR 0021).
LOCAL_CANONICAL_BASE = "http://fhir-kat.localhost/fhir"
#: What a base may contain: a URL without spaces, quotes or the characters that would change
#: the meaning of the JSON and YAML files it is written into.
_BASE_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%-]+)*$")


class SettingsError(ValueError):
    """Raised at start-up with every problem found, one per line."""


@dataclass(frozen=True)
class Settings:
    #: SQLAlchemy URL. Empty = the embedded SQLite file ``<data_dir>/fhir_kat.sqlite3``.
    database_url: str = ""
    #: Where the embedded database and local secrets live (created on first start).
    data_dir: Path = Path("var")
    host: str = "127.0.0.1"
    port: int = 8080
    #: Public base URL of the FHIR endpoint (e.g. behind a reverse proxy). Empty = from the
    #: request's Host header, which a client chooses: allowed only for a server bound to
    #: loopback or with ``allow_host_derived_urls`` (``host_derived_urls_problem``).
    public_base_url: str = ""
    #: Serve without ``public_base_url`` on a non-loopback address anyway (a test rig behind a
    #: trusted proxy that fixes Host): links, the token URL and the client-assertion ``aud``
    #: accepted then follow each request's Host header.
    allow_host_derived_urls: bool = False
    #: The base of every canonical URL this deployment defines (CodeSystems, ValueSets,
    #: Questionnaires, profiles: ``<base>/CodeSystem/kat-route``). Empty = ``public_base_url``,
    #: else ``LOCAL_CANONICAL_BASE``. Fixed for a database's life (ADR 0021).
    canonical_base: str = ""
    #: The base of the identifier systems the service assigns (``<base>/consents``). Empty =
    #: ``<canonical base>/sid``. Fixed for a database's life, like the canonical base.
    identifier_base: str = ""
    #: Largest request body accepted, in bytes (413 above it).
    max_body_bytes: int = 8 * 1024 * 1024
    #: Deepest JSON nesting accepted (FHIR resources rarely exceed 15; 400 above it).
    max_json_depth: int = 48
    #: Most entries a Bundle in a request may hold (transaction, batch, message; 413 above).
    max_bundle_entries: int = 1000
    default_page_size: int = 50
    max_page_size: int = 1000
    #: Program protocol (sessions, routes, dose ranges). Empty = the shipped default.
    program_protocol: str = ""
    #: Safety-signal rules (vital-sign limits, dose ceilings, ...). Empty = the shipped
    #: ``mappings/program/safety.yaml``; ``[program.safety]`` overrides single values.
    safety_rules: str = ""
    log_level: str = "INFO"
    #: PEM private key (EC P-256) signing access tokens. Empty = a key generated on first start
    #: at ``<data_dir>/token-signing-key.pem``. Processes on several hosts must share one key.
    signing_key_file: str = ""
    #: Access-token lifetime; SMART Backend Services caps it at 300 s.
    token_lifetime_seconds: int = 300
    #: Where Bulk $export writes NDJSON files (shared by all processes). Empty = <data_dir>/exports.
    export_dir: str = ""
    #: Requests per minute per client before 429 (per process); 0 disables the limit.
    rate_limit_per_minute: int = 1200
    #: Failed sign-ins (token endpoint, browser) per source address and client id in 10
    #: minutes before 429 (per process); 0 disables both failure limits.
    auth_failure_limit: int = 10
    #: Failed sign-ins per source address (an IPv6 /64) in 10 minutes, whatever client ids it
    #: presents, before 429: spraying client ids is limited too.
    auth_failure_source_limit: int = 50
    #: Reverse proxies in front of the service that append to ``X-Forwarded-For`` (0: none, the
    #: peer address is the client's). Only the client address is taken from the header.
    proxy_hops: int = 0
    #: The installation's secret for ids derived from business identifiers (PHNs). Empty = a
    #: secret generated on first start at ``<data_dir>/id-secret``. Hosts must share it.
    id_secret_file: str = ""
    #: Aggregates leaving the program withhold counts of fewer people than this (small-cell
    #: protection: docs/security.md); 1 withholds nothing.
    min_cell_size: int = 5
    #: Fail a request when a write-pipeline step stores a type its row does not name, or a
    #: check changes what it may not (fhir_kat/services/pipeline.py). Off: logged instead, and
    #: the write goes on. The test suite turns it on.
    pipeline_strict: bool = False
    #: The HL7 v2 MLLP listener (``fhir-kat mllp``): where it listens, TLS (a certificate and
    #: key; with a client CA, senders must present a certificate it signed), the MSH-11
    #: processing ids taken (comma-separated), an idle connection's lifetime and the largest
    #: message. Senders are ``[v2_senders.<name>]`` tables (docs/integrators.md).
    mllp_host: str = "127.0.0.1"
    mllp_port: int = 2575
    mllp_tls_cert_file: str = ""
    mllp_tls_key_file: str = ""
    mllp_tls_client_ca_file: str = ""
    mllp_processing_ids: str = "P"
    mllp_idle_timeout_seconds: int = 300
    mllp_max_message_bytes: int = 1024 * 1024
    #: The web pages' client-secret sign-in (``/app/login``), meant for local development:
    #: "auto" = offered only while no ``[oidc.*]`` identity provider is configured, "on" =
    #: offered beside them, "off" = never (docs/security.md, "Browser sessions").
    client_sign_in: str = "auto"
    #: A browser session ends after this many seconds without a request ...
    session_idle_seconds: int = 30 * 60
    #: ... and this many seconds after sign-in, whatever happens.
    session_absolute_seconds: int = 8 * 60 * 60
    #: Raw ``[clients.*]``/``[partners.*]`` tables from the TOML file, validated by their owners.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fhir_kat.sqlite3').resolve()}"

    @property
    def effective_canonical_base(self) -> str:
        return self.canonical_base or self.public_base_url or LOCAL_CANONICAL_BASE

    @property
    def effective_identifier_base(self) -> str:
        return self.identifier_base or f"{self.effective_canonical_base}/sid"

    @property
    def uses_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")


_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "port": (1, 65535),
    "max_body_bytes": (1024, 1024 * 1024 * 1024),
    "max_json_depth": (8, 1000),
    "max_bundle_entries": (1, 100_000),
    "default_page_size": (1, 10_000),
    "max_page_size": (1, 100_000),
    "token_lifetime_seconds": (30, 300),
    "rate_limit_per_minute": (0, 1_000_000),
    "auth_failure_limit": (0, 1_000_000),
    "auth_failure_source_limit": (1, 1_000_000),
    "proxy_hops": (0, 10),
    "min_cell_size": (1, 1000),
    "mllp_port": (0, 65535),
    "mllp_idle_timeout_seconds": (1, 86_400),
    "mllp_max_message_bytes": (1024, 64 * 1024 * 1024),
    "session_idle_seconds": (60, 24 * 60 * 60),
    "session_absolute_seconds": (5 * 60, 7 * 24 * 60 * 60),
}
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR"}
_SECTIONS = {
    "clients",
    "partners",
    "program",
    "security",
    "exchange",
    "v2_senders",
    "oidc",
    "cds_hooks",
    "smart",
}
_CLIENT_SIGN_IN = ("auto", "on", "off")


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from the environment (default ``os.environ``), the TOML file and overrides."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    problems: list[str] = []
    extra: dict[str, Any] = {}

    config_path = env.get("FHIR_KAT_CONFIG", "")
    if config_path:
        try:
            with open(config_path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise SettingsError(f"FHIR_KAT_CONFIG: file not found: {config_path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"FHIR_KAT_CONFIG: not valid TOML ({exc})") from None
        for key, value in doc.get("service", {}).items():
            raw[key] = value
        for key, value in doc.items():
            if key == "service":
                continue
            if key in _SECTIONS:
                extra[key] = value
            else:
                problems.append(f"{config_path}: unknown section [{key}]")

    known = {f.name for f in fields(Settings)} - {"extra"}
    for key in list(raw):
        if key not in known:
            problems.append(f"[service].{key}: unknown setting")
            raw.pop(key)
    for name in known:
        env_name = f"FHIR_KAT_{name.upper()}"
        if env_name in env:
            raw[name] = env[env_name]
    raw.update(overrides)

    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name not in raw or f.name == "extra":
            continue
        value = raw[f.name]
        try:
            values[f.name] = _coerce(f.name, value)
        except ValueError as exc:
            problems.append(f"{f.name} (FHIR_KAT_{f.name.upper()}): {exc}")
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    settings = replace(Settings(), **values, extra=extra)
    if settings.default_page_size > settings.max_page_size:
        raise SettingsError("invalid settings:\n  default_page_size exceeds max_page_size")
    if settings.session_idle_seconds > settings.session_absolute_seconds:
        raise SettingsError(
            "invalid settings:\n  session_idle_seconds exceeds session_absolute_seconds"
        )
    return settings


def _coerce(name: str, value: Any) -> Any:
    if name in _INT_BOUNDS:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number, got {value!r}") from None
        low, high = _INT_BOUNDS[name]
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number
    if name == "data_dir":
        return Path(str(value))
    if name == "log_level":
        level = str(value).upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"must be one of {sorted(_LOG_LEVELS)}, got {value!r}")
        return level
    if name == "database_url":
        url = str(value)
        if url and not url.startswith(("sqlite", "postgresql")):
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        if url.startswith("postgresql://") or url.startswith("postgresql+psycopg2"):
            raise ValueError("use the psycopg 3 driver: postgresql+psycopg://...")
        return url
    if name == "client_sign_in":
        mode = str(value).lower()
        if mode not in _CLIENT_SIGN_IN:
            raise ValueError(f"must be one of {', '.join(_CLIENT_SIGN_IN)}, got {value!r}")
        return mode
    if name == "allow_host_derived_urls":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("", "0", "false", "no", "off"):
            return False
        raise ValueError(f"expected 1/true or 0/false, got {value!r}")
    if name in ("canonical_base", "identifier_base"):
        url = str(value).rstrip("/")
        if url and not _BASE_URL.match(url):
            raise ValueError("must be an http(s) URL without query, fragment or spaces")
        return url
    if name == "public_base_url":
        url = str(value).rstrip("/")
        if url and not url.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return url
    return str(value)


def host_derived_urls_problem(settings: Settings, bound_host: str | None) -> str | None:
    """Why a server bound to ``bound_host`` (None: unknown, e.g. under gunicorn) must not take
    its public URLs from the request's Host header, or None when it may.

    Without ``public_base_url`` the token URL — the only client-assertion ``aud`` accepted —
    links and ``Location`` headers follow whatever Host a client sends, so an assertion made
    for another server could be replayed here with that server's name in Host. That is fine on
    loopback (local development: only this machine can connect) and nowhere else."""
    if settings.public_base_url or settings.allow_host_derived_urls:
        return None
    if bound_host is not None and _is_loopback(bound_host):
        return None
    where = f"on {bound_host}" if bound_host else "under a WSGI server"
    return (
        f"FHIR_KAT_PUBLIC_BASE_URL is not set and the service would listen {where}: set it to "
        "the external https://.../fhir URL (links, the token URL and the accepted client-"
        "assertion aud must not follow the request's Host header), or bind to 127.0.0.1 for "
        "local use, or set FHIR_KAT_ALLOW_HOST_DERIVED_URLS=1 if a trusted proxy fixes Host"
    )


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
