"""Artifacts → FHIR through declarative mapping files (``mappings/<kind>/*.yaml``).

Owns: the mapping engine (a closed set of operations), the registered functions it may call,
the Provenance of each mapping, and ``lint_mappings``. Pure and deterministic: no flask, no
requests, no store, no clock (``MappingContext.now`` is injected); ids are uuid5 of business
identifiers, so the same artifact always yields the same Bundle.
"""

from fhir_kat.mapping.engine import (
    MappingContext,
    lint_mappings,
    map_artifact,
    mapping_versions,
)

__all__ = ["MappingContext", "lint_mappings", "map_artifact", "mapping_versions"]
