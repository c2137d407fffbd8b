"""Database tables: current resources, every version, and the search index.

Owns: the table definitions (SQLAlchemy Core). Must not: hold queries (``store.py`` does).

One row per resource in ``resources`` (the current version, served as stored), one per version
in ``resource_versions`` (its ``seq`` is the global write order used for stable paging), and the
five ``search_*`` tables written in the same transaction as the resource they index, with the
outcome measure's ``observation_values`` derived from them.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only makes INTEGER PRIMARY KEY an auto-incrementing rowid alias.
SeqType = BigInteger().with_variant(Integer(), "sqlite")

resources = Table(
    "resources",
    metadata,
    Column("res_type", String(64), primary_key=True),
    Column("res_id", String(64), primary_key=True),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", DateTime, nullable=False),
    Column("seq", SeqType, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("content", Text, nullable=False),
    # The Patient whose compartment the resource is in (None: not patient data). Consent
    # filtering of searches and exports is one indexed predicate on this column.
    Column("patient_id", String(64), nullable=True),
    Index("ix_resources_type_seq", "res_type", "seq"),
    Index("ix_resources_type_patient", "res_type", "patient_id"),
    Index("ix_resources_type_updated", "res_type", "last_updated"),
)

resource_versions = Table(
    "resource_versions",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", DateTime, nullable=False),
    Column("method", String(8), nullable=False),
    Column("content", Text, nullable=True),
    UniqueConstraint("res_type", "res_id", "version_id", name="uq_resource_version"),
)

search_token = Table(
    "search_token",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("system", String(255), nullable=False),
    Column("code", String(255), nullable=False),
    Index("ix_token_lookup", "res_type", "param", "code", "system"),
    Index("ix_token_owner", "res_type", "res_id"),
)

search_reference = Table(
    "search_reference",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("target_type", String(64), nullable=False),
    Column("target_id", String(64), nullable=False),
    Index("ix_reference_lookup", "res_type", "param", "target_id", "target_type"),
    Index("ix_reference_owner", "res_type", "res_id"),
)

search_date = Table(
    "search_date",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("low", DateTime, nullable=False),
    Column("high", DateTime, nullable=False),
    Index("ix_date_low", "res_type", "param", "low"),
    Index("ix_date_high", "res_type", "param", "high"),
    Index("ix_date_owner", "res_type", "res_id"),
)

search_string = Table(
    "search_string",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("value", String(512), nullable=False),
    Index("ix_string_lookup", "res_type", "param", "value"),
    Index("ix_string_owner", "res_type", "res_id"),
)

# Number and quantity parameters (R4 ``number``/``quantity``): a plain number has empty unit
# columns. The owner index carries the value so a join from another index (the outcome measure's
# code → status → date → value) reads no table rows. docs/adr/0007-number-index.md
search_number = Table(
    "search_number",
    metadata,
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("value", Float, nullable=False),
    Column("system", String(255), nullable=False),
    Column("code", String(255), nullable=False),
    Column("unit", String(255), nullable=False),
    Index("ix_number_lookup", "res_type", "param", "value"),
    Index("ix_number_owner", "res_type", "res_id", "param", "value"),
)

# The outcome measure's covering rows: one per current Observation in a patient's compartment
# with a ``code`` token, a ``status``, an ``effectiveDateTime`` and a value (``valueQuantity``,
# else ``valueInteger``), per code, built from that Observation's index rows
# (``store/observations.py``) and written, replaced and deleted with them. The measure reads
# them in one narrow scan instead of a five-way index join. docs/adr/0008-observation-values.md
observation_values = Table(
    "observation_values",
    metadata,
    Column("res_type", String(64), primary_key=True),
    Column("res_id", String(64), primary_key=True),
    Column("system", String(255), primary_key=True),
    Column("code", String(255), primary_key=True),
    Column("seq", BigInteger, nullable=False),  # the resource's write order (resources.seq)
    Column("patient_id", String(64), nullable=False),
    Column("status", String(255), nullable=False),
    Column("low", DateTime, nullable=False),  # effectiveDateTime's range
    Column("high", DateTime, nullable=False),
    Column("value", Float, nullable=False),
    # SQLite: the rows live in the primary key's B-tree (one tree per write, not two).
    sqlite_with_rowid=False,
)

# What the store itself needs to remember about the database: ``index`` = the fingerprint
# (``reindex.current_fingerprints``: its ``index_fingerprint`` and what the store derives from
# its index rows) of each resource type whose index rows are current (JSON).
store_meta = Table(
    "store_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Client-assertion ids seen by the token endpoint, kept until they expire (replay protection).
auth_jti = Table(
    "auth_jti",
    metadata,
    Column("jti", String(255), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("expires_at", DateTime, nullable=False, index=True),
)

# Bulk Data $export jobs. Files live in the export directory; any process can answer a poll.
export_jobs = Table(
    "export_jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),  # accepted|in-progress|completed|error|cancelled
    Column("request_url", Text, nullable=False),
    Column("params", Text, nullable=False),  # JSON: level, group, types, since, type filters
    Column("created_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
    Column("transaction_time", String(40), nullable=False),
    Column("progress", String(255), nullable=True),
    Column("manifest", Text, nullable=True),
    Column("error", Text, nullable=True),
)

INDEX_TABLES = (
    search_token,
    search_reference,
    search_date,
    search_string,
    search_number,
    observation_values,
)
#: Index tables only one resource type has rows in (the others' deletions skip them).
INDEX_TABLE_TYPES = {observation_values: "Observation"}
