"""Exactly once (HDR-8, HDR-12, PAY-2, TRN-6): every mutating call is idempotent by message id, also when
the duplicates race.

Each race sends the very same request on two separate gRPC channels at once (asyncio.gather), many rounds
over, against a live biller on one SQLite file: both callers get the same answer, byte for byte, and the
store holds exactly one effect. Payment intents are also idempotent by intent id (a retry signed anew with
the same content gets the same instructions; other content is IDEMPOTENCY_CONFLICT), and of two different
moves racing on one thread exactly one is applied.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf.message import Message

from agent.protocol.dsse import digest
from agent.protocol.errors import Reason
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain, KeyEntry, make_key_set
from agent.transport.status import error_from_rpc
from parley.v1 import biller_service_pb2_grpc, negotiation_pb2
from parley.v1.biller_service_pb2 import (
    CreatePaymentIntentRequest,
    EnrolRequest,
    ListBillsRequest,
    NegotiateRequest,
    PublishKeySetRequest,
    RequestErasureRequest,
)
from tests.fixtures import BILL, eur
from tests.helpers.peer import (
    Biller,
    Consumer,
    disclosure,
    hardship_terms,
    inside_options,
    outside_options,
    running_biller,
)

ACCOUNT = "acct-1001"
ROUNDS = 12
YEAR = timedelta(days=365)
AGREED = negotiation_pb2.NEGOTIATION_OUTCOME_AGREED

T = TypeVar("T")
Stubs = tuple["biller_service_pb2_grpc.BillerServiceAsyncStub", "biller_service_pb2_grpc.BillerServiceAsyncStub"]


@asynccontextmanager
async def two_channels(biller: Biller) -> AsyncIterator[Stubs]:
    """Two stubs on two separate channels (two HTTP/2 connections) to the biller."""
    async with (
        grpc.aio.insecure_channel(biller.target, options=[("grpc.use_local_subchannel_pool", 1)]) as first,
        grpc.aio.insecure_channel(biller.target, options=[("grpc.use_local_subchannel_pool", 1)]) as second,
    ):
        yield biller_service_pb2_grpc.BillerServiceStub(first), biller_service_pb2_grpc.BillerServiceStub(second)


async def race(first: Awaitable[T], second: Awaitable[T]) -> tuple[T, T]:
    """Two calls (the same request on the two channels) at once; both must succeed."""
    answers = await asyncio.gather(first, second)
    return answers[0], answers[1]


def same_bytes(answers: tuple[Message, Message]) -> bytes:
    """Both answers, serialized, are the same bytes; returns them."""
    first, second = (answer.SerializeToString() for answer in answers)
    assert first == second
    return first


def count(db_path: Path, sql: str, *args: object) -> int:
    with sqlite3.connect(db_path) as db:
        return int(db.execute(sql, args).fetchone()[0])


def run(tmp_path: Path, scenario: Callable[[Biller, Stubs], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_biller(tmp_path) as biller, two_channels(biller) as stubs:
            await scenario(biller, stubs)

    asyncio.run(main())


def next_round(biller: Biller) -> None:
    """A second per round: each key's rate-limit bucket (LIM-8) refills, so only the races are tested."""
    biller.clock.advance(timedelta(seconds=1))


# --- Concurrent duplicates of each mutating call ----------------------------------------------------------


def test_concurrent_duplicate_enrolments_bind_once(tmp_path: Path) -> None:
    async def scenario(biller: Biller, stubs: Stubs) -> None:
        for n in range(ROUNDS):
            account = f"acct-{n}"
            await biller.agent.create_account(account, "Holder")
            code = await biller.agent.issue_enrolment_code(account)
            consumer = Consumer(f"consumer:c{n}", biller.clock)
            request = EnrolRequest(request=consumer.enrolment(account, code))
            same_bytes(await race(stubs[0].Enrol(request), stubs[1].Enrol(request)))
            assert count(biller.db_path, "SELECT COUNT(*) FROM bindings WHERE account_id = ?", account) == 1
            assert count(biller.db_path, "SELECT COUNT(*) FROM parties WHERE party_id = ?", consumer.party_id) == 1
            assert count(biller.db_path, "SELECT COUNT(*) FROM replay_cache WHERE sender = ?", consumer.party_id) == 1
            next_round(biller)

    run(tmp_path, scenario)


def test_concurrent_duplicate_moves_are_applied_once(tmp_path: Path) -> None:
    """Open, counter-offer and accept, each raced; every thread ends agreed with exactly its 5 messages."""

    async def scenario(biller: Biller, stubs: Stubs) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        for n in range(ROUNDS):
            bill = await biller.bill(ACCOUNT, f"bill-{n}")
            opening = alice.open(bill, outside_options())
            opened = await race(*(stub.Negotiate(NegotiateRequest(move=opening)) for stub in stubs))
            same_bytes(opened)
            thread = [opening, opened[0].reply]
            offer = alice.next(thread, negotiation_pb2.Offer(terms=outside_options()))
            countered = await race(*(stub.Negotiate(NegotiateRequest(move=offer)) for stub in stubs))
            same_bytes(countered)
            thread += [offer, countered[0].reply]
            accept = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[-1])))
            accepted = await race(*(stub.Negotiate(NegotiateRequest(move=accept)) for stub in stubs))
            assert accepted[0].outcome == AGREED
            same_bytes(accepted)
            thread_id = negotiation_pb2.ThreadOpen.FromString(opening.payload).header.thread_id
            assert count(biller.db_path, "SELECT COUNT(*) FROM messages WHERE thread_id = ?", thread_id) == 5
            next_round(biller)
        assert len(await biller.agent.arrangements(ACCOUNT)) == ROUNDS
        # One BILL_ISSUED and one ARRANGEMENT_ACTIVE per bill: the raced accept appended its event once.
        assert count(biller.db_path, "SELECT COUNT(*) FROM binding_events WHERE account_id = ?", ACCOUNT) == 2 * ROUNDS

    run(tmp_path, scenario)


def test_concurrent_duplicate_openings_inside_the_options_agree_once(tmp_path: Path) -> None:
    async def scenario(biller: Biller, stubs: Stubs) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        for n in range(ROUNDS):
            bill = await biller.bill(ACCOUNT, f"bill-{n}")
            opening = alice.open(bill, inside_options())
            answers = await race(*(stub.Negotiate(NegotiateRequest(move=opening)) for stub in stubs))
            assert answers[0].outcome == AGREED
            same_bytes(answers)
            next_round(biller)
        assert count(biller.db_path, "SELECT COUNT(*) FROM threads") == ROUNDS
        assert count(biller.db_path, "SELECT COUNT(*) FROM messages") == 2 * ROUNDS
        assert len(await biller.agent.arrangements(ACCOUNT)) == ROUNDS

    run(tmp_path, scenario)


def test_concurrent_duplicate_payment_intents_yield_one_intent(tmp_path: Path) -> None:
    async def scenario(biller: Biller, stubs: Stubs) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        for n in range(ROUNDS):
            await biller.bill(ACCOUNT, f"bill-{n}")
            intent = alice.intent(ACCOUNT, f"bill-{n}", f"pay-{n}", BILL.amount_due)
            request = CreatePaymentIntentRequest(intent=intent)
            same_bytes(await race(stubs[0].CreatePaymentIntent(request), stubs[1].CreatePaymentIntent(request)))
            next_round(biller)
        assert count(biller.db_path, "SELECT COUNT(*) FROM payment_intents") == ROUNDS
        references = count(biller.db_path, "SELECT COUNT(DISTINCT payment_reference) FROM payment_intents")
        assert references == ROUNDS

    run(tmp_path, scenario)


def test_concurrent_duplicate_erasures_erase_once_and_answer_alike(tmp_path: Path) -> None:
    async def scenario(biller: Biller, stubs: Stubs) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        for n in range(ROUNDS):
            bill = await biller.bill(ACCOUNT, f"bill-{n}")
            secret = disclosure()
            opening = alice.open(bill, hardship_terms(), disclosure=secret)
            await biller.stub.Negotiate(NegotiateRequest(move=opening, disclosure=secret))
            assert count(biller.db_path, "SELECT COUNT(*) FROM disclosures") == 1
            request = RequestErasureRequest(request=alice.erasure(ACCOUNT))
            answers = await race(stubs[0].RequestErasure(request), stubs[1].RequestErasure(request))
            same_bytes(answers)
            assert count(biller.db_path, "SELECT COUNT(*) FROM disclosures") == 0
            next_round(biller)
        assert count(biller.db_path, "SELECT COUNT(*) FROM replay_cache WHERE sender = ?", alice.party_id) == (
            1 + 2 * ROUNDS  # the enrolment, and per round the opening and the erasure
        )

    run(tmp_path, scenario)


def test_concurrent_duplicate_key_set_publications_add_one_version(tmp_path: Path) -> None:
    async def scenario(biller: Biller, stubs: Stubs) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        chain = [alice.key_set]
        for _ in range(ROUNDS):
            now = biller.clock.now()
            new_key = SigningKey.generate()
            version = make_key_set(
                party_id=alice.party_id,
                version=len(chain) + 1,
                keys=[KeyEntry(new_key.public_key, now - timedelta(minutes=1), now + YEAR)],
                signer=alice.key,
                previous=KeyChain.verify(chain).latest,
                create_time=now - timedelta(minutes=1),
                expire_time=now + YEAR,
            )
            answers = await race(*(stub.PublishKeySet(PublishKeySetRequest(key_set=version)) for stub in stubs))
            same_bytes(answers)
            assert answers[0].version == len(chain) + 1
            chain.append(version)
            alice.key = new_key
            biller.clock.advance(timedelta(hours=6))  # LIM-15: a party publishes at most 4 versions a day
        assert count(biller.db_path, "SELECT COUNT(*) FROM party_key_sets WHERE party_id = ?", alice.party_id) == (
            ROUNDS + 1
        )
        await biller.stub.ListBills(ListBillsRequest(query=alice.query(ACCOUNT)))  # the newest key signs

    run(tmp_path, scenario)


# --- Payment intents: idempotent by intent id too (PAY-2) -------------------------------------------------


def test_a_payment_intent_retried_under_new_message_ids_never_yields_a_second_intent(tmp_path: Path) -> None:
    async def scenario(biller: Biller, stubs: Stubs) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        for n in range(ROUNDS):
            await biller.bill(ACCOUNT, f"bill-{n}")
            # Two messages (two message ids), the same intent id and content, racing.
            first, second = (alice.intent(ACCOUNT, f"bill-{n}", f"pay-{n}", BILL.amount_due) for _ in range(2))
            assert first.payload != second.payload
            answers = await asyncio.gather(
                stubs[0].CreatePaymentIntent(CreatePaymentIntentRequest(intent=first)),
                stubs[1].CreatePaymentIntent(CreatePaymentIntentRequest(intent=second)),
            )
            instructions = same_bytes((answers[0].instructions, answers[1].instructions))
            # A third, later, gets the same instructions again.
            later = alice.intent(ACCOUNT, f"bill-{n}", f"pay-{n}", BILL.amount_due)
            again = await biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=later))
            assert again.instructions.SerializeToString() == instructions
            next_round(biller)
        assert count(biller.db_path, "SELECT COUNT(*) FROM payment_intents") == ROUNDS
        # Settling each intent once yields one receipt; the bill is paid, so no second payment can be asked.
        for n in range(ROUNDS):
            await biller.agent.record_settlement(ACCOUNT, f"pay-{n}", BILL.amount_due, f"RAIL-{n}")
        assert count(biller.db_path, "SELECT COUNT(*) FROM settlements") == ROUNDS

    run(tmp_path, scenario)


def test_different_content_under_one_intent_id_is_an_idempotency_conflict_even_racing(tmp_path: Path) -> None:
    async def scenario(biller: Biller, stubs: Stubs) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        accept_thread = [alice.open(bill, outside_options())]
        accept_thread.append((await biller.stub.Negotiate(NegotiateRequest(move=accept_thread[0]))).reply)
        accept = alice.next(accept_thread, negotiation_pb2.Accept(offer_digest=digest(accept_thread[1])))
        await biller.stub.Negotiate(NegotiateRequest(move=accept))
        twenty = eur("20.00")
        paid: set[int] = set()
        for n in range(5):  # 6 instalments; each round settles one (PAY-14: one intent in flight per bill)
            # The same intent id for two unpaid instalments: two contents (both valid amounts).
            unpaid = [i for i in range(6) if i not in paid][:2]
            intents = [
                alice.intent(
                    ACCOUNT, BILL.bill_id, f"pay-{n}", twenty, agreement_digest=digest(accept), instalment_index=i
                )
                for i in unpaid
            ]
            results = await asyncio.gather(
                *(
                    stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=e))
                    for stub, e in zip(stubs, intents, strict=True)
                ),
                return_exceptions=True,
            )
            wins = [r for r in results if not isinstance(r, BaseException)]
            losses = [r for r in results if isinstance(r, BaseException)]
            assert (len(wins), len(losses)) == (1, 1), results
            assert isinstance(losses[0], grpc.aio.AioRpcError)
            assert error_from_rpc(losses[0]).reason is Reason.IDEMPOTENCY_CONFLICT
            assert count(biller.db_path, "SELECT COUNT(*) FROM payment_intents WHERE intent_id = ?", f"pay-{n}") == 1
            won = await biller.agent.party.store.get_payment_intent(ACCOUNT, f"pay-{n}")
            assert won is not None
            await biller.agent.record_settlement(ACCOUNT, f"pay-{n}", twenty, f"RAIL-{n}")
            paid.add(won.instalment_index)
            next_round(biller)

    run(tmp_path, scenario)


# --- Different moves racing on one thread: exactly one is applied -----------------------------------------


@pytest.mark.parametrize("rival", ["another accept", "a withdraw"])
def test_two_different_moves_racing_on_one_thread_exactly_one_wins(tmp_path: Path, rival: str) -> None:
    async def scenario(biller: Biller, stubs: Stubs) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        accepts_won = 0
        for n in range(ROUNDS):
            bill = await biller.bill(ACCOUNT, f"bill-{n}")
            opening = alice.open(bill, outside_options())
            thread = [opening, (await biller.stub.Negotiate(NegotiateRequest(move=opening))).reply]
            accept = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))
            other = (
                alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))
                if rival == "another accept"
                else alice.next(thread, negotiation_pb2.Withdraw())
            )
            assert accept.payload != other.payload
            results = await asyncio.gather(
                stubs[0].Negotiate(NegotiateRequest(move=accept)),
                stubs[1].Negotiate(NegotiateRequest(move=other)),
                return_exceptions=True,
            )
            wins = [r for r in results if not isinstance(r, BaseException)]
            losses = [r for r in results if isinstance(r, BaseException)]
            assert (len(wins), len(losses)) == (1, 1), results
            accepts_won += not isinstance(results[0], BaseException) or rival == "another accept"
            assert isinstance(losses[0], grpc.aio.AioRpcError)
            # The loser either found the position taken or the thread already ended: refused, not recorded.
            assert error_from_rpc(losses[0]).reason in {Reason.SEQUENCE_MISMATCH, Reason.THREAD_CLOSED}
            thread_id = negotiation_pb2.ThreadOpen.FromString(opening.payload).header.thread_id
            assert count(biller.db_path, "SELECT COUNT(*) FROM messages WHERE thread_id = ?", thread_id) == 3
            next_round(biller)
        # A round agreed exactly when an accept won it, and each agreement put its bill under arrangement once.
        assert len(await biller.agent.arrangements(ACCOUNT)) == accepts_won
        under_arrangement = count(biller.db_path, "SELECT COUNT(*) FROM bills WHERE status = 'under_arrangement'")
        assert under_arrangement == accepts_won

    run(tmp_path, scenario)
