"""The program's artifacts as they arrive: marshmallow schemas (snake_case JSON), one per kind,
their JSON Schemas for program systems, and ``validate_artifact`` reporting every field problem.

Owns: the shape of artifacts and the program-local codes they may carry (by ValueSet). Must not:
know FHIR output (``mapping`` does), store, or echo submitted values in errors (paths, rules and
code-shaped codes only).
"""

from fhir_kat.artifacts.schemas import (
    KINDS,
    MAPPED_SCHEMAS,
    PHN_SYSTEMS,
    SCHEMAS,
    Validated,
    bc_phn_check_digit,
    bc_phn_valid,
    json_schema,
    load_artifact,
    load_flag_action,
    validate_artifact,
)

__all__ = [
    "KINDS",
    "MAPPED_SCHEMAS",
    "PHN_SYSTEMS",
    "SCHEMAS",
    "Validated",
    "bc_phn_check_digit",
    "bc_phn_valid",
    "json_schema",
    "load_artifact",
    "load_flag_action",
    "validate_artifact",
]
