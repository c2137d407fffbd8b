"""Deterministic ids nobody outside the installation can compute from a PHN.

Owns: the per-installation id secret (a file beside the signing key, or named by
``FHIR_KAT_ID_SECRET_FILE``) and the uuid5 namespace derived from it. Artifact and message
routes derive ids from business identifiers (one PHN, one Patient id: re-sends stay
idempotent); keyed by this secret, an id reveals nothing to whoever knows the PHN, so a read of
a computed id cannot probe who is in the program. Must not: decide which namespace a database
uses (``Store.claim_id_namespace`` records it; a database written before keeping its own).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import uuid
from pathlib import Path

#: The repository's namespace: ids of the golden tests and ``fhir-kat map``, and of databases
#: written before installations had their own secret ("legacy").
PUBLIC_NAMESPACE = uuid.UUID("6f1d3c52-7a0e-5b8e-9d4e-6b6174000001")


def load_id_secret(path: Path) -> str:
    """The installation's id secret, created (256 random bits, mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # processes starting together end up with one secret
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    value = path.read_text(encoding="utf-8").strip()
    if len(value) < 32:
        raise ValueError(f"{path}: the id secret must hold at least 32 characters")
    return value


def install_namespace(secret: str) -> uuid.UUID:
    return uuid.uuid5(PUBLIC_NAMESPACE, f"installation|{secret}")


def fingerprint(namespace: uuid.UUID) -> str:
    """What the database records of its namespace: enough to tell two apart, nothing more."""
    return hashlib.sha256(namespace.bytes).hexdigest()[:32]
