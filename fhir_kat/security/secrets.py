"""Client secrets are stored hashed (PBKDF2-HMAC-SHA256, per-secret salt), compared in
constant time. ``fhir-kat hash-secret`` prints the stored form for a TOML file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

ITERATIONS = 310_000  # OWASP 2023 guidance for PBKDF2-HMAC-SHA256


def hash_secret(secret: str, *, iterations: int = ITERATIONS) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    salt_b64 = base64.b64encode(salt).decode()
    digest_b64 = base64.b64encode(digest).decode()
    return f"pbkdf2_sha256${iterations}${salt_b64}${digest_b64}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        scheme, iterations, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    if scheme != "pbkdf2_sha256":
        return False
    digest = hashlib.pbkdf2_hmac(
        "sha256",
        secret.encode("utf-8", "surrogatepass"),
        base64.b64decode(salt_b64),
        int(iterations),
    )
    return hmac.compare_digest(digest, base64.b64decode(digest_b64))


def new_secret() -> str:
    return secrets.token_urlsafe(32)
