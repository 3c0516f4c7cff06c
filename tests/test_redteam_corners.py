"""Revision 1.2's corners (a bounds audit, 2026-12-08): a counterparty's extreme but well-formed input met
arithmetic or a store that could not take it.

- ENV-15: a string holding U+0000 is MALFORMED_PAYLOAD, on SQLite and PostgreSQL alike (PostgreSQL `text` cannot
  hold it: the request was an INTERNAL error there, retried, and never charged to the sender's address).
- LIM-16: a bill has at most MAX_THREADS_PER_BILL threads, whatever their outcome (closed ones were unbounded).
- BIL-2 item 9: a bill whose fee option no terms could express is invalid; a policy that cannot build its answer
  rejects instead of refusing the consumer's valid offer.
- PRV-9: a disclosed next pay date is within MAX_NEXT_PAY_DATE_DAYS of the opening.
- The biller's cache of consumers' verified chains is bounded by their bytes, not only their number.
- An agreement bundle whose opening claims the year 9999 gets a verdict, not an OverflowError (NEG-4's deadline
  bound is judged as a difference).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.biller import BillerAgent, OfferContext
from agent.clock import ManualClock
from agent.conformance.peers import PeerRail
from agent.lru import Lru
from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, ProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyEntry, first_key_set, make_key_set
from agent.protocol.limits import MAX_NEXT_PAY_DATE_DAYS, MAX_THREADS_PER_BILL
from agent.protocol.messages import new_header, parse_payload, seal, to_timestamp
from agent.protocol.terms import AdvertisedOptions, BillFacts, DeferralOption, Money, TermsKind, build_terms
from agent.stores import open_biller_store
from parley.v1 import envelope_pb2, negotiation_pb2
from reference_biller.config import load_config
from reference_biller.policy import SegmentPolicy
from tests.fixtures import BILL
from tests.helpers.peer import BILLER_ID, START, Consumer, SamplePolicy, new_party, settlement_terms

ACCOUNT = "acct-1001"


async def biller_with_a_bill(where: str | Path, policy: object = None) -> tuple[BillerAgent, Consumer, ManualClock]:
    clock = ManualClock(START)
    key, key_set = new_party(BILLER_ID, clock)
    store = await open_biller_store(where)
    agent = BillerAgent(
        party_id=BILLER_ID,
        signing_key=key,
        key_sets=[key_set],
        store=store,
        policy=policy or SamplePolicy(),  # type: ignore[arg-type]
        rail=PeerRail(),
        clock=clock,
    )
    await agent.create_account(ACCOUNT, "Alice")
    consumer = Consumer("consumer:alice", clock)
    await agent.enrol(consumer.enrolment(ACCOUNT, await agent.issue_enrolment_code(ACCOUNT)))
    await agent.issue_bill(
        ACCOUNT, BILL.amount_due, BILL.due_date, BILL.description, issue_date=BILL.issue_date, bill_id=BILL.bill_id
    )
    return agent, consumer, clock


async def the_bill(agent: BillerAgent, bill_id: str = BILL.bill_id) -> envelope_pb2.Envelope:
    record = await agent.party.store.get_bill(bill_id)
    assert record is not None
    return envelope_pb2.Envelope.FromString(record.envelope)


async def threads_on_bill(agent: BillerAgent) -> int:
    """Every thread the bill has had, as the store reads it for an opening."""
    context = await agent.party.store.thread_context(secrets.token_bytes(16), BILL.bill_id, "consumer:alice")
    return context.threads_on_bill


async def refusal(call: object) -> Reason:
    with pytest.raises(ProtocolError) as refused:
        await call  # type: ignore[misc]
    return refused.value.reason


# --- ENV-15 ---------------------------------------------------------------------------------------------


def test_a_string_holding_nul_is_malformed_at_any_depth_and_named() -> None:
    query = negotiation_pb2.ThreadOpen(bill_id="bill-1", terms=settlement_terms())
    assert parse_payload(negotiation_pb2.ThreadOpen, query.SerializeToString()).bill_id == "bill-1"
    query.terms.lines[0].description = "reduction\0"
    with pytest.raises(RemoteProtocolError) as refused:
        parse_payload(negotiation_pb2.ThreadOpen, query.SerializeToString())
    assert refused.value.reason is Reason.MALFORMED_PAYLOAD
    assert "terms.lines[0].description" in refused.value.detail


@pytest.mark.parametrize("back_end", ["sqlite", "postgres"])
def test_an_id_holding_nul_gets_malformed_payload_on_either_store_and_changes_nothing(
    tmp_path: Path, back_end: str, request: pytest.FixtureRequest
) -> None:
    where = request.getfixturevalue("postgres_dsn") if back_end == "postgres" else tmp_path / "biller.sqlite"

    async def scenario() -> None:
        agent, consumer, _ = await biller_with_a_bill(where)
        stranger = Consumer("consumer:eve", agent.party.clock)  # type: ignore[arg-type]
        calls = [
            agent.list_bills(consumer.query(f"{ACCOUNT}\0")),
            agent.get_bill(consumer.query(ACCOUNT, bill_id="x\0")),
            agent.enrol(stranger.enrolment("acct\0", "7KQ2-M9XD-4RTB")),
        ]
        for call in calls:  # on PostgreSQL each was an INTERNAL error ("retry with the same message")
            assert await refusal(call) is Reason.MALFORMED_PAYLOAD
        assert [bill.bill_id for bill in await agent.party.store.list_bills(ACCOUNT)] == [BILL.bill_id]
        await agent.party.store.close()

    asyncio.run(scenario())


# --- LIM-16 ---------------------------------------------------------------------------------------------


def test_a_bill_has_at_most_its_threads_whatever_their_outcome(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, consumer, clock = await biller_with_a_bill(tmp_path / "biller.sqlite")
        bill = await the_bill(agent)
        for _ in range(MAX_THREADS_PER_BILL):  # each one request: the policy rejects a settlement at once
            answer = await agent.negotiate(consumer.open(bill, settlement_terms()))
            assert answer.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_REJECTED
            clock.advance(timedelta(seconds=0.1))  # within the rate limit
        assert await refusal(agent.negotiate(consumer.open(bill, settlement_terms()))) is Reason.TOO_MANY_THREADS
        assert await threads_on_bill(agent) == MAX_THREADS_PER_BILL  # the refused opening left nothing
        await agent.party.store.close()

    asyncio.run(scenario())


# --- BIL-2 item 9 and a policy that cannot build its answer ---------------------------------------------------


def test_a_bill_whose_fee_option_no_terms_could_express_is_invalid() -> None:
    ceiling = Money.parse("999999999.99", "EUR")
    BillFacts("b", "a", ceiling, date(2026, 3, 1), date(2026, 3, 31), "", AdvertisedOptions())  # no fee: valid
    fee = Money.of(500, "EUR")
    with pytest.raises(LocalProtocolError) as refused:
        BillFacts(
            "b", "a", ceiling, date(2026, 3, 1), date(2026, 3, 31), "", AdvertisedOptions(DeferralOption(30, fee))
        )
    assert refused.value.reason is Reason.AMOUNT_OUT_OF_RANGE
    assert "options.deferral.fee" in refused.value.detail
    below = Money.of(ceiling.minor - fee.minor, "EUR")  # plus the fee: the largest amount there is
    BillFacts("b", "a", below, date(2026, 3, 1), date(2026, 3, 31), "", AdvertisedOptions(DeferralOption(30, fee)))


class UnbuildablePolicy(SamplePolicy):
    """A policy whose answer cannot be built: its counter-offer's amount is past the ceiling."""

    def decide(self, context: OfferContext) -> NoReturn:
        Money.parse("999999999.99", "EUR") + Money.of(1, "EUR")  # raises AMOUNT_OUT_OF_RANGE
        raise AssertionError("unreachable")


def test_a_policy_that_cannot_build_its_answer_rejects_and_never_blames_the_offer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        agent, consumer, _ = await biller_with_a_bill(tmp_path / "biller.sqlite", UnbuildablePolicy())
        answer = await agent.negotiate(consumer.open(await the_bill(agent), settlement_terms()))
        assert answer.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_REJECTED  # was: AMOUNT_OUT_OF_RANGE, no thread
        await agent.party.store.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert "policy-answer-refused" in caplog.text
    assert "AMOUNT_OUT_OF_RANGE" in caplog.text


def test_the_reference_policy_on_a_bill_at_the_ceiling_never_needs_a_fee_past_it(tmp_path: Path) -> None:
    """The reference biller advertises its segment's fees: a bill so large that a fee would pass the ceiling
    cannot be issued at all (BIL-2 item 9), so its policy never has to answer on one."""

    async def scenario() -> None:
        agent, _, _ = await biller_with_a_bill(tmp_path / "biller.sqlite", SegmentPolicy(load_config()))
        with pytest.raises(LocalProtocolError) as refused:
            await agent.issue_bill(ACCOUNT, Money.parse("999999999.99", "EUR"), date(2026, 3, 31), "too large")
        assert refused.value.reason is Reason.AMOUNT_OUT_OF_RANGE
        await agent.party.store.close()

    asyncio.run(scenario())


# --- PRV-9 -----------------------------------------------------------------------------------------------


def disclosing(next_pay_date: str) -> bytes:
    circumstances = negotiation_pb2.Circumstances(
        purpose=negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_ARRANGEMENT, next_pay_date=next_pay_date
    )
    return negotiation_pb2.Disclosure(salt=secrets.token_bytes(16), circumstances=circumstances).SerializeToString()


def test_a_disclosed_pay_day_is_within_a_year_of_the_opening(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, consumer, clock = await biller_with_a_bill(tmp_path / "biller.sqlite")
        bill = await the_bill(agent)
        today = clock.now().date()
        for far in (date(9999, 12, 31), date(1, 1, 1), today + timedelta(days=MAX_NEXT_PAY_DATE_DAYS + 1)):
            disclosure = disclosing(far.isoformat())
            opening = consumer.open(bill, settlement_terms(), disclosure=disclosure)
            assert await refusal(agent.negotiate(opening, disclosure)) is Reason.MALFORMED_PAYLOAD
        assert await threads_on_bill(agent) == 0
        disclosure = disclosing((today + timedelta(days=MAX_NEXT_PAY_DATE_DAYS)).isoformat())
        answer = await agent.negotiate(consumer.open(bill, settlement_terms(), disclosure=disclosure), disclosure)
        assert answer.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_REJECTED  # judged, by the policy
        await agent.party.store.close()

    asyncio.run(scenario())


# --- A bundle from the year 9999 ------------------------------------------------------------------------------


def test_a_bundle_whose_opening_claims_the_year_9999_gets_a_verdict_not_an_overflow() -> None:
    """Offline nothing bounds a message's create_time but the sender's own key set, which the sender makes."""
    now = datetime(2026, 1, 10, tzinfo=UTC)
    biller_key, consumer_key = SigningKey.generate(), SigningKey.generate()
    biller_chain = [first_key_set("biller:x", biller_key, now - timedelta(days=1))]
    far, end = datetime(9999, 6, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    consumer_chain = [
        make_key_set(
            party_id="consumer:y",
            version=1,
            keys=[KeyEntry(consumer_key.public_key, far, end)],
            signer=consumer_key,
            previous=None,
            create_time=far,
            expire_time=end,
        )
    ]
    facts = BillFacts("b1", "a1", Money.of(10000, "EUR"), date(2026, 1, 1), date(2026, 2, 1), "", AdvertisedOptions())
    bill = facts.to_proto()
    bill.header.CopyFrom(
        new_header(
            sender="biller:x",
            recipient="consumer:y",
            thread_id=secrets.token_bytes(16),
            sequence=0,
            previous_digest=b"",
            now=now,
            lifetime=timedelta(hours=1),
        )
    )
    bill_envelope = seal(bill, biller_key)
    opened = datetime(9999, 12, 31, tzinfo=UTC)
    opening = negotiation_pb2.ThreadOpen(
        header=new_header(
            sender="consumer:y",
            recipient="biller:x",
            thread_id=secrets.token_bytes(16),
            sequence=0,
            previous_digest=b"",
            now=opened,
            lifetime=timedelta(hours=1),
        ),
        bill_id="b1",
        bill_digest=digest(bill_envelope),
        max_rounds=3,
        deadline=to_timestamp(opened + timedelta(hours=12)),
        terms=build_terms(TermsKind.PAY_IN_FULL, Money.of(10000, "EUR"), [date(2026, 1, 20)]).to_proto(),
    )
    bundle = Bundle(
        key_sets={"biller:x": biller_chain, "consumer:y": consumer_chain},
        bill=bill_envelope,
        thread=[seal(opening, consumer_key)],
    )
    with pytest.raises(ProtocolError) as invalid:  # was: OverflowError out of NEG-4's deadline check
        verify_bundle(bundle, pins={"biller:x": digest(biller_chain[0])})
    assert invalid.value.reason is Reason.NOT_AGREED


# --- Caches bounded by weight, not only by count ----------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.sampled_from(["put", "get", "pop"]), st.integers(0, 6), st.integers(0, 40)),
        max_size=60,
    )
)
def test_a_weighted_cache_never_holds_more_than_its_count_or_its_weight(operations: list[tuple[str, int, int]]) -> None:
    """The consumers' verified chains are cached by party, and a chain's size is the party's choice (up to about
    6 MB at LIM-15's bound): the cache bounds their bytes (agent/biller/receive.py), as an Lru with max_weight."""
    cache: Lru[int, str] = Lru(4, max_weight=50)
    model: dict[int, tuple[str, int]] = {}  # what it holds, oldest use first
    for operation, key, weight in operations:
        if operation == "put":
            model.pop(key, None)
            model[key] = (f"v{key}", weight)
            while len(model) > 4 or sum(w for _, w in model.values()) > 50:
                del model[next(iter(model))]
            cache.put(key, f"v{key}", weight)
        elif operation == "get":
            assert cache.get(key) == (model[key][0] if key in model else None)
            if key in model:
                model[key] = model.pop(key)
        else:
            model.pop(key, None)
            cache.pop(key)
        assert len(cache) == len(model) <= 4
        assert cache.weight == sum(w for _, w in model.values()) <= 50
