"""Per-request cost of the write paths, in process (issue 20): ``create_app`` + the Flask test
client (the service's own cost, no HTTP), SQLite or PostgreSQL, rounds interleaving the paths:

- ``observation``: a single ``POST /fhir/Observation`` (``bench.ingest.observation``);
- ``transaction-100``: a transaction of 100 plain Observation creates;
- ``conditional-100``: 100 Observations, every entry a conditional create (``ifNoneExist``);
- ``artifact``: the native referral artifact (``bench.ingest.artifact``).

Per path: p50 ms, CPU ms (``time.process_time``: this process only — PostgreSQL's backend is
another process) and SQL statements sent per request (counted with a SQLAlchemy
``before_cursor_execute`` hook; one ``executemany`` is one statement, one round trip).

``--same-patient`` makes every Observation's subject one patient (a history that grows request
after request): with it, a per-patient write hook whose cost grows with that patient's history
shows as a rising p50 between the first and the last rounds (``first`` / ``last`` columns).

    python -m bench.write_paths -n 40
    python -m bench.write_paths -n 40 --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench
    python -m bench.write_paths -n 200 --paths observation --same-patient
    py-spy record -r 250 --format raw -o /tmp/obs.txt -- python -m bench.write_paths \
        -n 200 --paths observation

Nothing asserts a time; tests/test_write_round_trips.py pins the statement counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import event

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ingest  # noqa: E402
from fhir_kat.app import create_app  # noqa: E402
from fhir_kat.security.secrets import hash_secret  # noqa: E402
from fhir_kat.settings import load_settings  # noqa: E402

PATHS: dict[str, Callable[[int], tuple[str, bytes]]] = {
    "observation": ingest.observation,
    "transaction-100": ingest.transaction_100,
    "conditional-100": ingest.conditional_100,
    "artifact": ingest.artifact,
}


def _one_patient(body: bytes) -> bytes:
    """``body`` with every Observation's subject the same patient."""
    data = json.loads(body)
    resources = [e["resource"] for e in data.get("entry", [])] or [data]
    for r in resources:
        if r.get("resourceType") == "Observation":
            r["subject"] = {"reference": "Patient/bench-one"}
    return json.dumps(data).encode()


def run(
    n: int,
    database_url: str | None,
    paths: list[str],
    same_patient: bool,
    floor_parts: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, list[float]]]:
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
        registration = state.clients.get("bench")
        token, _ = state.tokens.issue(registration, registration.scopes)
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        statements = [0]

        @event.listens_for(state.store.engine, "before_cursor_execute")
        def _count(*_args: Any) -> None:
            statements[0] += 1

        out: dict[str, dict[str, list[float]]] = {}
        for i in range(n + 3):  # 3 warm-up rounds, not counted
            for path in paths:
                url, body = PATHS[path](i * 1000 + 7)
                if same_patient:
                    body = _one_patient(body)
                ctype = "application/json" if url.startswith("/api/") else "application/fhir+json"
                statements[0] = 0
                cpu, wall = time.process_time(), time.perf_counter()
                r = client.post(url, data=body, content_type=ctype)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if r.status_code >= 300:
                    raise SystemExit(f"{path}: {r.status_code} {r.get_data(as_text=True)[:800]}")
                if i >= 3:
                    got = out.setdefault(path, {"wall": [], "cpu": [], "statements": []})
                    got["wall"].append(wall * 1000)
                    got["cpu"].append(cpu * 1000)
                    got["statements"].append(statements[0])
        if floor_parts is not None:  # the app's own mapping, for the referral's resources
            floor_parts.update(
                floor(
                    n,
                    None if database_url is None else database_url,
                    paths,
                    lambda data: state.artifacts.transform("referrals", data, "bench"),
                )
            )
        state.export.shutdown()
        state.store.dispose()
        return out


def floor(
    n: int,
    database_url: str | None,
    paths: list[str],
    mapped: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """The necessary parts of each path's request, measured on their own (ms, medians of
    ``n``): parsing the body (``json.loads``), validating every resource it carries (R4B
    models, ``validate_resource`` with its cache emptied: each request carries new content),
    and one write transaction that inserts the resources' JSON as one row each into a scratch
    table and commits (one round trip per statement batch: the least a durable write costs)."""
    from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine, insert

    import fhir_kat.validation.resource as validation

    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(database_url or f"sqlite:///{tmp}/floor.db")
        meta = MetaData()
        scratch = Table(
            "kat_bench_floor",
            meta,
            Column("id", Integer, primary_key=True),
            Column("content", Text),
        )
        meta.drop_all(engine)
        meta.create_all(engine)
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        out: dict[str, dict[str, float]] = {}
        for path in paths:
            parse, validate, commit = [], [], []
            for i in range(n + 3):
                _, body = PATHS[path](i * 1000 + 11)
                t = time.perf_counter()
                data = json.loads(body)
                parse.append(time.perf_counter() - t)
                if path == "artifact":
                    # The FHIR resources the referral maps to (what the service validates).
                    bundle = mapped(data)
                    resources = [e["resource"] for e in bundle.get("entry", [])]
                else:
                    resources = [e["resource"] for e in data.get("entry", [])] or [data]
                validation._valid.clear()
                t = time.perf_counter()
                for r in resources:
                    validation.validate_resource(r, r["resourceType"])
                validate.append(time.perf_counter() - t)
                rows = [{"content": json.dumps(r)} for r in resources]
                t = time.perf_counter()
                with engine.begin() as conn:
                    conn.execute(insert(scratch), rows)
                commit.append(time.perf_counter() - t)
            out[path] = {
                "parse": statistics.median(parse[3:]) * 1000,
                "validate": statistics.median(validate[3:]) * 1000,
                "commit": statistics.median(commit[3:]) * 1000,
            }
        meta.drop_all(engine)
        engine.dispose()
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("-n", type=int, default=30)
    parser.add_argument("--database-url", help="PostgreSQL instead of a new SQLite file")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--same-patient", action="store_true")
    parser.add_argument(
        "--floor", action="store_true", help="also the necessary parts, measured on their own"
    )
    args = parser.parse_args(argv)
    if args.database_url:
        from fhir_kat.store import Store

        Store(args.database_url).drop_schema()
    parts: dict[str, dict[str, float]] | None = {} if args.floor else None
    out = run(args.n, args.database_url, args.paths.split(","), args.same_patient, parts)
    print("| path | p50 ms | CPU p50 ms | statements | first 10 p50 ms | last 10 p50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for path, got in out.items():
        wall = got["wall"]
        print(
            f"| {path} | {statistics.median(wall):.1f} | {statistics.median(got['cpu']):.1f}"
            f" | {statistics.median(got['statements']):.0f}"
            f" | {statistics.median(wall[:10]):.1f} | {statistics.median(wall[-10:]):.1f} |"
        )
    if parts is not None:
        print()
        print("| path | parse ms | validate ms | one commit ms | sum ms | request p50 / sum |")
        print("|---|---:|---:|---:|---:|---:|")
        for path, got in parts.items():
            total = got["parse"] + got["validate"] + got["commit"]
            p50 = statistics.median(out[path]["wall"]) if path in out else float("nan")
            print(
                f"| {path} | {got['parse']:.2f} | {got['validate']:.2f} | {got['commit']:.2f}"
                f" | {total:.2f} | {p50 / total:.1f}x |"
            )


if __name__ == "__main__":
    main()
