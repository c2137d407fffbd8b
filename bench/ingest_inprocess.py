"""In-process ingest cost per artifact kind: ``create_app`` + Flask test client posting N
artifacts of each kind (a new referral, screening, questionnaire response and medication
administration per patient, distinct identifiers and valid synthetic PHNs) on SQLite.

Prints the p50 / mean per-artifact milliseconds per kind. ``--profile`` runs pyinstrument
(if installed) around the posts instead and prints its text report.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fhir_kat.app import create_app
from fhir_kat.security.secrets import hash_secret
from fhir_kat.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ingest import _phn  # noqa: E402

KINDS = ["referrals", "screenings", "questionnaire-responses", "medication-administrations"]
EXAMPLES = {k: json.loads((ROOT / "docs" / "examples" / f"{k}.json").read_text()) for k in KINDS}


def bodies(n: int) -> dict[str, dict[str, Any]]:
    phn = _phn(n * 7919 + 13)
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        body = copy.deepcopy(EXAMPLES[kind])
        body["source_id"] = f"BENCH-{kind}-{n}"
        if kind == "referrals":
            body["referral_identifier"]["value"] = f"R-BENCH-{n}"
            body["patient"]["phn"] = phn
        else:
            body["patient_phn"] = phn
            if "referral_identifier" in body:
                body["referral_identifier"]["value"] = f"R-BENCH-{n}"
        out[kind] = body
    return out


def run(n: int, profile: bool, database_url: str | None = None) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            {},
            database_url=database_url or f"sqlite:///{tmp}/kat.db",
            data_dir=f"{tmp}/var",
            log_level="WARNING",
        )
        settings = replace(
            settings,
            extra={
                "clients": {
                    "bench": {
                        "role": "program-staff",
                        "scopes": ["system/*.cruds"],
                        "secret_hash": hash_secret("x", iterations=1000),
                    }
                }
            },
        )
        app = create_app(settings)
        state = app.extensions["fhir_kat"]
        token, _ = state.tokens.issue(state.clients.get("bench"), state.clients.get("bench").scopes)
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        profiler = None
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
        for i in range(n + 5):  # 5 warm-up rounds
            if profiler and i == 5:
                profiler.start()
            for kind, body in bodies(i).items():
                data = json.dumps(body)
                t0 = time.perf_counter()
                r = client.post(f"/api/v1/{kind}", data=data, content_type="application/json")
                dt = (time.perf_counter() - t0) * 1000
                if r.status_code >= 300:
                    raise SystemExit(f"{kind}: {r.status_code} {r.get_data(as_text=True)[:800]}")
                if i >= 5:
                    times[kind].append(dt)
        if profiler:
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False, show_all=False))
        state.export.shutdown()
        state.store.dispose()
        return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL URL instead of a new SQLite file (its tables are emptied first)",
    )
    args = parser.parse_args()
    if args.database_url:
        from fhir_kat.store import Store

        Store(args.database_url).drop_schema()
    times = run(args.n, args.profile, args.database_url)
    for kind, ts in times.items():
        print(
            f"{kind:28s} p50 {statistics.median(ts):7.2f} ms  mean {statistics.fmean(ts):7.2f} ms"
        )


if __name__ == "__main__":
    main()
