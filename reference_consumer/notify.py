"""Notifications the person chose (`[notifications]` in the profile): a command and/or a signed webhook.

Each notification is a small JSON document with an `id` (the same news always has the same id, so a
receiver can drop repeats) and a `kind` (`profile.NOTIFICATION_KINDS`). It is first written to the
durable outbox in the consumer store — one row per channel, so a command that fails does not
resend the webhook — and delivered from there by `Notifier`, in its own task: a slow or dead
receiver never holds the bot up, and a restart loses nothing (what was not delivered is still in
the outbox). A failed delivery is retried after `base_delay * 2**attempts` seconds, at most
`max_delay`.

Channels:

- **command**: the profile's argument list is run (no shell) with the JSON on standard input and
  `PARLEY_NOTIFICATION_ID` / `PARLEY_NOTIFICATION_KIND` in its environment; exit status 0 is
  delivered.
- **webhook**: the JSON is POSTed with `Content-Type: application/json`, `Parley-Notification-Id`
  and `Parley-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, the secret
  being the bytes of `secret_file` (surrounding whitespace dropped); any 2xx answer is delivered.
  A receiver recomputes the HMAC over the exact body received and refuses an old `t`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
from datetime import datetime, timedelta

from agent.clock import Clock
from agent.stores.base import HouseholdRecordStore, NotificationRecord
from reference_consumer.profile import Notifications

logger = logging.getLogger("parley.reference_consumer.notify")

SIGNATURE_HEADER = "Parley-Signature"
ID_HEADER = "Parley-Notification-Id"
DELIVERY_TIMEOUT_SECONDS = 10.0
_CHANNELS = ("command", "webhook")


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `Parley-Signature` header value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: bytes, header: str, body: bytes, now: int, tolerance: int = 300) -> bool:
    """What a receiver does: the header's HMAC matches the body and its time is within `tolerance` seconds."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = signature(secret, timestamp, body)
    return abs(now - timestamp) <= tolerance and hmac.compare_digest(expected, header)


class Outbox:
    """Writes notifications to the outbox, once per chosen channel; does nothing when none is chosen."""

    def __init__(self, store: HouseholdRecordStore, settings: Notifications, clock: Clock) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._channels = [
            channel
            for channel, on in zip(_CHANNELS, (bool(settings.command), settings.webhook is not None), strict=True)
            if on
        ]
        self.wake = asyncio.Event()
        """Set when something was added, so a waiting `Notifier` delivers at once."""

    async def add(self, notification_id: str, kind: str, document: dict[str, object]) -> bool:
        """Queue one notification (idempotent by id); whether it was new on any channel."""
        if kind not in self._settings.kinds or not self._channels:
            return False
        now = self._clock.now()
        body = json.dumps(
            {"id": notification_id, "kind": kind, "created_at": now.isoformat(), **document}, sort_keys=True
        )
        added = False
        for channel in self._channels:
            record = NotificationRecord(f"{notification_id}@{channel}", kind, body, now)
            added = await self._store.enqueue_notification(record) or added
        if added:
            self.wake.set()
        return added


class Notifier:
    """Delivers the outbox: `deliver_due()` once, or `run(stop)` as the bot's companion task."""

    def __init__(
        self,
        store: HouseholdRecordStore,
        settings: Notifications,
        clock: Clock,
        *,
        base_delay: float = 2.0,
        max_delay: float = 3600.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._poll_seconds = poll_seconds

    async def deliver_due(self) -> int:
        """Try every notification due now once; how many were delivered."""
        delivered = 0
        for record in await self._store.due_notifications(self._clock.now()):
            channel = record.notification_id.rpartition("@")[2]
            try:
                if channel == "command":
                    await self._run_command(record)
                else:
                    await self._post(record)
            except (OSError, ValueError, TimeoutError) as error:  # urllib's URLError is an OSError
                delay = min(self._base_delay * 2**record.attempts, self._max_delay)
                retry_at = self._clock.now() + timedelta(seconds=delay)
                logger.warning(
                    "notification %s not delivered (%s); retry at %s", record.notification_id, error, retry_at
                )
                await self._store.notification_attempted(
                    record.notification_id, delivered_at=None, next_attempt_at=retry_at, error=str(error)[:500]
                )
                continue
            await self._store.notification_attempted(
                record.notification_id, delivered_at=self._clock.now(), next_attempt_at=None, error=""
            )
            delivered += 1
        return delivered

    async def run(self, stop: asyncio.Event, wake: asyncio.Event | None = None) -> None:
        """Deliver until `stop` is set; `wake` (the outbox's) starts a round at once."""
        wake = wake or asyncio.Event()
        while not stop.is_set():
            try:
                await self.deliver_due()
            except Exception:  # the notifier outlives a failed round; the outbox keeps everything
                logger.exception("notification round failed")
            wake.clear()
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
            try:
                await asyncio.wait(waits, timeout=self._poll_seconds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()

    async def _run_command(self, record: NotificationRecord) -> None:
        notification_id = record.notification_id.rpartition("@")[0]
        environment = {**os.environ, "PARLEY_NOTIFICATION_ID": notification_id, "PARLEY_NOTIFICATION_KIND": record.kind}
        process = await asyncio.create_subprocess_exec(
            *self._settings.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=environment,
        )
        try:
            await asyncio.wait_for(process.communicate(record.body.encode()), DELIVERY_TIMEOUT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise ValueError(f"the command exited with status {process.returncode}")

    async def _post(self, record: NotificationRecord) -> None:
        assert self._settings.webhook is not None
        assert self._settings.secret_file is not None
        secret = (await asyncio.to_thread(self._settings.secret_file.read_bytes)).strip()
        if not secret:
            raise ValueError(f"{self._settings.secret_file} is empty")
        # Imported here: urllib.request brings http.client, email and ssl, about 10 ms of every `parley consumer
        # run` start, and most households have no webhook (the conformance suite starts hundreds of runs).
        import urllib.request  # noqa: PLC0415

        body = record.body.encode()
        timestamp = int(self._clock.now().timestamp())
        request = urllib.request.Request(  # noqa: S310 - the profile allows https, or http to loopback only
            self._settings.webhook,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                ID_HEADER: record.notification_id.rpartition("@")[0],
                SIGNATURE_HEADER: signature(secret, timestamp, body),
            },
        )

        def post() -> int:
            with urllib.request.urlopen(request, timeout=DELIVERY_TIMEOUT_SECONDS) as answer:  # noqa: S310
                return int(answer.status)

        status = await asyncio.to_thread(post)
        if not 200 <= status < 300:
            raise ValueError(f"the webhook answered {status}")


def due_later(record: NotificationRecord, now: datetime) -> bool:
    """Whether an undelivered notification waits for a later retry."""
    return record.delivered_at is None and record.next_attempt_at is not None and record.next_attempt_at > now


__all__ = [
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "Notifier",
    "Outbox",
    "due_later",
    "signature",
    "verify_signature",
]
