"""Can a client id be told apart by the token endpoint's timing? Median answer time for a
registered client id vs unknown ones, with wrong secrets (``client_secret_post``, production
PBKDF2 cost) and forged assertions (``private_key_jwt``); the ratio should be about 1.0.
Nothing asserts a time (issue #15: before the fix 40-90x for secrets).

    python -m bench.sign_in_timing [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from fhir_kat.app import create_app  # noqa: E402
from fhir_kat.security.secrets import hash_secret  # noqa: E402
from fhir_kat.settings import load_settings  # noqa: E402

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES384")
    registered = {
        "known": {
            "role": "program-staff",
            "scopes": ["system/*.rs"],
            "secret_hash": hash_secret(secrets.token_urlsafe(16)),  # the production cost
        },
        "known-jwt": {"role": "program-staff", "scopes": ["system/*.rs"], "jwks": {"keys": [jwk]}},
    }
    settings = load_settings(
        {}, data_dir=tempfile.mkdtemp(prefix="kat-bench-"), log_level="ERROR", auth_failure_limit=0
    )
    app = create_app(replace(settings, extra={"clients": registered}))
    logging.getLogger("fhir_kat").setLevel(logging.ERROR)
    client = app.test_client()
    forger = ec.generate_private_key(ec.SECP384R1())

    def secret_post(client_id: str) -> float:
        form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": secrets.token_hex(8),
        }
        start = time.perf_counter()
        assert client.post("/auth/token", data=form).status_code == 401
        return time.perf_counter() - start

    def assertion(client_id: str) -> float:
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": "http://localhost/auth/token",
            "exp": int(time.time()) + 60,
            "jti": str(uuid.uuid4()),
        }
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jwt.encode(claims, forger, "ES384", headers={"kid": "k1"}),
        }
        start = time.perf_counter()
        assert client.post("/auth/token", data=form).status_code == 401
        return time.perf_counter() - start

    rows: list[tuple[str, Any, str]] = [
        ("client_secret_post, wrong secret", secret_post, "known"),
        ("private_key_jwt, forged assertion", assertion, "known-jwt"),
    ]
    try:
        for label, measure, known_id in rows:
            for _ in range(3):  # warm up both paths
                measure(known_id)
                measure(f"warm-{uuid.uuid4()}")
            known = statistics.median(measure(known_id) for _ in range(args.rounds))
            unknown = statistics.median(
                measure(f"nobody-{uuid.uuid4()}") for _ in range(args.rounds)
            )
            print(
                f"{label}: registered {known * 1000:.2f} ms, unknown {unknown * 1000:.2f} ms "
                f"(ratio {known / unknown:.2f})"
            )
    finally:
        app.extensions["fhir_kat"].export.shutdown()
        app.extensions["fhir_kat"].store.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
