"""Worker processes sharing one outbox: several claim disjoint sets and every delivery reaches
the partner exactly once (counted at a loopback receiver)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.bundles import to_transaction
from fhir_kat.store import Store

from .conftest import LoopbackPartner, Workers, artifact, wait_for

DELIVERIES = 60


def test_two_worker_processes_deliver_each_exactly_once(
    real_store: Store,
    tmp_path: Path,
    loopback_partner: Callable[..., LoopbackPartner],
    workers: Callable[[Path], Workers],
) -> None:
    receiver = loopback_partner(delay=0.01)
    config = tmp_path / "kat.toml"
    config.write_text(f'[partners.ehr]\nbase_url = "{receiver.url}"\ntimeout_seconds = 5\n')
    pool = workers(config)
    procs = [pool.start(name, "--batch-size", "3", "--idle-seconds", "0.05") for name in "AB"]

    with real_store.write() as tx:  # both workers are polling when the work appears
        for i in range(DELIVERIES):
            bundle = to_transaction(artifact(i, observations=1), "conditional-create")
            ob.enqueue(tx, "ehr", "bundle", bundle, f"pt-{i}")

    def done() -> bool:
        s = ob.stats(real_store)
        return s.pending == 0 and s.in_flight == 0

    wait_for(done, 60, "every delivery to finish", step=0.1)
    assert [pool.stop(p) for p in procs] == [0, 0]

    assert receiver.requests == DELIVERIES
    assert receiver.received == {f"P{i:04d}": 1 for i in range(DELIVERIES)}
    with real_store.read() as tx:
        rows = tx.conn.execute(select(ob.outbox.c.status, ob.outbox.c.claimed_by)).all()
    assert {r.status for r in rows} == {"delivered"}
    assert {r.claimed_by for r in rows} == {"A", "B"}  # both took a share
