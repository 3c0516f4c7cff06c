"""Issue 13, items 2, 10 and 14: key set chains cannot grow without bound or cost (LIM-12, LIM-15), the rate
limit is per party however many keys it lists (LIM-8), and the key set gaps (KEY-21, KEY-23)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

import agent.protocol.keysets as keysets_module
from agent.protocol.errors import LocalProtocolError, Reason
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain, KeyEntry, make_key_set
from agent.protocol.limits import (
    MAX_KEYSET_PUBLISHES_PER_DAY,
    MAX_KEYSET_VERSIONS,
    MAX_REVOCATION_REASON_CHARS,
    Limits,
)
from agent.transport.status import error_from_rpc
from parley.v1 import envelope_pb2
from parley.v1.biller_service_pb2 import ListBillsRequest, PublishKeySetRequest
from tests.helpers.peer import START, Biller, Consumer, running_biller

ACCOUNT = "acct-1001"
SMALL_RATE = Limits(rate_limit_per_second=1, rate_limit_burst=4)


def run(tmp_path: Path, scenario: Callable[[Biller], Awaitable[None]], **options: object) -> None:
    async def main() -> None:
        async with running_biller(tmp_path, **options) as biller:  # type: ignore[arg-type]
            await scenario(biller)

    asyncio.run(main())


async def reason(call: Awaitable[object]) -> Reason:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return error_from_rpc(failure.value).reason


def next_version(
    consumer: Consumer,
    biller: Biller,
    keys: Sequence[SigningKey] = (),
    *,
    ahead: timedelta = timedelta(0),
) -> envelope_pb2.Envelope:
    """The consumer's next version, signed by its current key, listing it and `keys`, created `ahead` of now."""
    now = biller.clock.now() + ahead
    previous = consumer.chain.latest
    entries = [KeyEntry(k.public_key, now - timedelta(days=1), now + timedelta(days=300)) for k in keys]
    return make_key_set(
        party_id=consumer.party_id,
        version=previous.version + 1,
        keys=[*previous.keys, *entries],
        signer=consumer.key,
        previous=previous,
        create_time=now,
        expire_time=now + timedelta(days=300),
    )


async def publish(biller: Biller, consumer: Consumer, envelope: envelope_pb2.Envelope) -> None:
    await biller.stub.PublishKeySet(PublishKeySetRequest(key_set=envelope))
    consumer.party.key_sets.append(envelope)


# --- LIM-12 / LIM-15: bounded chains --------------------------------------------------------------------


def test_a_revocation_reason_is_bounded() -> None:
    key = SigningKey.generate()
    other = SigningKey.generate()
    first = KeyChain.verify([keysets_module.first_key_set("consumer:alice", key, START)])
    with pytest.raises(LocalProtocolError) as refused:
        make_key_set(
            party_id="consumer:alice",
            version=2,
            keys=list(first.latest.keys),
            signer=key,
            previous=first.latest,
            create_time=START + timedelta(seconds=1),
            expire_time=START + timedelta(days=30),
            revocations={other.public_key.keyid: START},
            revocation_reasons={other.public_key.keyid: "x" * (MAX_REVOCATION_REASON_CHARS + 1)},
        )
    assert refused.value.reason is Reason.KEYSET_INVALID


def test_a_chain_has_at_most_max_keyset_versions() -> None:
    key = SigningKey.generate()
    chain = KeyChain.verify([keysets_module.first_key_set("consumer:alice", key, START)])

    def version(number: int) -> envelope_pb2.Envelope:
        created = START + timedelta(minutes=number)
        return make_key_set(
            party_id="consumer:alice",
            version=number,
            keys=list(chain.latest.keys),
            signer=key,
            previous=chain.latest,
            create_time=created,
            expire_time=created + timedelta(days=30),
        )

    for number in range(2, MAX_KEYSET_VERSIONS + 1):
        chain = chain.extend(version(number))
    assert chain.latest.version == MAX_KEYSET_VERSIONS
    with pytest.raises(LocalProtocolError) as refused:
        version(MAX_KEYSET_VERSIONS + 1)
    assert refused.value.reason is Reason.KEYSET_CHAIN_FULL


def test_publishes_per_party_per_day_are_bounded(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        for _ in range(MAX_KEYSET_PUBLISHES_PER_DAY):
            biller.clock.advance(timedelta(seconds=1))
            await publish(biller, alice, next_version(alice, biller))
        biller.clock.advance(timedelta(seconds=1))
        one_too_many = next_version(alice, biller)
        assert await reason(biller.stub.PublishKeySet(PublishKeySetRequest(key_set=one_too_many))) is (
            Reason.KEYSET_CHAIN_FULL
        )
        biller.clock.advance(timedelta(days=1))
        await publish(biller, alice, next_version(alice, biller))

    run(tmp_path, scenario)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_chain_verification_is_incremental(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, backend: str
) -> None:
    verified: list[int] = []
    verify_version = keysets_module._verify_version

    def counting(envelope: envelope_pb2.Envelope, *args: object) -> keysets_module.KeySetVersion:
        version = verify_version(envelope, *args)  # type: ignore[arg-type]
        verified.append(version.version)
        return version

    monkeypatch.setattr(keysets_module, "_verify_version", counting)

    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        for _ in range(8):
            biller.clock.advance(timedelta(hours=6))  # within the publishes-per-day budget
            await publish(biller, alice, next_version(alice, biller))
        await biller.stub.ListBills(ListBillsRequest(query=alice.query(ACCOUNT)))
        biller.clock.advance(timedelta(hours=6))
        tenth = next_version(alice, biller)
        queries = [alice.query(ACCOUNT) for _ in range(3)]  # signed before counting: the peer verifies its chain
        verified.clear()
        await biller.stub.PublishKeySet(PublishKeySetRequest(key_set=tenth))
        for query in queries:
            await biller.stub.ListBills(ListBillsRequest(query=query))
        assert verified == [10]  # the new version, once: not the whole chain on the publish or the requests

    # Both store back ends read the chain from the verified tip on (`party_key_sets(after_version=...)`).
    store = None if backend == "sqlite" else request.getfixturevalue("postgres_dsn")
    run(tmp_path, scenario, store=store)


# --- LIM-8: one budget per party --------------------------------------------------------------------------


def test_listing_more_keys_does_not_multiply_the_rate_limit(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        extra = [SigningKey.generate() for _ in range(3)]
        biller.clock.advance(timedelta(seconds=1))
        await publish(biller, alice, next_version(alice, biller, extra))  # one token of the burst
        keys = [alice.key, *extra]
        for n in range(SMALL_RATE.rate_limit_burst - 1):
            alice.key = keys[n % len(keys)]
            await biller.stub.ListBills(ListBillsRequest(query=alice.query(ACCOUNT)))
        alice.key = keys[-1]  # a key that has signed nothing yet: still the party's empty bucket
        assert await reason(biller.stub.ListBills(ListBillsRequest(query=alice.query(ACCOUNT)))) is (
            Reason.RATE_LIMITED
        )

    run(tmp_path, scenario, limits=SMALL_RATE)


# --- Issue 13 item 14: key set gaps ---------------------------------------------------------------------


def test_a_consumer_key_set_may_not_list_the_billers_own_key(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        biller.clock.advance(timedelta(seconds=1))
        borrowed = next_version(alice, biller, [biller.key])
        assert await reason(biller.stub.PublishKeySet(PublishKeySetRequest(key_set=borrowed))) is (
            Reason.KEYSET_INVALID
        )

    run(tmp_path, scenario)


def test_a_key_set_version_created_in_the_future_is_refused(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        skew = biller.agent.limits.max_clock_skew
        ahead = next_version(alice, biller, ahead=skew + timedelta(seconds=1))
        assert await reason(biller.stub.PublishKeySet(PublishKeySetRequest(key_set=ahead))) is (
            Reason.MESSAGE_NOT_YET_VALID
        )
        biller.clock.advance(timedelta(seconds=1))
        await publish(biller, alice, next_version(alice, biller, ahead=skew))  # within the skew: accepted

    run(tmp_path, scenario)
