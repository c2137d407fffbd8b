"""Web pages for people (``/app``): the referral form, the program dashboard and the instrument
questionnaires, behind a browser session built on the client registry (``session.py``).

Plain server-rendered HTML with small hand-written scripts (``static/``); the pages read and
write only through the service's own APIs, so roles, scopes, consent and audit apply unchanged.
"""

from fhir_kat.web.pages import bp, register

__all__ = ["bp", "register"]
