"""HL7 v2 referral benchmark: referrals per second through MLLP against the native route.

    python -m bench.v2 [--n 200] [--rounds 4]
    python -m bench.run --v2          # the same section inside the full report

The same referrals (the documented example, one referral identifier each) go in twice, in the
same run, on one SQLite store behind one app: as REF^I12 messages, each acknowledged before
the next, over one MLLP connection to the live listener (python-hl7's client); and as
``POST /api/v1/referrals`` over one requests session to a live threaded HTTP server, with
a bearer token. Rounds alternate (MLLP batch, native batch, …) so a change in the machine's
load falls on both alike; each route's figure is its median over the rounds. Both routes do
the same work after reading the wire (mapping, validation, triage, audit, outbox); the ratio is
what the v2 reading and the ACK cost. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import hl7.client
import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhir_kat.api.mllp import ListenerConfig, MllpListener  # noqa: E402
from fhir_kat.app import create_app  # noqa: E402
from fhir_kat.security.secrets import hash_secret  # noqa: E402
from fhir_kat.settings import load_settings  # noqa: E402
from tests.support.v2_messages import referral_message  # noqa: E402

EXAMPLE = json.loads((ROOT / "docs" / "examples" / "referrals.json").read_text())
ORG = "https://fhir-kat.example.org/fhir/sid/organization|CLINIC-7"
CLIENTS = {
    "bench-referrer": {
        "role": "referrer",
        "scopes": ["system/*.cruds"],
        "secret_hash": hash_secret("bench-secret-of-enough-length", iterations=1000),
        "organization": ORG,
    }
}
SENDERS = {
    "bench-emr": {
        "client": "bench-referrer",
        "sending_application": "OSCAR",
        "sending_facility": "CLINIC7",
        "addresses": ["127.0.0.1"],
        "organization_name": "Example Family Practice",
    }
}


def referral(number: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    out["referral_identifier"]["value"] = number
    out["source_id"] = f"BENCH-{number}"
    out["referrer"].pop("fhir_endpoint", None)
    return out


def bench_v2(n: int = 200, rounds: int = 4) -> list[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    with tempfile.TemporaryDirectory() as folder:
        base = load_settings({}, data_dir=folder, log_level="WARNING")
        app = create_app(replace(base, extra={"clients": CLIENTS, "v2_senders": SENDERS}))
        state = app.extensions["fhir_kat"]
        token, _ = state.tokens.issue(
            state.clients.get("bench-referrer"), state.clients.get("bench-referrer").scopes
        )
        server = make_server("127.0.0.1", 0, app, threaded=True)
        http = threading.Thread(target=server.serve_forever, daemon=True)
        http.start()
        per_round = max(1, n // rounds)
        mllp_rates: list[float] = []
        native_rates: list[float] = []
        try:
            with MllpListener(ListenerConfig(port=0), state.services.v2.receive) as listener:
                port = listener.address[1]
                url = f"http://127.0.0.1:{server.server_port}/api/v1/referrals"
                session = requests.Session()
                session.headers.update(
                    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                )
                with hl7.client.MLLPClient("127.0.0.1", port) as client:
                    for r in range(rounds):
                        messages = [
                            referral_message(referral(f"V-{r}-{i}"), f"B-{r}-{i}")
                            for i in range(per_round)
                        ]
                        bodies = [json.dumps(referral(f"N-{r}-{i}")) for i in range(per_round)]
                        start = time.perf_counter()
                        for message in messages:
                            ack = client.send_message(message)
                            if b"MSA|AA" not in ack:
                                raise RuntimeError(f"not accepted: {ack[:200]!r}")
                        mllp_rates.append(per_round / (time.perf_counter() - start))
                        start = time.perf_counter()
                        for body in bodies:
                            answer = session.post(url, data=body, timeout=60)
                            if answer.status_code != 201:
                                raise RuntimeError(f"native {answer.status_code}")
                        native_rates.append(per_round / (time.perf_counter() - start))
        finally:
            server.shutdown()
            state.export.shutdown()
            state.store.dispose()
    mllp, native = statistics.median(mllp_rates), statistics.median(native_rates)
    return [
        "| route | referrals | per second (median of rounds) |",
        "|---|---:|---:|",
        f"| HL7 v2 REF^I12 over MLLP (ACK each) | {per_round * rounds} | {mllp:.1f} |",
        f"| native POST /api/v1/referrals (HTTP, threaded server) | {per_round * rounds} | "
        f"{native:.1f} |",
        "",
        f"MLLP / native: **{mllp / native:.2f}** (SQLite, one sender, one connection each)",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="referrals per route")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print("\n".join(bench_v2(args.n, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
