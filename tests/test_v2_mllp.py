"""HL7 v2 referrals over MLLP: python-hl7's MLLP client sends real REF^I12/I13 messages to a live
listener on loopback (on SQLite and PostgreSQL): acknowledgements, nothing half-stored,
exactly-once answers, sender authentication (address and TLS client certificate), the privacy
rules of the sender's client, and the same referral as the native route."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.api.mllp import ListenerConfig, MllpListener, tls_context
from fhir_kat.services.v2_referrals import V2ReferralService, load_senders
from tests.conftest import client_as
from tests.support.v2_messages import (
    ack_code,
    errors,
    referral_message,
    send,
    send_many,
    send_raw,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
GOLDEN = Path(__file__).parent / "golden" / "v2"
REFERRALS = "https://emr.example-clinic.ca/referrals"


def native(number: str = "R-7781", **change: Any) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / "referrals.json").read_text())
    loaded.update(change)
    loaded["referral_identifier"] = {"system": REFERRALS, "value": number}
    loaded["source_id"] = f"INTAKE-{number}"
    return {k: v for k, v in loaded.items() if v is not None}


@pytest.fixture
def port(app: Flask) -> Iterator[int]:
    service: V2ReferralService = app.extensions["fhir_kat"].services.v2
    with MllpListener(ListenerConfig(port=0, idle_timeout=30), service.receive) as listener:
        yield listener.address[1]


def total(c: FlaskClient, query: str) -> int:
    found: int = c.get(f"/fhir/{query}").get_json()["total"]
    return found


def task(c: FlaskClient, number: str) -> dict[str, Any]:
    bundle = c.get(f"/fhir/Task?identifier={REFERRALS}|{number}").get_json()
    assert bundle["total"] == 1, bundle
    found: dict[str, Any] = bundle["entry"][0]["resource"]
    return found


def nothing_stored(c: FlaskClient) -> None:
    for rtype in ("Patient", "ServiceRequest", "Task", "Condition", "Observation"):
        assert total(c, rtype) == 0, rtype


def test_a_referral_is_stored_triaged_and_acknowledged(app: Flask, port: int) -> None:
    staff = client_as(app, "staff")
    raw = (GOLDEN / "eligible.hl7").read_bytes()
    ack = send(port, raw)
    assert ack_code(ack) == "AA", str(ack)
    assert str(ack.segment("MSA")[2]) == "MSG00001"
    msh = ack.segment("MSH")
    # Addressed back to the sender, answering in the message's version and character set.
    assert (str(msh[5]), str(msh[6]), str(msh[12]), str(msh[18])) == (
        "OSCAR",
        "CLINIC7",
        "2.5.1",
        "UNICODE UTF-8",
    )
    assert str(msh[9]) == "ACK^I12^ACK"
    found = task(staff, "R-7781")
    assert found["status"] == "received"  # PTSD (ICD-10-CA F43.1), prior failure, no exclusion:
    # eligible, the three-step intake can start
    assert found["requester"]["reference"].startswith("PractitionerRole/")
    conditions = staff.get("/fhir/Condition").get_json()["entry"]
    codes = {(c["system"], c["code"]) for e in conditions for c in e["resource"]["code"]["coding"]}
    assert ("http://hl7.org/fhir/sid/icd-10-ca", "F43.1") in codes
    assert ("http://snomed.info/sct", "1153570009") in codes
    patient = staff.get("/fhir/Patient").get_json()["entry"][0]["resource"]
    assert {i["value"] for i in patient["identifier"]} == {"9999999998", "MRN-0042"}
    phq = staff.get("/fhir/Observation?code=http://loinc.org|44261-6").get_json()
    assert phq["entry"][0]["resource"]["valueQuantity"]["value"] == 17
    assert total(staff, "Encounter") == 1
    sr = staff.get("/fhir/ServiceRequest").get_json()["entry"][0]["resource"]
    assert sr["note"] == [{"text": "Synthetic test referral"}]
    events = client_as(app, "admin").get("/fhir/AuditEvent?_count=500").get_json()["entry"]
    mine = [
        e["resource"]
        for e in events
        if "HL7 v2 REF^I12" in json.dumps(e["resource"]) and e["resource"]["outcome"] == "0"
    ]
    assert len(mine) == 1, "one AuditEvent for the write, naming the sender's client"
    assert "referrer" in json.dumps(mine[0]["agent"])


def test_a_resent_message_gets_the_same_ack_and_is_processed_once(app: Flask, port: int) -> None:
    staff = client_as(app, "staff")
    raw = (GOLDEN / "eligible.hl7").read_bytes()
    first = send_raw(port, raw)
    history = staff.get(f"/fhir/Task/{task(staff, 'R-7781')['id']}/_history").get_json()
    again = send_raw(port, raw)
    assert again == first  # byte for byte, MSH-7 included: the recorded ACK
    after = staff.get(f"/fhir/Task/{task(staff, 'R-7781')['id']}/_history").get_json()
    assert after["total"] == history["total"]
    assert total(staff, "ServiceRequest") == 1
    # Several messages on one connection, each answered before the next is read.
    m1 = referral_message(native("R-1"), "C-1")
    m2 = referral_message(native("R-2"), "C-2")
    acks = send_many(port, [m1, m2, m1])
    assert [a.split(b"\r")[1][:6] for a in acks] == [b"MSA|AA"] * 3
    assert acks[2] == acks[0]
    assert total(staff, "ServiceRequest") == 3


def test_the_same_referral_as_the_native_route(app: Flask, port: int) -> None:
    """Same identifier → the same Task, ServiceRequest and Patient ids, whichever route first;
    an I13 after a native referral updates it and keeps its workflow state."""
    staff = client_as(app, "staff")
    r = client_as(app, "referrer").post(
        "/api/v1/referrals", data=json.dumps(native()), content_type="application/json"
    )
    assert r.status_code == 201, r.get_json()
    before = task(staff, "R-7781")
    assert before["status"] == "received"
    flagged = native(flags=[{"code": "extreme-emotional-lability", "value": True}])
    ack = send(port, referral_message(flagged, "MOD-1", event="I13"))
    assert ack_code(ack) == "AA", str(ack)
    after = task(staff, "R-7781")
    assert after["id"] == before["id"]
    assert after["status"] == "received"  # a modification keeps the workflow state
    assert total(staff, "ServiceRequest") == 1 and total(staff, "Patient") == 1
    assert total(staff, "Task") == 1
    lability = staff.get(
        "/fhir/Observation?code=https://fhir-kat.example.org/fhir/CodeSystem/kat-intake"
        "|extreme-emotional-lability"
    ).get_json()
    assert lability["entry"][0]["resource"]["valueBoolean"] is True


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5"])
def test_earlier_versions(app: Flask, port: int, version: str) -> None:
    staff = client_as(app, "staff")
    ack = send(port, referral_message(native(), f"V-{version}", version=version))
    assert ack_code(ack) == "AA", str(ack)
    assert str(ack.segment("MSH")[12]) == version
    assert task(staff, "R-7781")["status"] == "received"


def _spoil(message: str, old: str, new: str) -> str:
    assert old in message, old
    return message.replace(old, new, 1)


REFUSALS: dict[str, tuple[Any, str, str, str]] = {
    # name: (spoil the message, MSA-1, ERR location (ERR-2), ERR-3 code)
    "bad-phn-check-digit": (
        lambda m: _spoil(m, "9999999998^^^BC", "9999999997^^^BC"),
        "AE",
        "PID^1^3^1^1",
        "102",
    ),
    "unknown-segment": (lambda m: m + "ZRF|1|local\r", "AE", "ZRF^1", "100"),
    "not-a-segment": (lambda m: m + "hello world\r", "AE", "", "100"),
    "no-pid": (
        lambda m: "\r".join(s for s in m.split("\r") if not s.startswith("PID")),
        "AE",
        "PID^1",
        "100",
    ),
    "no-referral-id": (
        lambda m: _spoil(m, "|R-7781^^https://emr.example-clinic.ca/referrals^URI|", "||"),
        "AE",
        "RF1^1^6",
        "101",
    ),
    "control-character": (
        lambda m: _spoil(m, "Testcase^Avery", "Test\x07case^Avery"),
        "AE",
        "PID^1^5",
        "102",
    ),
    "bad-sex": (lambda m: _spoil(m, "|19840302|F|", "|19840302|X|"), "AE", "PID^1^8", "103"),
    "bad-birth-date": (
        lambda m: _spoil(m, "|19840302|", "|1984|"),
        "AE",
        "PID^1^7",
        "102",
    ),
    "flag-outside-value-set": (
        lambda m: _spoil(m, "extreme-emotional-lability^^99KAT", "sleepy^^99KAT"),
        "AE",
        "OBX^2^3^1^1",
        "103",
    ),
    "no-licence": (lambda m: _spoil(m, "99001^MD^CPSBC", "99001^XX^CPSBC"), "AE", "PRD^1^7", "101"),
    "unknown-sender": (
        lambda m: _spoil(m, "|OSCAR|CLINIC7|", "|OSCAR|CLINIC9|"),
        "AR",
        "MSH^1^4",
        "207",
    ),
    "wrong-address": (
        lambda m: _spoil(m, "|OSCAR|CLINIC7|", "|REMOTE|CLINIC7|"),
        "AR",
        "MSH^1^4",
        "207",
    ),
    "unknown-event": (
        lambda m: _spoil(m, "REF^I12^REF_I12", "REF^I14^REF_I12"),
        "AR",
        "MSH^1^9^1^2",
        "201",
    ),
    "unknown-type": (
        lambda m: _spoil(m, "REF^I12^REF_I12", "ADT^A01^ADT_A01"),
        "AR",
        "MSH^1^9^1^1",
        "200",
    ),
    "unknown-version": (lambda m: _spoil(m, "|P|2.5.1", "|P|2.7"), "AR", "MSH^1^12", "203"),
    "training-message": (lambda m: _spoil(m, "|P|2.5.1", "|T|2.5.1"), "AR", "MSH^1^11", "202"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_a_refused_message_is_answered_with_err_and_nothing_is_stored(
    app: Flask, port: int, name: str
) -> None:
    spoil, code, where, error = REFUSALS[name]
    message = spoil(
        referral_message(
            native(flags=[{"code": "extreme-emotional-lability", "value": False}]), "BAD-1"
        )
    )
    raw = send_raw(port, message)
    ack = send(port, message)
    assert ack_code(ack) == code, str(ack)
    found = errors(ack)
    assert found, str(ack)
    first = found[0].split("|")
    assert first[2] == where, found
    assert first[3].split("^")[0] == error, found
    assert first[4] == "E" and first[8], found  # severity and a message for people
    assert "9999999997" not in raw.decode() and "Testcase" not in raw.decode()  # no PHI
    nothing_stored(client_as(app, "staff"))
    if code == "AE":
        assert send_raw(port, message) == raw  # recorded: the same ACK again


def test_err_in_versions_before_2_5_uses_err_1(app: Flask, port: int) -> None:
    message = _spoil(
        referral_message(native(), "OLD-1", version="2.4"), "|19840302|F|", "|19840302|X|"
    )
    ack = send(port, message)
    assert ack_code(ack) == "AE"
    assert errors(ack) == ["ERR|PID^1^8^103&Table value not found&HL70357"]


def test_a_referral_only_in_the_senders_own_organisations_name(app: Flask, port: int) -> None:
    """The other clinic's EMR re-using clinic 7's referral identifier changes nothing: the
    referral is written as that sender's client, and may_change refuses it."""
    staff = client_as(app, "staff")
    assert ack_code(send(port, referral_message(native(), "OWN-1"))) == "AA"
    before = task(staff, "R-7781")
    other = referral_message(
        native(prior_treatment_failure=False),
        "THEIRS-1",
        application="OTHEREMR",
        facility="CLINIC8",
    )
    ack = send(port, other)
    assert ack_code(ack) == "AR", str(ack)
    assert "not yours" in errors(ack)[0]
    assert task(staff, "R-7781") == before
    prior = staff.get(
        "/fhir/Observation?code=https://fhir-kat.example.org/fhir/CodeSystem/kat-intake"
        "|prior-treatment-failure"
    ).get_json()
    assert prior["entry"][0]["resource"]["valueBoolean"] is True


def test_codes_pass_through_and_unknown_ones_are_never_accepted(app: Flask, port: int) -> None:
    """A diagnosis no rule classifies (depressive disorder 35489007, and a code of a system
    the receiver does not know) is stored as sent; triage never accepts on it: the same outcome
    as the same Conditions sent through FHIR."""
    staff = client_as(app, "staff")
    message = referral_message(native(diagnoses=[]), "UNK-1")
    message = message.replace(
        "\rOBX|1|",
        "\rDG1|1||35489007^Depressive disorder^SCT||||W\rDG1|2||296.3^Major depression^I9||||W"
        "\rOBX|1|",
        1,
    )
    assert ack_code(send(port, message)) == "AA"
    conditions = [e["resource"] for e in staff.get("/fhir/Condition").get_json()["entry"]]
    codings = [c for cond in conditions for c in cond["code"]["coding"]]
    assert {
        "system": "http://snomed.info/sct",
        "code": "35489007",
        "display": "Depressive disorder",
    } in codings
    assert {"code": "296.3", "display": "Major depression"} in codings  # no system guessed
    outcome = task(staff, "R-7781")
    # Held for a clinician, naming the code no criterion classifies (issue 17).
    assert outcome["status"] == "on-hold", outcome
    assert "296.3" in outcome["statusReason"]["text"], outcome


def test_tls_with_a_client_certificate(app: Flask, tmp_path: Path) -> None:
    ca_key, ca = _certificate("kat test CA", None, None, ca=True)
    server_key, server = _certificate("127.0.0.1", ca_key, ca)
    client_key, client = _certificate("clinic7 emr", ca_key, ca)
    files = {}
    for name, value in {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "server.pem": server.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem(server_key),
        "client.pem": client.public_bytes(serialization.Encoding.PEM),
        "client.key": _pem(client_key),
    }.items():
        (tmp_path / name).write_bytes(value)
        files[name] = str(tmp_path / name)
    fingerprint = hashlib.sha256(client.public_bytes(serialization.Encoding.DER)).hexdigest()
    state = app.extensions["fhir_kat"]
    senders = load_senders(
        {
            "clinic7-tls": {
                "client": "referrer",
                "sending_application": "OSCAR",
                "sending_facility": "CLINIC7",
                "certificate_sha256": [":".join(fingerprint[i : i + 2] for i in range(0, 64, 2))],
                "organization_name": "Example Family Practice",
            }
        },
        state.clients,
    )
    base: V2ReferralService = state.services.v2
    service = V2ReferralService(base.artifacts, state.clients, state.consent, senders, state.clock)
    context = tls_context(files["server.pem"], files["server.key"], files["ca.pem"])
    with MllpListener(ListenerConfig(port=0, ssl_context=context), service.receive) as listener:
        port = listener.address[1]
        client_ctx = ssl.create_default_context(cafile=files["ca.pem"])
        client_ctx.load_cert_chain(files["client.pem"], files["client.key"])
        message = referral_message(native(), "TLS-1")
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw_sock,
            client_ctx.wrap_socket(raw_sock, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(b"\x0b" + message.encode() + b"\x1c\r")
            reply = b""
            while not reply.endswith(b"\x1c\r"):
                chunk = sock.recv(65536)
                assert chunk
                reply += chunk
        assert b"MSA|AA|TLS-1" in reply, reply
        # Without a client certificate the handshake fails: no message is read at all.
        bare = ssl.create_default_context(cafile=files["ca.pem"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw_sock,
            pytest.raises((ssl.SSLError, ConnectionError, OSError)),
            bare.wrap_socket(raw_sock, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(b"\x0b" + message.encode() + b"\x1c\r")
            assert sock.recv(65536)
    assert task(client_as(app, "staff"), "R-7781")["status"] == "received"


def _certificate(
    name: str, issuer_key: Any, issuer: x509.Certificate | None, *, ca: bool = False
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if name == "127.0.0.1":
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_python_hl7s_mllp_send_command(app: Flask, port: int, tmp_path: Path) -> None:
    """The sender-side command docs/integrators.md shows: mllp_send --loose with a file."""
    import subprocess
    import sys

    text = (GOLDEN / "eligible.hl7").read_bytes().replace(b"\r", b"\r\n")
    (tmp_path / "referral.hl7").write_bytes(text)
    mllp_send = Path(sys.executable).with_name("mllp_send")
    done = subprocess.run(
        [str(mllp_send), "--loose", "--port", str(port), "--file", "referral.hl7", "127.0.0.1"],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert b"MSA|AA|MSG00001" in done.stdout
    assert task(client_as(app, "staff"), "R-7781")["status"] == "received"


def test_the_mllp_command(tmp_path: Path) -> None:
    """``fhir-kat mllp`` as an operator starts it: settings from FHIR_KAT_CONFIG, a sender,
    a message answered AA, stopped by a signal (bounded waits throughout)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import TEST_CLIENTS, TEST_V2_SENDERS

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    referrer = TEST_CLIENTS["referrer"]
    sender = TEST_V2_SENDERS["clinic7-emr"]
    config = tmp_path / "kat.toml"
    config.write_text(
        "[clients.referrer]\n"
        'role = "referrer"\nscopes = ["system/*.cruds"]\n'
        f'secret_hash = "{referrer["secret_hash"]}"\n'
        f'organization = "{referrer["organization"]}"\n'
        "[v2_senders.clinic7-emr]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in sender.items())
    )
    env = dict(os.environ, FHIR_KAT_CONFIG=str(config), FHIR_KAT_DATA_DIR=str(tmp_path / "var"))
    env.pop("FHIR_KAT_DATABASE_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "fhir_kat.cli", "mllp", "--port", str(free)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", free), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                time.sleep(0.2)
        ack = send(free, referral_message(native(), "CLI-1"))
        assert ack_code(ack) == "AA", str(ack)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
    assert "listening for HL7 v2 referrals (MLLP)" in err
    assert process.returncode == 130
