"""Bills: signing and storing a new bill (with BILL_ISSUED), and the signed reads of an account's bills."""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Callable
from datetime import date, datetime

from agent.biller.party import BillerParty, stored_envelope
from agent.biller.plugins import BillContext
from agent.biller.receive import log_read
from agent.logs import log_step
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.limits import MAX_NOTE_CHARS, THREAD_ID_BYTES
from agent.protocol.terms import AdvertisedOptions, BillFacts, Money
from agent.stores.base import BillRecord, BillStatus, BindingChanged, PendingEvent
from parley.v1 import bill_pb2, biller_service_pb2, envelope_pb2, event_pb2

logger = logging.getLogger("parley.biller")

_BINDING_RETRIES = 3  # a bill signed to a party the account was re-bound from is signed again (ENR-12)


def bill_facts(bill: BillRecord) -> BillFacts:
    """The facts of a stored bill (signed by us, so it parses and validates)."""
    return BillFacts.from_proto(bill_pb2.Bill.FromString(stored_envelope(bill.envelope).payload))


class BillsPhase:
    def __init__(self, party: BillerParty) -> None:
        self.party = party

    async def issue_bill(
        self,
        account_id: str,
        amount_due: Money,
        due_date: date,
        description: str,
        *,
        issue_date: date | None = None,
        bill_id: str | None = None,
        options: AdvertisedOptions | None = None,
    ) -> str:
        """See `BillerAgent.issue_bill`."""
        party = self.party
        recipient = await party.bound_consumer(account_id)
        now = party.clock.now()
        issue_date = issue_date or now.date()
        if options is None:
            options = party.policy.advertise(BillContext(account_id, amount_due, issue_date, due_date))
        facts = BillFacts(
            bill_id=bill_id or f"bill-{secrets.token_hex(8)}",
            account_id=account_id,
            amount_due=amount_due,
            issue_date=issue_date,
            due_date=due_date,
            description=description,
            options=options,
        )
        for _ in range(_BINDING_RETRIES):
            record, event = self.presentation(facts, BillStatus.OPEN, recipient, now)
            try:
                party.wakeups.notify(await party.store.insert_bill(record, [event]))
                break
            except BindingChanged:  # re-enrolled meanwhile: sign it to the party bound now (ENR-12)
                recipient = await party.bound_consumer(account_id)
        else:
            raise RuntimeError(f"account {account_id!r} kept being re-bound while bill {facts.bill_id!r} was issued")
        log_step(logger, "bill-issued", account=account_id, bill=facts.bill_id)
        return facts.bill_id

    def presentation(
        self, facts: BillFacts, status: BillStatus, recipient: str, now: datetime
    ) -> tuple[BillRecord, PendingEvent]:
        """The bill presented to `recipient` (BIL-1, ENR-12): signed to it as a one-message thread, with its
        BILL_ISSUED event for that party's log."""
        party = self.party
        bill = facts.to_proto()
        bill.header.CopyFrom(party.header(recipient, secrets.token_bytes(THREAD_ID_BYTES), 0, b"", now))
        envelope = party.seal(bill)
        record = BillRecord(
            bill_id=facts.bill_id,
            account_id=facts.account_id,
            envelope=envelope.SerializeToString(),
            digest=digest(envelope),
            amount_minor=facts.amount_due.minor,
            currency=facts.amount_due.currency.code,
            due_date=facts.due_date,
            status=status,
            issued_at=now,
            party_id=recipient,
        )
        text = f"New bill: {facts.description}, {facts.amount_due} due {facts.due_date.isoformat()}."
        event = party.events.pending_event(
            facts.account_id,
            event_pb2.EVENT_KIND_BILL_ISSUED,
            now,
            party_id=recipient,
            bill_id=facts.bill_id,
            amount=facts.amount_due,
            day=facts.due_date,
            related_digest=record.digest,
            message=text[:MAX_NOTE_CHARS],
        )
        return record, event

    def presenter(self, recipient: str, now: datetime) -> Callable[[BillRecord], tuple[BillRecord, PendingEvent]]:
        """ENR-12: present a stored bill again, to the party a re-enrolment binds (same bill id and terms)."""

        def present(bill: BillRecord) -> tuple[BillRecord, PendingEvent]:
            record, event = self.presentation(bill_facts(bill), bill.status, recipient, now)
            log_step(logger, "bill-presented", account=bill.account_id, bill=bill.bill_id, party=recipient)
            return dataclasses.replace(record, issued_at=bill.issued_at), event

        return present

    async def list_bills(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.ListBillsResponse:
        """The account's signed bills, oldest first."""
        query = await self.party.receive.query(envelope, "ListBills")
        bills = await self.party.store.list_bills(query.account_id, query.header.sender)  # as presented to it
        log_read("ListBills", query.account_id, bills=len(bills))
        return biller_service_pb2.ListBillsResponse(bills=[stored_envelope(bill.envelope) for bill in bills])

    async def get_bill(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetBillResponse:
        """One signed bill of the account (NOT_FOUND if it is not on the account, AUZ-3)."""
        receive = self.party.receive
        query = await receive.unauthorized_query(envelope, "GetBill")
        # One store read: the account (AUZ-1) and the bill as presented to the signer (ENR-12).
        context = await self.party.store.bill_read_context(query.account_id, query.bill_id, query.header.sender)
        receive.authorize_read(context.account, query.header.sender)
        bill = context.bill
        if bill is None or bill.account_id != query.account_id:
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no bill {query.bill_id!r} on the account")
        log_read("GetBill", query.account_id, bill=query.bill_id)
        return biller_service_pb2.GetBillResponse(bill=stored_envelope(bill.envelope))


__all__ = ["BillsPhase", "bill_facts"]
