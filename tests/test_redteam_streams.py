"""Issue 13, item 1: a WatchEvents stream lives no longer than its query (EVT-10) and stays authorized for its
whole life (EVT-10), and a party holds at
most MAX_OPEN_STREAMS_PER_PARTY streams (LIM-14). Real streams over gRPC on loopback, one per trigger."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from agent.protocol.errors import Reason
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyEntry, make_key_set
from agent.protocol.limits import MAX_OPEN_STREAMS_PER_PARTY
from agent.transport.status import error_from_rpc
from parley.v1 import event_pb2
from parley.v1.biller_service_pb2 import EnrolRequest, PublishKeySetRequest, WatchEventsRequest
from tests.helpers.peer import BILLER_ID, Biller, Consumer, running_biller

ACCOUNT = "acct-1001"
ENDS_WITHIN = 5.0  # seconds; the tests' biller re-checks every 0.2 s (watch_poll_interval)


def run(tmp_path: Path, scenario: Callable[[Biller], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_biller(tmp_path) as biller:
            await scenario(biller)

    asyncio.run(main())


class Stream:
    """An open WatchEvents call, read in the background: the events it delivered and how it ended."""

    def __init__(self, biller: Biller, consumer: Consumer, start_sequence: int = 0) -> None:
        self.call = biller.stub.WatchEvents(
            WatchEventsRequest(query=consumer.query(ACCOUNT, start_sequence=start_sequence))
        )
        self.events: list[event_pb2.Event] = []
        self.ended: asyncio.Task[Reason | None] = asyncio.ensure_future(self._read())

    async def _read(self) -> Reason | None:
        try:
            async for response in self.call:
                self.events.append(event_pb2.Event.FromString(response.event.payload))
        except grpc.aio.AioRpcError as failure:
            if failure.code() is grpc.StatusCode.CANCELLED:
                return None
            return error_from_rpc(failure).reason
        return None

    async def delivered(self, count: int) -> None:
        async with asyncio.timeout(ENDS_WITHIN):
            while len(self.events) < count:
                await asyncio.sleep(0.02)

    async def end_reason(self) -> Reason | None:
        return await asyncio.wait_for(asyncio.shield(self.ended), ENDS_WITHIN)

    def cancel(self) -> None:
        self.call.cancel()


async def _emit(biller: Biller) -> None:
    await biller.agent.emit_event(ACCOUNT, event_pb2.EVENT_KIND_REMINDER, bill_id="b", reminder_level=1)


def _next_version(consumer: Consumer, biller: Biller, *, keep_old: bool, revoke_old: bool) -> SigningKey:
    """Publish-ready version 2 of the consumer's chain listing a new key; returns the new key."""
    new_key = SigningKey.generate()
    now = biller.clock.now()
    old = consumer.chain.latest
    keys = [KeyEntry(new_key.public_key, now - timedelta(minutes=1), now + timedelta(days=300))]
    if keep_old:
        keys += list(old.keys)
    envelope = make_key_set(
        party_id=consumer.party_id,
        version=old.version + 1,
        keys=keys,
        signer=consumer.key,
        previous=old,
        create_time=now,
        expire_time=now + timedelta(days=300),
        # Revoked from a second later: the version itself is signed by the key it revokes (KEY-15).
        revocations={consumer.key.public_key.keyid: now + timedelta(seconds=1)} if revoke_old else {},
    )
    consumer.party.key_sets.append(envelope)
    return new_key


def test_a_stream_ends_when_the_account_is_re_bound_to_another_party(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        await _emit(biller)
        stream = Stream(biller, alice)
        await stream.delivered(1)
        # ENR-11: the holder's new device enrols with a new code; the old party loses the account.
        thief_proof = Consumer("consumer:alice-new-phone", biller.clock)
        code = await biller.agent.issue_enrolment_code(ACCOUNT)
        await biller.stub.Enrol(EnrolRequest(request=thief_proof.enrolment(ACCOUNT, code)))
        assert await stream.end_reason() is Reason.ACCOUNT_ACCESS_DENIED
        await _emit(biller)
        assert len(stream.events) == 1  # nothing after the re-binding reached the old party

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("keep_old", "revoke_old", "expected"),
    [
        pytest.param(True, True, Reason.KEY_REVOKED, id="signing key revoked"),
        pytest.param(False, False, Reason.UNKNOWN_KEY, id="signing key dropped by a newer version"),
    ],
)
def test_a_stream_ends_when_its_signing_key_is_no_longer_in_force(
    tmp_path: Path, keep_old: bool, revoke_old: bool, expected: Reason
) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        stream = Stream(biller, alice)
        await _emit(biller)
        await stream.delivered(1)
        biller.clock.advance(timedelta(seconds=1))
        new_key = _next_version(alice, biller, keep_old=keep_old, revoke_old=revoke_old)
        await biller.stub.PublishKeySet(PublishKeySetRequest(key_set=alice.party.key_sets[-1]))
        biller.clock.advance(timedelta(seconds=2))
        assert await stream.end_reason() is expected
        # The party itself resumes with a query signed by its key in force.
        alice.key = new_key
        fresh = Stream(biller, alice, start_sequence=1)
        await _emit(biller)
        await fresh.delivered(1)
        fresh.cancel()

    run(tmp_path, scenario)


def test_a_stream_ends_at_its_querys_expire_time(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        stream = Stream(biller, alice)
        await _emit(biller)
        await stream.delivered(1)
        # EVT-10: the tests' queries live an hour; the stream ends when HDR-5 would refuse its query.
        biller.clock.advance(timedelta(hours=1) + biller.agent.limits.max_clock_skew - timedelta(seconds=1))
        await asyncio.sleep(0.5)  # a few re-checks
        assert not stream.ended.done()
        biller.clock.advance(timedelta(seconds=1))
        assert await stream.end_reason() is Reason.MESSAGE_EXPIRED

    run(tmp_path, scenario)


def test_a_party_holds_a_bounded_number_of_open_streams(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        await _emit(biller)
        streams = [Stream(biller, alice) for _ in range(MAX_OPEN_STREAMS_PER_PARTY)]
        for stream in streams:
            await stream.delivered(1)
        one_too_many = Stream(biller, alice)
        assert await one_too_many.end_reason() is Reason.TOO_MANY_STREAMS
        streams.pop().cancel()
        await asyncio.sleep(0.3)  # the server notices the cancellation and closes the stream
        replacement = Stream(biller, alice)
        await replacement.delivered(1)
        for stream in [*streams, replacement]:
            stream.cancel()

    run(tmp_path, scenario)


def test_the_consumer_agent_resumes_from_its_cursor_when_its_stream_expires(tmp_path: Path) -> None:
    # The consumer agent's scaffolding, shared with its own tests.
    from tests.test_consumer_agent import Household, enrol, remind, take  # noqa: PLC0415
    from tests.test_consumer_agent import run as run_with_household  # noqa: PLC0415

    async def scenario(biller: Biller, household: Household) -> None:
        async with household.agent() as agent:
            await enrol(biller, agent)  # event 0: BILL_ISSUED
            async with contextlib.aclosing(agent.watch(BILLER_ID)) as events:
                assert await take(events, 1) == [0]
                # Past the query's lifetime (the agent's 15 minutes) plus the skew: the biller ends the stream
                # with MESSAGE_EXPIRED (EVT-10); the agent opens a fresh one from its cursor, losing nothing.
                biller.clock.advance(timedelta(minutes=15) + biller.agent.limits.max_clock_skew)
                await asyncio.sleep(0.5)
                await remind(biller, 2)
                assert await take(events, 2) == [1, 2]

    run_with_household(tmp_path, scenario)
