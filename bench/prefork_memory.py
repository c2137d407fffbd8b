"""Memory of gunicorn workers with and without ``--preload`` (issue 25, fhir_kat/prefork.py).

    python -m bench.prefork_memory [--workers 4] [--iterations 12]

Starts the service under gunicorn (SQLite, ``--workers N --threads 4``) twice — plain, then
``--preload`` — posts the same artifacts to each (every kind, spread over the workers by the
kernel's accept queue), and reads each process's ``/proc/<pid>/smaps_rollup``: RSS, PSS
(shared pages split between the processes sharing them: the sum over the processes is what
the service really occupies) and USS (pages of that process alone). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_inprocess import bodies  # noqa: E402
from fhir_kat.security.secrets import hash_secret  # noqa: E402

SECRET = "bench-secret"  # noqa: S105 - a throwaway client of a throwaway server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory(pid: int) -> dict[str, int]:
    """KiB of Rss, Pss and USS (Private_Clean + Private_Dirty) of ``pid``."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        fields[name.strip()] = int(value.split()[0])
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(p) for p in found]


def measure(preload: bool, workers: int, iterations: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "kat.toml"
        config.write_text(
            '[clients.bench]\nrole = "program-staff"\nscopes = ["system/*.cruds"]\n'
            f'secret_hash = "{hash_secret(SECRET, iterations=1000)}"\n'
        )
        port = _free_port()
        env = {
            **os.environ,
            "FHIR_KAT_DATA_DIR": f"{tmp}/var",
            "FHIR_KAT_CONFIG": str(config),
            "FHIR_KAT_LOG_LEVEL": "WARNING",
            "FHIR_KAT_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}/fhir",
        }
        args = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--threads", "4"]
        args += ["--preload"] if preload else []
        args += ["--timeout", "120", "--bind", f"127.0.0.1:{port}", "fhir_kat.wsgi:app"]
        proc = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            for _ in range(600):  # bounded: 120 s
                try:
                    if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.2)
            while len(_children(proc.pid)) < workers and time.perf_counter() - started < 120:
                time.sleep(0.2)
            boot = time.perf_counter() - started
            token = requests.post(
                f"{url}/auth/token",
                auth=("bench", SECRET),
                data={"grant_type": "client_credentials"},
                timeout=30,
            ).json()["access_token"]
            session = requests.Session()
            session.headers.update(
                {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            )
            for n in range(iterations):
                for kind, body in bodies(n).items():
                    r = session.post(f"{url}/api/v1/{kind}", data=json.dumps(body), timeout=60)
                    r.raise_for_status()
                # New connections, so the accept queue spreads them over the workers.
                session.close()
            time.sleep(1)
            pids = [proc.pid, *_children(proc.pid)]
            per = [_memory(p) for p in pids]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    mib = 1024.0
    return {
        "boot_s": boot,
        "master_rss": per[0]["rss"] / mib,
        "worker_rss": sum(m["rss"] for m in per[1:]) / len(per[1:]) / mib,
        "worker_uss": sum(m["uss"] for m in per[1:]) / len(per[1:]) / mib,
        "total_pss": sum(m["pss"] for m in per) / mib,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=12)
    args = parser.parse_args(argv)
    rows = [
        "| gunicorn | boot s | master RSS MiB | worker RSS MiB | worker USS MiB | total PSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    results = {}
    for preload in (False, True):
        m = measure(preload, args.workers, args.iterations)
        results[preload] = m
        label = f"{args.workers} workers" + (" --preload" if preload else "")
        rows.append(
            f"| {label} | {m['boot_s']:.1f} | {m['master_rss']:.0f} | {m['worker_rss']:.0f} "
            f"| {m['worker_uss']:.0f} | {m['total_pss']:.0f} |"
        )
        print(rows[-1], flush=True)
    saved = results[False]["total_pss"] - results[True]["total_pss"]
    print("\n".join(rows))
    print(
        f"\n--preload saves {saved:.0f} MiB of PSS in total ({saved / args.workers:.0f} per worker)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
