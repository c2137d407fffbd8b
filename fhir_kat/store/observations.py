"""Observation values read from the search index alone, for whole-population passes.

Owns: the index join behind the outcome measure: per current Observation with one of the given
codes and a given status, its patient, the start of its ``effectiveDateTime`` and its value
(``valueQuantity.value``, else ``valueInteger``). Must not: parse stored JSON — every element
comes from index rows written with the resource (``search_token``, ``search_date``,
``search_number``), which is what makes the pass cheap (issue 9, benchmark 5).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from datetime import datetime

from sqlalchemy import Boolean, DateTime, Float, Integer, String, bindparam, text

from fhir_kat.search import EFFECTIVE_DATETIME, VALUE_INTEGER
from fhir_kat.store.store import Tx

VALUE_QUANTITY = "value-quantity"

# CROSS JOIN fixes SQLite's join order (the left table is always the outer loop): the code
# index drives and every other table is probed through its owner index. Left to choose, SQLite
# started from the date index (every Observation in the period) and was 10x slower.
# PostgreSQL plans CROSS JOIN like JOIN (reordered freely below join_collapse_limit) and
# hash-joins the whole population.
_SQL = """
SELECT r.seq, r.patient_id, c.system, c.code, e.low, v.param, v.value
FROM search_token c
CROSS JOIN resources r
CROSS JOIN search_token s
CROSS JOIN search_date e
CROSS JOIN search_number v
WHERE c.res_type = 'Observation' AND c.param = 'code' AND c.code IN :codes
  AND r.res_type = c.res_type AND r.res_id = c.res_id
  AND r.deleted = :deleted AND r.patient_id IS NOT NULL
  AND (:everyone OR r.patient_id IN :patients)
  AND s.res_type = c.res_type AND s.res_id = c.res_id
  AND s.param = 'status' AND s.code IN :statuses
  AND e.res_type = c.res_type AND e.res_id = c.res_id
  AND e.param = :effective AND e.high >= :low AND e.low <= :high
  AND v.res_type = c.res_type AND v.res_id = c.res_id
  AND v.param IN (:quantity, :integer)
ORDER BY r.seq, c.system, c.code, v.param DESC
"""
_STATEMENT = text(_SQL).bindparams(
    bindparam("codes", expanding=True, type_=String),
    bindparam("statuses", expanding=True, type_=String),
    bindparam("patients", expanding=True, type_=String),
    bindparam("deleted", type_=Boolean),
    bindparam("everyone", type_=Boolean),
    bindparam("low", type_=DateTime),
    bindparam("high", type_=DateTime),
)


def observation_values(
    tx: Tx,
    codes: Collection[tuple[str, str]],
    statuses: Collection[str],
    low: datetime,
    high: datetime,
    patients: Collection[str] | None = None,
) -> Iterator[tuple[tuple[str, str], str, datetime, float]]:
    """((system, code), patient id, effectiveDateTime start, value) of every current
    Observation in a patient's compartment with a ``code`` token among ``codes``, a
    ``status`` in ``statuses``, an ``effectiveDateTime`` whose range meets [``low``,
    ``high``] (the search ``date=ge<low>&date=le<high>``, on effectiveDateTime alone) and a
    value, in write order — once per matching code.

    The value is ``valueQuantity.value``, else ``valueInteger`` (one Observation has at most
    one ``value[x]``; should both rows exist, the quantity wins, as ``.get(…, fallback)`` on
    the JSON did). Streamed (a server-side cursor on PostgreSQL): memory stays flat."""
    wanted = set(codes)
    if not wanted or not statuses:
        return
    if patients is not None and not patients:
        return
    stmt = (
        _STATEMENT.bindparams(
            codes=sorted({code for _, code in wanted}),
            statuses=sorted(statuses),
            deleted=False,
            everyone=patients is None,
            patients=sorted(patients) if patients is not None else [""],
            effective=EFFECTIVE_DATETIME,
            low=low,
            high=high,
            quantity=VALUE_QUANTITY,
            integer=VALUE_INTEGER,
        )
        .columns(seq=Integer, low=DateTime, value=Float)
        .execution_options(stream_results=True, yield_per=2000)
    )
    previous = None
    for seq, patient, system, code, start, _param, number in tx.conn.execute(stmt):
        if (system, code) not in wanted:
            continue  # the same code in another system
        key = (seq, system, code)
        if key == previous:
            continue  # both value rows: the quantity came first
        previous = key
        yield (system, code), patient, start, float(number)
