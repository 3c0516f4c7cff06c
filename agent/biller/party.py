"""What every phase of the biller agent shares: the biller's identity, its store and plugins, and the phases.

`BillerParty` is built once by `BillerAgent` and handed to each phase. Phases reach one another through
it (`party.receive`, `party.replays`, ...) at call time, never through a reference taken at start-up:
replacing a phase object on the party (a subclass that overrides one public method) changes what every
caller reaches. That is the seam tests use to build deliberately broken billers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from agent.clock import Clock
from agent.metrics import BillerMetrics
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import Limits
from agent.protocol.messages import new_header, seal
from agent.ratelimit import RateLimiter
from agent.stores.base import BillerStore, EventRecord
from parley.v1 import envelope_pb2, header_pb2

if TYPE_CHECKING:
    from agent.biller.bills import BillsPhase
    from agent.biller.enrolment import EnrolmentPhase
    from agent.biller.events import EventsPhase
    from agent.biller.keysets import KeySetsPhase
    from agent.biller.negotiation import NegotiationPhase
    from agent.biller.payments import PaymentsPhase
    from agent.biller.plugins import PaymentRail, Policy
    from agent.biller.privacy import PrivacyPhase
    from agent.biller.receive import ReceivePath, ReplayCache


class Wakeups:
    """Notifications for event watchers: `event(account)` is set when the account's log grows, and
    `party_event(party)` when the party's key set chain changes (its streams re-check their key, EVT-10)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._party_events: dict[str, asyncio.Event] = {}

    def party_event(self, party_id: str) -> asyncio.Event:
        return self._party_events.setdefault(party_id, asyncio.Event())

    def notify_party(self, party_id: str) -> None:
        event = self._party_events.pop(party_id, None)
        if event is not None:
            event.set()

    def event(self, account_id: str) -> asyncio.Event:
        return self._events.setdefault(account_id, asyncio.Event())

    def notify(self, records: Sequence[EventRecord]) -> None:
        for account_id in {record.account_id for record in records}:
            event = self._events.pop(account_id, None)
            if event is not None:
                event.set()


class BillerParty:
    """The biller's identity, services and phases. Mutable on purpose: a key rotation replaces `key`
    and `key_chain`, and a phase may be replaced by a subclass (see the module docstring)."""

    receive: ReceivePath
    replays: ReplayCache
    keysets: KeySetsPhase
    enrolment: EnrolmentPhase
    bills: BillsPhase
    negotiation: NegotiationPhase
    payments: PaymentsPhase
    privacy: PrivacyPhase
    events: EventsPhase

    def __init__(
        self,
        *,
        party_id: str,
        key: SigningKey,
        key_chain: KeyChain,
        store: BillerStore,
        policy: Policy,
        rail: PaymentRail,
        clock: Clock,
        limits: Limits,
        message_lifetime: timedelta,
        metrics: BillerMetrics,
    ) -> None:
        self.party_id = party_id
        self.key = key
        self.key_chain = key_chain
        self.store = store
        self.policy = policy
        self.rail = rail
        self.clock = clock
        self.limits = limits
        self.message_lifetime = message_lifetime
        self.metrics = metrics
        self.rate_limiter = RateLimiter(limits)  # LIM-8: per process; the transport adds the peer limits
        self.wakeups = Wakeups()

    def header(
        self, recipient: str, thread_id: bytes, sequence: int, previous_digest: bytes, now: datetime
    ) -> header_pb2.Header:
        """A header from us, created at `now`, living `message_lifetime`."""
        return new_header(
            sender=self.party_id,
            recipient=recipient,
            thread_id=thread_id,
            sequence=sequence,
            previous_digest=previous_digest,
            now=now,
            lifetime=self.message_lifetime,
        )

    def seal(self, message: Message) -> envelope_pb2.Envelope:
        """Sign `message` with our current key."""
        return seal(message, self.key)

    async def bound_consumer(self, account_id: str) -> str:
        """The party enrolled on the account (embedding API: LookupError / ValueError, not protocol errors)."""
        account = await self.store.get_account(account_id)
        if account is None:
            raise LookupError(f"no account {account_id!r}")
        if account.consumer_party_id is None:
            raise ValueError(f"account {account_id!r} has no enrolled consumer yet")
        return account.consumer_party_id


def stored_envelope(data: bytes) -> envelope_pb2.Envelope:
    """An envelope we stored (verified or signed by us before storing)."""
    return envelope_pb2.Envelope.FromString(data)


__all__ = ["BillerParty", "Wakeups", "stored_envelope"]
