"""WSGI entry point for gunicorn: ``gunicorn 'fhir_kat.wsgi:app'``. Settings come from the
environment (``FHIR_KAT_*``, ``FHIR_KAT_CONFIG``) as for ``python server.py``."""

from fhir_kat.app import create_app

app = create_app()
