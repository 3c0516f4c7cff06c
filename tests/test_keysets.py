"""Key set versions and chains (PROTOCOL.md §4, KEY-*)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.message import Message

from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain, KeyEntry, keyset_thread_id, make_key_set
from agent.protocol.limits import Limits
from agent.protocol.messages import seal, to_timestamp
from parley.v1 import envelope_pb2, keys_pb2

PARTY = "biller.example"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
YEAR = timedelta(days=365)
K1, K2, K3 = (SigningKey.from_seed(bytes([n]) * 32) for n in (1, 2, 3))


def entry(key: SigningKey, not_before: datetime = T0 - DAY, not_after: datetime = T0 + 2 * YEAR) -> KeyEntry:
    return KeyEntry(key.public_key, not_before, not_after)


def first(keys: Sequence[KeyEntry] = (entry(K1),), signer: SigningKey = K1) -> envelope_pb2.Envelope:
    return make_key_set(
        party_id=PARTY, version=1, keys=keys, signer=signer, previous=None, create_time=T0, expire_time=T0 + YEAR
    )


def rotate(
    chain: KeyChain,
    keys: Sequence[KeyEntry],
    signer: SigningKey,
    at: datetime,
    *,
    revocations: Mapping[str, datetime] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> envelope_pb2.Envelope:
    return make_key_set(
        party_id=chain.party_id,
        version=chain.latest.version + 1,
        keys=keys,
        signer=signer,
        previous=chain.latest,
        create_time=at,
        expire_time=at + YEAR,
        revocations=revocations or {},
        revocation_reasons=reasons or {},
    )


def tampered(
    envelope: envelope_pb2.Envelope, signer: SigningKey, change: Callable[[keys_pb2.KeySet], object] | None = None
) -> envelope_pb2.Envelope:
    """`envelope`'s key set, changed by `change`, signed by `signer`: bypasses make_key_set's checks."""
    keyset = keys_pb2.KeySet.FromString(envelope.payload)
    if change is not None:
        change(keyset)
    return seal(keyset, signer)


def refusal(action: Callable[[], object]) -> Reason:
    with pytest.raises(RemoteProtocolError) as caught:
        action()
    return caught.value.reason


V1 = first()
CHAIN = KeyChain.verify([V1])
V2 = rotate(CHAIN, [entry(K2)], K1, T0 + 10 * DAY)  # K1 rotated out for K2


def test_thread_id_is_derived_from_the_party_id() -> None:
    assert keyset_thread_id(PARTY) == hashlib.sha256(b"parley/v1/keyset/biller.example").digest()[:16]


def test_version_1_self_signed() -> None:
    assert CHAIN.party_id == PARTY
    assert CHAIN.fingerprint == digest(V1) == CHAIN.latest.digest
    assert CHAIN.envelopes == (V1,)
    version = CHAIN.latest
    assert (version.version, version.create_time, version.expire_time) == (1, T0, T0 + YEAR)
    assert version.keys == (entry(K1),)
    assert CHAIN.candidate_keys(K1.keyid) == (K1.public_key,)
    assert CHAIN.candidate_keys(K2.keyid) == ()


def test_pin() -> None:
    assert KeyChain.verify([V1], pin=digest(V1)) == CHAIN
    other = make_key_set(
        party_id=PARTY, version=1, keys=[entry(K2)], signer=K2, previous=None, create_time=T0, expire_time=T0 + YEAR
    )
    assert refusal(lambda: KeyChain.verify([other], pin=digest(V1))) is Reason.PIN_MISMATCH


def test_pin_is_checked_before_anything_is_parsed() -> None:
    garbage = envelope_pb2.Envelope(payload=b"\xff", payload_type="parley.v1.KeySet")
    assert refusal(lambda: KeyChain.verify([garbage], pin=digest(V1))) is Reason.PIN_MISMATCH


def test_empty_chain() -> None:
    assert refusal(lambda: KeyChain.verify([])) is Reason.KEYSET_INVALID


def test_version_1_signed_by_a_key_it_does_not_hold() -> None:
    assert refusal(lambda: KeyChain.verify([tampered(V1, K2)])) is Reason.KEYSET_WRONG_SIGNER
    with pytest.raises(LocalProtocolError) as caught:
        first(signer=K2)
    assert caught.value.reason is Reason.KEYSET_WRONG_SIGNER


def test_version_1_bad_signature() -> None:
    forged = tampered(V1, K1, _key(not_after=T0 + 3 * YEAR))
    forged.signatures[0].sig = V1.signatures[0].sig
    assert refusal(lambda: KeyChain.verify([forged])) is Reason.BAD_SIGNATURE


def test_version_1_parse_is_strict() -> None:
    keyset = keys_pb2.KeySet.FromString(V1.payload)
    unknown = envelope_pb2.Envelope(
        payload=keyset.SerializeToString() + b"\xf8\x06\x01", payload_type="parley.v1.KeySet"
    )  # field 111, varint 1
    unknown.signatures.add(keyid=K1.keyid, sig=b"\0" * 64)
    assert refusal(lambda: KeyChain.verify([unknown])) is Reason.UNKNOWN_FIELD
    unknown.payload = b"\xff"
    assert refusal(lambda: KeyChain.verify([unknown])) is Reason.MALFORMED_PAYLOAD


def test_envelope_form_and_payload_type() -> None:
    assert refusal(lambda: KeyChain.verify([V1], limits=Limits(max_envelope_bytes=100))) is Reason.ENVELOPE_TOO_LARGE
    offer = envelope_pb2.Envelope()
    offer.CopyFrom(V1)
    offer.payload_type = "parley.v1.Offer"
    assert refusal(lambda: KeyChain.verify([offer])) is Reason.WRONG_PAYLOAD_TYPE


def test_rotation_signed_by_the_previous_version() -> None:
    chain = CHAIN.extend(V2)
    assert KeyChain.verify([V1, V2], pin=CHAIN.fingerprint) == chain
    assert chain.fingerprint == CHAIN.fingerprint
    assert [v.version for v in chain.versions] == [1, 2]
    assert chain.latest.keys == (entry(K2),)
    assert chain.envelopes == (V1, V2)
    assert CHAIN.versions == (CHAIN.latest,)  # chains are immutable
    assert chain.candidate_keys(K1.keyid) == (K1.public_key,)  # old messages stay verifiable


def test_next_version_signed_by_a_key_only_in_itself() -> None:
    assert refusal(lambda: CHAIN.extend(tampered(V2, K2))) is Reason.KEYSET_WRONG_SIGNER
    with pytest.raises(LocalProtocolError) as caught:
        rotate(CHAIN, [entry(K2)], K2, T0 + DAY)
    assert caught.value.reason is Reason.KEYSET_WRONG_SIGNER


def test_next_version_is_verified_before_it_is_parsed() -> None:
    forged = envelope_pb2.Envelope()
    forged.CopyFrom(V2)
    forged.payload = b"\xff"  # would be MALFORMED_PAYLOAD if parsed
    assert refusal(lambda: CHAIN.extend(forged)) is Reason.BAD_SIGNATURE


def test_skipped_version_is_reported_before_content_errors() -> None:
    assert refusal(lambda: CHAIN.extend(tampered(V2, K1, lambda k: setattr(k, "version", 3)))) is (
        Reason.KEYSET_VERSION_SKIPPED
    )

    def skip_and_empty(keyset: keys_pb2.KeySet) -> None:
        keyset.version = 3
        del keyset.keys[:]

    assert refusal(lambda: CHAIN.extend(tampered(V2, K1, skip_and_empty))) is Reason.KEYSET_VERSION_SKIPPED
    assert refusal(lambda: KeyChain.verify([tampered(V2, K2)])) is Reason.KEYSET_VERSION_SKIPPED


def _set(message: Message, fields: Mapping[str, object]) -> None:
    for name, value in fields.items():
        if value is None:
            message.ClearField(name)
        elif isinstance(value, datetime):
            getattr(message, name).CopyFrom(to_timestamp(value))
        else:
            setattr(message, name, value)


def _header(**fields: object) -> Callable[[keys_pb2.KeySet], None]:
    return lambda keyset: _set(keyset.header, fields)


def _key(**fields: object) -> Callable[[keys_pb2.KeySet], None]:
    return lambda keyset: _set(keyset.keys[0], fields)


def _revoke(*revocations: keys_pb2.Revocation) -> Callable[[keys_pb2.KeySet], None]:
    return lambda keyset: keyset.revocations.extend(revocations)


def _other_party(keyset: keys_pb2.KeySet) -> None:
    keyset.party_id = keyset.header.sender = "other.example"
    keyset.header.thread_id = keyset_thread_id("other.example")


REVOKE_K1 = keys_pb2.Revocation(keyid=K1.keyid, revoke_time=to_timestamp(T0 + 20 * DAY))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param(lambda k: k.ClearField("keys"), Reason.KEYSET_INVALID, id="no keys"),
        pytest.param(lambda k: k.keys.extend([k.keys[0]] * 16), Reason.KEYSET_INVALID, id="17 keys"),
        pytest.param(lambda k: k.keys.append(k.keys[0]), Reason.KEYSET_INVALID, id="duplicate keyid"),
        pytest.param(_key(keyid=K3.keyid), Reason.KEYSET_INVALID, id="keyid of another key"),
        pytest.param(_key(public_key=K2.public_key.raw[:31]), Reason.KEYSET_INVALID, id="31-byte key"),
        pytest.param(_key(not_after=T0 - DAY), Reason.KEYSET_INVALID, id="not_after = not_before"),
        pytest.param(_key(not_before=None), Reason.KEYSET_INVALID, id="no not_before"),
        pytest.param(_other_party, Reason.KEYSET_INVALID, id="other party"),
        pytest.param(_header(sender="other.example"), Reason.KEYSET_INVALID, id="sender is not party_id"),
        pytest.param(_header(recipient=PARTY), Reason.KEYSET_INVALID, id="recipient"),
        pytest.param(_header(thread_id=keyset_thread_id("x")), Reason.KEYSET_INVALID, id="thread_id"),
        pytest.param(_header(sequence=2), Reason.KEYSET_INVALID, id="sequence is not version - 1"),
        pytest.param(_header(previous_digest=bytes(32)), Reason.PREVIOUS_DIGEST_MISMATCH, id="previous_digest"),
        pytest.param(_header(previous_digest=b""), Reason.PREVIOUS_DIGEST_MISMATCH, id="no previous_digest"),
        pytest.param(_header(create_time=T0), Reason.KEYSET_INVALID, id="created with previous version"),
        pytest.param(_header(expire_time=T0 + 10 * DAY), Reason.KEYSET_INVALID, id="zero lifetime"),
        pytest.param(_header(expire_time=T0 + 411 * DAY), Reason.KEYSET_INVALID, id="lifetime over 400 days"),
        pytest.param(_header(protocol_version=2), Reason.UNSUPPORTED_VERSION, id="protocol version"),
        pytest.param(_header(message_id=bytes(15)), Reason.MALFORMED_HEADER, id="short message_id"),
        pytest.param(_header(expire_time=None), Reason.MALFORMED_HEADER, id="no expire_time"),
        pytest.param(lambda k: k.ClearField("header"), Reason.MALFORMED_HEADER, id="no header"),
        pytest.param(_revoke(REVOKE_K1, REVOKE_K1), Reason.KEYSET_INVALID, id="duplicate revocation"),
        pytest.param(
            _revoke(keys_pb2.Revocation(keyid="k", revoke_time=to_timestamp(T0))),
            Reason.KEYSET_INVALID,
            id="revocation keyid",
        ),
        pytest.param(_revoke(keys_pb2.Revocation(keyid=K1.keyid)), Reason.KEYSET_INVALID, id="no revoke_time"),
        pytest.param(
            _revoke(*(keys_pb2.Revocation(keyid=f"{n:032x}", revoke_time=to_timestamp(T0)) for n in range(257))),
            Reason.KEYSET_INVALID,
            id="257 revocations",
        ),
    ],
)
def test_malformed_next_version(change: Callable[[keys_pb2.KeySet], object], reason: Reason) -> None:
    assert refusal(lambda: CHAIN.extend(tampered(V2, K1, change))) is reason


def test_make_key_set_refuses_what_the_verifier_would_reject() -> None:
    with pytest.raises(LocalProtocolError) as caught:
        rotate(CHAIN, [], K1, T0 + DAY)
    assert caught.value.reason is Reason.KEYSET_INVALID
    with pytest.raises(ValueError, match="revocation_reasons"):
        rotate(CHAIN, [entry(K1)], K1, T0 + DAY, reasons={K1.keyid: "lost"})


# A chain where version 2 (signed by K1) revokes K1 from T0 + 20 days.
A1 = first(keys=[entry(K1), entry(K2)])
A2 = rotate(
    KeyChain.verify([A1]),
    [entry(K1), entry(K2)],
    K1,
    T0 + DAY,
    revocations={K1.keyid: T0 + 20 * DAY},
    reasons={K1.keyid: "lost"},
)
REVOKED = KeyChain.verify([A1, A2])


def test_revocations_and_their_reasons_are_carried_forward() -> None:
    a3 = rotate(REVOKED, [entry(K2), entry(K3)], K2, T0 + 2 * DAY)
    [revocation] = keys_pb2.KeySet.FromString(a3.payload).revocations
    assert revocation == keys_pb2.Revocation(keyid=K1.keyid, revoke_time=to_timestamp(T0 + 20 * DAY), reason="lost")
    assert REVOKED.extend(a3).latest.revocations == {K1.keyid: T0 + 20 * DAY}


def test_rollback_and_replay() -> None:
    # A2 is signed by K1, which A2 keeps: a replay passes the signature check.
    assert refusal(lambda: REVOKED.extend(A2)) is Reason.KEYSET_ROLLBACK
    assert refusal(lambda: REVOKED.extend(A1)) is Reason.KEYSET_ROLLBACK
    assert refusal(lambda: CHAIN.extend(V2).extend(tampered(V1, K2))) is Reason.KEYSET_ROLLBACK


def test_dropped_or_weakened_revocation() -> None:
    a3 = rotate(REVOKED, [entry(K2)], K2, T0 + 2 * DAY)
    dropped = tampered(a3, K2, lambda k: k.ClearField("revocations"))
    assert refusal(lambda: REVOKED.extend(dropped)) is Reason.KEYSET_INVALID
    later = tampered(a3, K2, lambda k: k.revocations[0].revoke_time.CopyFrom(to_timestamp(T0 + 30 * DAY)))
    assert refusal(lambda: REVOKED.extend(later)) is Reason.KEYSET_INVALID


def test_revoked_key_cannot_sign_the_next_version() -> None:
    a3 = rotate(REVOKED, [entry(K2)], K2, T0 + 21 * DAY)
    assert refusal(lambda: REVOKED.extend(tampered(a3, K1))) is Reason.KEY_REVOKED
    with pytest.raises(LocalProtocolError) as caught:
        rotate(REVOKED, [entry(K2)], K1, T0 + 21 * DAY)
    assert caught.value.reason is Reason.KEY_REVOKED
    # Before its revocation time it still may.
    assert REVOKED.extend(tampered(rotate(REVOKED, [entry(K2)], K2, T0 + 19 * DAY), K1)).latest.version == 3


def test_key_outside_its_window_cannot_sign_the_next_version() -> None:
    chain = KeyChain.verify([first(keys=[entry(K1, not_after=T0 + DAY)])])
    with pytest.raises(LocalProtocolError) as caught:
        rotate(chain, [entry(K2)], K1, T0 + DAY)
    assert caught.value.reason is Reason.KEY_NOT_VALID


def test_newest_version_must_not_be_expired() -> None:
    assert KeyChain.verify([V1], now=T0 + YEAR - timedelta(seconds=1)) == CHAIN
    assert refusal(lambda: KeyChain.verify([V1], now=T0 + YEAR)) is Reason.KEYSET_EXPIRED
    assert refusal(lambda: CHAIN.check_fresh(T0 + YEAR)) is Reason.KEYSET_EXPIRED
    assert refusal(lambda: CHAIN.extend(V2, now=T0 + 10 * DAY + YEAR)) is Reason.KEYSET_EXPIRED
    # An expired older version does not matter once a newer one is in force.
    late = rotate(CHAIN, [entry(K2)], K1, T0 + YEAR + DAY)
    assert KeyChain.verify([V1, late], now=T0 + YEAR + 2 * DAY).latest.version == 2


def test_check_key_at_uses_the_version_in_force() -> None:
    chain = CHAIN.extend(V2)  # K1 until T0 + 10 days, then K2
    chain.check_key_at(K1.keyid, T0 + 5 * DAY)  # an old message stays valid
    chain.check_key_at(K1.keyid, T0 - timedelta(hours=1))  # before version 1: version 1 applies
    chain.check_key_at(K2.keyid, T0 + 10 * DAY)
    assert refusal(lambda: chain.check_key_at(K1.keyid, T0 + 10 * DAY)) is Reason.UNKNOWN_KEY
    assert refusal(lambda: chain.check_key_at(K2.keyid, T0 + 5 * DAY)) is Reason.UNKNOWN_KEY
    assert refusal(lambda: chain.check_key_at(K3.keyid, T0 + 5 * DAY)) is Reason.UNKNOWN_KEY


def test_check_key_at_window() -> None:
    CHAIN.check_key_at(K1.keyid, T0 - DAY)
    assert refusal(lambda: CHAIN.check_key_at(K1.keyid, T0 - DAY - timedelta(microseconds=1))) is (Reason.KEY_NOT_VALID)
    assert refusal(lambda: CHAIN.check_key_at(K1.keyid, T0 + 2 * YEAR)) is Reason.KEY_NOT_VALID


def test_check_key_at_revocation() -> None:
    REVOKED.check_key_at(K1.keyid, T0 + 20 * DAY - timedelta(microseconds=1))
    assert refusal(lambda: REVOKED.check_key_at(K1.keyid, T0 + 20 * DAY)) is Reason.KEY_REVOKED
    REVOKED.check_key_at(K2.keyid, T0 + 20 * DAY)


def test_a_newer_revocation_applies_to_times_under_older_versions() -> None:
    a2 = rotate(KeyChain.verify([A1]), [entry(K1), entry(K2)], K2, T0 + DAY, revocations={K1.keyid: T0})
    chain = KeyChain.verify([A1, a2])
    assert refusal(lambda: chain.check_key_at(K1.keyid, T0 + timedelta(hours=1))) is Reason.KEY_REVOKED


# --- Revision 1.1: the first version read (KEY-22) and whole-microsecond times (HDR-16) ------------


def _resealed_first(change: Callable[[keys_pb2.KeySet], object]) -> envelope_pb2.Envelope:
    keyset = keys_pb2.KeySet.FromString(first().payload)
    change(keyset)
    return seal(keyset, K1)


@pytest.mark.parametrize(
    ("version", "reason"),
    [(0, Reason.KEYSET_ROLLBACK), (2, Reason.KEYSET_VERSION_SKIPPED), (7, Reason.KEYSET_VERSION_SKIPPED)],
)
def test_a_first_version_other_than_1_is_judged_as_if_version_0_were_held(version: int, reason: Reason) -> None:
    def renumber(keyset: keys_pb2.KeySet) -> None:
        keyset.version, keyset.header.sequence = version, max(version - 1, 0)

    with pytest.raises(RemoteProtocolError) as caught:
        KeyChain.verify([_resealed_first(renumber)])
    assert caught.value.reason is reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda k: setattr(k.keys[0].not_after, "nanos", 1), Reason.KEYSET_INVALID),
        (lambda k: setattr(k.keys[0].not_before, "nanos", 500), Reason.KEYSET_INVALID),
        (lambda k: setattr(k.header.create_time, "nanos", 1), Reason.MALFORMED_HEADER),
    ],
    ids=["not_after", "not_before", "create_time"],
)
def test_key_set_times_are_whole_microseconds(change: Callable[[keys_pb2.KeySet], object], reason: Reason) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        KeyChain.verify([_resealed_first(change)])
    assert caught.value.reason is reason
    KeyChain.verify([_resealed_first(lambda k: setattr(k.keys[0].not_after, "nanos", 1_000))])
