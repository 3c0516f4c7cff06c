"""What is agreed and what is still owed: the terms of an agreed thread, its unpaid instalments, the
arrangements the biller ended and a bill's outstanding balance.

Both the strategy's context (`committed`) and `pay` (which instalment is next) ask "which instalments
of this agreement are not paid yet?"; the core answers it (`agent.protocol.arrangements`), for the
biller too. Once the biller ended an arrangement (EVT-7) its instalments are owed no more: what is
owed is the bill's outstanding balance (PAY-16), which `pay` pays and a renegotiation restates
(TRM-11). The consumer computes it from its own record — the amount due less every payment of the
bill its bank made (`owed_facts`) — with the core's one `outstanding_balance`. It never takes a
larger amount from the biller's word: an event informs, it does not bind (EVT-8), and a biller
whose figure differs refuses ours (PRINCIPAL_MISMATCH, PAYMENT_AMOUNT_MISMATCH) rather than being
paid twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.consumer.events import MAX_STORED_EVENTS
from agent.consumer.receive import envelope_of
from agent.consumer.results import ReceivedBill
from agent.protocol.arrangements import ENDING_EVENTS, ended_arrangements, outstanding_balance, unpaid_instalments
from agent.protocol.moves import NEGOTIATION_TYPES, NegotiationPayload
from agent.protocol.terms import BillFacts, Instalment, Money, Terms
from agent.stores.base import ConsumerStore, ConsumerThreadRecord, IntentState, ThreadOutcome
from parley.v1 import envelope_pb2, event_pb2, negotiation_pb2

_NEGOTIATION_PAYLOADS = {cls.DESCRIPTOR.full_name: cls for cls in NEGOTIATION_TYPES}


def negotiation_payload(envelope: envelope_pb2.Envelope) -> NegotiationPayload:
    """The payload of a stored (already verified) negotiation message."""
    return _NEGOTIATION_PAYLOADS[envelope.payload_type].FromString(envelope.payload)


def agreed_terms(thread: ConsumerThreadRecord) -> tuple[Terms, bytes]:
    """The terms of an agreed thread and its agreement digest (the Accept's)."""
    accept_envelope = envelope_of(thread.messages[-1].envelope)
    accept = negotiation_payload(accept_envelope)
    assert isinstance(accept, negotiation_pb2.Accept), "an agreed thread ends with its Accept"
    offer = next(
        negotiation_payload(envelope_of(m.envelope)) for m in thread.messages if m.digest == accept.offer_digest
    )
    assert isinstance(offer, negotiation_pb2.ThreadOpen | negotiation_pb2.Offer)
    return Terms.from_proto(offer.terms), thread.messages[-1].digest


async def ended_threads(
    store: ConsumerStore, biller: str, account_id: str, bill_id: str | None = None
) -> frozenset[bytes]:
    """The arrangements (their thread ids) on the account — on one bill, if given — that the biller ended,
    as its stored (verified) events say (EVT-7: ARRANGEMENT_BROKEN, RENEGOTIATION_OFFERED)."""
    records = await store.stored_events(biller, account_id, 0, limit=MAX_STORED_EVENTS)  # the whole log
    events = (
        event_pb2.Event.FromString(envelope_of(record.envelope).payload)  # verified when stored
        for record in records
        if record.kind in ENDING_EVENTS
    )
    return ended_arrangements(event for event in events if bill_id is None or event.bill_id == bill_id)


async def paid_for_bill(store: ConsumerStore, biller: str, bill_id: str) -> list[Money]:
    """Every payment of the bill our bank made (PAID intents), under any agreement or none.

    ValueError while one is in doubt (SENDING): what is still owed cannot be known until it is resolved."""
    intents = [intent for intent in await store.intents(biller) if intent.bill_id == bill_id]
    if any(intent.state is IntentState.SENDING for intent in intents):
        raise ValueError(f"a payment of {bill_id!r} is in doubt: resolve it before paying or negotiating the rest")
    return [Money.of(intent.amount_minor, intent.currency) for intent in intents if intent.state is IntentState.PAID]


async def owed_facts(store: ConsumerStore, bill: ReceivedBill) -> BillFacts:
    """The bill's facts with what we paid of it (`BillFacts.received_minor`), so that `outstanding` is its
    outstanding balance (PAY-16) as our own record computes it: the principal a new thread restates (TRM-11),
    the amount paid without an agreement. ValueError when nothing is owed any more, or a payment is in doubt."""
    facts = bill.facts
    owed = outstanding_balance(facts.amount_due, await paid_for_bill(store, bill.biller_party_id, facts.bill_id))
    if owed.minor == 0:
        raise ValueError(f"nothing is owed on {facts.bill_id!r} any more")
    return facts.with_received(facts.amount_due.minor - owed.minor)


async def committed_instalments(
    store: ConsumerStore, *, excluding: Iterable[tuple[str, str]] = ()
) -> tuple[Instalment, ...]:
    """The unpaid instalments of every agreed arrangement still in force, with any biller, by date (see
    `ConsumerAgent.committed`). An instalment counts as paid once handed to the bank (PAID or SENDING); an
    arrangement the biller ended (EVT-7) sets no payment any more (PAY-16) and counts for nothing."""
    left_out = set(excluding)
    settled: dict[tuple[str, bytes], set[int]] = {}
    for intent in await store.intents():
        if intent.state in (IntentState.PAID, IntentState.SENDING):
            settled.setdefault((intent.biller_party_id, intent.agreement_digest), set()).add(intent.instalment_index)
    latest = {
        (thread.biller_party_id, thread.bill_id): thread
        for thread in await store.threads(outcome=ThreadOutcome.AGREED)  # oldest first: the last wins
    }
    ended: dict[tuple[str, str], frozenset[bytes]] = {}
    committed: list[Instalment] = []
    for key, thread in latest.items():
        if key in left_out:
            continue
        account = (thread.biller_party_id, thread.account_id)
        if account not in ended:
            ended[account] = await ended_threads(store, *account)
        if thread.thread_id in ended[account]:
            continue
        terms, agreement_digest = agreed_terms(thread)
        paid = settled.get((thread.biller_party_id, agreement_digest), set())
        committed.extend(instalment for _, instalment in unpaid_instalments(terms, paid))
    return tuple(sorted(committed, key=lambda instalment: instalment.due_date))


__all__ = [
    "agreed_terms",
    "committed_instalments",
    "ended_threads",
    "negotiation_payload",
    "owed_facts",
    "paid_for_bill",
]
