"""Web pages for people (``/app``): the referral form, the program dashboard and the instrument
questionnaires, behind a browser session built on the client registry (``session.py``).

Plain server-rendered HTML with small hand-written scripts (``static/``); the pages read and
write only through the service's own APIs, so roles, scopes, consent and audit apply unchanged.
"""

from flask import Flask

from fhir_kat.web import pages, smart
from fhir_kat.web.pages import bp


def register(app: Flask) -> None:
    """The pages, then the SMART app (its session checks run in this order, before the bearer
    check ``api.auth.install`` adds)."""
    pages.register(app)
    smart.register(app)


__all__ = ["bp", "register"]
