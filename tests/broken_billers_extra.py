"""More broken billers, one realistic defect each, for the cases of issue 15 (boundaries, check order, closed states).

Unlike tests/broken_billers.py, each defect here wraps a *public* method of the
reference `BillerAgent` instance (the servicer calls through that very object)
— `hello`, `negotiate`, `list_bills`, `create_payment_intent`, `watch_events` —
and changes only what the wire sees: so they survive a restructuring of the
agent's private code. The re-enrolment defects (ENR-12, issue 14) are inside an
enrolment's transaction or a read of the store, out of a wrapper's reach: they
replace a public phase (`agent.party.bills`, `.events`) with a subclass, as
tests/broken_billers.py does. A wrapper cannot apply a move the agent refused, so a
defect that would have let a move through is shown by the answer such a
biller gives instead (a wrong reason, or a stream left open); either way the
case must FAIL. `fails` lists exactly the cases the suite must FAIL against it
(tests/test_conformance_biller.py asserts that no other case fails).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from google.protobuf.message import DecodeError

from agent.biller import BillerAgent
from agent.biller.bills import BillsPhase, bill_facts
from agent.biller.events import EventsPhase, Watch
from agent.biller.negotiation import NegotiationPhase
from agent.biller.party import stored_envelope
from agent.biller.plugins import BillContext, OfferContext, Policy
from agent.protocol.answers import AcceptOffer, Answer
from agent.protocol.errors import ProtocolError, Reason, RemoteProtocolError
from agent.protocol.messages import PAYLOAD_TYPES, parse_payload
from agent.protocol.terms import AdvertisedOptions, Money, Terms
from agent.stores.base import BillRecord, PendingEvent
from parley.v1 import (
    account_pb2,
    bill_pb2,
    biller_service_pb2,
    enrolment_pb2,
    envelope_pb2,
    event_pb2,
    header_pb2,
    keys_pb2,
    negotiation_pb2,
    terms_pb2,
)

Defect = Callable[[BillerAgent], None]
_VIOLATIONS = {  # the reasons whose refusal ends a thread PROTOCOL_ERROR (PROTOCOL.md §9.5, "violation")
    Reason.OUT_OF_TURN,
    Reason.ROUND_LIMIT_EXCEEDED,
    Reason.ACCEPT_DIGEST_MISMATCH,
    Reason.OPTIONS_NOT_HONOURED,
}


def _header(envelope: envelope_pb2.Envelope) -> Any:
    """The header of a negotiation message, or an empty one when the payload is not a readable move."""
    try:
        return PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload).header  # type: ignore[attr-defined]
    except (KeyError, DecodeError, AttributeError):
        return header_pb2.Header()


def announces_fewer_instalments(agent: BillerAgent) -> None:
    """LIM-10/LIM-6: Hello announces max_instalments one below what the terms check enforces (an off-by-one
    between the announced and the enforced limit): a plan one above the announced limit goes through."""
    hello = agent.hello

    async def announcing(request: biller_service_pb2.HelloRequest) -> biller_service_pb2.HelloResponse:
        response = await hello(request)
        response.limits.max_instalments -= 1
        return response

    setattr(agent, "hello", announcing)  # noqa: B010 - an instance attribute: the servicer calls through it


def serves_cursor_past_the_end(agent: BillerAgent) -> None:
    """EVT-3: a cursor past the end of the log is answered with an open stream that waits for events, instead of
    CURSOR_OUT_OF_RANGE (only absurd cursors, beyond 2^32, are still refused)."""
    watch_events = agent.watch_events

    async def lenient(envelope: envelope_pb2.Envelope) -> AsyncIterator[envelope_pb2.Envelope]:
        try:
            return await watch_events(envelope)
        except RemoteProtocolError as error:
            start = account_pb2.AccountQuery.FromString(envelope.payload).start_sequence
            if error.reason is not Reason.CURSOR_OUT_OF_RANGE or start >= 1 << 32:
                raise
            return _waiting_forever()

    setattr(agent, "watch_events", lenient)  # noqa: B010


async def _waiting_forever() -> AsyncIterator[envelope_pb2.Envelope]:
    await asyncio.Event().wait()
    yield envelope_pb2.Envelope()  # pragma: no cover - never reached


def parses_before_verifying(agent: BillerAgent) -> None:
    """ENV-10/ENV-4: a query is parsed (unknown fields judged) before its signature is verified."""
    list_bills = agent.list_bills

    async def parsing_first(envelope: envelope_pb2.Envelope) -> biller_service_pb2.ListBillsResponse:
        try:
            return await list_bills(envelope)
        except RemoteProtocolError as error:
            if error.reason is Reason.BAD_SIGNATURE:
                # the payload judged first: raises UNKNOWN_FIELD (or MALFORMED_PAYLOAD) before BAD_SIGNATURE
                parse_payload(account_pb2.AccountQuery, envelope.payload)
            raise

    setattr(agent, "list_bills", parsing_first)  # noqa: B010


def first_intent_sequence_as_header_error(agent: BillerAgent) -> None:
    """HDR-6: a PaymentIntent at a sequence other than 0 is refused as MALFORMED_HEADER, not SEQUENCE_MISMATCH."""
    create_payment_intent = agent.create_payment_intent

    async def mislabelled(envelope: envelope_pb2.Envelope) -> biller_service_pb2.CreatePaymentIntentResponse:
        try:
            return await create_payment_intent(envelope)
        except RemoteProtocolError as error:
            if error.reason is Reason.SEQUENCE_MISMATCH:
                raise RemoteProtocolError(Reason.MALFORMED_HEADER, "an intent must be at sequence 0") from error
            raise

    setattr(agent, "create_payment_intent", mislabelled)  # noqa: B010


class _ThreadWatcher:
    """What a wrapper of `negotiate` learns of each thread from the answers: its length and whether it AGREED."""

    def __init__(self) -> None:
        self.length: dict[bytes, int] = {}
        self.agreed: set[bytes] = set()

    def answered(self, envelope: envelope_pb2.Envelope, response: biller_service_pb2.NegotiateResponse) -> None:
        header = _header(envelope)
        self.length[header.thread_id] = header.sequence + 1 + (1 if response.HasField("reply") else 0)
        if response.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_AGREED:
            self.agreed.add(header.thread_id)


def closes_only_agreed_threads(agent: BillerAgent) -> None:
    """NEG-14: only an AGREED thread counts as closed; a move on a thread that ended otherwise (rejected,
    withdrawn, expired, protocol error) is judged as on an open one — here, refused as OUT_OF_TURN."""
    negotiate, watcher = agent.negotiate, _ThreadWatcher()

    async def agreed_only(envelope: envelope_pb2.Envelope, disclosure: bytes = b"") -> Any:
        try:
            response = await negotiate(envelope, disclosure)
        except RemoteProtocolError as error:
            thread_id = _header(envelope).thread_id
            if error.reason is Reason.THREAD_CLOSED and thread_id not in watcher.agreed:
                raise RemoteProtocolError(Reason.OUT_OF_TURN, "not the consumer's turn") from error
            raise
        watcher.answered(envelope, response)
        return response

    setattr(agent, "negotiate", agreed_only)  # noqa: B010


def checks_sequence_before_closed(agent: BillerAgent) -> None:
    """NEG-15: the sequence is checked before whether the thread is closed (checks 2 and 1 swapped)."""
    negotiate, watcher = agent.negotiate, _ThreadWatcher()

    async def swapped(envelope: envelope_pb2.Envelope, disclosure: bytes = b"") -> Any:
        try:
            response = await negotiate(envelope, disclosure)
        except RemoteProtocolError as error:
            header = _header(envelope)
            if error.reason in _VIOLATIONS:  # recorded as the evidence: the thread grew by one
                watcher.length[header.thread_id] = header.sequence + 1
            expected = watcher.length.get(header.thread_id)
            if error.reason is Reason.THREAD_CLOSED and expected is not None and header.sequence != expected:
                raise RemoteProtocolError(Reason.SEQUENCE_MISMATCH, f"expected sequence {expected}") from error
            raise
        watcher.answered(envelope, response)
        return response

    setattr(agent, "negotiate", swapped)  # noqa: B010


def announces_more_open_threads(agent: BillerAgent) -> None:
    """LIM-10/LIM-7: Hello announces max_open_threads_per_account one above what the opening check enforces."""
    hello = agent.hello

    async def announcing(request: biller_service_pb2.HelloRequest) -> biller_service_pb2.HelloResponse:
        response = await hello(request)
        response.limits.max_open_threads_per_account += 1
        return response

    setattr(agent, "hello", announcing)  # noqa: B010


def _terms_of(envelope: envelope_pb2.Envelope) -> terms_pb2.Terms | None:
    """The terms a ThreadOpen or Offer carries (None for other moves or unreadable payloads)."""
    if envelope.payload_type not in ("parley.v1.ThreadOpen", "parley.v1.Offer"):
        return None
    try:
        move: Any = PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload)
    except DecodeError:
        return None
    return move.terms if move.HasField("terms") else None


def _remapping_negotiate(agent: BillerAgent, remap: Callable[[Reason, terms_pb2.Terms], Reason | None]) -> None:
    """`negotiate` refusing terms with `remap(reason, terms)` instead of `reason` when it gives one."""
    negotiate = agent.negotiate

    async def remapped(envelope: envelope_pb2.Envelope, disclosure: bytes = b"") -> Any:
        try:
            return await negotiate(envelope, disclosure)
        except RemoteProtocolError as error:
            offered = _terms_of(envelope)
            other = remap(error.reason, offered) if offered is not None else None
            if other is None:
                raise
            raise RemoteProtocolError(other, error.detail) from error

    setattr(agent, "negotiate", remapped)  # noqa: B010


def sums_schedule_before_total(agent: BillerAgent) -> None:
    """TRM-13: the schedule sum (check 7) is checked before the total (check 6)."""

    def swapped(reason: Reason, offered: terms_pb2.Terms) -> Reason | None:
        scheduled = sum(instalment.amount.amount_minor for instalment in offered.schedule)
        if reason is Reason.TOTAL_MISMATCH and scheduled != offered.total.amount_minor:
            return Reason.SCHEDULE_SUM_MISMATCH
        return None

    _remapping_negotiate(agent, swapped)


def zero_amounts_as_shape(agent: BillerAgent) -> None:
    """TRM-3: a zero amount in terms is refused as a shape error, INVALID_TERMS, not AMOUNT_OUT_OF_RANGE."""

    def as_shape(reason: Reason, offered: terms_pb2.Terms) -> Reason | None:
        amounts = [offered.principal, offered.total, *(line.amount for line in offered.lines)]
        zero = any(amount.amount_minor == 0 for amount in amounts)
        return Reason.INVALID_TERMS if reason is Reason.AMOUNT_OUT_OF_RANGE and zero else None

    _remapping_negotiate(agent, as_shape)


def due_date_deferral_as_date_error(agent: BillerAgent) -> None:
    """TRM-12: terms dated outside the bill's dates are refused as INVALID_DATE, not INVALID_TERMS."""
    _remapping_negotiate(agent, lambda reason, _: Reason.INVALID_DATE if reason is Reason.INVALID_TERMS else None)


def thanks_twice_without_the_receipt(agent: BillerAgent) -> None:
    """EVT-2: each settlement is thanked a second time (a bank-statement job, say) with a PAYMENT_RECEIVED that
    names neither the bill nor the receipt — appended through the public `emit_event`."""
    record_settlement = agent.record_settlement

    async def thanking_twice(account_id: str, intent_id: str, amount: Any, *args: Any, **options: Any) -> Any:
        receipt = await record_settlement(account_id, intent_id, amount, *args, **options)
        await agent.emit_event(
            account_id, event_pb2.EVENT_KIND_PAYMENT_RECEIVED, amount=amount, message="Thank you for your payment"
        )
        return receipt

    setattr(agent, "record_settlement", thanking_twice)  # noqa: B010


def malformed_key_sets_as_payload_errors(agent: BillerAgent) -> None:
    """KEY-7: a malformed published key set is refused as MALFORMED_PAYLOAD, not KEYSET_INVALID."""
    publish_key_set = agent.publish_key_set

    async def mislabelled(envelope: envelope_pb2.Envelope) -> biller_service_pb2.PublishKeySetResponse:
        try:
            return await publish_key_set(envelope)
        except RemoteProtocolError as error:
            if error.reason is Reason.KEYSET_INVALID:
                raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, error.detail) from error
            raise

    setattr(agent, "publish_key_set", mislabelled)  # noqa: B010


def matches_keyid_to_sender_first(agent: BillerAgent) -> None:
    """KEY-6/ENV-10: the header's sender is compared with the owner of the keyid before the signature is
    verified, so a borrowed keyid is WRONG_SENDER instead of BAD_SIGNATURE. The wrapper learns who owns which
    keyid from the enrolments it sees pass (public `enrol`)."""
    enrol, list_bills = agent.enrol, agent.list_bills
    owners: dict[str, str] = {}

    async def enrolling(envelope: envelope_pb2.Envelope) -> biller_service_pb2.EnrolResponse:
        response = await enrol(envelope)
        request = enrolment_pb2.EnrolmentRequest.FromString(envelope.payload)
        key_set = keys_pb2.KeySet.FromString(request.consumer_key_set.payload)
        owners.update({key.keyid: key_set.party_id for key in key_set.keys})
        return response

    async def sender_first(envelope: envelope_pb2.Envelope) -> biller_service_pb2.ListBillsResponse:
        try:
            return await list_bills(envelope)
        except RemoteProtocolError as error:
            sender = _header_of_query(envelope).sender
            owner = owners.get(envelope.signatures[0].keyid) if len(envelope.signatures) == 1 else None
            if error.reason is Reason.BAD_SIGNATURE and owner is not None and owner != sender:
                raise RemoteProtocolError(Reason.WRONG_SENDER, f"the keyid is {owner}'s") from error
            raise

    setattr(agent, "enrol", enrolling)  # noqa: B010
    setattr(agent, "list_bills", sender_first)  # noqa: B010


def lets_a_key_sign_its_own_revocation(agent: BillerAgent) -> None:
    """KEY-15: a version's signer is judged by the revocations of the version held, not of the one being verified,
    so a compromised key can sign the version that revokes it: such a version is answered as stored."""
    publish_key_set = agent.publish_key_set

    async def lenient(envelope: envelope_pb2.Envelope) -> biller_service_pb2.PublishKeySetResponse:
        try:
            return await publish_key_set(envelope)
        except RemoteProtocolError as error:
            if error.reason is not Reason.KEY_REVOKED:
                raise
            return biller_service_pb2.PublishKeySetResponse(
                version=keys_pb2.KeySet.FromString(envelope.payload).version
            )

    setattr(agent, "publish_key_set", lenient)  # noqa: B010


def reads_keys_before_the_version_number(agent: BillerAgent) -> None:
    """KEY-5: the keys (step 7) are judged before the version number (step 6), so a skipped version with no key is
    KEYSET_INVALID instead of KEYSET_VERSION_SKIPPED."""
    publish_key_set = agent.publish_key_set

    async def keys_first(envelope: envelope_pb2.Envelope) -> biller_service_pb2.PublishKeySetResponse:
        try:
            return await publish_key_set(envelope)
        except RemoteProtocolError as error:
            numbered = error.reason in (Reason.KEYSET_VERSION_SKIPPED, Reason.KEYSET_ROLLBACK)
            if numbered and not keys_pb2.KeySet.FromString(envelope.payload).keys:
                raise RemoteProtocolError(Reason.KEYSET_INVALID, "a key set has 1 to 16 keys") from error
            raise

    setattr(agent, "publish_key_set", keys_first)  # noqa: B010


def checks_bill_amount_before_currency(agent: BillerAgent) -> None:
    """BIL-2: a bill's amount due is checked above zero (check 4) before its options' currency (check 3)."""
    issue_bill = agent.issue_bill

    async def amount_first(account_id: str, amount_due: Money, *args: Any, **options: Any) -> str:
        try:
            return await issue_bill(account_id, amount_due, *args, **options)
        except ProtocolError as error:
            if error.reason is Reason.CURRENCY_MISMATCH and amount_due.minor == 0:
                raise RemoteProtocolError(Reason.AMOUNT_OUT_OF_RANGE, "amount_due is zero") from error
            raise

    setattr(agent, "issue_bill", amount_first)  # noqa: B010


def _header_of_query(envelope: envelope_pb2.Envelope) -> Any:
    try:
        return account_pb2.AccountQuery.FromString(envelope.payload).header
    except DecodeError:
        return header_pb2.Header()


class _ResignsToTheFirstHolder(BillsPhase):
    """ENR-12: a re-enrolment presents each unpaid bill again — a new signature, a fresh thread, stored as the new
    party's presentation with its BILL_ISSUED in the new party's log — but addressed to the bill's first recipient
    (read from the first presentation: a copy of the issuing path that kept its `recipient`)."""

    def presenter(self, recipient: str, now: datetime) -> Callable[[BillRecord], tuple[BillRecord, PendingEvent]]:
        def to_the_first_holder(bill: BillRecord) -> tuple[BillRecord, PendingEvent]:
            first = bill_pb2.Bill.FromString(stored_envelope(bill.envelope).payload).header.recipient
            record, event = self.presentation(bill_facts(bill), bill.status, first, now)
            return replace(record, party_id=recipient, issued_at=bill.issued_at), replace(event, party_id=recipient)

        return to_the_first_holder


def resigns_bills_to_the_first_holder(agent: BillerAgent) -> None:
    agent.party.bills = _ResignsToTheFirstHolder(agent.party)


class _ServesFirstPresentations(BillsPhase):
    """BIL-7: ListBills and GetBill serve each bill as first presented (to whoever held the account at issue), not
    the presentation to the signer — the reads of a biller that signs each bill once."""

    async def list_bills(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.ListBillsResponse:
        query = await self.party.receive.query(envelope, "ListBills")
        bills = await self.party.store.list_bills(query.account_id)
        return biller_service_pb2.ListBillsResponse(bills=[stored_envelope(bill.envelope) for bill in bills])

    async def get_bill(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetBillResponse:
        query = await self.party.receive.query(envelope, "GetBill")
        bills = await self.party.store.list_bills(query.account_id)
        bill = next((b for b in bills if b.bill_id == query.bill_id), None)
        if bill is None:
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no bill {query.bill_id!r} on the account")
        return biller_service_pb2.GetBillResponse(bill=stored_envelope(bill.envelope))


def serves_first_presentations(agent: BillerAgent) -> None:
    agent.party.bills = _ServesFirstPresentations(agent.party)


class _OneLogPerAccount(EventsPhase):
    """EVT-11: every party watching an account is served one log, the account's first (that of the party its first
    bill was presented to) — the log of a biller that keeps one event log per account, whoever holds it now."""

    async def follow(self, watch: Watch, cursor: int) -> AsyncIterator[envelope_pb2.Envelope]:
        bills = await self.party.store.list_bills(watch.account_id)
        first = watch.party_id
        if bills:
            first = bill_pb2.Bill.FromString(stored_envelope(bills[0].envelope).payload).header.recipient
        async for envelope in super().follow(replace(watch, party_id=first), cursor):
            yield envelope


def keeps_one_log_per_account(agent: BillerAgent) -> None:
    agent.party.events = _OneLogPerAccount(agent.party, watch_poll_interval=agent.party.events.watch_poll_interval)


class _AcceptsEveryOffer:
    """A policy that agrees to whatever is offered: on a bill long past due, terms dated in the past too."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def advertise(self, context: BillContext) -> AdvertisedOptions:
        return self.policy.advertise(context)

    def decide(self, context: OfferContext) -> Answer:
        return AcceptOffer()


class _NeverLate(NegotiationPhase):
    """The agent's NEG-23 guard left out: whatever the policy answers is signed."""

    def first_late_date(self, move: Any, pending: Terms, now: datetime) -> Any:
        return None


def signs_deals_already_late(agent: BillerAgent) -> None:
    """NEG-23: a policy accepting terms dated before today, and no guard in the agent to turn it into a Reject."""
    agent.party.policy = _AcceptsEveryOffer(agent.party.policy)
    agent.party.negotiation = _NeverLate(agent.party)


@dataclass(frozen=True)
class BrokenBiller:
    """A reference biller with one defect, and the cases the suite must FAIL against it."""

    name: str
    defect: Defect
    fails: frozenset[str]


EXTRA_BROKEN_BILLERS = (
    BrokenBiller(
        "announces one instalment fewer than it enforces",
        announces_fewer_instalments,
        frozenset({"LIM-6/max-instalments-boundary"}),
    ),
    BrokenBiller("serves a cursor one past the end", serves_cursor_past_the_end, frozenset({"EVT-3/cursor-boundary"})),
    BrokenBiller("parses before verifying", parses_before_verifying, frozenset({"ENV-10/check-order"})),
    BrokenBiller(
        "refuses an intent's sequence as a malformed header",
        first_intent_sequence_as_header_error,
        frozenset({"HDR-6/first-message-sequence"}),
    ),
    BrokenBiller(
        "closes only agreed threads",
        closes_only_agreed_threads,
        frozenset({"NEG-14/closed-states", "NEG-6/deadline"}),
    ),
    BrokenBiller(
        "announces one open thread more than it allows",
        announces_more_open_threads,
        frozenset({"LIM-7/open-threads-boundary"}),
    ),
    BrokenBiller("sums the schedule before the total", sums_schedule_before_total, frozenset({"TRM-13/check-order"})),
    BrokenBiller(
        "refuses zero amounts as a shape error",
        zero_amounts_as_shape,
        frozenset({"TRM-3/amount-out-of-range", "TRM-13/check-order", "TRM-6/positive-lines"}),
    ),
    BrokenBiller(
        "refuses terms outside the bill's dates as INVALID_DATE",
        due_date_deferral_as_date_error,
        frozenset({"TRM-12/terms-fit-bill", "TRM-5/invalid-terms", "TRM-5/shape-boundaries", "TRM-19/date-horizon"}),
    ),
    BrokenBiller(
        "thanks twice, without the receipt", thanks_twice_without_the_receipt, frozenset({"EVT-2/event-fields"})
    ),
    BrokenBiller(
        "refuses malformed key sets as MALFORMED_PAYLOAD",
        malformed_key_sets_as_payload_errors,
        # HDR-16: a key window's nanos; KEY-4, KEY-11: a recipient, a created_at tie, a moved revocation; KEY-5: a
        # version with no key and a wrong previous_digest (KEYSET_INVALID first)
        frozenset(
            {
                "KEY-7/malformed-key-set",
                "HDR-16/whole-microseconds",
                "KEY-4/header-rules",
                "KEY-11/revocation-moved",
                "KEY-5/check-order",
            }
        ),
    ),
    BrokenBiller(
        "matches the keyid to the sender before verifying",
        matches_keyid_to_sender_first,
        frozenset({"KEY-6/keyid-of-another-party"}),
    ),
    BrokenBiller(
        "checks the sequence before the closed thread",
        checks_sequence_before_closed,
        frozenset({"NEG-15/check-order"}),
    ),
    BrokenBiller(
        "re-signs a re-bound account's bills to their first holder",
        resigns_bills_to_the_first_holder,
        frozenset({"ENR-12/re-enrolment"}),
    ),
    BrokenBiller("serves each bill as first presented", serves_first_presentations, frozenset({"ENR-12/re-enrolment"})),
    BrokenBiller("keeps one event log per account", keeps_one_log_per_account, frozenset({"ENR-12/re-enrolment"})),
    BrokenBiller("signs deals already late", signs_deals_already_late, frozenset({"NEG-23/no-deal-already-late"})),
    BrokenBiller(
        "lets a key sign its own revocation", lets_a_key_sign_its_own_revocation, frozenset({"KEY-15/signer-usable"})
    ),
    BrokenBiller(
        "reads the keys before the version number",
        reads_keys_before_the_version_number,
        frozenset({"KEY-5/check-order"}),
    ),
    BrokenBiller(
        "checks a bill's amount before its currency",
        checks_bill_amount_before_currency,
        frozenset({"BIL-2/invalid-bill-refused"}),
    ),
)
