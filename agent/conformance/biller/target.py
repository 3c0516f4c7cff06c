"""What every biller case works with: the target, its fixtures, the suite's customers and bills, calls and checks.

Split out of the section modules so that each holds only its cases; see `agent.conformance.biller` for the order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.message import Message

from agent.conformance.client import Answer, Connection, EventStream, Refusal
from agent.conformance.peers import SignedParty, event_log_id
from agent.conformance.runner import Case, Level, Skip, TargetUnreachable, Violation
from agent.protocol.dsse import envelope_from_json
from agent.protocol.errors import ProtocolError, Reason
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import DEFAULT_LIMITS, PROTOCOL_VERSION
from agent.protocol.messages import PAYLOAD_TYPES, Verified, open_envelope
from agent.transport.client import ClientTls
from agent.transport.diagnosis import connection_hint
from agent.vectors import load as load_vectors
from parley.v1 import account_pb2, bill_pb2, biller_service_pb2, envelope_pb2, event_pb2, negotiation_pb2, terms_pb2
from parley.v1 import conformance_control_service_pb2 as cc

FIXTURES = "fixtures"  # a `needs` tag: the case needs ConformanceControlService (§16)
CONFORMANCE_FEATURE = "conformance-control"
NO_FIXTURES = "conformance-control not announced"  # CNF-5's wording
CLIENT_NAME = "parley-conformance/0.1.0"
CURRENCY = "EUR"
AMOUNT_DUE = 12_000  # EUR 120.00, in minor units
DEFERRAL_FEE = 500  # EUR 5.00
DEFERRAL_DAYS = 30
INSIDE_DAYS = 20  # a deferral inside the advertised options
OUTSIDE_DAYS = 45  # one outside them (> DEFERRAL_DAYS)
DUE_IN_DAYS = 30  # test bills fall due this many days after the biller's today
NEGOTIATION_TYPES = tuple(
    PAYLOAD_TYPES[name]
    for name in (
        "parley.v1.ThreadOpen",
        "parley.v1.Offer",
        "parley.v1.Accept",
        "parley.v1.Reject",
        "parley.v1.Withdraw",
    )
)
OUTCOME = negotiation_pb2.NegotiationOutcome
EVENT_WAIT = 20.0  # seconds to wait for an event that must come (well within the case timeout)


# --- The target ------------------------------------------------------------------------------------


@dataclass
class Customer:
    """A consumer party of the suite, enrolled on a test account of the target."""

    party: SignedParty
    account_id: str
    confirmation: biller_service_pb2.EnrolResponse | None = None

    @property
    def party_id(self) -> str:
        return self.party.party_id


@dataclass(frozen=True)
class IssuedBill:
    """A bill issued through IssueTestBill and fetched back with GetBill."""

    bill_id: str
    envelope: envelope_pb2.Envelope
    digest: bytes
    bill: bill_pb2.Bill
    issue_date: date
    due_date: date


@dataclass(frozen=True)
class ConnectionBounds:
    """The target's connection bounds as the operator tells them (`--idle-timeout`, `--max-connections-per-address`,
    `--handshake-timeout`, `--max-connections`): no message announces them, so without them the cases of TRN-10 and
    TRN-11 that need them are skipped."""

    idle_timeout: float | None = None  # seconds a connection with no call in flight lives (TRN-10)
    max_per_address: int | None = None  # connections one peer address may hold (TRN-11)
    handshake_timeout: float | None = None  # seconds a connection has to finish its TLS and HTTP/2 handshakes (TRN-10)
    max_connections: int | None = None  # connections the target holds in all (TRN-10)


@dataclass
class BillerTarget:
    """What every case works with: the connection, what Hello announced, and the biller's clock.

    `now()` is the biller's time as the suite knows it (CNF-4: after AdvanceClock
    the suite signs at the biller's returned `now`).
    """

    target: str
    conn: Connection
    hello: biller_service_pb2.HelloResponse
    key_sets: list[envelope_pb2.Envelope]
    chain: KeyChain | None
    chain_error: str = ""
    offset: timedelta = timedelta(0)
    features: frozenset[str] = field(default_factory=frozenset)
    tls: ClientTls | None = None  # None: plaintext (--insecure)
    bounds: ConnectionBounds = ConnectionBounds()

    @property
    def biller_id(self) -> str:
        return self.hello.biller_party_id

    @property
    def limits(self) -> biller_service_pb2.Limits:
        return self.hello.limits

    @property
    def skew(self) -> timedelta:
        seconds = self.limits.max_clock_skew_seconds
        return timedelta(seconds=seconds) if seconds else DEFAULT_LIMITS.max_clock_skew

    @property
    def max_lifetime(self) -> timedelta:
        seconds = self.limits.max_message_lifetime_seconds
        return timedelta(seconds=seconds) if seconds else DEFAULT_LIMITS.max_message_lifetime

    @property
    def fixtures(self) -> bool:
        return CONFORMANCE_FEATURE in self.features

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def today(self) -> date:
        return self.now().date()

    def biller_chain(self) -> KeyChain:
        if self.chain is None:
            raise Violation(
                f"the biller's key set chain is unusable, so its answers cannot be verified: {self.chain_error}"
            )
        return self.chain

    # --- fixtures (§16) ---

    async def resync(self) -> None:
        """The suite's recovery after a stopped case (`Suite.recover`): read the biller's clock again.

        A case stopped at its timeout may have been cancelled after the biller applied its
        AdvanceClock, before the suite read the answer; every later case would then sign at a
        time behind the biller's and be refused MESSAGE_EXPIRED. AdvanceClock(0) is refused
        (CNF-4 asks for a positive step), so this moves the clock by one second.
        """
        if self.fixtures:
            await self.advance_clock(1)

    async def advance_clock(self, seconds: int) -> datetime:
        """AdvanceClock, then sign at the biller's returned time."""
        answer = await self.conn.advance_clock(seconds)
        setup(answer, f"AdvanceClock({seconds})")
        now: datetime = answer.now.ToDatetime(tzinfo=UTC)
        self.offset = now - datetime.now(UTC)
        return now

    async def new_account(self) -> cc.CreateTestAccountResponse:
        answer = await self.conn.create_test_account("Parley conformance")
        setup(answer, "CreateTestAccount")
        response: cc.CreateTestAccountResponse = answer
        return response

    async def new_code(self, account_id: str) -> str:
        """IssueTestEnrolmentCode: a second code for an account (a re-enrolment, ENR-12); Skip if the target's
        conformance control predates that call (UNIMPLEMENTED)."""
        answer = await self.conn.issue_test_enrolment_code(account_id)
        if isinstance(answer, Refusal) and answer.code is grpc.StatusCode.UNIMPLEMENTED and not answer.infos:
            raise Skip("conformance control does not implement IssueTestEnrolmentCode (CNF-4)")
        setup(answer, "IssueTestEnrolmentCode")
        code: str = answer.enrolment_code
        return code

    def new_party(self, **options: Any) -> SignedParty:
        return SignedParty.create(self.biller_id, clock=self.now, **options)

    async def enrolled(self, party: SignedParty | None = None) -> Customer:
        """A fresh test account with `party` (default: a new one) enrolled on it."""
        account = await self.new_account()
        party = party or self.new_party()
        answer = await self.conn.call(
            "Enrol",
            biller_service_pb2.EnrolRequest(request=party.enrolment(account.account_id, account.enrolment_code)),
        )
        setup(answer, "Enrol with a fresh test account's code")
        return Customer(party, account.account_id, answer)

    async def issue_bill(
        self,
        customer: Customer,
        *,
        amount: int = AMOUNT_DUE,
        due_in_days: int = DUE_IN_DAYS,
        options: bill_pb2.AdvertisedOptions | None = None,
    ) -> IssuedBill:
        """IssueTestBill with the standard options (a deferral, and instalments when announced), then GetBill."""
        due = self.today() + timedelta(days=due_in_days)
        answer = await self.conn.issue_test_bill(
            customer.account_id, money(amount), due.isoformat(), options or self.standard_options()
        )
        setup(answer, "IssueTestBill")
        bill_id = answer.bill_id
        fetched = await self.conn.call(
            "GetBill",
            biller_service_pb2.GetBillRequest(query=customer.party.query(customer.account_id, bill_id=bill_id)),
        )
        setup(fetched, f"GetBill({bill_id!r}) on the customer's own account")
        envelope: envelope_pb2.Envelope = fetched.bill
        bill = bill_pb2.Bill.FromString(
            self.verify(envelope, (bill_pb2.Bill,), customer, live=False, what="the bill").envelope.payload
        )
        return IssuedBill(
            bill_id,
            envelope,
            digest_of(envelope),
            bill,
            date.fromisoformat(bill.issue_date),
            date.fromisoformat(bill.due_date),
        )

    def standard_options(self) -> bill_pb2.AdvertisedOptions:
        options = bill_pb2.AdvertisedOptions(
            deferral=bill_pb2.DeferralOption(max_days=DEFERRAL_DAYS, fee=money(DEFERRAL_FEE))
        )
        if "instalments" in self.features:
            options.instalments.CopyFrom(
                bill_pb2.InstalmentOption(
                    max_count=6,
                    min_amount=money(2_000),
                    min_interval_days=14,
                    max_interval_days=35,
                    max_first_delay_days=30,
                )
            )
        return options

    # --- verifying what the biller signs ---

    def verify(
        self,
        envelope: envelope_pb2.Envelope,
        types: tuple[type[Message], ...],
        customer: Customer,
        *,
        live: bool,
        what: str,
    ) -> Verified[Message]:
        """Open a biller message addressed to `customer` with the biller's chain (§3.8); Violation if it fails.

        Live replies are judged at the biller's `now`; stored answers (bills, events,
        receipts, retried answers) skip the window checks (§1.6).
        """
        chain = self.biller_chain()
        try:
            return open_envelope(
                envelope, types, sender_keys=chain, recipient=customer.party_id, now=self.now() if live else None
            )
        except ProtocolError as error:
            raise Violation(
                f"{what} signed by the biller does not verify: {error.reason.name}: {error.detail}"
            ) from error


def setup(answer: Answer, what: str) -> None:
    """A step the case builds on must succeed: a refusal is a failure of the target (with `what` in the detail)."""
    if isinstance(answer, Refusal):
        raise Violation(f"setup step failed: {what} was refused: {answer.describe()}")


def expect(answer: Answer, reason: Reason, what: str) -> Refusal:
    """`answer` must be a refusal whose one ErrorInfo (domain parley.v1) has `reason`."""
    if not isinstance(answer, Refusal):
        raise Violation(f"{what}: accepted, but must be refused with {reason.name}")
    if answer.reason != reason.name:
        raise Violation(f"{what}: refused with {answer.describe()}, but the reason must be {reason.name}")
    return answer


def accepted(answer: Answer, what: str) -> Any:
    """`answer` must not be a refusal."""
    if isinstance(answer, Refusal):
        raise Violation(f"{what}: refused with {answer.describe()}, but must be accepted")
    return answer


def digest_of(envelope: envelope_pb2.Envelope) -> bytes:
    """SHA-256 of the PAE (ENV-11), computed here from the envelope's bytes."""
    payload_type = envelope.payload_type.encode()
    pae = b"DSSEv1 %d %b %d %b" % (len(payload_type), payload_type, len(envelope.payload), envelope.payload)
    return hashlib.sha256(pae).digest()


def money(minor: int, currency: str = CURRENCY) -> terms_pb2.Money:
    return terms_pb2.Money(currency_code=currency, amount_minor=minor)


def terms(
    kind: int,
    schedule: Sequence[tuple[date | str, int]],
    *,
    principal: int = AMOUNT_DUE,
    lines: Sequence[tuple[int, int]] = (),
    total: int | None = None,
    currency: str = CURRENCY,
) -> terms_pb2.Terms:
    """Terms as a message, valid or not: `lines` are (LineKind, amount); `total` defaults to what adds up."""
    computed = principal + sum(
        amount if line_kind == terms_pb2.LINE_KIND_FEE else -amount for line_kind, amount in lines
    )
    return terms_pb2.Terms(
        kind=kind,  # type: ignore[arg-type]
        principal=money(principal, currency),
        lines=[
            terms_pb2.Line(kind=line_kind, description="conformance", amount=money(amount, currency))  # type: ignore[arg-type]
            for line_kind, amount in lines
        ],
        total=money(computed if total is None else total, currency),
        schedule=[
            terms_pb2.Instalment(
                due_date=day if isinstance(day, str) else day.isoformat(), amount=money(amount, currency)
            )
            for day, amount in schedule
        ],
    )


def deferral(bill: IssuedBill, days: int) -> terms_pb2.Terms:
    """One payment `days` after the due date, carrying the advertised deferral fee."""
    total = AMOUNT_DUE + DEFERRAL_FEE
    return terms(
        terms_pb2.TERMS_KIND_DEFERRAL,
        [(bill.due_date + timedelta(days=days), total)],
        lines=[(terms_pb2.LINE_KIND_FEE, DEFERRAL_FEE)],
    )


def inside_options(bill: IssuedBill) -> terms_pb2.Terms:
    """A deferral the standard options advertise: the biller must accept it at once (NEG-12)."""
    return deferral(bill, INSIDE_DAYS)


def outside_options(bill: IssuedBill) -> terms_pb2.Terms:
    """A valid deferral beyond the advertised maximum: the biller may answer it as it likes."""
    return deferral(bill, OUTSIDE_DAYS)


# --- Calls ---------------------------------------------------------------------------------------


async def list_bills(ctx: BillerTarget, query: envelope_pb2.Envelope) -> Answer:
    return await ctx.conn.call("ListBills", biller_service_pb2.ListBillsRequest(query=query))


async def get_bill(ctx: BillerTarget, query: envelope_pb2.Envelope) -> Answer:
    return await ctx.conn.call("GetBill", biller_service_pb2.GetBillRequest(query=query))


async def get_thread(ctx: BillerTarget, query: envelope_pb2.Envelope) -> Answer:
    return await ctx.conn.call("GetThread", biller_service_pb2.GetThreadRequest(query=query))


async def get_receipt(ctx: BillerTarget, query: envelope_pb2.Envelope) -> Answer:
    return await ctx.conn.call("GetReceipt", biller_service_pb2.GetReceiptRequest(query=query))


async def negotiate(ctx: BillerTarget, move: envelope_pb2.Envelope, disclosure: bytes = b"") -> Answer:
    return await ctx.conn.call("Negotiate", biller_service_pb2.NegotiateRequest(move=move, disclosure=disclosure))


async def pay(ctx: BillerTarget, intent: envelope_pb2.Envelope) -> Answer:
    return await ctx.conn.call("CreatePaymentIntent", biller_service_pb2.CreatePaymentIntentRequest(intent=intent))


async def publish(ctx: BillerTarget, key_set: envelope_pb2.Envelope) -> Answer:
    return await ctx.conn.call("PublishKeySet", biller_service_pb2.PublishKeySetRequest(key_set=key_set))


async def enrol(ctx: BillerTarget, request: envelope_pb2.Envelope) -> Answer:
    return await ctx.conn.call("Enrol", biller_service_pb2.EnrolRequest(request=request))


async def read_ok(ctx: BillerTarget, customer: Customer, **fields: Any) -> biller_service_pb2.ListBillsResponse:
    """A plain ListBills by `customer` on its own account, which must succeed (signed with `key=`/`header=`)."""
    answer = await list_bills(ctx, customer.party.query(customer.account_id, **fields))
    result: biller_service_pb2.ListBillsResponse = accepted(
        answer, "a well-formed ListBills on the signer's own account"
    )
    return result


async def thread_of(ctx: BillerTarget, customer: Customer, thread_id: bytes) -> biller_service_pb2.GetThreadResponse:
    """GetThread on the customer's own thread, which must succeed."""
    answer = await get_thread(ctx, customer.party.query(customer.account_id, thread_id=thread_id))
    setup(answer, "GetThread on the customer's own thread")
    response: biller_service_pb2.GetThreadResponse = answer
    return response


def thread_id_of(opening: envelope_pb2.Envelope) -> bytes:
    return negotiation_pb2.ThreadOpen.FromString(opening.payload).header.thread_id


async def open_thread(
    ctx: BillerTarget,
    customer: Customer,
    bill: IssuedBill,
    offer: terms_pb2.Terms,
    **options: Any,
) -> tuple[envelope_pb2.Envelope, Answer]:
    """Open a thread on `bill` with `offer` (ThreadOpen options as keyword arguments)."""
    opening = customer.party.open(bill.bill_id, bill.digest, offer, **options)
    return opening, await negotiate(ctx, opening)


async def agreed_thread(ctx: BillerTarget, customer: Customer, bill: IssuedBill) -> list[envelope_pb2.Envelope]:
    """A thread the biller agreed at once: an opening inside the options and its Accept."""
    opening, answer = await open_thread(ctx, customer, bill, inside_options(bill))
    setup(answer, "an opening inside the advertised options")
    if not answer.HasField("reply") or answer.reply.payload_type != "parley.v1.Accept":
        raise Violation(
            f"setup step failed: an opening inside the advertised options was answered with "
            f"{answer.reply.payload_type or 'no reply'}, not an Accept (NEG-12)"
        )
    return [opening, answer.reply]


async def countered_thread(
    ctx: BillerTarget, customer: Customer, bill: IssuedBill, *, max_rounds: int = 4, deadline: datetime | None = None
) -> list[envelope_pb2.Envelope]:
    """A thread where the biller countered an opening outside its options: the consumer is to move.

    Skip when the biller answers otherwise (it may Reject whatever is outside its
    options): the case then cannot reach the state it needs.
    """
    opening, answer = await open_thread(
        ctx, customer, bill, outside_options(bill), max_rounds=max_rounds, deadline=deadline
    )
    setup(answer, "an opening outside the advertised options")
    reply_type = answer.reply.payload_type if answer.HasField("reply") else "no reply"
    if reply_type != "parley.v1.Offer":
        raise Skip(
            f"the biller answered an opening outside its options with {reply_type}, not a counter-offer, "
            "so the consumer never gets to move in a thread"
        )
    reply = ctx.verify(answer.reply, NEGOTIATION_TYPES, customer, live=True, what="the counter-offer")
    if reply.header.sequence != 1 or reply.header.previous_digest != digest_of(opening):
        raise Violation("the counter-offer is not at sequence 1 chained to the opening (NEG-11, HDR-7)")
    return [opening, answer.reply]


async def first_event(stream: EventStream, what: str) -> envelope_pb2.Envelope:
    """The next event of an open stream, which must come."""
    try:
        event = await stream.next(EVENT_WAIT)
    except TimeoutError:
        raise Violation(f"{what}: no event arrived within {EVENT_WAIT:g} s") from None
    if event is None:
        raise Violation(f"{what}: the stream ended instead")
    if isinstance(event, Refusal):
        raise Violation(f"{what}: the stream failed with {event.describe()}")
    return event


async def read_events_until(
    stream: EventStream, customer: Customer, ctx: BillerTarget, wanted: set[str], first_sequence: int
) -> list[envelope_pb2.Envelope]:
    """Read events, checking order and chain from `first_sequence`, until BILL_ISSUED for every bill in `wanted`."""
    events: list[envelope_pb2.Envelope] = []
    waiting = set(wanted)
    log_id = event_log_id(ctx.biller_id, customer.account_id)
    while waiting:
        envelope = await first_event(stream, f"waiting for BILL_ISSUED of {sorted(waiting)}")
        event: Any = ctx.verify(envelope, (event_pb2.Event,), customer, live=False, what="an event").message
        expected = first_sequence + len(events)
        if event.header.sequence != expected:
            raise Violation(f"the stream delivered sequence {event.header.sequence} where {expected} was due (EVT-4)")
        if event.header.thread_id != log_id or event.account_id != customer.account_id:
            raise Violation("an event is not in the account's event log (thread_id, account_id; EVT-1)")
        if events and event.header.previous_digest != digest_of(events[-1]):
            raise Violation(f"event {expected} does not chain to the event before it (EVT-1)")
        if expected == 0 and event.header.previous_digest:
            raise Violation("event 0 carries a previous_digest (EVT-1)")
        if event.kind == event_pb2.EVENT_KIND_BILL_ISSUED:
            waiting.discard(event.bill_id)
        events.append(envelope)
    return events


# --- Connecting ----------------------------------------------------------------------------------


@asynccontextmanager
async def connect(
    target: str,
    *,
    tls: ClientTls | None = None,
    insecure: bool = False,
    call_timeout: float = 10.0,
    bounds: ConnectionBounds = ConnectionBounds(),
) -> AsyncIterator[BillerTarget]:
    """Hello, the biller's key set chain, and the biller's clock (when conformance control is offered)."""
    try:
        conn = Connection.open(target, tls=tls, insecure=insecure, call_timeout=call_timeout)
    except ValueError as error:
        raise TargetUnreachable(str(error)) from error
    try:
        hello = await conn.call(
            "Hello", biller_service_pb2.HelloRequest(protocol_versions=[PROTOCOL_VERSION], client_name=CLIENT_NAME)
        )
        if isinstance(hello, Refusal):
            hint = None
            if hello.unreachable:  # TLS against plaintext, a missing client certificate...: say which
                offered = tls is not None and tls.certificate_chain is not None
                hint = await asyncio.to_thread(
                    connection_hint, target, hello.message, insecure=insecure, client_certificate=offered
                )
            raise TargetUnreachable(f"Hello failed: {hello.describe()}" + (f"\nhint: {hint}" if hint else ""))
        conn.refusals.clear()
        context = BillerTarget(
            target,
            conn,
            hello,
            [],
            None,
            features=frozenset(hello.features),
            tls=None if insecure else tls or ClientTls(),
            bounds=bounds,
        )
        key_sets = await conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest())
        if isinstance(key_sets, Refusal):
            context.chain_error = f"GetKeySets was refused: {key_sets.describe()}"
        else:
            context.key_sets = list(key_sets.key_sets)
            try:
                context.chain = KeyChain.verify(context.key_sets, pin=hello.identity_fingerprint)
            except ProtocolError as error:
                context.chain_error = f"{error.reason.name}: {error.detail}"
        if context.fixtures:
            # Learn the biller's time (it may have been advanced before). A biller that refuses this
            # fails the cases that need its fixtures, one by one, rather than the whole run.
            with contextlib.suppress(Violation):
                await context.advance_clock(1)
        yield context
    finally:
        await conn.close()


def precheck(case: Case[BillerTarget], ctx: BillerTarget) -> str | None:
    """Skip a case whose fixtures or features the target does not announce (CNF-5, VER-3)."""
    if FIXTURES in case.needs and not ctx.fixtures:
        return NO_FIXTURES
    missing = [name for name in case.needs if name != FIXTURES and name not in ctx.features]
    if missing:
        return f"feature {', '.join(repr(m) for m in missing)} not announced in Hello"
    return None


MUST, SHOULD = Level.MUST, Level.SHOULD
NEG = ("negotiation", FIXTURES)


# --- Vectors ---------------------------------------------------------------------------------------

_VECTORS: dict[str, Any] = {}


def vector(case_id: str) -> envelope_pb2.Envelope:
    """The envelope of a message test vector (agent/data/vectors.json), as its bytes were generated."""
    if not _VECTORS:
        _VECTORS.update({case["id"]: case for case in load_vectors()["tests"]})
    return envelope_from_json(_VECTORS[case_id]["envelope"])


def query_envelope(customer: Customer, **fields: Any) -> envelope_pb2.Envelope:
    """A well-formed ListBills query by `customer` on its own account."""
    return customer.party.query(customer.account_id, **fields)


def sized_query(customer: Customer, size: int) -> envelope_pb2.Envelope:
    """A signed ListBills query padded (in `bill_id`) so that the serialized Envelope is exactly `size` bytes."""
    pad = max(0, size - query_envelope(customer).ByteSize())
    header = customer.party.header()
    for _ in range(8):
        query = account_pb2.AccountQuery(header=header, account_id=customer.account_id, bill_id="x" * pad)
        envelope = customer.party.sign(query)
        difference = size - envelope.ByteSize()
        if difference == 0:
            return envelope
        pad = max(0, pad + difference)
    raise RuntimeError(f"cannot pad an envelope to exactly {size} bytes")


def hello_request(*versions: int) -> biller_service_pb2.HelloRequest:
    return biller_service_pb2.HelloRequest(protocol_versions=list(versions), client_name=CLIENT_NAME)


# --- Checks several sections share -----------------------------------------------------------------


def outcome_name(response: Any) -> str:
    return str(OUTCOME.Name(response.outcome))


async def thread_unchanged(
    ctx: BillerTarget, customer: Customer, thread: list[envelope_pb2.Envelope], outcome: int
) -> None:
    """GetThread still holds exactly `thread`, with `outcome` (a refused move changes nothing, §9.5)."""
    stored = await thread_of(ctx, customer, thread_id_of(thread[0]))
    if [m.SerializeToString() for m in stored.messages] != [m.SerializeToString() for m in thread]:
        raise Violation(f"the thread changed: GetThread holds {len(stored.messages)} messages, expected {len(thread)}")
    if stored.outcome != outcome:
        raise Violation(f"the thread is {outcome_name(stored)}, expected {OUTCOME.Name(outcome)}")  # type: ignore[arg-type]


def payment_intent(
    customer: Customer, bill: IssuedBill, intent_id: str, amount: int = AMOUNT_DUE, **options: Any
) -> Any:
    return customer.party.intent(customer.account_id, bill.bill_id, intent_id, money(amount), **options)
