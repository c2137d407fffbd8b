"""A test EHR on loopback for SMART App Launch, made of real parts:

- its authorization server: ``ehr.mjs`` (panva's oidc-provider, as tests/oidc uses) issuing
  SMART launch context (``launch``/``aud`` parameters, ``patient`` in the token response,
  ``fhirUser`` in the ID token, PKCE required, token introspection);
- its FHIR server: SEKMET (the FHIR server the exchange tests use) holding a synthetic chart,
  behind a small gate on 127.0.0.1 that is the EHR's FHIR base (``iss``): it answers
  ``/.well-known/smart-configuration``, lets only requests with an access token the
  authorization server says is active through (RFC 7662 introspection), and forwards them to
  SEKMET. It also serves the EHR's chart page with the "open the referral form" link (an EHR
  launch: a fresh ``launch`` id, then ``{launch URL}?iss=…&launch=…``).

Bounded: the Node process lives at most ``ttl_seconds`` and ends with the test; every HTTP call
has a timeout.
"""

from __future__ import annotations

import html
import json
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import requests

from tests.exchange.conftest import SekmetServer
from tests.oidc.idp import node
from tools.hl7_packages import ensure_tree

HERE = Path(__file__).resolve().parent
APP_CLIENT = "fhir-kat-referral"
APP_SECRET = "test-only-secret-of-the-referral-form-at-the-ehr"
KEY_CLIENT = "fhir-kat-referral-jwt"
GATE_CLIENT = "ehr-fhir-gate"
GATE_SECRET = "test-only-secret-of-the-ehr-fhir-gate"
PATIENT = "pt-avery"
OTHER_PATIENT = "pt-blake"
PRACTITIONER = "dr-okafor"
USERS = {
    "okafor": {
        "sub": "ehr-user-7",
        "password": "okafor-password",
        "name": "Dr Sam Okafor",
        "fhirUser": "",  # set to the absolute Practitioner URL once the FHIR base is known
    }
}


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class TestEhr:
    __test__ = False  # not a test class

    def __init__(
        self,
        sekmet: SekmetServer,
        redirect_uris: list[str],
        jwks: dict[str, Any] | None = None,
        ttl_seconds: int = 900,
    ) -> None:
        self.sekmet = sekmet
        self.lock = threading.Lock()
        #: Access tokens the FHIR gate let through (the service used the EHR's token).
        self.tokens_used: set[str] = set()
        self.fhir_requests: list[str] = []
        #: When set, the FHIR server answers 503 (an EHR FHIR server that is down).
        self.fhir_down = False
        self.app_launch_url = ""
        ehr = self
        self.gate = _Quiet(("127.0.0.1", 0), self._handler())
        self.root = f"http://127.0.0.1:{self.gate.server_address[1]}"
        self.fhir_base = f"{self.root}/fhir"
        self.thread = threading.Thread(target=self.gate.serve_forever, daemon=True)
        self.thread.start()
        self.folder = Path(tempfile.mkdtemp(prefix="kat-ehr-"))
        users = json.loads(json.dumps(USERS))
        users["okafor"]["fhirUser"] = f"{self.fhir_base}/Practitioner/{PRACTITIONER}"
        self.users = users
        clients: list[dict[str, Any]] = [
            {
                "client_id": APP_CLIENT,
                "client_secret": APP_SECRET,
                "redirect_uris": redirect_uris,
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_basic",
            },
            {
                "client_id": GATE_CLIENT,
                "client_secret": GATE_SECRET,
                "redirect_uris": [],
                "grant_types": [],
                "response_types": [],
            },
        ]
        if jwks is not None:
            clients.append(
                {
                    "client_id": KEY_CLIENT,
                    "redirect_uris": redirect_uris,
                    "grant_types": ["authorization_code"],
                    "response_types": ["code"],
                    "token_endpoint_auth_method": "private_key_jwt",
                    "token_endpoint_auth_signing_alg": "RS384",
                    "jwks": jwks,
                }
            )
        config = {
            "modules": str(ensure_tree("oidc-provider")),
            "clients": clients,
            "users": users,
            "patients": {PATIENT: "Avery Testcase", OTHER_PATIENT: "Blake Sample"},
            "fhir_base": self.fhir_base,
            "ttl_seconds": ttl_seconds,
        }
        (self.folder / "config.json").write_text(json.dumps(config))
        self.log = self.folder / "ehr.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [node(), str(HERE / "ehr.mjs"), str(self.folder / "config.json")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"the test EHR did not start: {self.log.read_text()[-2000:]}")
        self.issuer: str = json.loads(line)["issuer"]
        discovery = requests.get(f"{self.issuer}/.well-known/openid-configuration", timeout=10)
        self.openid = discovery.json()
        _ = ehr

    # ------------------------------------------------------------------ what the EHR serves

    def smart_configuration(self) -> dict[str, Any]:
        """SMART App Launch 2.x discovery, answered at the FHIR base."""
        o = self.openid
        return {
            "issuer": self.issuer,
            "jwks_uri": o["jwks_uri"],
            "authorization_endpoint": o["authorization_endpoint"],
            "token_endpoint": o["token_endpoint"],
            "introspection_endpoint": o.get("introspection_endpoint"),
            "revocation_endpoint": o.get("revocation_endpoint"),
            "grant_types_supported": ["authorization_code"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": [
                "openid",
                "fhirUser",
                "launch",
                "launch/patient",
                "patient/*.rs",
            ],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "capabilities": [
                "launch-ehr",
                "launch-standalone",
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "context-ehr-patient",
                "context-standalone-patient",
                "sso-openid-connect",
                "permission-patient",
                "permission-v2",
            ],
        }

    def _active(self, token: str) -> bool:
        r = requests.post(
            self.openid["introspection_endpoint"],
            data={"token": token},
            auth=(GATE_CLIENT, GATE_SECRET),
            timeout=10,
        )
        return r.status_code == 200 and r.json().get("active") is True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        ehr = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path == "/fhir/.well-known/smart-configuration":
                    body = json.dumps(ehr.smart_configuration()).encode()
                    self._send(200, body, "application/json")
                    return
                if parts.path == "/ehr/chart":
                    self._chart(parse_qs(parts.query).get("patient", [""])[0])
                    return
                if not parts.path.startswith("/fhir/"):
                    self._send(404, b"not found", "text/plain")
                    return
                header = self.headers.get("Authorization", "")
                token = header[7:] if header.startswith("Bearer ") else ""
                with ehr.lock:
                    ehr.fhir_requests.append(parts.path)
                if ehr.fhir_down:
                    self._send(503, b'{"resourceType":"OperationOutcome"}', "application/json")
                    return
                if not token or not ehr._active(token):
                    body = json.dumps({"resourceType": "OperationOutcome", "issue": []}).encode()
                    self._send(401, body, "application/fhir+json")
                    return
                with ehr.lock:
                    ehr.tokens_used.add(token)
                upstream = ehr.sekmet.base + self.path.removeprefix("/fhir")
                try:
                    r = requests.get(
                        upstream, headers={"Accept": "application/fhir+json"}, timeout=30
                    )
                except requests.RequestException:
                    self._send(502, b"{}", "application/json")
                    return
                body = r.content.replace(ehr.sekmet.base.encode(), ehr.fhir_base.encode())
                self._send(r.status_code, body, "application/fhir+json")

            def _chart(self, patient: str) -> None:
                r = requests.post(
                    f"{ehr.issuer}/ehr/launches", json={"patient": patient}, timeout=10
                )
                launch = r.json().get("launch", "")
                href = (
                    f"{ehr.app_launch_url}?iss={quote(ehr.fhir_base, safe='')}"
                    f"&launch={quote(launch, safe='')}"
                )
                page = (
                    '<!doctype html><html lang="en"><head><meta charset="utf-8">'
                    "<title>Test EHR chart</title></head><body><main><h1>Chart</h1>"
                    f'<p><a href="{html.escape(href)}">Refer to the KaT program</a></p>'
                    "</main></body></html>"
                )
                self._send(200, page.encode(), "text/html; charset=utf-8")

        return Handler

    # ------------------------------------------------------------------ test helpers

    def new_launch(self, patient: str = PATIENT) -> str:
        r = requests.post(f"{self.issuer}/ehr/launches", json={"patient": patient}, timeout=10)
        r.raise_for_status()
        launch: str = r.json()["launch"]
        return launch

    def seed(self) -> None:
        """The synthetic chart: two patients, the physician, conditions, medications and
        instrument totals (codes from DOMAIN.md)."""
        for resource in chart():
            r = requests.put(
                f"{self.sekmet.base}/{resource['resourceType']}/{resource['id']}",
                json=resource,
                headers={"Content-Type": "application/fhir+json"},
                timeout=30,
            )
            assert r.status_code in (200, 201), r.text

    def stop(self) -> None:
        if self.process.poll() is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.gate.shutdown()
        self.gate.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> TestEhr:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
PHN = "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id"


def _condition(cid: str, patient: str, code: str, display: str, status: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": status,
                }
            ]
        },
        "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


def _total(oid: str, patient: str, code: str, value: int, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "survey",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": "{score}",
            "system": "http://unitsofmeasure.org",
            "code": "{score}",
        },
    }


def chart() -> list[dict[str, Any]]:
    return [
        {
            "resourceType": "Patient",
            "id": PATIENT,
            "identifier": [{"system": PHN, "value": "9999999998"}],
            "name": [{"family": "Testcase", "given": ["Avery"]}],
            "gender": "female",
            "birthDate": "1984-03-02",
            "telecom": [{"system": "phone", "value": "250-555-0100"}],
        },
        {
            "resourceType": "Patient",
            "id": OTHER_PATIENT,
            "identifier": [{"system": PHN, "value": "9999999981"}],
            "name": [{"family": "Sample", "given": ["Blake"]}],
            "gender": "male",
            "birthDate": "1979-06-01",
        },
        {
            "resourceType": "Practitioner",
            "id": PRACTITIONER,
            "identifier": [
                {
                    "system": "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-license-physician",
                    "value": "99001",
                }
            ],
            "name": [{"family": "Okafor", "given": ["Sam"]}],
        },
        # PTSD (SNOMED 47505003) active; a resolved GAD (21897009) is not prefilled as active.
        _condition("c-ptsd", PATIENT, "47505003", "Posttraumatic stress disorder", "active"),
        _condition("c-gad", PATIENT, "21897009", "Generalized anxiety disorder", "resolved"),
        _condition("c-mdd", OTHER_PATIENT, "370143000", "Major depressive disorder", "active"),
        {
            "resourceType": "MedicationRequest",
            "id": "m-sertraline",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"text": "Sertraline 100 mg tablet"},
            "subject": {"reference": f"Patient/{PATIENT}"},
        },
        # PHQ-9 total 44261-6, GAD-7 total 70274-6 (DOMAIN.md)
        _total("o-phq9-old", PATIENT, "44261-6", 12, "2026-06-01"),
        _total("o-phq9", PATIENT, "44261-6", 17, "2026-11-20"),
        _total("o-gad7", PATIENT, "70274-6", 11, "2026-11-20"),
    ]
