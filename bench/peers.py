"""fhir_kat beside its peers, in one run (issue 20): the same write shapes over HTTP against

- fhir_kat under gunicorn (``bench.ingest.gunicorn``: 2 workers x 4 threads) on SQLite, and on
  PostgreSQL with ``--postgres`` (a table of its own beside the same peers, with PostgreSQL
  over SQLite per request: issue 20 asks ≥ 0.8 at 1 client);
- sekmet-fhir (PyPI, Python: FastAPI + SQLite), the Python peer the targets are set against,
  from its own virtual environment under ``~/.cache/fhir_kat`` (as the tests install it);
- Medplum's in-memory FHIR router (npm ``@medplum/fhir-router`` + ``@medplum/core`` on node's
  HTTP server, ``bench/peers/medplum_router.mjs``): a reference point, not a target — no
  database, no authentication, no audit trail.

Shapes: a single ``POST /fhir/Observation``; a transaction of 100 Observation creates; the same
with every entry a conditional create (``ifNoneExist`` on its identifier, new each time); and,
fhir_kat only (the peers have no native API), the referral artifact. Rounds interleave the
targets (the machine is noisy); each figure is the median of the rounds. Nothing asserts a time.

    python -m bench.peers                          # 1 and 8 clients, 3 rounds of 4 s
    python -m bench.peers --postgres postgresql+psycopg://postgres@127.0.0.1:5432/bench
    python -m bench.peers --shapes conditional-100 --clients 1 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ingest  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fhir_kat"
SEKMET_VERSION = "0.1.1"  # the version tests/exchange/conftest.py installs
MEDPLUM_VERSION = "4.5.2"
SHAPES = {
    "observation": ("single POST Observation", 1),
    "transaction-100": ("transaction, 100 creates", ingest.TX_ENTRIES),
    "conditional-100": ("transaction, 100 conditional creates", ingest.TX_ENTRIES),
    "artifact": ("referral artifact (native API)", 1),
}
PEER_SHAPES = {"observation", "transaction-100", "conditional-100"}
#: Medplum's router refuses a transaction needing strict isolation (conditional entries) of
#: more than 8 entries, and its MemoryRepository matches each ``ifNoneExist`` by scanning every
#: stored resource with FHIRPath on node's one thread: under load it stops answering at all.
MEDPLUM_SHAPES = {"observation", "transaction-100"}


def _runs(target: str, shape: str) -> bool:
    if target.startswith("fhir_kat"):
        return True
    if target.startswith("medplum"):
        return shape in MEDPLUM_SHAPES
    return shape in PEER_SHAPES


def _wait(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded in time
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start in {timeout:.0f} s")


@contextmanager
def _process(
    args: list[str], env: dict[str, str], cwd: Path, probe: str, what: str
) -> Iterator[None]:
    proc = subprocess.Popen(
        args,
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(probe, proc, what)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def sekmet_binary() -> Path:
    venv = CACHE / "sekmet-venv"
    binary = venv / "bin" / "sekmet"
    if not (venv / f".installed-{SEKMET_VERSION}").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", f"sekmet-fhir=={SEKMET_VERSION}"],
            check=True,
            timeout=600,
        )
        (venv / f".installed-{SEKMET_VERSION}").touch()
    return binary


@contextmanager
def sekmet(tmp: Path) -> Iterator[str]:
    port = ingest._free_port()
    work = tmp / "sekmet"
    work.mkdir()
    config = work / "settings.yaml"
    config.write_text(
        f"base_url: http://127.0.0.1:{port}/fhir\nhost: 127.0.0.1\nport: {port}\n"
        f"data_dir: {work / 'data'}\nown_private_key_path: {work / 'keys' / 'own.pem'}\n"
        "log_inbound: false\nsimulator:\n  enabled: false\n"
    )
    args = [str(sekmet_binary()), "serve", "-c", str(config), "--host", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}"
    with _process([*args, "--port", str(port)], {}, work, f"{url}/fhir/metadata", "sekmet"):
        yield url


def medplum_modules() -> Path:
    folder = CACHE / "medplum-router"
    modules = folder / "node_modules"
    stamp = folder / f".installed-{MEDPLUM_VERSION}"
    if not stamp.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name": "kat-bench-medplum", "private": true}\n')
        subprocess.run(
            [
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                f"@medplum/fhir-router@{MEDPLUM_VERSION}",
                f"@medplum/core@{MEDPLUM_VERSION}",
            ],
            cwd=folder,
            check=True,
            timeout=600,
        )
        stamp.touch()
    return modules


@contextmanager
def medplum(_tmp: Path) -> Iterator[str]:
    port = ingest._free_port()
    script = ROOT / "bench" / "peers" / "medplum_router.mjs"
    # Node 20 has no global WebSocket without the flag, and @medplum/core expects one.
    args = ["node", "--experimental-websocket", str(script), str(port)]
    url = f"http://127.0.0.1:{port}"
    env = {"NODE_PATH": str(medplum_modules())}
    with _process(args, env, ROOT, f"{url}/healthz", "medplum router"):
        yield url


@contextmanager
def fhir_kat(database_url: str, tmp: Path) -> Iterator[str]:
    work = tmp / f"kat-{abs(hash(database_url))}"
    work.mkdir()
    with ingest.gunicorn("fhir_kat.wsgi:app", ingest.service_env(database_url, work)) as url:
        yield url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--postgres", default=None, help="also fhir_kat on this PostgreSQL")
    parser.add_argument("--no-medplum", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    shapes = args.shapes.split(",")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        starters: dict[str, Callable[[Path], object]] = {
            "fhir_kat SQLite": lambda t: fhir_kat(f"sqlite:///{t / 'bench.sqlite3'}", t),
            "sekmet": sekmet,
        }
        if args.postgres:
            from bench.run import _drop_postgres, _postgres

            _drop_postgres(args.postgres)  # an empty database: every target starts empty
            url = _postgres(args.postgres)
            starters["fhir_kat PostgreSQL"] = lambda t: fhir_kat(url, t)
        if not args.no_medplum:
            starters["medplum (memory)"] = medplum
        urls = {name: stack.enter_context(start(Path(tmp))) for name, start in starters.items()}  # type: ignore[call-overload]
        results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
        offset = 10
        for target, url in urls.items():  # warm every worker up on every shape first
            for shape in shapes:
                if _runs(target, shape):
                    offset += 1
                    ingest.load(url, shape, _token(target, url), 4, ingest.WARM_UP, offset * 10**9)
        for round_no in range(args.rounds):
            # Every other round the other way round: a target is not always the one measured
            # right after another's load.
            order = list(urls.items())[:: -1 if round_no % 2 else 1]
            for shape in shapes:
                for c in clients:
                    for target, url in order:
                        if not _runs(target, shape):
                            continue
                        offset += 1
                        r = ingest.load(
                            url, shape, _token(target, url), c, args.seconds, offset * 10**9
                        )
                        results.setdefault((shape, target, c), []).append(r)
                        print(f"{shape} {target} {c}: {r['rps']:.1f}/s", file=sys.stderr)
            # Written after every round: a run cut short still leaves its table.
            table = _table(results, list(urls), shapes, clients, args)
            if args.out:
                args.out.write_text(table + "\n")
        table = _table(results, list(urls), shapes, clients, args)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


def _token(target: str, url: str) -> str:
    return ingest.token(url) if target.startswith("fhir_kat") else ""


def _table(
    results: dict[tuple[str, str, int], list[dict[str, float]]],
    targets: list[str],
    shapes: list[str],
    clients: list[int],
    args: argparse.Namespace,
) -> str:
    """One table per fhir_kat database (SQLite; PostgreSQL with ``--postgres``), each beside
    the same peers measured in the same interleaved rounds, with the ratios; the PostgreSQL
    table also gives PostgreSQL over SQLite per request."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = (
        " ".join(Path("/proc/loadavg").read_text().split()[:3])
        if Path("/proc/loadavg").exists()
        else "?"
    )
    out = [
        f"Run {when}, {os.cpu_count()} cores, load average at the end {load}, {args.rounds} "
        f"interleaved rounds of {args.seconds:g} s per cell, median of the rounds. Requests/s "
        "(resources/s for transactions), p50 / p99 ms; ratios are fhir_kat's figure over the "
        "peer's (medians of the rounds' figures).",
    ]
    peers = [t for t in targets if not t.startswith("fhir_kat")]
    for kat in (t for t in targets if t.startswith("fhir_kat")):
        versus = [*peers, *(["fhir_kat SQLite"] if kat != "fhir_kat SQLite" else [])]
        names = [v.replace("fhir_kat ", "").split(" ")[0] for v in versus]
        out += [
            "",
            f"**{kat}**",
            "",
            "| shape | clients | "
            + " | ".join([kat, *peers])
            + " | "
            + " | ".join(f"{kat.replace('fhir_kat ', '')} / {n}" for n in names)
            + " |",
            "|---|---:|" + "---:|" * (1 + len(peers) + len(versus)),
        ]
        for shape in shapes:
            label, per_request = SHAPES[shape]
            for c in clients:
                cells: list[str] = []
                rates: dict[str, float] = {}
                for target in targets:
                    runs = results.get((shape, target, c))
                    if not runs or not any(r["rps"] for r in runs):
                        continue
                    rates[target] = statistics.median(r["rps"] for r in runs) * per_request
                for target in [kat, *peers]:
                    runs = results.get((shape, target, c))
                    if not runs:
                        cells.append("—")
                        continue
                    errors = sum(r["errors"] for r in runs)
                    if target not in rates:
                        cells.append(f"refused ({errors:.0f} of {errors:.0f})")
                        continue
                    p50 = statistics.median(r["p50"] for r in runs)
                    p99 = statistics.median(r["p99"] for r in runs)
                    note = f", {errors:.0f} errors" if errors else ""
                    cells.append(f"{rates[target]:,.0f} ({p50:.1f} / {p99:.1f}{note})")
                mine = rates.get(kat)
                ratios = [
                    f"{mine / rates[v]:.2f}x" if mine and rates.get(v) else "—" for v in versus
                ]
                out.append(f"| {label} | {c} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
