"""How clients find out how to sign in: SMART's ``/.well-known/smart-configuration`` and the
CapabilityStatement's ``rest.security``, generated from one description so they cannot
disagree.

Owns: ``AUTH`` (what the token endpoint supports: SMART Backend Services, client credentials
with private_key_jwt or a client secret) and the two documents built from it. Must not: issue
or check tokens (``security.tokens``, ``api.auth``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: SMART's CapabilityStatement extension naming the OAuth endpoints. SMART 2.x no longer
#: requires it, but client libraries (fhirclient, fhir-kit-client) still discover by it.
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"


@dataclass(frozen=True)
class AuthServer:
    """What the authorization server offers (SMART App Launch 2.x, "Conformance")."""

    grant_types: tuple[str, ...] = ("client_credentials",)
    auth_methods: tuple[str, ...] = ("private_key_jwt", "client_secret_basic", "client_secret_post")
    signing_algs: tuple[str, ...] = ("RS384", "ES384")
    scopes: tuple[str, ...] = ("system/*.rs", "system/*.cruds", "system/*.read")
    capabilities: tuple[str, ...] = (
        "client-confidential-asymmetric",
        "client-confidential-symmetric",
        "permission-v2",
        "permission-v1",
    )

    def smart_configuration(self, token_endpoint: str) -> dict[str, Any]:
        """The SMART configuration document. No ``issuer``/``jwks_uri``: those belong to
        OpenID Connect (``sso-openid-connect``), which this server does not offer; no
        ``authorization_endpoint``: no user-facing launch (backend services only)."""
        return {
            "token_endpoint": token_endpoint,
            "grant_types_supported": list(self.grant_types),
            "token_endpoint_auth_methods_supported": list(self.auth_methods),
            "token_endpoint_auth_signing_alg_values_supported": list(self.signing_algs),
            "scopes_supported": list(self.scopes),
            "capabilities": list(self.capabilities),
        }

    def capability_security(self, token_endpoint: str) -> dict[str, Any]:
        """``CapabilityStatement.rest.security``: the service coded SMART-on-FHIR and the
        ``oauth-uris`` extension with the token endpoint."""
        return {
            "extension": [
                {
                    "url": OAUTH_URIS,
                    "extension": [{"url": "token", "valueUri": token_endpoint}],
                }
            ],
            "service": [
                {
                    "coding": [
                        {
                            "system": SECURITY_SERVICE,
                            "code": "SMART-on-FHIR",
                            "display": "SMART-on-FHIR",
                        }
                    ],
                    "text": "SMART Backend Services (OAuth 2.0 client credentials)",
                }
            ],
            "description": "SMART Backend Services: client credentials at the token endpoint "
            f"(authentication: {', '.join(self.auth_methods)}; assertions signed "
            f"{' or '.join(self.signing_algs)}). Discovery: /.well-known/smart-configuration.",
        }


AUTH = AuthServer()
