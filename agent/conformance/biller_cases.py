"""The biller-side conformance suite: `parley conformance biller --target HOST:PORT`.

Every case checks one requirement of docs/PROTOCOL.md that a client can
observe over the wire, and is named after it (`ENV-3/bad-signature`). The
suite plays hostile and honest consumers (`agent.conformance.client`): it
enrols them on test accounts, has bills issued, negotiates, pays and watches
events, breaking exactly one rule at a time and checking the biller's answer —
the reason of the one `ErrorInfo` of a refusal (§13), the signed reply, and
that a refused request changed nothing.

Fixtures come from the target's `ConformanceControlService` (§16): cases
that need them (tag `fixtures`) are skipped with "conformance-control not
announced" when Hello does not announce it (CNF-5); cases that need an
optional feature ("negotiation", "events", "erasure", "instalments",
"hardship") are skipped when Hello does not announce it (VER-3).

Cases run one after the other, in registration order; the cases that move the
biller's clock come last. Every case works on its own fresh accounts, so the
cases are independent and any subset can be run (`--only`, `--skip`).

The envelope test vectors (docs/VECTORS.md) are delivered over the wire where
the biller's verdict does not depend on whom they were signed by — the form
and size checks that come before any key lookup (vectors `two-signatures`,
`no-signature`, `envelope-too-large`, `payload-type-not-for-call`) and the
vector signed by a key no enrolled party has (`unknown-key`, refused
`NOT_ENROLLED` by a biller, AUZ-2). The other envelope vectors are signed by
test keys the target has never enrolled, so their defects are reproduced on
messages signed by an enrolled party of the suite (`client.flip_signature`,
…), each case naming the vector it mirrors.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from google.protobuf.message import Message

from agent.conformance.client import (
    LIBRARY_CODES,
    UNKNOWN_FIELD,
    Answer,
    Connection,
    EventStream,
    KeySpec,
    Refusal,
    SignedParty,
    build_key_set,
    disclosure_bytes,
    duplicate_signature,
    event_log_id,
    flip_payload,
    flip_signature,
    sign_payload_not_pae,
    sign_wrong_pae_length,
    strip_signatures,
    swap_payload_type,
    truncated,
    with_unknown_field,
)
from agent.conformance.runner import Case, Level, Skip, Suite, TargetUnreachable, Violation
from agent.protocol.dsse import envelope_from_json
from agent.protocol.errors import ERROR_DOMAIN, ProtocolError, Reason
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import DEFAULT_LIMITS, PROTOCOL_VERSION
from agent.protocol.messages import PAYLOAD_TYPES, Verified, encode_varint, open_envelope
from agent.transport.client import ClientTls
from agent.vectors import load as load_vectors
from parley.v1 import (
    account_pb2,
    bill_pb2,
    biller_service_pb2,
    enrolment_pb2,
    envelope_pb2,
    event_pb2,
    negotiation_pb2,
    payment_pb2,
    terms_pb2,
)
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


# --- Connecting ----------------------------------------------------------------------------------


@asynccontextmanager
async def connect(
    target: str, *, tls: ClientTls | None = None, insecure: bool = False, call_timeout: float = 10.0
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
            raise TargetUnreachable(f"Hello failed: {hello.describe()}")
        conn.refusals.clear()
        context = BillerTarget(target, conn, hello, [], None, features=frozenset(hello.features))
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


suite: Suite[BillerTarget] = Suite("biller", precheck=precheck)
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


# === Hello, limits, key sets (§15, §14, §4.6) =========================================================


@suite.case(
    "VER-2/hello",
    description="Hello answers the highest common version, the biller's identity, features and limits",
    quote="the biller MUST answer with the highest version both speak in `protocol_version`, every version it "
    "speaks in `supported_versions`, its `biller_party_id`, its `identity_fingerprint` (the digest of its key set "
    "version 1, KEY-12), its `features` and its `limits` (LIM-10)",
)
async def hello_answer(ctx: BillerTarget) -> str:
    answer = accepted(await ctx.conn.call("Hello", hello_request(PROTOCOL_VERSION, 7, 99)), "Hello([1, 7, 99])")
    if answer.protocol_version != PROTOCOL_VERSION:
        raise Violation(f"Hello([1, 7, 99]) chose version {answer.protocol_version}; 1 is the only common one")
    if PROTOCOL_VERSION not in answer.supported_versions:
        raise Violation(f"supported_versions {list(answer.supported_versions)} lacks the version it chose")
    if not answer.biller_party_id or len(answer.biller_party_id) > 128:
        raise Violation(f"biller_party_id {answer.biller_party_id!r} is not a party id (HDR-13)")
    if not ctx.key_sets or answer.identity_fingerprint != digest_of(ctx.key_sets[0]):
        raise Violation("identity_fingerprint is not the digest of key set version 1 served by GetKeySets (KEY-12)")
    if not answer.HasField("limits"):
        raise Violation("Hello carries no limits (LIM-10)")
    return f"{answer.biller_party_id}, features {sorted(answer.features)}"


@suite.case(
    "VER-2/no-common-version",
    description="Hello with no version in common fails with UNSUPPORTED_VERSION",
    quote="or, when no version is common, fail with `UNSUPPORTED_VERSION`",
)
async def hello_no_common_version(ctx: BillerTarget) -> None:
    expect(await ctx.conn.call("Hello", hello_request(99)), Reason.UNSUPPORTED_VERSION, "Hello([99])")
    expect(await ctx.conn.call("Hello", hello_request()), Reason.UNSUPPORTED_VERSION, "Hello([])")


@suite.case(
    "LIM-11/limits-within-defaults",
    description="The limits announced in Hello are set and none that may not be raised is above its default",
    quote="A biller MAY lower any limit below its default […] but MUST NOT raise `max_envelope_bytes`, "
    "`max_clock_skew`, `max_message_lifetime`, `max_rounds`, `max_negotiation_time`, `max_instalments` or "
    "`enrolment_max_attempts` above their defaults",
)
async def limits_within_defaults(ctx: BillerTarget) -> str:
    limits, defaults = ctx.limits, DEFAULT_LIMITS
    ceilings = {
        "max_envelope_bytes": defaults.max_envelope_bytes,
        "max_clock_skew_seconds": int(defaults.max_clock_skew.total_seconds()),
        "max_message_lifetime_seconds": int(defaults.max_message_lifetime.total_seconds()),
        "max_rounds": defaults.max_rounds,
        "max_negotiation_seconds": int(defaults.max_negotiation_time.total_seconds()),
        "max_instalments": defaults.max_instalments,
        "enrolment_max_attempts": defaults.enrolment_max_attempts,
    }
    problems = [
        f"{name} = {getattr(limits, name)} > {ceiling}"
        for name, ceiling in ceilings.items()
        if getattr(limits, name) > ceiling
    ]
    unset = [f.name for f in biller_service_pb2.Limits.DESCRIPTOR.fields if not getattr(limits, f.name)]
    if unset:
        problems.append(f"not announced (0): {', '.join(unset)}")
    if problems:
        raise Violation("; ".join(problems))
    return ", ".join(f"{f.name}={getattr(limits, f.name)}" for f in biller_service_pb2.Limits.DESCRIPTOR.fields)


@suite.case(
    "KEY-20/get-key-sets",
    description="GetKeySets serves the biller's own chain above after_version, and NOT_FOUND for unknown parties",
    quote="A biller MUST answer `GetKeySets` with its own chain when `party_id` is empty or its own party id, giving "
    "the versions above `after_version` in increasing order (an empty list when there are none); […] and MUST "
    "answer `NOT_FOUND` for any party id it does not serve.",
)
async def get_key_sets(ctx: BillerTarget) -> str:
    chain = ctx.biller_chain()
    try:
        chain.check_fresh(ctx.now())
    except ProtocolError as error:
        raise Violation(f"the biller's newest key set version has expired (KEY-13): {error.detail}") from error
    by_id = accepted(
        await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(party_id=ctx.biller_id)),
        "GetKeySets(party_id = the biller)",
    )
    if [e.SerializeToString() for e in by_id.key_sets] != [e.SerializeToString() for e in ctx.key_sets]:
        raise Violation("GetKeySets(party_id = the biller) differs from GetKeySets(party_id = '')")
    newest = chain.latest.version
    above = accepted(
        await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(after_version=newest)),
        f"GetKeySets(after_version = {newest})",
    )
    if list(above.key_sets):
        raise Violation(f"GetKeySets(after_version = {newest}, the newest) returned {len(above.key_sets)} versions")
    if newest > 1:
        tail = accepted(
            await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(after_version=1)),
            "GetKeySets(after_version = 1)",
        )
        if [e.SerializeToString() for e in tail.key_sets] != [e.SerializeToString() for e in ctx.key_sets[1:]]:
            raise Violation("GetKeySets(after_version = 1) is not versions 2.. of the chain")
    stranger = f"consumer:cf-unknown-{secrets.token_hex(6)}"
    expect(
        await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(party_id=stranger)),
        Reason.NOT_FOUND,
        "GetKeySets for a party the biller does not know",
    )
    return f"chain of {newest} version(s), pinned by Hello's fingerprint"


@suite.case(
    "CNF-3/feature-matches-service",
    description="The conformance-control feature is announced exactly when the service answers",
    quote='A biller MUST announce the feature `"conformance-control"` in `Hello` exactly when it exposes the service.',
)
async def conformance_feature(ctx: BillerTarget) -> str:
    answer = await ctx.conn.create_test_account("Parley conformance (CNF-3)")
    served = not (isinstance(answer, Refusal) and answer.code.name == "UNIMPLEMENTED")
    if served != ctx.fixtures:
        said = "announces" if ctx.fixtures else "does not announce"
        did = "serves" if served else "does not serve"
        raise Violation(f"Hello {said} conformance-control, but the biller {did} ConformanceControlService")
    return "announced and served" if served else "neither announced nor served"


@suite.case(
    "TRN-8/receive-limit",
    description="A request far above max_envelope_bytes + 1024 is refused with RESOURCE_EXHAUSTED",
    quote="A biller MUST set its gRPC maximum receive message size to `max_envelope_bytes + 1024` bytes (LIM-1) […] "
    "and MUST refuse an envelope larger than `max_envelope_bytes` with `ENVELOPE_TOO_LARGE`",
)
async def receive_limit(ctx: BillerTarget) -> None:
    huge = envelope_pb2.Envelope(payload=b"\0" * (1 << 20), payload_type="parley.v1.AccountQuery")
    huge.signatures.add(keyid="0" * 32, sig=b"\0" * 64)
    answer = await list_bills(ctx, huge)
    if not isinstance(answer, Refusal) or answer.code.name != "RESOURCE_EXHAUSTED":
        got = answer.describe() if isinstance(answer, Refusal) else "an answer"
        raise Violation(f"a 1 MiB request got {got}, not RESOURCE_EXHAUSTED")


@suite.case(
    "LIM-1/envelope-too-large",
    description="Vector envelope-too-large, delivered as generated, is refused with ENVELOPE_TOO_LARGE",
    quote="A receiver MUST refuse an envelope whose serialized size […] exceeds `max_envelope_bytes`, with "
    "`ENVELOPE_TOO_LARGE`, before verifying anything",
)
async def envelope_too_large_vector(ctx: BillerTarget) -> None:
    expect(await list_bills(ctx, vector("envelope-too-large")), Reason.ENVELOPE_TOO_LARGE, "vector envelope-too-large")


@suite.case(
    "LIM-1/size-boundary",
    description="An envelope of exactly max_envelope_bytes is judged; one byte more is ENVELOPE_TOO_LARGE",
    quote="A receiver MUST refuse an envelope whose serialized size […] exceeds `max_envelope_bytes`, with "
    "`ENVELOPE_TOO_LARGE`, before verifying anything; a gRPC service sets its receive-message limit to "
    "`max_envelope_bytes + 1024`",
    needs=(FIXTURES,),
)
async def size_boundary(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    limit = ctx.limits.max_envelope_bytes or DEFAULT_LIMITS.max_envelope_bytes
    at_limit = await list_bills(ctx, sized_query(customer, limit))
    if isinstance(at_limit, Refusal) and (at_limit.reason == Reason.ENVELOPE_TOO_LARGE.name or not at_limit.infos):
        raise Violation(f"an envelope of exactly max_envelope_bytes ({limit}) was refused: {at_limit.describe()}")
    expect(
        await list_bills(ctx, sized_query(customer, limit + 1)),
        Reason.ENVELOPE_TOO_LARGE,
        f"a {limit + 1}-byte envelope",
    )
    got = at_limit.describe() if isinstance(at_limit, Refusal) else "an answer"
    return f"{limit} bytes: judged ({got})"


# === Envelope form and signature (§3) ==============================================================


@suite.case(
    "ENV-2/two-signatures",
    description="Vector two-signatures, delivered as generated, is refused with MALFORMED_ENVELOPE",
    quote="An envelope MUST carry exactly one signature. A receiver MUST refuse an envelope with no signature or "
    "with two or more with `MALFORMED_ENVELOPE`, even when one of them would verify.",
)
async def two_signatures_vector(ctx: BillerTarget) -> None:
    expect(await list_bills(ctx, vector("two-signatures")), Reason.MALFORMED_ENVELOPE, "vector two-signatures")


@suite.case(
    "ENV-2/no-signature",
    description="Vector no-signature, delivered as generated, is refused with MALFORMED_ENVELOPE",
    quote="A receiver MUST refuse an envelope with no signature or with two or more with `MALFORMED_ENVELOPE`",
)
async def no_signature_vector(ctx: BillerTarget) -> None:
    expect(await list_bills(ctx, vector("no-signature")), Reason.MALFORMED_ENVELOPE, "vector no-signature")


@suite.case(
    "ENV-2/enrolled-signer",
    description="A query by an enrolled party with a second signature, or none, is refused with MALFORMED_ENVELOPE",
    quote="A receiver MUST refuse an envelope with no signature or with two or more with `MALFORMED_ENVELOPE`, "
    "even when one of them would verify.",
    needs=(FIXTURES,),
)
async def two_signatures_enrolled(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    good = query_envelope(customer)
    expect(await list_bills(ctx, duplicate_signature(good)), Reason.MALFORMED_ENVELOPE, "a valid signature, twice")
    expect(await list_bills(ctx, strip_signatures(good)), Reason.MALFORMED_ENVELOPE, "no signature")
    await read_ok(ctx, customer)


@suite.case(
    "ENV-1/malformed-form",
    description="A bad keyid form, signature length, payloadType length or empty payload is MALFORMED_ENVELOPE",
    quote="An envelope MUST be well formed: `payload` non-empty; `payload_type` of 1 to 128 characters; and its "
    "signature's `keyid` exactly 32 lowercase hex characters […] and `sig` exactly 64 bytes. A receiver MUST refuse "
    "any other envelope with `MALFORMED_ENVELOPE`.",
    needs=(FIXTURES,),
)
async def malformed_form(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()

    def variant(name: str) -> envelope_pb2.Envelope:
        envelope = query_envelope(customer)
        signature = envelope.signatures[0]
        if name == "upper-case keyid":
            signature.keyid = signature.keyid.upper()
        elif name == "31-character keyid":
            signature.keyid = signature.keyid[:31]
        elif name == "63-byte sig":
            signature.sig = signature.sig[:63]
        elif name == "65-byte sig":
            signature.sig = signature.sig + b"\0"
        elif name == "129-character payloadType":
            envelope.payload_type = "parley.v1." + "A" * 119
        elif name == "empty payloadType":
            envelope.payload_type = ""
        elif name == "empty payload":
            envelope.payload = b""
        return envelope

    for name in (
        "upper-case keyid",
        "31-character keyid",
        "63-byte sig",
        "65-byte sig",
        "129-character payloadType",
        "empty payloadType",
        "empty payload",
    ):
        expect(await list_bills(ctx, variant(name)), Reason.MALFORMED_ENVELOPE, f"an envelope with a {name}")


Mutation = Callable[[envelope_pb2.Envelope, SigningKey], envelope_pb2.Envelope]


def _mutated_query_case(case_id: str, vector_id: str, description: str, mutate: Mutation) -> None:
    """A signed query by an enrolled party, broken as vector `vector_id` is, must be refused with BAD_SIGNATURE."""

    @suite.case(
        case_id,
        description=description,
        quote="The signature MUST be an Ed25519 signature (RFC 8032 […]) over `PAE(payload_type, payload)` computed "
        "from the exact bytes of `payload` and `payload_type` as received. A receiver MUST verify it […] and MUST "
        "refuse the message with `BAD_SIGNATURE` when it does not verify.",
        needs=(FIXTURES,),
    )
    async def body(ctx: BillerTarget) -> str:
        customer = await ctx.enrolled()
        envelope = mutate(query_envelope(customer), customer.party.key)
        expect(await list_bills(ctx, envelope), Reason.BAD_SIGNATURE, f"a query broken as vector {vector_id} is")
        await read_ok(ctx, customer)
        return f"as vector {vector_id}"


_mutated_query_case(
    "ENV-3/bad-signature",
    "bad-signature",
    "A query with one signature bit flipped is refused with BAD_SIGNATURE",
    lambda envelope, _key: flip_signature(envelope),
)
_mutated_query_case(
    "ENV-3/tampered-payload",
    "tampered-payload",
    "A query with one payload bit flipped after signing is refused with BAD_SIGNATURE",
    lambda envelope, _key: flip_payload(envelope),  # in account_id, the query's last field: it still parses
)
_mutated_query_case(
    "ENV-3/signed-payload-not-pae",
    "signed-payload-not-pae",
    "A query signed over its raw payload instead of the PAE is refused with BAD_SIGNATURE",
    sign_payload_not_pae,
)
_mutated_query_case(
    "ENV-3/pae-wrong-length",
    "pae-wrong-length",
    "A query signed over a PAE stating the wrong payload length is refused with BAD_SIGNATURE",
    sign_wrong_pae_length,
)


@suite.case(
    "ENV-3/payload-type-swapped",
    description="A ThreadOpen relabelled parley.v1.Offer after signing is refused with BAD_SIGNATURE (vector "
    "payload-type-swapped)",
    quote="An envelope whose `payload_type` was changed from `parley.v1.Offer` to `parley.v1.Accept` after signing, "
    "received where both are accepted, fails at step 4 (`BAD_SIGNATURE`), because the type is part of what is signed",
    needs=NEG,
)
async def payload_type_swapped(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    opening = customer.party.open(bill.bill_id, bill.digest, outside_options(bill))
    swapped = swap_payload_type(opening, "parley.v1.Offer")
    expect(await negotiate(ctx, swapped), Reason.BAD_SIGNATURE, "a ThreadOpen relabelled Offer after signing")


@suite.case(
    "ENV-5/payload-type-not-for-call",
    description="Vector payload-type-not-for-call (a Bill), delivered as generated to ListBills, is WRONG_PAYLOAD_TYPE",
    quote="A receiver MUST refuse an envelope whose `payload_type` is not, as an exact string, one of the types the "
    "RPC (§2.2) or the thread position (§5.1) accepts, with `WRONG_PAYLOAD_TYPE`.",
)
async def payload_type_not_for_call_vector(ctx: BillerTarget) -> None:
    envelope = vector("payload-type-not-for-call")
    expect(await list_bills(ctx, envelope), Reason.WRONG_PAYLOAD_TYPE, "vector payload-type-not-for-call")


@suite.case(
    "ENV-5/wrong-type-for-call",
    description="An enrolled party's messages sent to the wrong RPC are refused with WRONG_PAYLOAD_TYPE",
    quote="A receiver MUST refuse an envelope whose `payload_type` is not, as an exact string, one of the types the "
    "RPC (§2.2) or the thread position (§5.1) accepts, with `WRONG_PAYLOAD_TYPE`.",
    needs=(FIXTURES,),
)
async def wrong_type_for_call(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    intent = customer.party.intent(customer.account_id, bill.bill_id, "cf-wrong-call", money(AMOUNT_DUE))
    expect(await list_bills(ctx, intent), Reason.WRONG_PAYLOAD_TYPE, "a PaymentIntent sent to ListBills")
    expect(
        await pay(ctx, query_envelope(customer)),
        Reason.WRONG_PAYLOAD_TYPE,
        "an AccountQuery sent to CreatePaymentIntent",
    )
    renamed = customer.party.sign(
        account_pb2.AccountQuery(header=customer.party.header(), account_id=customer.account_id)
    )
    renamed.payload_type = "parley.v1.accountquery"
    expect(await list_bills(ctx, renamed), Reason.WRONG_PAYLOAD_TYPE, "payloadType 'parley.v1.accountquery' (case)")


@suite.case(
    "ENV-6/truncated-payload",
    description="A correctly signed payload that does not parse is refused with MALFORMED_PAYLOAD (vector "
    "truncated-payload)",
    quote="A receiver MUST refuse a verified payload that does not parse as the message its `payload_type` names "
    "with `MALFORMED_PAYLOAD`.",
    needs=(FIXTURES,),
)
async def truncated_payload(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    cut = truncated(query_envelope(customer), customer.party.key)
    expect(await list_bills(ctx, cut), Reason.MALFORMED_PAYLOAD, "a query cut short, then signed")


@suite.case(
    "ENV-7/unknown-field",
    description="A signed payload with an undefined field is refused with UNKNOWN_FIELD (vector unknown-field)",
    quote="A receiver MUST refuse a signed payload containing any field that the version-1 schema of its message "
    "does not define — at the top level or in any nested message […] — with `UNKNOWN_FIELD`.",
    needs=(FIXTURES,),
)
async def unknown_field(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    payload = query_envelope(customer).payload
    extended = with_unknown_field(query_envelope(customer), customer.party.key)
    expect(await list_bills(ctx, extended), Reason.UNKNOWN_FIELD, "a query with field 111 appended")
    # A defined field number with the wrong wire type counts as unknown: account_id (2) as a varint.
    retyped = customer.party.sign_bytes("parley.v1.AccountQuery", payload + b"\x10\x01")
    expect(await list_bills(ctx, retyped), Reason.UNKNOWN_FIELD, "a query with field 2 sent as a varint")


@suite.case(
    "ENV-7/unknown-field-nested",
    description="An undefined field inside the signed header is refused with UNKNOWN_FIELD (vector "
    "unknown-field-nested)",
    quote="A receiver MUST refuse a signed payload containing any field that the version-1 schema of its message "
    "does not define — at the top level or in any nested message […] — with `UNKNOWN_FIELD`.",
    needs=(FIXTURES,),
)
async def unknown_field_nested(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    header = customer.party.header().SerializeToString() + UNKNOWN_FIELD
    rest = account_pb2.AccountQuery(account_id=customer.account_id).SerializeToString()
    payload = b"\x0a" + encode_varint(len(header)) + header + rest
    nested = customer.party.sign_bytes("parley.v1.AccountQuery", payload)
    expect(await list_bills(ctx, nested), Reason.UNKNOWN_FIELD, "a query whose header carries field 111")


@suite.case(
    "AUZ-2/not-enrolled",
    description="A request signed by a key no enrolled party lists is refused with NOT_ENROLLED",
    quote="A biller MUST refuse a signed request (any RPC but `Hello`, `GetKeySets` and `Enrol`) whose `keyid` no "
    "enrolled party's chain lists with `NOT_ENROLLED`",
)
async def not_enrolled(ctx: BillerTarget) -> None:
    stranger = ctx.new_party()
    query = stranger.query(f"cf-nobody-{secrets.token_hex(4)}")
    expect(await list_bills(ctx, query), Reason.NOT_ENROLLED, "a query by a party that never enrolled")


@suite.case(
    "AUZ-2/unknown-key-vector",
    description="Vector unknown-key, delivered as generated to Negotiate, is refused with NOT_ENROLLED",
    quote="it MUST resolve the keyid among the chains of all its enrolled parties, refusing with `NOT_ENROLLED` when "
    "none lists it (AUZ-2)",
    needs=("negotiation",),
)
async def unknown_key_vector(ctx: BillerTarget) -> None:
    expect(await negotiate(ctx, vector("unknown-key")), Reason.NOT_ENROLLED, "vector unknown-key")


# === Header, validity window (§5) ====================================================================


def _signed_query(customer: Customer, edit: Any) -> envelope_pb2.Envelope:
    """A query whose header `edit(header)` changed (or cleared) before signing."""
    query = account_pb2.AccountQuery(header=customer.party.header(), account_id=customer.account_id)
    edit(query)
    return customer.party.sign(query)


@suite.case(
    "HDR-1/unsupported-version",
    description="A message whose protocol_version is not 1 (0 included) is refused with UNSUPPORTED_VERSION",
    quote="A receiver MUST refuse a message whose `protocol_version` it does not speak — `0` included — with "
    "`UNSUPPORTED_VERSION`.",
    needs=(FIXTURES,),
)
async def unsupported_version(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    for version in (2, 0):
        query = query_envelope(customer, header={"protocol_version": version})
        expect(await list_bills(ctx, query), Reason.UNSUPPORTED_VERSION, f"a query with protocol_version {version}")


@suite.case(
    "HDR-2/malformed-header",
    description="A missing header or a header field of the wrong length or form is refused with MALFORMED_HEADER",
    quote="A header MUST be present and well formed […] A receiver MUST refuse any other header, or a missing one, "
    "with `MALFORMED_HEADER`.",
    needs=(FIXTURES,),
)
async def malformed_header(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    edits: dict[str, Any] = {
        "no header": lambda q: q.ClearField("header"),
        "a 15-byte message_id": lambda q: setattr(q.header, "message_id", q.header.message_id[:15]),
        "a 17-byte thread_id": lambda q: setattr(q.header, "thread_id", q.header.thread_id + b"\0"),
        "a 31-byte previous_digest": lambda q: setattr(q.header, "previous_digest", b"\1" * 31),
        "no create_time": lambda q: q.header.ClearField("create_time"),
        "no expire_time": lambda q: q.header.ClearField("expire_time"),
        "nanos out of range": lambda q: setattr(q.header.create_time, "nanos", 1_000_000_000),
    }
    for name, edit in edits.items():
        expect(await list_bills(ctx, _signed_query(customer, edit)), Reason.MALFORMED_HEADER, f"a query with {name}")


@suite.case(
    "HDR-3/wrong-sender",
    description="A header naming another party as sender is refused with WRONG_SENDER",
    quote="`sender` MUST be the party id of the party whose chain holds the signing key (the expected sender, §3.8). "
    "A receiver MUST refuse a mismatch with `WRONG_SENDER`",
    needs=(FIXTURES,),
)
async def wrong_sender(ctx: BillerTarget) -> None:
    customer, other = await ctx.enrolled(), await ctx.enrolled()
    for sender in (other.party_id, "consumer:cf-nobody"):
        query = query_envelope(customer, header={"sender": sender})
        expect(await list_bills(ctx, query), Reason.WRONG_SENDER, f"a query claiming sender {sender!r}")


@suite.case(
    "HDR-4/wrong-recipient",
    description="A request not addressed to the biller is refused with WRONG_RECIPIENT",
    quote="A receiver MUST refuse a message not addressed to it with `WRONG_RECIPIENT`.",
    needs=(FIXTURES,),
)
async def wrong_recipient(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    for recipient in (
        "biller:other.example",
        "",
        ctx.biller_id.upper() if ctx.biller_id.upper() != ctx.biller_id else "",
    ):
        query = query_envelope(customer, header={"recipient": recipient})
        expect(await list_bills(ctx, query), Reason.WRONG_RECIPIENT, f"a query addressed to {recipient!r}")


@suite.case(
    "HDR-5/lifetime-too-long",
    description="A lifetime above the maximum, zero or negative is refused with LIFETIME_TOO_LONG",
    quote="A sender MUST set `0 < expire_time − create_time ≤ max_message_lifetime_seconds` […]; a receiver MUST "
    "refuse any other lifetime with `LIFETIME_TOO_LONG`",
    needs=(FIXTURES,),
)
async def lifetime_too_long(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    now = ctx.now()
    for name, expire in (
        ("max lifetime + 1 s", now + ctx.max_lifetime + timedelta(seconds=1)),
        ("zero", now),
        ("negative", now - timedelta(seconds=1)),
    ):
        query = query_envelope(customer, header={"create_time": now, "expire_time": expire})
        expect(await list_bills(ctx, query), Reason.LIFETIME_TOO_LONG, f"a query with a {name} lifetime")
    await read_ok(ctx, customer, header={"create_time": now, "expire_time": now + ctx.max_lifetime})


@suite.case(
    "HDR-5/expired",
    description="A live message whose expire_time is more than the skew ago is refused with MESSAGE_EXPIRED",
    quote="A receiver MUST refuse […] a live message (§1.6) when `expire_time < now − skew`, with `MESSAGE_EXPIRED`",
    needs=(FIXTURES,),
)
async def expired(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    expire = ctx.now() - ctx.skew - timedelta(seconds=60)
    query = query_envelope(customer, header={"create_time": expire - timedelta(minutes=10), "expire_time": expire})
    expect(await list_bills(ctx, query), Reason.MESSAGE_EXPIRED, "a query that expired skew + 60 s ago")


@suite.case(
    "HDR-5/not-yet-valid",
    description="A message created more than the skew ahead is refused with MESSAGE_NOT_YET_VALID",
    quote="A receiver MUST refuse a message when `create_time > now + skew`, with `MESSAGE_NOT_YET_VALID`",
    needs=(FIXTURES,),
)
async def not_yet_valid(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    query = query_envelope(customer, header={"create_time": ctx.now() + ctx.skew + timedelta(seconds=60)})
    expect(await list_bills(ctx, query), Reason.MESSAGE_NOT_YET_VALID, "a query created skew + 60 s ahead")


@suite.case(
    "LIM-2/skew-tolerated",
    description="Messages created up to the skew ahead, or expired up to the skew ago, are accepted",
    quote="Receivers MUST tolerate, and tolerate no more than, `max_clock_skew` between the sender's clock and their "
    "own in the checks of HDR-5, adding the skew to their own `now`, never to received times",
    needs=(FIXTURES,),
)
async def skew_tolerated(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    margin = timedelta(seconds=60)
    await read_ok(ctx, customer, header={"create_time": ctx.now() + ctx.skew - margin})
    expire = ctx.now() - ctx.skew + margin
    await read_ok(ctx, customer, header={"create_time": expire - timedelta(minutes=10), "expire_time": expire})


@suite.case(
    "HDR-6/query-sequence",
    description="A query (a one-message thread) at a sequence other than 0 is refused with SEQUENCE_MISMATCH",
    quote="The first message of a thread MUST carry `sequence` 0 […] A receiver MUST refuse a message whose "
    "`sequence` is not the next one of its thread with `SEQUENCE_MISMATCH`.",
    needs=(FIXTURES,),
)
async def query_sequence(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    query = query_envelope(customer, header={"sequence": 1})
    expect(await list_bills(ctx, query), Reason.SEQUENCE_MISMATCH, "a query at sequence 1")


@suite.case(
    "HDR-7/query-previous-digest",
    description="A query (sequence 0) with a previous_digest is refused with PREVIOUS_DIGEST_MISMATCH",
    quote="`previous_digest` MUST be empty at sequence 0 […] A receiver MUST refuse any other value with "
    "`PREVIOUS_DIGEST_MISMATCH`.",
    needs=(FIXTURES,),
)
async def query_previous_digest(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    query = query_envelope(customer, header={"previous_digest": secrets.token_bytes(32)})
    expect(
        await list_bills(ctx, query), Reason.PREVIOUS_DIGEST_MISMATCH, "a query at sequence 0 with a previous_digest"
    )


# === Replay and idempotency (§5.3) ===================================================================


@suite.case(
    "HDR-8/replayed-intent",
    description="A different PaymentIntent reusing a message id is refused with REPLAYED_MESSAGE, without effect",
    quote="A receiver that has recorded a message from the same `sender` with the same `message_id` MUST treat a "
    "message with the same digest as a retry (HDR-12) and MUST refuse one with a different digest with "
    "`REPLAYED_MESSAGE`.",
    needs=(FIXTURES,),
)
async def replayed_intent(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    message_id = secrets.token_bytes(16)
    first = customer.party.intent(
        customer.account_id, bill.bill_id, "cf-first", money(AMOUNT_DUE), header={"message_id": message_id}
    )
    setup(await pay(ctx, first), "a PaymentIntent for the bill's amount")
    second = customer.party.intent(
        customer.account_id, bill.bill_id, "cf-second", money(AMOUNT_DUE), header={"message_id": message_id}
    )
    expect(await pay(ctx, second), Reason.REPLAYED_MESSAGE, "another intent with the first one's message id")
    receipt = await get_receipt(ctx, customer.party.query(customer.account_id, intent_id="cf-second"))
    expect(receipt, Reason.NOT_FOUND, "GetReceipt for the replayed intent's id (it must not exist)")


@suite.case(
    "HDR-8/replayed-move",
    description="A different ThreadOpen reusing a message id is refused with REPLAYED_MESSAGE, without effect",
    quote="a different message with an already-seen `message_id` is `REPLAYED_MESSAGE` (HDR-8)",
    needs=NEG,
)
async def replayed_move(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    first_bill, second_bill = await ctx.issue_bill(customer), await ctx.issue_bill(customer)
    message_id = secrets.token_bytes(16)
    _, answer = await open_thread(
        ctx, customer, first_bill, inside_options(first_bill), header={"message_id": message_id}
    )
    setup(answer, "an opening on the first bill")
    replay, answer = await open_thread(
        ctx, customer, second_bill, inside_options(second_bill), header={"message_id": message_id}
    )
    expect(answer, Reason.REPLAYED_MESSAGE, "an opening on the second bill reusing the first opening's message id")
    expect(
        await get_thread(ctx, customer.party.query(customer.account_id, thread_id=thread_id_of(replay))),
        Reason.NOT_FOUND,
        "GetThread for the replayed opening's thread (it must not exist)",
    )
    _, answer = await open_thread(ctx, customer, second_bill, inside_options(second_bill))
    accepted(answer, "a fresh opening on the second bill (the replay must have changed nothing)")


@suite.case(
    "HDR-12/retry-same-answer",
    description="A retried Negotiate gets the original reply byte for byte, and the thread does not change",
    quote="A receiver MUST answer a retry with the original answer — the same signed reply envelope, byte for byte and "
    "never re-signed, or the same error — and MUST NOT apply its effect again.",
    needs=NEG,
)
async def retry_same_answer(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    opening, first = await open_thread(ctx, customer, bill, inside_options(bill))
    setup(first, "an opening inside the options")
    again = accepted(await negotiate(ctx, opening), "the very same opening, sent again")
    if again.reply.SerializeToString() != first.reply.SerializeToString():
        raise Violation("the retry was answered with another reply envelope than the original")
    if again.outcome != first.outcome:
        raise Violation(
            f"the retry reports outcome {OUTCOME.Name(again.outcome)}, the original {OUTCOME.Name(first.outcome)}"
        )
    thread = await thread_of(ctx, customer, thread_id_of(opening))
    if len(thread.messages) != 2:
        raise Violation(f"after the retry the thread holds {len(thread.messages)} messages, not 2 (a second effect)")


# === Enrolment (§6.1, §6.2) ===========================================================================


def _other_code(code: str) -> str:
    """A well-formed enrolment code other than `code`."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    while True:
        candidate = "".join(secrets.choice(alphabet) for _ in range(12))
        text = "-".join(candidate[i : i + 4] for i in range(0, 12, 4))
        if text != code:
            return text


@suite.case(
    "ENR-9/confirmation",
    description="Enrol answers a signed confirmation at sequence 1 of the request's thread, and the biller's chain",
    quote="The biller MUST answer a successful request with an `EnrolmentConfirmation` at sequence 1 of the request's "
    "thread (same `thread_id`, `previous_digest` = the request's digest, `sender` = the biller, `recipient` = the "
    "consumer) naming the `account_id` and the `consumer_party_id` now bound, and with `biller_key_sets`, its whole "
    "key set chain, version 1 first.",
    needs=(FIXTURES,),
)
async def enrolment_confirmation(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    party = ctx.new_party()
    request = party.enrolment(account.account_id, account.enrolment_code)
    answer = accepted(await enrol(ctx, request), "Enrol with the account's code")
    if not answer.biller_key_sets or digest_of(answer.biller_key_sets[0]) != ctx.hello.identity_fingerprint:
        raise Violation("biller_key_sets does not start at the identity fingerprint announced in Hello")
    try:
        KeyChain.verify(list(answer.biller_key_sets), pin=ctx.hello.identity_fingerprint, now=ctx.now())
    except ProtocolError as error:
        raise Violation(f"biller_key_sets does not verify as a chain: {error.reason.name}: {error.detail}") from error
    customer = Customer(party, account.account_id)
    types = (enrolment_pb2.EnrolmentConfirmation,)
    confirmation = ctx.verify(answer.confirmation, types, customer, live=True, what="the confirmation")
    message: Any = confirmation.message
    sent = enrolment_pb2.EnrolmentRequest.FromString(request.payload).header
    header = confirmation.header
    problems = [
        "thread_id differs from the request's" if header.thread_id != sent.thread_id else "",
        f"sequence is {header.sequence}, not 1" if header.sequence != 1 else "",
        "previous_digest is not the request's digest" if header.previous_digest != digest_of(request) else "",
        f"account_id is {message.account_id!r}" if message.account_id != account.account_id else "",
        f"consumer_party_id is {message.consumer_party_id!r}" if message.consumer_party_id != party.party_id else "",
    ]
    if any(problems):
        raise Violation("the confirmation: " + "; ".join(p for p in problems if p))
    await read_ok(ctx, customer)


@suite.case(
    "ENR-2/code-single-use",
    description="A spent code enrols no one else (ENROLMENT_CODE_USED); a retry of the request that spent it is "
    "answered with the original confirmation",
    quote="A code MUST enrol at most once: a later request presenting a spent code is refused with "
    "`ENROLMENT_CODE_USED` — except a retry of the very request that spent it, which receives the original "
    "confirmation (HDR-12).",
    needs=(FIXTURES,),
)
async def code_single_use(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    first = ctx.new_party()
    request = first.enrolment(account.account_id, account.enrolment_code)
    original = accepted(await enrol(ctx, request), "the first Enrol with the code")
    retried = accepted(await enrol(ctx, request), "the very same Enrol request, sent again")
    if retried.confirmation.SerializeToString() != original.confirmation.SerializeToString():
        raise Violation("the retried Enrol was answered with another confirmation than the original")
    second = ctx.new_party()
    expect(
        await enrol(ctx, second.enrolment(account.account_id, account.enrolment_code)),
        Reason.ENROLMENT_CODE_USED,
        "another party presenting the spent code",
    )
    again = first.enrolment(account.account_id, account.enrolment_code)
    expect(await enrol(ctx, again), Reason.ENROLMENT_CODE_USED, "a new request by the first party with the spent code")
    await read_ok(ctx, Customer(first, account.account_id))


@suite.case(
    "ENR-3/wrong-code",
    description="A wrong code, or an account that does not exist, is refused with ENROLMENT_CODE_INVALID",
    quote="The biller MUST compare the hash of the received code with the stored hash in constant time, and MUST "
    "refuse a mismatch with `ENROLMENT_CODE_INVALID` […] A request naming an account that does not exist […] MUST "
    "be refused the same way",
    needs=(FIXTURES,),
)
async def wrong_code(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    party = ctx.new_party()
    wrong = party.enrolment(account.account_id, _other_code(account.enrolment_code))
    expect(await enrol(ctx, wrong), Reason.ENROLMENT_CODE_INVALID, "Enrol with a wrong code")
    nowhere = party.enrolment(f"cf-no-such-account-{secrets.token_hex(4)}", account.enrolment_code)
    expect(await enrol(ctx, nowhere), Reason.ENROLMENT_CODE_INVALID, "Enrol on an account that does not exist")
    accepted(await enrol(ctx, party.enrolment(account.account_id, account.enrolment_code)), "Enrol with the right code")


@suite.case(
    "ENR-5/lock-after-attempts",
    description="After enrolment_max_attempts wrong codes, even the right code is refused with ENROLMENT_LOCKED",
    quote="After `enrolment_max_attempts` (default 5) wrong codes for one account, the biller MUST lock enrolment on "
    "that account: every later `Enrol` on it is refused with `ENROLMENT_LOCKED` without comparing the code, the right "
    "code included",
    needs=(FIXTURES,),
)
async def lock_after_attempts(ctx: BillerTarget) -> str:
    account = await ctx.new_account()
    party = ctx.new_party()
    attempts = ctx.limits.enrolment_max_attempts or DEFAULT_LIMITS.enrolment_max_attempts
    for attempt in range(1, attempts + 1):
        wrong = party.enrolment(account.account_id, _other_code(account.enrolment_code))
        expect(await enrol(ctx, wrong), Reason.ENROLMENT_CODE_INVALID, f"wrong code {attempt} of {attempts}")
    right = party.enrolment(account.account_id, account.enrolment_code)
    expect(await enrol(ctx, right), Reason.ENROLMENT_LOCKED, f"the right code after {attempts} wrong ones")
    return f"locked after {attempts} wrong codes"


@suite.case(
    "ENR-6/party-id-taken",
    description="A key set claiming an enrolled party's id, or the biller's, is refused with PARTY_ID_TAKEN; the "
    "code is not spent",
    quote="The biller MUST refuse, with `PARTY_ID_TAKEN`, a request whose key set claims a party id that is already "
    "bound to a chain with a different fingerprint, or that is the biller's own; a refused request does not spend "
    "the code.",
    needs=(FIXTURES,),
)
async def party_id_taken(ctx: BillerTarget) -> None:
    first = await ctx.enrolled()
    account = await ctx.new_account()
    impostor = ctx.new_party(party_id=first.party_id)
    expect(
        await enrol(ctx, impostor.enrolment(account.account_id, account.enrolment_code)),
        Reason.PARTY_ID_TAKEN,
        "another chain claiming an enrolled party's id",
    )
    biller = ctx.new_party(party_id=ctx.biller_id)
    expect(
        await enrol(ctx, biller.enrolment(account.account_id, account.enrolment_code)),
        Reason.PARTY_ID_TAKEN,
        "a consumer chain claiming the biller's own party id",
    )
    honest = ctx.new_party()
    accepted(
        await enrol(ctx, honest.enrolment(account.account_id, account.enrolment_code)),
        "Enrol with the code the refused requests presented (it must not be spent)",
    )


@suite.case(
    "KEY-21/keyid-of-another-party",
    description="An enrolment key set listing another party's keyid is refused with KEYSET_INVALID",
    quote="A biller MUST refuse, with `KEYSET_INVALID`, a key set (carried in an enrolment or published) that lists "
    "a keyid already listed by the chain of another party it knows",
    needs=(FIXTURES,),
)
async def keyid_of_another_party(ctx: BillerTarget) -> None:
    first = await ctx.enrolled()
    account = await ctx.new_account()
    borrower = ctx.new_party(extra_keys=(first.party.key,))
    expect(
        await enrol(ctx, borrower.enrolment(account.account_id, account.enrolment_code)),
        Reason.KEYSET_INVALID,
        "a key set listing an enrolled party's key",
    )


# === Key sets: rotation, revocation (§4) =============================================================


async def _rotated(ctx: BillerTarget, customer: Customer) -> tuple[Any, envelope_pb2.Envelope]:
    """Publish version 2 listing the current key and a new one; returns (new key, version 2)."""
    party = customer.party
    new_key = type(party.key).generate()
    start = party.clock() - timedelta(days=1)
    version_2 = party.next_key_set([party.key_spec(party.key, start), party.key_spec(new_key, start)])
    answer = accepted(await publish(ctx, version_2), "PublishKeySet of version 2, signed by a key of version 1")
    if answer.version != 2:
        raise Violation(f"PublishKeySet of version 2 answered version {answer.version}")
    party.adopt(version_2)
    return new_key, version_2


@suite.case(
    "KEY-19/publish-next-version",
    description="PublishKeySet extends the chain; a retry answers the same version; the new key then signs",
    quote="On `PublishKeySet`, a biller MUST resolve the publishing party […], verify the envelope as the next "
    "version of that party's chain […], store it, and answer the version now current. A retry of the very envelope "
    "already stored as the current version MUST be answered with that version, not refused (HDR-12). The biller "
    "MUST then judge that party's messages against the extended chain.",
    needs=(FIXTURES,),
)
async def publish_next_version(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    new_key, version_2 = await _rotated(ctx, customer)
    retry = accepted(await publish(ctx, version_2), "the same version 2 envelope, published again")
    if retry.version != 2:
        raise Violation(f"the retried PublishKeySet answered version {retry.version}, not 2")
    await read_ok(ctx, customer, key=new_key)


@suite.case(
    "KEY-8/rollback",
    description="A version not above the current one is refused with KEYSET_ROLLBACK",
    quote="A receiver MUST refuse a version not above the one it holds (a rollback, including a second, different "
    "version `N`) with `KEYSET_ROLLBACK`",
    needs=(FIXTURES,),
)
async def keyset_rollback(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    await _rotated(ctx, customer)
    party = customer.party
    start = party.clock() - timedelta(days=1)
    other_2 = party.next_key_set(
        [party.key_spec(party.key, start), party.key_spec(type(party.key).generate(), start)],
        version=2,
        previous=party.key_sets[0],
    )
    expect(await publish(ctx, other_2), Reason.KEYSET_ROLLBACK, "a second, different version 2")
    expect(await publish(ctx, party.key_sets[0]), Reason.KEYSET_ROLLBACK, "version 1 again, after version 2")


@suite.case(
    "KEY-8/skipped-version",
    description="A version that skips one is refused with KEYSET_VERSION_SKIPPED",
    quote="a version that skips one with `KEYSET_VERSION_SKIPPED`",
    needs=(FIXTURES,),
)
async def keyset_skipped(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    start = party.clock() - timedelta(days=1)
    version_3 = party.next_key_set([party.key_spec(party.key, start)], version=3)
    expect(await publish(ctx, version_3), Reason.KEYSET_VERSION_SKIPPED, "version 3 right after version 1")


@suite.case(
    "KEY-19/unknown-signer",
    description="A version signed by a key only it lists is refused with NOT_ENROLLED, and the key stays unknown",
    quote="On `PublishKeySet`, a biller MUST resolve the publishing party from the envelope's `keyid` among the newest "
    "versions of its enrolled parties' chains (`NOT_ENROLLED` when none lists it, AUZ-2)",
    needs=(FIXTURES,),
)
async def unknown_signer(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    new_key = type(party.key).generate()
    start = party.clock() - timedelta(days=1)
    version_2 = party.next_key_set([party.key_spec(party.key, start), party.key_spec(new_key, start)], signer=new_key)
    expect(await publish(ctx, version_2), Reason.NOT_ENROLLED, "version 2 signed by a key only version 2 lists")
    expect(
        await list_bills(ctx, query_envelope(customer, key=new_key)), Reason.NOT_ENROLLED, "a query signed by that key"
    )


@suite.case(
    "KEY-9/bad-signature",
    description="A next version whose signature does not verify is refused with BAD_SIGNATURE, without effect",
    quote="A receiver MUST refuse a version whose `keyid` names no key of the set that must sign it with "
    "`KEYSET_WRONG_SIGNER`, and one whose signature does not verify with `BAD_SIGNATURE`.",
    needs=(FIXTURES,),
)
async def keyset_bad_signature(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    new_key = type(party.key).generate()
    start = party.clock() - timedelta(days=1)
    version_2 = party.next_key_set([party.key_spec(party.key, start), party.key_spec(new_key, start)])
    expect(await publish(ctx, flip_signature(version_2)), Reason.BAD_SIGNATURE, "version 2 with a flipped bit")
    expect(await list_bills(ctx, query_envelope(customer, key=new_key)), Reason.NOT_ENROLLED, "a query by its new key")


@suite.case(
    "KEY-4/previous-digest",
    description="A next version whose previous_digest is not the current version's is PREVIOUS_DIGEST_MISMATCH",
    quote="A receiver MUST refuse a version breaking these rules with `KEYSET_INVALID`, except a wrong "
    "`previous_digest`, refused with `PREVIOUS_DIGEST_MISMATCH`.",
    needs=(FIXTURES,),
)
async def keyset_previous_digest(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    start = party.clock() - timedelta(days=1)
    version_2 = party.next_key_set(
        [party.key_spec(party.key, start)], header={"previous_digest": secrets.token_bytes(32)}
    )
    expect(await publish(ctx, version_2), Reason.PREVIOUS_DIGEST_MISMATCH, "version 2 chained to another digest")


@suite.case(
    "KEY-14/rotated-key",
    description="A key dropped by a later version still signs for times it was in force, and is UNKNOWN_KEY after",
    quote="The signing key MUST be listed in the version in force, else the message is refused with `UNKNOWN_KEY` "
    "(step 8 of §3.8). A key that a later version dropped (a rotation) therefore still verifies the messages it "
    "signed while it was in force",
    needs=(FIXTURES,),
)
async def rotated_key(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    old_key, new_key = party.key, type(party.key).generate()
    now = ctx.now()
    start = now - timedelta(days=1)
    version_2 = party.next_key_set([party.key_spec(new_key, start)], create_time=now - timedelta(seconds=1))
    accepted(await publish(ctx, version_2), "version 2 dropping the old key for a new one, signed by the old key")
    party.adopt(version_2, new_key)
    before = now - timedelta(minutes=5)
    await read_ok(ctx, customer, key=old_key, header={"create_time": before})
    expect(
        await list_bills(ctx, query_envelope(customer, key=old_key)),
        Reason.UNKNOWN_KEY,
        "a query signed by the dropped key, created after the rotation",
    )
    await read_ok(ctx, customer, key=new_key)


@suite.case(
    "KEY-11/revoked-key",
    description="A key revoked from a time signs nothing created at or after it (KEY_REVOKED), and earlier "
    "messages stay valid",
    quote="A key is **revoked** from its `revoke_time`: a message (key sets included) created at or after "
    "`revoke_time` and signed by that key MUST be refused with `KEY_REVOKED`, judged by the revocations of the newest "
    "version the receiver holds.",
    needs=(FIXTURES,),
)
async def revoked_key(ctx: BillerTarget) -> None:
    spare = type(ctx.new_party().key).generate()
    party = ctx.new_party(extra_keys=(spare,))
    customer = await ctx.enrolled(party)
    stolen = party.key
    now = ctx.now()
    revoke_time = now - timedelta(minutes=10)
    version_2 = party.next_key_set(
        [party.key_spec(spare, now - timedelta(days=1))],
        signer=spare,
        create_time=now - timedelta(seconds=1),
        revocations={stolen.keyid: revoke_time},
    )
    accepted(await publish(ctx, version_2), "version 2 signed by the spare key, revoking the other")
    party.adopt(version_2, spare)
    after = now - timedelta(minutes=5)
    expect(
        await list_bills(ctx, query_envelope(customer, key=stolen, header={"create_time": after})),
        Reason.KEY_REVOKED,
        "a query signed by the revoked key, created after revoke_time",
    )
    earlier = {"create_time": now - timedelta(minutes=15), "lifetime": timedelta(minutes=20)}
    await read_ok(ctx, customer, key=stolen, header=earlier)
    await read_ok(ctx, customer)


@suite.case(
    "KEY-10/key-not-valid",
    description="A key used before its not_before is refused with KEY_NOT_VALID",
    quote="A key MUST only sign messages created inside its validity window, `not_before ≤ create_time < "
    "not_after`, as listed by the version in force; a receiver MUST refuse any other with `KEY_NOT_VALID`.",
    needs=(FIXTURES,),
)
async def key_not_valid(ctx: BillerTarget) -> None:
    party = ctx.new_party()
    later = type(party.key).generate()
    now = ctx.now()
    start = now - timedelta(days=1)
    version_1 = build_key_set(
        party_id=party.party_id,
        version=1,
        keys=[
            party.key_spec(party.key, start),
            KeySpec(later.public_key, now + timedelta(days=2), now + timedelta(days=30)),
        ],
        signer=party.key,
        create_time=start,
        expire_time=start + timedelta(days=300),
        previous=None,
    )
    party.key_sets[:] = [version_1]
    customer = await ctx.enrolled(party)
    expect(
        await list_bills(ctx, query_envelope(customer, key=later)),
        Reason.KEY_NOT_VALID,
        "a query signed by a key valid only from two days on",
    )


# === Authorization (§6.3, §6.4) =====================================================================


async def _victim(ctx: BillerTarget) -> tuple[Customer, IssuedBill, str, bytes]:
    """A customer with a bill, a payment intent on it and (with negotiation) a thread: what others must not touch."""
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    intent_id = f"cf-victim-{secrets.token_hex(4)}"
    intent = customer.party.intent(customer.account_id, bill.bill_id, intent_id, money(AMOUNT_DUE))
    setup(await pay(ctx, intent), "the victim's own payment intent")
    thread_id = b""
    if "negotiation" in ctx.features:
        other_bill = await ctx.issue_bill(customer)
        thread_id = thread_id_of((await agreed_thread(ctx, customer, other_bill))[0])
    return customer, bill, intent_id, thread_id


@suite.case(
    "AUZ-1/read-other-account",
    description="A second enrolled consumer can never read the first's account: ACCOUNT_ACCESS_DENIED",
    quote="Every request that names an account — `AccountQuery`, `PaymentIntent` and `ErasureRequest`, by "
    "`account_id` — MUST be refused with `ACCOUNT_ACCESS_DENIED` unless its signer's party is bound to that account, "
    "including when the account does not exist",
    needs=(FIXTURES,),
)
async def read_other_account(ctx: BillerTarget) -> None:
    victim, bill, intent_id, thread_id = await _victim(ctx)
    intruder = (await ctx.enrolled()).party
    account = victim.account_id
    denied = Reason.ACCOUNT_ACCESS_DENIED
    expect(await list_bills(ctx, intruder.query(account)), denied, "ListBills on another consumer's account")
    expect(await get_bill(ctx, intruder.query(account, bill_id=bill.bill_id)), denied, "GetBill of another's bill")
    expect(
        await get_receipt(ctx, intruder.query(account, intent_id=intent_id)), denied, "GetReceipt of another's intent"
    )
    if thread_id:
        expect(
            await get_thread(ctx, intruder.query(account, thread_id=thread_id)), denied, "GetThread of another's thread"
        )
    nowhere = f"cf-no-such-account-{secrets.token_hex(4)}"
    expect(await list_bills(ctx, intruder.query(nowhere)), denied, "ListBills on an account that does not exist")


@suite.case(
    "AUZ-3/read-not-on-account",
    description="Naming another consumer's bill, thread or intent under one's own account is NOT_FOUND",
    quote="A biller MUST look up the bill, thread or intent a request names only after AUZ-1 has passed, and only on "
    "the signer's bound accounts: one that does not exist there — whether it does not exist at all or belongs to "
    "another account — MUST be refused with `NOT_FOUND`.",
    needs=(FIXTURES,),
)
async def read_not_on_account(ctx: BillerTarget) -> None:
    _, bill, intent_id, thread_id = await _victim(ctx)
    intruder = await ctx.enrolled()
    party, own = intruder.party, intruder.account_id
    missing = Reason.NOT_FOUND
    expect(await get_bill(ctx, party.query(own, bill_id=bill.bill_id)), missing, "GetBill of another's bill")
    expect(await get_receipt(ctx, party.query(own, intent_id=intent_id)), missing, "GetReceipt of another's intent")
    if thread_id:
        expect(await get_thread(ctx, party.query(own, thread_id=thread_id)), missing, "GetThread of another's thread")
    expect(
        await get_bill(ctx, party.query(own, bill_id="cf-no-such-bill")),
        missing,
        "GetBill of a bill that does not exist",
    )


@suite.case(
    "AUZ-1/watch-other-account",
    description="A second enrolled consumer can never watch the first's events: ACCOUNT_ACCESS_DENIED",
    quote="Every request that names an account […] MUST be refused with `ACCOUNT_ACCESS_DENIED` unless its signer's "
    "party is bound to that account",
    needs=("events", FIXTURES),
)
async def watch_other_account(ctx: BillerTarget) -> None:
    victim = await ctx.enrolled()
    await ctx.issue_bill(victim)
    intruder = (await ctx.enrolled()).party
    async with ctx.conn.watch(intruder.query(victim.account_id)) as stream:
        try:
            answer = await stream.next(EVENT_WAIT)
        except TimeoutError:
            raise Violation("WatchEvents on another's account neither failed nor ended") from None
    if answer is None or not isinstance(answer, Refusal):
        raise Violation("WatchEvents on another consumer's account was served, not refused")
    expect(answer, Reason.ACCOUNT_ACCESS_DENIED, "WatchEvents on another consumer's account")


@suite.case(
    "AUZ-3/negotiate-other-bill",
    description="A second enrolled consumer can never negotiate on the first's bill or thread: NOT_FOUND",
    quote="A `ThreadOpen` names a bill by `bill_id` and a later move names its thread by `thread_id` only; they are "
    "refused with `NOT_FOUND` unless the bill, or the thread, is on an account bound to the signer.",
    needs=NEG,
)
async def negotiate_other_bill(ctx: BillerTarget) -> None:
    victim = await ctx.enrolled()
    bill, other_bill = await ctx.issue_bill(victim), await ctx.issue_bill(victim)
    thread = await agreed_thread(ctx, victim, other_bill)
    intruder = (await ctx.enrolled()).party
    opening = intruder.open(bill.bill_id, bill.digest, inside_options(bill))
    expect(await negotiate(ctx, opening), Reason.NOT_FOUND, "a ThreadOpen on another consumer's bill")
    offer = intruder.move(thread, negotiation_pb2.Offer(terms=outside_options(other_bill)))
    expect(await negotiate(ctx, offer), Reason.NOT_FOUND, "an Offer on another consumer's thread")
    _, answer = await open_thread(ctx, victim, bill, inside_options(bill))
    accepted(answer, "the owner's own opening on the bill (the intruder's must have changed nothing)")


@suite.case(
    "AUZ-1/pay-other-account",
    description="A second enrolled consumer can never pay on the first's account (ACCOUNT_ACCESS_DENIED) or bill "
    "(NOT_FOUND)",
    quote="Every request that names an account — `AccountQuery`, `PaymentIntent` and `ErasureRequest`, by "
    "`account_id` — MUST be refused with `ACCOUNT_ACCESS_DENIED` unless its signer's party is bound to that account",
    needs=(FIXTURES,),
)
async def pay_other_account(ctx: BillerTarget) -> None:
    victim = await ctx.enrolled()
    bill = await ctx.issue_bill(victim)
    intruder = await ctx.enrolled()
    theirs = intruder.party.intent(victim.account_id, bill.bill_id, "cf-intruder", money(AMOUNT_DUE))
    expect(await pay(ctx, theirs), Reason.ACCOUNT_ACCESS_DENIED, "a PaymentIntent on another consumer's account")
    own = intruder.party.intent(intruder.account_id, bill.bill_id, "cf-intruder", money(AMOUNT_DUE))
    expect(await pay(ctx, own), Reason.NOT_FOUND, "a PaymentIntent on one's own account naming another's bill")
    intent = victim.party.intent(victim.account_id, bill.bill_id, "cf-intruder", money(AMOUNT_DUE))
    accepted(await pay(ctx, intent), "the owner's own intent with the same intent_id (the intruder's changed nothing)")


@suite.case(
    "AUZ-4/query-shape",
    description="A query with a required field empty, or a field the RPC does not take, is MALFORMED_PAYLOAD",
    quote="a biller MUST refuse a query with a required field empty or another field set with `MALFORMED_PAYLOAD`.",
    needs=(FIXTURES,),
)
async def query_shape(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party, account = customer.party, customer.account_id
    malformed = Reason.MALFORMED_PAYLOAD
    expect(await list_bills(ctx, party.query(account, bill_id="cf-bill")), malformed, "ListBills naming a bill_id")
    expect(await get_bill(ctx, party.query(account)), malformed, "GetBill without a bill_id")
    expect(await get_receipt(ctx, party.query(account)), malformed, "GetReceipt without an intent_id")
    expect(await list_bills(ctx, party.query(account, start_sequence=3)), malformed, "ListBills with a start_sequence")


# === Negotiation (§9) ==================================================================================


def _outcome(response: Any) -> str:
    return str(OUTCOME.Name(response.outcome))


async def _unchanged(ctx: BillerTarget, customer: Customer, thread: list[envelope_pb2.Envelope], outcome: int) -> None:
    """GetThread still holds exactly `thread`, with `outcome` (a refused move changes nothing, §9.5)."""
    stored = await thread_of(ctx, customer, thread_id_of(thread[0]))
    if [m.SerializeToString() for m in stored.messages] != [m.SerializeToString() for m in thread]:
        raise Violation(f"the thread changed: GetThread holds {len(stored.messages)} messages, expected {len(thread)}")
    if stored.outcome != outcome:
        raise Violation(f"the thread is {_outcome(stored)}, expected {OUTCOME.Name(outcome)}")  # type: ignore[arg-type]


@suite.case(
    "NEG-12/options-accepted-at-once",
    description="An opening inside the advertised options is accepted at once, in the same call",
    quote="When the pending offer is the consumer's and its terms are *within the bill's options*, the biller's next "
    "move MUST be an Accept of it; any other biller move (a counter-Offer, a Reject, a Withdraw) is a violation, "
    "`OPTIONS_NOT_HONOURED`.",
    needs=NEG,
)
async def options_accepted_at_once(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    opening, answer = await open_thread(ctx, customer, bill, inside_options(bill))
    accepted(answer, "an opening inside the advertised options")
    if not answer.HasField("reply") or answer.reply.payload_type != "parley.v1.Accept":
        got = answer.reply.payload_type if answer.HasField("reply") else "no reply"
        raise Violation(f"an opening inside the advertised options was answered with {got}, not an Accept")
    reply = ctx.verify(answer.reply, NEGOTIATION_TYPES, customer, live=True, what="the Accept")
    message: Any = reply.message
    if message.offer_digest != digest_of(opening) or reply.header.previous_digest != digest_of(opening):
        raise Violation("the Accept does not name the opening's digest")
    if reply.header.sequence != 1 or reply.header.thread_id != thread_id_of(opening):
        raise Violation("the Accept is not at sequence 1 of the opening's thread")
    if answer.outcome != OUTCOME.Value("NEGOTIATION_OUTCOME_AGREED"):
        raise Violation(f"the answer reports outcome {_outcome(answer)}, not AGREED")
    await _unchanged(ctx, customer, [opening, answer.reply], OUTCOME.Value("NEGOTIATION_OUTCOME_AGREED"))


_REPLY_OUTCOMES = {
    "parley.v1.Offer": "NEGOTIATION_OUTCOME_OPEN",
    "parley.v1.Accept": "NEGOTIATION_OUTCOME_AGREED",
    "parley.v1.Reject": "NEGOTIATION_OUTCOME_REJECTED",
    "parley.v1.Withdraw": "NEGOTIATION_OUTCOME_WITHDRAWN",
}


@suite.case(
    "NEG-11/reply-in-same-call",
    description="An opening outside the options is answered in the same call by a signed move at sequence 1, with a "
    "matching outcome",
    quote="The biller MUST answer each consumer move within the same `Negotiate` call: when the consumer's move "
    "leaves the thread open with the biller to move, `NegotiateResponse.reply` carries the biller's signed move (next "
    "sequence, `previous_digest` = digest of the consumer's move) and `outcome` the thread's state after that reply",
    needs=NEG,
)
async def reply_in_same_call(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    opening, answer = await open_thread(ctx, customer, bill, outside_options(bill))
    accepted(answer, "an opening outside the advertised options")
    if not answer.HasField("reply"):
        raise Violation(f"no reply; outcome {_outcome(answer)}")
    reply = ctx.verify(answer.reply, NEGOTIATION_TYPES, customer, live=True, what="the reply")
    if reply.header.sequence != 1 or reply.header.previous_digest != digest_of(opening):
        raise Violation("the reply is not at sequence 1 chained to the opening")
    expected = _REPLY_OUTCOMES[answer.reply.payload_type]
    if _outcome(answer) != expected:
        raise Violation(f"a {answer.reply.payload_type} reply came with outcome {_outcome(answer)}, not {expected}")
    if answer.reply.payload_type == "parley.v1.Offer":
        _check_counter_terms(reply.message, bill)
    return f"answered with {answer.reply.payload_type}"


def _check_counter_terms(offer: Any, bill: IssuedBill) -> None:
    """NEG-16: the biller signs no offer whose terms the rules refuse (§8, with the bill)."""
    from agent.protocol.terms import BillFacts, Terms, validate_against_bill, validate_terms  # noqa: PLC0415

    try:
        facts = BillFacts.from_proto(bill.bill)
        counter = Terms.from_proto(offer.terms)
        validate_terms(counter)
        validate_against_bill(counter, facts)
    except ProtocolError as error:
        raise Violation(
            f"the biller's counter-offer has invalid terms (NEG-16): {error.reason.name}: {error.detail}"
        ) from error


@suite.case(
    "NEG-7/turns",
    description="The consumer moves at even sequences and the biller answers at the odd one after, in order",
    quote="The parties MUST move in turn: the consumer at even sequences (0, 2, 4, …), the biller at odd ones.",
    needs=NEG,
)
async def turns(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    offer = customer.party.move(thread, negotiation_pb2.Offer(terms=outside_options(bill)))
    answer = accepted(await negotiate(ctx, offer), "a counter to the biller's counter, at sequence 2")
    thread.append(offer)
    if answer.HasField("reply"):
        reply = ctx.verify(answer.reply, NEGOTIATION_TYPES, customer, live=True, what="the reply at sequence 3")
        if reply.header.sequence != 3 or reply.header.previous_digest != digest_of(offer):
            raise Violation("the biller's reply to sequence 2 is not at sequence 3 chained to it")
        thread.append(answer.reply)
    stored = await thread_of(ctx, customer, thread_id_of(thread[0]))
    senders = [PAYLOAD_TYPES[m.payload_type].FromString(m.payload).header.sender for m in stored.messages]  # type: ignore[attr-defined]
    expected = [customer.party_id if i % 2 == 0 else ctx.biller_id for i in range(len(thread))]
    if senders != expected or [m.SerializeToString() for m in stored.messages] != [
        m.SerializeToString() for m in thread
    ]:
        raise Violation(f"GetThread does not hold the thread in order, consumer at even sequences: senders {senders}")


@suite.case(
    "NEG-1/thread-open-position",
    description="A ThreadOpen inside a thread is WRONG_PAYLOAD_TYPE; a move opening no known thread is NOT_FOUND",
    quote="A `ThreadOpen` at any other sequence, or any other move at sequence 0, is refused with `WRONG_PAYLOAD_TYPE`",
    needs=NEG,
)
async def thread_open_position(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    header = {"thread_id": thread_id_of(thread[0]), "sequence": 2, "previous_digest": digest_of(thread[-1])}
    reopening = customer.party.open(bill.bill_id, bill.digest, outside_options(bill), header=header)
    expect(await negotiate(ctx, reopening), Reason.WRONG_PAYLOAD_TYPE, "a ThreadOpen at sequence 2 of the thread")
    await _unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))
    stray = negotiation_pb2.Offer(header=customer.party.header(), terms=outside_options(bill))
    expect(await negotiate(ctx, customer.party.sign(stray)), Reason.NOT_FOUND, "an Offer at sequence 0 of no thread")


@suite.case(
    "HDR-6/negotiation-sequence",
    description="A move at a sequence other than the thread's next is SEQUENCE_MISMATCH and changes nothing",
    quote="A receiver MUST refuse a message whose `sequence` is not the next one of its thread with "
    "`SEQUENCE_MISMATCH`.",
    needs=NEG,
)
async def negotiation_sequence(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    for sequence in (3, 1):
        move = customer.party.move(thread, negotiation_pb2.Withdraw(), header={"sequence": sequence})
        expect(await negotiate(ctx, move), Reason.SEQUENCE_MISMATCH, f"a Withdraw at sequence {sequence}, not 2")
    await _unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))
    accepted(await negotiate(ctx, customer.party.move(thread, negotiation_pb2.Withdraw())), "a Withdraw at sequence 2")


@suite.case(
    "HDR-7/negotiation-previous-digest",
    description="A move chained to another message than the thread's last is PREVIOUS_DIGEST_MISMATCH and changes "
    "nothing",
    quote="`previous_digest` MUST be empty at sequence 0 and MUST be the digest (ENV-11) of message `sequence − 1` of "
    "the same thread otherwise. A receiver MUST refuse any other value with `PREVIOUS_DIGEST_MISMATCH`.",
    needs=NEG,
)
async def negotiation_previous_digest(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    stale = customer.party.move(thread, negotiation_pb2.Withdraw(), header={"previous_digest": digest_of(thread[0])})
    expect(await negotiate(ctx, stale), Reason.PREVIOUS_DIGEST_MISMATCH, "a Withdraw chained to the opening")
    await _unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))
    accepted(
        await negotiate(ctx, customer.party.move(thread, negotiation_pb2.Withdraw())), "a correctly chained Withdraw"
    )


@suite.case(
    "NEG-5/round-limit",
    description="An offer beyond max_rounds is the violation ROUND_LIMIT_EXCEEDED: recorded, thread PROTOCOL_ERROR, "
    "a retry gets the same error",
    quote="A thread MUST NOT hold more offers than its `max_rounds`: an `Offer` made when the thread already holds "
    "`max_rounds` offers (the opening's counting as round 1) is a violation, `ROUND_LIMIT_EXCEEDED`.",
    needs=NEG,
)
async def round_limit(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill, max_rounds=2)
    offer = customer.party.move(thread, negotiation_pb2.Offer(terms=outside_options(bill)))
    expect(await negotiate(ctx, offer), Reason.ROUND_LIMIT_EXCEEDED, "a third offer in a thread of max_rounds 2")
    expect(await negotiate(ctx, offer), Reason.ROUND_LIMIT_EXCEEDED, "the same violating offer, retried (NEG-18)")
    await _unchanged(ctx, customer, [*thread, offer], OUTCOME.Value("NEGOTIATION_OUTCOME_PROTOCOL_ERROR"))


@suite.case(
    "NEG-9/accept-stale-digest",
    description="An Accept naming another digest than the pending offer is the violation ACCEPT_DIGEST_MISMATCH",
    quote="An `Accept` MUST name, in `offer_digest`, exactly the digest of the message (`ThreadOpen` or `Offer`) that "
    "carried the other party's pending offer […] An Accept with no pending offer of the other party, or naming any "
    "other digest, is a violation, `ACCEPT_DIGEST_MISMATCH`.",
    needs=NEG,
)
async def accept_stale_digest(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    stale = customer.party.move(thread, negotiation_pb2.Accept(offer_digest=digest_of(thread[0])))
    expect(await negotiate(ctx, stale), Reason.ACCEPT_DIGEST_MISMATCH, "an Accept naming the consumer's own opening")
    expect(await negotiate(ctx, stale), Reason.ACCEPT_DIGEST_MISMATCH, "the same violating Accept, retried (NEG-18)")
    await _unchanged(ctx, customer, [*thread, stale], OUTCOME.Value("NEGOTIATION_OUTCOME_PROTOCOL_ERROR"))


@suite.case(
    "NEG-9/accept-exact",
    description="An Accept naming exactly the biller's pending offer ends the thread AGREED, with no reply",
    quote="when the consumer's move ended the thread (Accept, Reject, Withdraw), `reply` is absent and `outcome` is "
    "the thread's outcome",
    needs=NEG,
)
async def accept_exact(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    accept = customer.party.move(thread, negotiation_pb2.Accept(offer_digest=digest_of(thread[-1])))
    answer = accepted(await negotiate(ctx, accept), "an Accept naming the biller's counter-offer")
    if answer.HasField("reply") or _outcome(answer) != "NEGOTIATION_OUTCOME_AGREED":
        raise Violation(f"the Accept was answered with a reply or outcome {_outcome(answer)}, not AGREED and no reply")
    await _unchanged(ctx, customer, [*thread, accept], OUTCOME.Value("NEGOTIATION_OUTCOME_AGREED"))


@suite.case(
    "NEG-14/terminal-refuses",
    description="Every move on a thread that has an outcome is refused with THREAD_CLOSED, and nothing changes",
    quote="A thread that has an outcome is closed for good: every further move on it MUST be refused with "
    "`THREAD_CLOSED`, and nothing in the thread changes.",
    needs=NEG,
)
async def terminal_refuses(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await agreed_thread(ctx, customer, bill)
    moves: list[tuple[str, Message]] = [
        ("an Offer", negotiation_pb2.Offer(terms=outside_options(bill))),
        ("a Withdraw", negotiation_pb2.Withdraw()),
        ("an Accept of the biller's Accept", negotiation_pb2.Accept(offer_digest=digest_of(thread[-1]))),
    ]
    for name, message in moves:
        expect(await negotiate(ctx, customer.party.move(thread, message)), Reason.THREAD_CLOSED, f"{name} after AGREED")
    await _unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_AGREED"))


@suite.case(
    "NEG-2/bill-digest-mismatch",
    description="An opening naming another digest than the bill's is refused with BILL_DIGEST_MISMATCH",
    quote="a biller MUST refuse an opening whose `bill_digest` is not the digest of the bill it issued under "
    "`bill_id`, with `BILL_DIGEST_MISMATCH`.",
    needs=NEG,
)
async def bill_digest_mismatch(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    wrong = customer.party.open(bill.bill_id, secrets.token_bytes(32), inside_options(bill))
    expect(await negotiate(ctx, wrong), Reason.BILL_DIGEST_MISMATCH, "an opening naming a random bill digest")
    _, answer = await open_thread(ctx, customer, bill, inside_options(bill))
    accepted(answer, "a correct opening on the same bill (the refused one must have changed nothing)")


@suite.case(
    "NEG-4/limits-invalid",
    description="An opening whose max_rounds or deadline is outside the announced limits is NEGOTIATION_LIMITS_INVALID",
    quote="A biller MUST refuse, with `NEGOTIATION_LIMITS_INVALID`, an opening whose limits are outside its "
    "`Limits` (§14) […] the opening requires `1 ≤ max_rounds ≤ Limits.max_rounds` and `create_time < deadline ≤ "
    "create_time + Limits.max_negotiation_time` […] A missing `deadline` is refused with the same reason.",
    needs=NEG,
)
async def limits_invalid(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    max_rounds = ctx.limits.max_rounds or DEFAULT_LIMITS.max_rounds
    longest = timedelta(seconds=ctx.limits.max_negotiation_seconds) or DEFAULT_LIMITS.max_negotiation_time
    now = ctx.now()
    for name, options in (
        (f"max_rounds {max_rounds + 1}", {"max_rounds": max_rounds + 1}),
        ("max_rounds 0", {"max_rounds": 0}),
        ("a deadline beyond max_negotiation_seconds", {"deadline": now + longest + timedelta(minutes=5)}),
        ("a deadline before its creation", {"deadline": now - timedelta(minutes=1)}),
        ("no deadline", {"no_deadline": True}),
    ):
        opening = customer.party.open(
            bill.bill_id, bill.digest, inside_options(bill), header={"create_time": now}, **options
        )
        expect(await negotiate(ctx, opening), Reason.NEGOTIATION_LIMITS_INVALID, f"an opening with {name}")
    _, answer = await open_thread(ctx, customer, bill, inside_options(bill), max_rounds=max_rounds)
    accepted(answer, f"an opening with max_rounds {max_rounds} (the refused ones must have changed nothing)")


@suite.case(
    "NEG-3/not-negotiable",
    description="An opening on a bill already under an arrangement is refused with BILL_NOT_NEGOTIABLE",
    quote="A biller MUST refuse an opening on a bill that is not negotiable, with `BILL_NOT_NEGOTIABLE`. A bill is not "
    "negotiable when […] it is under an active arrangement (a thread on it ended `AGREED` […])",
    needs=NEG,
)
async def not_negotiable(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    await agreed_thread(ctx, customer, bill)
    _, answer = await open_thread(ctx, customer, bill, outside_options(bill))
    expect(answer, Reason.BILL_NOT_NEGOTIABLE, "a second opening on a bill whose thread ended AGREED")


@suite.case(
    "NEG-10/reject-form",
    description="A Reject with an unspecified or undefined reason, or an over-long note, is MALFORMED_PAYLOAD",
    quote="A `Reject` MUST carry a defined `RejectReason` other than `REJECT_REASON_UNSPECIFIED`; "
    "`REJECT_REASON_UNSPECIFIED` or a number the enum does not define is refused with `MALFORMED_PAYLOAD` […] and the "
    "`note` of a `Reject` or `Withdraw` MUST be at most 200 characters (`MAX_TEXT_CHARS`), else `MALFORMED_PAYLOAD`.",
    needs=NEG,
)
async def reject_form(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    out_of_policy = negotiation_pb2.REJECT_REASON_OUT_OF_POLICY
    for name, message in (
        ("an unspecified reason", negotiation_pb2.Reject(reason=negotiation_pb2.REJECT_REASON_UNSPECIFIED)),
        ("reason number 99", negotiation_pb2.Reject(reason=99)),  # type: ignore[arg-type]
        ("a 201-character note", negotiation_pb2.Reject(reason=out_of_policy, note="n" * 201)),
        ("a Withdraw with a 201-character note", negotiation_pb2.Withdraw(note="n" * 201)),
    ):
        move = customer.party.move(thread, message)
        expect(await negotiate(ctx, move), Reason.MALFORMED_PAYLOAD, f"a move with {name}")
    await _unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))
    answer = accepted(
        await negotiate(ctx, customer.party.move(thread, negotiation_pb2.Reject(reason=out_of_policy, note="n" * 200))),
        "a Reject with a defined reason and a 200-character note",
    )
    if _outcome(answer) != "NEGOTIATION_OUTCOME_REJECTED":
        raise Violation(f"the Reject left the thread {_outcome(answer)}, not REJECTED (NEG-13)")


# === Terms (§8), judged in openings (NEG-8) ==========================================================


def _terms_case(  # noqa: PLR0917 - a table of cases reads best positionally
    case_id: str,
    description: str,
    quote: str,
    reason: Reason,
    variants: dict[str, Any],
    needs: tuple[str, ...] = NEG,
) -> None:
    """Each variant (bill -> Terms or None) opened on a fresh bill must be refused with `reason`; nothing changes."""

    @suite.case(case_id, description=description, quote=quote, needs=needs)
    async def body(ctx: BillerTarget) -> None:
        customer = await ctx.enrolled()
        bill = await ctx.issue_bill(customer)
        for name, make in variants.items():
            _, answer = await open_thread(ctx, customer, bill, make(bill))
            expect(answer, reason, f"an opening with {name}")
        _, answer = await open_thread(ctx, customer, bill, inside_options(bill))
        accepted(answer, "a valid opening on the same bill (the refused ones must have changed nothing)")


_DEFERRAL, _PLAN = terms_pb2.TERMS_KIND_DEFERRAL, terms_pb2.TERMS_KIND_INSTALMENT_PLAN
_FEE, _DISCOUNT = terms_pb2.LINE_KIND_FEE, terms_pb2.LINE_KIND_DISCOUNT


def _late(bill: IssuedBill, days: int = INSIDE_DAYS) -> date:
    return bill.due_date + timedelta(days=days)


_terms_case(
    "TRM-8/schedule-sum",
    "Terms whose schedule does not sum to the total are refused with SCHEDULE_SUM_MISMATCH",
    "The schedule's amounts MUST sum exactly to `total`; else `SCHEDULE_SUM_MISMATCH`.",
    Reason.SCHEDULE_SUM_MISMATCH,
    {
        "a schedule one cent short": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE - 1)], lines=[(_FEE, DEFERRAL_FEE)]
        ),
    },
)
_terms_case(
    "TRM-7/total-mismatch",
    "Terms whose total is not principal plus fees minus discounts are refused with TOTAL_MISMATCH",
    "`total` MUST equal `principal + Σ FEE − Σ DISCOUNT − Σ SETTLEMENT_REDUCTION` over the lines, exactly, in minor "
    "units; else `TOTAL_MISMATCH`.",
    Reason.TOTAL_MISMATCH,
    {
        "a total one cent above the sum": lambda b: terms(
            _DEFERRAL,
            [(_late(b), AMOUNT_DUE + DEFERRAL_FEE + 1)],
            lines=[(_FEE, DEFERRAL_FEE)],
            total=AMOUNT_DUE + DEFERRAL_FEE + 1,
        ),
    },
)
_terms_case(
    "TRM-11/principal-mismatch",
    "Terms whose principal is not the bill's amount due are refused with PRINCIPAL_MISMATCH",
    "`principal` MUST equal the bill's `amount_due`, currency and minor units: a principal in another currency is "
    "refused with `CURRENCY_MISMATCH` (TRM-2), one of another amount with `PRINCIPAL_MISMATCH`.",
    Reason.PRINCIPAL_MISMATCH,
    {
        "a principal EUR 10.00 below the amount due": lambda b: terms(
            _DEFERRAL,
            [(_late(b), AMOUNT_DUE - 1_000 + DEFERRAL_FEE)],
            principal=AMOUNT_DUE - 1_000,
            lines=[(_FEE, DEFERRAL_FEE)],
        ),
    },
)
_terms_case(
    "TRM-2/currency-mismatch",
    "Terms mixing currencies, or in another currency than the bill, are refused with CURRENCY_MISMATCH",
    "All amounts of one message MUST be in one currency […] and terms MUST be in the currency of the bill they settle. "
    "A receiver MUST refuse a mix with `CURRENCY_MISMATCH`.",
    Reason.CURRENCY_MISMATCH,
    {
        "a fee line in USD": lambda b: terms_pb2.Terms(
            kind=_DEFERRAL,
            principal=money(AMOUNT_DUE),
            lines=[terms_pb2.Line(kind=_FEE, description="fee", amount=money(DEFERRAL_FEE, "USD"))],
            total=money(AMOUNT_DUE + DEFERRAL_FEE),
            schedule=[terms_pb2.Instalment(due_date=_late(b).isoformat(), amount=money(AMOUNT_DUE + DEFERRAL_FEE))],
        ),
        "terms wholly in USD": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE)], currency="USD"
        ),
    },
)
_terms_case(
    "TRM-1/unknown-currency",
    "Amounts in a code that is not an ISO 4217 currency with minor units are refused with UNKNOWN_CURRENCY",
    'Codes whose minor unit is "N.A." (XAU, XAG, XDR, XXX…), unknown codes, lower-case or otherwise malformed codes '
    "and the empty string MUST be refused with `UNKNOWN_CURRENCY`.",
    Reason.UNKNOWN_CURRENCY,
    {
        f"currency {code!r}": (
            lambda b, code=code: terms(
                _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE)], currency=code
            )
        )
        for code in ("XXX", "eur", "EURO", "")
    },
)
_terms_case(
    "TRM-4/invalid-date",
    "A schedule date that is not a valid YYYY-MM-DD day is refused with INVALID_DATE",
    "A receiver MUST refuse anything else — the empty string, `2026-2-1`, `2026-02-30`, `2026-02-01T00:00` — with "
    "`INVALID_DATE`.",
    Reason.INVALID_DATE,
    {
        f"schedule date {text!r}": (
            lambda b, text=text: terms(_DEFERRAL, [(text, AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE)])
        )
        for text in ("2027-02-30", "2027-2-1", "2027-02-01T00:00", "")
    },
)
_terms_case(
    "TRM-5/invalid-terms",
    "Terms of no kind, of the wrong shape, or missing are refused with INVALID_TERMS",
    "Undefined or unspecified kinds (ENV-13), a missing `terms` where an offer needs them (NEG-8), and any shape not "
    "allowed below MUST be refused with `INVALID_TERMS`.",
    Reason.INVALID_TERMS,
    {
        "TERMS_KIND_UNSPECIFIED": lambda b: terms(terms_pb2.TERMS_KIND_UNSPECIFIED, [(_late(b), AMOUNT_DUE)]),
        "kind number 42": lambda b: terms(42, [(_late(b), AMOUNT_DUE)]),
        "a DEFERRAL in two payments": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE // 2), (_late(b, 25), AMOUNT_DUE // 2)]
        ),
        "a DISCOUNT line on a DEFERRAL": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE - 100)], lines=[(_DISCOUNT, 100)]
        ),
        "no terms": lambda b: None,
    },
)
_terms_case(
    "TRM-9/dates-not-increasing",
    "An instalment plan whose dates do not strictly increase is refused with SCHEDULE_DATES_NOT_INCREASING",
    "Schedule dates MUST be strictly increasing; a date equal to or before the one before it is refused with "
    "`SCHEDULE_DATES_NOT_INCREASING`.",
    Reason.SCHEDULE_DATES_NOT_INCREASING,
    {
        "two instalments on one date": lambda b: terms(
            _PLAN, [(_late(b), AMOUNT_DUE // 2), (_late(b), AMOUNT_DUE // 2)]
        ),
        "a second instalment before the first": lambda b: terms(
            _PLAN, [(_late(b, 20), AMOUNT_DUE // 2), (_late(b, 5), AMOUNT_DUE // 2)]
        ),
    },
    needs=("negotiation", "instalments", FIXTURES),
)


# === Payments (§10) ===================================================================================


def _intent(customer: Customer, bill: IssuedBill, intent_id: str, amount: int = AMOUNT_DUE, **options: Any) -> Any:
    return customer.party.intent(customer.account_id, bill.bill_id, intent_id, money(amount), **options)


@suite.case(
    "PAY-2/same-intent-same-instructions",
    description="The same intent twice gets byte-identical instructions; settlement yields one receipt and never a "
    "second payment",
    quote="every later intent with that `intent_id` and the same content […] is answered with the same "
    "`PaymentInstructions` envelope, byte for byte, whatever the later intent's header says",
    needs=(FIXTURES,),
)
async def same_intent_same_instructions(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    first = _intent(customer, bill, "cf-pay-once")
    answer = accepted(await pay(ctx, first), "a PaymentIntent for the bill's amount")
    instructions = answer.instructions
    _check_instructions(ctx, customer, first, instructions)
    for name, intent in (
        ("the very same intent envelope, sent again", first),
        ("a new intent message with the same intent_id and content", _intent(customer, bill, "cf-pay-once")),
    ):
        again = accepted(await pay(ctx, intent), name)
        if again.instructions.SerializeToString() != instructions.SerializeToString():
            raise Violation(f"{name} was answered with other instructions: a second payment was instructed")
    setup(await ctx.conn.settle_payments(), "SettlePayments")
    receipt_query = customer.party.query(customer.account_id, intent_id="cf-pay-once")
    receipt = accepted(await get_receipt(ctx, receipt_query), "GetReceipt after SettlePayments")
    _check_receipt(ctx, customer, instructions, receipt.receipt)
    late = accepted(await pay(ctx, first), "the first intent, retried after settlement")
    if late.instructions.SerializeToString() != instructions.SerializeToString():
        raise Violation("the intent retried after settlement was answered with other instructions")
    twice = accepted(
        await get_receipt(ctx, customer.party.query(customer.account_id, intent_id="cf-pay-once")), "GetReceipt again"
    )
    if twice.receipt.SerializeToString() != receipt.receipt.SerializeToString():
        raise Violation("GetReceipt returned another receipt the second time")
    expect(
        await pay(ctx, _intent(customer, bill, "cf-pay-twice")),
        Reason.PAYMENT_AMOUNT_MISMATCH,
        "a second intent (new intent_id) paying the settled bill again (PAY-3, PAY-7)",
    )


def _check_instructions(ctx: BillerTarget, customer: Customer, intent: Any, instructions: Any) -> None:
    """PAY-4: signed, at sequence 1 of the intent's thread, chained to it, for the intent's amount."""
    verified = ctx.verify(
        instructions, (payment_pb2.PaymentInstructions,), customer, live=True, what="the instructions"
    )
    sent = payment_pb2.PaymentIntent.FromString(intent.payload)
    message: Any = verified.message
    header = verified.header
    problems = [
        "not in the intent's thread" if header.thread_id != sent.header.thread_id else "",
        f"at sequence {header.sequence}, not 1" if header.sequence != 1 else "",
        "previous_digest is not the intent's digest" if header.previous_digest != digest_of(intent) else "",
        f"intent_id {message.intent_id!r}" if message.intent_id != sent.intent_id else "",
        "amount differs from the intent's" if message.amount != sent.amount else "",
        "empty payment_reference" if not message.payment_reference else "",
        "no pay_by_time" if not message.HasField("pay_by_time") else "",
    ]
    if any(problems):
        raise Violation("the instructions (PAY-4): " + "; ".join(p for p in problems if p))


def _check_receipt(ctx: BillerTarget, customer: Customer, instructions: Any, receipt: Any) -> None:
    """PAY-6: at sequence 2 chained to the instructions, for the instructed amount."""
    verified = ctx.verify(receipt, (payment_pb2.Receipt,), customer, live=False, what="the receipt")
    instructed = payment_pb2.PaymentInstructions.FromString(instructions.payload)
    message: Any = verified.message
    header = verified.header
    problems = [
        f"at sequence {header.sequence}, not 2" if header.sequence != 2 else "",
        "previous_digest is not the instructions' digest" if header.previous_digest != digest_of(instructions) else "",
        "amount_received differs from the instructed amount" if message.amount_received != instructed.amount else "",
        f"intent_id {message.intent_id!r}" if message.intent_id != instructed.intent_id else "",
    ]
    if any(problems):
        raise Violation("the receipt (PAY-6): " + "; ".join(p for p in problems if p))


@suite.case(
    "PAY-2/idempotency-conflict",
    description="An intent reusing an intent_id with different content is refused with IDEMPOTENCY_CONFLICT",
    quote="an intent that reuses an `intent_id` with different content is refused with `IDEMPOTENCY_CONFLICT`. The "
    "idempotency check comes before every check of PAY-3",
    needs=(FIXTURES,),
)
async def idempotency_conflict(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    setup(await pay(ctx, _intent(customer, bill, "cf-conflict")), "a PaymentIntent for the bill's amount")
    expect(
        await pay(ctx, _intent(customer, bill, "cf-conflict", AMOUNT_DUE - 1)),
        Reason.IDEMPOTENCY_CONFLICT,
        "the same intent_id for another amount",
    )


@suite.case(
    "PAY-3/amount-mismatch",
    description="An intent for another amount than owed, or an instalment index without agreement, is "
    "PAYMENT_AMOUNT_MISMATCH",
    quote="The biller refuses an intent whose amount differs, whose `instalment_index` is outside the schedule (or not "
    "0 without an agreement), or that pays an instalment or bill already settled (nothing is owed), with "
    "`PAYMENT_AMOUNT_MISMATCH`; an `agreement_digest` that is not the `Accept` of an `AGREED` thread on that bill and "
    "account is `NOT_FOUND`.",
    needs=(FIXTURES,),
)
async def amount_mismatch(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    mismatch = Reason.PAYMENT_AMOUNT_MISMATCH
    expect(await pay(ctx, _intent(customer, bill, "cf-short", AMOUNT_DUE - 1)), mismatch, "an intent one cent short")
    expect(
        await pay(ctx, _intent(customer, bill, "cf-index", instalment_index=1)),
        mismatch,
        "instalment_index 1 without an agreement",
    )
    expect(
        await pay(ctx, _intent(customer, bill, "cf-agreement", agreement_digest=secrets.token_bytes(32))),
        Reason.NOT_FOUND,
        "an agreement_digest naming no agreement",
    )
    accepted(await pay(ctx, _intent(customer, bill, "cf-right")), "an intent for the amount due")


@suite.case(
    "PAY-1/intent-form",
    description="A malformed intent_id is MALFORMED_PAYLOAD; a bill not on the account is NOT_FOUND",
    quote="A payment MUST start with a `PaymentIntent` signed by the consumer […] whose `intent_id` is 1 to 64 "
    "characters of `[A-Za-z0-9_-]` (else `MALFORMED_PAYLOAD`), whose `account_id` is the signer's account (AUZ-1) "
    "and whose `bill_id` names a bill of that account (`NOT_FOUND` otherwise)",
    needs=(FIXTURES,),
)
async def intent_form(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    for intent_id in ("bad id!", "", "x" * 65, "é"):
        expect(
            await pay(ctx, _intent(customer, bill, intent_id)),
            Reason.MALFORMED_PAYLOAD,
            f"intent_id {intent_id[:16]!r}",
        )
    stray = customer.party.intent(customer.account_id, "cf-no-such-bill", "cf-stray", money(AMOUNT_DUE))
    expect(await pay(ctx, stray), Reason.NOT_FOUND, "an intent for a bill that does not exist")


@suite.case(
    "PAY-5/not-settled",
    description="GetReceipt before settlement is PAYMENT_NOT_SETTLED; for an unknown intent, NOT_FOUND",
    quote="`GetReceipt` (a signed `AccountQuery` naming `intent_id`) before settlement MUST fail with "
    "`PAYMENT_NOT_SETTLED`, and for an intent unknown on the account with `NOT_FOUND`.",
    needs=(FIXTURES,),
)
async def not_settled(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    setup(await pay(ctx, _intent(customer, bill, "cf-unsettled")), "a PaymentIntent for the bill's amount")
    query = customer.party.query(customer.account_id, intent_id="cf-unsettled")
    expect(await get_receipt(ctx, query), Reason.PAYMENT_NOT_SETTLED, "GetReceipt before settlement")
    unknown = customer.party.query(customer.account_id, intent_id="cf-never-made")
    expect(await get_receipt(ctx, unknown), Reason.NOT_FOUND, "GetReceipt for an intent never made")


@suite.case(
    "PAY-3/agreement",
    description="Under an agreement the intent pays the agreed instalment; the bill's plain amount is then "
    "PAYMENT_AMOUNT_MISMATCH",
    quote="with an `agreement_digest`, the amount of instalment `instalment_index` (zero-based) of the schedule of the "
    "agreement whose `Accept` has that digest; without one, the bill's `amount_due`, with `instalment_index` 0 — and "
    "only while nothing has been received on the bill and it is not under an active arrangement",
    needs=NEG,
)
async def agreement_payment(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await agreed_thread(ctx, customer, bill)
    agreement = digest_of(thread[-1])
    expect(
        await pay(ctx, _intent(customer, bill, "cf-plain")),
        Reason.PAYMENT_AMOUNT_MISMATCH,
        "the bill's amount due, without the agreement, on a bill under arrangement",
    )
    agreed = _intent(customer, bill, "cf-agreed", AMOUNT_DUE + DEFERRAL_FEE, agreement_digest=agreement)
    answer = accepted(await pay(ctx, agreed), "the agreed deferral's one payment, naming the agreement")
    _check_instructions(ctx, customer, agreed, answer.instructions)


# === Events (§11) ======================================================================================


async def _read_until(
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


@suite.case(
    "EVT-1/signed-chained-log",
    description="The event log is the account's signed chain from sequence 0, BILL_ISSUED naming the bill exactly",
    quote="The biller MUST keep, per account, an append-only log of signed events: payloadType `parley.v1.Event`, "
    "`sender` = the biller, `recipient` = the consumer party enrolled on the account, `header.thread_id` = the "
    "account's event log id (§5.2), `header.sequence` = the event's position in the log from 0 without gaps, "
    "`header.previous_digest` = the digest of the event before it",
    needs=("events", FIXTURES),
)
async def signed_chained_log(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bills = [await ctx.issue_bill(customer), await ctx.issue_bill(customer)]
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        events = await _read_until(stream, customer, ctx, {b.bill_id for b in bills}, 0)
    by_bill = {}
    for envelope in events:
        event = event_pb2.Event.FromString(envelope.payload)
        if event.kind == event_pb2.EVENT_KIND_BILL_ISSUED:
            by_bill[event.bill_id] = event
    for bill in bills:
        event = by_bill[bill.bill_id]
        if (
            event.amount != bill.bill.amount_due
            or event.date != bill.bill.due_date
            or event.related_digest != bill.digest
        ):
            raise Violation(
                f"BILL_ISSUED of {bill.bill_id} does not carry the amount due, the due date and the bill's digest "
                "(EVT-2)"
            )
    return f"{len(events)} events verified"


@suite.case(
    "EVT-3/cursor-out-of-range",
    description="WatchEvents from beyond the end of the log is refused with CURSOR_OUT_OF_RANGE",
    quote="the biller MUST refuse a `start_sequence` greater than the log's next sequence (the number of events in the "
    "log) with `CURSOR_OUT_OF_RANGE`.",
    needs=("events", FIXTURES),
)
async def cursor_out_of_range(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    async with ctx.conn.watch(customer.party.query(customer.account_id, start_sequence=1 << 40)) as stream:
        try:
            answer = await stream.next(EVENT_WAIT)
        except TimeoutError:
            raise Violation("WatchEvents from sequence 2^40 neither failed nor ended") from None
    if not isinstance(answer, Refusal):
        raise Violation("WatchEvents from sequence 2^40 of a short log was served, not refused")
    expect(answer, Reason.CURSOR_OUT_OF_RANGE, "WatchEvents from sequence 2^40")


@suite.case(
    "EVT-4/resume-from-cursor",
    description="A resumed watch delivers every event from its cursor, same bytes, no gap or duplicate, then live "
    "events",
    quote="The biller MUST stream every event with sequence ≥ `start_sequence`, in increasing sequence order without "
    "gaps, and then each new event as it is appended, for as long as the stream stays open.",
    needs=("events", FIXTURES),
)
async def resume_from_cursor(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    first = [await ctx.issue_bill(customer) for _ in range(3)]
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        seen = await _read_until(stream, customer, ctx, {b.bill_id for b in first}, 0)
    later = [await ctx.issue_bill(customer) for _ in range(2)]
    cursor = 1
    async with ctx.conn.watch(customer.party.query(customer.account_id, start_sequence=cursor)) as stream:
        resumed = await _read_until(stream, customer, ctx, {b.bill_id for b in later}, cursor)
        overlap = seen[cursor:]
        if [e.SerializeToString() for e in resumed[: len(overlap)]] != [e.SerializeToString() for e in overlap]:
            raise Violation("the resumed stream delivered the already-seen events with other bytes (EVT-1)")
        live = await ctx.issue_bill(customer)
        tail = await _read_until(stream, customer, ctx, {live.bill_id}, cursor + len(resumed))
    return f"resumed at {cursor}: {len(resumed)} events, then {len(tail)} live"


# === Privacy (§12) =====================================================================================


@suite.case(
    "PRV-3/disclosure-mismatch",
    description="A disclosure that is not the one the opening commits to, or comes without one, is MALFORMED_PAYLOAD",
    quote="A receiver MUST refuse a `Negotiate` request with `MALFORMED_PAYLOAD` (nothing changes) when a disclosure "
    "comes without a `disclosure_digest` or with any move other than a `ThreadOpen`, when a `disclosure_digest` comes "
    "without a disclosure, when the digest is not 32 bytes or not the SHA-256 of the disclosure bytes",
    needs=("negotiation", "hardship", FIXTURES),
)
async def disclosure_mismatch(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    committed, sent = disclosure_bytes(), disclosure_bytes()
    digest = hashlib.sha256(committed).digest()
    opening = customer.party.open(bill.bill_id, bill.digest, inside_options(bill), disclosure_digest=digest)
    expect(await negotiate(ctx, opening, sent), Reason.MALFORMED_PAYLOAD, "a disclosure other than the committed one")
    expect(await negotiate(ctx, opening), Reason.MALFORMED_PAYLOAD, "a committed disclosure that was not sent")
    plain = customer.party.open(bill.bill_id, bill.digest, inside_options(bill))
    expect(await negotiate(ctx, plain, sent), Reason.MALFORMED_PAYLOAD, "a disclosure beside an opening without digest")
    accepted(await negotiate(ctx, opening, committed), "the opening with the disclosure it commits to")


@suite.case(
    "PRV-4/erasure",
    description="RequestErasure answers a signed confirmation at sequence 1 of the request's thread; a retry gets it "
    "again",
    quote="it MUST answer with a signed `ErasureConfirmation` at sequence 1 of the request's thread (`previous_digest` "
    "= the request's digest) whose `erased_count` is the number of disclosures erased (0 when there were none, as on "
    "a repeated request).",
    needs=("erasure", FIXTURES),
)
async def erasure(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    request = customer.party.erasure(customer.account_id)
    rpc = biller_service_pb2.RequestErasureRequest(request=request)
    answer = accepted(await ctx.conn.call("RequestErasure", rpc), "RequestErasure on the signer's own account")
    types = (account_pb2.ErasureConfirmation,)
    verified = ctx.verify(answer.confirmation, types, customer, live=True, what="the erasure confirmation")
    sent = account_pb2.ErasureRequest.FromString(request.payload).header
    header, message = verified.header, verified.message
    if header.sequence != 1 or header.thread_id != sent.thread_id or header.previous_digest != digest_of(request):
        raise Violation("the confirmation is not at sequence 1 of the request's thread, chained to it")
    if message.account_id != customer.account_id or message.erased_count != 0:  # type: ignore[attr-defined]
        raise Violation("the confirmation names another account or erased disclosures that were never made")
    again = accepted(await ctx.conn.call("RequestErasure", rpc), "the same RequestErasure, retried")
    if again.confirmation.SerializeToString() != answer.confirmation.SerializeToString():
        raise Violation("the retried request was answered with another confirmation (HDR-12)")


# === Enrolment codes, times (ENR-7, HDR-14) ==========================================================

_CODE_FORM = re.compile(r"[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}")


@suite.case(
    "ENR-7/code-normalised",
    description="Codes are three hyphenated groups of four Crockford base32 characters, compared after normalisation",
    quote="An enrolment code MUST be 12 characters drawn independently and uniformly from Crockford's base32 alphabet "
    "[…] written as three groups of four joined by hyphens […] the biller MUST apply the same normalisation before "
    "comparing.",
    needs=(FIXTURES,),
)
async def code_normalised(ctx: BillerTarget) -> str:
    account = await ctx.new_account()
    code = account.enrolment_code
    if not _CODE_FORM.fullmatch(code):
        raise Violation(f"the enrolment code {code!r} is not three groups of four Crockford base32 characters")
    typed = " ".join(code.replace("-", "").lower().replace("0", "o").replace("1", "l"))
    party = ctx.new_party()
    accepted(await enrol(ctx, party.enrolment(account.account_id, typed)), f"Enrol with the code typed as {typed!r}")
    return f"{code} accepted as {typed!r}"


@suite.case(
    "HDR-14/microsecond-times",
    description="The biller writes times in whole microseconds and gives its replies short lifetimes",
    quote="Senders SHOULD write times in whole microseconds (`nanos` a multiple of 1,000), since some implementations "
    "compare times at microsecond precision, and SHOULD choose the shortest lifetime that serves the message",
    level=SHOULD,
    needs=(FIXTURES,),
)
async def microsecond_times(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    answer = accepted(await pay(ctx, _intent(customer, bill, "cf-times")), "a PaymentIntent")
    assert customer.confirmation is not None
    for what, envelope in (
        ("the enrolment confirmation", customer.confirmation.confirmation),
        ("the bill", bill.envelope),
        ("the payment instructions", answer.instructions),
    ):
        header = PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload).header  # type: ignore[attr-defined]
        if header.create_time.nanos % 1000 or header.expire_time.nanos % 1000:
            raise Violation(f"{what} carries times with nanosecond digits")
        lifetime = header.expire_time.ToDatetime() - header.create_time.ToDatetime()
        if lifetime > ctx.max_lifetime:
            raise Violation(f"{what} has a lifetime of {lifetime}, above the maximum")


@suite.case(
    "EVT-6/payment-thanked",
    description="A settled payment is followed by a PAYMENT_RECEIVED event naming the receipt",
    quote="[A biller] SHOULD thank the consumer on every payment with a `PAYMENT_RECEIVED` event.",
    level=SHOULD,
    needs=("events", FIXTURES),
)
async def payment_thanked(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    setup(await pay(ctx, _intent(customer, bill, "cf-thanks")), "a PaymentIntent")
    setup(await ctx.conn.settle_payments(), "SettlePayments")
    receipt = await get_receipt(ctx, customer.party.query(customer.account_id, intent_id="cf-thanks"))
    setup(receipt, "GetReceipt after SettlePayments")
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        while True:
            envelope = await first_event(stream, "waiting for PAYMENT_RECEIVED")
            event = event_pb2.Event.FromString(envelope.payload)
            if event.kind == event_pb2.EVENT_KIND_PAYMENT_RECEIVED and event.bill_id == bill.bill_id:
                break
    if event.related_digest != digest_of(receipt.receipt):
        raise Violation("PAYMENT_RECEIVED does not name the receipt's digest (EVT-2)")


# === Cases that move the biller's clock (last, so that earlier cases run at an unmoved clock) =========


@suite.case(
    "NEG-6/deadline",
    description="A move after the thread's deadline is NEGOTIATION_DEADLINE_PASSED and the thread becomes EXPIRED",
    quote="A receiver MUST refuse a move received after the thread's `deadline` — `now > deadline`, where `now` is the "
    "receiver's own clock at reception […] — with `NEGOTIATION_DEADLINE_PASSED`, and the thread becomes `EXPIRED`.",
    needs=NEG,
)
async def deadline(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill, deadline=ctx.now() + timedelta(hours=1))
    await ctx.advance_clock(2 * 3600)
    late = customer.party.move(thread, negotiation_pb2.Offer(terms=outside_options(bill)))
    expect(await negotiate(ctx, late), Reason.NEGOTIATION_DEADLINE_PASSED, "an Offer an hour after the deadline")
    await _unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_EXPIRED"))


@suite.case(
    "KEY-13/keyset-expired",
    description="Live messages of a party whose newest key set expired are KEYSET_EXPIRED until it publishes a new one",
    quote="A receiver […] MUST NOT accept live messages (§1.6) from a party whose newest version it holds has "
    "expired, until a newer version is obtained (KEY-20).",
    needs=(FIXTURES,),
)
async def keyset_expired(ctx: BillerTarget) -> None:
    party = ctx.new_party(key_set_lifetime=timedelta(days=2))  # created a day ago: expires a day from now
    customer = await ctx.enrolled(party)
    await ctx.advance_clock(2 * 86_400)
    expect(await list_bills(ctx, query_envelope(customer)), Reason.KEYSET_EXPIRED, "a query two days later")
    start = ctx.now() - timedelta(days=1)
    renewed = party.next_key_set([party.key_spec(party.key, start)])
    accepted(await publish(ctx, renewed), "PublishKeySet of a fresh version 2")
    party.adopt(renewed)
    await read_ok(ctx, customer)


@suite.case(
    "ENR-4/code-expired",
    description="The right code presented after it expired (default validity: 30 days) is ENROLMENT_CODE_EXPIRED",
    quote="A code MUST expire a fixed time after issue (default 30 days); a biller MUST refuse a request presenting "
    "the right code after expiry with `ENROLMENT_CODE_EXPIRED`.",
    needs=(FIXTURES,),
)
async def code_expired(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    await ctx.advance_clock(31 * 86_400)
    party = ctx.new_party()
    request = party.enrolment(account.account_id, account.enrolment_code)
    expect(await enrol(ctx, request), Reason.ENROLMENT_CODE_EXPIRED, "the right code 31 days after issue")


# === Errors (§13): every refusal seen in the run (last) ===============================================


async def _provoke(ctx: BillerTarget) -> None:
    """A few refusals of our own, so that the error cases mean something when run alone."""
    await ctx.conn.call("Hello", hello_request(99))
    await list_bills(ctx, vector("two-signatures"))
    await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(party_id="consumer:cf-nobody"))


def _error_info_problem(refusal: Refusal) -> str:
    if not refusal.status_readable:
        return "no google.rpc.Status in grpc-status-details-bin (or one contradicting the call)"
    if len(refusal.infos) != 1:
        return f"{len(refusal.infos)} ErrorInfo details, not exactly one"
    info = refusal.infos[0]
    if info.domain != ERROR_DOMAIN:
        return f"ErrorInfo domain {info.domain!r}, not {ERROR_DOMAIN!r}"
    reason = Reason.__members__.get(info.reason)
    if reason is None:
        return f"reason {info.reason!r} is not one of §13"
    if refusal.code.name != reason.grpc_code:
        return f"{info.reason} came with gRPC code {refusal.code.name}, not {reason.grpc_code}"
    if info.metadata.get("requirement") != reason.requirement:
        return (
            f"{info.reason} has metadata requirement {info.metadata.get('requirement')!r}, not {reason.requirement!r}"
        )
    return ""


@suite.case(
    "ERR-1/error-info",
    description="Every refusal in the run carried exactly one ErrorInfo, domain parley.v1, with the reason's code and "
    "requirement",
    quote="Every error a Parley service returns MUST be a `google.rpc.Status`, carried in the "
    "`grpc-status-details-bin` trailer, whose `code` is the gRPC status code of its reason in the table below and "
    "whose `details` hold exactly one `google.rpc.ErrorInfo`, with `reason` = the UPPER_SNAKE reason, `domain` = "
    '`"parley.v1"` and `metadata["requirement"]` = the id of the requirement that names the reason',
)
async def error_info(ctx: BillerTarget) -> str:
    await _provoke(ctx)
    problems, checked = [], 0
    for refusal in ctx.conn.refusals:
        if refusal.code in LIBRARY_CODES and not refusal.infos:
            continue  # failures of the gRPC library itself carry no ErrorInfo (ERR-2)
        checked += 1
        problem = _error_info_problem(refusal)
        if problem:
            problems.append(f"{refusal.rpc}: {problem}")
    if problems:
        shown = "; ".join(dict.fromkeys(problems))
        raise Violation(f"{len(problems)} of {checked} refusals: {shown}")
    return f"{checked} refusals checked"


@suite.case(
    "ERR-2/no-unknown-code",
    description="No call of the run failed with the gRPC code UNKNOWN",
    quote="A service MUST NOT answer with the gRPC code `UNKNOWN`: every failure the protocol names uses its row of "
    "the table, and every other failure is `INTERNAL_ERROR` (ERR-3).",
)
async def no_unknown_code(ctx: BillerTarget) -> str:
    await _provoke(ctx)
    unknown = [r for r in ctx.conn.refusals if r.code.name == "UNKNOWN"]
    if unknown:
        raise Violation(f"{len(unknown)} calls failed with UNKNOWN, e.g. {unknown[0].rpc}: {unknown[0].message}")
    return f"{len(ctx.conn.refusals)} refusals checked"
