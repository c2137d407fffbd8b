"""Security: client registry, tokens (SMART Backend Services), scopes, roles, consent decisions,
audit and rate limits.

Owns: every decision of the form "may this client do this to this data". Must not: know HTTP
(the api layer turns decisions into 401/403/429) or build FHIR search SQL beyond asking the store.
"""
