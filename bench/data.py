"""Synthetic data sets for the benchmarks, bulk-loaded through ``Tx.create_many`` (the same
stored JSON and index rows as one ``put`` per resource, a hundred times faster to load).

Everything is synthetic: participants ``p<n>``, referrers ``org<n>``, codes from the shipped
instrument catalogue (LOINC totals, see fhir_kat/instruments).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.store import Store

T0 = datetime(2026, 1, 10, tzinfo=UTC)
CHUNK = 2000


def observations(participants: int, seed: int = 1) -> Iterator[dict[str, Any]]:
    """Per participant: the Patient, then a baseline and a 90-day total score per instrument
    (9 resources per participant with the four shipped instruments)."""
    rng = random.Random(seed)
    instruments = list(load_catalogue().instruments.values())
    for i in range(participants):
        pid = f"p{i}"
        yield {"resourceType": "Patient", "id": pid}
        for inst in instruments:
            for j, days in enumerate((0, 90)):
                when = T0 + timedelta(days=days, minutes=rng.randrange(600))
                yield {
                    "resourceType": "Observation",
                    "id": f"{pid}-{inst.key}-{j}",
                    "status": "final",
                    "code": {"coding": [dict(inst.total)]},
                    "subject": {"reference": f"Patient/{pid}"},
                    "effectiveDateTime": when.isoformat(),
                    "valueQuantity": {"value": round(rng.uniform(inst.min, inst.max), 1)},
                }


def tasks(count: int, per_requester: int = 100, seed: int = 3) -> Iterator[dict[str, Any]]:
    """Referral Tasks, ``per_requester`` per referring organisation on average: a bigger
    program has more referrers, not longer work lists (so a requester's search returns about
    as many Tasks at every size)."""
    rng = random.Random(seed)
    organisations = max(1, count // per_requester)
    for i in range(count):
        yield {
            "resourceType": "Task",
            "id": f"t{i}",
            "status": "requested",
            "intent": "order",
            "requester": {"reference": f"Organization/org{rng.randrange(organisations)}"},
            "for": {"reference": f"Patient/p{rng.randrange(max(1, count))}"},
        }


class StepClock:
    """A clock that moves one minute per reading: ``create_many`` reads it once per chunk,
    so a bulk load spreads ``lastUpdated`` over time as real ingest would."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def interleave(*streams: list[dict[str, Any]], seed: int = 4) -> Iterator[dict[str, Any]]:
    """Merge lists in random order, each spread evenly over the whole load (types arrive
    mixed, as in a live program)."""
    rng = random.Random(seed)
    left = [len(s) for s in streams]
    pos = [0] * len(streams)
    while any(left):
        i = rng.choices(range(len(streams)), weights=left)[0]
        yield streams[i][pos[i]]
        pos[i] += 1
        left[i] -= 1


def load(store: Store, resources: Iterator[dict[str, Any]]) -> int:
    """Bulk-create ``resources`` in transactions of ``CHUNK``; returns how many."""
    done = 0
    chunk: list[dict[str, Any]] = []
    for resource in resources:
        chunk.append(resource)
        if len(chunk) == CHUNK:
            with store.write() as tx:
                tx.create_many(chunk)
            done += len(chunk)
            chunk = []
    if chunk:
        with store.write() as tx:
            tx.create_many(chunk)
        done += len(chunk)
    return done
