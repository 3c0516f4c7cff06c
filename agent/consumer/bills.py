"""Bills (PROTOCOL.md §7): fetched from the biller, verified (BIL-3), stored; only verified bills are returned."""

from __future__ import annotations

import logging

from agent.consumer.party import BillerSession, Party
from agent.consumer.receive import Receiver, bill_view
from agent.consumer.results import ReceivedBill
from agent.consumer.sessions import Sessions
from agent.logs import log_step
from agent.protocol.errors import Reason
from agent.stores.base import ConsumerStore, ReceivedBillRecord
from agent.transport.status import CallError

logger = logging.getLogger("parley.consumer")


class Bills:
    """The bills phase: list a biller's bills, find one by id."""

    def __init__(self, party: Party, store: ConsumerStore, receiver: Receiver, sessions: Sessions) -> None:
        self._party = party
        self._store = store
        self._receiver = receiver
        self._sessions = sessions

    async def fetch(self, biller: str, account_id: str | None) -> list[ReceivedBill]:
        """See `ConsumerAgent.bills`."""
        session = await self._sessions.get(biller)
        records: list[ReceivedBillRecord] = []
        for account in await self._sessions.accounts(biller, account_id):
            response = await session.client.list_bills(self._party.query(biller, account))
            for envelope in response.bills:
                record = await self._receiver.check_bill(session, envelope, account)
                if record is not None:
                    records.append(record)
        stored = await self._store.save_bills(records)
        for new, kept in zip(records, stored, strict=True):
            if new.digest != kept.digest:  # BIL-1: a bill never changes; the first one presented stands
                log_step(logger, "bill-changed", logging.WARNING, biller=biller, bill=new.bill_id)
        return [bill_view(record) for record in stored]

    async def get(self, session: BillerSession, bill_id: str) -> ReceivedBill:
        """A verified bill: from the store, else fetched with GetBill from each of our accounts."""
        record = await self._store.get_bill(session.biller, bill_id)
        if record is None:
            for account in await self._sessions.accounts(session.biller, None):
                query = self._party.query(session.biller, account, bill_id=bill_id)
                try:
                    response = await session.client.get_bill(query)
                except CallError as error:
                    if error.reason is Reason.NOT_FOUND:
                        continue
                    raise
                checked = await self._receiver.check_bill(session, response.bill, account)
                if checked is not None and checked.bill_id == bill_id:
                    record = (await self._store.save_bills([checked]))[0]
                    break
        if record is None:
            raise LookupError(f"no verified bill {bill_id!r} from {session.biller!r}")
        return bill_view(record)


__all__ = ["Bills"]
