"""Enrolment (§6.1, §6.2)."""

from __future__ import annotations

import secrets
from typing import Any

from agent.conformance.biller.target import (
    FIXTURES,
    BillerTarget,
    Customer,
    accepted,
    digest_of,
    enrol,
    expect,
    read_ok,
)
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import ProtocolError, Reason
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import DEFAULT_LIMITS
from parley.v1 import enrolment_pb2

suite: Suite[BillerTarget] = Suite("biller/enrolment")


def _other_code(code: str) -> str:
    """A well-formed enrolment code other than `code`."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    while True:
        candidate = "".join(secrets.choice(alphabet) for _ in range(12))
        text = "-".join(candidate[i : i + 4] for i in range(0, 12, 4))
        if text != code:
            return text


@suite.case(
    "ENR-9/confirmation",
    description="Enrol answers a signed confirmation at sequence 1 of the request's thread, and the biller's chain",
    quote="The biller MUST answer a successful request with an `EnrolmentConfirmation` at sequence 1 of the request's "
    "thread (same `thread_id`, `previous_digest` = the request's digest, `sender` = the biller, `recipient` = the "
    "consumer) naming the `account_id` and the `consumer_party_id` now bound, and with `biller_key_sets`, its whole "
    "key set chain, version 1 first.",
    needs=(FIXTURES,),
)
async def enrolment_confirmation(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    party = ctx.new_party()
    request = party.enrolment(account.account_id, account.enrolment_code)
    answer = accepted(await enrol(ctx, request), "Enrol with the account's code")
    if not answer.biller_key_sets or digest_of(answer.biller_key_sets[0]) != ctx.hello.identity_fingerprint:
        raise Violation("biller_key_sets does not start at the identity fingerprint announced in Hello")
    try:
        KeyChain.verify(list(answer.biller_key_sets), pin=ctx.hello.identity_fingerprint, now=ctx.now())
    except ProtocolError as error:
        raise Violation(f"biller_key_sets does not verify as a chain: {error.reason.name}: {error.detail}") from error
    customer = Customer(party, account.account_id)
    types = (enrolment_pb2.EnrolmentConfirmation,)
    confirmation = ctx.verify(answer.confirmation, types, customer, live=True, what="the confirmation")
    message: Any = confirmation.message
    sent = enrolment_pb2.EnrolmentRequest.FromString(request.payload).header
    header = confirmation.header
    problems = [
        "thread_id differs from the request's" if header.thread_id != sent.thread_id else "",
        f"sequence is {header.sequence}, not 1" if header.sequence != 1 else "",
        "previous_digest is not the request's digest" if header.previous_digest != digest_of(request) else "",
        f"account_id is {message.account_id!r}" if message.account_id != account.account_id else "",
        f"consumer_party_id is {message.consumer_party_id!r}" if message.consumer_party_id != party.party_id else "",
    ]
    if any(problems):
        raise Violation("the confirmation: " + "; ".join(p for p in problems if p))
    await read_ok(ctx, customer)


@suite.case(
    "ENR-2/code-single-use",
    description="A spent code enrols no one else (ENROLMENT_CODE_USED); a retry of the request that spent it is "
    "answered with the original confirmation",
    quote="A code MUST enrol at most once: a later request presenting a spent code is refused with "
    "`ENROLMENT_CODE_USED` — except a retry of the very request that spent it, which receives the original "
    "confirmation (HDR-12).",
    needs=(FIXTURES,),
)
async def code_single_use(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    first = ctx.new_party()
    request = first.enrolment(account.account_id, account.enrolment_code)
    original = accepted(await enrol(ctx, request), "the first Enrol with the code")
    retried = accepted(await enrol(ctx, request), "the very same Enrol request, sent again")
    if retried.confirmation.SerializeToString() != original.confirmation.SerializeToString():
        raise Violation("the retried Enrol was answered with another confirmation than the original")
    second = ctx.new_party()
    expect(
        await enrol(ctx, second.enrolment(account.account_id, account.enrolment_code)),
        Reason.ENROLMENT_CODE_USED,
        "another party presenting the spent code",
    )
    again = first.enrolment(account.account_id, account.enrolment_code)
    expect(await enrol(ctx, again), Reason.ENROLMENT_CODE_USED, "a new request by the first party with the spent code")
    await read_ok(ctx, Customer(first, account.account_id))


@suite.case(
    "ENR-3/wrong-code",
    description="A wrong code, or an account that does not exist, is refused with ENROLMENT_CODE_INVALID",
    quote="The biller MUST compare the hash of the received code with the stored hash in constant time, and MUST "
    "refuse a mismatch with `ENROLMENT_CODE_INVALID` […] A request naming an account that does not exist […] MUST "
    "be refused the same way",
    needs=(FIXTURES,),
)
async def wrong_code(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    party = ctx.new_party()
    wrong = party.enrolment(account.account_id, _other_code(account.enrolment_code))
    expect(await enrol(ctx, wrong), Reason.ENROLMENT_CODE_INVALID, "Enrol with a wrong code")
    nowhere = party.enrolment(f"cf-no-such-account-{secrets.token_hex(4)}", account.enrolment_code)
    expect(await enrol(ctx, nowhere), Reason.ENROLMENT_CODE_INVALID, "Enrol on an account that does not exist")
    accepted(await enrol(ctx, party.enrolment(account.account_id, account.enrolment_code)), "Enrol with the right code")


@suite.case(
    "ENR-5/lock-after-attempts",
    description="After enrolment_max_attempts wrong codes, even the right code is refused with ENROLMENT_LOCKED",
    quote="After `enrolment_max_attempts` (default 5) wrong codes for one account, the biller MUST lock enrolment on "
    "that account: every later `Enrol` on it is refused with `ENROLMENT_LOCKED` without comparing the code, the right "
    "code included",
    needs=(FIXTURES,),
    covers=("LIM-9",),
)
async def lock_after_attempts(ctx: BillerTarget) -> str:
    account = await ctx.new_account()
    party = ctx.new_party()
    attempts = ctx.limits.enrolment_max_attempts or DEFAULT_LIMITS.enrolment_max_attempts
    for attempt in range(1, attempts + 1):
        wrong = party.enrolment(account.account_id, _other_code(account.enrolment_code))
        expect(await enrol(ctx, wrong), Reason.ENROLMENT_CODE_INVALID, f"wrong code {attempt} of {attempts}")
    right = party.enrolment(account.account_id, account.enrolment_code)
    expect(await enrol(ctx, right), Reason.ENROLMENT_LOCKED, f"the right code after {attempts} wrong ones")
    return f"locked after {attempts} wrong codes"


@suite.case(
    "ENR-6/party-id-taken",
    description="A key set claiming an enrolled party's id, or the biller's, is refused with PARTY_ID_TAKEN; the "
    "code is not spent",
    quote="The biller MUST refuse, with `PARTY_ID_TAKEN`, a request whose key set claims a party id that is already "
    "bound to a chain with a different fingerprint, or that is the biller's own; a refused request does not spend "
    "the code.",
    needs=(FIXTURES,),
)
async def party_id_taken(ctx: BillerTarget) -> None:
    first = await ctx.enrolled()
    account = await ctx.new_account()
    impostor = ctx.new_party(party_id=first.party_id)
    expect(
        await enrol(ctx, impostor.enrolment(account.account_id, account.enrolment_code)),
        Reason.PARTY_ID_TAKEN,
        "another chain claiming an enrolled party's id",
    )
    biller = ctx.new_party(party_id=ctx.biller_id)
    expect(
        await enrol(ctx, biller.enrolment(account.account_id, account.enrolment_code)),
        Reason.PARTY_ID_TAKEN,
        "a consumer chain claiming the biller's own party id",
    )
    honest = ctx.new_party()
    accepted(
        await enrol(ctx, honest.enrolment(account.account_id, account.enrolment_code)),
        "Enrol with the code the refused requests presented (it must not be spent)",
    )


@suite.case(
    "KEY-21/keyid-of-another-party",
    description="An enrolment key set listing another party's keyid is refused with KEYSET_INVALID",
    quote="A biller MUST refuse, with `KEYSET_INVALID`, a key set (carried in an enrolment or published) that lists "
    "a keyid already listed by the chain of another party it knows",
    needs=(FIXTURES,),
)
async def keyid_of_another_party(ctx: BillerTarget) -> None:
    first = await ctx.enrolled()
    account = await ctx.new_account()
    borrower = ctx.new_party(extra_keys=(first.party.key,))
    expect(
        await enrol(ctx, borrower.enrolment(account.account_id, account.enrolment_code)),
        Reason.KEYSET_INVALID,
        "a key set listing an enrolled party's key",
    )


@suite.case(
    "HDR-13/party-id-form",
    description="A party id with a character outside the alphabet, or of 129 characters, is KEYSET_INVALID at "
    "enrolment; 128 enrols",
    quote="A party id MUST be 1 to 128 characters, each one of `A–Z`, `a–z`, `0–9`, `.`, `_`, `:` and `-`.",
    needs=(FIXTURES,),
)
async def party_id_form(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    stem = f"consumer:cf-{secrets.token_hex(4)}"
    for what, party_id in (
        ("a space", f"{stem} x"),
        ("a slash", f"{stem}/x"),
        ("an accented letter", f"{stem}é"),
        ("129 characters", stem + "x" * (129 - len(stem))),
    ):
        party = ctx.new_party(party_id=party_id)
        request = party.enrolment(account.account_id, account.enrolment_code)
        expect(await enrol(ctx, request), Reason.KEYSET_INVALID, f"a key set whose party id has {what}")
    longest = ctx.new_party(party_id=stem + "x" * (128 - len(stem)))
    accepted(
        await enrol(ctx, longest.enrolment(account.account_id, account.enrolment_code)),
        "a party id of exactly 128 characters, with the code the refused requests did not spend",
    )


@suite.case(
    "ENR-1/check-order",
    description="Enrol requests breaking two checks at once get the reason of the first in ENR-1's order",
    quote="A biller MUST process `Enrol` in this order: (1) envelope size, form and payloadType (§3.8 steps 1–2); "
    "(2) parse the payload strictly (`MALFORMED_PAYLOAD`, `UNKNOWN_FIELD`) only to take `consumer_key_set`, which "
    "must be set (`KEYSET_INVALID`)",
    needs=(FIXTURES,),
)
async def enrol_check_order(ctx: BillerTarget) -> str:
    holder = await ctx.enrolled()  # a party id already taken, for step 8
    account = await ctx.new_account()
    wrong = "0000-0000-0000" if account.enrolment_code != "0000-0000-0000" else "1111-1111-1111"
    party = ctx.new_party()
    no_key_set = enrolment_pb2.EnrolmentRequest.FromString(party.enrolment(account.account_id, wrong).payload)
    no_key_set.ClearField("consumer_key_set")
    stranger = SigningKey.generate()
    pairs: list[tuple[str, Any, Reason]] = [
        ("no key set and a wrong code (step 2 before 7)", party.sign(no_key_set), Reason.KEYSET_INVALID),
        ("signed by a key its key set does not list, with a wrong code (step 5 before 7)",
         party.enrolment(account.account_id, wrong, key=stranger), Reason.UNKNOWN_KEY),
        ("addressed to another biller, with a wrong code (step 5 before 7)",
         party.enrolment(account.account_id, wrong, header={"recipient": f"{ctx.biller_id}.elsewhere"}),
         Reason.WRONG_RECIPIENT),
        ("a wrong code under a party id already taken (step 7 before 8)",
         ctx.new_party(party_id=holder.party_id).enrolment(account.account_id, wrong), Reason.ENROLMENT_CODE_INVALID),
    ]  # fmt: skip
    for what, request, reason in pairs:
        expect(await enrol(ctx, request), reason, what)
    accepted(await enrol(ctx, party.enrolment(account.account_id, account.enrolment_code)), "the right code, then")
    return f"{len(pairs)} pairs of defects"
