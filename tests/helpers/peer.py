"""A signed test consumer and a running biller (real gRPC on 127.0.0.1, real SQLite) for the tests.

`Consumer` builds and signs the messages a consumer agent sends, with control
over every header field so tests can break them. `running_biller` starts a
store, an agent and a server on a free port, and always shuts them down.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from agent.biller import (
    AcceptOffer,
    BillContext,
    BillerAgent,
    CounterOffer,
    Decision,
    OfferContext,
    PaymentDetails,
    Policy,
    RejectOffer,
)
from agent.clock import ManualClock
from agent.protocol.dsse import digest
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain, KeyEntry, make_key_set
from agent.protocol.limits import DEFAULT_LIMITS, Limits
from agent.protocol.messages import PAYLOAD_TYPES, Verified, new_header, open_envelope, seal, to_timestamp
from agent.protocol.moves import NEGOTIATION_TYPES
from agent.protocol.terms import AdvertisedOptions, Line, LineKind, Money, TermsKind, build_terms, monthly_dates
from agent.stores import open_biller_store
from agent.transport.server import BillerServicer, start_biller_server
from parley.v1 import (
    account_pb2,
    biller_service_pb2,
    biller_service_pb2_grpc,
    enrolment_pb2,
    envelope_pb2,
    header_pb2,
    negotiation_pb2,
    payment_pb2,
    terms_pb2,
)
from tests.fixtures import BILL, eur

M = TypeVar("M", bound=Message)

START = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
BILLER_ID = "biller:energy.example"
YEAR = timedelta(days=365)


def new_party(party_id: str, clock: ManualClock) -> tuple[SigningKey, envelope_pb2.Envelope]:
    """A fresh key and the self-signed key set version 1 listing it."""
    key = SigningKey.generate()
    start = clock.now() - timedelta(days=1)
    envelope = make_key_set(
        party_id=party_id,
        version=1,
        keys=[KeyEntry(key.public_key, start, start + YEAR)],
        signer=key,
        previous=None,
        create_time=start,
        expire_time=start + YEAR,
    )
    return key, envelope


@dataclass
class Consumer:
    """A consumer party that signs requests to the biller at the clock's time."""

    party_id: str
    clock: ManualClock
    key: SigningKey = field(init=False)
    key_set: envelope_pb2.Envelope = field(init=False)

    def __post_init__(self) -> None:
        self.key, self.key_set = new_party(self.party_id, self.clock)

    @property
    def chain(self) -> KeyChain:
        return KeyChain.verify([self.key_set])

    def header(
        self,
        *,
        thread_id: bytes | None = None,
        sequence: int = 0,
        previous: bytes = b"",
        created: datetime | None = None,
        lifetime: timedelta = HOUR,
        message_id: bytes | None = None,
    ) -> header_pb2.Header:
        return new_header(
            sender=self.party_id,
            recipient=BILLER_ID,
            thread_id=secrets.token_bytes(16) if thread_id is None else thread_id,
            sequence=sequence,
            previous_digest=previous,
            now=self.clock.now() if created is None else created,
            lifetime=lifetime,
            message_id=message_id,
        )

    def sign(self, message: Message) -> envelope_pb2.Envelope:
        return seal(message, self.key)

    def enrolment(self, account_id: str, code: str) -> envelope_pb2.Envelope:
        return self.sign(
            enrolment_pb2.EnrolmentRequest(
                header=self.header(), account_id=account_id, code=code, consumer_key_set=self.key_set
            )
        )

    def query(self, account_id: str, **fields: object) -> envelope_pb2.Envelope:
        return self.sign(account_pb2.AccountQuery(header=self.header(), account_id=account_id, **fields))  # type: ignore[arg-type]

    def open(
        self,
        bill: envelope_pb2.Envelope,
        terms: terms_pb2.Terms,
        *,
        max_rounds: int = 4,
        deadline: timedelta = timedelta(days=2),
        disclosure: bytes = b"",
    ) -> envelope_pb2.Envelope:
        bill_id = biller_payload(bill).bill_id  # type: ignore[attr-defined]
        return self.sign(
            negotiation_pb2.ThreadOpen(
                header=self.header(),
                bill_id=bill_id,
                bill_digest=digest(bill),
                max_rounds=max_rounds,
                deadline=to_timestamp(self.clock.now() + deadline),
                terms=terms,
                disclosure_digest=hashlib.sha256(disclosure).digest() if disclosure else b"",
            )
        )

    def next(
        self, thread: Sequence[envelope_pb2.Envelope], message: Message, **header: object
    ) -> envelope_pb2.Envelope:
        """`message` signed as the next message of `thread` (header fields overridable)."""
        first = NEGOTIATION_PAYLOAD[thread[0].payload_type].FromString(thread[0].payload)
        fields: dict[str, object] = {
            "thread_id": first.header.thread_id,
            "sequence": len(thread),
            "previous": digest(thread[-1]),
        }
        fields.update(header)
        message.header.CopyFrom(self.header(**fields))  # type: ignore[attr-defined, arg-type]
        return self.sign(message)

    def intent(
        self,
        account_id: str,
        bill_id: str,
        intent_id: str,
        amount: Money,
        *,
        agreement_digest: bytes = b"",
        instalment_index: int = 0,
    ) -> envelope_pb2.Envelope:
        return self.sign(
            payment_pb2.PaymentIntent(
                header=self.header(),
                intent_id=intent_id,
                account_id=account_id,
                bill_id=bill_id,
                agreement_digest=agreement_digest,
                instalment_index=instalment_index,
                amount=amount.to_proto(),
            )
        )

    def erasure(self, account_id: str) -> envelope_pb2.Envelope:
        return self.sign(account_pb2.ErasureRequest(header=self.header(), account_id=account_id))


NEGOTIATION_PAYLOAD = {cls.DESCRIPTOR.full_name: cls for cls in NEGOTIATION_TYPES}


def biller_payload(envelope: envelope_pb2.Envelope) -> Message:
    """The parsed payload of a message the biller signed (unverified; tests verify separately)."""
    return PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload)


def disclosure(*, hardship: bool = True) -> bytes:
    circumstances = negotiation_pb2.Circumstances(
        purpose=negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP, hardship=hardship, note="lost my job"
    )
    return negotiation_pb2.Disclosure(salt=secrets.token_bytes(16), circumstances=circumstances).SerializeToString()


# --- Terms for the sample bill (tests.fixtures.BILL: EUR 120.00 due 2026-03-31) ----------------


def outside_options() -> terms_pb2.Terms:
    """8 monthly instalments of EUR 15.00: outside the options (at most 6, each at least EUR 20.00)."""
    return build_terms(TermsKind.INSTALMENT_PLAN, BILL.amount_due, monthly_dates(date(2026, 4, 15), 8)).to_proto()


def counter_terms() -> terms_pb2.Terms:
    """6 monthly instalments of EUR 20.00: the test policy's counter-offer, inside the options."""
    return build_terms(TermsKind.INSTALMENT_PLAN, BILL.amount_due, monthly_dates(date(2026, 4, 15), 6)).to_proto()


def inside_options() -> terms_pb2.Terms:
    """3 monthly instalments of EUR 40.00: inside the options, so accepted at once (NEG-12)."""
    return build_terms(TermsKind.INSTALMENT_PLAN, BILL.amount_due, monthly_dates(date(2026, 4, 15), 3)).to_proto()


def settlement_terms() -> terms_pb2.Terms:
    reduction = (Line(LineKind.SETTLEMENT_REDUCTION, "waiver", eur("30.00")),)
    return build_terms(TermsKind.SETTLEMENT, BILL.amount_due, [date(2026, 3, 31)], reduction).to_proto()


def hardship_terms() -> terms_pb2.Terms:
    """10 monthly instalments of EUR 12.00 under the hardship programme, which requires disclosure."""
    return build_terms(
        TermsKind.INSTALMENT_PLAN,
        BILL.amount_due,
        monthly_dates(date(2026, 4, 15), 10),
        hardship_programme_id="hardship-12",
    ).to_proto()


class SamplePolicy:
    """Advertises the fixture bill's options; rejects settlements; counters with 6 x EUR 20.00 while it can."""

    def __init__(self) -> None:
        self.contexts: list[OfferContext] = []

    def advertise(self, context: BillContext) -> AdvertisedOptions:
        return BILL.options

    def decide(self, context: OfferContext) -> Decision:
        self.contexts.append(context)
        if context.offer.kind is TermsKind.SETTLEMENT:
            return RejectOffer(negotiation_pb2.REJECT_REASON_OUT_OF_POLICY, "no settlements")
        counter = build_terms(TermsKind.INSTALMENT_PLAN, context.bill.amount_due, monthly_dates(date(2026, 4, 15), 6))
        if context.offer == counter:
            return AcceptOffer()
        return CounterOffer(counter)


class SimulatedRail:
    """Instructions with a unique reference per intent."""

    def __init__(self) -> None:
        self._serial = itertools.count(1)

    def instructions(self, account_id: str, intent_id: str, amount: Money) -> PaymentDetails:
        return PaymentDetails("simulated", "Energy Example Ltd", "SIM-0001", f"PRL-{next(self._serial):06d}")


@dataclass
class Biller:
    """A running biller and what the tests need to reach and inspect it.

    `target` is its "127.0.0.1:port"; `key` its signing key (for tests that play
    a hostile biller re-signing its answers); `servicer` the servicer given to
    `running_biller` (None when the real one serves).
    """

    agent: BillerAgent
    stub: biller_service_pb2_grpc.BillerServiceAsyncStub
    clock: ManualClock
    db_path: Path
    policy: SamplePolicy
    target: str
    key: SigningKey
    servicer: BillerServicer | None

    @property
    def chain(self) -> KeyChain:
        return self.agent.key_chain

    async def enrolled(self, account_id: str, party_id: str) -> Consumer:
        """A new account with a consumer enrolled on it through the Enrol RPC."""
        await self.agent.create_account(account_id, "Alice Example")
        consumer = Consumer(party_id, self.clock)
        code = await self.agent.issue_enrolment_code(account_id)
        await self.stub.Enrol(biller_service_pb2.EnrolRequest(request=consumer.enrolment(account_id, code)))
        return consumer

    async def bill(self, account_id: str, bill_id: str = BILL.bill_id) -> envelope_pb2.Envelope:
        """Issue the fixture bill on the account and return its envelope."""
        await self.agent.issue_bill(
            account_id,
            BILL.amount_due,
            BILL.due_date,
            BILL.description,
            issue_date=BILL.issue_date,
            bill_id=bill_id,
        )
        bill = await self.agent._store.get_bill(bill_id)
        assert bill is not None
        return envelope_pb2.Envelope.FromString(bill.envelope)

    async def bill_envelope(self, bill_id: str = BILL.bill_id) -> envelope_pb2.Envelope:
        """The signed envelope of a bill already issued."""
        bill = await self.agent._store.get_bill(bill_id)
        assert bill is not None
        return envelope_pb2.Envelope.FromString(bill.envelope)

    def verify(self, envelope: envelope_pb2.Envelope, consumer: Consumer, kind: type[M]) -> Verified[M]:
        """Open a biller message of type `kind` as the consumer would (stored answers: no expiry check, PAY-10)."""
        return open_envelope(envelope, (kind,), sender_keys=self.chain, recipient=consumer.party_id, now=None)


async def _serve(servicer: BillerServicer, limits: Limits) -> tuple[grpc.aio.Server, int]:
    """Serve any BillerServicer (e.g. a hostile wrapper of the real one) on a free loopback port."""
    server = grpc.aio.server(options=(("grpc.max_receive_message_length", limits.grpc_max_receive_bytes),))
    biller_service_pb2_grpc.add_BillerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@asynccontextmanager
async def running_biller(
    tmp_path: Path,
    *,
    policy: Policy | None = None,
    limits: Limits = DEFAULT_LIMITS,
    servicer: Callable[[BillerAgent], BillerServicer] | None = None,
    store: str | None = None,
) -> AsyncIterator[Biller]:
    """A biller agent on a real SQLite file, served over gRPC on a free loopback port.

    `servicer` builds the servicer from the agent (default: the real `BillerServicer`,
    served by `start_biller_server`); `store` is another store for `open_biller_store`
    (e.g. a PostgreSQL URL; `db_path` then names no file).
    """
    clock = ManualClock(START)
    key, key_set = new_party(BILLER_ID, clock)
    opened = await open_biller_store(tmp_path / "biller.sqlite" if store is None else store)
    test_policy = SamplePolicy()
    agent = BillerAgent(
        party_id=BILLER_ID,
        signing_key=key,
        key_sets=[key_set],
        store=opened,
        policy=policy or test_policy,
        rail=SimulatedRail(),
        clock=clock,
        limits=limits,
        watch_poll_interval=timedelta(seconds=0.2),
    )
    try:
        serving = None
        if servicer is None:
            server, port = await start_biller_server(agent, "127.0.0.1:0", insecure=True)
        else:
            serving = servicer(agent)
            server, port = await _serve(serving, limits)
        try:
            target = f"127.0.0.1:{port}"
            async with grpc.aio.insecure_channel(target) as channel:
                stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                yield Biller(agent, stub, clock, tmp_path / "biller.sqlite", test_policy, target, key, serving)
        finally:
            await server.stop(None)
    finally:
        await opened.close()
