"""What the household decides when its bot must not: a payment in doubt, and instructions the bot refused.

The bot never guesses either. A payment handed to the bank with no answer is in doubt and is never handed
over again (PAY-7): only the household, having asked its bank, can say whether it was paid. Instructions
that failed the checks of PAY-8 are never paid, and their intent holds the payment: only the household,
having asked the biller, can say that the fault has passed and new instructions should be asked for.

`parley consumer resolve-payment` / `retry-payment` and the household's pages both call these, on the
state directory's store alone (no key, no biller contacted); the next pass acts on the answer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from agent.stores.base import ConsumerStore, IntentRecord, IntentState

PaymentDecision = Literal["retry", "paid", "not-paid"]
PAYMENT_DECISIONS: tuple[PaymentDecision, ...] = get_args(PaymentDecision)
MAX_BANK_REFERENCE_CHARS = 140  # an ISO 20022 end-to-end id is 35; a bank's own reference is shorter still


class PaymentDecisionRefused(ValueError):
    """The decision cannot be taken (unknown payment, or not in the state it needs): one line, nothing changed."""


def payment_decision(value: object) -> PaymentDecision | None:
    """The decision a form field names, or None."""
    return next((decision for decision in PAYMENT_DECISIONS if decision == value), None)


async def _find(store: ConsumerStore, intent_id: str) -> IntentRecord:
    """The household's intent with this id, whichever biller it is with (ids are random, so at most one)."""
    found = [intent for intent in await store.intents() if intent.intent_id == intent_id]
    if not found:
        raise PaymentDecisionRefused(
            f"no payment {intent_id!r} in this household: `parley consumer status` names each payment that needs you"
        )
    return found[0]


async def retry_refused(store: ConsumerStore, intent_id: str, now: datetime) -> IntentRecord:
    """Set aside refused instructions (kept as evidence): the payment's next pass asks for new ones."""
    intent = await _find(store, intent_id)
    if intent.state is not IntentState.REFUSED:
        raise PaymentDecisionRefused(
            f"payment {intent_id} is {intent.state.value}: only a payment whose instructions the bot refused can be "
            "retried"
        )
    if intent.set_aside_at is not None:
        raise PaymentDecisionRefused(
            f"payment {intent_id} was already set aside: the next run asks for new instructions"
        )
    try:  # the store checks the state again as it writes: a pass running meanwhile cannot be overtaken
        return await store.set_aside_intent(intent.biller_party_id, intent_id, now)
    except (LookupError, ValueError) as error:
        raise PaymentDecisionRefused(str(error).strip("'\"")) from error


async def resolve_in_doubt(
    store: ConsumerStore, intent_id: str, *, paid: bool, bank_reference: str, now: datetime
) -> IntentRecord:
    """Say what the bank did with a payment in doubt: paid (with its reference), or certainly not paid — the
    bot then pays it again under its instructions while their pay-by time allows, and otherwise asks for new
    ones (PAY-17)."""
    bank_reference = bank_reference.strip()
    if paid and not bank_reference:
        raise PaymentDecisionRefused("a paid payment needs the bank's reference (--bank-reference REF)")
    if not paid and bank_reference:
        raise PaymentDecisionRefused("a payment the bank did not make has no bank reference: leave it out")
    if len(bank_reference) > MAX_BANK_REFERENCE_CHARS or not bank_reference.isprintable():
        raise PaymentDecisionRefused(
            f"the bank reference must be printable text of at most {MAX_BANK_REFERENCE_CHARS} characters"
        )
    intent = await _find(store, intent_id)
    if intent.state is not IntentState.SENDING:
        raise PaymentDecisionRefused(
            f"payment {intent_id} is {intent.state.value}, not in doubt: there is nothing to resolve"
        )
    try:
        return await store.finish_sending(intent.biller_party_id, intent_id, paid=paid, proof=bank_reference, now=now)
    except LookupError as error:
        raise PaymentDecisionRefused(str(error).strip("'\"")) from error


__all__ = [
    "MAX_BANK_REFERENCE_CHARS",
    "PAYMENT_DECISIONS",
    "PaymentDecision",
    "PaymentDecisionRefused",
    "payment_decision",
    "resolve_in_doubt",
    "retry_refused",
]
