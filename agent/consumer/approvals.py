"""Asking the user (NEG-20): a move outside the mandate goes to the embedder's approver, with a time limit.

A request about a move in an open thread is given up when no answer can come in time for the move
to reach the biller before the thread's deadline (NEG-21); one about an opening waits as long as the
approver does (no thread exists yet).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from agent.consumer.party import Party
from agent.consumer.plugins import ApprovalRequest, Approver, Circumstances
from agent.consumer.results import ReceivedBill
from agent.logs import log_step
from agent.protocol.terms import Terms

logger = logging.getLogger("parley.consumer")


class Approvals:
    """Builds approval requests and waits for the user's answer through `approve`."""

    def __init__(self, party: Party, approve: Approver) -> None:
        self._party = party
        self._approve = approve

    @staticmethod
    def request(
        action: Literal["open", "counter", "accept"],
        bill: ReceivedBill,
        terms: Terms,
        violations: Sequence[str],
        *,
        reason: str = "",
        circumstances: Circumstances | None = None,
        thread_id: bytes | None = None,
        deadline: datetime | None = None,
    ) -> ApprovalRequest:
        return ApprovalRequest(
            request_id=secrets.token_hex(8),
            action=action,
            biller_party_id=bill.biller_party_id,
            account_id=bill.account_id,
            bill=bill.facts,
            terms=terms,
            violations=tuple(violations),
            reason=reason,
            circumstances=circumstances,
            thread_id=thread_id,
            deadline=deadline,
        )

    async def ask(self, request: ApprovalRequest) -> bool | None:
        """The user's answer; None when none came while the thread could still move (NEG-21)."""
        timeout = None
        if request.deadline is not None:
            limits = self._party.limits
            timeout = (request.deadline - limits.max_clock_skew - self._party.now()).total_seconds()
            if timeout <= 0:
                return None
        log_step(
            logger,
            "approval-needed",
            action=request.action,
            bill=request.bill.bill_id,
            violations="; ".join(request.violations),
        )
        try:
            return bool(await asyncio.wait_for(self._approve(request), timeout))
        except TimeoutError:
            return None


__all__ = ["Approvals"]
