"""Deliberately broken consumers, one per class of defect, to show that the consumer conformance suite catches each.

Each is the reference consumer (`parley consumer run --from-env --once
--approve-all`) with one defect patched into the agent before the command
runs, as a program the suite can start. The defects go into the agent's
receive path (`agent.consumer.receive.Receiver`, where every check of what a
biller sends lives) or the protocol core, never into the agent's private
methods:

    python tests/broken_consumers.py DEFECT consumer run --from-env --once --approve-all

`BrokenConsumer.command` is that command line; `fails` lists exactly the
scenarios the suite must FAIL against it (tests/test_conformance_consumer.py
asserts that every other scenario passes).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONSUMER_ARGS = ("consumer", "run", "--from-env", "--once", "--approve-all")


def reference_command() -> str:
    """The reference consumer, as the suite runs it."""
    return shlex.join([sys.executable, "-m", "agent.cli", *CONSUMER_ARGS])


# --- The defects ----------------------------------------------------------------------------------------


def skips_bill_verification() -> None:
    """Bills are parsed and kept without checking their signature (BIL-3)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415 - patched in the broken program only
    from agent.protocol.dsse import digest  # noqa: PLC0415
    from agent.protocol.terms import BillFacts  # noqa: PLC0415
    from agent.stores.base import ReceivedBillRecord  # noqa: PLC0415
    from parley.v1 import bill_pb2  # noqa: PLC0415

    async def unchecked_bill(self: Any, session: Any, envelope: Any, account_id: str) -> ReceivedBillRecord:
        facts = BillFacts.from_proto(bill_pb2.Bill.FromString(envelope.payload))
        return ReceivedBillRecord(
            session.biller, facts.bill_id, account_id, envelope.SerializeToString(), digest(envelope), self._party.now()
        )

    Receiver.check_bill = unchecked_bill  # type: ignore[method-assign]


def accepts_keyset_rollback() -> None:
    """A key set version not above the one held is taken as the biller's current one ("it knows best", KEY-8)."""
    from agent.protocol.keysets import KeyChain  # noqa: PLC0415
    from agent.protocol.limits import DEFAULT_LIMITS, Limits  # noqa: PLC0415
    from parley.v1 import keys_pb2  # noqa: PLC0415

    extend = KeyChain.extend

    def rolled_back(
        self: KeyChain, envelope: Any, *, now: datetime | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> KeyChain:
        version = keys_pb2.KeySet.FromString(envelope.payload).version
        if 0 < version <= self.latest.version:
            if version == 1:
                return KeyChain.verify([envelope], now=now, limits=limits)
            return extend(KeyChain(self.versions[: version - 1]), envelope, now=now, limits=limits)
        return extend(self, envelope, now=now, limits=limits)

    KeyChain.extend = rolled_back  # type: ignore[method-assign]


def pays_instructions_for_another_amount() -> None:
    """Instructions whose amount differs from the intent's are paid all the same (PAY-8)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415

    check = Receiver.check_instructions

    def lenient(self: Any, verified: Any, intent: Any, digests: set[bytes]) -> tuple[str, str] | None:
        refusal = check(self, verified, intent, digests)
        return None if refusal is not None and refusal[0] == "PAYMENT_AMOUNT_MISMATCH" else refusal

    Receiver.check_instructions = lenient  # type: ignore[method-assign, assignment]


def accepts_counter_to_in_options_offer() -> None:
    """The negotiation core never finds an offer within the options, so a biller's counter to one is no
    violation (NEG-12) and the strategy may accept it."""
    from agent.protocol.negotiation import Negotiation  # noqa: PLC0415

    Negotiation._pending_within_options = lambda self: False  # type: ignore[method-assign]


def skips_the_pin() -> None:
    """Neither Hello nor the enrolment's key set chain is compared with the pinned fingerprint (KEY-12)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from agent.protocol.keysets import KeyChain  # noqa: PLC0415

    verify = KeyChain.verify.__func__  # type: ignore[attr-defined]

    def unpinned(cls: type[KeyChain], /, envelopes: Any, *, pin: bytes | None = None, **options: Any) -> KeyChain:
        return verify(cls, envelopes, **options)  # type: ignore[no-any-return]

    KeyChain.verify = classmethod(unpinned)  # type: ignore[method-assign, assignment]
    Receiver.check_hello = lambda self, hello, link: None  # type: ignore[method-assign]


def _lenient_instructions(forgiven: Callable[[str, str], bool]) -> None:
    """check_instructions lets through the refusals `forgiven(reason, detail)` selects (PAY-8)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415

    check = Receiver.check_instructions

    def lenient(self: Any, verified: Any, intent: Any, digests: set[bytes]) -> tuple[str, str] | None:
        refusal = check(self, verified, intent, digests)
        return None if refusal is not None and forgiven(*refusal) else refusal

    Receiver.check_instructions = lenient  # type: ignore[method-assign, assignment]


def pays_unchained_instructions() -> None:
    """Instructions are not checked against the intent's thread: sequence and previous digest (PAY-8)."""
    _lenient_instructions(lambda reason, _: reason in ("SEQUENCE_MISMATCH", "PREVIOUS_DIGEST_MISMATCH"))


def pays_instructions_for_another_intent() -> None:
    """Instructions naming another intent_id are paid (PAY-8)."""
    _lenient_instructions(lambda reason, detail: reason == "MALFORMED_PAYLOAD" and "for intent" in detail)


def pays_after_pay_by_time() -> None:
    """pay_by_time is read a day late (a time-zone slip), so instructions past their time are paid (PAY-8).

    Both places that read it — the receive path and the payment step — get the same slip."""
    from datetime import timedelta  # noqa: PLC0415

    from agent.consumer import payments, receive  # noqa: PLC0415

    for module in (payments, receive):
        read_time = module.read_time

        def slipping(message: Any, field: str, reason: Any, read: Any = read_time) -> datetime:
            moment: datetime = read(message, field, reason)
            return moment + timedelta(days=1) if field == "pay_by_time" else moment

        module.read_time = slipping  # type: ignore[attr-defined]


def trusts_any_instructions_signature() -> None:
    """Instructions are opened with keys that verify any signature: only their keyid is looked at (PAY-8)."""
    import dataclasses  # noqa: PLC0415

    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from agent.protocol.keys import VerifyKey  # noqa: PLC0415
    from agent.protocol.keysets import KeyChain  # noqa: PLC0415
    from parley.v1 import payment_pb2  # noqa: PLC0415

    class TrustingKey(VerifyKey):
        def verify(self, signature: bytes, data: bytes) -> bool:
            return True

    class TrustingChain(KeyChain):
        def candidate_keys(self, keyid: str) -> tuple[VerifyKey, ...]:
            return tuple(TrustingKey.from_bytes(key.raw) for key in super().candidate_keys(keyid))

    open_message = Receiver.open

    async def trusting(self: Any, session: Any, envelope: Any, expected: Any, *, stored: bool) -> Any:
        if payment_pb2.PaymentInstructions in expected:
            session = dataclasses.replace(session, chain=TrustingChain(session.chain.versions))
        return await open_message(self, session, envelope, expected, stored=stored)

    Receiver.open = trusting  # type: ignore[method-assign]


def takes_bills_for_any_account() -> None:
    """A bill is checked against the account it names, not the account the client enrolled (AUZ-6)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from parley.v1 import bill_pb2  # noqa: PLC0415

    check_bill = Receiver.check_bill

    async def any_account(self: Any, session: Any, envelope: Any, account_id: str) -> Any:
        named = bill_pb2.Bill.FromString(envelope.payload).account_id
        return await check_bill(self, session, envelope, named or account_id)

    Receiver.check_bill = any_account  # type: ignore[method-assign]


def ignores_revocations() -> None:
    """A key's revoke_time is never compared with a message's create_time (KEY-11)."""
    from agent.protocol import keysets  # noqa: PLC0415

    check_usable = keysets._check_usable

    def unrevoked(entry: Any, revocations: Any, at: datetime) -> None:
        check_usable(entry, {}, at)

    keysets._check_usable = unrevoked


def judges_bills_as_live() -> None:
    """Bills are opened as live messages: one fetched after its expire_time is refused MESSAGE_EXPIRED (BIL-3)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from parley.v1 import bill_pb2  # noqa: PLC0415

    open_message = Receiver.open

    async def live(self: Any, session: Any, envelope: Any, expected: Any, *, stored: bool) -> Any:
        return await open_message(self, session, envelope, expected, stored=stored and bill_pb2.Bill not in expected)

    Receiver.open = live  # type: ignore[method-assign]


def records_payments_in_memory_only() -> None:
    """Whether an intent is being paid, or paid, is kept in the process's memory only, never stored: the run
    that paid knows it (and fetches the receipt), but after a crash the next run finds the intent merely
    instructed and pays it again (PAY-7)."""
    import dataclasses  # noqa: PLC0415

    from agent.stores.base import IntentState  # noqa: PLC0415
    from agent.stores.consumer_sqlite import SqliteConsumerStore  # noqa: PLC0415

    remembered: dict[tuple[str, str], tuple[Any, str]] = {}
    get_intent, intents = SqliteConsumerStore.get_intent, SqliteConsumerStore.intents

    def recalled(intent: Any) -> Any:
        memory = remembered.get((intent.biller_party_id, intent.intent_id))
        return intent if memory is None else dataclasses.replace(intent, state=memory[0], payment_proof=memory[1])

    async def begin_sending(self: Any, biller_party_id: str, intent_id: str, now: datetime) -> bool:
        remembered[biller_party_id, intent_id] = (IntentState.SENDING, "")
        return True

    async def finish_sending(
        self: Any, biller_party_id: str, intent_id: str, *, paid: bool, proof: str, now: datetime
    ) -> Any:
        remembered[biller_party_id, intent_id] = (IntentState.PAID if paid else IntentState.INSTRUCTED, proof)
        return recalled(await get_intent(self, biller_party_id, intent_id))

    async def get_intent_recalled(self: Any, biller_party_id: str, intent_id: str) -> Any:
        intent = await get_intent(self, biller_party_id, intent_id)
        return None if intent is None else recalled(intent)

    async def intents_recalled(self: Any, *args: Any, **options: Any) -> Any:
        return [recalled(intent) for intent in await intents(self, *args, **options)]

    SqliteConsumerStore.begin_sending = begin_sending  # type: ignore[method-assign]
    SqliteConsumerStore.finish_sending = finish_sending  # type: ignore[method-assign]
    SqliteConsumerStore.get_intent = get_intent_recalled  # type: ignore[method-assign]
    SqliteConsumerStore.intents = intents_recalled  # type: ignore[method-assign]


def ignores_announced_limits() -> None:
    """The biller's messages are judged with the default limits, whatever its Hello announced (LIM-13)."""
    from agent.consumer import enrolment, sessions  # noqa: PLC0415

    def own_limits(own: Any, announced: Any) -> Any:
        return own

    sessions.agreed_limits = own_limits  # type: ignore[attr-defined]
    enrolment.agreed_limits = own_limits  # type: ignore[attr-defined]


def takes_a_lost_answer_for_a_refusal() -> None:
    """A move whose answer is lost (UNAVAILABLE) is taken for a refused one: not sent again, but dropped, and
    another move signed in its place (TRN-6). Other calls are retried as usual."""
    import dataclasses  # noqa: PLC0415

    from agent.consumer import negotiation  # noqa: PLC0415
    from agent.transport.client import BillerClient  # noqa: PLC0415

    negotiate = BillerClient.negotiate

    async def once(self: Any, move: Any, disclosure: bytes = b"") -> Any:
        retry, self.retry = self.retry, dataclasses.replace(self.retry, attempts=1)
        try:
            return await negotiate(self, move, disclosure)
        finally:
            self.retry = retry

    BillerClient.negotiate = once  # type: ignore[method-assign]
    negotiation.is_transient = lambda error: False  # type: ignore[attr-defined]


def skips_the_time_checks_of_stored_instructions() -> None:
    """Instructions, stored answers, are opened with no time check at all: MESSAGE_EXPIRED is rightly skipped,
    but MESSAGE_NOT_YET_VALID too (PAY-10)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from agent.protocol.messages import open_envelope  # noqa: PLC0415
    from parley.v1 import payment_pb2  # noqa: PLC0415

    open_now = Receiver._open_now

    def timeless(self: Any, chain: Any, limits: Any, envelope: Any, expected: Any, *, stored: bool) -> Any:
        if stored and payment_pb2.PaymentInstructions in expected:
            recipient = self._party.party_id
            return open_envelope(envelope, expected, sender_keys=chain, recipient=recipient, now=None, limits=limits)
        return open_now(self, chain, limits, envelope, expected, stored=stored)

    Receiver._open_now = timeless  # type: ignore[method-assign]


def judges_instructions_as_live() -> None:
    """Instructions are opened as live messages: stored ones answered to a retry after their expire_time are
    refused MESSAGE_EXPIRED, and never paid (PAY-10)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from parley.v1 import payment_pb2  # noqa: PLC0415

    open_message = Receiver.open

    async def live(self: Any, session: Any, envelope: Any, expected: Any, *, stored: bool) -> Any:
        stored = stored and payment_pb2.PaymentInstructions not in expected
        return await open_message(self, session, envelope, expected, stored=stored)

    Receiver.open = live  # type: ignore[method-assign]


def discloses_unsalted_circumstances() -> None:
    """The disclosure sent beside an opening (and committed to) is the bare Circumstances message, not a salted
    Disclosure: its digest gives it away to anyone who hashes guesses, and it is no Disclosure (PRV-2). The
    program does not check its own disclosure before sending it either."""
    import types  # noqa: PLC0415

    from agent.consumer import negotiation  # noqa: PLC0415
    from parley.v1 import negotiation_pb2  # noqa: PLC0415

    def unsalted(*, salt: bytes, circumstances: Any) -> Any:
        return circumstances  # serialized as it is: no salt around it

    messages = types.SimpleNamespace(
        **{name: getattr(negotiation_pb2, name) for name in dir(negotiation_pb2) if not name.startswith("__")},
    )
    messages.Disclosure = unsalted
    vars(negotiation)["negotiation_pb2"] = messages  # the consumer's negotiation only: the messages it builds
    # ...and without the reference's own check of what it discloses (the receiver's PRV-3 and PRV-9 rules,
    # applied before sending), which would catch this bug before the biller sees it.
    vars(negotiation)["check_disclosure"] = lambda committed, disclosure, opened_on: None


def _lenient_receipts(forgiven: Callable[[str, str], bool]) -> None:
    """check_receipt keeps a receipt whose refusal `forgiven(reason, detail)` selects, as if it had passed (PAY-9)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from agent.protocol.dsse import digest  # noqa: PLC0415
    from agent.protocol.errors import RemoteProtocolError  # noqa: PLC0415
    from agent.protocol.terms import Money  # noqa: PLC0415
    from agent.stores.base import ReceiptRecord  # noqa: PLC0415
    from parley.v1 import payment_pb2  # noqa: PLC0415

    check = Receiver.check_receipt

    async def lenient(self: Any, session: Any, intent: Any, envelope: Any) -> ReceiptRecord:
        try:
            return await check(self, session, intent, envelope)
        except RemoteProtocolError as error:
            if not forgiven(error.reason.name, error.detail):
                raise
        received = Money.from_proto(payment_pb2.Receipt.FromString(envelope.payload).amount_received)
        return ReceiptRecord(
            session.biller,
            intent.intent_id,
            envelope.SerializeToString(),
            digest(envelope),
            received.minor,
            None,
            self._party.now(),
        )

    Receiver.check_receipt = lenient  # type: ignore[method-assign]


def takes_unchained_receipts() -> None:
    """A receipt is not checked to be message 2 of the intent's thread, chained to the instructions (PAY-9)."""
    _lenient_receipts(lambda reason, _: reason in ("SEQUENCE_MISMATCH", "PREVIOUS_DIGEST_MISMATCH"))


def takes_receipts_for_another_intent() -> None:
    """A receipt naming another intent_id is kept as this payment's (PAY-9)."""
    _lenient_receipts(lambda reason, detail: reason == "MALFORMED_PAYLOAD" and "for intent" in detail)


def refuses_lapsed_instructions_on_arrival() -> None:
    """Instructions that arrive already past their pay_by_time are refused (MESSAGE_EXPIRED) rather than lapsed,
    as the reference consumer did before PAY-17 said they lapse: they hold the payment for good, and every later
    run meets them again. They are never paid, and instructions that lapse while stored still lapse."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from agent.protocol.errors import Reason  # noqa: PLC0415
    from agent.protocol.messages import read_time  # noqa: PLC0415

    check_instructions = Receiver.check_instructions

    def refusing(self: Any, verified: Any, intent: Any, intent_digests: set[bytes]) -> tuple[str, str] | None:
        refusal = check_instructions(self, verified, intent, intent_digests)
        pay_by = read_time(verified.message, "pay_by_time", Reason.MALFORMED_PAYLOAD)
        if refusal is None and pay_by < self._party.now():
            return Reason.MESSAGE_EXPIRED.name, f"the instructions were to be paid by {pay_by}"
        return refusal

    Receiver.check_instructions = refusing  # type: ignore[method-assign]


def checks_pay_by_time_only_on_receipt() -> None:
    """pay_by_time is checked when the instructions arrive, not again when the bank is asked: the payment step reads
    it a day late, so instructions left unpaid past their time are paid later (PAY-8)."""
    from datetime import timedelta  # noqa: PLC0415

    from agent.consumer import payments  # noqa: PLC0415

    refuses_lapsed_instructions_on_arrival()

    read_time = payments.read_time  # type: ignore[attr-defined]

    def slipping(message: Any, field: str, reason: Any) -> datetime:
        moment: datetime = read_time(message, field, reason)
        return moment + timedelta(days=1) if field == "pay_by_time" else moment

    payments.read_time = slipping  # type: ignore[attr-defined]


def takes_a_repeated_last_event_for_a_broken_chain() -> None:
    """An event at the sequence of the last one taken is not dropped as a duplicate but refused as out of sequence,
    so the stream is torn down and resumed from the cursor (EVT-5)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from agent.protocol.errors import Reason, RemoteProtocolError  # noqa: PLC0415

    open_event = Receiver.open_event

    async def strict(self: Any, session: Any, envelope: Any, log_id: bytes) -> Any:
        verified = await open_event(self, session, envelope, log_id)
        cursor = await self._store.event_cursor(session.biller, verified.message.account_id)
        if verified.header.sequence == cursor.next_sequence - 1:
            raise RemoteProtocolError(Reason.SEQUENCE_MISMATCH, "the last event again, taken for a broken chain")
        return verified

    Receiver.open_event = strict  # type: ignore[method-assign]


def keeps_lapsed_instructions() -> None:
    """Instructions whose pay_by_time passed unpaid never lapse: the payment stays with them, refused on every run
    (PAY-8) and never paid under a new intent (PAY-17) — the reference consumer before lapsed intents existed."""
    from agent.stores.consumer_sqlite import SqliteConsumerStore  # noqa: PLC0415

    async def never_lapses(self: Any, biller_party_id: str, intent_id: str, now: datetime) -> bool:
        return False

    SqliteConsumerStore.lapse_intent = never_lapses  # type: ignore[method-assign]


DEFECTS: dict[str, Callable[[], None]] = {
    "skips-bill-verification": skips_bill_verification,
    "accepts-keyset-rollback": accepts_keyset_rollback,
    "pays-instructions-for-another-amount": pays_instructions_for_another_amount,
    "accepts-counter-to-in-options-offer": accepts_counter_to_in_options_offer,
    "skips-the-pin": skips_the_pin,
    "pays-unchained-instructions": pays_unchained_instructions,
    "pays-instructions-for-another-intent": pays_instructions_for_another_intent,
    "pays-after-pay-by-time": pays_after_pay_by_time,
    "trusts-any-instructions-signature": trusts_any_instructions_signature,
    "takes-bills-for-any-account": takes_bills_for_any_account,
    "ignores-revocations": ignores_revocations,
    "judges-bills-as-live": judges_bills_as_live,
    "records-payments-in-memory-only": records_payments_in_memory_only,
    "ignores-announced-limits": ignores_announced_limits,
    "takes-a-lost-answer-for-a-refusal": takes_a_lost_answer_for_a_refusal,
    "skips-the-time-checks-of-stored-instructions": skips_the_time_checks_of_stored_instructions,
    "judges-instructions-as-live": judges_instructions_as_live,
    "discloses-unsalted-circumstances": discloses_unsalted_circumstances,
    "takes-unchained-receipts": takes_unchained_receipts,
    "takes-receipts-for-another-intent": takes_receipts_for_another_intent,
    "checks-pay-by-time-only-on-receipt": checks_pay_by_time_only_on_receipt,
    "takes-a-repeated-last-event-for-a-broken-chain": takes_a_repeated_last_event_for_a_broken_chain,
    "keeps-lapsed-instructions": keeps_lapsed_instructions,
    "refuses-lapsed-instructions-on-arrival": refuses_lapsed_instructions_on_arrival,
}


@dataclass(frozen=True)
class BrokenConsumer:
    """A broken consumer: its defect class, the program's defect argument and the scenarios it must FAIL."""

    name: str
    defect: str
    fails: frozenset[str]
    skips: frozenset[str] = frozenset()  # scenarios its defect keeps from being played (each says why)

    @property
    def command(self) -> str:
        return shlex.join([sys.executable, str(Path(__file__).resolve()), self.defect, *CONSUMER_ARGS])


BROKEN_CONSUMERS = (
    BrokenConsumer(
        "pays a forged bill",
        "skips-bill-verification",
        # The bills of the rollback and revocation scenarios are signed by a revoked key, one names another
        # account, and the doctored bills are addressed elsewhere, out of place or from the future: a client
        # that checks no bill takes them all.
        frozenset(
            {
                "BIL-3/forged-bill-signature",
                "KEY-8/keyset-rollback",
                "KEY-11/bill-signed-by-revoked-key",
                "AUZ-6/bill-for-another-account",
                "LIM-13/announced-lifetime",
                "HDR-4/bill-to-another-party",
                "BIL-6/bill-not-at-sequence-0",
                "HDR-5/bill-from-the-future",
            }
        ),
    ),
    BrokenConsumer("accepts a key set rollback", "accepts-keyset-rollback", frozenset({"KEY-8/keyset-rollback"})),
    BrokenConsumer(
        "pays instructions for another amount",
        "pays-instructions-for-another-amount",
        frozenset({"PAY-8/instructions-amount"}),
    ),
    BrokenConsumer(
        "accepts a counter to an in-options offer",
        "accepts-counter-to-in-options-offer",
        frozenset({"NEG-12/counter-to-in-options-offer"}),
    ),
    BrokenConsumer("ignores the pinned fingerprint", "skips-the-pin", frozenset({"KEY-12/unpinned-biller"})),
    BrokenConsumer(
        "pays unchained instructions",
        "pays-unchained-instructions",
        frozenset({"PAY-8/instructions-unchained", "PAY-8/instructions-wrong-sequence"}),
    ),
    BrokenConsumer(
        "pays instructions for another intent",
        "pays-instructions-for-another-intent",
        frozenset({"PAY-8/instructions-other-intent"}),
    ),
    BrokenConsumer(
        "pays after the pay-by time",
        "pays-after-pay-by-time",
        # It reads the time a day late when it pays too, so instructions left unpaid past their time are paid.
        # Never lapsed, the instructions left unpaid in PAY-17's run 1 are paid in its run 2 as well.
        frozenset(
            {
                "PAY-8/instructions-pay-by-passed",
                "PAY-8/pay-by-passed-before-paying",
                "PAY-17/lapsed-instructions-new-intent",
                "PAY-17/instructions-arrive-lapsed",
            }
        ),
    ),
    BrokenConsumer(
        "trusts any signature on instructions",
        "trusts-any-instructions-signature",
        frozenset({"PAY-8/instructions-forged-signature"}),
    ),
    BrokenConsumer(
        "takes bills for any account", "takes-bills-for-any-account", frozenset({"AUZ-6/bill-for-another-account"})
    ),
    BrokenConsumer("ignores key revocations", "ignores-revocations", frozenset({"KEY-11/bill-signed-by-revoked-key"})),
    BrokenConsumer(
        "judges bills as live",
        "judges-bills-as-live",
        frozenset({"BIL-3/old-bill-stored"}),
        # Judged live, the bill issued under the expired key set is refused (KEYSET_EXPIRED), so the client never
        # negotiates on it and the scenario cannot be played.
        skips=frozenset({"KEY-13/expired-keyset-live-reply"}),
    ),
    BrokenConsumer(
        "records payments in memory only",
        "records-payments-in-memory-only",
        # Every scenario that runs the client twice finds its payment forgotten on the second run.
        frozenset({"PAY-7/crash-after-bank-order", "EVT-5/duplicate-event", "PAY-9/receipt-wrong-amount"}),
    ),
    BrokenConsumer(
        "ignores the limits Hello announced",
        "ignores-announced-limits",
        frozenset({"LIM-13/announced-lifetime"}),
        # Its opening's deadline is days away whatever negotiation time Hello announced: the counter cannot
        # come close to it.
        skips=frozenset({"NEG-21/counter-close-to-the-deadline"}),
    ),
    BrokenConsumer(
        "takes a lost answer for a refusal",
        "takes-a-lost-answer-for-a-refusal",
        frozenset({"TRN-6/negotiate-answer-lost"}),
    ),
    BrokenConsumer(
        "skips the time checks of stored instructions",
        "skips-the-time-checks-of-stored-instructions",
        frozenset({"PAY-10/retried-intent-instructions-from-the-future"}),
    ),
    BrokenConsumer(
        "judges instructions as live",
        "judges-instructions-as-live",
        frozenset({"PAY-10/retried-intent-instructions-expired"}),
    ),
    BrokenConsumer(
        "discloses unsalted circumstances",
        "discloses-unsalted-circumstances",
        frozenset({"PRV-2/disclosure-as-committed"}),
        # Its one disclosure does not parse as a Disclosure: PRV-8 cannot judge what it says.
        skips=frozenset({"PRV-8/disclosure-minimal"}),
    ),
    BrokenConsumer("keeps unchained receipts", "takes-unchained-receipts", frozenset({"PAY-9/receipt-unchained"})),
    BrokenConsumer(
        "keeps receipts for another intent",
        "takes-receipts-for-another-intent",
        frozenset({"PAY-9/receipt-other-intent"}),
    ),
    BrokenConsumer(
        "checks the pay-by time only when instructions arrive",
        "checks-pay-by-time-only-on-receipt",
        # Refused on arrival, the instructions a retry brings back after their time hold the payment.
        frozenset(
            {
                "PAY-8/pay-by-passed-before-paying",
                "PAY-17/lapsed-instructions-new-intent",
                "PAY-17/instructions-arrive-lapsed",
            }
        ),
    ),
    BrokenConsumer(
        "takes the last event again for a broken chain",
        "takes-a-repeated-last-event-for-a-broken-chain",
        frozenset({"EVT-5/last-event-again"}),
    ),
    BrokenConsumer(
        "keeps instructions that lapsed unpaid",
        "keeps-lapsed-instructions",
        # Never lapsed, the instructions a retry brings back after their time hold the payment too.
        frozenset({"PAY-17/lapsed-instructions-new-intent", "PAY-17/instructions-arrive-lapsed"}),
    ),
    BrokenConsumer(
        "refuses instructions that arrive lapsed",
        "refuses-lapsed-instructions-on-arrival",
        frozenset({"PAY-17/instructions-arrive-lapsed"}),
    ),
)


def main(argv: list[str]) -> int:
    """`broken_consumers.py DEFECT ARGS...`: patch the defect in, then run `parley ARGS...`."""
    if not argv or argv[0] not in DEFECTS:
        print(f"usage: {Path(__file__).name} {{{','.join(DEFECTS)}}} PARLEY-ARGS...", file=sys.stderr)
        return 2
    DEFECTS[argv[0]]()
    from agent.cli import main as parley  # noqa: PLC0415

    return parley(argv[1:])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
