"""The embeddable consumer agent: the consumer side of Parley, over gRPC.

`ConsumerAgent` acts for one person (one party id, one signing key, one key set
chain) towards any number of billers. Each biller it enrolled with is a *link*:
the biller's endpoint and TLS settings, its party id and the identity
fingerprint pinned out of band (KEY-12), and its verified key set chain. Links,
bills, threads, payments and events live in a `ConsumerStore`, so an agent
re-created on the same store after a restart carries on where it stopped.

What the embedding app plugs in:

- a `Strategy` — what to offer on a bill and how to answer the biller's offers
  (pure logic; the reference consumer's cash-flow strategy is one);
- a `Mandate` — the limits inside which the agent may offer and accept without
  asking (NEG-20), and an approver callback that asks the user otherwise (by
  default `AskAndWait`: each request waits until the app answers it);
- a `PaymentSender` — the user's bank, which executes the transfer named by
  verified payment instructions.

The agent's duties, each with its requirement:

- enrolment verifies the biller's chain against the pin before trusting
  anything (ENR-10), and every biller message is opened against that chain
  with `recipient` = our party id (AUZ-6); a bill that fails is never returned
  nor paid (BIL-3);
- negotiation runs through the sans-I/O core: our moves are checked before
  they are signed (NEG-16), the biller's replies are judged by the same rules,
  and a rule the biller breaks ends the thread PROTOCOL_ERROR with the reply
  kept as evidence (NEG-17); each message we sign is stored before it is sent
  and resent byte for byte when the answer is lost (NEG-18);
- a payment intent is stored before it is sent, so a retry reuses its
  `intent_id` (PAY-2); instructions are paid only when they are signed by the
  pinned biller, chain to our intent and name its amount (PAY-8), and each
  intent is handed to the bank at most once (PAY-7); instructions whose
  pay_by_time passed before they reached the bank lapse, kept and never paid,
  and the payment gets a new intent (PAY-17); receipts are verified and
  a mismatch is raised as a dispute (PAY-9);
- events are verified and chained before they are stored, the cursor moving
  in the same transaction, so a reconnecting or restarted agent loses none and
  repeats none (EVT-5).

The facade delegates each phase to its module: `enrolment`, `bills`, `negotiation`, `payments`,
`events`, all judging what the biller sends through one receive path (`receive.Receiver`); the
embedder's plugins are in `plugins`, the mandate in `mandate`, the returned views in `results`.

Embedding it::

    store = await SqliteConsumerStore.open("consumer.sqlite")
    agent = ConsumerAgent(party_id="consumer:k3x9", signing_key=key, key_sets=chain, store=store,
                          strategy=MyStrategy(), mandate=Mandate(max_fee=Money.parse("10.00", "EUR"),
                          max_instalments=6, max_total_over_bill=Money.parse("10.00", "EUR")),
                          payment_sender=MyBank())
    await agent.enrol("billing.energy.example:7443", biller_party_id="biller:energy.example",
                      fingerprint=bytes.fromhex(fingerprint_from_the_paper_bill), account_id="acct-1001",
                      code="7KQ2-M9XD-4RTB", tls=ClientTls(root_certificates=ca_pem))
    for bill in await agent.bills("biller:energy.example"):
        result = await agent.negotiate("biller:energy.example", bill.facts.bill_id)
        if result.agreed:
            payment = await agent.pay("biller:energy.example", bill.facts.bill_id)
    async with contextlib.aclosing(agent.watch("biller:energy.example")) as events:
        async for event in events: ...
    await agent.close()
    await store.close()
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence
from datetime import timedelta

from agent.clock import Clock, SystemClock
from agent.consumer.approvals import Approvals
from agent.consumer.bills import Bills
from agent.consumer.enrolment import Enrolment
from agent.consumer.events import MAX_STORED_EVENTS, EventWatch
from agent.consumer.instalments import committed_instalments, owed_facts
from agent.consumer.locks import KeyedLocks
from agent.consumer.mandate import Mandate
from agent.consumer.negotiation import NegotiationSettings, Negotiator
from agent.consumer.party import Party
from agent.consumer.payments import Payments
from agent.consumer.plugins import Approver, AskAndWait, PaymentSender, Strategy
from agent.consumer.receive import Receiver
from agent.consumer.results import AccountEvent, BillerLink, NegotiationResult, Payment, PaymentReceipt, ReceivedBill
from agent.consumer.sessions import Sessions
from agent.protocol.agreement import Bundle
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import DEFAULT_LIMITS, Limits
from agent.protocol.messages import is_party_id
from agent.protocol.terms import BillFacts, Instalment
from agent.stores.base import ConsumerStore
from agent.transport.client import DEFAULT_RETRY, ClientTls, RetryPolicy
from parley.v1 import envelope_pb2


class ConsumerAgent:
    """The consumer side of Parley. See the module docstring; every method is a coroutine unless noted."""

    def __init__(
        self,
        *,
        party_id: str,
        signing_key: SigningKey,
        key_sets: KeyChain | Sequence[envelope_pb2.Envelope],
        store: ConsumerStore,
        strategy: Strategy,
        mandate: Mandate,
        approve: Approver | None = None,
        payment_sender: PaymentSender | None = None,
        clock: Clock | None = None,
        limits: Limits = DEFAULT_LIMITS,
        max_rounds: int = 6,
        negotiation_time: timedelta = timedelta(days=2),
        message_lifetime: timedelta = timedelta(minutes=15),
        retry: RetryPolicy = DEFAULT_RETRY,
        watch_failure_limit: int = 20,
        max_stored_events: int = MAX_STORED_EVENTS,
        client_certificate: tuple[bytes, bytes] | None = None,
    ) -> None:
        """`key_sets` is our own chain (verified here if given as envelopes).

        `client_certificate` is (certificate chain PEM, private key PEM), presented on
        every TLS channel to a biller that asks for mutual TLS (TRN-9); it is held in
        memory only, never written to the store.

        `approve` asks the user about moves outside the mandate (default: an
        `AskAndWait`, available as `agent.approvals`). `max_rounds` and
        `negotiation_time` are what our openings ask for, lowered to the biller's
        announced limits. `message_lifetime` is the expire_time - create_time of
        what we sign (HDR-14: minutes). `watch_failure_limit` is how many bad
        events in a row `watch` tolerates before it raises; `max_stored_events`
        how many events of one account's log it stores at most. ValueError for a
        party id that is not one, a chain of another party, or a signing key
        not in the chain's newest version.
        """
        if not is_party_id(party_id):
            raise ValueError(f"{party_id!r} is not a party id (HDR-13)")
        chain = key_sets if isinstance(key_sets, KeyChain) else KeyChain.verify(list(key_sets), limits=limits)
        if chain.party_id != party_id:
            raise ValueError(f"the key set chain is {chain.party_id!r}'s, not {party_id!r}")
        if chain.latest.entry(signing_key.keyid) is None:
            raise ValueError(f"signing key {signing_key.keyid} is not in key set version {chain.latest.version}")
        if not timedelta(0) < message_lifetime <= limits.max_message_lifetime:
            raise ValueError(f"message_lifetime must be within (0, {limits.max_message_lifetime}]")
        if max_rounds < 1 or negotiation_time <= timedelta(0):
            raise ValueError("max_rounds must be at least 1 and negotiation_time positive")
        self.party_id = party_id
        self.key_chain = chain
        self.limits = limits
        self.clock: Clock = clock or SystemClock()
        self.approvals = AskAndWait()
        party = Party(party_id, signing_key, chain, self.clock, limits, message_lifetime)
        self._store = store
        self._locks = KeyedLocks()  # a lock lives only while held or awaited: bounded by the work in flight
        receiver = Receiver(party, store)
        self._sessions = Sessions(
            party, store, receiver, self._locks, retry=retry, client_certificate=client_certificate
        )
        self._enrolment = Enrolment(party, store, receiver, self._sessions)
        self._bills = Bills(party, store, receiver, self._sessions)
        self._negotiator = Negotiator(
            party,
            store,
            receiver,
            self._sessions,
            self._bills,
            strategy=strategy,
            mandate=mandate,
            approvals=Approvals(party, approve or self.approvals),
            settings=NegotiationSettings(max_rounds, negotiation_time),
        )
        self._payments = Payments(party, store, receiver, self._sessions, self._bills, sender=payment_sender)
        self._events = EventWatch(
            party,
            store,
            receiver,
            self._sessions,
            retry=retry,
            failure_limit=watch_failure_limit,
            max_stored_events=max_stored_events,
        )

    async def close(self) -> None:
        """Close every biller channel (running watches end). The store is the caller's to close."""
        await self._sessions.close()

    async def __aenter__(self) -> ConsumerAgent:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # === Links and enrolment (§6) ==================================================================

    async def enrol(
        self,
        target: str,
        *,
        biller_party_id: str,
        fingerprint: bytes,
        account_id: str,
        code: str,
        tls: ClientTls | None = None,
        insecure: bool = False,
    ) -> BillerLink:
        """Enrol on an account with the material the biller gave out of band (§6.1) and pin the biller.

        `target` is the biller's endpoint ("host:port"); TLS unless `insecure`
        (loopback only, TRN-3). The biller's Hello must name the party and
        fingerprint given (VER-4), and its key set chain must start at
        `fingerprint` (KEY-12, ENR-10) before anything in the answer is trusted.
        Nothing is stored unless everything verifies. Raises CallError with the
        biller's reason (ENROLMENT_CODE_INVALID...), RemoteProtocolError
        (PIN_MISMATCH...) for an answer that does not verify, ValueError for
        unusable input (a code that is not 12 Crockford base32 characters).
        """
        return await self._enrolment.enrol(
            target,
            biller_party_id=biller_party_id,
            fingerprint=fingerprint,
            account_id=account_id,
            code=code,
            tls=tls,
            insecure=insecure,
        )

    async def links(self) -> list[BillerLink]:
        """Every biller enrolled with, as stored."""
        return await self._enrolment.links()

    # === Bills (§7) =================================================================================

    async def bills(self, biller: str, *, account_id: str | None = None) -> list[ReceivedBill]:
        """The biller's bills for our accounts (or one), verified (BIL-3) and stored; oldest first.

        A bill that fails verification — not signed by the pinned biller, not for
        us, for another account, invalid — is logged and left out: it is never
        returned, stored or paid.
        """
        return await self._bills.fetch(biller, account_id)

    # === Negotiation (§9) ===========================================================================

    async def negotiate(self, biller: str, bill_id: str) -> NegotiationResult:
        """Negotiate on a bill until the thread ends, or resume the thread still open on it.

        The strategy makes the offers and answers; the mandate decides what needs
        the user's approval (NEG-20). Returns the result (see `NegotiationResult`).
        Raises CallError when the biller cannot be reached after the retries (the
        thread, stored, resumes on the next call), LocalProtocolError when the
        strategy's opening is not valid terms, LookupError for an unknown bill,
        ValueError when nothing is owed on the bill any more or a payment of it is in doubt.

        A new thread restates what is still owed (TRM-11): the strategy's context has
        the bill's facts with what we already paid of it (`owed`), so after a plan broke
        half paid its principal is the outstanding balance, never the whole amount due.
        """
        async with self._locks.hold(("negotiate", biller, bill_id)):
            return await self._negotiator.negotiate(biller, bill_id)

    async def negotiation(self, thread_id: bytes) -> NegotiationResult:
        """A thread's result as stored (LookupError if unknown)."""
        return await self._negotiator.result(thread_id)

    async def export_bundle(self, thread_id: bytes) -> Bundle:
        """The `parley-bundle/1` of an agreed thread (BND-7): both chains, the bill, the thread through
        the Accept. ValueError unless the thread is agreed."""
        return await self._negotiator.export_bundle(thread_id)

    async def committed(self, *, excluding: Iterable[tuple[str, str]] = ()) -> tuple[Instalment, ...]:
        """The payments already committed to: the unpaid instalments of every agreed arrangement
        still in force, with any biller, by date (what a strategy's cash-flow model subtracts). An
        arrangement the biller ended (ARRANGEMENT_BROKEN, RENEGOTIATION_OFFERED) commits nothing any
        more: its instalments are not paid (PAY-16).

        Only the latest agreement on a bill counts: a bill is negotiated again only once the biller
        ended its arrangement and offered renegotiation (NEG-3, EVT-7), so a later agreement replaces
        the earlier one. `excluding` lists (biller, bill id) pairs to leave out: bills about to be
        negotiated again, whose new arrangements will replace the old.
        """
        return await committed_instalments(self._store, excluding=excluding)

    async def owed(self, biller: str, bill_id: str) -> BillFacts:
        """A verified bill's facts with what our bank already paid of it (`received_minor`): `outstanding` is
        its outstanding balance (PAY-16) — the amount due less every payment of the bill we made, under any
        agreement or none. It is the principal `negotiate` restates on the bill (TRM-11) and, once the biller
        ended its arrangement, what `pay` pays. Computed from our own record only: a biller's event stating
        more is never taken for it (EVT-8). ValueError when nothing is owed any more, or while a payment of
        the bill is in doubt; LookupError for a bill never verified."""
        session = await self._sessions.get(biller)
        return await owed_facts(self._store, await self._bills.get(session, bill_id))

    # === Payments (§10) =============================================================================

    async def pay(self, biller: str, bill_id: str, *, instalment_index: int | None = None) -> Payment:
        """Pay a bill, or one instalment of its agreement, through the `PaymentSender`, at most once.

        Under an agreement on the bill, `instalment_index` (zero-based) defaults to
        the first instalment not yet paid; without one, the bill's amount due is
        paid (index 0). Once the biller ended the arrangement (an ARRANGEMENT_BROKEN or
        RENEGOTIATION_OFFERED event naming it, taken by `watch`), its instalments are
        not paid any more: the bill's outstanding balance is (PAY-16), without
        agreement. The intent is stored before it is sent, so calling `pay` again
        — after a failure, a crash or a success — continues the same intent and
        never pays twice (PAY-2, PAY-7) — except that instructions whose
        pay_by_time passed before they were handed to the bank lapse (kept, never
        paid) and the payment gets a new intent in the same call (PAY-17). Raises PaymentRefused (PAY-8),
        PaymentInDoubt (this or an earlier hand-over to the bank failed without saying whether it paid: the
        `PaymentSender` raised anything but PaymentNotSent, its error chained as `__cause__`), CallError
        (the biller refused the intent or could not be reached), LookupError for a
        bill never verified, ValueError for an instalment that does not exist.
        """
        self._payments.require_sender()
        async with self._locks.hold(("pay", biller, bill_id)):
            return await self._payments.pay(biller, bill_id, instalment_index)

    async def payments(self, biller: str | None = None) -> list[Payment]:
        """Every payment intent (of one biller, or all), oldest first."""
        return await self._payments.payments(biller)

    async def resolve_payment(self, biller: str, intent_id: str, *, paid: bool, proof: str = "") -> Payment:
        """Settle an in-doubt payment once the bank said what happened: paid (with its proof) or not sent."""
        return await self._payments.resolve(biller, intent_id, paid=paid, proof=proof)

    async def set_aside_refused(self, biller: str, intent_id: str) -> Payment:
        """Release a payment from instructions this agent refused (PAY-8), on its user's word: the intent stays
        REFUSED, with the instructions kept as evidence, and the next `pay` of the same payment starts a new intent.

        A refused intent otherwise holds its payment for good, since the bot never decides alone that a biller's
        unverifiable instructions were a passing fault. The biller may refuse the new intent with
        PAYMENT_IN_PROGRESS until the refused instructions' pay_by_time passes (PAY-14); `pay` then fails with that
        CallError and is tried again later. Setting aside an intent already set aside changes nothing. LookupError
        for an unknown intent, ValueError for one that is not REFUSED.
        """
        return await self._payments.set_aside(biller, intent_id)

    async def receipt(self, biller: str, intent_id: str) -> PaymentReceipt | None:
        """The verified receipt of a payment, or None while the biller has not seen it settle (PAY-5).

        The receipt must be signed by the pinned biller and chain to the
        instructions (PAY-9); one whose amount differs from the instructed amount
        is stored and raised as PaymentDispute.
        """
        return await self._payments.receipt(biller, intent_id)

    # === Events (§11) ===============================================================================

    def watch(self, biller: str, *, account_id: str | None = None) -> AsyncGenerator[AccountEvent, None]:
        """The account's verified events, from the stored cursor on, then live (EVT-5).

        Each event is verified (signature, recipient, the account's log id, next
        sequence, chained to the last event) and stored with the cursor in one
        transaction before it is yielded, so across reconnections and restarts
        none is lost and none is yielded twice. Duplicates are dropped; a gap, a
        broken chain, a bad event or a transport failure closes the stream and
        resumes from the cursor with backoff. Raises EventLogForked on two
        different events at one sequence, EventLogFull when the log would pass
        `max_stored_events` (nothing past it is stored), the error of the last bad event after
        `watch_failure_limit` in a row, and CallError for a permanent refusal
        (CURSOR_OUT_OF_RANGE: the biller's log is shorter than what it served
        before). `account_id` may be left out when the biller has one of our
        accounts. Use it inside `contextlib.aclosing(...)` so the stream closes
        when the loop ends.
        """
        return self._events.watch(biller, account_id)

    async def stored_events(self, biller: str, *, account_id: str | None = None, start: int = 0) -> list[AccountEvent]:
        """The events already taken from the account's log, from sequence `start`, in order."""
        return await self._events.stored(biller, account_id, start)


__all__ = ["ConsumerAgent"]
