"""A scripted hostile biller: the real `BillerAgent`, served behind a servicer that forges and observes.

The consumer conformance suite (`agent.conformance.consumer_cases`) starts one
`HostileBiller` per scenario: a real `BillerAgent` (its own SQLite file, the
system clock — the client under test runs in another process, on its own
clock) served in plaintext on a free 127.0.0.1 port by the shared
`agent.conformance.peers.HostileServicer`, with the `HostileBiller` as its
call observer, which

- **observes** every call the client makes (`HostileBiller.calls`: the RPC,
  the request, its signed payload parsed *without* verification, whether the
  biller answered it, and the answer as sent);
- **forges** what the biller sends when a scenario says so: `rewrite[rpc]`
  replaces an answer on its way out, `forgery` re-signs every biller message
  of an answer with another key (a stranger's key under the biller's keyid, a
  key the biller rotated out…), `event_copies` delivers each streamed event
  several times, `resend_last_event` starts each stream that resumes past
  sequence 0 with the event before its `start_sequence` again (delivery is at
  least once, EVT-9), and `on_enrolled` hooks run once the client has enrolled
  (issuing its bills, switching to a rolled-back key set…); `lose_answers`
  applies a call but loses its answer (UNAVAILABLE), `refuse` refuses a call
  with a spec error before the agent sees it; `instructions_payable_for`
  makes the instructions it issues meanwhile payable for that long only
  (signed and stored so, PAY-17);
- **plays the payment rail**: the client reports each payment it makes as one
  JSON line of `$PARLEY_STATE_DIR/bank-orders.jsonl` (docs/CONFORMANCE.md,
  "The client's bank"), and `settle_orders` records the settlement of every
  order that carries the `payment_reference` of instructions the biller
  issued, for the instructed amount (an order for another amount is not
  settled, PAY-6). It runs after each client run and before each
  `GetReceipt`, so a receipt exists as soon as the client has paid.

Nothing here is for production: the biller's messages are forged on purpose.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError, Message

from agent.biller import (
    BillerAgent,
    OfferContext,
)
from agent.biller.party import BillerParty
from agent.biller.payments import PaymentsPhase
from agent.clock import Clock, SystemClock
from agent.conformance.peers import (
    HostileServicer,
    PeerIdentity,
    PeerPolicy,
    PeerRail,
    Rewrite,
    reseal,
    resign,
    serve_on_loopback,
)
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, ProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.messages import PAYLOAD_TYPES
from agent.protocol.terms import AdvertisedOptions, DeferralOption, Money, Terms, TermsKind, build_terms
from agent.stores.base import BillRecord, PaymentContext
from agent.stores.biller_sqlite import SqliteBillerStore
from parley.v1 import biller_service_pb2 as pb
from parley.v1 import envelope_pb2, payment_pb2

BILLER_PARTY_ID = "biller:conformance.example"
CURRENCY = "EUR"
AMOUNT_DUE = Money.parse("120.00", CURRENCY)
DEFERRAL = DeferralOption(max_days=30, fee=Money.parse("5.00", CURRENCY))
BANK_FILE = "bank-orders.jsonl"
KEY_VALIDITY = timedelta(days=365)

EventDoctor = Callable[[envelope_pb2.Envelope], envelope_pb2.Envelope | None]
Hook = Callable[[], Awaitable[None]]


# --- The biller's identity, policy and rail -------------------------------------------------------------


def new_identity(party_id: str, now: datetime) -> PeerIdentity:
    """A fresh identity: key set version 1 listing one key, created two days ago."""
    return PeerIdentity.create(party_id, now, backdate=timedelta(days=2), validity=KEY_VALIDITY)


def rotated_identity(party_id: str, now: datetime) -> PeerIdentity:
    """K1 and K2 in version 1, K2 alone in version 2 with K1 revoked (see `PeerIdentity.rotated`)."""
    return PeerIdentity.rotated(party_id, now, validity=KEY_VALIDITY)


def _in_full(context: OfferContext) -> Terms:
    return build_terms(TermsKind.PAY_IN_FULL, context.bill.amount_due, [context.bill.due_date])


def conformance_policy() -> PeerPolicy:
    """Bills advertise a deferral of at most 30 days for a EUR 5.00 fee. An opening outside the options is
    countered once with the bill in full on its due date (so a client that opened outside can still agree);
    anything else is rejected."""
    return PeerPolicy(AdvertisedOptions(deferral=DEFERRAL), _in_full, counter_once=True)


CONFORMANCE_RAIL = PeerRail(payee_name="Conformance Biller Ltd", reference_prefix="CF", account="CF-0001")


# --- What the client did ------------------------------------------------------------------------------


def payload_of(envelope: envelope_pb2.Envelope) -> Message | None:
    """The envelope's payload parsed as its payloadType says, unverified (None if it does not parse)."""
    kind = PAYLOAD_TYPES.get(envelope.payload_type)
    if kind is None:
        return None
    try:
        return kind.FromString(envelope.payload)
    except DecodeError:
        return None


_SIGNED_FIELD = {
    "Enrol": "request",
    "ListBills": "query",
    "GetBill": "query",
    "Negotiate": "move",
    "GetThread": "query",
    "CreatePaymentIntent": "intent",
    "GetReceipt": "query",
    "WatchEvents": "query",
    "RequestErasure": "request",
    "PublishKeySet": "key_set",
}


@dataclass
class Call:
    """One call the client made: `payload` is its signed message parsed without verification."""

    rpc: str
    request: Message
    payload: Message | None
    number: int  # its place among every call the biller received, from 1
    run: int  # the client run it came in (0: between runs)
    known_events: int  # events the biller had streamed to the client before this call: sequences 0..known_events-1
    answered: bool = False
    answer: Message | None = None
    streamed: list[int] = field(default_factory=list)  # a WatchEvents call: the sequences sent on it, in order

    @property
    def envelope(self) -> envelope_pb2.Envelope | None:
        name = _SIGNED_FIELD.get(self.rpc)
        if name is None or not self.request.HasField(name):
            return None
        envelope: envelope_pb2.Envelope = getattr(self.request, name)
        return envelope


@dataclass(frozen=True)
class Instructed:
    """Instructions the biller issued (the true ones, as its store holds them)."""

    intent_id: str
    account_id: str
    bill_id: str
    amount: Money
    payment_reference: str
    payee_account: str = ""
    pay_by: datetime | None = None  # the instructions' pay_by_time (None: not known, in records made by hand)


@dataclass(frozen=True)
class BankOrder:
    """One line of the client's bank order file (`problem` says why a line could not be read)."""

    line: int
    payment_reference: str
    amount: Money | None
    bill_id: str = ""
    problem: str = ""
    payee_account: str = ""  # optional in the contract: judged when given

    def describe(self) -> str:
        what = str(self.amount) if self.amount is not None else "an unreadable amount"
        return f"{what} under reference {self.payment_reference!r}" if self.payment_reference else what


def read_bank_orders(path: Path) -> list[BankOrder]:
    """The orders of a bank order file, in order (an unreadable line is an order with a `problem`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as error:
        return [BankOrder(0, "", None, problem=f"the file cannot be read: {error}")]
    orders = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            orders.append(BankOrder(number, "", None, problem="not JSON"))
            continue
        if not isinstance(record, dict):
            orders.append(BankOrder(number, "", None, problem="not a JSON object"))
            continue
        reference = record.get("payment_reference")
        reference = reference if isinstance(reference, str) else ""
        bill_id = record.get("bill_id")
        bill_id = bill_id if isinstance(bill_id, str) else ""
        amount, problem = _order_amount(record.get("amount"), record.get("currency"))
        payee = record.get("payee_account")
        payee = payee if isinstance(payee, str) else ""
        orders.append(BankOrder(number, reference, amount, bill_id, problem, payee))
    return orders


def _order_amount(amount: object, currency: object) -> tuple[Money | None, str]:
    if not isinstance(amount, str) or not isinstance(currency, str):
        return None, "amount and currency must be strings"
    try:
        return Money.parse(amount, currency), ""
    except LocalProtocolError:
        return None, f"{amount!r} is not an amount in {currency!r}"


# --- Forging ------------------------------------------------------------------------------------------


@dataclass
class Forgery:
    """Re-sign the biller's messages in answers with `key` (under `keyid` if given) — those `only` selects.

    `delivered` counts the forged messages sent.
    """

    key: SigningKey
    keyid: str | None = None
    only: Callable[[envelope_pb2.Envelope], bool] = lambda envelope: True
    delivered: int = 0


# --- The biller ----------------------------------------------------------------------------------------


@dataclass
class HostileBiller:
    """A running scripted biller (see the module docstring). Scenarios set the hooks before the client runs."""

    agent: BillerAgent
    identity: PeerIdentity
    target: str
    account_id: str
    enrolment_code: str
    pinned_fingerprint: bytes  # what the client is told out of band
    bank_file: Path
    calls: list[Call] = field(default_factory=list)
    rewrite: dict[str, Rewrite] = field(default_factory=dict)  # (request, answer) -> the answer sent instead
    forgery: Forgery | None = None
    event_copies: int = 1
    resend_last_event: bool = False
    on_enrolled: list[Hook] = field(default_factory=list)
    enrolled_party: str = ""
    run: int = 0  # the client run under way (set by the scenario)
    instructed: dict[str, Instructed] = field(default_factory=dict)  # by payment_reference
    settled: dict[str, str] = field(default_factory=dict)  # payment_reference -> rail reference
    delivered_events: list[int] = field(default_factory=list)  # sequences streamed, in order, copies included
    bills: list[str] = field(default_factory=list)
    # Rewrites each streamed event (None drops it); the events after a rewritten one are re-chained onto it.
    event_doctor: EventDoctor | None = None
    _rechained: dict[bytes, bytes] = field(default_factory=dict)  # an event's true digest -> the digest sent
    # The servicer in front of the agent: lost answers (`unavailable_after`) and refusals (`refuse_before`).
    servicer: HostileServicer | None = None
    # While set, instructions are payable for this long only, and the biller stores them so: once that time has
    # passed they have lapsed, and PAY-14 lets it instruct a new intent for the same payment (PAY-17).
    instructions_payable_for: timedelta | None = None
    _sent_events: dict[int, Message] = field(default_factory=dict)  # by sequence, as last sent

    @property
    def party_id(self) -> str:
        return self.agent.party_id

    def record(self, rpc: str, request: Message) -> Call:
        call = Call(rpc, request, None, len(self.calls) + 1, self.run, max(self.delivered_events, default=-1) + 1)
        envelope = call.envelope
        call.payload = payload_of(envelope) if envelope is not None else None
        self.calls.append(call)
        return call

    def calls_of(self, *rpcs: str) -> list[Call]:
        return [call for call in self.calls if call.rpc in rpcs]

    def lose_answers(self, rpc: str, count: int = 1) -> None:
        """The next `count` calls of `rpc` take effect, but their answers are lost: UNAVAILABLE instead."""
        assert self.servicer is not None
        self.servicer.unavailable_after[rpc] += count

    def answer_again(self, rpc: str) -> None:
        """Calls of `rpc` are answered again: the answers `lose_answers` still had to lose are not lost."""
        assert self.servicer is not None
        self.servicer.unavailable_after[rpc] = 0

    def refuse(self, rpc: str, *errors: ProtocolError) -> None:
        """The next calls of `rpc` are refused with `errors`, one each, before the agent sees them."""
        assert self.servicer is not None
        self.servicer.refuse_before.setdefault(rpc, []).extend(errors)

    # --- Fixtures ------------------------------------------------------------------------------------

    async def issue_bill(
        self,
        amount: Money = AMOUNT_DUE,
        description: str = "Electricity, conformance scenario",
        options: AdvertisedOptions | None = None,
    ) -> str:
        """A bill on the account, due today (the biller's clock), advertising `options` (default: the policy's)."""
        bill_id = await self.agent.issue_bill(self.account_id, amount, self.today(), description, options=options)
        self.bills.append(bill_id)
        return bill_id

    def today(self) -> date:
        """Today (UTC) by the biller's clock: the day its bills fall due, and the day a run pays for."""
        return self.agent.clock.now().date()

    async def agreement_on(self, bill_id: str) -> Terms | None:
        """The terms of the latest agreement on the bill, as the biller recorded it, or None."""
        arrangements = await self.agent.arrangements(self.account_id, active_only=False)
        agreed = [arrangement.terms for arrangement in arrangements if arrangement.bill_id == bill_id]
        return agreed[-1] if agreed else None

    async def bill_envelope(self, bill_id: str) -> envelope_pb2.Envelope:
        record = await self.agent._store.get_bill(bill_id)
        if record is None:
            raise LookupError(f"no bill {bill_id!r}")
        return envelope_pb2.Envelope.FromString(record.envelope)

    # --- The rail -------------------------------------------------------------------------------------

    def orders(self) -> list[BankOrder]:
        """The client's bank orders so far."""
        return read_bank_orders(self.bank_file)

    def bill_of(self, order: BankOrder) -> str:
        """The bill an order pays: by the instructions its reference names, else as the order says."""
        instructed = self.instructed.get(order.payment_reference)
        return instructed.bill_id if instructed is not None else order.bill_id

    async def settle_orders(self) -> int:
        """Settle every order carrying a reference the biller issued, at the instructed amount; how many now."""
        count = 0
        for order in self.orders():
            instructed = self.instructed.get(order.payment_reference)
            if instructed is None or order.payment_reference in self.settled or order.amount != instructed.amount:
                continue  # unknown reference, done already, or another amount: no receipt (PAY-6)
            rail_reference = f"RAIL-{len(self.settled) + 1:04d}"
            with contextlib.suppress(ValueError, LookupError):
                await self.agent.record_settlement(
                    instructed.account_id, instructed.intent_id, instructed.amount, rail_reference
                )
                self.settled[order.payment_reference] = rail_reference
                count += 1
        return count

    # --- What the servicer shows it (`CallObserver`) ----------------------------------------------------

    async def received(self, rpc: str, request: Any) -> None:
        self.record(rpc, request)
        if rpc == "GetReceipt":
            await self.settle_orders()  # the rail: a payment the client made settles at once

    async def answered(self, rpc: str, request: Any, answer: Any) -> None:
        self._call_of(request).answered = True
        if rpc == "Enrol":
            await self._enrolled(request)
        elif rpc == "CreatePaymentIntent":
            self._instructed(answer, request)

    async def sending(self, rpc: str, request: Any, answer: Any) -> Any:
        forged = self.forged(rpc, answer)
        self._call_of(request).answer = forged
        return forged

    def streamed(self, request: pb.WatchEventsRequest, response: pb.WatchEventsResponse) -> list[Any]:
        call = self._call_of(request)
        call.answered = True
        if self.event_doctor is not None:
            doctored = self._doctored_event(response.event)
            if doctored is None:
                return []
            response = pb.WatchEventsResponse(event=doctored)
        event = payload_of(response.event)
        sequence = getattr(getattr(event, "header", None), "sequence", -1)
        forged = self.forged("WatchEvents", response)
        copies = max(1, self.event_copies)
        sent = [(sequence, forged)] * copies
        resumed_at = getattr(call.payload, "start_sequence", 0)
        if self.resend_last_event and not call.streamed and resumed_at - 1 in self._sent_events:
            sent.insert(0, (resumed_at - 1, self._sent_events[resumed_at - 1]))  # the copy comes first
        self._sent_events[sequence] = forged
        self.delivered_events.extend(number for number, _ in sent)
        call.streamed.extend(number for number, _ in sent)
        return [answer for _, answer in sent]

    def _doctored_event(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope | None:
        """The event as `event_doctor` rewrites it, chained to the events as sent before it (the same bytes on
        every stream: signatures are deterministic); None when it is dropped, which leaves a gap."""
        assert self.event_doctor is not None
        true_digest = digest(envelope)
        sent = envelope
        event = payload_of(envelope)
        previous = getattr(getattr(event, "header", None), "previous_digest", b"")
        if previous in self._rechained:
            replacement = self._rechained[previous]

            def chain(message: Any) -> None:
                message.header.previous_digest = replacement

            sent = reseal(envelope, self.identity.key, chain)
        doctored = self.event_doctor(sent)
        if doctored is not None and digest(doctored) != true_digest:
            self._rechained[true_digest] = digest(doctored)
        return doctored

    def _call_of(self, request: Message) -> Call:
        return next(call for call in reversed(self.calls) if call.request is request)

    async def _enrolled(self, request: pb.EnrolRequest) -> None:
        if self.enrolled_party:
            return
        payload = payload_of(request.request)
        self.enrolled_party = getattr(getattr(payload, "header", None), "sender", "") or "?"
        for hook in self.on_enrolled:
            await hook()

    def _instructed(self, answer: pb.CreatePaymentIntentResponse, request: pb.CreatePaymentIntentRequest) -> None:
        body = payload_of(answer.instructions)
        intent = payload_of(request.intent)
        if body is None or intent is None:
            return
        reference = getattr(body, "payment_reference", "")
        self.instructed.setdefault(
            reference,
            Instructed(
                intent_id=getattr(intent, "intent_id", ""),
                account_id=getattr(intent, "account_id", ""),
                bill_id=getattr(intent, "bill_id", ""),
                amount=Money.from_proto(getattr(body, "amount")),  # noqa: B009 - a parsed message of any type
                payment_reference=reference,
                payee_account=getattr(body, "payee_account", ""),
                pay_by=getattr(body, "pay_by_time").ToDatetime(tzinfo=UTC),  # noqa: B009 - as for the amount
            ),
        )

    def _forge(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        """The envelope, re-signed by the forgery if it is the biller's and selected."""
        forgery = self.forgery
        if forgery is None or not envelope.signatures or envelope.signatures[0].keyid != self.identity.key.keyid:
            return envelope
        if not forgery.only(envelope):
            return envelope
        forgery.delivered += 1
        return resign(envelope, forgery.key, keyid=forgery.keyid)

    def forged(self, rpc: str, answer: Message) -> Message:
        """The answer with every biller message the forgery selects re-signed (key sets untouched)."""
        if self.forgery is None:
            return answer
        if isinstance(answer, pb.ListBillsResponse):
            return pb.ListBillsResponse(bills=[self._forge(bill) for bill in answer.bills])
        if isinstance(answer, pb.GetBillResponse):
            return pb.GetBillResponse(bill=self._forge(answer.bill))
        if isinstance(answer, pb.NegotiateResponse) and answer.HasField("reply"):
            return pb.NegotiateResponse(reply=self._forge(answer.reply), outcome=answer.outcome)
        if isinstance(answer, pb.GetThreadResponse):
            return pb.GetThreadResponse(
                messages=[self._forge(message) for message in answer.messages], outcome=answer.outcome
            )
        if isinstance(answer, pb.CreatePaymentIntentResponse):
            return pb.CreatePaymentIntentResponse(instructions=self._forge(answer.instructions))
        if isinstance(answer, pb.GetReceiptResponse):
            return pb.GetReceiptResponse(receipt=self._forge(answer.receipt))
        if isinstance(answer, pb.WatchEventsResponse):
            return pb.WatchEventsResponse(event=self._forge(answer.event))
        return answer


class _ShortLivedInstructions(PaymentsPhase):
    """The reference biller's payments phase, whose instructions' pay_by_time is at most
    `HostileBiller.instructions_payable_for` away while a scenario sets it (and as the reference's otherwise)."""

    def __init__(self, party: BillerParty, biller: HostileBiller) -> None:
        super().__init__(party)
        self._biller = biller

    # An instance method where the reference has a static one: the phase calls it as `self.amount_owed`.
    def amount_owed(  # type: ignore[override]
        self, intent: payment_pb2.PaymentIntent, bill: BillRecord, context: PaymentContext, now: datetime
    ) -> tuple[Money, datetime]:
        owed, pay_by = PaymentsPhase.amount_owed(intent, bill, context, now)
        lifetime = self._biller.instructions_payable_for
        return owed, pay_by if lifetime is None else min(pay_by, now + lifetime)


@asynccontextmanager
async def hostile_biller(
    state_dir: Path,
    bank_file: Path,
    *,
    identity: PeerIdentity | None = None,
    pinned_fingerprint: bytes | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[HostileBiller]:
    """A scripted biller on a free 127.0.0.1 port (plaintext: loopback only), with one test account and its
    one-time enrolment code; stopped, with its store closed, on exit.

    `identity` is who the biller really is (default: a fresh one); `pinned_fingerprint` what the client is
    told out of band (default: the identity's own fingerprint — another one plays an impostor).
    """
    clock = clock or SystemClock()
    identity = identity or new_identity(BILLER_PARTY_ID, clock.now())
    state_dir.mkdir(parents=True, exist_ok=True)
    store = await SqliteBillerStore.open(state_dir / "biller.sqlite")
    try:
        agent = BillerAgent(
            party_id=identity.chain.party_id,
            signing_key=identity.key,
            key_sets=identity.chain,
            store=store,
            policy=conformance_policy(),
            rail=CONFORMANCE_RAIL,
            clock=clock,
            watch_poll_interval=timedelta(seconds=0.2),
        )
        account_id = f"acct-{secrets.token_hex(4)}"
        await agent.create_account(account_id, "Conformance Household")
        code = await agent.issue_enrolment_code(account_id)
        biller = HostileBiller(
            agent=agent,
            identity=identity,
            target="",
            account_id=account_id,
            enrolment_code=code,
            pinned_fingerprint=pinned_fingerprint or identity.fingerprint,
            bank_file=bank_file,
        )
        agent.party.payments = _ShortLivedInstructions(agent.party, biller)  # the party's phases are replaceable
        servicer = HostileServicer(agent, observer=biller)
        servicer.rewrite = biller.rewrite  # scenarios script the answers through the biller
        biller.servicer = servicer
        server, port = await serve_on_loopback(servicer)
        biller.target = f"127.0.0.1:{port}"
        try:
            yield biller
        finally:
            servicer.end_watches()
            await server.stop(None)
    finally:
        await store.close()


__all__ = [
    "AMOUNT_DUE",
    "BANK_FILE",
    "BILLER_PARTY_ID",
    "CONFORMANCE_RAIL",
    "CURRENCY",
    "BankOrder",
    "Call",
    "Forgery",
    "HostileBiller",
    "Instructed",
    "conformance_policy",
    "hostile_biller",
    "new_identity",
    "payload_of",
    "read_bank_orders",
    "rotated_identity",
]
