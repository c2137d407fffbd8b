"""Reads under ingest, and the referral's tail under concurrent writers, against a baseline
commit, in one run (issue 20, ADR 0023).

    python -m bench.reads_under_writes                     # baseline = main's merge base
    python -m bench.reads_under_writes --baseline a2baa14 --rounds 3 --seconds 8
    python -m bench.reads_under_writes --postgres          # PostgreSQL too (tail only)

Both trees run under gunicorn (``bench.ingest.WORKERS`` x ``THREADS``) on loopback, each on a
database of its own: the baseline from ``git archive <commit>`` into a temporary directory, this
tree as it is. Rounds interleave the two (the machine is shared and noisy: a swing in its load
falls on both alike), and the table reports each figure's median over the rounds and the ratio
this tree / baseline. Per round and tree:

- reads alone: 2 clients reading one Patient (``GET /fhir/Patient/<id>``), each read audited;
- reads under ingest: the same 2 readers while 4 clients post referral artifacts;
- the referral at 1 client and at 8 clients (issue 20's target: p99 at 8 ≤ 4 × p50 at 1).

Load generators are separate processes (``bench.ingest.load``); every client keeps one
keep-alive session.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ingest  # noqa: E402

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextmanager
def served(root: Path, database_url: str, tmp: Path) -> Iterator[str]:
    """The service of the tree at ``root`` under gunicorn on a free loopback port."""
    port = ingest._free_port()
    env = {**os.environ, **ingest.service_env(database_url, tmp), "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(ingest.WORKERS),
            "--threads",
            str(ingest.THREADS),
            "--timeout",
            "120",
            "--preload",
            "--bind",
            f"127.0.0.1:{port}",
            "fhir_kat.wsgi:app",
        ],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # bounded: about 2 minutes on a loaded machine
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise RuntimeError("gunicorn did not start: " + proc.stderr.read().decode()[-2000:])  # type: ignore[union-attr]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()


def _reader_process(args: tuple[str, str, int, float]) -> list[float]:
    url, token, threads, seconds = args
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        session = requests.Session()
        mine: list[float] = []
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            r = session.get(f"{url}/fhir/Patient/bench-read", headers=headers, timeout=60)
            if r.status_code == 200:
                mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies


def _summary(latencies: list[float], seconds: float) -> dict[str, float]:
    latencies = sorted(latencies)
    if len(latencies) < 2:
        nan = float("nan")
        return {"rps": len(latencies) / seconds, "p50": nan, "p99": nan}
    q = statistics.quantiles(latencies, n=100)
    return {
        "rps": len(latencies) / seconds,
        "p50": statistics.median(latencies) * 1000,
        "p99": q[98] * 1000,
    }


def reads(url: str, seconds: float, writers: int, offset: int) -> dict[str, float]:
    """2 readers for ``seconds``, with ``writers`` clients posting referrals meanwhile."""
    ctx = multiprocessing.get_context("spawn")
    token = ingest.token(url)
    with ctx.Pool(1) as pool:
        pending = pool.map_async(_reader_process, [(url, token, 2, seconds)])
        written = ingest.load(url, "artifact", token, writers, seconds, offset) if writers else {}
        result = _summary(pending.get(timeout=seconds * 10 + 120)[0], seconds)
    if written:
        result["ingest_rps"] = written["rps"]
    return result


def seed(url: str) -> None:
    r = requests.put(
        f"{url}/fhir/Patient/bench-read",
        json={"resourceType": "Patient", "id": "bench-read", "gender": "unknown"},
        headers={"Authorization": f"Bearer {ingest.token(url)}"},
        timeout=60,
    )
    r.raise_for_status()


def baseline_tree(commit: str, into: Path) -> Path:
    archive = into / "baseline.tar"
    subprocess.run(
        ["git", "archive", "--format=tar", "-o", str(archive), commit], cwd=ROOT, check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default=None, help="commit (default: merge-base with main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    commit = (
        args.baseline
        or subprocess.run(
            ["git", "merge-base", "HEAD", "main"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    figures: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        trees = {f"baseline {commit[:7]}": baseline_tree(commit, tmp), "this tree": ROOT}
        databases = ["sqlite"] + (["postgres"] if args.postgres else [])
        urls: dict[tuple[str, str], str] = {}
        for db in databases:
            for n, (name, root) in enumerate(trees.items()):
                work = tmp / f"{db}-{n}"
                work.mkdir()
                if db == "sqlite":
                    database_url = f"sqlite:///{work / 'kat.sqlite3'}"
                else:
                    database_url = _fresh_postgres(os.environ.get("BENCH_PG", PG_DEFAULT), n)
                url = stack.enter_context(served(root, database_url, work))
                seed(url)
                ingest.load(url, "artifact", ingest.token(url), 4, ingest.WARM_UP, 10**9 * (n + 1))
                urls[(db, name)] = url
        offset = 1
        for round_ in range(args.rounds):
            for (db, name), url in urls.items():
                print(f"round {round_ + 1}: {db} {name}", file=sys.stderr)
                measured: dict[str, dict[str, float]] = {}
                if db == "sqlite":
                    measured["reads alone"] = reads(url, args.seconds, 0, 0)
                    offset += 1
                    measured["reads under ingest"] = reads(url, args.seconds, 4, offset * 10**9)
                for clients in (1, 8):
                    offset += 1
                    measured[f"referral, {clients} client(s)"] = ingest.load(
                        url, "artifact", ingest.token(url), clients, args.seconds, offset * 10**9
                    )
                for what, r in measured.items():
                    for key, value in r.items():
                        figures.setdefault((db, name, f"{what}|{key}"), []).append(value)
    print(_table(figures, list(trees), args))


def _fresh_postgres(url: str, n: int) -> str:
    from sqlalchemy import create_engine, text

    name = f"bench_rw_{n}"
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def _table(figures: dict[tuple[str, str, str], list[float]], trees: list[str], args: Any) -> str:
    base, mine = trees
    rows = [
        f"{args.rounds} interleaved rounds of {args.seconds:.0f} s; medians over rounds; "
        "gunicorn --preload "
        f"{ingest.WORKERS}x{ingest.THREADS}",
        "",
        f"| database | measurement | figure | {base} | {mine} | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    keys = sorted({(db, what) for db, _, what in figures})
    for db, what in keys:
        label, key = what.split("|")
        if key in ("errors", "p95"):
            continue
        b = statistics.median(figures.get((db, base, what), [float("nan")]))
        m = statistics.median(figures.get((db, mine, what), [float("nan")]))
        unit = "/s" if key.endswith("rps") else " ms"
        rows.append(f"| {db} | {label} | {key} | {b:,.1f}{unit} | {m:,.1f}{unit} | {m / b:.2f}× |")
    for db in sorted({db for db, _, _ in figures}):
        for tree in trees:
            p99 = statistics.median(figures[(db, tree, "referral, 8 client(s)|p99")])
            p50 = statistics.median(figures[(db, tree, "referral, 1 client(s)|p50")])
            rows.append(
                f"\n{db}, {tree}: referral p99 at 8 clients / p50 at 1 client = {p99 / p50:.1f}×"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
