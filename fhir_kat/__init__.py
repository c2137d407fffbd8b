"""fhir_kat: a FHIR R4 adapter for ketamine-assisted therapy (KaT) programs.

The package is layered one way (see the module map in README.md): ``api`` -> ``services`` ->
``artifacts`` / ``mapping`` / ``terminology`` / ``clinical`` / ``store`` / ``exchange`` ->
``errors`` / ``settings``. Lower layers never import higher ones.
"""

__version__ = "0.1.0"

FHIR_VERSION = "4.0.1"
