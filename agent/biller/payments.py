"""Payments (PROTOCOL.md §10, PAY-*): intents answered with instructions, settlements recorded with receipts."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
from datetime import UTC, date, datetime, time, timedelta

from agent.biller.party import BillerParty, stored_envelope
from agent.biller.receive import Found, Inbound, idempotent_step, log_read, malformed, parsed_answer
from agent.biller.results import Arrangement, AwaitedPayment
from agent.logs import log_step
from agent.protocol.arrangements import unpaid_instalments
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.limits import INTENT_ID_PATTERN, PAYMENT_GRACE_DAYS
from agent.protocol.messages import check_sequence, to_timestamp
from agent.protocol.moves import NEGOTIATION_TYPES
from agent.protocol.terms import Money, Terms, outstanding_balance, shift_days
from agent.stores.base import (
    ArrangementRecord,
    BillRecord,
    BillStatus,
    PaymentContext,
    PaymentIntentRecord,
    SealedSettlement,
    Settle,
    StoreConflict,
)
from parley.v1 import biller_service_pb2, envelope_pb2, event_pb2, negotiation_pb2, payment_pb2, terms_pb2

logger = logging.getLogger("parley.biller")

_INTENT_ID = re.compile(INTENT_ID_PATTERN)


def _end_of(day: date) -> datetime:
    """The instant a payment dated `day` is late: midnight UTC after it (the last instant of the calendar
    for its last day, rather than an overflow)."""
    if day == date.max:
        return datetime.combine(day, time.max, UTC)
    return datetime.combine(shift_days(day, 1), time(0), UTC)


def _money(pb: terms_pb2.Money, field: str) -> Money:
    try:
        return Money.from_proto(pb)
    except LocalProtocolError as error:
        raise RemoteProtocolError(error.reason, f"{field}: {error.detail}") from error


def intent_content_hash(intent: payment_pb2.PaymentIntent) -> bytes:
    """PAY-2: what makes two intents with one intent_id the same (everything but the header)."""
    content = payment_pb2.PaymentIntent()
    content.CopyFrom(intent)
    content.ClearField("header")
    return hashlib.sha256(content.SerializeToString(deterministic=True)).digest()


def _payer(intent: bytes) -> str:
    """The party that signed a stored intent envelope (the one its instructions and receipt are addressed to)."""
    return payment_pb2.PaymentIntent.FromString(stored_envelope(intent).payload).header.sender


def arrangement_of(record: ArrangementRecord) -> Arrangement:
    """A stored agreement as the embedding API shows it."""
    envelope = stored_envelope(record.offer_envelope)
    cls = next(c for c in NEGOTIATION_TYPES if c.DESCRIPTOR.full_name == envelope.payload_type)
    offer = cls.FromString(envelope.payload)
    assert isinstance(offer, negotiation_pb2.ThreadOpen | negotiation_pb2.Offer)
    return Arrangement(
        account_id=record.account_id,
        bill_id=record.bill_id,
        thread_id=record.thread_id,
        agreement_digest=record.accept_digest,
        terms=Terms.from_proto(offer.terms),
        agreed_at=record.agreed_at,
        active=record.bill_status is BillStatus.UNDER_ARRANGEMENT,
        payments=record.payments,
    )


class PaymentsPhase:
    def __init__(self, party: BillerParty) -> None:
        self.party = party

    # --- the protocol side ---

    async def create_payment_intent(
        self, envelope: envelope_pb2.Envelope
    ) -> biller_service_pb2.CreatePaymentIntentResponse:
        """A payment intent, answered with signed instructions; idempotent by intent_id (PAY-1..PAY-4)."""
        party = self.party
        inbound = await party.receive.receive(envelope, (payment_pb2.PaymentIntent,))
        intent = inbound.message
        if not _INTENT_ID.fullmatch(intent.intent_id):
            raise malformed("intent_id must be 1 to 64 characters of [A-Za-z0-9_-]")
        # One store read for the step: account (AUZ-1), bill, an intent under this id, the arrangement named,
        # the message's replay cache entry.
        context = await party.store.payment_context(
            intent.account_id,
            intent.bill_id,
            intent.intent_id,
            intent.agreement_digest,
            replay_key=party.replays.key(inbound),
        )
        party.receive.check_bound(context.account, inbound.sender)
        bill = context.bill
        if bill is None or bill.account_id != intent.account_id:
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no bill {intent.bill_id!r} on the account")
        return await idempotent_step(
            party,
            inbound,
            lambda: self._instruct(inbound, bill, context),
            parsed_answer(biller_service_pb2.CreatePaymentIntentResponse),
            found=Found(context.replay),
        )

    async def _instruct(
        self, inbound: Inbound[payment_pb2.PaymentIntent], bill: BillRecord, context: PaymentContext
    ) -> biller_service_pb2.CreatePaymentIntentResponse:
        party, intent = self.party, inbound.message
        check_sequence(inbound.header, expected_sequence=0, expected_previous=b"")
        content_hash = intent_content_hash(intent)
        if context.intent is not None:
            return await self.same_intent(inbound, context.intent, content_hash)

        amount = _money(intent.amount, "amount") if intent.HasField("amount") else None
        now = party.clock.now()
        owed, pay_by = self.amount_owed(intent, bill, context, now)
        if amount != owed:
            raise RemoteProtocolError(Reason.PAYMENT_AMOUNT_MISMATCH, f"the amount owed is {owed}")
        details = party.rail.instructions(intent.account_id, intent.intent_id, owed)
        if not details.payment_reference:
            raise ValueError("the payment rail gave an empty payment reference (PAY-4)")
        instructions = payment_pb2.PaymentInstructions(
            header=party.header(inbound.sender, inbound.header.thread_id, 1, inbound.verified.digest, now),
            intent_id=intent.intent_id,
            amount=owed.to_proto(),
            rail=details.rail,
            payee_name=details.payee_name,
            payee_account=details.payee_account,
            payment_reference=details.payment_reference,
            pay_by_time=to_timestamp(pay_by),
        )
        response = biller_service_pb2.CreatePaymentIntentResponse(instructions=party.seal(instructions))
        record = PaymentIntentRecord(
            account_id=intent.account_id,
            intent_id=intent.intent_id,
            content_hash=content_hash,
            bill_id=intent.bill_id,
            agreement_digest=intent.agreement_digest,
            instalment_index=intent.instalment_index,
            amount_minor=owed.minor,
            currency=owed.currency.code,
            payment_reference=details.payment_reference,
            intent=inbound.verified.envelope.SerializeToString(),
            instructions=response.instructions.SerializeToString(),
            created_at=now,
            pay_by=pay_by,
        )
        try:
            await party.store.insert_payment_intent(
                record, party.replays.record(inbound, answer=response.SerializeToString())
            )
        except StoreConflict:  # PAY-2: another message with this intent id was applied meanwhile
            existing = await party.store.get_payment_intent(intent.account_id, intent.intent_id)
            if existing is None:
                raise
            return await self.same_intent(inbound, existing, content_hash)
        party.metrics.payment_intents.inc()
        log_step(
            logger,
            "payment-intent",
            account=intent.account_id,
            bill=intent.bill_id,
            intent=intent.intent_id,
            amount=owed,
            thread_id=inbound.header.thread_id,
            message_id=inbound.header.message_id,
        )
        return response

    async def same_intent(
        self, inbound: Inbound[payment_pb2.PaymentIntent], existing: PaymentIntentRecord, content_hash: bytes
    ) -> biller_service_pb2.CreatePaymentIntentResponse:
        """PAY-2: a later intent with the same id and content gets the first one's instructions."""
        if not hmac.compare_digest(existing.content_hash, content_hash):
            raise RemoteProtocolError(
                Reason.IDEMPOTENCY_CONFLICT, f"intent {existing.intent_id!r} was created with other content"
            )
        response = biller_service_pb2.CreatePaymentIntentResponse(instructions=stored_envelope(existing.instructions))
        with contextlib.suppress(StoreConflict):  # a concurrent identical retry recorded it first
            await self.party.store.record_replay(
                self.party.replays.record(inbound, answer=response.SerializeToString())
            )
        return response

    @staticmethod
    def amount_owed(
        intent: payment_pb2.PaymentIntent, bill: BillRecord, context: PaymentContext, now: datetime
    ) -> tuple[Money, datetime]:
        """PAY-3, PAY-15, PAY-16: the amount the intent must carry, and the pay-by time of its instructions.

        Without an agreement: the bill's outstanding balance (amount due less everything received for it),
        payable while the bill is open, by the due date or a day from now, whichever is later. Under one:
        an unpaid instalment of the bill's arrangement in force (not one it replaced or that broke), until
        the end of its agreed date plus PAYMENT_GRACE_DAYS; after that the agreement no longer sets it.
        """
        if not intent.agreement_digest:
            if intent.instalment_index != 0:
                raise RemoteProtocolError(Reason.PAYMENT_AMOUNT_MISMATCH, "instalment_index is 0 without an agreement")
            if bill.status is not BillStatus.OPEN:
                raise RemoteProtocolError(
                    Reason.PAYMENT_AMOUNT_MISMATCH, "the bill is paid or under an arrangement: pay its instalments"
                )
            amount_due, received = (
                Money.of(bill.amount_minor, bill.currency),
                Money.of(context.received_minor, bill.currency),
            )
            try:
                outstanding = outstanding_balance(amount_due, [received])  # PAY-16: the one implementation
            except ValueError:  # more received than due: no receipt says so (PAY-16), so nothing is owed
                outstanding = Money(amount_due.currency, 0)
            if outstanding.minor == 0:
                raise RemoteProtocolError(Reason.PAYMENT_AMOUNT_MISMATCH, "nothing is owed on the bill")
            return outstanding, max(_end_of(bill.due_date), now + timedelta(days=1))
        record = context.arrangement
        if record is None or record.bill_id != bill.bill_id:
            raise RemoteProtocolError(Reason.NOT_FOUND, "no such agreement on the bill")
        if context.current_agreement != record.accept_digest:
            raise RemoteProtocolError(
                Reason.PAYMENT_AMOUNT_MISMATCH,
                "that agreement is no longer in force: pay the bill's outstanding balance, or agree anew (PAY-16)",
            )
        arrangement = arrangement_of(record)
        schedule = arrangement.terms.schedule
        if intent.instalment_index >= len(schedule):
            raise RemoteProtocolError(Reason.PAYMENT_AMOUNT_MISMATCH, f"the schedule has {len(schedule)} instalments")
        unpaid = dict(unpaid_instalments(arrangement.terms, arrangement.paid_instalments))
        instalment = unpaid.get(intent.instalment_index)
        if instalment is None:
            raise RemoteProtocolError(Reason.PAYMENT_AMOUNT_MISMATCH, "that instalment is already paid")
        pay_by = _end_of(shift_days(instalment.due_date, PAYMENT_GRACE_DAYS))
        if now >= pay_by:
            raise RemoteProtocolError(
                Reason.PAYMENT_AMOUNT_MISMATCH,
                f"the agreed date {instalment.due_date} and its {PAYMENT_GRACE_DAYS} days of grace have passed: "
                "the agreement no longer sets this payment (PAY-15)",
            )
        return instalment.amount, pay_by

    async def get_receipt(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetReceiptResponse:
        """The signed receipt of a settled intent (PAY-5)."""
        party = self.party
        query = await party.receive.unauthorized_query(envelope, "GetReceipt")
        # One store read: the account (AUZ-1), the intent (its signer is whom its receipt is for), its settlement.
        context = await party.store.receipt_read_context(query.account_id, query.intent_id)
        party.receive.authorize_read(context.account, query.header.sender)
        if context.intent is None or _payer(context.intent) != query.header.sender:  # an earlier holder's: ENR-12
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no intent {query.intent_id!r} on the account")
        settlement = context.settlement
        if settlement is None:
            raise RemoteProtocolError(Reason.PAYMENT_NOT_SETTLED, f"intent {query.intent_id!r} is not settled yet")
        log_read("GetReceipt", query.account_id, intent=query.intent_id)
        return biller_service_pb2.GetReceiptResponse(receipt=stored_envelope(settlement.receipt))

    # --- the embedding side ---

    async def record_settlement(
        self,
        account_id: str,
        intent_id: str,
        amount: Money,
        rail_reference: str,
        *,
        settle_time: datetime | None = None,
    ) -> envelope_pb2.Envelope:
        """See `BillerAgent.record_settlement`."""
        party = self.party
        intent = await party.store.get_payment_intent(account_id, intent_id)
        if intent is None:
            raise LookupError(f"no payment intent {intent_id!r} on account {account_id!r}")
        instructed = Money.of(intent.amount_minor, intent.currency)
        if amount != instructed:
            raise ValueError(f"settled {amount}, instructed {instructed}: no receipt (PAY-6)")
        settled_at = settle_time or party.clock.now()
        await party.bound_consumer(account_id)  # LookupError, ValueError: no account, no log
        instructions = stored_envelope(intent.instructions)
        answered = payment_pb2.PaymentInstructions.FromString(instructions.payload).header
        # ENR-12: a payment is its payer's thread (intent, instructions, receipt): the receipt and its thanks go
        # to the payer, the party the instructions were addressed to, even if the account was re-bound since.
        recipient, thread_id = answered.recipient, answered.thread_id

        def sealed(remaining_minor: int) -> SealedSettlement:
            now = party.clock.now()
            receipt = payment_pb2.Receipt(
                header=party.header(recipient, thread_id, 2, digest(instructions), now),
                intent_id=intent_id,
                amount_received=amount.to_proto(),
                settle_time=to_timestamp(settled_at),
                rail_reference=rail_reference,
                remaining_balance=Money(amount.currency, remaining_minor).to_proto(),
            )
            envelope = party.seal(receipt)
            thanks = party.events.pending_event(
                account_id,
                event_pb2.EVENT_KIND_PAYMENT_RECEIVED,
                now,
                party_id=recipient,  # the log of the party the receipt is addressed to (ENR-12)
                bill_id=intent.bill_id,
                amount=amount,
                related_digest=digest(envelope),
                message=f"Thank you: we received {amount}.",
            )
            return SealedSettlement(envelope, (thanks,))

        settlement, records = await party.store.settle(
            Settle(account_id, intent_id, amount.minor, rail_reference, settled_at, sealed)
        )
        if settlement.rail_reference != rail_reference:
            raise ValueError(f"intent {intent_id!r} was already settled under another rail reference (PAY-7)")
        party.wakeups.notify(records)
        if records:  # not a repeat of a settlement already recorded
            party.metrics.payments_settled.inc()
            log_step(logger, "payment-settled", account=account_id, intent=intent_id, thread_id=thread_id)
        return stored_envelope(settlement.receipt)

    async def arrangements(self, account_id: str | None, *, active_only: bool) -> list[Arrangement]:
        """See `BillerAgent.arrangements`."""
        records = await self.party.store.arrangements(account_id, active_only=active_only)
        return [arrangement_of(record) for record in records]

    async def awaited_payments(self) -> list[AwaitedPayment]:
        """See `BillerAgent.awaited_payments`."""
        return [
            AwaitedPayment(
                record.account_id,
                record.intent_id,
                Money.of(record.amount_minor, record.currency),
                record.payment_reference,
            )
            for record in await self.party.store.unsettled_payment_intents()
        ]


__all__ = ["PaymentsPhase", "arrangement_of", "intent_content_hash"]
