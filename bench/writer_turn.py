"""Where a referral's tail comes from under concurrent writers on SQLite (issue 20).

    python -m bench.writer_turn --seconds 6 --rounds 2

In process (``create_app`` + Flask test clients, no HTTP), 1, 4 and 8 threads post new
referrals for ``seconds`` each, rounds interleaved. The SQLite writer queue's turn is
instrumented: how long a writer waited for it, how long it held it (wall), and how much CPU its
thread used while holding it (``time.thread_time``). Held wall / held CPU is what the turn
holder lost to the other threads of its process (the GIL hands the interpreter round every
``sys.getswitchinterval()`` seconds): the writer turn is serial, so every millisecond it is
stretched is a millisecond every queued writer waits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import artifact  # noqa: E402
from fhir_kat.app import create_app  # noqa: E402
from fhir_kat.security.secrets import hash_secret  # noqa: E402
from fhir_kat.settings import load_settings  # noqa: E402
from fhir_kat.store import writer_queue  # noqa: E402

TURNS: list[tuple[float, float, float]] = []  # (waited, held wall, held CPU), seconds
_LOCK = threading.Lock()
_original = writer_queue.SqliteWriterQueue.turn


@contextmanager
def _instrumented(self: Any) -> Iterator[None]:
    asked = time.perf_counter()
    with _original(self):
        got, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            held, held_cpu = time.perf_counter() - got, time.thread_time() - cpu
            with _LOCK:
                TURNS.append((got - asked, held, held_cpu))


writer_queue.SqliteWriterQueue.turn = _instrumented  # type: ignore[method-assign]


def _pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=100)[p - 1] * 1000


def measure(app: Any, token: str, threads: int, seconds: float, offset: int) -> dict[str, float]:
    TURNS.clear()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def client(k: int) -> None:
        c = app.test_client()
        c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        n = offset + k * 1_000_000
        mine = []
        while time.perf_counter() < deadline:
            path, body = artifact(n)
            n += 1
            t0 = time.perf_counter()
            r = c.post(path, data=body, content_type="application/json")
            if r.status_code < 300:
                mine.append(time.perf_counter() - t0)
        with _LOCK:
            latencies.extend(mine)

    pool = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    turns = list(TURNS)
    waited = [w for w, _, _ in turns]
    held = [h for _, h, _ in turns]
    cpu = [c for _, _, c in turns]
    return {
        "rps": len(latencies) / seconds,
        "p50": statistics.median(latencies) * 1000,
        "p99": _pct(latencies, 99),
        "wait p50": _pct(waited, 50),
        "wait p99": _pct(waited, 99),
        "held p50": _pct(held, 50),
        "held p99": _pct(held, 99),
        "held cpu p50": _pct(cpu, 50),
        "held wall/cpu": sum(held) / max(sum(cpu), 1e-9),
        "turns per referral": len(turns) / max(len(latencies), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", default="1,4,8")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            {}, database_url=f"sqlite:///{tmp}/kat.db", data_dir=f"{tmp}/var", log_level="WARNING"
        )
        client = {
            "role": "program-staff",
            "scopes": ["system/*.cruds"],
            "secret_hash": hash_secret("x", iterations=1000),
        }
        app = create_app(replace(settings, extra={"clients": {"bench": client}}))
        state = app.extensions["fhir_kat"]
        bench = state.clients.get("bench")
        token, _ = state.tokens.issue(bench, bench.scopes)
        measure(app, token, 4, 2.0, 10**9)  # warm-up
        results: dict[int, list[dict[str, float]]] = {t: [] for t in counts}
        offset = 2
        for _ in range(args.rounds):
            for t in counts:
                offset += 1
                results[t].append(measure(app, token, t, args.seconds, offset * 10**9))
        state.export.shutdown()
        state.store.dispose()
    keys = list(results[counts[0]][0])
    print(
        f"switch interval {sys.getswitchinterval() * 1000:.0f} ms; medians of {args.rounds} rounds"
    )
    print("| threads | " + " | ".join(keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for t in counts:
        row = [statistics.median(r[k] for r in results[t]) for k in keys]
        print(f"| {t} | " + " | ".join(f"{v:,.1f}" for v in row) + " |")


if __name__ == "__main__":
    main()
