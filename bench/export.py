"""Bulk export: resources/s streamed to NDJSON by the export runner's loop
(``ExportService._write_type``: one streamed query per type, written 1,000 rows at a time) vs a
raw read of the same stored JSON from the same database written to a file, and the peak RSS
of each, measured in a fresh subprocess (``resource.getrusage``) so one run cannot inflate
the next. Memory should not grow with N: both stream in batches.

Export and raw subprocesses alternate (A/B/A/B, ``ROUNDS`` pairs) and the figure is the median
of the per-pair ratios, so a swing in the machine's load hits both sides of a pair alike. Each
child opens its database connection before its clock starts (imports and the first connect
are not the loop being measured).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import text

from bench.data import load, observations
from fhir_kat.search import SearchQuery
from fhir_kat.services.export import ExportService
from fhir_kat.store import Store
from fhir_kat.store.view import EVERYTHING, ReadScope

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 5  # export/raw pairs per size and database


class _AllVisible:
    """The access of a program-staff caller (a ``Viewer``): no restriction, nothing reshaped."""

    def scope(self, _tx: Any, _rtype: str) -> ReadScope:
        return EVERYTHING

    def shape(self, _tx: Any, stored: Any) -> Any:
        return stored


def _child(url: str, mode: str, out: str) -> dict[str, float]:
    store = Store(url)
    store.ping()  # the driver's import and first connect are not part of either loop
    start = time.perf_counter()
    count = 0
    with open(out, "w", encoding="utf-8") as fh:
        if mode == "export":
            service = ExportService(store, Path(out).parent, lambda: datetime.now(UTC))
            for rtype in ("Patient", "Observation"):
                count += service._write_type(
                    fh,
                    SearchQuery(rtype),
                    cast(Any, _AllVisible()),
                    None,
                    None,
                    "system",
                    "bench",
                    seen=None,
                )
            service.shutdown()
        else:  # raw: the stored JSON, streamed by a server-side cursor, one line each
            with store.engine.connect() as conn:
                for rtype in ("Patient", "Observation"):
                    rows = conn.execution_options(stream_results=True, yield_per=1000).execute(
                        text("SELECT content FROM resources WHERE res_type = :t ORDER BY seq"),
                        {"t": rtype},
                    )
                    for (content,) in rows:
                        fh.write(content)
                        fh.write("\n")
                        count += 1
    seconds = time.perf_counter() - start
    store.dispose()
    return {"seconds": seconds, "count": count, "rss_mib": _peak_rss_kib() / 1024}


def _peak_rss_kib() -> int:
    """This process's peak RSS. Linux keeps ``ru_maxrss`` across ``execve``, so a child forked
    from a large parent (``bench.run`` after the measure section) would report the parent's
    size; ``VmHWM`` belongs to the new address space and starts afresh at exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure(url: str, mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "bench.export", url, mode, f"{tmp}/out.ndjson"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return cast(dict[str, float], json.loads(out.strip().splitlines()[-1]))


def run(database_urls: dict[str, str], sizes: list[int]) -> list[str]:
    rows = [
        "| database | resources | export /s | raw read /s | export / raw (median of pairs) "
        "| export peak RSS | raw peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, url in database_urls.items():
        for n in sizes:
            store = Store(url)
            store.drop_schema()
            store.create_schema()
            load(store, observations(max(1, n // 9)))
            store.analyze()
            store.dispose()
            pairs = []
            for _ in range(ROUNDS):  # interleaved: export, raw, export, raw, ...
                e, raw = _measure(url, "export"), _measure(url, "raw")
                assert e["count"] == raw["count"]
                pairs.append((e, raw))
            ratio = statistics.median(r["seconds"] / e["seconds"] for e, r in pairs)
            e_rate = statistics.median(e["count"] / e["seconds"] for e, _ in pairs)
            raw_rate = statistics.median(r["count"] / r["seconds"] for _, r in pairs)
            e_rss = max(e["rss_mib"] for e, _ in pairs)
            raw_rss = max(r["rss_mib"] for _, r in pairs)
            rows.append(
                f"| {name} | {pairs[0][0]['count']:,.0f} | {e_rate:,.0f} | {raw_rate:,.0f} "
                f"| {ratio:.0%} | {e_rss:.0f} MiB | {raw_rss:.0f} MiB |"
            )
            store = Store(url)
            store.drop_schema()
            store.dispose()
    return rows


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2], sys.argv[3])))
