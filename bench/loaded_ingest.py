"""Ingest on a loaded database next to a fresh one, in the same run (issue 25).

    python -m bench.loaded_ingest                           # 100k stored versions, both databases
    python -m bench.loaded_ingest --sizes 100000,1000000    # and 1M (~15 min per database to
                                                            # build once; cached, see below)
    python -m bench.loaded_ingest --profile 1000000         # py-spy profile of referrals, 1M SQLite

The service runs in-process (``create_app`` + Flask's test client, so the figures are the
service's own cost, not HTTP's): one app on a fresh database and one per loaded size, on SQLite
and PostgreSQL. Each round every app ingests the same kind of work in turn — per iteration a new
referral, screening, questionnaire response and medication administration
(``bench.ingest_inprocess.bodies``) — so a swing in the machine's load falls on all of them
alike. Reported: artifacts per second and the referral's p50, and the ratio loaded/fresh of
the throughput (issue 25's goal: at least 0.9).

A loaded database holds ``size`` stored versions from ``bench.data.observations`` (a Patient, a
referral Task and 8 total-score Observations per participant), bulk-inserted by
``bench.data.load`` (not through the service), after which a ``Store.create_schema`` — what a
starting service does — finds the statistics missing and ANALYZEs (fhir_kat/store/statistics.py).
Built once per size and kept under ``~/.cache/fhir_kat/bench`` (SQLite: a file copied per run;
PostgreSQL: a template database cloned per run), keyed by the code that shapes the rows; the
cache is never required (``--no-cache`` builds into the run's own database).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import data  # noqa: E402
from bench.ingest_inprocess import KINDS, bodies  # noqa: E402
from fhir_kat.app import create_app  # noqa: E402
from fhir_kat.security.secrets import hash_secret  # noqa: E402
from fhir_kat.settings import load_settings  # noqa: E402
from fhir_kat.store import Store  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fhir_kat" / "bench"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
#: What shapes a loaded database's rows: a change to any of them builds new caches.
SHAPERS = [
    ROOT / "bench" / "data.py",
    ROOT / "fhir_kat" / "store" / "schema.py",
    ROOT / "fhir_kat" / "store" / "observations.py",
    *sorted((ROOT / "fhir_kat" / "search").glob("*.py")),
    *sorted((ROOT / "mappings" / "search").glob("*")),
]
WARM_UP = 5  # unmeasured iterations per app (every kind's models, mappings, caches loaded)


def fingerprint() -> str:
    digest = hashlib.sha256()
    for path in SHAPERS:
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------- databases


def _admin(pg: str) -> Any:
    base, _, _ = pg.rpartition("/")
    return create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")


def _pg_url(pg: str, name: str) -> str:
    base, _, _ = pg.rpartition("/")
    return f"{base}/{name}"


def _pg_exists(pg: str, name: str) -> bool:
    engine = _admin(pg)
    with engine.connect() as conn:
        found = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
        exists = found.first() is not None
    engine.dispose()
    return exists


def _pg_run(pg: str, *statements: str) -> None:
    engine = _admin(pg)
    with engine.connect() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def build(url: str, size: int) -> float:
    """Bulk-load ``size`` versions into the empty database at ``url``, then start on it as the
    service does (which refreshes the statistics); returns the seconds taken."""
    start = time.perf_counter()
    store = Store(url, clock=data.StepClock())
    store.create_schema()
    data.load(store, data.observations(size // 10))
    store.dispose()
    service = Store(url)
    service.create_schema()  # a starting service: finds no statistics, ANALYZEs
    if service.is_sqlite:
        # Everything into the file itself: the cache is renamed and copied without its WAL.
        with service.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    service.dispose()
    return time.perf_counter() - start


def cached(kind: str, size: int, pg: str) -> str:
    """The cache of ``size`` versions (built if missing): a SQLite file's path, or the name of
    a PostgreSQL template database."""
    fp = fingerprint()
    if kind == "sqlite":
        path = CACHE / f"loaded-{size}-{fp}.sqlite3"
        if not path.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            seconds = build(f"sqlite:///{partial}", size)
            print(f"built SQLite {size:,} in {seconds:.0f} s", file=sys.stderr, flush=True)
            partial.rename(path)
        return str(path)
    template = f"kat_bench_loaded_{size}_{fp}"
    if not _pg_exists(pg, template):
        building = f"{template}_partial"
        _pg_run(
            pg,
            f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)',
            f'CREATE DATABASE "{building}"',
        )
        seconds = build(_pg_url(pg, building), size)
        print(f"built PostgreSQL {size:,} in {seconds:.0f} s", file=sys.stderr, flush=True)
        _pg_run(pg, f'ALTER DATABASE "{building}" RENAME TO "{template}"')
    return template


def loaded_database(kind: str, size: int, tmp: Path, pg: str, cache: bool) -> str:
    """A database of ``size`` stored versions for this run alone (its writes never reach
    the cache)."""
    if kind == "sqlite":
        target = tmp / f"loaded-{size}.sqlite3"
        if cache:
            shutil.copyfile(cached(kind, size, pg), target)
        else:
            seconds = build(f"sqlite:///{target}", size)
            print(f"built SQLite {size:,} in {seconds:.0f} s", file=sys.stderr, flush=True)
        return f"sqlite:///{target}"
    name = f"kat_bench_run_loaded_{size}"
    _pg_run(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if cache:
        _pg_run(pg, f'CREATE DATABASE "{name}" TEMPLATE "{cached(kind, size, pg)}"')
    else:
        _pg_run(pg, f'CREATE DATABASE "{name}"')
        seconds = build(_pg_url(pg, name), size)
        print(f"built PostgreSQL {size:,} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return _pg_url(pg, name)


def fresh_database(kind: str, tmp: Path, pg: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'fresh.sqlite3'}"
    name = "kat_bench_run_fresh"
    _pg_run(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    return _pg_url(pg, name)


# ---------------------------------------------------------------------- the service


@dataclass
class Subject:
    label: str
    client: Any
    app: Any
    next_n: int = 0
    times: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    busy: float = 0.0  # seconds spent ingesting (measured iterations)
    artifacts: int = 0

    def ingest(self, iterations: int, measured: bool = True) -> None:
        # A new token per batch: on a busy machine a run outlasts a token (300 s at most).
        state = self.app.extensions["fhir_kat"]
        bench = state.clients.get("bench")
        token, _ = state.tokens.issue(bench, bench.scopes)
        self.client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        for _ in range(iterations):
            n, self.next_n = self.next_n, self.next_n + 1
            for kind, body in bodies(n).items():
                payload = json.dumps(body)
                t0 = time.perf_counter()
                r = self.client.post(
                    f"/api/v1/{kind}", data=payload, content_type="application/json"
                )
                dt = time.perf_counter() - t0
                if r.status_code >= 300:
                    raise SystemExit(f"{kind}: {r.status_code} {r.get_data(as_text=True)[:800]}")
                if measured:
                    self.times[kind].append(dt * 1000)
                    self.busy += dt
                    self.artifacts += 1


@contextmanager
def service(url: str, data_dir: Path, label: str) -> Iterator[Subject]:
    settings = load_settings({}, database_url=url, data_dir=str(data_dir), log_level="WARNING")
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
    client = app.test_client()
    try:
        yield Subject(label, client, app)
    finally:
        state.export.shutdown()
        state.store.dispose()


def measure(subjects: list[Subject], rounds: int, per_round: int) -> None:
    for s in subjects:
        s.ingest(WARM_UP, measured=False)
    for r in range(rounds):
        # Rotate who goes first, so no app always follows the same neighbour.
        order = subjects[r % len(subjects) :] + subjects[: r % len(subjects)]
        for s in order:
            s.ingest(per_round)


def rows_for(database: str, subjects: list[Subject]) -> list[str]:
    fresh = subjects[0]
    fresh_rate = fresh.artifacts / fresh.busy
    out = []
    for s in subjects:
        rate = s.artifacts / s.busy
        referral = statistics.median(s.times["referrals"])
        out.append(
            f"| {database} | {s.label} | {rate:.1f} | {referral:.1f} "
            f"| {statistics.median(s.times['screenings']):.1f} "
            f"| {statistics.median(s.times['questionnaire-responses']):.1f} "
            f"| {rate / fresh_rate:.2f} |"
        )
    return out


def run(
    sizes: list[int], databases: list[str], pg: str, rounds: int, per_round: int, cache: bool
) -> list[str]:
    lines = [
        "| database | stored versions | artifacts/s | referral p50 ms | screening p50 ms "
        "| questionnaire response p50 ms | loaded/fresh |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for kind in databases:
        label = "SQLite" if kind == "sqlite" else "PostgreSQL"
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            urls = [("fresh", fresh_database(kind, tmp, pg))]
            urls += [(f"{n:,}", loaded_database(kind, n, tmp, pg, cache)) for n in sizes]
            with _all(urls, tmp) as subjects:
                measure(subjects, rounds, per_round)
                rows = rows_for(label, subjects)
            print("\n".join(rows), flush=True)
            lines.extend(rows)
            if kind == "postgres":
                for name in ["kat_bench_run_fresh", *(f"kat_bench_run_loaded_{n}" for n in sizes)]:
                    _pg_run(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return lines


@contextmanager
def _all(urls: list[tuple[str, str]], tmp: Path) -> Iterator[list[Subject]]:
    subjects: list[Subject] = []
    managers = []
    try:
        for i, (label, url) in enumerate(urls):
            manager = service(url, tmp / f"var-{i}", label)
            subjects.append(manager.__enter__())
            managers.append(manager)
        yield subjects
    finally:
        for manager in reversed(managers):
            manager.__exit__(None, None, None)


# ---------------------------------------------------------------------- profile


def profile(size: int, referrals: int, out: Path, cache: bool) -> None:
    """py-spy (sampling, native frames off) over ``referrals`` referrals posted to a SQLite
    database of ``size`` versions; writes the collapsed stacks to ``out`` and prints the
    functions with the largest inclusive share."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        url = loaded_database("sqlite", size, tmp, PG_DEFAULT, cache)
        script = tmp / "referrals.py"
        script.write_text(
            "import sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from bench.loaded_ingest import _profiled_referrals\n"
            f"_profiled_referrals({url!r}, {str(tmp / 'var')!r}, {referrals})\n"
        )
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        subprocess.run(
            [
                spy,
                "record",
                "--format",
                "raw",
                "--rate",
                "250",
                "-o",
                str(out),
                "--",
                sys.executable,
                str(script),
            ],
            check=True,
        )
    print(summarise(out))


def _profiled_referrals(url: str, data_dir: str, referrals: int) -> None:
    with service(url, Path(data_dir), "profile") as s:
        s.ingest(WARM_UP, measured=False)
        for _ in range(referrals):
            n, s.next_n = s.next_n, s.next_n + 1
            body = bodies(n)["referrals"]
            r = s.client.post("/api/v1/referrals", json=body)
            assert r.status_code == 201, r.get_data(as_text=True)[:400]


def summarise(collapsed: Path, top: int = 30) -> str:
    """Inclusive share of the samples per function (``name (file)``) within the measured
    referrals (the warm-up's samples left out), from py-spy's collapsed stacks."""
    total = 0
    inclusive: dict[str, int] = {}
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        if not any("full_dispatch_request" in f for f in frames) or any(
            "Subject.ingest" in f for f in frames
        ):
            continue
        count = int(count_text)
        total += count
        for name in {f.rsplit(":", 1)[0].strip() + ")" for f in frames}:
            inclusive[name] = inclusive.get(name, 0) + count
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])
    ranked = [kv for kv in ranked if kv[1] < total][:top]  # the frames every request passes
    lines = [
        f"{total} samples in the measured referrals",
        "",
        "| function (file) | share of request time |",
        "|---|---:|",
    ]
    lines += [f"| `{name}` | {100 * n / total:.1f} % |" for name, n in ranked]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", default="100000", help="stored versions, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("-n", type=int, default=25, help="iterations per app per round")
    parser.add_argument("--postgres", default=PG_DEFAULT, help="a PostgreSQL server's URL")
    parser.add_argument("--databases", default="sqlite,postgres", help="sqlite, postgres or both")
    parser.add_argument("--no-cache", action="store_true", help="build every database anew")
    parser.add_argument("--build-only", action="store_true", help="fill the caches and stop")
    parser.add_argument(
        "--profile", type=int, metavar="SIZE", help="profile referrals on a SQLite database"
    )
    parser.add_argument("--profile-referrals", type=int, default=200)
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",") if n]
    databases = args.databases.split(",")
    cache = not args.no_cache
    if args.profile:
        profile(args.profile, args.profile_referrals, Path(f"profile-{args.profile}.txt"), cache)
        return 0
    if args.build_only:
        for kind in databases:
            for n in sizes:
                cached(kind, n, args.postgres)
        return 0
    print("\n".join(run(sizes, databases, args.postgres, args.rounds, args.n, cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
