"""In-process cost of a conditional-create-heavy transaction (issue 20): ``create_app`` + the
Flask test client posting ``bench.ingest.conditional_100`` Bundles (100 Observations, each
``ifNoneExist`` on its identifier), new ones (every entry creates) and re-sent ones (every
entry matches), with the transaction's conditional lookups together (``_conditional_matches``:
one query per type, parameter and 100 tokens) or one by one (as before: one parse, lock and
query per entry), interleaved in one run. Run it under py-spy for the profile:

    python -m bench.conditional_inprocess -n 30
    py-spy record --format raw -o /tmp/cond.txt -- \
        python -m bench.conditional_inprocess -n 30 --only together
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import TX_ENTRIES, conditional_100  # noqa: E402
from fhir_kat.app import create_app  # noqa: E402
from fhir_kat.security.secrets import hash_secret  # noqa: E402
from fhir_kat.services import fhir_rest  # noqa: E402
from fhir_kat.settings import load_settings  # noqa: E402


def _mode(mode: str) -> AbstractContextManager[object]:
    if mode == "together":
        return nullcontext()
    # No criteria qualifies for the joint lookup: every entry takes the per-entry path.
    return mock.patch.object(fhir_rest, "_single_token", lambda _query: None)


def run(n: int, database_url: str | None, modes: tuple[str, ...]) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            {},
            database_url=database_url or f"sqlite:///{tmp}/kat.db",
            data_dir=f"{tmp}/var",
            log_level="WARNING",
        )
        bench = {
            "role": "program-staff",
            "scopes": ["system/*.cruds"],
            "secret_hash": hash_secret("x", iterations=1000),
        }
        app = create_app(replace(settings, extra={"clients": {"bench": bench}}))
        state = app.extensions["fhir_kat"]
        client_reg = state.clients.get("bench")
        token, _ = state.tokens.issue(client_reg, client_reg.scopes)
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        times: dict[str, list[float]] = {}

        def post(label: str, body: bytes) -> None:
            t0 = time.perf_counter()
            r = client.post("/fhir", data=body, content_type="application/fhir+json")
            dt = time.perf_counter() - t0
            if r.status_code >= 300:
                raise SystemExit(f"{label}: {r.status_code} {r.get_data(as_text=True)[:800]}")
            times.setdefault(label, []).append(dt)

        for i in range(n + 3):  # 3 warm-up rounds, not counted
            for mode in modes:
                _, body = conditional_100(i * 2 + (mode == "together"))
                with _mode(mode):
                    post(f"{mode}, new", body)
                    post(f"{mode}, re-sent", body)
        state.export.shutdown()
        state.store.dispose()
        return {k: v[3:] for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=30)
    parser.add_argument("--database-url", help="PostgreSQL instead of a new SQLite file")
    parser.add_argument(
        "--only", choices=["together", "one by one"], help="one mode (for a profile of it)"
    )
    args = parser.parse_args()
    if args.database_url:
        from fhir_kat.store import Store

        Store(args.database_url).drop_schema()
    modes = (args.only,) if args.only else ("together", "one by one")
    times = run(args.n, args.database_url, modes)
    print("| lookups | transaction | p50 ms | resources/s |")
    print("|---|---|---:|---:|")
    for label, ts in times.items():
        mode, kind = label.split(", ")
        p50 = statistics.median(ts)
        print(f"| {mode} | {kind} | {p50 * 1000:.1f} | {TX_ENTRIES / p50:,.0f} |")


if __name__ == "__main__":
    main()
