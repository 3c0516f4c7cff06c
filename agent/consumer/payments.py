"""Payments (PROTOCOL.md §10): a signed intent, verified instructions, the user's bank, a verified receipt.

The intent is stored before it is sent, so a retry reuses its `intent_id` (PAY-2); instructions are
paid only when they are signed by the pinned biller, chain to our intent and name its amount (PAY-8);
each intent is handed to the bank at most once (PAY-7); instructions that lapse unpaid are kept as history
and the payment gets a new intent (PAY-17); receipts are verified and a mismatch is raised as a dispute (PAY-9).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from datetime import datetime

from agent.consumer.bills import Bills
from agent.consumer.errors import PaymentDispute, PaymentInDoubt, PaymentNotSent, PaymentRefused
from agent.consumer.instalments import agreed_terms, ended_threads, owed_facts
from agent.consumer.party import BillerSession, Party
from agent.consumer.plugins import PaymentOrder, PaymentSender
from agent.consumer.receive import Receiver, envelope_of
from agent.consumer.results import Payment, PaymentReceipt, ReceivedBill
from agent.consumer.sessions import Sessions
from agent.logs import log_step
from agent.protocol.arrangements import unpaid_instalments
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.limits import THREAD_ID_BYTES
from agent.protocol.messages import read_time
from agent.protocol.terms import Money
from agent.stores.base import ConsumerStore, IntentRecord, IntentState, ReceiptRecord, ThreadOutcome
from agent.transport.client import is_transient
from agent.transport.status import CallError
from parley.v1 import envelope_pb2, payment_pb2

logger = logging.getLogger("parley.consumer")


def payment_order(intent: IntentRecord) -> PaymentOrder:
    """What the bank is asked to pay, from the intent's stored (verified) instructions."""
    assert intent.instructions is not None
    body = payment_pb2.PaymentInstructions.FromString(envelope_of(intent.instructions).payload)
    return PaymentOrder(
        biller_party_id=intent.biller_party_id,
        account_id=intent.account_id,
        bill_id=intent.bill_id,
        intent_id=intent.intent_id,
        amount=Money.from_proto(body.amount),
        rail=body.rail,
        payee_name=body.payee_name,
        payee_account=body.payee_account,
        payment_reference=body.payment_reference,
        pay_by_time=read_time(body, "pay_by_time", Reason.MALFORMED_PAYLOAD),
    )


def payment_view(intent: IntentRecord) -> Payment:
    # Refused instructions are not the biller's word; lapsed ones are no longer payable (PAY-17): neither is an order.
    usable = intent.instructions is not None and intent.state not in (IntentState.REFUSED, IntentState.LAPSED)
    return Payment(
        biller_party_id=intent.biller_party_id,
        intent_id=intent.intent_id,
        account_id=intent.account_id,
        bill_id=intent.bill_id,
        agreement_digest=intent.agreement_digest,
        instalment_index=intent.instalment_index,
        amount=Money.of(intent.amount_minor, intent.currency),
        state=intent.state,
        order=payment_order(intent) if usable else None,
        proof=intent.payment_proof,
        holds_payment=intent.holds_payment,
    )


def receipt_view(record: ReceiptRecord) -> PaymentReceipt:
    envelope = envelope_of(record.envelope)
    body = payment_pb2.Receipt.FromString(envelope.payload)
    return PaymentReceipt(
        biller_party_id=record.biller_party_id,
        intent_id=record.intent_id,
        amount_received=Money.from_proto(body.amount_received),
        remaining_balance=Money.from_proto(body.remaining_balance) if body.HasField("remaining_balance") else None,
        settle_time=read_time(body, "settle_time", Reason.MALFORMED_PAYLOAD),
        rail_reference=body.rail_reference,
        digest=record.digest,
        envelope=envelope,
        dispute=record.dispute,
    )


class Payments:
    """The payments phase: `pay`, list and resolve intents, fetch receipts."""

    def __init__(
        self,
        party: Party,
        store: ConsumerStore,
        receiver: Receiver,
        sessions: Sessions,
        bills: Bills,
        *,
        sender: PaymentSender | None,
    ) -> None:
        self._party = party
        self._store = store
        self._receiver = receiver
        self._sessions = sessions
        self._bills = bills
        self._sender = sender

    def require_sender(self) -> None:
        if self._sender is None:
            raise RuntimeError("this agent has no PaymentSender (payment_sender=...)")

    async def pay(self, biller: str, bill_id: str, instalment_index: int | None) -> Payment:
        """See `ConsumerAgent.pay` (called under the bill's lock)."""
        session = await self._sessions.get(biller)
        bill = await self._bills.get(session, bill_id)
        paid = await self._carry_out(session, await self._intent_to_pay(bill, instalment_index))
        if paid is not None:
            return paid
        # PAY-17: the intent's instructions lapsed unpaid, never to be paid (PAY-8). The payment gets a new intent,
        # which PAY-14 lets the biller instruct, carried out in this call — one, never a loop, so the biller's cap
        # on intents per bill is never run down. Its amount is taken afresh: a lapsed outstanding-balance intent
        # fixes no amount any more (PAY-16).
        intent = await self._intent_to_pay(bill, instalment_index)
        paid = await self._carry_out(session, intent)
        if paid is None:
            raise PaymentRefused(
                Reason.MESSAGE_EXPIRED,
                "the new intent's instructions lapsed before they could be paid",
                intent.intent_id,
            )
        return paid

    async def _intent_to_pay(self, bill: ReceivedBill, instalment_index: int | None) -> IntentRecord:
        """The payment's live intent, continued (PAY-2, PAY-7), or a new one when it has none."""
        biller, bill_id = bill.biller_party_id, bill.facts.bill_id
        agreement_digest, index, amount = await self._amount_to_pay(bill, instalment_index)
        intent = await self._store.find_intent(biller, bill_id, agreement_digest, index)
        if intent is None:
            intent = await self._store.create_intent(self._new_intent(bill, agreement_digest, index, amount))
            log_step(logger, "intent-created", biller=biller, bill=bill_id, intent=intent.intent_id, amount=amount)
        return intent

    async def payments(self, biller: str | None) -> list[Payment]:
        return [payment_view(intent) for intent in await self._store.intents(biller)]

    async def resolve(self, biller: str, intent_id: str, *, paid: bool, proof: str) -> Payment:
        intent = await self._store.finish_sending(biller, intent_id, paid=paid, proof=proof, now=self._party.now())
        return payment_view(intent)

    async def set_aside(self, biller: str, intent_id: str) -> Payment:
        """See `ConsumerAgent.set_aside_refused`."""
        intent = await self._store.set_aside_intent(biller, intent_id, self._party.now())
        log_step(logger, "refused-intent-set-aside", biller=biller, bill=intent.bill_id, intent=intent_id)
        return payment_view(intent)

    async def receipt(self, biller: str, intent_id: str) -> PaymentReceipt | None:
        """See `ConsumerAgent.receipt`."""
        intent = await self._store.get_intent(biller, intent_id)
        if intent is None:
            raise LookupError(f"no payment intent {intent_id!r} with {biller!r}")
        if intent.instructions is None or intent.state in (IntentState.REFUSED, IntentState.LAPSED):
            raise ValueError(f"intent {intent_id!r} has no instructions it was paid under")
        stored = await self._store.get_receipt(biller, intent_id)
        if stored is None:
            session = await self._sessions.get(biller)
            query = self._party.query(biller, intent.account_id, intent_id=intent_id)
            try:
                response = await session.client.get_receipt(query)
            except CallError as error:
                if error.reason is Reason.PAYMENT_NOT_SETTLED:
                    return None
                raise
            stored = await self._store.save_receipt(
                await self._receiver.check_receipt(session, intent, response.receipt)
            )
        result = receipt_view(stored)
        if result.dispute is not None:
            log_step(
                logger, "payment-disputed", logging.WARNING, biller=biller, intent=intent_id, dispute=result.dispute
            )
            raise PaymentDispute(result)
        return result

    async def _amount_to_pay(self, bill: ReceivedBill, instalment_index: int | None) -> tuple[bytes, int, Money]:
        """(agreement digest, instalment index, amount) of what is paid (PAY-3)."""
        agreed = await self._store.threads(bill.biller_party_id, bill.facts.bill_id, ThreadOutcome.AGREED)
        if not agreed:
            if instalment_index not in (None, 0):
                raise ValueError("without an agreement, a bill is paid whole (instalment 0)")
            return b"", 0, bill.facts.amount_due
        if agreed[-1].awaiting_answer:
            raise ValueError(f"our acceptance on {bill.facts.bill_id!r} has not reached the biller: negotiate again")
        terms, agreement_digest = agreed_terms(agreed[-1])
        if agreed[-1].thread_id in await self._ended(bill):
            # PAY-16: a broken arrangement sets no payment any more; the bill's outstanding balance is owed.
            if instalment_index not in (None, 0):
                raise ValueError(
                    f"the arrangement on {bill.facts.bill_id!r} was ended by the biller: its instalments are not "
                    "paid any more, only the bill's outstanding balance (PAY-16)"
                )
            started = await self._store.find_intent(bill.biller_party_id, bill.facts.bill_id, b"", 0)
            if started is not None:  # the outstanding balance's intent: continued, never paid twice (PAY-7)
                return b"", 0, Money.of(started.amount_minor, started.currency)
            return b"", 0, await self._outstanding(bill)
        if instalment_index is None:
            paid = (
                intent.instalment_index
                for intent in await self._store.intents(bill.biller_party_id)
                if intent.agreement_digest == agreement_digest and intent.state is IntentState.PAID
            )
            unpaid = unpaid_instalments(terms, paid)
            if not unpaid:
                raise ValueError(f"every instalment of the agreement on {bill.facts.bill_id!r} is paid")
            instalment_index = unpaid[0][0]
        if not 0 <= instalment_index < len(terms.schedule):
            raise ValueError(f"the agreement has {len(terms.schedule)} instalments")
        return agreement_digest, instalment_index, terms.schedule[instalment_index].amount

    async def _ended(self, bill: ReceivedBill) -> frozenset[bytes]:
        """The arrangements on the bill that the biller ended, as the stored events say (EVT-7)."""
        return await ended_threads(self._store, bill.biller_party_id, bill.account_id, bill.facts.bill_id)

    async def _outstanding(self, bill: ReceivedBill) -> Money:
        """PAY-16: the bill's amount due less every payment of it our bank made, under any agreement or none."""
        return (await owed_facts(self._store, bill)).outstanding

    def _new_intent(self, bill: ReceivedBill, agreement_digest: bytes, index: int, amount: Money) -> IntentRecord:
        now = self._party.now()
        record = IntentRecord(
            biller_party_id=bill.biller_party_id,
            intent_id=f"pi-{secrets.token_hex(16)}",
            account_id=bill.account_id,
            bill_id=bill.facts.bill_id,
            agreement_digest=agreement_digest,
            instalment_index=index,
            amount_minor=amount.minor,
            currency=amount.currency.code,
            thread_id=secrets.token_bytes(THREAD_ID_BYTES),
            state=IntentState.CREATED,
            created_at=now,
            messages=(),
        )
        return dataclasses.replace(record, messages=(self._intent_envelope(record, now).SerializeToString(),))

    def _intent_envelope(self, intent: IntentRecord, now: datetime) -> envelope_pb2.Envelope:
        """A signed PaymentIntent for the intent (the same content every time, PAY-2)."""
        return self._party.sign(
            payment_pb2.PaymentIntent(
                header=self._party.header(intent.biller_party_id, intent.thread_id, 0, b"", now),
                intent_id=intent.intent_id,
                account_id=intent.account_id,
                bill_id=intent.bill_id,
                agreement_digest=intent.agreement_digest,
                instalment_index=intent.instalment_index,
                amount=Money.of(intent.amount_minor, intent.currency).to_proto(),
            )
        )

    async def _carry_out(self, session: BillerSession, intent: IntentRecord) -> Payment | None:
        """Move an intent on: instructions, then the bank, each step at most once. None when its instructions
        lapsed unpaid (PAY-17): the payment needs a new intent."""
        if intent.state is IntentState.CREATED:
            intent = await self._instruct(session, intent)
        if intent.state is IntentState.REFUSED:
            reason, detail = intent.refusal or (Reason.MALFORMED_PAYLOAD.name, "refused instructions")
            raise PaymentRefused(Reason.__members__.get(reason, Reason.MALFORMED_PAYLOAD), detail, intent.intent_id)
        if intent.state is IntentState.SENDING:
            raise PaymentInDoubt(intent.biller_party_id, intent.intent_id)
        if intent.state is IntentState.PAID:
            return payment_view(intent)
        if intent.state is IntentState.LAPSED:  # another caller lapsed it meanwhile: never paid
            return None
        order = payment_order(intent)
        now = self._party.now()
        if order.pay_by_time < now:  # PAY-8: never pay under instructions past their time
            # PAY-17: they lapse (kept, never paid), and the caller starts the payment's new intent.
            if not await self._store.lapse_intent(intent.biller_party_id, intent.intent_id, now):
                current = await self._store.get_intent(intent.biller_party_id, intent.intent_id)
                assert current is not None
                if current.state is not IntentState.INSTRUCTED:  # moved on by another caller: sent, or lapsed
                    return await self._carry_out(session, current)
                raise PaymentRefused(  # the store does not find them past their time: unpaid, and kept as they are
                    Reason.MESSAGE_EXPIRED, f"the instructions were to be paid by {order.pay_by_time}", intent.intent_id
                )
            log_step(
                logger,
                "instructions-lapsed",
                logging.WARNING,
                biller=intent.biller_party_id,
                bill=intent.bill_id,
                intent=intent.intent_id,
                pay_by=order.pay_by_time,
            )
            return None
        # PAY-7: recorded as being paid before the bank is asked, so no crash or retry pays twice.
        if not await self._store.begin_sending(intent.biller_party_id, intent.intent_id, now):
            current = await self._store.get_intent(intent.biller_party_id, intent.intent_id)
            assert current is not None
            return await self._carry_out(session, current)
        assert self._sender is not None
        try:
            proof = await self._sender.send(order)
        except PaymentNotSent:
            await self._store.finish_sending(
                intent.biller_party_id, intent.intent_id, paid=False, proof="", now=self._party.now()
            )
            raise
        except Exception as error:
            # Any other failure: the bank may have paid. The intent stays SENDING, never handed over again (PAY-7),
            # and the caller hears it as the one error that says so, not as whatever the bank's code raised.
            failure = f"{type(error).__name__}: {error}"
            log_step(
                logger,
                "payment-in-doubt",
                logging.ERROR,
                biller=intent.biller_party_id,
                intent=intent.intent_id,
                error=failure,
            )
            raise PaymentInDoubt(intent.biller_party_id, intent.intent_id, failure) from error
        intent = await self._store.finish_sending(
            intent.biller_party_id, intent.intent_id, paid=True, proof=proof, now=self._party.now()
        )
        log_step(logger, "intent-paid", biller=intent.biller_party_id, intent=intent.intent_id, amount=order.amount)
        return payment_view(intent)

    async def _instruct(self, session: BillerSession, intent: IntentRecord) -> IntentRecord:
        """Send the intent (the stored envelope, or a fresh signature of the same content once it expired)
        and take the instructions, checked as PAY-8 says."""
        envelopes = [envelope_of(data) for data in intent.messages]
        if not envelopes or self._expired(envelopes[-1]):
            envelopes.append(await self._resign_intent(intent))
        try:
            response = await session.client.create_payment_intent(envelopes[-1])
        except CallError as error:
            if error.reason is not Reason.MESSAGE_EXPIRED:
                if not is_transient(error):
                    # ERR-6: a refused message is not sent again as it was. The next attempt signs the same
                    # intent afresh (PAY-2: its intent_id keeps it one payment).
                    await self._resign_intent(intent)
                raise
            envelopes.append(await self._resign_intent(intent))  # the biller's clock is ahead of ours
            response = await session.client.create_payment_intent(envelopes[-1])
        try:
            verified = await self._receiver.open(
                session, response.instructions, (payment_pb2.PaymentInstructions,), stored=True
            )
        except RemoteProtocolError as error:  # not the pinned biller's: nothing to keep, nothing to pay
            raise PaymentRefused(error.reason, f"instructions refused: {error.detail}", intent.intent_id) from error
        refusal = self._receiver.check_instructions(verified, intent, {digest(envelope) for envelope in envelopes})
        intent = await self._store.record_instructions(
            intent.biller_party_id, intent.intent_id, response.instructions.SerializeToString(), refusal
        )
        if refusal is not None:
            log_step(
                logger,
                "instructions-refused",
                logging.WARNING,
                biller=intent.biller_party_id,
                intent=intent.intent_id,
                reason=refusal[0],
                detail=refusal[1],
            )
        return intent

    async def _resign_intent(self, intent: IntentRecord) -> envelope_pb2.Envelope:
        envelope = self._intent_envelope(intent, self._party.now())
        await self._store.add_intent_message(intent.biller_party_id, intent.intent_id, envelope.SerializeToString())
        return envelope

    def _expired(self, envelope: envelope_pb2.Envelope) -> bool:
        header = payment_pb2.PaymentIntent.FromString(envelope.payload).header
        return read_time(header, "expire_time", Reason.MALFORMED_HEADER) <= self._party.now()


__all__ = ["Payments", "payment_order", "payment_view", "receipt_view"]
