"""Hello, limits and the biller's key sets (§15, §14, §4.6)."""

from __future__ import annotations

import hashlib
import secrets

from agent.conformance.biller.target import (
    FIXTURES,
    BillerTarget,
    accepted,
    digest_of,
    expect,
    hello_request,
    list_bills,
    sized_query,
    vector,
)
from agent.conformance.client import Refusal
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import ProtocolError, Reason
from agent.protocol.limits import DEFAULT_LIMITS, PROTOCOL_VERSION
from parley.v1 import (
    biller_service_pb2,
    envelope_pb2,
    keys_pb2,
)

suite: Suite[BillerTarget] = Suite("biller/hello")


@suite.case(
    "VER-2/hello",
    description="Hello answers the highest common version, the biller's identity, features and limits",
    quote="the biller MUST answer with the highest version both speak in `protocol_version`, every version it "
    "speaks in `supported_versions`, its `biller_party_id`, its `identity_fingerprint` (the digest of its key set "
    "version 1, KEY-12), its `features` and its `limits` (LIM-10)",
    covers=("TRN-1",),
)
async def hello_answer(ctx: BillerTarget) -> str:
    answer = accepted(await ctx.conn.call("Hello", hello_request(PROTOCOL_VERSION, 7, 99)), "Hello([1, 7, 99])")
    if answer.protocol_version != PROTOCOL_VERSION:
        raise Violation(f"Hello([1, 7, 99]) chose version {answer.protocol_version}; 1 is the only common one")
    if PROTOCOL_VERSION not in answer.supported_versions:
        raise Violation(f"supported_versions {list(answer.supported_versions)} lacks the version it chose")
    if not answer.biller_party_id or len(answer.biller_party_id) > 128:
        raise Violation(f"biller_party_id {answer.biller_party_id!r} is not a party id (HDR-13)")
    if not ctx.key_sets or answer.identity_fingerprint != digest_of(ctx.key_sets[0]):
        raise Violation("identity_fingerprint is not the digest of key set version 1 served by GetKeySets (KEY-12)")
    if not answer.HasField("limits"):
        raise Violation("Hello carries no limits (LIM-10)")
    return f"{answer.biller_party_id}, features {sorted(answer.features)}"


@suite.case(
    "VER-2/no-common-version",
    description="Hello with no version in common fails with UNSUPPORTED_VERSION",
    quote="or, when no version is common, fail with `UNSUPPORTED_VERSION`",
)
async def hello_no_common_version(ctx: BillerTarget) -> None:
    expect(await ctx.conn.call("Hello", hello_request(99)), Reason.UNSUPPORTED_VERSION, "Hello([99])")
    expect(await ctx.conn.call("Hello", hello_request()), Reason.UNSUPPORTED_VERSION, "Hello([])")


@suite.case(
    "LIM-11/limits-within-defaults",
    description="The limits announced in Hello are set and none that may not be raised is above its default",
    quote="A biller MAY lower any limit below its default […] but MUST NOT raise `max_envelope_bytes`, "
    "`max_clock_skew`, `max_message_lifetime`, `max_rounds`, `max_negotiation_time`, `max_instalments` or "
    "`enrolment_max_attempts` above their defaults",
)
async def limits_within_defaults(ctx: BillerTarget) -> str:
    limits, defaults = ctx.limits, DEFAULT_LIMITS
    ceilings = {
        "max_envelope_bytes": defaults.max_envelope_bytes,
        "max_clock_skew_seconds": int(defaults.max_clock_skew.total_seconds()),
        "max_message_lifetime_seconds": int(defaults.max_message_lifetime.total_seconds()),
        "max_rounds": defaults.max_rounds,
        "max_negotiation_seconds": int(defaults.max_negotiation_time.total_seconds()),
        "max_instalments": defaults.max_instalments,
        "enrolment_max_attempts": defaults.enrolment_max_attempts,
    }
    problems = [
        f"{name} = {getattr(limits, name)} > {ceiling}"
        for name, ceiling in ceilings.items()
        if getattr(limits, name) > ceiling
    ]
    unset = [f.name for f in biller_service_pb2.Limits.DESCRIPTOR.fields if not getattr(limits, f.name)]
    if unset:
        problems.append(f"not announced (0): {', '.join(unset)}")
    if problems:
        raise Violation("; ".join(problems))
    return ", ".join(f"{f.name}={getattr(limits, f.name)}" for f in biller_service_pb2.Limits.DESCRIPTOR.fields)


@suite.case(
    "KEY-20/get-key-sets",
    description="GetKeySets serves the biller's own chain above after_version, and NOT_FOUND for unknown parties",
    quote="A biller MUST answer `GetKeySets` with its own chain when `party_id` is empty or its own party id, giving "
    "the versions above `after_version` in increasing order (an empty list when there are none); […] and MUST "
    "answer `NOT_FOUND` for any party id it does not serve.",
)
async def get_key_sets(ctx: BillerTarget) -> str:
    chain = ctx.biller_chain()
    try:
        chain.check_fresh(ctx.now())
    except ProtocolError as error:
        raise Violation(f"the biller's newest key set version has expired (KEY-13): {error.detail}") from error
    by_id = accepted(
        await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(party_id=ctx.biller_id)),
        "GetKeySets(party_id = the biller)",
    )
    if [e.SerializeToString() for e in by_id.key_sets] != [e.SerializeToString() for e in ctx.key_sets]:
        raise Violation("GetKeySets(party_id = the biller) differs from GetKeySets(party_id = '')")
    newest = chain.latest.version
    above = accepted(
        await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(after_version=newest)),
        f"GetKeySets(after_version = {newest})",
    )
    if list(above.key_sets):
        raise Violation(f"GetKeySets(after_version = {newest}, the newest) returned {len(above.key_sets)} versions")
    if newest > 1:
        tail = accepted(
            await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(after_version=1)),
            "GetKeySets(after_version = 1)",
        )
        if [e.SerializeToString() for e in tail.key_sets] != [e.SerializeToString() for e in ctx.key_sets[1:]]:
            raise Violation("GetKeySets(after_version = 1) is not versions 2.. of the chain")
    stranger = f"consumer:cf-unknown-{secrets.token_hex(6)}"
    expect(
        await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(party_id=stranger)),
        Reason.NOT_FOUND,
        "GetKeySets for a party the biller does not know",
    )
    return f"chain of {newest} version(s), pinned by Hello's fingerprint"


@suite.case(
    "KEY-2/keyids",
    description="Every key of the biller's chain is named by hex(SHA-256(public_key)[0:16]), 32 lowercase characters",
    quote="The **keyid** of a public key MUST be the lowercase hex encoding of the first 16 bytes of SHA-256 of its "
    "raw 32 bytes: 32 characters, `hex(SHA-256(public_key)[0:16])`.",
)
async def keyids(ctx: BillerTarget) -> str:
    named = 0
    for envelope in ctx.key_sets:
        key_set = keys_pb2.KeySet.FromString(envelope.payload)
        for key in key_set.keys:
            expected = hashlib.sha256(key.public_key).digest()[:16].hex()
            if key.keyid != expected:
                raise Violation(
                    f"key set version {key_set.version} names a key {key.keyid!r}; "
                    f"hex(SHA-256(public_key)[0:16]) is {expected!r}"
                )
            named += 1
        for signature in envelope.signatures:
            if len(signature.keyid) != 32 or signature.keyid != signature.keyid.lower():
                raise Violation(
                    f"version {key_set.version} is signed under keyid {signature.keyid!r}, not 32 "
                    "lowercase hex characters"
                )
    return f"{named} key(s) in {len(ctx.key_sets)} version(s)"


@suite.case(
    "CNF-3/feature-matches-service",
    description="The conformance-control feature is announced exactly when the service answers",
    quote='A biller MUST announce the feature `"conformance-control"` in `Hello` exactly when it exposes the service.',
    covers=("CNF-4",),
)
async def conformance_feature(ctx: BillerTarget) -> str:
    answer = await ctx.conn.create_test_account("Parley conformance (CNF-3)")
    served = not (isinstance(answer, Refusal) and answer.code.name == "UNIMPLEMENTED")
    if served != ctx.fixtures:
        said = "announces" if ctx.fixtures else "does not announce"
        did = "serves" if served else "does not serve"
        raise Violation(f"Hello {said} conformance-control, but the biller {did} ConformanceControlService")
    return "announced and served" if served else "neither announced nor served"


@suite.case(
    "TRN-8/receive-limit",
    description="A request far above max_envelope_bytes + 1024 is refused with RESOURCE_EXHAUSTED",
    quote="A biller MUST set its gRPC maximum receive message size to `max_envelope_bytes + 1024` bytes (LIM-1) […] "
    "and MUST refuse an envelope larger than `max_envelope_bytes` with `ENVELOPE_TOO_LARGE`",
)
async def receive_limit(ctx: BillerTarget) -> None:
    huge = envelope_pb2.Envelope(payload=b"\0" * (1 << 20), payload_type="parley.v1.AccountQuery")
    huge.signatures.add(keyid="0" * 32, sig=b"\0" * 64)
    answer = await list_bills(ctx, huge)
    if not isinstance(answer, Refusal) or answer.code.name != "RESOURCE_EXHAUSTED":
        got = answer.describe() if isinstance(answer, Refusal) else "an answer"
        raise Violation(f"a 1 MiB request got {got}, not RESOURCE_EXHAUSTED")


@suite.case(
    "LIM-1/envelope-too-large",
    description="Vector envelope-too-large, delivered as generated, is refused with ENVELOPE_TOO_LARGE",
    quote="A receiver MUST refuse an envelope whose serialized size […] exceeds `max_envelope_bytes`, with "
    "`ENVELOPE_TOO_LARGE`, before verifying anything",
)
async def envelope_too_large_vector(ctx: BillerTarget) -> None:
    expect(await list_bills(ctx, vector("envelope-too-large")), Reason.ENVELOPE_TOO_LARGE, "vector envelope-too-large")


@suite.case(
    "LIM-1/size-boundary",
    description="An envelope of exactly max_envelope_bytes is judged; one byte more is ENVELOPE_TOO_LARGE",
    quote="A receiver MUST refuse an envelope whose serialized size […] exceeds `max_envelope_bytes`, with "
    "`ENVELOPE_TOO_LARGE`, before verifying anything; a gRPC service sets its receive-message limit to "
    "`max_envelope_bytes + 1024`",
    needs=(FIXTURES,),
    covers=("LIM-10",),
)
async def size_boundary(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    limit = ctx.limits.max_envelope_bytes or DEFAULT_LIMITS.max_envelope_bytes
    at_limit = await list_bills(ctx, sized_query(customer, limit))
    if isinstance(at_limit, Refusal) and (at_limit.reason == Reason.ENVELOPE_TOO_LARGE.name or not at_limit.infos):
        raise Violation(f"an envelope of exactly max_envelope_bytes ({limit}) was refused: {at_limit.describe()}")
    expect(
        await list_bills(ctx, sized_query(customer, limit + 1)),
        Reason.ENVELOPE_TOO_LARGE,
        f"a {limit + 1}-byte envelope",
    )
    got = at_limit.describe() if isinstance(at_limit, Refusal) else "an answer"
    return f"{limit} bytes: judged ({got})"
