"""Delivery benchmark: deliveries per second from the outbox to a partner on loopback.

    python -m bench.delivery [--n 300] [--no-sekmet]
    python -m bench.run --delivery        # the same section inside the full report

Each destination is measured twice in the same run: through the outbox (enqueue, then one
in-process ``DeliveryWorker`` draining it: claim, lease renewal, send, record) and as the
baseline, the same requests sent with a plain ``requests.Session`` in a loop (the HTTP and
partner cost alone). The ratio is what the outbox's durability costs per delivery.

Destinations: a minimal loopback receiver (answers 200 at once: the outbox's own overhead),
SEKMET (a real FHIR server storing each transaction with conditional create, when its virtual
environment from the exchange tests exists), and R4 rest-hook notifications to one subscriber
(ordered per subscriber: one in flight at a time). SQLite store; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhir_kat.exchange import outbox as ob  # noqa: E402
from fhir_kat.exchange.bundles import to_transaction  # noqa: E402
from fhir_kat.exchange.netguard import networks  # noqa: E402
from fhir_kat.exchange.outbox import RetryPolicy  # noqa: E402
from fhir_kat.exchange.partners import PartnerConfig  # noqa: E402
from fhir_kat.exchange.worker import DeliveryWorker  # noqa: E402
from fhir_kat.store import Store  # noqa: E402

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True


@contextmanager
def loopback_receiver() -> Iterator[str]:
    """The baseline partner: reads the request, answers 200 with no body."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = _answer

    server = _Receiver(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def sekmet_partner(workdir: Path) -> Iterator[str | None]:
    """SEKMET on loopback when the exchange tests installed it; None otherwise."""
    try:
        from tests.exchange.conftest import SEKMET_VENV, SekmetServer
    except ImportError:
        yield None
        return
    binary = SEKMET_VENV / "bin" / "sekmet"
    if not binary.exists():
        yield None
        return
    server = SekmetServer(binary, workdir)
    server.start()
    try:
        yield server.base
    finally:
        server.stop()


def _artifact(n: int) -> dict[str, Any]:
    from tests.exchange.conftest import artifact

    return artifact(n)


def _bundles(start: int, n: int) -> list[dict[str, Any]]:
    return [to_transaction(_artifact(i), "conditional-create") for i in range(start, start + n)]


def _drain(worker: DeliveryWorker) -> int:
    delivered = 0
    while True:
        report = worker.run_once()
        delivered += report.delivered
        if report.claimed == 0:
            return delivered


def _worker(store: Store, partners: dict[str, PartnerConfig]) -> DeliveryWorker:
    return DeliveryWorker(
        store,
        partners,
        lambda _check: True,
        worker_id="bench",
        batch_size=20,
        subscription_policy=RetryPolicy(max_attempts=3),
        endpoint_policy=networks(["127.0.0.0/8"]),  # the subscriber listens on loopback
    )


def _raw_rate(send: Callable[[requests.Session, int], None], n: int) -> float:
    with requests.Session() as session:
        start = time.perf_counter()
        for i in range(n):
            send(session, i)
        return n / (time.perf_counter() - start)


def bench_partner(base: str, n: int, offset: int) -> tuple[float, float]:
    """(outbox deliveries/s, raw POSTs/s) of ``n`` transaction Bundles, one patient each."""
    raw_bundles = _bundles(offset, n)

    def raw(session: requests.Session, i: int) -> None:
        r = session.post(base, data=json.dumps(raw_bundles[i]), headers=FHIR_JSON, timeout=30)
        r.raise_for_status()

    raw_rate = _raw_rate(raw, n)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/outbox.sqlite3")
        store.create_schema()
        partner = PartnerConfig(name="bench", base_url=base, timeout_seconds=30)
        with store.write() as tx:
            for i, bundle in enumerate(_bundles(offset + n, n)):
                ob.enqueue(tx, "bench", "bundle", bundle, f"pt-{offset + n + i}")
        worker = _worker(store, {"bench": partner})
        start = time.perf_counter()
        delivered = _drain(worker)
        elapsed = time.perf_counter() - start
        worker.close()
        store.dispose()
    if delivered != n:
        raise RuntimeError(f"delivered {delivered} of {n}")
    return n / elapsed, raw_rate


def bench_subscription(base: str, n: int) -> tuple[float, float]:
    """(outbox notifications/s, raw empty POSTs/s) to one rest-hook subscriber."""
    endpoint = f"{base}/hook"

    def raw(session: requests.Session, _i: int) -> None:
        session.post(endpoint, timeout=30).raise_for_status()

    raw_rate = _raw_rate(raw, n)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/outbox.sqlite3")
        store.create_schema()
        sub = {
            "resourceType": "Subscription",
            "id": "bench",
            "status": "active",
            "reason": "benchmark",
            "criteria": "Observation",
            "channel": {"type": "rest-hook", "endpoint": endpoint},
        }
        with store.write() as tx:
            tx.put(sub, current=None)
            for i in range(n):
                payload = {
                    "subscription": "bench",
                    "type": "Observation",
                    "id": f"o{i}",
                    "versionId": 1,
                    "patient": None,
                }
                ob.enqueue(tx, "subscription:bench", "rest-hook", payload, "subscriber")
        worker = _worker(store, {})
        start = time.perf_counter()
        delivered = _drain(worker)
        elapsed = time.perf_counter() - start
        worker.close()
        store.dispose()
    if delivered != n:
        raise RuntimeError(f"delivered {delivered} of {n}")
    return n / elapsed, raw_rate


def bench_delivery(n: int = 300, sekmet: bool = True) -> list[str]:
    rows = [
        "| destination | deliveries | outbox + worker /s | plain HTTP loop /s | outbox cost |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(name: str, rates: tuple[float, float]) -> None:
        outbox_rate, raw_rate = rates
        rows.append(
            f"| {name} | {n:,} | {outbox_rate:,.0f} | {raw_rate:,.0f} "
            f"| {raw_rate / outbox_rate:.2f}x |"
        )

    with loopback_receiver() as base:
        row("loopback receiver, transaction Bundles", bench_partner(base, n, 0))
        row("loopback receiver, rest-hook pings (one subscriber)", bench_subscription(base, n))
    if sekmet:
        with tempfile.TemporaryDirectory() as tmp, sekmet_partner(Path(tmp)) as sekmet_base:
            if sekmet_base is None:
                rows.append("| SEKMET | — | not installed (run tests/exchange first) | | |")
            else:
                row(
                    "SEKMET, transaction Bundles (conditional create)",
                    bench_partner(sekmet_base, n, 10_000),
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="deliveries per destination")
    parser.add_argument("--no-sekmet", action="store_true", help="skip the SEKMET partner")
    args = parser.parse_args(argv)
    print(f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print("\n".join(bench_delivery(args.n, sekmet=not args.no_sekmet)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
