"""The reference consumer's cash-flow strategy as an `agent.consumer.Strategy`.

`ReferenceStrategy` is the adapter the consumer agent calls: it turns the pure
functions of `reference_consumer.strategy` (`plan_budget`, `respond`) into the
agent's `opening` / `respond` callbacks (both sides answer in the one vocabulary of
`agent.protocol.answers`). It also keeps the one thing those functions cannot know on their
own: the household's *budget across billers*. Bills the household still has to
decide are `consider`ed; `plan` decides all of them together, in the profile's
priority order, each decision's payments committed before the next
(`plan_budget`); the opening for one bill is its place in that plan, so a
household with two billers never offers the same money twice.

Payments the household decided to make without an agreement (a bill paid in full
on its due date needs no negotiation) are `commit`ted until they are paid; the
unpaid instalments of agreements come from the agent (the contexts' `committed`).

The profile is read afresh for each decision (`profile` may be a function of the
day), so a household whose balance moves as the months go by is judged on the
money it has that day. An optional `cushion` makes the household *ask* for terms
that keep its buffer plus the cushion, while it still *accepts* any offer that
keeps the buffer: it opens with room to give, and a counter-offer inside the
mandate that the household can afford is accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import date

from agent.consumer import Circumstances, ConsumerAnswer, Mandate, OpeningContext, ResponseContext
from agent.protocol.limits import DEFAULT_LIMITS, Limits
from agent.protocol.terms import BillFacts, Instalment, Money, Terms
from parley.v1 import negotiation_pb2
from reference_consumer.profile import Profile
from reference_consumer.strategy import PlannedBill, plan_budget, respond

ProfileSource = Callable[[date], Profile]


def agent_mandate(profile: Profile) -> Mandate:
    """The profile's mandate (NEG-20) for the agent; a household in hardship consents to disclose it (PRV-8)."""
    return dataclasses.replace(profile.mandate, allow_disclosure=profile.hardship)


class ReferenceStrategy:
    """`agent.consumer.Strategy` backed by the reference cash-flow strategy and a budget shared across billers."""

    def __init__(
        self,
        profile: Profile | ProfileSource,
        *,
        cushion: Money | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._profile: ProfileSource = profile if callable(profile) else (lambda _today: profile)
        self.cushion = cushion
        self.limits = limits
        self._pending: dict[tuple[str, str], BillFacts] = {}
        self._commitments: dict[tuple[str, str], tuple[Instalment, ...]] = {}

    # --- The shared budget ---------------------------------------------------------------------------

    def profile_on(self, today: date) -> Profile:
        """The household as it stands on `today`."""
        return self._profile(today)

    def consider(self, biller_id: str, bill: BillFacts) -> None:
        """Add a bill the household has to decide (again, after a renegotiation offer)."""
        self._pending[(biller_id, bill.bill_id)] = bill
        self._commitments.pop((biller_id, bill.bill_id), None)

    def pending(self) -> list[tuple[str, BillFacts]]:
        """The bills still to decide, as (biller, bill) pairs."""
        return [(biller_id, bill) for (biller_id, _), bill in self._pending.items()]

    def commit(self, biller_id: str, bill_id: str, schedule: Sequence[Instalment]) -> None:
        """The household will pay this bill on this schedule without an agreement: decided, money committed."""
        self._pending.pop((biller_id, bill_id), None)
        self._commitments[(biller_id, bill_id)] = tuple(schedule)

    def forget(self, biller_id: str, bill_id: str) -> None:
        """The bill is decided elsewhere (agreed: the agent reports its instalments) or paid."""
        self._pending.pop((biller_id, bill_id), None)
        self._commitments.pop((biller_id, bill_id), None)

    def committed(self, agreed: Sequence[Instalment] = ()) -> tuple[Instalment, ...]:
        """The agreed instalments given plus the payments committed without an agreement, by date."""
        extra = [instalment for schedule in self._commitments.values() for instalment in schedule]
        return tuple(sorted([*agreed, *extra], key=lambda instalment: instalment.due_date))

    def plan(self, today: date, agreed: Sequence[Instalment] = ()) -> list[PlannedBill]:
        """Openings for every pending bill against one budget, in the order they were decided (`plan_budget`).

        With a cushion, the household first plans as if its buffer were larger; if that leaves a bill
        without affordable terms, it plans with its real buffer.
        """
        profile = self.profile_on(today)
        bills = self.pending()
        committed = self.committed(agreed)
        if self.cushion is not None and self.cushion.minor:
            asking = dataclasses.replace(profile, buffer=profile.buffer + self.cushion)
            planned = plan_budget(bills, asking, today, committed, limits=self.limits)
            if all(p.opening.affordable for p in planned):
                return planned
        return plan_budget(bills, profile, today, committed, limits=self.limits)

    def _place(
        self, bill: BillFacts, biller_id: str, today: date, agreed: Sequence[Instalment]
    ) -> tuple[PlannedBill, tuple[Instalment, ...]]:
        """The bill's place in today's plan, and the payments decided before it (committed when it is judged)."""
        key = (biller_id, bill.bill_id)
        if key not in self._pending:
            self.consider(biller_id, bill)
        else:  # the agent's facts: with what was already paid of the bill, so what is still owed (PAY-16)
            self._pending[key] = bill
        before: list[Instalment] = []
        for planned in self.plan(today, agreed):
            if (planned.biller_id, planned.bill.bill_id) == key:
                return planned, tuple(before)
            before.extend(planned.opening.terms.schedule)
        raise AssertionError("a pending bill is always planned")

    # --- agent.consumer.Strategy -----------------------------------------------------------------------

    def opening(self, context: OpeningContext) -> tuple[Terms, Circumstances | None]:
        """The bill's opening from the shared plan; a hardship programme is claimed with a disclosure (PRV-1)."""
        planned, _ = self._place(context.bill, context.biller_party_id, context.today, context.committed)
        opening = planned.opening
        circumstances = None
        if opening.needs_disclosure:
            circumstances = Circumstances(purpose=negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP, hardship=True)
        return opening.terms, circumstances

    def respond(self, context: ResponseContext) -> ConsumerAnswer:
        """`reference_consumer.strategy.respond` with the shared budget's other commitments."""
        _, before = self._place(context.bill, context.biller_party_id, context.today, context.committed)
        return respond(
            context.bill,
            context.their_offer,
            context.my_last,
            self.profile_on(context.today),
            context.today,
            committed=self.committed([*context.committed, *before]),
            rounds_left=context.rounds_left,
            limits=self.limits,
        )


__all__ = ["ProfileSource", "ReferenceStrategy", "agent_mandate"]
