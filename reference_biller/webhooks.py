"""Outbound webhooks: the outcomes a billing system acts on, POSTed as signed JSON to its URLs.

    [[webhooks]]
    url = "https://billing.example/parley"
    secret_files = ["/etc/parley/webhook.secret"]   # the first signs; during a rotation list the old one too
    events = ["agreement_reached", "payment_received"]  # default: all four

| webhook `type`            | the event in the account's signed log  |
| ------------------------- | -------------------------------------- |
| `agreement_reached`       | ARRANGEMENT_ACTIVE                     |
| `arrangement_broken`      | ARRANGEMENT_BROKEN                     |
| `payment_received`        | PAYMENT_RECEIVED                       |
| `renegotiation_offered`   | RENEGOTIATION_OFFERED                  |

**Derived from the event log, not written beside it.** The agent appends each
of these events in the same transaction as the protocol step it reports (the
signed event log is the source of truth), so the outbox *is* that log: each
binding of an account to a party has its own log from sequence 0 (ENR-12), and
the dispatcher follows every binding's log — the current holder's and earlier
holders' — with a durable cursor per (endpoint, account, holder party) in the
store (`webhook_log_cursors`). A pass lists the logs from their lengths, which
the store keeps beside them with each append (`event_log_lengths`): it costs a
row per log, however many events they hold, and reads events only from logs
with some past their cursor. A protocol step writes nothing more
and never waits for a receiver; a restart resumes from the cursors. Replicas
sharing a store take turns per endpoint (a lease in the store, as the
scheduler's); a crash between a POST and saving its cursor sends that event
again: at least once, never lost.

**Delivery is at least once, in order per log.** The body's `id` (the
event's digest, hex) is the idempotency key, also sent as `Idempotency-Key`:
a receiver that has seen it answers 2xx and does nothing. A `sequence` is a
position in one binding's log, unique only with `account_id` and `holder` (the
party the event is addressed to): after a re-enrolment two logs of one account
both have a sequence 1. Any 2xx answer is
success; anything else (an error status, a refused connection, a timeout) is
retried with exponential backoff — `BACKOFF_FIRST`, doubling, at most
`BACKOFF_CAP` apart — for `GIVE_UP_AFTER` (3 days) of attempts; then the event
is logged as abandoned (ERROR) and the cursor moves on. While one log's
event is being retried, that log's later events wait (order), other logs' do
not. A new endpoint starts at the beginning of every log.

**Signature** (as Stripe signs): header
`Parley-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]`, each `v1` being
HMAC-SHA256(secret, "<t>.<raw body>") for one configured secret. A receiver
recomputes it with its secret over the exact bytes received, compares in
constant time, and refuses a `t` older than a few minutes (replays).
`verify_signature` is that check, for receivers written in Python.

The body also carries the signed event envelope itself (`envelope`, base64),
which anyone holding the biller's key set can verify offline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from agent.clock import Clock
from agent.protocol.terms import Money
from agent.stores.base import BillerStore, EventLog, EventRecord, WebhookCursor
from agent.stores.biller_sql import Leases
from parley.v1 import envelope_pb2, event_pb2

if TYPE_CHECKING:
    import aiohttp
from reference_biller.config import Webhook

logger = logging.getLogger("parley.reference_biller.webhooks")

EVENT_TYPES: dict[int, str] = {
    event_pb2.EVENT_KIND_ARRANGEMENT_ACTIVE: "agreement_reached",
    event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN: "arrangement_broken",
    event_pb2.EVENT_KIND_PAYMENT_RECEIVED: "payment_received",
    event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED: "renegotiation_offered",
}
SIGNATURE_HEADER = "Parley-Signature"
BACKOFF_FIRST = timedelta(seconds=10)
BACKOFF_CAP = timedelta(hours=1)
GIVE_UP_AFTER = timedelta(days=3)
DEFAULT_POLL = timedelta(seconds=2)
REQUEST_TIMEOUT = timedelta(seconds=10)
PASS_LEASE = timedelta(minutes=2)  # a replica that dies mid-pass holds an endpoint this long at most
SIGNATURE_TOLERANCE = timedelta(minutes=5)
MIN_SECRET_BYTES = 16
_BATCH = 100


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt: BACKOFF_FIRST, doubling, capped at BACKOFF_CAP."""
    doubled: timedelta = BACKOFF_FIRST * (1 << min(attempts - 1, 32))
    return min(doubled, BACKOFF_CAP)


def _attempts_to_give_up() -> int:
    """How many attempts fill GIVE_UP_AFTER with `backoff`'s waits."""
    attempts, waited = 0, timedelta(0)
    while waited < GIVE_UP_AFTER:
        attempts += 1
        waited += backoff(attempts)
    return attempts


MAX_ATTEMPTS = _attempts_to_give_up()


def sign(keys: Sequence[bytes], timestamp: int, body: bytes) -> str:
    """The Parley-Signature header value: t=<timestamp> and one v1 per secret in `keys`."""
    signed = str(timestamp).encode() + b"." + body
    return ",".join([f"t={timestamp}"] + [f"v1={hmac.new(key, signed, hashlib.sha256).hexdigest()}" for key in keys])


def verify_signature(header: str, body: bytes, secret: bytes, now: datetime) -> bool:
    """A receiver's check: one v1 matches HMAC-SHA256(secret, "t.body") and t is within SIGNATURE_TOLERANCE."""
    fields = [part.partition("=") for part in header.split(",")]
    stamps = [value for name, _, value in fields if name.strip() == "t"]
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    if abs(now.timestamp() - int(stamps[0])) > SIGNATURE_TOLERANCE.total_seconds():
        return False
    expected = hmac.new(secret, stamps[0].encode() + b"." + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(value.strip(), expected) for name, _, value in fields if name.strip() == "v1")


def read_secret(path: Path) -> bytes:
    """The secret in `path` (surrounding whitespace dropped); ValueError if shorter than MIN_SECRET_BYTES."""
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the webhook secret in {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret


@dataclass(frozen=True)
class Endpoint:
    """A configured webhook with its secrets read."""

    url: str
    secrets: tuple[bytes, ...]
    types: frozenset[str]

    @classmethod
    def load(cls, webhook: Webhook, base: Path | None = None) -> Endpoint:
        """Read the secret files (relative to `base`, else the working directory); OSError, ValueError."""
        paths = [Path(name) if base is None else base / name for name in webhook.secret_files]
        return cls(webhook.url, tuple(read_secret(path) for path in paths), frozenset(webhook.events))


def event_body(record: EventRecord, biller_party_id: str) -> tuple[str, bytes]:
    """(webhook type or "" if the kind is not one webhooks report, JSON body) of one logged event."""
    envelope = envelope_pb2.Envelope.FromString(record.envelope)
    event = event_pb2.Event.FromString(envelope.payload)
    kind = EVENT_TYPES.get(event.kind, "")
    if not kind:
        return "", b""
    amount = None
    if event.HasField("amount"):
        money = Money.from_proto(event.amount)
        amount = {"currency": money.currency.code, "minor": money.minor, "text": str(money)}
    document = {
        "id": record.digest.hex(),
        "type": kind,
        "created": event.header.create_time.ToDatetime().isoformat() + "Z",
        "biller": biller_party_id,
        "account_id": record.account_id,
        "holder": record.party_id,
        "sequence": record.sequence,
        "bill_id": event.bill_id or None,
        "thread_id": event.thread_id.hex() or None,
        "amount": amount,
        "date": event.date or None,
        "message": event.message or None,
        "envelope": base64.b64encode(record.envelope).decode("ascii"),
    }
    return kind, json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


class WebhookDispatcher:
    """Delivers the reported events of every account to every endpoint, from the store's cursors.

    `deliver_due()` makes one pass and returns how many webhooks were delivered;
    `run()` passes every `poll` until cancelled (its own task in `serve`).
    """

    def __init__(
        self,
        store: BillerStore,
        biller_party_id: str,
        endpoints: Sequence[Endpoint],
        clock: Clock,
        *,
        poll: timedelta = DEFAULT_POLL,
    ) -> None:
        self._store = store
        self._party_id = biller_party_id
        self._endpoints = tuple(endpoints)
        self._clock = clock
        self._poll = poll
        self._session: aiohttp.ClientSession | None = None
        self._holder = secrets.token_hex(16)  # this dispatcher, as a lease holder

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.deliver_due()
                except Exception:
                    logger.exception("webhook pass failed; retrying in %s", self._poll)
                await asyncio.sleep(self._poll.total_seconds())
        finally:
            await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def deliver_due(self) -> int:
        delivered = 0
        logs = await self._store.event_logs()
        for endpoint in self._endpoints:
            delivered += await self._leased(endpoint, logs)
        return delivered

    async def _leased(self, endpoint: Endpoint, logs: Sequence[EventLog]) -> int:
        """One endpoint's pass, while holding its lease in a store shared by replicas (one sender at a time)."""
        store = self._store
        if not isinstance(store, Leases):
            return await self._pass(endpoint, logs)
        name = f"webhooks:{endpoint.url}"
        now = self._clock.now()
        if not await store.claim_lease(name, self._holder, now, now + PASS_LEASE):
            return 0  # another process is delivering to this endpoint
        try:
            return await self._pass(endpoint, logs)
        finally:
            await store.release_lease(name, self._holder)

    async def _pass(self, endpoint: Endpoint, logs: Sequence[EventLog]) -> int:
        """Deliver what is due to one endpoint, log by log (each binding's, ENR-12). A failure ends the pass:
        the endpoint is probably down, and trying every other log against it (each up to REQUEST_TIMEOUT)
        would only delay the next pass; the failed log waits out its backoff, the others are tried next pass."""
        delivered = 0
        cursors = await self._store.webhook_cursors(endpoint.url)
        for log in logs:
            cursor = cursors.get((log.account_id, log.party_id), WebhookCursor(log.account_id, log.party_id, 0))
            if cursor.next_sequence >= log.length:
                continue  # delivered to its end when the pass began
            sent, failed = await self._follow(endpoint, cursor)
            delivered += sent
            if failed:
                break
        return delivered

    async def _follow(self, endpoint: Endpoint, cursor: WebhookCursor) -> tuple[int, bool]:
        """Deliver one binding's log to one endpoint from its cursor: (how many, whether one failed)."""
        if cursor.next_attempt_at is not None and cursor.next_attempt_at > self._clock.now():
            return 0, False
        delivered = 0
        start = cursor
        while True:
            records = await self._store.events(cursor.account_id, cursor.next_sequence, _BATCH, cursor.party_id)
            if not records:
                break
            for record in records:
                kind, body = event_body(record, self._party_id)
                if kind in endpoint.types:
                    error = await self._post(endpoint, kind, record, body)
                    if error:
                        await self._store.save_webhook_cursor(endpoint.url, self._failed(endpoint, cursor, error))
                        return delivered, True
                    delivered += 1
                    logger.info("webhook %s delivered to %s (%s)", kind, endpoint.url, record.digest.hex()[:16])
                cursor = WebhookCursor(cursor.account_id, cursor.party_id, record.sequence + 1)
                if kind in endpoint.types:
                    await self._store.save_webhook_cursor(endpoint.url, cursor)  # a delivery is remembered at once
        if cursor != start:
            await self._store.save_webhook_cursor(endpoint.url, cursor)
        return delivered, False

    def _failed(self, endpoint: Endpoint, cursor: WebhookCursor, error: str) -> WebhookCursor:
        attempts = cursor.attempts + 1
        if attempts >= MAX_ATTEMPTS:
            logger.error(
                "webhook to %s abandoned after %d attempts over %s: account %s holder %s event %d (%s)",
                endpoint.url,
                attempts,
                GIVE_UP_AFTER,
                cursor.account_id,
                cursor.party_id,
                cursor.next_sequence,
                error,
            )
            return WebhookCursor(
                cursor.account_id, cursor.party_id, cursor.next_sequence + 1, last_error=f"abandoned: {error}"
            )
        wait = backoff(attempts)
        logger.warning("webhook to %s failed (%s); attempt %d, next in %s", endpoint.url, error, attempts, wait)
        return WebhookCursor(
            cursor.account_id, cursor.party_id, cursor.next_sequence, attempts, self._clock.now() + wait, error[:500]
        )

    async def _post(self, endpoint: Endpoint, kind: str, record: EventRecord, body: bytes) -> str:
        """POST one webhook; "" on a 2xx answer, else what went wrong."""
        import aiohttp  # noqa: PLC0415 - here: most billers post no webhooks, and it is 0.25 s of every start

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT.total_seconds()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "parley-reference-biller",
            "Idempotency-Key": record.digest.hex(),
            "Parley-Event-Type": kind,
            # The receiver checks `t` against its wall clock, so it is the wall clock's, not the biller's
            # (which a test or the demo may have moved ahead).
            SIGNATURE_HEADER: sign(endpoint.secrets, int(time.time()), body),
        }
        try:
            async with self._session.post(endpoint.url, data=body, headers=headers, allow_redirects=False) as answer:
                await answer.read()
                return "" if 200 <= answer.status < 300 else f"HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return f"{type(error).__name__}: {error}"


__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_FIRST",
    "EVENT_TYPES",
    "GIVE_UP_AFTER",
    "MAX_ATTEMPTS",
    "SIGNATURE_HEADER",
    "Endpoint",
    "WebhookDispatcher",
    "backoff",
    "event_body",
    "read_secret",
    "sign",
    "verify_signature",
]
