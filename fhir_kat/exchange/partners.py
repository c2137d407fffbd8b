"""Partner configuration: the health-authority EHRs fhir_kat delivers to.

Owns: parsing and validating the raw ``[partners.<name>]`` TOML tables (``Settings.extra``) into
frozen ``PartnerConfig`` values, resolving secrets from the environment and loading private keys,
with one ``SettingsError`` listing every problem. Must not: make network calls, touch the
database, or keep a secret in a ``repr`` or a log line.

Example (``docs/exchange.md`` has the full reference)::

    [partners.island-ehr]
    base_url = "https://ehr.example.org/fhir"
    auth = "smart_backend"
    token_url = "https://ehr.example.org/oauth/token"
    client_id = "fhir-kat"
    private_key_file = "/etc/fhir_kat/island-ehr.pem"
    algorithm = "ES384"
    kid = "fhir-kat-2026"
    scopes = ["system/Patient.cu", "system/Observation.cu"]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_kat.artifacts import KINDS
from fhir_kat.settings import Settings, SettingsError

AuthKind = Literal["none", "client_credentials", "smart_backend"]
WriteMode = Literal["conditional-create", "put"]
#: Conditional create, a resource with no business identifier: PUT with our id, or refuse.
WithoutIdentifier = Literal["put", "dead-letter"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

AUTH_KINDS: tuple[AuthKind, ...] = ("none", "client_credentials", "smart_backend")
WRITE_MODES: tuple[WriteMode, ...] = ("conditional-create", "put")
WITHOUT_IDENTIFIER: tuple[WithoutIdentifier, ...] = ("put", "dead-letter")
DerivedResources = Literal["with-source", "none"]
DERIVED_RESOURCES: tuple[DerivedResources, ...] = ("with-source", "none")
# SMART Backend Services allows exactly these two (SMART App Launch 2.x, "Backend Services").
SMART_ALGORITHMS = ("RS384", "ES384")

_KNOWN_KEYS = {
    "base_url",
    "auth",
    "token_url",
    "client_id",
    "client_secret",
    "client_secret_env",
    "private_key_file",
    "algorithm",
    "kid",
    "scopes",
    "timeout_seconds",
    "write_mode",
    "resource_types",
    "artifact_kinds",
    "max_attempts",
    "backoff_base_seconds",
    "backoff_cap_seconds",
    "enabled",
    "organization",
    "source_identifier_system",
    "without_identifier",
    "care_team",
    "derived_resources",
}

#: What a partner can ask for: the artifact kinds of /api/v1, safety Flags, and the status of
#: the referrals its organisation sent (a referrer's EMR; ``organization`` names the referrer).
REFERRAL_STATUS = "referral-status"
SAFETY_FLAGS = "safety-flags"
DELIVERABLE_KINDS = frozenset(KINDS) | {SAFETY_FLAGS, REFERRAL_STATUS}

#: The v3 PurposeOfUse a delivery is disclosed under, asked of the consent decision point at
#: send time for a partner outside the program. Artifacts serve the health authority's
#: quality-improvement project: healthcare operations (HOPERAT, DOMAIN.md). A safety Flag tells
#: clinicians of a risk so that they act on it, and the referrer's feedback document informs
#: its care of the participant: treatment (TREAT). A ``care_team`` partner is asked nothing.
DEFAULT_PURPOSE = "HOPERAT"
KIND_PURPOSES = {SAFETY_FLAGS: "TREAT", REFERRAL_STATUS: "TREAT"}


def purpose_for(kind: str) -> str:
    return KIND_PURPOSES.get(kind, DEFAULT_PURPOSE)


@dataclass(frozen=True)
class AuthConfig:
    kind: AuthKind = "none"
    token_url: str = ""
    client_id: str = ""
    #: Resolved at load time (from ``client_secret_env`` when given); never printed.
    client_secret: str = field(default="", repr=False)
    private_key: PrivateKey | None = field(default=None, repr=False, compare=False)
    algorithm: str = ""
    kid: str = ""
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PartnerConfig:
    name: str
    base_url: str
    auth: AuthConfig = field(default_factory=AuthConfig)
    timeout_seconds: float = 30.0
    write_mode: WriteMode = "conditional-create"
    #: ``None`` = every resource type / artifact kind.
    resource_types: frozenset[str] | None = None
    artifact_kinds: frozenset[str] | None = None
    max_attempts: int = 12
    backoff_base_seconds: float = 2.0
    backoff_cap_seconds: float = 3600.0
    enabled: bool = True
    #: The receiving organisation as ``system|value``: the actor a consent decision names.
    organization: str | None = None
    #: Conditional create: the identifier system under which a resource without a business
    #: identifier is sent, with our (deterministic) id as the value. ``None``: such a
    #: resource goes by ``without_identifier``.
    source_identifier_system: str | None = None
    #: Conditional create, a resource with no business identifier (and no
    #: ``source_identifier_system``): ``put`` sends it as ``PUT <Type>/<our id>`` in the same
    #: transaction; ``dead-letter`` refuses the delivery, naming the resource, when it is sent.
    without_identifier: WithoutIdentifier = "put"
    #: The program's own care team (its clinical EHR or on-call system): what it receives is a
    #: treatment disclosure inside the circle of care — purpose TREAT, no sharing consent
    #: asked. False: a party outside the program; each patient delivery asks the consent
    #: decision point at send time (``services/delivery.py`` names the purpose per kind).
    care_team: bool = False
    #: ``with-source``: resources the program derives from what a partner receives (the score
    #: Observations extracted from a QuestionnaireResponse, with their Provenance) travel in
    #: the same delivery as their source; ``none``: the source alone.
    derived_resources: DerivedResources = "with-source"

    def wants(self, artifact_kind: str) -> bool:
        return self.enabled and (
            self.artifact_kinds is None or artifact_kind in self.artifact_kinds
        )

    def accepts_type(self, resource_type: str) -> bool:
        return self.resource_types is None or resource_type in self.resource_types


def load_partners(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, PartnerConfig]:
    """Every configured partner, validated; ``SettingsError`` names every problem at once —
    including a partner that could never receive what it asks for (``plan.partner_problems``)."""
    from fhir_kat.exchange.plan import partner_problems  # plan reads the mappings

    raw = settings.extra.get("partners", {})
    partners = parse_partners(raw, environ=environ, base_dir=None)
    problems = partner_problems(partners)
    if problems:
        raise SettingsError("invalid partner settings:\n  " + "\n  ".join(problems))
    return partners


def parse_partners(
    raw: Any,
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> dict[str, PartnerConfig]:
    """Parse the ``[partners]`` table. ``base_dir`` resolves relative key paths (default: cwd)."""
    env = os.environ if environ is None else environ
    if not isinstance(raw, Mapping):
        raise SettingsError("invalid partner settings:\n  [partners] must be a table")
    problems: list[str] = []
    partners: dict[str, PartnerConfig] = {}
    for name, table in raw.items():
        where = f"[partners.{name}]"
        if not isinstance(table, Mapping):
            problems.append(f"{where}: must be a table")
            continue
        parsed = _parse_one(str(name), table, env, base_dir, where, problems)
        if parsed is not None:
            partners[str(name)] = parsed
    if problems:
        raise SettingsError("invalid partner settings:\n  " + "\n  ".join(problems))
    return partners


def _parse_one(
    name: str,
    table: Mapping[str, Any],
    env: Mapping[str, str],
    base_dir: Path | None,
    where: str,
    problems: list[str],
) -> PartnerConfig | None:
    before = len(problems)
    for key in sorted(set(table) - _KNOWN_KEYS):
        problems.append(f"{where}.{key}: unknown setting")
    if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
        problems.append(f"{where}: the name must be letters, digits, '-' or '_' (at most 64)")

    base_url = _text(table, "base_url", where, problems, required=True).rstrip("/")
    if base_url and not base_url.startswith(("https://", "http://")):
        problems.append(f"{where}.base_url: must be an http(s) URL")

    timeout = _number(table, "timeout_seconds", 30.0, 0.1, 600.0, where, problems)
    max_attempts = int(_number(table, "max_attempts", 12, 1, 1000, where, problems, whole=True))
    base = _number(table, "backoff_base_seconds", 2.0, 0.01, 86_400.0, where, problems)
    cap = _number(table, "backoff_cap_seconds", 3600.0, 0.01, 7 * 86_400.0, where, problems)
    if cap < base:
        problems.append(f"{where}.backoff_cap_seconds: must not be below backoff_base_seconds")

    write_mode = table.get("write_mode", "conditional-create")
    if write_mode not in WRITE_MODES:
        problems.append(f"{where}.write_mode: must be one of {list(WRITE_MODES)}")
    without_identifier = table.get("without_identifier", "put")
    if without_identifier not in WITHOUT_IDENTIFIER:
        problems.append(f"{where}.without_identifier: must be one of {list(WITHOUT_IDENTIFIER)}")
    care_team = table.get("care_team", False)
    if not isinstance(care_team, bool):
        problems.append(f"{where}.care_team: must be true or false")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        problems.append(f"{where}.enabled: must be true or false")
    derived = table.get("derived_resources", "with-source")
    if derived not in DERIVED_RESOURCES:
        problems.append(f"{where}.derived_resources: must be one of {list(DERIVED_RESOURCES)}")

    organization = table.get("organization")
    if organization is not None and (
        not isinstance(organization, str)
        or organization.count("|") != 1
        or "|" in (organization[0], organization[-1])
    ):
        problems.append(f"{where}.organization: must be an identifier as system|value")
    source_system = table.get("source_identifier_system")
    if source_system is not None and (
        not isinstance(source_system, str)
        or not source_system.startswith(("https://", "http://", "urn:"))
        or "|" in source_system
    ):
        problems.append(f"{where}.source_identifier_system: must be an absolute URI without '|'")
    resource_types = _name_set(table, "resource_types", where, problems)
    artifact_kinds = _name_set(table, "artifact_kinds", where, problems)
    for unknown in sorted((artifact_kinds or frozenset()) - DELIVERABLE_KINDS):
        problems.append(
            f"{where}.artifact_kinds: unknown kind {unknown!r} "
            f"(one of {', '.join(sorted(DELIVERABLE_KINDS))})"
        )
    if artifact_kinds and REFERRAL_STATUS in artifact_kinds and not organization:
        problems.append(f"{where}.organization: a {REFERRAL_STATUS} partner names the referrer")
    if artifact_kinds and REFERRAL_STATUS in artifact_kinds and care_team is True:
        problems.append(
            f"{where}.care_team: a {REFERRAL_STATUS} partner is a referrer, outside the program"
        )
    if artifact_kinds and SAFETY_FLAGS in artifact_kinds and "care_team" not in table:
        # Who may receive a safety signal without a sharing consent is a decision, never a
        # default: the program's own clinicians (true) or a party outside the program (false).
        problems.append(
            f"{where}.care_team: a partner that asks for {SAFETY_FLAGS} says whether it is the "
            "program's own care team (true: each Flag goes at once, purpose TREAT, no sharing "
            "consent asked) or a party outside the program (false: each Flag waits for the "
            "participant's sharing consent naming its organization for TREAT)"
        )
    auth = _parse_auth(table, env, base_dir, where, problems)

    if len(problems) > before or auth is None:
        return None
    return PartnerConfig(
        name=name,
        base_url=base_url,
        auth=auth,
        timeout_seconds=timeout,
        write_mode=write_mode,
        resource_types=resource_types,
        artifact_kinds=artifact_kinds,
        max_attempts=max_attempts,
        backoff_base_seconds=base,
        backoff_cap_seconds=cap,
        enabled=bool(enabled),
        organization=organization,
        source_identifier_system=source_system,
        without_identifier=without_identifier,
        care_team=care_team is True,
        derived_resources=derived,
    )


def _parse_auth(
    table: Mapping[str, Any],
    env: Mapping[str, str],
    base_dir: Path | None,
    where: str,
    problems: list[str],
) -> AuthConfig | None:
    kind = table.get("auth", "none")
    if kind not in AUTH_KINDS:
        problems.append(f"{where}.auth: must be one of {list(AUTH_KINDS)}")
        return None
    if kind == "none":
        for key in ("token_url", "client_id", "client_secret", "client_secret_env"):
            if key in table:
                problems.append(f"{where}.{key}: only used with auth = client_credentials")
        return AuthConfig()

    token_url = _text(table, "token_url", where, problems, required=True)
    if token_url and not token_url.startswith(("https://", "http://")):
        problems.append(f"{where}.token_url: must be an http(s) URL")
    client_id = _text(table, "client_id", where, problems, required=True)
    scopes = _scopes(table, where, problems)

    if kind == "client_credentials":
        secret = _secret(table, env, where, problems)
        for key in ("private_key_file", "algorithm", "kid"):
            if key in table:
                problems.append(f"{where}.{key}: only used with auth = smart_backend")
        return AuthConfig(
            kind="client_credentials",
            token_url=token_url,
            client_id=client_id,
            client_secret=secret,
            scopes=scopes,
        )

    for key in ("client_secret", "client_secret_env"):
        if key in table:
            problems.append(f"{where}.{key}: smart_backend signs a JWT; it takes no secret")
    algorithm = _text(table, "algorithm", where, problems, required=True)
    if algorithm and algorithm not in SMART_ALGORITHMS:
        problems.append(f"{where}.algorithm: must be one of {list(SMART_ALGORITHMS)}")
    kid = _text(table, "kid", where, problems, required=True)
    key_path = _text(table, "private_key_file", where, problems, required=True)
    private_key = None
    if key_path:
        path = Path(key_path)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        private_key = _load_key(path, algorithm, where, problems)
    return AuthConfig(
        kind="smart_backend",
        token_url=token_url,
        client_id=client_id,
        private_key=private_key,
        algorithm=algorithm,
        kid=kid,
        scopes=scopes,
    )


def _load_key(path: Path, algorithm: str, where: str, problems: list[str]) -> PrivateKey | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{where}.private_key_file: cannot read {path} ({exc.strerror})")
        return None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # The message of a key-parsing error can quote key material: say only what it is not.
        problems.append(f"{where}.private_key_file: {path} is not an unencrypted PEM private key")
        return None
    if algorithm == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
            problems.append(
                f"{where}.private_key_file: RS384 needs an RSA key of 2048 bits or more"
            )
            return None
        return key
    if algorithm == "ES384":
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP384R1
        ):
            problems.append(f"{where}.private_key_file: ES384 needs an EC P-384 key")
            return None
        return key
    return None  # the algorithm problem is already reported


def _secret(
    table: Mapping[str, Any], env: Mapping[str, str], where: str, problems: list[str]
) -> str:
    inline, env_name = table.get("client_secret"), table.get("client_secret_env")
    if inline is not None and env_name is not None:
        problems.append(f"{where}: give client_secret or client_secret_env, not both")
        return ""
    if env_name is not None:
        if not isinstance(env_name, str) or not env_name:
            problems.append(f"{where}.client_secret_env: must name an environment variable")
            return ""
        value = env.get(env_name, "")
        if not value:
            problems.append(f"{where}.client_secret_env: environment variable {env_name} is unset")
        return value
    if isinstance(inline, str) and inline:
        return inline
    problems.append(f"{where}: client_credentials needs client_secret_env (or client_secret)")
    return ""


def _text(
    table: Mapping[str, Any], key: str, where: str, problems: list[str], *, required: bool
) -> str:
    value = table.get(key)
    if value is None:
        if required:
            problems.append(f"{where}.{key}: required")
        return ""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}.{key}: must be a non-empty string")
        return ""
    return value.strip()


#: ``[exchange]`` keys for R4 rest-hook Subscription notifications (the subscriber's
#: endpoint is the client's choice, its retry policy and timeout the operator's).
SUBSCRIPTION_KEYS = (
    "subscription_max_attempts",
    "subscription_backoff_base_seconds",
    "subscription_backoff_cap_seconds",
    "subscription_timeout_seconds",
)


@dataclass(frozen=True)
class SubscriptionDelivery:
    """How rest-hook notifications are retried (the partners' defaults unless set)."""

    max_attempts: int = 12
    backoff_base_seconds: float = 2.0
    backoff_cap_seconds: float = 3600.0
    #: None: the longest partner timeout (10 s without partners).
    timeout_seconds: float | None = None


def subscription_delivery(exchange: Mapping[str, Any]) -> SubscriptionDelivery:
    """The ``subscription_*`` keys of the ``[exchange]`` table, with the ranges a partner's
    own keys have; ``SettingsError`` names every bad one."""
    problems: list[str] = []
    where = "[exchange]"
    attempts = _number(
        exchange, "subscription_max_attempts", 12, 1, 1000, where, problems, whole=True
    )
    base = _number(
        exchange, "subscription_backoff_base_seconds", 2.0, 0.01, 86_400.0, where, problems
    )
    cap = _number(
        exchange, "subscription_backoff_cap_seconds", 3600.0, 0.01, 7 * 86_400.0, where, problems
    )
    if cap < base:
        problems.append(
            f"{where}.subscription_backoff_cap_seconds: must not be below "
            "subscription_backoff_base_seconds"
        )
    timeout: float | None = None
    if "subscription_timeout_seconds" in exchange:
        timeout = _number(
            exchange, "subscription_timeout_seconds", 10.0, 0.1, 600.0, where, problems
        )
    if problems:
        raise SettingsError("\n".join(problems))
    return SubscriptionDelivery(int(attempts), base, cap, timeout)


def _number(
    table: Mapping[str, Any],
    key: str,
    default: float,
    low: float,
    high: float,
    where: str,
    problems: list[str],
    *,
    whole: bool = False,
) -> float:
    value = table.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (whole and not isinstance(value, int))
    ):
        problems.append(f"{where}.{key}: expected a {'whole ' if whole else ''}number")
        return default
    if not low <= value <= high:
        problems.append(f"{where}.{key}: must be between {low:g} and {high:g}")
        return default
    return float(value)


def _name_set(
    table: Mapping[str, Any], key: str, where: str, problems: list[str]
) -> frozenset[str] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where}.{key}: must be a non-empty list of names")
        return None
    return frozenset(value)


def _scopes(table: Mapping[str, Any], where: str, problems: list[str]) -> tuple[str, ...]:
    value = table.get("scopes", [])
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where}.scopes: must be a list of scope strings")
        return ()
    return tuple(value)


__all__ = [
    "AUTH_KINDS",
    "DEFAULT_PURPOSE",
    "KIND_PURPOSES",
    "REFERRAL_STATUS",
    "SAFETY_FLAGS",
    "SMART_ALGORITHMS",
    "WITHOUT_IDENTIFIER",
    "WRITE_MODES",
    "AuthConfig",
    "PartnerConfig",
    "load_partners",
    "parse_partners",
    "purpose_for",
]
