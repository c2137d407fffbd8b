"""The partner client against partner behaviours a live server cannot produce on demand
(``responses``): token expiry, throttling, outages, refusals, and the SMART client assertion."""

from __future__ import annotations

import email.utils
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_kat.exchange.bundles import to_transaction
from fhir_kat.exchange.client import (
    ASSERTION_TYPE,
    Delivered,
    PartnerClient,
    Permanent,
    Retryable,
    parse_retry_after,
)

from .conftest import BASE, TOKEN_URL, artifact, make_partner

NOW = 1_780_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def cc_client(clock: Clock | None = None) -> PartnerClient:
    partner = make_partner(
        auth="client_credentials",
        token_url=TOKEN_URL,
        client_id="kat",
        client_secret_env="EHR_SECRET",
        scopes=["system/*.cu"],
    )
    return PartnerClient(partner, clock=clock or Clock())


def token_reply(rsps: responses.RequestsMock, *tokens: str, expires_in: int = 300) -> None:
    for token in tokens:
        rsps.post(TOKEN_URL, json={"access_token": token, "expires_in": expires_in})


def transaction_response(n: int) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {
                "response": {
                    "status": "201 Created",
                    "location": f"{BASE}/{t}/{100 + i}/_history/1",
                }
            }
            for i, t in enumerate(["Patient"] + ["Observation"] * (n - 1))
        ],
    }


PAYLOAD = to_transaction(artifact(1), "conditional-create")
OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "invalid", "diagnostics": "Observation.status"}],
}


def test_success_records_the_partners_ids_and_versions(rsps: responses.RequestsMock) -> None:
    rsps.post(BASE, json=transaction_response(3))
    client = PartnerClient(make_partner())
    result = client.send("bundle", PAYLOAD, 1)
    assert isinstance(result, Delivered) and result.status == 200
    assert result.entries[0] == {
        "status": "201 Created",
        "fullUrl": PAYLOAD["entry"][0]["fullUrl"],
        "type": "Patient",
        "id": "100",
        "versionId": "1",
    }
    sent = rsps.calls[0].request
    assert sent.headers["Content-Type"] == "application/fhir+json"
    assert "Authorization" not in sent.headers
    assert json.loads(sent.body) == PAYLOAD


def test_a_401_reauthenticates_exactly_once(rsps: responses.RequestsMock) -> None:
    token_reply(rsps, "old", "new")
    rsps.post(BASE, status=401)
    rsps.post(BASE, json=transaction_response(3))
    result = cc_client().send("bundle", PAYLOAD, 2)
    assert isinstance(result, Delivered)
    calls = [(c.request.url, c.request.headers.get("Authorization")) for c in rsps.calls]
    basic = calls[0][1]
    assert basic is not None and basic.startswith("Basic ")
    assert calls == [
        (TOKEN_URL, basic),
        (BASE, "Bearer old"),
        (TOKEN_URL, basic),
        (BASE, "Bearer new"),
    ]


def test_a_second_401_is_retryable_not_a_loop(rsps: responses.RequestsMock) -> None:
    token_reply(rsps, "a", "b", "c")
    rsps.post(BASE, status=401)
    rsps.post(BASE, status=401)
    rsps.post(BASE, json=transaction_response(3))
    result = cc_client().send("bundle", PAYLOAD, 3)
    assert isinstance(result, Retryable) and result.status == 401
    assert len(rsps.calls) == 4  # token, 401, token, 401 — and no third try


def test_one_token_for_many_deliveries_until_it_nearly_expires(
    rsps: responses.RequestsMock,
) -> None:
    token_reply(rsps, "t1", "t2")
    rsps.post(BASE, json=transaction_response(3))
    clock = Clock()
    client = cc_client(clock)
    for i in range(5):
        assert isinstance(client.send("bundle", PAYLOAD, i), Delivered)
    token_calls = [c for c in rsps.calls if c.request.url == TOKEN_URL]
    assert len(token_calls) == 1
    # client_secret_basic, grant and scope as configured.
    assert token_calls[0].request.headers["Authorization"].startswith("Basic ")
    assert parse_qs(token_calls[0].request.body) == {
        "grant_type": ["client_credentials"],
        "scope": ["system/*.cu"],
    }
    clock.t += 300 - 29  # inside the 30 s renewal margin of a 300 s token
    assert isinstance(client.send("bundle", PAYLOAD, 9), Delivered)
    assert [c.request.headers.get("Authorization") for c in rsps.calls][-1] == "Bearer t2"
    assert len([c for c in rsps.calls if c.request.url == TOKEN_URL]) == 2


@pytest.mark.parametrize(
    ("header", "expected"),
    [("120", 120.0), (email.utils.formatdate(NOW + 45, usegmt=True), 45.0), ("soon", None)],
)
def test_429_honours_retry_after(
    rsps: responses.RequestsMock, header: str, expected: float | None
) -> None:
    rsps.post(BASE, status=429, headers={"Retry-After": header})
    result = PartnerClient(make_partner(), clock=Clock()).send("bundle", PAYLOAD, 4)
    assert isinstance(result, Retryable) and result.status == 429
    assert result.retry_after == expected


def test_retry_after_parsing() -> None:
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after(" 7 ", NOW) == 7.0
    past = email.utils.formatdate(NOW - 60, usegmt=True)
    assert parse_retry_after(past, NOW) == 0.0


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409])
def test_server_errors_are_retryable(rsps: responses.RequestsMock, status: int) -> None:
    rsps.post(BASE, status=status, json=OUTCOME)
    result = PartnerClient(make_partner()).send("bundle", PAYLOAD, 5)
    assert isinstance(result, Retryable) and result.status == status


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (requests.ReadTimeout("read timed out"), "timeout"),
        (requests.ConnectTimeout("connect timed out"), "timeout"),
        (requests.ConnectionError("refused"), "connection error"),
    ],
)
def test_network_failures_are_retryable(
    rsps: responses.RequestsMock, error: Exception, reason: str
) -> None:
    rsps.post(BASE, body=error)
    result = PartnerClient(make_partner()).send("bundle", PAYLOAD, 6)
    assert result == Retryable(reason)


@pytest.mark.parametrize("status", [400, 403, 404, 412, 422])
def test_other_4xx_are_permanent_and_keep_the_partners_outcome(
    rsps: responses.RequestsMock, status: int
) -> None:
    rsps.post(BASE, status=status, json=OUTCOME)
    result = PartnerClient(make_partner()).send("bundle", PAYLOAD, 7)
    assert result == Permanent(status, OUTCOME)


def test_a_4xx_without_outcome_gets_one(rsps: responses.RequestsMock) -> None:
    rsps.post(BASE, status=400, body="<html>bad</html>", content_type="text/html")
    result = PartnerClient(make_partner()).send("bundle", PAYLOAD, 8)
    assert isinstance(result, Permanent)
    assert result.outcome["issue"][0]["diagnostics"] == "partner answered HTTP 400"


def test_a_failed_entry_in_a_200_is_a_refusal(rsps: responses.RequestsMock) -> None:
    answer = transaction_response(3)
    answer["entry"][2]["response"] = {"status": "422 Unprocessable Entity", "outcome": OUTCOME}
    rsps.post(BASE, json=answer)
    assert PartnerClient(make_partner()).send("bundle", PAYLOAD, 9) == Permanent(422, OUTCOME)


def test_token_endpoint_failures_are_retryable(rsps: responses.RequestsMock) -> None:
    rsps.post(TOKEN_URL, status=401, json={"error": "invalid_client", "error_description": "x"})
    result = cc_client().send("bundle", PAYLOAD, 10)
    assert result == Retryable("token endpoint: HTTP 401 invalid_client")
    client = cc_client()
    rsps.replace(responses.POST, TOKEN_URL, body=requests.ConnectionError("down"))
    assert client.send("bundle", PAYLOAD, 11) == Retryable("token endpoint: connection error")


def test_notifications_go_to_process_message(rsps: responses.RequestsMock) -> None:
    rsps.post(f"{BASE}/$process-message", status=202)
    message = {"resourceType": "Bundle", "type": "message", "entry": []}
    result = PartnerClient(make_partner()).send("notification", message, 12)
    assert result == Delivered(202, [])


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_client_assertion(
    rsps: responses.RequestsMock,
    alg: str,
    key_files: dict[str, Path],
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    partner = make_partner(
        auth="smart_backend",
        token_url=TOKEN_URL,
        client_id="fhir-kat",
        private_key_file=str(key_files[alg]),
        algorithm=alg,
        kid="kat-2026",
        scopes=["system/Patient.cu", "system/Observation.cu"],
    )
    token_reply(rsps, "first", "second")
    rsps.post(BASE, status=401)
    rsps.post(BASE, json=transaction_response(3))
    clock = Clock()
    result = PartnerClient(partner, clock=clock).send("bundle", PAYLOAD, 13)
    assert isinstance(result, Delivered)

    public = (rsa_key if alg == "RS384" else ec_key).public_key()
    forms = [parse_qs(c.request.body) for c in rsps.calls if c.request.url == TOKEN_URL]
    assert len(forms) == 2
    jtis = set()
    for form in forms:
        assert form["grant_type"] == ["client_credentials"]
        assert form["client_assertion_type"] == [ASSERTION_TYPE]
        assert form["scope"] == ["system/Patient.cu system/Observation.cu"]
        assertion = form["client_assertion"][0]
        header = jwt.get_unverified_header(assertion)
        assert header["alg"] == alg and header["kid"] == "kat-2026"
        claims = jwt.decode(
            assertion,
            public,
            algorithms=[alg],
            audience=TOKEN_URL,
            options={"verify_exp": False, "verify_iat": False},
        )
        assert claims["iss"] == claims["sub"] == "fhir-kat"
        assert claims["aud"] == TOKEN_URL
        assert 0 < claims["exp"] - NOW <= 300
        jtis.add(claims["jti"])
    assert len(jtis) == 2


def test_logs_name_partner_status_and_delivery_never_content(
    rsps: responses.RequestsMock, exchange_log: list[logging.LogRecord]
) -> None:
    rsps.post(BASE, status=422, json=OUTCOME)
    rsps.post(BASE, json=transaction_response(3))
    client = PartnerClient(make_partner())
    client.send("bundle", PAYLOAD, 77)
    client.send("bundle", PAYLOAD, 78)
    got = [(r.partner, r.delivery_id, r.status) for r in exchange_log]  # type: ignore[attr-defined]
    assert got == [("ehr", 77, 422), ("ehr", 78, 200)]
    text = " ".join(str(r.__dict__) for r in exchange_log)
    for secret in ("P0001", "44261-6", "Observation.status", "female"):
        assert secret not in text


def test_rest_hook_notifications(rsps: responses.RequestsMock) -> None:
    hook = "https://subscriber.example.test/hook"
    client = PartnerClient(make_partner(base_url=hook), clock=Clock())
    rsps.add(responses.POST, hook, status=200)
    result = client.notify("POST", hook, None, 7, {"Authorization": "Bearer sub"})
    assert isinstance(result, Delivered)
    sent = rsps.calls[-1].request
    assert not sent.body and "Content-Type" not in sent.headers  # an empty ping
    assert sent.headers["Authorization"] == "Bearer sub"
    rsps.add(responses.PUT, f"{hook}/Task/t1", status=503, headers={"Retry-After": "7"})
    retry = client.notify("PUT", f"{hook}/Task/t1", b"{}", 8)
    assert isinstance(retry, Retryable) and retry.retry_after == 7
    assert rsps.calls[-1].request.headers["Content-Type"] == "application/fhir+json"
    rsps.add(responses.POST, hook, status=410, json=OUTCOME)
    gone = client.notify("POST", hook, None, 9)
    assert isinstance(gone, Permanent) and gone.status == 410 and gone.outcome == OUTCOME
