"""Key sets: publication, rotation, revocation (§4)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.conformance.biller.target import (
    FIXTURES,
    BillerTarget,
    Customer,
    accepted,
    enrol,
    expect,
    list_bills,
    publish,
    query_envelope,
    read_ok,
)
from agent.conformance.peers import KeySpec, SignedParty, build_key_set, flip_signature
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.keys import SigningKey
from parley.v1 import envelope_pb2, keys_pb2

suite: Suite[BillerTarget] = Suite("biller/keysets")


async def _rotated(ctx: BillerTarget, customer: Customer) -> tuple[Any, envelope_pb2.Envelope]:
    """Publish version 2 listing the current key and a new one; returns (new key, version 2)."""
    party = customer.party
    new_key = type(party.key).generate()
    start = party.clock() - timedelta(days=1)
    version_2 = party.next_key_set([party.key_spec(party.key, start), party.key_spec(new_key, start)])
    answer = accepted(await publish(ctx, version_2), "PublishKeySet of version 2, signed by a key of version 1")
    if answer.version != 2:
        raise Violation(f"PublishKeySet of version 2 answered version {answer.version}")
    party.adopt(version_2)
    return new_key, version_2


def _ending_key_party(ctx: BillerTarget) -> tuple[SignedParty, SigningKey, datetime]:
    """A party whose version 1 lists a key whose window ended two minutes ago and a spare that signs from now on;
    (the party, the ended key, its not_after)."""
    party = ctx.new_party()
    ended, spare = party.key, type(party.key).generate()
    now = ctx.now().replace(microsecond=0)
    start, not_after = now - timedelta(days=1), now - timedelta(minutes=2)
    party.key_sets[:] = [
        build_key_set(
            party_id=party.party_id,
            version=1,
            keys=[KeySpec(ended.public_key, start, not_after), party.key_spec(spare, start)],
            signer=spare,
            create_time=start,
            expire_time=start + timedelta(days=300),
            previous=None,
        )
    ]
    party.key = spare
    return party, ended, not_after


@suite.case(
    "KEY-19/publish-next-version",
    description="PublishKeySet extends the chain; a retry answers the same version; the new key then signs",
    quote="On `PublishKeySet`, a biller MUST resolve the publishing party […], verify the envelope as the next "
    "version of that party's chain […], store it, and answer the version now current. A retry of the very envelope "
    "already stored as the current version MUST be answered with that version, not refused (HDR-12). The biller "
    "MUST then judge that party's messages against the extended chain.",
    needs=(FIXTURES,),
)
async def publish_next_version(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    new_key, version_2 = await _rotated(ctx, customer)
    retry = accepted(await publish(ctx, version_2), "the same version 2 envelope, published again")
    if retry.version != 2:
        raise Violation(f"the retried PublishKeySet answered version {retry.version}, not 2")
    await read_ok(ctx, customer, key=new_key)


@suite.case(
    "KEY-8/rollback",
    description="A version not above the current one is refused with KEYSET_ROLLBACK",
    quote="A receiver MUST refuse a version not above the one it holds (a rollback, including a second, different "
    "version `N`) with `KEYSET_ROLLBACK`",
    needs=(FIXTURES,),
)
async def keyset_rollback(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    await _rotated(ctx, customer)
    party = customer.party
    start = party.clock() - timedelta(days=1)
    other_2 = party.next_key_set(
        [party.key_spec(party.key, start), party.key_spec(type(party.key).generate(), start)],
        version=2,
        previous=party.key_sets[0],
    )
    expect(await publish(ctx, other_2), Reason.KEYSET_ROLLBACK, "a second, different version 2")
    expect(await publish(ctx, party.key_sets[0]), Reason.KEYSET_ROLLBACK, "version 1 again, after version 2")


@suite.case(
    "KEY-8/skipped-version",
    description="A version that skips one is refused with KEYSET_VERSION_SKIPPED",
    quote="a version that skips one with `KEYSET_VERSION_SKIPPED`",
    needs=(FIXTURES,),
)
async def keyset_skipped(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    start = party.clock() - timedelta(days=1)
    version_3 = party.next_key_set([party.key_spec(party.key, start)], version=3)
    expect(await publish(ctx, version_3), Reason.KEYSET_VERSION_SKIPPED, "version 3 right after version 1")


@suite.case(
    "KEY-19/unknown-signer",
    description="A version signed by a key only it lists is refused with NOT_ENROLLED, and the key stays unknown",
    quote="On `PublishKeySet`, a biller MUST resolve the publishing party from the envelope's `keyid` among the newest "
    "versions of its enrolled parties' chains (`NOT_ENROLLED` when none lists it, AUZ-2)",
    needs=(FIXTURES,),
)
async def unknown_signer(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    new_key = type(party.key).generate()
    start = party.clock() - timedelta(days=1)
    version_2 = party.next_key_set([party.key_spec(party.key, start), party.key_spec(new_key, start)], signer=new_key)
    expect(await publish(ctx, version_2), Reason.NOT_ENROLLED, "version 2 signed by a key only version 2 lists")
    expect(
        await list_bills(ctx, query_envelope(customer, key=new_key)), Reason.NOT_ENROLLED, "a query signed by that key"
    )


@suite.case(
    "KEY-9/bad-signature",
    description="A next version whose signature does not verify is refused with BAD_SIGNATURE, without effect",
    quote="A receiver MUST refuse a version whose `keyid` names no key of the set that must sign it with "
    "`KEYSET_WRONG_SIGNER`, and one whose signature does not verify with `BAD_SIGNATURE`.",
    needs=(FIXTURES,),
)
async def keyset_bad_signature(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    new_key = type(party.key).generate()
    start = party.clock() - timedelta(days=1)
    version_2 = party.next_key_set([party.key_spec(party.key, start), party.key_spec(new_key, start)])
    expect(await publish(ctx, flip_signature(version_2)), Reason.BAD_SIGNATURE, "version 2 with a flipped bit")
    expect(await list_bills(ctx, query_envelope(customer, key=new_key)), Reason.NOT_ENROLLED, "a query by its new key")


@suite.case(
    "KEY-9/first-version-not-self-signed",
    description="An enrolment whose key set version 1 is signed by a key it does not list is refused with "
    "KEYSET_WRONG_SIGNER",
    quote="Version 1 MUST be signed by one of its own keys (it is self-signed). … A receiver MUST refuse a version "
    "whose `keyid` names no key of the set that must sign it with `KEYSET_WRONG_SIGNER`",
    needs=(FIXTURES,),
)
async def first_version_not_self_signed(ctx: BillerTarget) -> None:
    party = ctx.new_party()
    stranger = type(party.key).generate()
    start = ctx.now() - timedelta(days=1)
    version_1 = build_key_set(
        party_id=party.party_id,
        version=1,
        keys=[party.key_spec(party.key, start)],
        signer=stranger,
        create_time=start,
        expire_time=start + timedelta(days=300),
        previous=None,
    )
    account = await ctx.new_account()
    request = party.enrolment(account.account_id, account.enrolment_code, key_set=version_1)
    expect(await enrol(ctx, request), Reason.KEYSET_WRONG_SIGNER, "an enrolment whose version 1 a stranger signed")


@suite.case(
    "KEY-4/previous-digest",
    description="A next version whose previous_digest is not the current version's is PREVIOUS_DIGEST_MISMATCH",
    quote="A receiver MUST refuse a version breaking these rules with `KEYSET_INVALID`, except a wrong "
    "`previous_digest`, refused with `PREVIOUS_DIGEST_MISMATCH`.",
    needs=(FIXTURES,),
)
async def keyset_previous_digest(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    start = party.clock() - timedelta(days=1)
    version_2 = party.next_key_set(
        [party.key_spec(party.key, start)], header={"previous_digest": secrets.token_bytes(32)}
    )
    expect(await publish(ctx, version_2), Reason.PREVIOUS_DIGEST_MISMATCH, "version 2 chained to another digest")


@suite.case(
    "KEY-4/header-rules",
    description="A next version addressed to a recipient, or created at the same instant as the current one, is "
    "KEYSET_INVALID",
    quote="`recipient` empty (a key set is published to everyone); a `create_time` strictly after that of version "
    "`N − 1`",
    needs=(FIXTURES,),
)
async def keyset_header_rules(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    start = party.clock() - timedelta(days=1)
    keys = [party.key_spec(party.key, start)]
    addressed = party.next_key_set(keys, header={"recipient": ctx.biller_id})
    expect(await publish(ctx, addressed), Reason.KEYSET_INVALID, "version 2 addressed to the biller")
    current = keys_pb2.KeySet.FromString(party.key_sets[-1].payload).header.create_time.ToDatetime(tzinfo=UTC)
    same_instant = party.next_key_set(keys, create_time=current)
    expect(await publish(ctx, same_instant), Reason.KEYSET_INVALID, "version 2 created at version 1's create_time")
    accepted(await publish(ctx, party.next_key_set(keys)), "a well-formed version 2 (the refused ones changed nothing)")


@suite.case(
    "KEY-14/rotated-key",
    description="A key dropped by a later version still signs for times it was in force, and is UNKNOWN_KEY after",
    quote="The signing key MUST be listed in the version in force, else the message is refused with `UNKNOWN_KEY` "
    "(step 8 of §3.8). A key that a later version dropped (a rotation) therefore still verifies the messages it "
    "signed while it was in force",
    needs=(FIXTURES,),
)
async def rotated_key(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    old_key, new_key = party.key, type(party.key).generate()
    now = ctx.now()
    start = now - timedelta(days=1)
    version_2 = party.next_key_set([party.key_spec(new_key, start)], create_time=now - timedelta(seconds=1))
    accepted(await publish(ctx, version_2), "version 2 dropping the old key for a new one, signed by the old key")
    party.adopt(version_2, new_key)
    before = now - timedelta(minutes=5)
    await read_ok(ctx, customer, key=old_key, header={"create_time": before})
    expect(
        await list_bills(ctx, query_envelope(customer, key=old_key)),
        Reason.UNKNOWN_KEY,
        "a query signed by the dropped key, created after the rotation",
    )
    await read_ok(ctx, customer, key=new_key)


@suite.case(
    "KEY-11/revoked-key",
    description="A key revoked from a time signs nothing created at or after it (KEY_REVOKED), and earlier "
    "messages stay valid",
    quote="A key is **revoked** from its `revoke_time`: a message (key sets included) created at or after "
    "`revoke_time` and signed by that key MUST be refused with `KEY_REVOKED`, judged by the revocations of the newest "
    "version the receiver holds.",
    needs=(FIXTURES,),
)
async def revoked_key(ctx: BillerTarget) -> None:
    spare = type(ctx.new_party().key).generate()
    party = ctx.new_party(extra_keys=(spare,))
    customer = await ctx.enrolled(party)
    stolen = party.key
    now = ctx.now()
    revoke_time = now - timedelta(minutes=10)
    version_2 = party.next_key_set(
        [party.key_spec(spare, now - timedelta(days=1))],
        signer=spare,
        create_time=now - timedelta(seconds=1),
        revocations={stolen.keyid: revoke_time},
    )
    accepted(await publish(ctx, version_2), "version 2 signed by the spare key, revoking the other")
    party.adopt(version_2, spare)
    after = now - timedelta(minutes=5)
    expect(
        await list_bills(ctx, query_envelope(customer, key=stolen, header={"create_time": after})),
        Reason.KEY_REVOKED,
        "a query signed by the revoked key, created after revoke_time",
    )
    earlier = {"create_time": now - timedelta(minutes=15), "lifetime": timedelta(minutes=20)}
    await read_ok(ctx, customer, key=stolen, header=earlier)
    await read_ok(ctx, customer)


@suite.case(
    "KEY-11/revocation-moved",
    description="A version that moves a carried revocation's revoke_time, later or earlier, is KEYSET_INVALID",
    quote="Every revocation of version `N` MUST appear in every later version with the same `keyid` and the same "
    "`revoke_time` (its `reason` text may change); a version that drops a revocation or moves its `revoke_time`, "
    "later or earlier, MUST be refused with `KEYSET_INVALID`.",
    needs=(FIXTURES,),
)
async def revocation_moved(ctx: BillerTarget) -> None:
    spare = type(ctx.new_party().key).generate()
    party = ctx.new_party(extra_keys=(spare,))
    await ctx.enrolled(party)
    stolen = party.key
    now = ctx.now()
    revoke_time = now - timedelta(minutes=10)
    keys = [party.key_spec(spare, now - timedelta(days=1))]
    version_2 = party.next_key_set(
        keys, signer=spare, create_time=now - timedelta(seconds=2), revocations={stolen.keyid: revoke_time}
    )
    accepted(await publish(ctx, version_2), "version 2 signed by the spare key, revoking the other")
    party.adopt(version_2, spare)
    for moved, what in ((timedelta(minutes=5), "later"), (-timedelta(minutes=5), "earlier")):
        version_3 = party.next_key_set(keys, revocations={stolen.keyid: revoke_time + moved})
        expect(
            await publish(ctx, version_3),
            Reason.KEYSET_INVALID,
            f"version 3 moving the revocation five minutes {what}",
        )
    kept = party.next_key_set(keys, revocations={stolen.keyid: revoke_time})
    accepted(await publish(ctx, kept), "version 3 carrying the revocation unchanged")


@suite.case(
    "KEY-10/key-not-valid",
    description="A key used before its not_before is refused with KEY_NOT_VALID",
    quote="A key MUST only sign messages created inside its validity window, `not_before ≤ create_time < "
    "not_after`, as listed by the version in force; a receiver MUST refuse any other with `KEY_NOT_VALID`.",
    needs=(FIXTURES,),
)
async def key_not_valid(ctx: BillerTarget) -> None:
    party = ctx.new_party()
    later = type(party.key).generate()
    now = ctx.now()
    start = now - timedelta(days=1)
    version_1 = build_key_set(
        party_id=party.party_id,
        version=1,
        keys=[
            party.key_spec(party.key, start),
            KeySpec(later.public_key, now + timedelta(days=2), now + timedelta(days=30)),
        ],
        signer=party.key,
        create_time=start,
        expire_time=start + timedelta(days=300),
        previous=None,
    )
    party.key_sets[:] = [version_1]
    customer = await ctx.enrolled(party)
    expect(
        await list_bills(ctx, query_envelope(customer, key=later)),
        Reason.KEY_NOT_VALID,
        "a query signed by a key valid only from two days on",
    )


@suite.case(
    "KEY-10/window-end",
    description="A key signs up to its not_after exclusive: a query created a second before is read, one created "
    "exactly at it is KEY_NOT_VALID",
    quote="A key MUST only sign messages created inside its validity window, `not_before ≤ create_time < "
    "not_after`, as listed by the version in force; a receiver MUST refuse any other with `KEY_NOT_VALID`.",
    needs=(FIXTURES,),
)
async def key_window_end(ctx: BillerTarget) -> None:
    party, ending, not_after = _ending_key_party(ctx)
    customer = await ctx.enrolled(party)
    lifetime = timedelta(minutes=20)
    before = {"create_time": not_after - timedelta(seconds=1), "lifetime": lifetime}
    await read_ok(ctx, customer, key=ending, header=before)
    expect(
        await list_bills(
            ctx, query_envelope(customer, key=ending, header={"create_time": not_after, "lifetime": lifetime})
        ),
        Reason.KEY_NOT_VALID,
        "a query signed by a key, created exactly at the key's not_after",
    )


@suite.case(
    "KEY-11/revoked-at-instant",
    description="A message created exactly at its key's revoke_time is KEY_REVOKED; one a second before is read",
    quote="A key is **revoked** from its `revoke_time`: a message (key sets included) created at or after "
    "`revoke_time` and signed by that key MUST be refused with `KEY_REVOKED`",
    needs=(FIXTURES,),
)
async def revoked_at_instant(ctx: BillerTarget) -> None:
    spare = type(ctx.new_party().key).generate()
    party = ctx.new_party(extra_keys=(spare,))
    customer = await ctx.enrolled(party)
    stolen = party.key
    now = ctx.now().replace(microsecond=0)
    revoke_time = now - timedelta(minutes=10)
    version_2 = party.next_key_set(
        [party.key_spec(spare, now - timedelta(days=1))],
        signer=spare,
        create_time=now - timedelta(seconds=1),
        revocations={stolen.keyid: revoke_time},
    )
    accepted(await publish(ctx, version_2), "version 2 signed by the spare key, revoking the other")
    party.adopt(version_2, spare)
    lifetime = timedelta(minutes=20)
    before = {"create_time": revoke_time - timedelta(seconds=1), "lifetime": lifetime}
    await read_ok(ctx, customer, key=stolen, header=before)
    expect(
        await list_bills(
            ctx, query_envelope(customer, key=stolen, header={"create_time": revoke_time, "lifetime": lifetime})
        ),
        Reason.KEY_REVOKED,
        "a query signed by the revoked key, created exactly at revoke_time",
    )


@suite.case(
    "KEY-7/malformed-key-set",
    description="A next version with no key, 17 keys, a key listed twice or an empty window is KEYSET_INVALID, "
    "without effect",
    quote="A key set MUST be well formed, else it is refused with `KEYSET_INVALID`: 1 to 16 keys; […] no two keys "
    "with the same keyid; `not_before` and `not_after` set, valid timestamps in whole microseconds […] and "
    "`not_before < not_after`",
    needs=(FIXTURES,),
)
async def malformed_key_set(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    party = customer.party
    start = party.clock() - timedelta(days=1)
    own = party.key_spec(party.key, start)
    others = [party.key_spec(type(party.key).generate(), start) for _ in range(16)]
    variants = {
        "no key at all": [],
        "17 keys, one above the limit of 16": [own, *others],
        "the signing key listed twice": [own, own],
        "a key whose not_before equals its not_after": [own, KeySpec(others[0].key, start, start)],
    }
    for what, keys in variants.items():
        expect(await publish(ctx, party.next_key_set(keys)), Reason.KEYSET_INVALID, f"a version 2 with {what}")
    sixteen = party.next_key_set([own, *others[:15]])  # exactly the limit; version 2 is still free
    answer = accepted(await publish(ctx, sixteen), "a version 2 with 16 keys (the refused ones changed nothing)")
    if answer.version != 2:
        raise Violation(f"PublishKeySet of version 2 with 16 keys answered version {answer.version}")
    party.adopt(sixteen)
    await read_ok(ctx, customer)
    return f"{len(variants)} malformed versions refused; one of exactly 16 keys accepted"


@suite.case(
    "KEY-22/first-version-number",
    description="An enrolment whose key set starts at version 0 is KEYSET_ROLLBACK, at version 2 "
    "KEYSET_VERSION_SKIPPED; neither spends the code",
    quote="A receiver that holds nothing yet for a party (verifying a chain from its start: at enrolment, on a first "
    "`GetKeySets`, in a bundle) MUST judge the first version it reads as if it held a version 0: a first version "
    "numbered 0 is refused with `KEYSET_ROLLBACK`, and one numbered 2 or more with `KEYSET_VERSION_SKIPPED`",
    needs=(FIXTURES,),
)
async def first_version_number(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    party = ctx.new_party()
    start = ctx.now() - timedelta(days=1)
    for number, reason in ((0, Reason.KEYSET_ROLLBACK), (2, Reason.KEYSET_VERSION_SKIPPED)):
        first = build_key_set(
            party_id=party.party_id,
            version=number,
            keys=[party.key_spec(party.key, start)],
            signer=party.key,
            create_time=start,
            expire_time=start + timedelta(days=90),
            previous=None,
            header={"sequence": max(number - 1, 0)},  # a header sequence cannot be -1: version 0 keeps 0
        )
        request = party.enrolment(account.account_id, account.enrolment_code, key_set=first)
        expect(await enrol(ctx, request), reason, f"an enrolment carrying a key set numbered {number}")
    accepted(await enrol(ctx, party.enrolment(account.account_id, account.enrolment_code)), "the same code, version 1")


@suite.case(
    "KEY-23/version-from-the-future",
    description="A published version created beyond the clock skew in the future is MESSAGE_NOT_YET_VALID, without "
    "effect",
    quote="A receiver that extends a chain it holds with a new version at a time `now` (`PublishKeySet`, a refresh) "
    "MUST refuse a version whose `create_time` is later than `now + max_clock_skew` with `MESSAGE_NOT_YET_VALID`",
    needs=(FIXTURES,),
)
async def version_from_the_future(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party = customer.party
    start = ctx.now() - timedelta(days=1)
    ahead = party.next_key_set(
        [party.key_spec(party.key, start)], create_time=ctx.now() + ctx.skew + timedelta(hours=1)
    )
    expect(await publish(ctx, ahead), Reason.MESSAGE_NOT_YET_VALID, "a version 2 created an hour beyond the skew")
    now = party.next_key_set([party.key_spec(party.key, start)])
    accepted(await publish(ctx, now), "a version 2 created now (the refused one changed nothing)")
    party.adopt(now)
    await read_ok(ctx, customer)


@suite.case(
    "KEY-15/signer-usable",
    description="A version signed by a key past its not_after is KEY_NOT_VALID, one revoking its own signer "
    "KEY_REVOKED; neither takes effect",
    quote="The key that signs a version MUST be usable at that version's `create_time`: inside its validity window "
    "as listed by the signing version (KEY-10), else `KEY_NOT_VALID`, and not revoked at or before that time by the "
    "revocations of the version being verified (KEY-11), else `KEY_REVOKED`.",
    needs=(FIXTURES,),
)
async def signer_usable(ctx: BillerTarget) -> None:
    party, ended, _ = _ending_key_party(ctx)
    customer = await ctx.enrolled(party)
    spare, start = party.key, ctx.now() - timedelta(days=1)
    expect(
        await publish(ctx, party.next_key_set([party.key_spec(spare, start)], signer=ended)),
        Reason.KEY_NOT_VALID,
        "version 2 signed by a key whose window, as version 1 lists it, ended two minutes before",
    )
    successor = type(spare).generate()
    self_revoking = party.next_key_set(
        [party.key_spec(successor, start)], revocations={spare.keyid: ctx.now() - timedelta(minutes=1)}
    )
    expect(
        await publish(ctx, self_revoking),
        Reason.KEY_REVOKED,
        "version 2 revoking, a minute before its create_time, the very key that signs it",
    )
    version_2 = party.next_key_set([party.key_spec(spare, start)])
    answer = accepted(
        await publish(ctx, version_2), "version 2 signed by the spare key (the refused ones changed nothing)"
    )
    if answer.version != 2:
        raise Violation(f"PublishKeySet of version 2 answered version {answer.version}")
    party.adopt(version_2)
    await read_ok(ctx, customer)


@suite.case(
    "KEY-5/check-order",
    description="A version breaking two checks of KEY-5 at once is refused with the reason of the earlier one, for "
    "four pairs of checks",
    quote="A verifier MUST verify a chain version by version, version 1 first, and each version with the checks "
    "below in this order, refusing with the reason of the first that fails",
    needs=(FIXTURES,),
)
async def check_order(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    party = customer.party
    start = ctx.now() - timedelta(days=1)
    keys = [party.key_spec(party.key, start)]
    elsewhere = {"previous_digest": secrets.token_bytes(32)}
    revoking_its_signer = {party.key.keyid: ctx.now() - timedelta(minutes=1)}
    pairs = (  # (the version, what it breaks, the reason of the earlier check)
        (flip_signature(party.next_key_set(keys, version=3)), "4 (signature) and 6 (version 3 after 1)",
         Reason.BAD_SIGNATURE),
        (party.next_key_set([], version=3), "6 (version 3 after 1) and 7 (no key)", Reason.KEYSET_VERSION_SKIPPED),
        (party.next_key_set([], header=elsewhere), "7 (no key) and 10 (previous_digest)", Reason.KEYSET_INVALID),
        (party.next_key_set(keys, header=elsewhere, revocations=revoking_its_signer),
         "10 (previous_digest) and 12 (a signer it revokes)", Reason.PREVIOUS_DIGEST_MISMATCH),
    )  # fmt: skip
    for version, breaks, reason in pairs:
        expect(await publish(ctx, version), reason, f"a version breaking checks {breaks}")
    version_2 = party.next_key_set(keys)
    accepted(await publish(ctx, version_2), "a well-formed version 2 (the refused ones changed nothing)")
    party.adopt(version_2)
    await read_ok(ctx, customer)
    return f"{len(pairs)} versions each breaking two checks refused with the earlier check's reason"
