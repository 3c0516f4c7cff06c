"""Asking the user (NEG-20): a move outside the mandate goes to the embedder's approver, with a time limit.

A request about a move in an open thread is given up when no answer can come in time for the move
to reach the biller before the thread's deadline (NEG-21); one about an opening waits as long as the
approver does (no thread exists yet).

Each request has a stable id (`request_id`), derived from everything it binds: biller, account,
bill (by digest), thread, the biller's offer it answers, the action, the exact terms and any
disclosure. `ApprovalBook` is the durable approver built on it, for an app whose user answers later
(a bot that runs in passes, a web page, a command): the request is stored and listed, the person
answers it by id, and the bot's next pass finds the answer only if it is about to make exactly the
same move — otherwise the old request lapses and a new one is asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Literal

from agent.clock import Clock
from agent.consumer.party import Party
from agent.consumer.plugins import ApprovalRequest, Approver, Circumstances, terms_digest
from agent.consumer.results import ReceivedBill
from agent.logs import log_step
from agent.protocol.terms import Terms
from agent.stores.base import ApprovalRecord, ApprovalState, HouseholdRecordStore

REQUEST_ID_HEX_CHARS = 16
"""A request id is this many hex characters of the request's SHA-256 (64 bits: typed by a person, unique
for a household)."""


def request_id_of(
    action: str,
    bill: ReceivedBill,
    terms: Terms,
    *,
    circumstances: Circumstances | None,
    thread_id: bytes | None,
    in_reply_to: bytes | None,
) -> str:
    """The stable id of a request: the same move at the same point always gets the same id."""
    disclosure = b"" if circumstances is None else circumstances.to_proto().SerializeToString(deterministic=True)
    parts = (
        action.encode(),
        bill.biller_party_id.encode(),
        bill.account_id.encode(),
        bill.facts.bill_id.encode(),
        bill.digest,
        thread_id or b"",
        in_reply_to or b"",
        terms_digest(terms),
        disclosure,
    )
    hasher = hashlib.sha256(b"parley-approval/1")
    for part in parts:  # length-prefixed, so no two different requests share an encoding
        hasher.update(len(part).to_bytes(4, "big") + part)
    return hasher.hexdigest()[:REQUEST_ID_HEX_CHARS]


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
        in_reply_to: bytes | None = None,
    ) -> ApprovalRequest:
        request_id = request_id_of(
            action, bill, terms, circumstances=circumstances, thread_id=thread_id, in_reply_to=in_reply_to
        )
        return ApprovalRequest(
            request_id=request_id,
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
            in_reply_to=in_reply_to,
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


# --- The durable approver -------------------------------------------------------------------------------------


_STANDING_NOTES = {True: "answered by --approve-all", False: "answered by --deny-all"}


class ApprovalPending(Exception):
    """Raised through `ConsumerAgent.negotiate` by `ApprovalBook`: the request is stored, nothing was sent."""

    def __init__(self, request: ApprovalRequest) -> None:
        super().__init__(f"{request.action} on {request.bill.bill_id} needs your approval ({request.request_id})")
        self.request = request


class UnknownApproval(LookupError):
    """No request has this id."""


class ApprovalClosed(ValueError):
    """The request can no longer be answered: already answered, or lapsed."""


class ApprovalBook:
    """The durable approver (an `Approver`): requests stored in the consumer store, answered by id later.

    As the agent's `approve`, a request it has not seen is stored PENDING and `ApprovalPending` is
    raised (the move is not sent); an answer stored for exactly that request is returned. Every other
    open request on the same bill lapses then: the bot plans something else now. `standing_answer`
    (True/False) answers every request at once, recorded as such (unattended runs). `on_new` is
    awaited with each newly stored request (to notify the person).

    The app's side: `pending()` lists what waits for the person, `answer(request_id, approved)`
    answers one; `lapse_open(...)` closes the requests of a bill whose negotiation moved on.
    """

    def __init__(
        self,
        store: HouseholdRecordStore,
        clock: Clock,
        *,
        standing_answer: bool | None = None,
        on_new: Callable[[ApprovalRecord], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._standing_answer = standing_answer
        self._on_new = on_new
        self.asked: list[tuple[ApprovalRequest, ApprovalState]] = []
        """Every request this book was asked, with the answer it gave (PENDING: raised), in order."""

    async def __call__(self, request: ApprovalRequest) -> bool:
        state = await self._decide(request)
        self.asked.append((request, state))
        if state is ApprovalState.PENDING:
            raise ApprovalPending(request)
        return state is ApprovalState.APPROVED

    async def _decide(self, request: ApprovalRequest) -> ApprovalState:
        now = self._clock.now()
        record = await self._store.get_approval(request.request_id)
        if self._standing_answer is not None and record is not None and record.note in _STANDING_NOTES.values():
            record = None if record.state is not ApprovalState.SENT else record  # a standing answer replaces another
        if record is not None and record.state in (ApprovalState.APPROVED, ApprovalState.SENT):
            return ApprovalState.APPROVED
        if record is not None and record.state is ApprovalState.DECLINED:
            return record.state
        await self.lapse_open(
            request.biller_party_id, request.bill.bill_id, "the bot now plans another move", keep=request.request_id
        )
        if record is None:
            record = await self._store.save_approval(_record_of(request, now))
            fresh = record.state is ApprovalState.PENDING
        else:
            fresh = record.state is ApprovalState.LAPSED
            if fresh:  # the same move is wanted again: ask again under the same id
                reopened = await self._store.answer_approval(
                    record.request_id, ApprovalState.PENDING, now, only_from=(ApprovalState.LAPSED,)
                )
                record = reopened or record
        if self._standing_answer is not None:
            state = ApprovalState.APPROVED if self._standing_answer else ApprovalState.DECLINED
            any_but_sent = (ApprovalState.PENDING, ApprovalState.LAPSED, ApprovalState.APPROVED, ApprovalState.DECLINED)
            await self._store.answer_approval(
                record.request_id, state, now, _STANDING_NOTES[self._standing_answer], only_from=any_but_sent
            )
            return state
        if fresh and self._on_new is not None:
            await self._on_new(record)
        return ApprovalState.PENDING

    async def pending(self) -> list[ApprovalRecord]:
        """The requests waiting for the person, oldest first (those whose deadline passed lapse first)."""
        now = self._clock.now()
        waiting = []
        for record in await self._store.approvals(states=(ApprovalState.PENDING,)):
            if record.deadline is not None and record.deadline <= now:
                await self._store.answer_approval(
                    record.request_id,
                    ApprovalState.LAPSED,
                    now,
                    "the negotiation's deadline passed",
                    only_from=(ApprovalState.PENDING,),
                )
                continue
            waiting.append(record)
        return waiting

    async def answer(self, request_id: str, approved: bool, *, note: str = "") -> ApprovalRecord:
        """Approve or decline one pending request. UnknownApproval for an id never asked, ApprovalClosed for
        one already answered, lapsed, or past its deadline (it then lapses); nothing changes then."""
        record = await self._store.get_approval(request_id)
        if record is None:
            raise UnknownApproval(f"no approval request {request_id!r}")
        now = self._clock.now()
        if record.state is ApprovalState.PENDING and record.deadline is not None and record.deadline <= now:
            await self._store.answer_approval(
                request_id, ApprovalState.LAPSED, now, "the negotiation's deadline passed", only_from=(record.state,)
            )
            raise ApprovalClosed(f"approval request {request_id} lapsed: the negotiation's deadline passed")
        if record.state is not ApprovalState.PENDING:
            raise ApprovalClosed(f"approval request {request_id} is already {record.state.value}")
        state = ApprovalState.APPROVED if approved else ApprovalState.DECLINED
        answered = await self._store.answer_approval(request_id, state, now, note, only_from=(ApprovalState.PENDING,))
        if answered is None:  # answered by someone else meanwhile
            raise ApprovalClosed(f"approval request {request_id} was answered meanwhile")
        return answered

    async def lapse_open(self, biller_party_id: str, bill_id: str, why: str, *, keep: str | None = None) -> None:
        """Lapse the bill's pending requests (but `keep`), and its approvals not used yet: the situation changed."""
        now = self._clock.now()
        still_open = (ApprovalState.PENDING, ApprovalState.APPROVED)
        for record in await self._store.approvals(states=still_open, biller_party_id=biller_party_id, bill_id=bill_id):
            if record.request_id != keep:
                await self._store.answer_approval(
                    record.request_id, ApprovalState.LAPSED, now, why, only_from=still_open
                )

    async def mark_sent(self, requests: Sequence[ApprovalRequest]) -> None:
        """Record that the approved moves of `requests` were made (the negotiation returned after them)."""
        now = self._clock.now()
        for request in requests:
            record = await self._store.get_approval(request.request_id)
            if record is not None and record.state is ApprovalState.APPROVED:
                await self._store.answer_approval(
                    request.request_id, ApprovalState.SENT, now, record.note, only_from=(ApprovalState.APPROVED,)
                )


def _record_of(request: ApprovalRequest, now: datetime) -> ApprovalRecord:
    return ApprovalRecord(
        request_id=request.request_id,
        biller_party_id=request.biller_party_id,
        account_id=request.account_id,
        bill_id=request.bill.bill_id,
        thread_id=request.thread_id,
        action=request.action,
        terms=request.terms.to_proto().SerializeToString(deterministic=True),
        terms_digest=request.terms_digest,
        violations=request.violations,
        reason=request.reason,
        deadline=request.deadline,
        state=ApprovalState.PENDING,
        created_at=now,
    )


__all__ = [
    "REQUEST_ID_HEX_CHARS",
    "ApprovalBook",
    "ApprovalClosed",
    "ApprovalPending",
    "Approvals",
    "UnknownApproval",
    "request_id_of",
]
