"""The client registry: who may ask for tokens, with which credentials, role and scopes.

Clients come from ``[clients.<id>]`` tables in the TOML file named by FHIR_KAT_CONFIG, plus the
local clients ``fhir-kat serve`` creates on a new data directory (``local-clients.json``).
Secrets are never stored in clear: ``secret_hash`` (from ``fhir-kat hash-secret``) or
``secret_env`` (the name of an environment variable holding the secret).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_kat.security.policy import ROLES
from fhir_kat.security.scopes import Scope, parse_scopes
from fhir_kat.security.secrets import ITERATIONS, hash_secret, new_secret, verify_secret
from fhir_kat.settings import SettingsError

#: v3 PurposeOfUse codes a client may act under (DOMAIN.md, "Consent purposes").
PURPOSES = ("TREAT", "HOPERAT", "PUBHLTH", "HRESCH")
DEFAULT_PURPOSE = {
    "referrer": "TREAT",
    "program-staff": "TREAT",
    "health-authority": "HOPERAT",
    "admin": "HOPERAT",
}
LOCAL_CLIENTS = "local-clients.json"
LOCAL_CREDENTIALS = "local-credentials.txt"


@dataclass(frozen=True)
class Client:
    client_id: str
    role: str
    scopes: tuple[Scope, ...]
    secret_hash: str | None = None
    jwks: Mapping[str, Any] | None = None
    organization: str | None = None  # "system|value" of the Organization it acts for
    purpose: str = "TREAT"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def check_secret(self, secret: str) -> bool:
        return check_secret(self, secret)


#: What an unknown client id (or a client without a secret) is checked against: a stored form
#: of the same scheme and cost as a real one that no secret matches (a random salt and digest,
#: nobody computed it), so a wrong guess costs the same time whether the client id exists or
#: not and client ids cannot be told apart by the answer's timing.
_NO_SECRET = (
    f"pbkdf2_sha256${ITERATIONS}${base64.b64encode(secrets.token_bytes(16)).decode()}$"
    f"{base64.b64encode(secrets.token_bytes(32)).decode()}"
)
#: Secrets verified lately (digests of secret and stored form, bounded; per process): PBKDF2
#: is slow on purpose, and a registered client asks for a token every few minutes. Only
#: successes are remembered, so every failure costs a full PBKDF2 — for known and unknown
#: client ids alike — and a spray of wrong secrets cannot push real clients out.
_VERIFIED_SIZE = 256
_verified: OrderedDict[bytes, None] = OrderedDict()
_verified_lock = threading.Lock()


def check_secret(client: Client | None, secret: str) -> bool:
    """Does ``secret`` belong to ``client``? The same work for an unknown client (None) or one
    with no secret (a ``private_key_jwt`` client) as for a wrong secret of a real one."""
    stored = client.secret_hash if client is not None and client.secret_hash else _NO_SECRET
    key = hashlib.blake2b(
        secret.encode("utf-8", "surrogatepass"), key=stored.encode()[-64:]
    ).digest()
    with _verified_lock:
        if key in _verified:
            _verified.move_to_end(key)
            return stored is not _NO_SECRET
    if not verify_secret(secret, stored) or stored is _NO_SECRET:
        return False
    with _verified_lock:
        _verified[key] = None
        while len(_verified) > _VERIFIED_SIZE:
            _verified.popitem(last=False)
    return True


class ClientRegistry:
    def __init__(self, clients: Mapping[str, Client]) -> None:
        self.clients = dict(clients)

    def get(self, client_id: str) -> Client | None:
        return self.clients.get(client_id)

    def __len__(self) -> int:
        return len(self.clients)


def load_clients(
    tables: Mapping[str, Any], data_dir: Path | None, environ: Mapping[str, str] | None = None
) -> ClientRegistry:
    env = os.environ if environ is None else environ
    problems: list[str] = []
    clients: dict[str, Client] = {}
    if data_dir is not None and (data_dir / LOCAL_CLIENTS).exists():
        local = json.loads((data_dir / LOCAL_CLIENTS).read_text())
        for client_id, spec in local.items():
            clients[client_id] = _client(client_id, spec, env, problems)
    for client_id, spec in tables.items():
        if not isinstance(spec, Mapping):
            problems.append(f"[clients.{client_id}] must be a table")
            continue
        clients[client_id] = _client(client_id, spec, env, problems)
    if problems:
        raise SettingsError("invalid client registrations:\n  " + "\n  ".join(problems))
    return ClientRegistry(clients)


def _client(
    client_id: str, spec: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> Client:
    where = f"[clients.{client_id}]"
    known = {
        "role",
        "scopes",
        "secret_hash",
        "secret_env",
        "jwks",
        "jwks_file",
        "organization",
        "purpose_of_use",
        "description",
    }
    for key in spec:
        if key not in known:
            problems.append(f"{where}: unknown key {key}")
    role = spec.get("role")
    if role not in ROLES:
        problems.append(f"{where}: role must be one of {', '.join(ROLES)}")
        role = "referrer"
    scopes, bad = parse_scopes(spec.get("scopes", []))
    for text in bad:
        problems.append(f"{where}: not a SMART system scope: {text}")
    if not scopes:
        problems.append(f"{where}: at least one scope is needed")
    secret_hash = spec.get("secret_hash")
    if spec.get("secret_env"):
        value = env.get(str(spec["secret_env"]))
        if not value:
            problems.append(f"{where}: environment variable {spec['secret_env']} is not set")
        else:
            secret_hash = hash_secret(value)
    jwks: Mapping[str, Any] | None = None
    if "jwks" in spec:
        jwks = spec["jwks"] if isinstance(spec["jwks"], Mapping) else json.loads(spec["jwks"])
    elif "jwks_file" in spec:
        try:
            jwks = json.loads(Path(spec["jwks_file"]).read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{where}: cannot read jwks_file ({type(exc).__name__})")
    if jwks is not None and not isinstance(jwks.get("keys"), list):
        problems.append(f"{where}: a JWKS needs a 'keys' list")
    if secret_hash is None and jwks is None:
        problems.append(f"{where}: needs secret_hash, secret_env, jwks or jwks_file")
    purpose = spec.get("purpose_of_use", DEFAULT_PURPOSE.get(str(role), "TREAT"))
    if purpose not in PURPOSES:
        problems.append(f"{where}: purpose_of_use must be one of {', '.join(PURPOSES)}")
    organization = spec.get("organization")
    if organization is not None and (not isinstance(organization, str) or "|" not in organization):
        problems.append(f"{where}: organization must be 'system|value'")
    if role in ("referrer", "health-authority") and not organization:
        problems.append(f"{where}: a {role} client must name the organization it acts for")
    return Client(
        client_id=client_id,
        role=str(role),
        scopes=tuple(scopes),
        secret_hash=secret_hash,
        jwks=jwks,
        organization=organization,
        purpose=str(purpose),
    )


def ensure_local_clients(
    data_dir: Path,
    token_url: str = "http://127.0.0.1:8080/auth/token",  # noqa: S107 (a URL)
) -> list[str]:
    """On a new data directory, create a local admin and a local program-staff client with
    random secrets; the secrets go to a file only this user can read. Returns lines to print."""
    registry = data_dir / LOCAL_CLIENTS
    credentials = data_dir / LOCAL_CREDENTIALS
    if registry.exists():
        return []
    data_dir.mkdir(parents=True, exist_ok=True)
    specs: dict[str, Any] = {}
    lines: list[str] = []
    for client_id, role, scopes in (
        ("local-admin", "admin", ["system/*.rs"]),
        ("local-staff", "program-staff", ["system/*.cruds"]),
    ):
        secret = new_secret()
        specs[client_id] = {"role": role, "scopes": scopes, "secret_hash": hash_secret(secret)}
        lines.append(f"{client_id} {secret}")
    fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as fh:
        fh.write("# client_id secret  (created by fhir-kat serve; keep private)\n")
        fh.write("\n".join(lines) + "\n")
    registry.write_text(json.dumps(specs, indent=2))
    return [
        f"Created local clients; their secrets are in {credentials} (readable only by you).",
        "Get a token:  curl -s -u local-staff:<secret> -d grant_type=client_credentials "
        f"-d scope='system/*.cruds' {token_url}",
    ]
