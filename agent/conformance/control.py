"""The conformance-control service (§16) over any biller built on `BillerAgent`: CNF-4's fixtures.

It sits beside the suites rather than inside the reference biller so that
another biller embedding `BillerAgent` can serve the same fixtures to
`parley conformance biller`: it supplies what `ControlledBiller` names — the
agent, the list of accounts its upkeep covers, one upkeep round, and a rail
that can settle every instructed payment at once — and a clock that can be
advanced (`SteppingClock`), and serves

    servicer = ConformanceControlServicer(biller, clock)
    cc_grpc.add_ConformanceControlServiceServicer_to_server(servicer, server)

only when asked to (CNF-1): never in production (CNF-2), and announcing the
"conformance-control" feature in Hello exactly when it does (CNF-3).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from agent.biller import BillerAgent
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.messages import to_timestamp
from agent.protocol.terms import AdvertisedOptions, Money, parse_date
from agent.transport.status import Context, answer
from parley.v1 import conformance_control_service_pb2 as cc
from parley.v1 import conformance_control_service_pb2_grpc as cc_grpc
from parley.v1 import envelope_pb2

logger = logging.getLogger("parley.conformance.control")

TEST_BILL_DESCRIPTION = "Conformance test bill"
DEFAULT_HOLDER_NAME = "Test account holder"


@runtime_checkable
class SteppingClock(Protocol):
    """A clock that can be moved forward (ManualClock, the reference biller's SteppableClock): AdvanceClock's."""

    def now(self) -> datetime: ...

    def advance(self, delta: timedelta) -> datetime: ...


class SettlingRail(Protocol):
    """A payment rail that can settle, at once, every payment instructed and not settled yet (SettlePayments)."""

    async def settle_all(self, agent: BillerAgent, now: datetime) -> Sequence[envelope_pb2.Envelope]:
        """Record the settlements; the receipts signed."""
        ...


class ControlledBiller(Protocol):
    """What conformance control needs from a biller (the reference biller's `Biller` is one)."""

    @property
    def agent(self) -> BillerAgent: ...

    @property
    def rail(self) -> SettlingRail: ...

    async def maintain(self) -> object:
        """One round of upkeep at the clock's time: reminders, missed instalments, due settlements…"""
        ...


class ConformanceControlServicer(cc_grpc.ConformanceControlServiceServicer):
    """CNF-4 fixtures on a biller: test accounts, enrolment codes and bills, time, settlement."""

    def __init__(self, biller: ControlledBiller, clock: SteppingClock) -> None:
        self._biller = biller
        self._clock = clock

    async def CreateTestAccount(
        self, request: cc.CreateTestAccountRequest, context: Context
    ) -> cc.CreateTestAccountResponse:
        return await answer(context, self._create_account(request))

    async def IssueTestBill(self, request: cc.IssueTestBillRequest, context: Context) -> cc.IssueTestBillResponse:
        return await answer(context, self._issue_bill(request))

    async def AdvanceClock(self, request: cc.AdvanceClockRequest, context: Context) -> cc.AdvanceClockResponse:
        return await answer(context, self._advance(request))

    async def SettlePayments(self, request: cc.SettlePaymentsRequest, context: Context) -> cc.SettlePaymentsResponse:
        return await answer(context, self._settle())

    async def IssueTestEnrolmentCode(
        self, request: cc.IssueTestEnrolmentCodeRequest, context: Context
    ) -> cc.IssueTestEnrolmentCodeResponse:
        return await answer(context, self._issue_code(request))

    async def _create_account(self, request: cc.CreateTestAccountRequest) -> cc.CreateTestAccountResponse:
        agent = self._biller.agent
        account_id = f"test-{secrets.token_hex(6)}"
        await agent.create_account(account_id, request.holder_name or DEFAULT_HOLDER_NAME)
        code = await agent.issue_enrolment_code(account_id)
        logger.info("conformance control: test account %s", account_id)
        return cc.CreateTestAccountResponse(account_id=account_id, enrolment_code=code)

    async def _issue_bill(self, request: cc.IssueTestBillRequest) -> cc.IssueTestBillResponse:
        agent = self._biller.agent
        account = await agent.account(request.account_id) if request.account_id else None
        if account is None:
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no account {request.account_id!r}")
        if account.consumer_party_id is None:
            raise RemoteProtocolError(Reason.NOT_ENROLLED, "a bill is addressed to the enrolled consumer: enrol first")
        amount = Money.from_proto(request.amount_due)
        options = AdvertisedOptions.from_proto(request.options) if request.HasField("options") else None
        bill_id = await agent.issue_bill(
            request.account_id,
            amount,
            parse_date(request.due_date),
            TEST_BILL_DESCRIPTION,
            options=options,
        )
        return cc.IssueTestBillResponse(bill_id=bill_id)

    async def _issue_code(self, request: cc.IssueTestEnrolmentCodeRequest) -> cc.IssueTestEnrolmentCodeResponse:
        """A new code for an account, enrolled or not (a re-enrolment, ENR-11, ENR-12), superseding its unspent
        earlier codes as the reference biller's `codes --account` does: only the newest code enrols."""
        agent = self._biller.agent
        if not request.account_id or await agent.account(request.account_id) is None:
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no account {request.account_id!r}")
        superseded = await agent.party.store.revoke_enrolment_codes(request.account_id, self._clock.now())
        code = await agent.issue_enrolment_code(request.account_id)
        logger.info("conformance control: new enrolment code for %s (%d superseded)", request.account_id, superseded)
        return cc.IssueTestEnrolmentCodeResponse(enrolment_code=code)

    async def _advance(self, request: cc.AdvanceClockRequest) -> cc.AdvanceClockResponse:
        if request.seconds <= 0:
            raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, "seconds must be positive")
        now = self._clock.advance(timedelta(seconds=request.seconds))
        logger.info("conformance control: clock advanced %ds to %s", request.seconds, now.isoformat())
        await self._biller.maintain()  # reminders, missed instalments... follow at once (CNF-4)
        return cc.AdvanceClockResponse(now=to_timestamp(now))

    async def _settle(self) -> cc.SettlePaymentsResponse:
        receipts = await self._biller.rail.settle_all(self._biller.agent, self._clock.now())
        return cc.SettlePaymentsResponse(settled_count=len(receipts))


__all__ = ["ConformanceControlServicer", "ControlledBiller", "SettlingRail", "SteppingClock"]
