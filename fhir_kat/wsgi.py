"""WSGI entry point for gunicorn: ``gunicorn 'fhir_kat.wsgi:app'``. Settings come from the
environment (``FHIR_KAT_*``, ``FHIR_KAT_CONFIG``) as for ``python server.py``.

A WSGI server's bind address is unknown here, so ``FHIR_KAT_PUBLIC_BASE_URL`` is required
(``settings.host_derived_urls_problem``): the app does not load without it.

Everything a first request would load is loaded here (``prefork.warm``), and what must not
cross a fork is renewed in each forked child (``prefork.fork_safe``): under ``gunicorn
--preload`` the workers share the parent's models, mappings and terminology
(docs/deployment.md, "Memory").
"""

import logging

from fhir_kat.app import create_app
from fhir_kat.prefork import fork_safe, warm
from fhir_kat.settings import SettingsError, host_derived_urls_problem, load_settings

settings = load_settings()
problem = host_derived_urls_problem(settings, None)
if problem is not None:
    raise SettingsError(problem)
app = create_app(settings)
warm()
fork_safe(app)
if not settings.public_base_url:
    logging.getLogger("fhir_kat.http").warning(
        "FHIR_KAT_PUBLIC_BASE_URL is not set; links, the token URL and the accepted "
        "client-assertion aud follow each request's Host header"
    )
