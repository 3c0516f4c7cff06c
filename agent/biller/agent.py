"""The embeddable biller agent: the biller side of Parley, with no transport in it.

`BillerAgent` holds the biller's identity (party id, signing key, key set chain),
a `BillerStore`, the biller's `Policy` and `PaymentRail`, and a `Clock`. It has
two faces:

- the **embedding API**, for the biller's own systems: `create_account`,
  `issue_enrolment_code`, `issue_bill`, `record_settlement`, `emit_event`,
  `offer_renegotiation`, and the reads `account` and `arrangements` (what a
  reminder or missed-instalment scheduler works from);
- the **protocol methods**, one per `BillerService` RPC, which the gRPC servicer
  (`agent.transport.server`) calls with the request's envelope(s). They return
  the response messages and raise `ProtocolError` with the spec reason.

The agent is a facade over one object per phase, all sharing a `BillerParty`
(`agent.biller.party`): the receive path and replay cache (`receive.py`, with the
one idempotent step every mutating RPC runs through), key sets, enrolment, bills,
negotiation, payments and events. The protocol's rules live in the sans-I/O core
(`agent.protocol`); the phases feed it stored state and received messages, ask
the policy for the biller's answers and store each step.

Embedding it (the reference biller is a complete example)::

    store = await SqliteBillerStore.open("biller.sqlite")
    agent = BillerAgent(party_id="biller:energy.example", signing_key=key, key_sets=chain,
                        store=store, policy=MyPolicy(), rail=MyRail())
    server, port = await start_biller_server(agent, "0.0.0.0:7443", tls=(cert_pem, key_pem))

    await agent.create_account("acct-1001", "A. Holder")
    code = await agent.issue_enrolment_code("acct-1001")   # send it with the paper bill
    ...                                                    # once the holder's app has enrolled:
    bill_id = await agent.issue_bill("acct-1001", Money.parse("120.00", "EUR"), due, "Electricity, March")
    receipt = await agent.record_settlement("acct-1001", intent_id, amount, rail_reference)
    for arrangement in await agent.arrangements():         # a reminder scheduler's loop
        for index, instalment in arrangement.unpaid_instalments(): ...

    await server.stop(grace=5)
    await store.close()
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime, timedelta

from agent.biller.bills import BillsPhase
from agent.biller.enrolment import EnrolmentPhase
from agent.biller.events import EventsPhase
from agent.biller.keysets import KeySetsPhase
from agent.biller.negotiation import NegotiationPhase
from agent.biller.party import BillerParty
from agent.biller.payments import PaymentsPhase
from agent.biller.plugins import PaymentRail, Policy
from agent.biller.privacy import PrivacyPhase
from agent.biller.receive import ReceivePath, ReplayCache
from agent.biller.results import Arrangement, AwaitedPayment
from agent.clock import Clock, SystemClock
from agent.metrics import BillerMetrics
from agent.protocol.enrolment import ENROLMENT_CODE_VALIDITY
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import DEFAULT_LIMITS, MAX_ID_CHARS, SUPPORTED_VERSIONS, Limits
from agent.protocol.terms import AdvertisedOptions, Money
from agent.ratelimit import RateLimiter
from agent.stores.base import AccountRecord, BillerStore
from agent.version import software_name
from parley.v1 import biller_service_pb2, envelope_pb2, event_pb2

SERVER_NAME = software_name("biller")
# VER-3: everything this agent implements beyond the core RPCs.
FEATURES = ("negotiation", "instalments", "settlement", "hardship", "events", "erasure")
DISCLOSURE_RETENTION = timedelta(days=90)  # PRV-6
# LIM-11: limits a biller may lower but not raise (peers and offline verifiers judge with the defaults).
_NOT_RAISABLE = (
    "max_envelope_bytes",
    "max_clock_skew",
    "max_message_lifetime",
    "max_rounds",
    "max_negotiation_time",
    "max_instalments",
    "enrolment_max_attempts",
)


class BillerAgent:
    """The biller side of Parley. See the module docstring; every method is a coroutine unless noted."""

    def __init__(
        self,
        *,
        party_id: str,
        signing_key: SigningKey,
        key_sets: KeyChain | Sequence[envelope_pb2.Envelope],
        store: BillerStore,
        policy: Policy,
        rail: PaymentRail,
        clock: Clock | None = None,
        limits: Limits = DEFAULT_LIMITS,
        message_lifetime: timedelta = timedelta(hours=1),
        watch_poll_interval: timedelta = timedelta(seconds=5),
        features: Sequence[str] = FEATURES,
        metrics: BillerMetrics | None = None,
        enrolment_secret: bytes | None = None,
    ) -> None:
        """`key_sets` is the biller's own chain (verified here if given as envelopes).

        `features` are announced in Hello (VER-3): announce only what is served in
        full, e.g. FEATURES + ("conformance-control",) when that service is exposed.

        `message_lifetime` is the expire_time - create_time of everything the agent
        signs. `watch_poll_interval` bounds how late an event appended by another
        process sharing the store reaches this process's watchers (events appended
        here wake them at once), and how often an open stream's query is checked again
        (EVT-10: re-binding, revoked or dropped key, expiry; at most every 30 s whatever
        the interval). `metrics` (default: new ones, on a registry of their
        own) count its protocol steps. `enrolment_secret` is the HMAC key of enrolment codes
        (ENR-8), kept outside the store (`agent.stores.files.load_or_create_secret`); without
        one, codes issued by this agent verify only in it. ValueError if the key is not in the chain's
        newest version or the chain is another party's.

        The phase objects are on `self.party` (`receive`, `replays`, `keysets`, `enrolment`,
        `bills`, `negotiation`, `payments`, `privacy`, `events`); a subclass of one may replace it there.
        """
        chain = key_sets if isinstance(key_sets, KeyChain) else KeyChain.verify(list(key_sets), limits=limits)
        if chain.party_id != party_id:
            raise ValueError(f"the key set chain is {chain.party_id!r}'s, not {party_id!r}")
        if chain.latest.entry(signing_key.keyid) is None:
            raise ValueError(f"signing key {signing_key.keyid} is not in key set version {chain.latest.version}")
        raised = [name for name in _NOT_RAISABLE if getattr(limits, name) > getattr(DEFAULT_LIMITS, name)]
        if raised:
            raise ValueError(f"LIM-11: these limits may not exceed the spec defaults: {', '.join(raised)}")
        if not timedelta(0) < message_lifetime <= limits.max_message_lifetime:
            raise ValueError(f"message_lifetime must be within (0, {limits.max_message_lifetime}]")
        self.features = tuple(features)
        party = BillerParty(
            party_id=party_id,
            key=signing_key,
            key_chain=chain,
            store=store,
            policy=policy,
            rail=rail,
            clock=clock or SystemClock(),
            limits=limits,
            message_lifetime=message_lifetime,
            metrics=metrics if metrics is not None else BillerMetrics(),
        )
        party.receive = ReceivePath(party)
        party.replays = ReplayCache(party)
        party.keysets = KeySetsPhase(party)
        party.enrolment = EnrolmentPhase(party, enrolment_secret)
        party.bills = BillsPhase(party)
        party.negotiation = NegotiationPhase(party)
        party.payments = PaymentsPhase(party)
        party.privacy = PrivacyPhase(party)
        party.events = EventsPhase(party, watch_poll_interval=watch_poll_interval)
        self.party = party

    # --- the identity and services, read through to the party the phases share ---

    @property
    def party_id(self) -> str:
        return self.party.party_id

    @property
    def key_chain(self) -> KeyChain:
        return self.party.key_chain

    @key_chain.setter
    def key_chain(self, chain: KeyChain) -> None:
        self.party.key_chain = chain

    @property
    def _key(self) -> SigningKey:  # kept for tests that rotate the key in place
        return self.party.key

    @_key.setter
    def _key(self, key: SigningKey) -> None:
        self.party.key = key

    @property
    def _store(self) -> BillerStore:  # kept for tests that read the store behind the agent
        return self.party.store

    @property
    def limits(self) -> Limits:
        return self.party.limits

    @property
    def clock(self) -> Clock:
        return self.party.clock

    @property
    def metrics(self) -> BillerMetrics:
        return self.party.metrics

    @property
    def rate_limiter(self) -> RateLimiter:
        return self.party.rate_limiter

    # === Embedding API ===================================================================================

    async def create_account(self, account_id: str, holder_name: str) -> None:
        """Add an account; AlreadyExists if the id is taken, ValueError if it is not 1..64 characters."""
        if not 0 < len(account_id) <= MAX_ID_CHARS:
            raise ValueError(f"account_id must be 1 to {MAX_ID_CHARS} characters")
        await self.party.store.create_account(account_id, holder_name, self.clock.now())

    async def account(self, account_id: str) -> AccountRecord | None:
        """The account, with its bound consumer party (None until enrolled), or None if unknown."""
        return await self.party.store.get_account(account_id)

    async def issue_enrolment_code(self, account_id: str, valid_for: timedelta = ENROLMENT_CODE_VALIDITY) -> str:
        """A fresh one-time code for the account holder, e.g. "7KQ2-M9XD-4RTB" (ENR-7).

        Only a salted hash is stored (ENR-8); the code is returned once and must reach
        the holder out of band, with the account id and `key_chain.fingerprint`.
        Issuing a code lifts an enrolment lock (ENR-5). Enrolling with it binds the
        account to the enrolling party, replacing any earlier binding (ENR-11).
        LookupError if the account does not exist.
        """
        return await self.party.enrolment.issue_code(account_id, valid_for)

    async def issue_bill(
        self,
        account_id: str,
        amount_due: Money,
        due_date: date,
        description: str,
        *,
        issue_date: date | None = None,
        bill_id: str | None = None,
        options: AdvertisedOptions | None = None,
    ) -> str:
        """Sign a bill to the account's consumer, store it and append BILL_ISSUED; returns the bill id.

        A Parley bill is addressed to the enrolled consumer, so the account must be
        enrolled first (ValueError otherwise): bill accounts that are not enrolled
        the usual way and send the enrolment code with it. `issue_date` defaults to
        today (the clock's), `bill_id` to a random id, `options` to
        `policy.advertise(BillContext(...))`. The bill is validated as `BillFacts` does
        (LocalProtocolError); AlreadyExists if the bill id is taken.
        """
        return await self.party.bills.issue_bill(
            account_id, amount_due, due_date, description, issue_date=issue_date, bill_id=bill_id, options=options
        )

    async def emit_event(
        self,
        account_id: str,
        kind: event_pb2.EventKind.ValueType,
        *,
        bill_id: str = "",
        thread_id: bytes = b"",
        amount: Money | None = None,
        day: date | None = None,
        reminder_level: int = 0,
        message: str = "",
        related_digest: bytes = b"",
    ) -> envelope_pb2.Envelope:
        """Append a signed event to the account's log (EVT-1) and wake its watchers; returns the envelope.

        For the biller's schedulers: REMINDER (reminder_level 1 to 3), INSTALMENT_DUE,
        INSTALMENT_MISSED, ARRANGEMENT_BROKEN... with the fields EVT-2 lists for the kind.
        The agent itself emits BILL_ISSUED, ARRANGEMENT_ACTIVE and PAYMENT_RECEIVED, and
        `offer_renegotiation` emits RENEGOTIATION_OFFERED. ValueError for an undefined
        kind, a reminder level outside its range or a message over 500 characters.
        """
        return await self.party.events.emit_event(
            account_id,
            kind,
            bill_id=bill_id,
            thread_id=thread_id,
            amount=amount,
            day=day,
            reminder_level=reminder_level,
            message=message,
            related_digest=related_digest,
        )

    async def offer_renegotiation(self, bill_id: str, *, message: str = "") -> envelope_pb2.Envelope:
        """Make a bill under an arrangement negotiable again and append RENEGOTIATION_OFFERED (EVT-7, NEG-3).

        For a scheduler that broke an arrangement after a missed instalment. LookupError
        unless the bill is under an arrangement; returns the event's envelope.
        """
        return await self.party.events.offer_renegotiation(bill_id, message=message)

    async def record_settlement(
        self,
        account_id: str,
        intent_id: str,
        amount: Money,
        rail_reference: str,
        *,
        settle_time: datetime | None = None,
    ) -> envelope_pb2.Envelope:
        """Record that the rail settled an intent: sign the Receipt, append PAYMENT_RECEIVED; returns the receipt.

        Idempotent: recording the same settlement again returns the same receipt. One
        intent never yields two payments (PAY-7): ValueError for a second settlement
        under another rail reference, and for an amount other than the instructed one
        (PAY-6: no receipt; resolve it out of band). LookupError for an unknown intent.
        """
        return await self.party.payments.record_settlement(
            account_id, intent_id, amount, rail_reference, settle_time=settle_time
        )

    async def arrangements(self, account_id: str | None = None, *, active_only: bool = True) -> list[Arrangement]:
        """Agreed arrangements (of one account, or all), oldest first, with the payments settled under each.

        Active means the bill is still under the arrangement: not fully paid, not
        reopened. This is what a reminder or missed-instalment scheduler reads.
        """
        return await self.party.payments.arrangements(account_id, active_only=active_only)

    async def awaited_payments(self) -> list[AwaitedPayment]:
        """Intents instructed but not settled, oldest first, read from the store: a payment rail restores
        from this after a restart, or sees what another replica instructed (PAY-7 still holds: each settles once)."""
        return await self.party.payments.awaited_payments()

    async def purge_expired(self, disclosure_retention: timedelta = DISCLOSURE_RETENTION) -> tuple[int, int]:
        """Retention: drop replay records no message can match any more (LIM-12) and erase disclosures
        older than `disclosure_retention` (PRV-6). Returns (replay records, disclosures) removed;
        run it periodically."""
        now = self.clock.now()
        replays = await self.party.store.purge_replay_cache(now)
        disclosures = await self.party.store.erase_disclosures_before(now - disclosure_retention)
        return replays, disclosures

    # === Protocol methods (called by the transport) ===============================================

    async def hello(self, request: biller_service_pb2.HelloRequest) -> biller_service_pb2.HelloResponse:
        """VER-2: the highest common version, our identity, features and limits."""
        common = set(request.protocol_versions) & set(SUPPORTED_VERSIONS)
        if not common:
            raise RemoteProtocolError(
                Reason.UNSUPPORTED_VERSION, f"no common protocol version; this biller speaks {SUPPORTED_VERSIONS}"
            )
        limits = self.limits
        return biller_service_pb2.HelloResponse(
            protocol_version=max(common),
            supported_versions=SUPPORTED_VERSIONS,
            biller_party_id=self.party_id,
            identity_fingerprint=self.key_chain.fingerprint,
            features=self.features,
            limits=biller_service_pb2.Limits(
                max_envelope_bytes=limits.max_envelope_bytes,
                max_clock_skew_seconds=int(limits.max_clock_skew.total_seconds()),
                max_message_lifetime_seconds=int(limits.max_message_lifetime.total_seconds()),
                max_rounds=limits.max_rounds,
                max_negotiation_seconds=int(limits.max_negotiation_time.total_seconds()),
                max_instalments=limits.max_instalments,
                max_open_threads_per_account=limits.max_open_threads_per_account,
                rate_limit_per_second=limits.rate_limit_per_second,
                rate_limit_burst=limits.rate_limit_burst,
                enrolment_max_attempts=limits.enrolment_max_attempts,
            ),
            server_name=SERVER_NAME,
        )

    async def get_key_sets(
        self, request: biller_service_pb2.GetKeySetsRequest
    ) -> biller_service_pb2.GetKeySetsResponse:
        """KEY-20: our own chain above `after_version`; consumers' chains are not served (NOT_FOUND)."""
        return self.party.keysets.get_key_sets(request)

    async def publish_key_set(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.PublishKeySetResponse:
        """KEY-19: extend the publishing consumer's chain with its next version."""
        return await self.party.keysets.publish_key_set(envelope)

    async def enrol(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.EnrolResponse:
        """Bind the consumer's key set to an account with a one-time code, in the order of ENR-1."""
        return await self.party.enrolment.enrol(envelope)

    async def list_bills(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.ListBillsResponse:
        """The account's signed bills, oldest first."""
        return await self.party.bills.list_bills(envelope)

    async def get_bill(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetBillResponse:
        """One signed bill of the account (NOT_FOUND if it is not on the account, AUZ-3)."""
        return await self.party.bills.get_bill(envelope)

    async def get_thread(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetThreadResponse:
        """NEG-22: every recorded message of a thread, sequence 0 first, with its current outcome."""
        return await self.party.negotiation.get_thread(envelope)

    async def negotiate(
        self, envelope: envelope_pb2.Envelope, disclosure: bytes = b""
    ) -> biller_service_pb2.NegotiateResponse:
        """One consumer move, answered in the same call with the biller's move if the thread is open (NEG-11)."""
        return await self.party.negotiation.negotiate(envelope, disclosure)

    async def create_payment_intent(
        self, envelope: envelope_pb2.Envelope
    ) -> biller_service_pb2.CreatePaymentIntentResponse:
        """A payment intent, answered with signed instructions; idempotent by intent_id (PAY-1..PAY-4)."""
        return await self.party.payments.create_payment_intent(envelope)

    async def get_receipt(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetReceiptResponse:
        """The signed receipt of a settled intent (PAY-5)."""
        return await self.party.payments.get_receipt(envelope)

    async def watch_events(self, envelope: envelope_pb2.Envelope) -> AsyncIterator[envelope_pb2.Envelope]:
        """EVT-3, EVT-4: check the query now, then stream the log from start_sequence and follow it live.

        Await this to validate the query (errors are raised here, before anything is
        streamed), then iterate the result; the stream ends only when the caller stops.
        """
        return await self.party.events.watch_events(envelope)

    async def request_erasure(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.RequestErasureResponse:
        """PRV-4: erase every disclosure held for the account; the signed messages stay."""
        return await self.party.privacy.request_erasure(envelope)


__all__ = ["DISCLOSURE_RETENTION", "FEATURES", "SERVER_NAME", "BillerAgent"]
