"""HTTP layer: blueprints that parse a request, call a service and serialise the answer.

Owns: routes, content negotiation, headers, and the single error handler. Must not: hold
business rules or SQL.
"""
