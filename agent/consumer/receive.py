"""The receive path: every message the biller sends is judged here, against the pinned biller's chain.

Hello (VER-2, VER-4), the enrolment answer (ENR-10), bills (BIL-3), negotiation replies (NEG-15),
payment instructions (PAY-8), receipts (PAY-9) and events (EVT-1, EVT-2) are each opened with
`recipient` = our party id (AUZ-6); an unknown key triggers one rate-limited refresh of the biller's
chain (KEY-20). A check that fails raises `RemoteProtocolError` (or, for what is logged and left out,
returns None), so nothing the biller sent is trusted before it passed.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import TypeVar

from google.protobuf.message import Message

from agent.consumer.party import BillerSession, Party
from agent.consumer.results import AccountEvent, ReceivedBill
from agent.logs import log_step
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, ProtocolError, Reason, RemoteProtocolError
from agent.protocol.events import MAX_REMINDER_LEVEL
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import DIGEST_BYTES, MAX_NOTE_CHARS, SUPPORTED_VERSIONS, THREAD_ID_BYTES, Limits
from agent.protocol.messages import Verified, check_sequence, open_envelope, read_time
from agent.protocol.moves import NEGOTIATION_TYPES, NegotiationPayload
from agent.protocol.terms import BillFacts, Money, parse_date
from agent.stores.base import BillerLinkRecord, ConsumerStore, IntentRecord, ReceiptRecord, ReceivedBillRecord
from agent.transport.status import CallError
from parley.v1 import bill_pb2, biller_service_pb2, enrolment_pb2, envelope_pb2, event_pb2, payment_pb2

logger = logging.getLogger("parley.consumer")

M = TypeVar("M", bound=Message)

KEYSET_REFRESH_INTERVAL = timedelta(seconds=60)  # KEY-20: at most one refresh per biller per minute
_EVENT_KINDS = frozenset(event_pb2.EventKind.values()) - {event_pb2.EVENT_KIND_UNSPECIFIED}


def envelope_of(data: bytes) -> envelope_pb2.Envelope:
    """A stored envelope, parsed (it was verified before it was stored)."""
    return envelope_pb2.Envelope.FromString(data)


def money(pb: Message, field_name: str) -> Money:
    """A received amount, decoded (TRM-1, TRM-3); RemoteProtocolError if it is not one."""
    if not pb.HasField(field_name):
        raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, f"{field_name} is missing")
    try:
        return Money.from_proto(getattr(pb, field_name))
    except LocalProtocolError as error:
        raise error.as_remote() from error


def agreed_limits(own: Limits, announced: biller_service_pb2.Limits) -> Limits:
    """The limits of a connection: what the biller announced in its Hello, bounded by our own (the
    defaults, LIM-11). LIM-10: we never send what they refuse; LIM-13: we judge the biller's messages
    with them (skew, lifetime, envelope size, rounds, negotiation time, instalments). A limit announced
    as 0 (absent) keeps ours."""

    def smaller(mine: int, theirs: int) -> int:
        return min(mine, theirs) if theirs else mine

    def shorter(mine: timedelta, seconds: int) -> timedelta:
        return min(mine, timedelta(seconds=seconds)) if seconds else mine

    return dataclasses.replace(
        own,
        max_envelope_bytes=smaller(own.max_envelope_bytes, announced.max_envelope_bytes),
        max_clock_skew=shorter(own.max_clock_skew, announced.max_clock_skew_seconds),
        max_message_lifetime=shorter(own.max_message_lifetime, announced.max_message_lifetime_seconds),
        max_rounds=smaller(own.max_rounds, announced.max_rounds),
        max_negotiation_time=shorter(own.max_negotiation_time, announced.max_negotiation_seconds),
        max_instalments=smaller(own.max_instalments, announced.max_instalments),
    )


def bill_view(record: ReceivedBillRecord) -> ReceivedBill:
    envelope = envelope_of(record.envelope)
    facts = BillFacts.from_proto(bill_pb2.Bill.FromString(envelope.payload))  # verified when stored
    return ReceivedBill(record.biller_party_id, record.account_id, facts, record.digest, envelope, record.received_at)


def event_facts(verified: Verified[event_pb2.Event], biller: str, account: str) -> AccountEvent:
    """EVT-1, EVT-2: the event's body is well formed and about our account."""
    body = verified.message

    def malformed(detail: str) -> RemoteProtocolError:
        return RemoteProtocolError(Reason.MALFORMED_PAYLOAD, detail)

    if body.kind not in _EVENT_KINDS:
        raise malformed(f"event kind {body.kind} is not defined")
    if body.account_id != account:
        raise malformed(f"the event is about account {body.account_id!r}")
    if len(body.message) > MAX_NOTE_CHARS:
        raise malformed(f"the event message is longer than {MAX_NOTE_CHARS} characters")
    reminder = body.kind == event_pb2.EVENT_KIND_REMINDER
    if (reminder and not 1 <= body.reminder_level <= MAX_REMINDER_LEVEL) or (not reminder and body.reminder_level):
        raise malformed(f"reminder_level {body.reminder_level} does not fit the event kind")
    if len(body.thread_id) not in (0, THREAD_ID_BYTES) or len(body.related_digest) not in (0, DIGEST_BYTES):
        raise malformed("thread_id or related_digest has the wrong length")
    amount = money(body, "amount") if body.HasField("amount") else None
    try:
        day = parse_date(body.date) if body.date else None
    except LocalProtocolError as error:
        raise error.as_remote() from error
    return AccountEvent(
        biller_party_id=biller,
        account_id=account,
        sequence=verified.header.sequence,
        kind=body.kind,
        bill_id=body.bill_id,
        thread_id=body.thread_id,
        amount=amount,
        date=day,
        reminder_level=body.reminder_level,
        message=body.message,
        related_digest=body.related_digest,
        digest=verified.digest,
        envelope=verified.envelope,
    )


class Receiver:
    """Opens and checks what a biller sends, for `party`; refreshed biller chains are kept in `store`."""

    def __init__(self, party: Party, store: ConsumerStore) -> None:
        self._party = party
        self._store = store

    async def open(
        self, session: BillerSession, envelope: envelope_pb2.Envelope, expected: tuple[type[M], ...], *, stored: bool
    ) -> Verified[M]:
        """Open a biller message against the pinned chain, addressed to us (§3.8, AUZ-6).

        `stored` answers (bills, events, instructions, receipts) skip MESSAGE_EXPIRED
        but not MESSAGE_NOT_YET_VALID (PAY-10). On UNKNOWN_KEY or KEYSET_EXPIRED the
        chain is refreshed once (rate limited, KEY-20) and the message judged again.
        """
        for attempt in range(2):
            try:
                return self._open_now(session.chain, session.limits, envelope, expected, stored=stored)
            except RemoteProtocolError as error:
                refreshable = error.reason in (Reason.UNKNOWN_KEY, Reason.KEYSET_EXPIRED)
                if attempt or not refreshable or not await self.refresh(session):
                    raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _open_now(
        self,
        chain: KeyChain,
        limits: Limits,
        envelope: envelope_pb2.Envelope,
        expected: tuple[type[M], ...],
        *,
        stored: bool,
    ) -> Verified[M]:
        """The receive path, judged with the connection's limits: those the biller announced (LIM-13)."""
        recipient, now = self._party.party_id, self._party.now()
        if not stored:
            return open_envelope(envelope, expected, sender_keys=chain, recipient=recipient, now=now, limits=limits)
        verified = open_envelope(envelope, expected, sender_keys=chain, recipient=recipient, now=None, limits=limits)
        created = read_time(verified.header, "create_time", Reason.MALFORMED_HEADER)
        if created > now + limits.max_clock_skew:
            raise RemoteProtocolError(Reason.MESSAGE_NOT_YET_VALID, f"created {created}, now {now}")
        return verified

    async def refresh(self, session: BillerSession) -> bool:
        """KEY-20: fetch the biller's newer key set versions (at most once a minute); True if the chain grew."""
        now = self._party.now()
        if session.refreshed_at is not None and now - session.refreshed_at < KEYSET_REFRESH_INTERVAL:
            return False
        session.refreshed_at = now
        latest = session.chain.latest.version
        try:
            response = await session.client.get_key_sets(session.biller, latest)
            chain = session.chain
            for envelope in response.key_sets:
                chain = chain.extend(envelope, limits=session.limits)
            chain.check_fresh(now)
        except (ProtocolError, CallError) as error:
            log_step(
                logger,
                "key-set-refresh-failed",
                logging.WARNING,
                biller=session.biller,
                reason=error.reason.name,
                detail=error.detail,
            )
            return False
        if chain.latest.version == latest:
            return False
        await self._store.append_link_key_sets(
            session.biller, latest + 1, [envelope.SerializeToString() for envelope in response.key_sets]
        )
        session.chain = chain
        log_step(logger, "key-set-refreshed", biller=session.biller, version=chain.latest.version)
        return True

    def check_hello(self, hello: biller_service_pb2.HelloResponse, link: BillerLinkRecord) -> None:
        """VER-2, VER-4: a version we speak, and the identity we pinned (the answer is unsigned: it can only fail)."""
        if hello.protocol_version not in SUPPORTED_VERSIONS:
            raise RemoteProtocolError(Reason.UNSUPPORTED_VERSION, f"the biller speaks version {hello.protocol_version}")
        if hello.biller_party_id != link.biller_party_id or hello.identity_fingerprint != link.fingerprint:
            raise RemoteProtocolError(
                Reason.PIN_MISMATCH, f"the endpoint is {hello.biller_party_id!r}, not the biller pinned"
            )

    # --- Enrolment (§6) ---

    def check_enrolment(
        self,
        response: biller_service_pb2.EnrolResponse,
        request: envelope_pb2.Envelope,
        link: BillerLinkRecord,
        account_id: str,
        limits: Limits,
    ) -> KeyChain:
        """ENR-10: the chain against the pin first, then the confirmation against that chain, judged with
        the limits of the connection (`agreed_limits` of its Hello, LIM-13)."""
        party, now = self._party, self._party.now()
        chain = KeyChain.verify(list(response.biller_key_sets), pin=link.fingerprint, now=now, limits=limits)
        if chain.party_id != link.biller_party_id:
            raise RemoteProtocolError(
                Reason.WRONG_SENDER, f"the pinned chain is {chain.party_id!r}'s, not {link.biller_party_id!r}"
            )
        confirmation = open_envelope(
            response.confirmation,
            (enrolment_pb2.EnrolmentConfirmation,),
            sender_keys=chain,
            recipient=party.party_id,
            now=now,
            limits=limits,
        )
        request_header = enrolment_pb2.EnrolmentRequest.FromString(request.payload).header
        if confirmation.header.thread_id != request_header.thread_id:
            raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the confirmation belongs to another thread")
        check_sequence(confirmation.header, expected_sequence=1, expected_previous=digest(request))
        body = confirmation.message
        if body.account_id != account_id or body.consumer_party_id != party.party_id:
            raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, "the confirmation names another account or party")
        return chain

    # --- Bills (§7) ---

    async def check_bill(
        self, session: BillerSession, envelope: envelope_pb2.Envelope, account_id: str
    ) -> ReceivedBillRecord | None:
        """BIL-3: the bill as stored, or None (logged) when it is not the pinned biller's valid bill for us."""
        try:
            verified = await self.open(session, envelope, (bill_pb2.Bill,), stored=True)
            check_sequence(verified.header, expected_sequence=0, expected_previous=b"")
            try:
                facts = BillFacts.from_proto(verified.message)
            except LocalProtocolError as error:
                raise error.as_remote() from error
            if facts.account_id != account_id:
                raise RemoteProtocolError(Reason.ACCOUNT_ACCESS_DENIED, f"the bill is for account {facts.account_id!r}")
        except RemoteProtocolError as error:
            log_step(
                logger,
                "bill-refused",
                logging.WARNING,
                biller=session.biller,
                reason=error.reason.name,
                detail=error.detail,
            )
            return None
        return ReceivedBillRecord(
            session.biller, facts.bill_id, account_id, envelope.SerializeToString(), verified.digest, self._party.now()
        )

    # --- Negotiation (§9) ---

    async def open_reply(
        self, session: BillerSession, envelope: envelope_pb2.Envelope, thread_id: bytes, *, stored: bool
    ) -> Verified[NegotiationPayload]:
        """The biller's move in our thread, opened (its rules are the negotiation core's to judge)."""
        verified = await self.open(session, envelope, NEGOTIATION_TYPES, stored=stored)
        if verified.header.thread_id != thread_id:
            raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the reply belongs to another thread")
        return verified

    # --- Payments (§10) ---

    def check_instructions(
        self, verified: Verified[payment_pb2.PaymentInstructions], intent: IntentRecord, intent_digests: set[bytes]
    ) -> tuple[str, str] | None:
        """PAY-8 on signed instructions: (reason, detail) of the first check they fail, else None.

        A passed pay_by_time is not checked here: see below, and `Payments._carry_out`."""
        header, body = verified.header, verified.message
        try:
            if header.thread_id != intent.thread_id:
                raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the instructions belong to another thread")
            if header.sequence != 1:
                raise RemoteProtocolError(Reason.SEQUENCE_MISMATCH, f"instructions at sequence {header.sequence}")
            if header.previous_digest not in intent_digests:
                raise RemoteProtocolError(
                    Reason.PREVIOUS_DIGEST_MISMATCH, "the instructions do not chain to our intent"
                )
            if body.intent_id != intent.intent_id:
                raise RemoteProtocolError(
                    Reason.MALFORMED_PAYLOAD, f"the instructions are for intent {body.intent_id!r}"
                )
            amount = money(body, "amount")
            intended = Money.of(intent.amount_minor, intent.currency)
            if amount != intended:
                raise RemoteProtocolError(
                    Reason.PAYMENT_AMOUNT_MISMATCH, f"the instructions ask for {amount}; the intent pays {intended}"
                )
            if not body.payment_reference:
                raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, "the instructions carry no payment reference")
            # Their pay_by_time must be readable; whether it has passed is not a flaw of the instructions but
            # of the moment: instructions that arrive past it (a retry's stored answer, taken late) have lapsed
            # (PAY-17), which `Payments` handles as for instructions that lapse while stored: kept, never paid
            # (PAY-8), and the payment gets a new intent. Refused, they would hold the payment for good.
            read_time(body, "pay_by_time", Reason.MALFORMED_PAYLOAD)
        except RemoteProtocolError as error:
            return error.reason.name, error.detail
        return None

    async def check_receipt(
        self, session: BillerSession, intent: IntentRecord, envelope: envelope_pb2.Envelope
    ) -> ReceiptRecord:
        """PAY-9: a receipt signed by the pinned biller, chained to the instructions; its amount compared."""
        verified = await self.open(session, envelope, (payment_pb2.Receipt,), stored=True)
        assert intent.instructions is not None
        instructions_envelope = envelope_of(intent.instructions)
        if verified.header.thread_id != intent.thread_id:
            raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the receipt belongs to another thread")
        check_sequence(verified.header, expected_sequence=2, expected_previous=digest(instructions_envelope))
        if verified.message.intent_id != intent.intent_id:
            raise RemoteProtocolError(
                Reason.MALFORMED_PAYLOAD, f"the receipt is for intent {verified.message.intent_id!r}"
            )
        received = money(verified.message, "amount_received")
        read_time(verified.message, "settle_time", Reason.MALFORMED_PAYLOAD)
        instructed = Money.from_proto(payment_pb2.PaymentInstructions.FromString(instructions_envelope.payload).amount)
        dispute = (
            None if received == instructed else f"the receipt says {received} was received; {instructed} was instructed"
        )
        return ReceiptRecord(
            session.biller,
            intent.intent_id,
            envelope.SerializeToString(),
            verified.digest,
            received.minor,
            dispute,
            self._party.now(),
        )

    # --- Events (§11) ---

    async def open_event(
        self, session: BillerSession, envelope: envelope_pb2.Envelope, log_id: bytes
    ) -> Verified[event_pb2.Event]:
        """An event, opened and on the account's log (HDR-15); its place in the log is the watch's to judge."""
        verified = await self.open(session, envelope, (event_pb2.Event,), stored=True)
        if verified.header.thread_id != log_id:
            raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the event is not on the account's log (HDR-15)")
        return verified


__all__ = [
    "KEYSET_REFRESH_INTERVAL",
    "Receiver",
    "agreed_limits",
    "bill_view",
    "envelope_of",
    "event_facts",
    "money",
]
