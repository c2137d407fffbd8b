"""Observation values for whole-population passes: the ``observation_values`` covering rows.

Owns: building an Observation's ``observation_values`` rows from its index rows (``value_rows``,
called wherever index rows are written: ``Tx.put``/``create_many``, the reindex, the benchmarks'
loader) and reading them back for the outcome measure (``observation_values``): per current
Observation *derived from a QuestionnaireResponse* with one of the given codes and a given
status, its patient, the start of its ``effectiveDateTime`` and its value
(``valueQuantity.value``, else ``valueInteger``). Must not: parse stored JSON or know any
instrument — the rows are built from the search parameters ``code``, ``status``,
``derived-from``, ``internal:effective-datetime``, ``value-quantity`` and
``internal:value-integer`` alone (issue 9, benchmark 5; docs/adr/0008-observation-values.md).
Only scores derived from a response count in the measure (issue 17: a total typed in by hand
is not a program score), so only those get rows (FORMAT 2).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Boolean, DateTime, Float, String, bindparam, text

from fhir_kat.search import EFFECTIVE_DATETIME, VALUE_INTEGER, IndexRows

if TYPE_CHECKING:  # store.py builds rows with ``value_rows`` at import
    from fhir_kat.store.store import Tx

VALUE_QUANTITY = "value-quantity"
DERIVED_FROM = "derived-from"
#: Bumped when ``value_rows`` changes what it writes: part of Observation's index fingerprint
#: (``reindex.current_fingerprints``), so existing databases get their rows rebuilt at start-up.
FORMAT = 2


def value_rows(
    rtype: str, rid: str, rows: IndexRows, *, seq: int, patient_id: str | None
) -> list[dict[str, Any]]:
    """The ``observation_values`` rows of resource ``rtype/rid`` stored as ``seq`` with index
    rows ``rows``: one per distinct ``code`` token (truncated as ``search_token`` stores it)
    when it is an Observation in ``patient_id``'s compartment, ``derivedFrom`` a
    QuestionnaireResponse, with a ``status``, an ``effectiveDateTime`` and a value; none
    otherwise.

    The value is ``valueQuantity.value``, else ``valueInteger`` (one Observation has at most
    one ``value[x]``; should both exist, the quantity wins, as ``.get(…, fallback)`` on the JSON
    did). ``status`` and ``effectiveDateTime`` are 0..1, so each has at most one index row."""
    if rtype != "Observation" or patient_id is None:
        return []
    if not any(p == DERIVED_FROM and t == "QuestionnaireResponse" for p, t, _ in rows.references):
        return []
    status = effective = quantity = integer = None
    for param, _, code in rows.tokens:
        if param == "status":
            status = code[:255]
            break
    for param, low, high in rows.dates:
        if param == EFFECTIVE_DATETIME:
            effective = (low, high)
            break
    for param, number, *_ in rows.numbers:
        if param == VALUE_QUANTITY and quantity is None:
            quantity = number
        elif param == VALUE_INTEGER and integer is None:
            integer = number
    value = quantity if quantity is not None else integer
    if status is None or effective is None or value is None:
        return []
    codes = sorted({(s[:255], c[:255]) for p, s, c in rows.tokens if p == "code"})
    return [
        {
            "res_type": rtype,
            "res_id": rid,
            "system": system,
            "code": code,
            "seq": seq,
            "patient_id": patient_id,
            "status": status,
            "low": effective[0],
            "high": effective[1],
            "value": value,
        }
        for system, code in codes
    ]


# One scan of the narrow table (no join): the filter leaves every total score of the period,
# sorted into write order by the database.
_SQL = """
SELECT system, code, patient_id, low, value
FROM observation_values
WHERE code IN :codes AND status IN :statuses AND high >= :low AND low <= :high
  AND (:everyone OR patient_id IN :patients)
ORDER BY seq, system, code
"""
_STATEMENT = (
    text(_SQL)
    .bindparams(
        bindparam("codes", expanding=True, type_=String),
        bindparam("statuses", expanding=True, type_=String),
        bindparam("patients", expanding=True, type_=String),
        bindparam("everyone", type_=Boolean),
        bindparam("low", type_=DateTime),
        bindparam("high", type_=DateTime),
    )
    .columns(low=DateTime, value=Float)
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
    value (see ``value_rows``), in write order — once per matching code.

    Streamed (a server-side cursor on PostgreSQL): memory stays flat."""
    wanted = set(codes)
    if not wanted or not statuses:
        return
    if patients is not None and not patients:
        return
    tx.flush()  # rows held by this transaction's writes
    stmt = _STATEMENT.bindparams(
        codes=sorted({code for _, code in wanted}),
        statuses=sorted(statuses),
        everyone=patients is None,
        patients=sorted(patients) if patients is not None else [""],
        low=low,
        high=high,
    ).execution_options(stream_results=True, yield_per=5000)
    for system, code, patient, start, number in tx.conn.execute(stmt):
        key = (system, code)
        if key in wanted:  # else the same code in another system
            yield key, patient, start, number
