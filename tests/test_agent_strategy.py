"""The reference cash-flow strategy as the consumer agent's Strategy (reference_consumer.agent_strategy).

Pure: bills are advertised by the reference billers' own policies, households are the demo's.
"""

from __future__ import annotations

import dataclasses
from datetime import date

from agent.biller import BillContext
from agent.consumer import AcceptOffer, CounterOffer, Escalate, OpeningContext, RejectOffer, ResponseContext
from agent.protocol.terms import (
    BillFacts,
    Instalment,
    Line,
    LineKind,
    Money,
    Terms,
    TermsKind,
    build_terms,
    monthly_dates,
)
from parley.v1 import negotiation_pb2
from reference_biller.config import SAMPLE, load_config
from reference_biller.policy import SegmentPolicy
from reference_consumer.agent_strategy import ReferenceStrategy, agent_mandate
from reference_consumer.households import ENERGY, HOUSEHOLDS, PAYMENT_TERM, START, TELECOM, Account, Household
from reference_consumer.profile import Profile

POLICIES = {
    ENERGY: SegmentPolicy(load_config(SAMPLE)),
    TELECOM: SegmentPolicy(load_config(SAMPLE.with_name("telecom.toml"))),
}


def household(key: str) -> Household:
    return next(h for h in HOUSEHOLDS if h.key == key)


def bill_of(account: Account) -> BillFacts:
    due = START + PAYMENT_TERM
    options = POLICIES[account.biller_party_id].advertise(BillContext(account.account_id, account.amount, START, due))
    return BillFacts(f"{account.account_id}-03", account.account_id, account.amount, START, due, "March", options)


def context(
    biller: str, bill: BillFacts, committed: tuple[Instalment, ...] = (), today: date = START
) -> OpeningContext:
    return OpeningContext(bill, today, biller, bill.account_id, committed)


def answering(biller: str, bill: BillFacts, theirs: Terms, mine: Terms, rounds_left: int) -> ResponseContext:
    return ResponseContext(bill, theirs, mine, rounds_left, START, biller, bill.account_id, ())


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


def test_one_budget_decides_the_priority_biller_first_and_leaves_it_room() -> None:
    one = household("household-1")
    energy, telecom = (bill_of(account) for account in one.accounts)
    strategy = ReferenceStrategy(one.profile)
    strategy.consider(ENERGY, energy)
    strategy.consider(TELECOM, telecom)
    assert [p.biller_id for p in strategy.plan(START)] == [TELECOM, ENERGY]  # telecom is ranked 1
    phone, _ = strategy.opening(context(TELECOM, telecom))
    assert phone == build_terms(TermsKind.PAY_IN_FULL, telecom.amount_due, [telecom.due_date])
    power, disclosed = strategy.opening(context(ENERGY, energy))
    assert power.kind is TermsKind.DEFERRAL  # both before pay day would break the buffer
    assert power.schedule[0].due_date == date(2026, 3, 26)
    assert disclosed is None
    # Alone, the energy bill would be paid early, with the discount.
    alone = ReferenceStrategy(one.profile)
    early, _ = alone.opening(context(ENERGY, energy))
    assert [line.kind for line in early.lines] == [LineKind.DISCOUNT]


def test_a_payment_committed_outside_an_agreement_counts_against_the_budget() -> None:
    one = household("household-1")
    energy, telecom = (bill_of(account) for account in one.accounts)
    strategy = ReferenceStrategy(one.profile)
    strategy.commit(TELECOM, telecom.bill_id, [Instalment(telecom.due_date, telecom.amount_due)])
    assert strategy.pending() == []
    power, _ = strategy.opening(context(ENERGY, energy))
    assert power.kind is TermsKind.DEFERRAL
    strategy.forget(TELECOM, telecom.bill_id)  # paid: the money has left the balance
    assert strategy.committed() == ()


def test_a_household_in_hardship_claims_the_programme_with_a_purposeful_disclosure() -> None:
    five = household("household-5")
    bill = bill_of(five.accounts[0])
    terms, circumstances = ReferenceStrategy(five.profile).opening(context(ENERGY, bill))
    assert terms.hardship_programme_id == "hardship-12"
    assert not any(line.kind is LineKind.FEE for line in terms.lines)
    assert circumstances is not None
    assert circumstances.purpose == negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP
    assert circumstances.hardship
    assert agent_mandate(five.profile).allow_disclosure
    assert not agent_mandate(household("household-1").profile).allow_disclosure


def test_a_cushion_asks_for_room_and_accepts_a_counter_that_keeps_the_buffer() -> None:
    four = household("household-4")
    bill = bill_of(four.accounts[0])
    plan = bill.options.instalments
    assert plan is not None
    strategy = ReferenceStrategy(four.profile, cushion=four.cushion)
    asked, _ = strategy.opening(context(TELECOM, bill))
    assert asked.kind is TermsKind.INSTALMENT_PLAN
    assert len(asked.schedule) > plan.max_count
    fee = (Line(LineKind.FEE, "instalment plan fee", eur("1.50")),)
    counter = build_terms(TermsKind.INSTALMENT_PLAN, bill.amount_due, monthly_dates(date(2026, 4, 6), 3), fee)
    assert strategy.respond(answering(TELECOM, bill, counter, asked, 4)) == AcceptOffer()
    # Without the cushion the household opens inside the options: nothing to counter.
    plain, _ = ReferenceStrategy(four.profile).opening(context(TELECOM, bill))
    assert len(plain.schedule) <= plan.max_count


def test_answers_are_the_agent_s_answers() -> None:
    three = household("household-3")
    bill = bill_of(three.accounts[0])
    strategy = ReferenceStrategy(three.profile)
    mine, _ = strategy.opening(context(TELECOM, bill))
    tomorrow = build_terms(TermsKind.PAY_IN_FULL, bill.amount_due, [date(2026, 3, 3)])  # before pay day: short
    countered = strategy.respond(answering(TELECOM, bill, tomorrow, mine, 2))
    assert isinstance(countered, CounterOffer)
    rejected = strategy.respond(answering(TELECOM, bill, tomorrow, mine, 0))
    assert isinstance(rejected, RejectOffer)
    assert rejected.reason == negotiation_pb2.REJECT_REASON_UNAFFORDABLE
    costly = build_terms(
        TermsKind.DEFERRAL, bill.amount_due, [date(2026, 3, 30)], [Line(LineKind.FEE, "fee", eur("12.00"))]
    )
    assert isinstance(strategy.respond(answering(TELECOM, bill, costly, mine, 2)), Escalate)


def test_the_profile_is_read_for_the_day_it_decides_on() -> None:
    two = household("household-2")
    bill = bill_of(two.accounts[0])
    days: list[date] = []

    def profile_on(day: date) -> Profile:
        days.append(day)
        return dataclasses.replace(two.profile, balance=eur("0.00") if day > START else two.profile.balance)

    strategy = ReferenceStrategy(profile_on)
    rich, _ = strategy.opening(context(ENERGY, bill))
    assert rich.schedule[0].due_date == START  # early, with the discount
    poor, _ = strategy.opening(context(ENERGY, bill, today=date(2026, 3, 5)))
    assert poor.schedule[0].due_date > START
    assert days == [START, date(2026, 3, 5)]
