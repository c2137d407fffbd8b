"""The delivery worker: claims due deliveries, checks consent, sends, records the outcome.

Destinations are the configured partners and, unless ``subscriptions=False``, every R4
rest-hook Subscription (partner ``subscription:<id>``, resolved from the stored Subscription at
send time: a deleted or switched-off one gets its pending notifications cancelled).

Owns: the send loop (``DeliveryWorker.run_once``/``run``), the mapping from a ``SendResult`` to an
outbox transition, pausing a failing partner for the rest of a batch, and the ``main(argv)`` entry
point for a ``fhir-kat worker`` command. Several workers (threads or processes, on one or several
hosts) may run at once: the outbox's claims keep them apart.

Must not: hold a database transaction during a network call, decide consent itself (the injected
``consent_gate`` does), sleep or read the clock except through what it was given, or log anything
about a delivery beyond its id, partner, status and attempt count.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from fhir_kat.errors import Unprocessable, issue, operation_outcome
from fhir_kat.exchange import outbox
from fhir_kat.exchange.client import Delivered, PartnerClient, Permanent, Retryable, SendResult
from fhir_kat.exchange.netguard import EndpointPolicy, guarded_session, policy_from_settings
from fhir_kat.exchange.outbox import (
    ARTIFACT,
    REFERRAL_STATUS_KIND,
    SUBSCRIPTION_PREFIX,
    Delivery,
    RetryPolicy,
)
from fhir_kat.exchange.partners import PartnerConfig, load_partners, subscription_delivery
from fhir_kat.exchange.plan import log_partner_plan
from fhir_kat.exchange.routing import resolver, wire_form
from fhir_kat.exchange.subscriptions import (
    Notification,
    mark_error,
    resolve,
    subscription_id,
)
from fhir_kat.settings import SettingsError, load_settings
from fhir_kat.store import Store

log = logging.getLogger("fhir_kat.exchange.worker")

#: ``consent_gate(delivery.consent_check) -> bool``: may this delivery be sent now?
ConsentGate = Callable[[dict[str, Any]], bool]
#: ``on_outcome(delivery, status)`` after a final outcome is recorded (delivered, dead, blocked).
OutcomeHook = Callable[[Delivery, str], None]
Clock = Callable[[], datetime]
Sleep = Callable[[float], Any]


class ConsentUnavailable(Exception):
    """The consent decision could not be made now; the delivery is retried later."""


def unavailable_consent_gate(_check: dict[str, Any]) -> bool:
    """The gate a worker uses until the real consent decision point is wired: it never says
    yes or no, so deliveries that need a consent check wait (and retry) rather than leak or
    get blocked for good."""
    raise ConsentUnavailable("no consent decision point is configured for the worker")


@dataclass
class RunReport:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    blocked: int = 0
    released: int = 0
    cancelled: int = 0  # the Subscription it was for is gone or off
    lost: int = 0  # another worker took the lease over meanwhile


class DeliveryWorker:
    def __init__(
        self,
        store: Store,
        partners: Mapping[str, PartnerConfig],
        consent_gate: ConsentGate,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        *,
        worker_id: str | None = None,
        batch_size: int = 10,
        lease_seconds: float | None = None,
        idle_seconds: float = 2.0,
        clients: Mapping[str, PartnerClient] | None = None,
        on_outcome: OutcomeHook | None = None,
        rng: random.Random | None = None,
        subscriptions: bool = True,
        subscription_policy: RetryPolicy | None = None,
        subscription_timeout_seconds: float | None = None,
        endpoint_policy: EndpointPolicy | None = None,
        recheck_blocked_seconds: float = 300.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.store = store
        self.partners = {name: p for name, p in partners.items() if p.enabled}
        self.consent_gate = consent_gate
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self._sleep = sleep
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.batch_size = batch_size
        # One send can take a token request plus two tries (401 → re-auth): three timeouts,
        # and the lease is renewed right before each send, so that is all it must outlast.
        self.subscriptions = subscriptions
        self.subscription_policy = subscription_policy or RetryPolicy()
        # Subscribers chose their endpoints: every connection to one is checked (netguard).
        self.endpoint_policy = endpoint_policy or EndpointPolicy()
        timeouts = [p.timeout_seconds for p in self.partners.values()]
        # A subscriber gets the longest partner timeout (10 s without partners), so serving
        # Subscriptions does not lengthen the lease a deployment already chose.
        self.subscription_timeout = subscription_timeout_seconds or max(timeouts, default=10.0)
        if subscriptions:
            timeouts.append(self.subscription_timeout)
        longest = max(timeouts, default=30.0)
        minimum = 3 * longest + 2
        if lease_seconds is not None and lease_seconds < minimum:
            raise ValueError(
                f"lease_seconds must be at least {minimum:g} (3 x the longest partner timeout + 2)"
            )
        self.lease_seconds = lease_seconds if lease_seconds is not None else max(120.0, minimum)
        self.idle_seconds = idle_seconds
        #: How often ``run`` asks the gate again about consent-blocked deliveries (0: never).
        self.recheck_blocked_seconds = recheck_blocked_seconds
        self.rng = rng or random.Random()  # noqa: S311 - backoff jitter, not a secret
        epoch_clock = self._epoch
        self.on_outcome = on_outcome
        self.clients: dict[str, PartnerClient] = dict(clients or {})
        for name, partner in self.partners.items():
            self.clients.setdefault(name, PartnerClient(partner, clock=epoch_clock))
        # One client (connection pool) per subscriber, replaced when its endpoint changes.
        self._hook_clients: dict[str, tuple[str, PartnerClient]] = {}

    def _epoch(self) -> float:
        return self.clock().timestamp()

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        for _, hook_client in self._hook_clients.values():
            hook_client.close()
        self._hook_clients.clear()

    def _policy(self, delivery: Delivery) -> RetryPolicy:
        partner = self.partners.get(delivery.partner)
        if partner is not None:
            return RetryPolicy.for_partner(partner)
        return self.subscription_policy

    # ------------------------------------------------------------------ the loop

    def run(self, stop_event: threading.Event, max_iterations: int | None = None) -> int:
        """Work until ``stop_event`` is set (or ``max_iterations`` batches); returns the number
        of batches run. A database error is logged and retried after a pause, never fatal."""
        sleep = self._sleep or stop_event.wait
        iterations = 0
        failures = 0
        last_recheck: datetime | None = None
        while not stop_event.is_set() and (max_iterations is None or iterations < max_iterations):
            iterations += 1
            try:
                now = self.clock()
                if self.recheck_blocked_seconds > 0 and (
                    last_recheck is None
                    or (now - last_recheck).total_seconds() >= self.recheck_blocked_seconds
                ):
                    last_recheck = now
                    self.recheck_blocked()
                report = self.run_once()
                failures = 0
            except Exception as exc:  # the database is down or similar: wait and try again
                failures += 1
                log.error(
                    "delivery batch failed",
                    extra={"worker": self.worker_id, "exc_type": type(exc).__name__},
                )
                sleep(min(60.0, self.idle_seconds * 2 ** min(failures, 6)))
                continue
            if report.claimed == 0:
                sleep(self.idle_seconds)
        return iterations

    def run_once(self) -> RunReport:
        """Claim one batch, send each delivery, record each outcome."""
        report = RunReport()
        batch = outbox.claim(
            self.store,
            self.worker_id,
            self.batch_size,
            lease_seconds=self.lease_seconds,
            partners=list(self.partners),
            now=self.clock(),
            partner_prefixes=(SUBSCRIPTION_PREFIX,) if self.subscriptions else (),
        )
        report.claimed = len(batch)
        # Partners that failed in a way that will fail the rest of this batch too (down,
        # throttling, token endpoint refusing): their remaining deliveries go back unsent.
        paused: dict[str, datetime] = {}
        for index, delivery in enumerate(batch):
            if delivery.partner in paused:
                if outbox.release(self.store, delivery, paused[delivery.partner], self.clock()):
                    report.released += 1
                continue
            held = outbox.renew(self.store, batch[index:], self.clock())
            if delivery.id not in held:
                report.lost += 1
                continue
            try:
                self._process(delivery, report, paused)
            except Exception as exc:  # a bug must not take the worker (or the batch) down
                log.error(
                    "delivery failed unexpectedly",
                    extra={
                        "partner": delivery.partner,
                        "delivery_id": delivery.id,
                        "exc_type": type(exc).__name__,
                    },
                )
                self._retry(delivery, f"internal error: {type(exc).__name__}", None, report)
        return report

    def _process(self, delivery: Delivery, report: RunReport, paused: dict[str, datetime]) -> None:
        if delivery.attempts > self._policy(delivery).max_attempts:
            # Only reachable when earlier claims ended without an outcome (a worker killed
            # mid-send, again and again): a delivery that keeps killing workers stops here.
            self._record(
                outbox.mark_dead(
                    self.store,
                    delivery,
                    f"gave up after {delivery.attempts - 1} attempts without an outcome",
                    self.clock(),
                ),
                delivery,
                "dead",
                report,
            )
            return
        notification: Notification | None = None
        if delivery.kind == "rest-hook":
            with self.store.read() as tx:
                resolved = resolve(tx, delivery.payload, self.clock())
            if isinstance(resolved, str):
                ok = outbox.mark_cancelled(self.store, delivery, resolved, self.clock())
                self._record(ok, delivery, "cancelled", report)
                return
            notification = resolved
        if delivery.consent_check is not None:
            try:
                allowed = self.consent_gate(delivery.consent_check)
            except Exception as exc:
                self._retry(
                    delivery, f"consent decision unavailable: {type(exc).__name__}", None, report
                )
                return
            if not allowed:
                self._block(delivery, report)
                return
        if outbox.waits_behind(self.store, delivery):
            # An earlier delivery of this patient was released (a Consent arrived) after this
            # one was claimed: it goes first, this one waits its turn again, unsent.
            if outbox.release(self.store, delivery, self.clock(), self.clock()):
                report.released += 1
            return
        payload: dict[str, Any] | None = delivery.payload
        if notification is None and delivery.kind in (ARTIFACT, REFERRAL_STATUS_KIND):
            payload = self._wire_form(delivery, report)
            if payload is None:
                return
        result: SendResult
        if notification is not None:
            result = self._hook_client(delivery.partner, notification.url).notify(
                notification.method,
                notification.url,
                notification.body,
                delivery.id,
                notification.headers,
            )
        else:
            kind = "bundle" if delivery.kind in (ARTIFACT, REFERRAL_STATUS_KIND) else delivery.kind
            result = self.clients[delivery.partner].send(kind, payload or {}, delivery.id)
        if isinstance(result, Delivered):
            self._record(
                outbox.mark_delivered(self.store, delivery, result.entries, self.clock()),
                delivery,
                "delivered",
                report,
            )
        elif isinstance(result, Permanent):
            self._record(
                outbox.mark_dead(self.store, delivery, result.outcome, self.clock()),
                delivery,
                "dead",
                report,
            )
        else:
            decision = self._retry(delivery, result.reason, result, report)
            if result.status != 409 and decision is not None:
                # 409 is about this resource; everything else retryable is about the partner.
                paused[delivery.partner] = decision

    def _block(self, delivery: Delivery, report: RunReport) -> None:
        """Record a consent block, ordered with any Consent written meanwhile: under the
        patient's consent lock the gate is asked once more, so a Consent that committed
        after the first answer releases the delivery instead of leaving it blocked."""
        check = dict(delivery.consent_check or {})
        try:
            status = outbox.block_unless_consented(
                self.store,
                delivery,
                "consent does not permit this disclosure now",
                lambda: self.consent_gate(check),
                self.clock(),
            )
        except Exception as exc:
            self._retry(
                delivery, f"consent decision unavailable: {type(exc).__name__}", None, report
            )
            return
        if status == outbox.PENDING:
            report.released += 1
            return
        self._record(bool(status), delivery, "blocked-consent", report)

    def recheck_blocked(self) -> int:
        """The safety net behind the Consent write's requeue: ask the gate again about every
        consent-blocked delivery of the destinations this worker serves and release the ones
        it now permits (each keeps its place in its patient's order); returns how many."""
        served = list(self.partners)
        released, after, checked = 0, 0, 0
        answers: dict[str, bool] = {}
        while checked < 100_000:  # bounded: a pass looks at each blocked row once
            rows = outbox.blocked_checks(self.store, after_id=after)
            if not rows:
                break
            allowed: list[int] = []
            for delivery_id, partner, check in rows:
                after, checked = delivery_id, checked + 1
                if partner not in served and not (
                    self.subscriptions and partner.startswith(SUBSCRIPTION_PREFIX)
                ):
                    continue
                key = repr(sorted(check.items()))
                if key not in answers:
                    try:
                        answers[key] = bool(self.consent_gate(check))
                    except Exception:  # the decision point is unavailable: next pass
                        answers[key] = False
                if answers[key]:
                    allowed.append(delivery_id)
            released += outbox.release_blocked(self.store, allowed, self.clock())
        if released:
            log.info(
                "consent-blocked deliveries released by the periodic re-check",
                extra={"worker": self.worker_id, "count": released},
            )
        return released

    def _wire_form(self, delivery: Delivery, report: RunReport) -> dict[str, Any] | None:
        """What this partner receives for the delivery, decided now from its configuration and
        what is stored (a read, no network); None after dead-lettering one that cannot be put
        in the partner's form — the clinical record it came from stays stored."""
        partner = self.partners[delivery.partner]
        try:
            with self.store.read() as tx:
                return wire_form(delivery.kind, delivery.payload, partner, resolver(tx))
        except Unprocessable as exc:
            lead = issue(
                "not-supported",
                f"not sent: partner {partner.name} cannot take this delivery in its "
                f"configured form (write_mode = {partner.write_mode}, without_identifier = "
                f"{partner.without_identifier}); the stored record is unchanged. Fix the "
                "partner configuration, then retry the delivery",
            )
            self._record(
                outbox.mark_dead(
                    self.store, delivery, operation_outcome([lead, *exc.issues]), self.clock()
                ),
                delivery,
                "dead",
                report,
            )
            return None

    def _hook_client(self, partner: str, url: str) -> PartnerClient:
        known = self._hook_clients.get(partner)
        if known is not None and known[0] == url:
            return known[1]
        if known is not None:
            known[1].close()
        config = PartnerConfig(
            name=partner, base_url=url, timeout_seconds=self.subscription_timeout
        )
        client = PartnerClient(
            config, session=guarded_session(self.endpoint_policy), clock=self._epoch
        )
        self._hook_clients[partner] = (url, client)
        return client

    def _subscription_failed(self, delivery: Delivery) -> None:
        """A rest-hook notification that is dead puts its Subscription in ``error``: the
        subscriber stops getting a queue of notifications it cannot take, and its owner sees
        why (R4 ``Subscription.error``). Nothing about the patient goes into the reason."""
        sid = subscription_id(delivery.partner)
        if sid is None:
            return
        reason = (
            f"a notification could not be delivered after {delivery.attempts} attempt(s) "
            f"(delivery {delivery.id}); set status to 'requested' to resume"
        )
        with self.store.write() as tx:
            changed = mark_error(tx, sid, reason)
        if changed:
            log.warning(
                "subscription set to error",
                extra={"partner": delivery.partner, "delivery_id": delivery.id},
            )

    def _retry(
        self,
        delivery: Delivery,
        reason: str,
        result: Retryable | None,
        report: RunReport,
    ) -> datetime | None:
        code = "throttled" if result is not None and result.status == 429 else "transient"
        error = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": reason[:500]}],
        }
        decision = outbox.mark_retry(
            self.store,
            delivery,
            error,
            policy=self._policy(delivery),
            retry_after=result.retry_after if result is not None else None,
            rng=self.rng,
            now=self.clock(),
        )
        self._record(bool(decision.status), delivery, decision.status or "retry", report)
        if decision.next_attempt_at is None:
            return None
        return decision.next_attempt_at.replace(tzinfo=UTC)

    def _record(self, ok: bool, delivery: Delivery, status: str, report: RunReport) -> None:
        if not ok:
            report.lost += 1
            log.warning(
                "lease lost before the outcome was recorded",
                extra={"partner": delivery.partner, "delivery_id": delivery.id},
            )
            return
        if self.on_outcome is not None and status in ("delivered", "dead", "blocked-consent"):
            self.on_outcome(delivery, status)  # e.g. the audit trail of every disclosure
        if status == "delivered":
            report.delivered += 1
        elif status == "dead":
            report.dead += 1
            self._subscription_failed(delivery)
        elif status == "blocked-consent":
            report.blocked += 1
        elif status == "cancelled":
            report.cancelled += 1
        else:
            report.retried += 1
        log.info(
            "delivery outcome",
            extra={
                "partner": delivery.partner,
                "delivery_id": delivery.id,
                "status": status,
                "attempts": delivery.attempts,
            },
        )


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-kat worker",
        description="Deliver queued artifacts to the partners in [partners.*] "
        "(FHIR_KAT_CONFIG) and notifications to R4 rest-hook Subscriptions. "
        "Runs until SIGTERM/SIGINT.",
        epilog="Example: FHIR_KAT_CONFIG=kat.toml fhir-kat worker --batch-size 20",
    )
    parser.add_argument("--batch-size", type=int, default=10, help="deliveries per claim")
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=None,
        help="after this long a claimed delivery is taken over by another worker "
        "(default: max(120, 3 x the longest partner timeout + 2))",
    )
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="pause when nothing is due")
    parser.add_argument(
        "--recheck-blocked-seconds",
        type=float,
        default=300.0,
        help="ask the consent gate again about consent-blocked deliveries this often "
        "(the safety net behind a Consent's own requeue; 0: never)",
    )
    parser.add_argument("--worker-id", default=None, help="name in claims and logs")
    parser.add_argument(
        "--no-subscriptions",
        action="store_true",
        help="leave R4 rest-hook Subscription notifications to other workers",
    )
    parser.add_argument("--once", action="store_true", help="run one batch and exit")
    parser.add_argument(
        "--max-iterations", type=int, default=None, help="stop after this many batches"
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    consent_gate: ConsentGate | None = None,
    on_outcome: OutcomeHook | None = None,
) -> int:
    """``fhir-kat worker``: 0 after a clean stop, 2 for a usage or configuration error."""
    from fhir_kat.logging import configure_logging

    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        partners = load_partners(settings)
        endpoint_policy = policy_from_settings(settings)
        hooks = subscription_delivery(settings.extra.get("exchange", {}))
    except SettingsError as exc:
        print(f"fhir-kat worker: {exc}", file=sys.stderr)
        return 2
    if args.no_subscriptions and not any(p.enabled for p in partners.values()):
        print(
            "fhir-kat worker: no enabled [partners.*] in the configuration "
            "and --no-subscriptions: nothing to deliver",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_level)
    log_partner_plan(partners)
    store = Store(settings.effective_database_url)
    try:
        store.create_schema()
        store.claim_bases()  # as the server does at start-up (ADR 0021)
    except SettingsError as exc:
        store.dispose()
        print(f"fhir-kat worker: {exc}", file=sys.stderr)
        return 2
    try:
        worker = DeliveryWorker(
            store,
            partners,
            consent_gate or unavailable_consent_gate,
            worker_id=args.worker_id,
            batch_size=args.batch_size,
            lease_seconds=args.lease_seconds,
            idle_seconds=args.idle_seconds,
            on_outcome=on_outcome,
            subscriptions=not args.no_subscriptions,
            endpoint_policy=endpoint_policy,
            subscription_policy=RetryPolicy(
                hooks.max_attempts, hooks.backoff_base_seconds, hooks.backoff_cap_seconds
            ),
            subscription_timeout_seconds=hooks.timeout_seconds,
            recheck_blocked_seconds=args.recheck_blocked_seconds,
        )
    except ValueError as exc:
        store.dispose()
        print(f"fhir-kat worker: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "worker started",
        extra={
            "worker": worker.worker_id,
            "partners": sorted(worker.partners),
            "subscriptions": worker.subscriptions,
        },
    )
    try:
        worker.run(stop, max_iterations=1 if args.once else args.max_iterations)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.close()
        store.dispose()
    log.info("worker stopped", extra={"worker": worker.worker_id})
    return 0


if __name__ == "__main__":
    sys.exit(main())
