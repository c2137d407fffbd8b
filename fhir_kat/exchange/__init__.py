"""Outbound exchange with health-authority EHRs: partners, the partner client, the outbox and
the delivery worker.

Owns: everything between "an artifact was stored" and "the partner has it exactly once".
Must not: import the api or services layers, or build FHIR content (services and mapping do;
``bundles.py`` only reshapes finished resources into a partner's transaction form).

Importing this package registers the ``outbox`` and ``subscription_owner`` tables on the
store's ``MetaData``. The worker
lives in ``fhir_kat.exchange.worker`` (not re-exported, so ``python -m`` can run it cleanly).
"""

from fhir_kat.exchange.bundles import for_partner, to_transaction
from fhir_kat.exchange.client import Delivered, PartnerClient, Permanent, Retryable, SendResult
from fhir_kat.exchange.outbox import (
    Delivery,
    DeliveryInfo,
    OutboxStats,
    RetryPolicy,
    cancel,
    claim,
    enqueue,
    get_delivery,
    list_deliveries,
    requeue,
    retry_dead,
    stats,
)
from fhir_kat.exchange.partners import AuthConfig, PartnerConfig, load_partners, parse_partners
from fhir_kat.exchange.routing import enqueue_artifact
from fhir_kat.exchange.subscriptions import subscription_owner

__all__ = [
    "AuthConfig",
    "Delivered",
    "Delivery",
    "DeliveryInfo",
    "OutboxStats",
    "PartnerClient",
    "PartnerConfig",
    "Permanent",
    "RetryPolicy",
    "Retryable",
    "SendResult",
    "cancel",
    "claim",
    "enqueue",
    "enqueue_artifact",
    "for_partner",
    "get_delivery",
    "list_deliveries",
    "load_partners",
    "parse_partners",
    "requeue",
    "retry_dead",
    "stats",
    "subscription_owner",
    "to_transaction",
]
