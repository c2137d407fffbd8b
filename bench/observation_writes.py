"""Store-level cost of writing scored Observations, the worst case for the write path's index:
one total-score Observation per transaction, created, then updated (``Tx.put``).

``python -m bench.observation_writes [-n 1000] [--database-url URL]`` (default: a new SQLite
file; a PostgreSQL database is emptied first). Prints wall and CPU milliseconds per write.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from fhir_kat.store import Store


def _observation(i: int, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{i}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
        "subject": {"reference": f"Patient/p{i % 100}"},
        "effectiveDateTime": "2026-02-01T10:00:00Z",
        "valueQuantity": {"value": value},
    }


def run(url: str, n: int) -> tuple[float, float]:
    store = Store(url)
    store.drop_schema()
    store.create_schema()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        with store.write() as tx:
            tx.put(_observation(i, 10), current=None)
    for i in range(n):
        with store.write() as tx:
            tx.put(_observation(i, 12), current=tx.get("Observation", f"o{i}"))
    per_write = 1000 / (2 * n)
    result = (time.perf_counter() - wall) * per_write, (time.process_time() - cpu) * per_write
    store.drop_schema()
    store.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = run(args.database_url or f"sqlite:///{tmp}/writes.sqlite3", args.n)
    print(f"{wall:.3f} ms wall  {cpu:.3f} ms cpu per write")


if __name__ == "__main__":
    main()
