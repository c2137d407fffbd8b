"""Persistence of FHIR resources (versions + search index) behind a small interface.

Owns: SQL, transactions, locking, and the ``StoredResource`` value. Must not: validate resources,
know about HTTP, or decide policy (consent, roles) — services do.
"""

from fhir_kat.store.store import Store, StoredResource, Tx, same_content

__all__ = ["Store", "StoredResource", "Tx", "same_content"]
