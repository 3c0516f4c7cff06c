"""What is agreed and what is still owed: the terms of an agreed thread and its unpaid instalments.

Both the strategy's context (`committed`) and `pay` (which instalment is next) ask "which instalments
of this agreement are not paid yet?"; the core answers it (`agent.protocol.arrangements`), for the
biller too.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.consumer.receive import envelope_of
from agent.protocol.arrangements import unpaid_instalments
from agent.protocol.moves import NEGOTIATION_TYPES, NegotiationPayload
from agent.protocol.terms import Instalment, Terms
from agent.stores.base import ConsumerStore, ConsumerThreadRecord, IntentState, ThreadOutcome
from parley.v1 import envelope_pb2, negotiation_pb2

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


async def committed_instalments(
    store: ConsumerStore, *, excluding: Iterable[tuple[str, str]] = ()
) -> tuple[Instalment, ...]:
    """The unpaid instalments of every agreed arrangement, with any biller, by date (see
    `ConsumerAgent.committed`). An instalment counts as paid once handed to the bank (PAID or SENDING)."""
    left_out = set(excluding)
    settled: dict[tuple[str, bytes], set[int]] = {}
    for intent in await store.intents():
        if intent.state in (IntentState.PAID, IntentState.SENDING):
            settled.setdefault((intent.biller_party_id, intent.agreement_digest), set()).add(intent.instalment_index)
    latest = {
        (thread.biller_party_id, thread.bill_id): thread
        for thread in await store.threads(outcome=ThreadOutcome.AGREED)  # oldest first: the last wins
    }
    committed: list[Instalment] = []
    for key, thread in latest.items():
        if key in left_out:
            continue
        terms, agreement_digest = agreed_terms(thread)
        paid = settled.get((thread.biller_party_id, agreement_digest), set())
        committed.extend(instalment for _, instalment in unpaid_instalments(terms, paid))
    return tuple(sorted(committed, key=lambda instalment: instalment.due_date))


__all__ = ["agreed_terms", "committed_instalments", "negotiation_payload"]
