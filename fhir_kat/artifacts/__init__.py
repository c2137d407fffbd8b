"""The program's artifacts as they arrive: marshmallow schemas (snake_case JSON), one per kind,
their JSON Schemas for program systems, and ``load_artifact`` reporting every field problem.

Owns: the shape of artifacts. Must not: know FHIR (``mapping`` does), store, or echo submitted
values in errors (paths and rules only).
"""

from fhir_kat.artifacts.schemas import KINDS, SCHEMAS, json_schema, load_artifact

__all__ = ["KINDS", "SCHEMAS", "json_schema", "load_artifact"]
