"""Loading the service once, before a pre-forking server (gunicorn ``--preload``) forks its
workers, so they share those pages instead of each loading its own copy (issue 25).

Owns: ``warm`` (what a first request would load lazily — the R4B model classes, the compiled
mappings, terminology — loaded now, with no database access and no clock) and
``fork_safe(app)`` (what must not cross a fork, renewed in each child: the database pool's
connections, the SQLite writer queue's lock file descriptor and thread lock, the audit
journal's connection and queue (ADR 0023), the export thread pool). Must not: write
anything or start threads in the parent.

The child's renewal runs from ``os.register_at_fork``, so any pre-forking server is safe, not
only one configured with our hooks. ``gc.freeze`` after warming moves what was loaded out of
the collector's reach: a collection in a child would otherwise write to (and so copy) every
page holding a tracked object.
"""

from __future__ import annotations

import gc
import os
import weakref
from datetime import UTC, datetime
from typing import Any

from flask import Flask


def warm() -> int:
    """Load lazily-loaded models, mappings and terminology: each artifact kind of a small
    synthetic program mapped and validated (pure functions; nothing is stored). Returns how
    many resources were validated."""
    from fhir_kat.clinical.protocol import load_protocol
    from fhir_kat.errors import Unprocessable
    from fhir_kat.mapping import MappingContext, map_artifact
    from fhir_kat.synthetic import generate_program
    from fhir_kat.validation.resource import SUPPORTED_TYPES, _model, validate_resource

    for rtype in SUPPORTED_TYPES:
        _model(rtype)
    protocol = load_protocol()
    ctx = MappingContext(datetime(2026, 1, 1, tzinfo=UTC), "prefork", protocol)
    seen: set[str] = set()
    validated = 0
    for artifact in generate_program(6, seed=1, protocol=protocol).artifacts():
        if artifact.kind in seen:
            continue
        seen.add(artifact.kind)
        try:
            bundle = map_artifact(artifact.kind, artifact.payload, ctx)
        except Unprocessable:
            continue  # warming only: the request path reports problems
        for entry in bundle["entry"]:
            validate_resource(entry["resource"])
            validated += 1
    return validated


def fork_safe(app: Flask) -> None:
    """Renew, in every child forked from this process, what must not be shared with the
    parent; then freeze what is loaded out of the garbage collector's reach."""
    # A weak reference: an app dropped since (tests create many) renews nothing.
    ref = weakref.ref(app.extensions["fhir_kat"])

    def renew() -> None:
        state: Any = ref()
        if state is not None:
            state.store.after_fork()
            state.export.after_fork()

    os.register_at_fork(after_in_child=renew)
    gc.freeze()
