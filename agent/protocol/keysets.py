"""Signed key sets and their chains (PROTOCOL.md §4, KEY-*).

A party's keys are published as a chain of `parley.v1.KeySet` versions: version
1 is signed by one of its own keys and its digest is the party's identity
fingerprint (KEY-12); version N+1 is accepted only when signed by a key of
version N (KEY-9). A `KeyChain` is such a chain after verification; it answers
which key may have signed a message created at a given time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from agent.protocol.dsse import check_envelope_form, digest, verify_signature
from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey, VerifyKey, is_keyid
from agent.protocol.limits import (
    DEFAULT_LIMITS,
    MAX_KEYS_PER_SET,
    MAX_KEYSET_LIFETIME,
    MAX_KEYSET_VERSIONS,
    MAX_PARTY_ID_CHARS,
    MAX_REVOCATION_REASON_CHARS,
    MAX_REVOCATIONS_PER_SET,
    PUBLIC_KEY_BYTES,
    THREAD_ID_BYTES,
    Limits,
)
from agent.protocol.messages import (
    check_header_form,
    is_party_id,
    new_header,
    parse_payload,
    read_time,
    seal,
    to_timestamp,
)
from parley.v1 import envelope_pb2, keys_pb2

KEYSET_PAYLOAD_TYPE = keys_pb2.KeySet.DESCRIPTOR.full_name
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def keyset_thread_id(party_id: str) -> bytes:
    """The thread id of a party's key set chain (§5.2)."""
    return hashlib.sha256(b"parley/v1/keyset/" + party_id.encode()).digest()[:THREAD_ID_BYTES]


@dataclass(frozen=True)
class KeyEntry:
    """A trusted key and the window in which it may sign: not_before <= create_time < not_after."""

    key: VerifyKey
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class KeySetVersion:
    """One verified version of a party's key set."""

    party_id: str
    version: int
    keys: tuple[KeyEntry, ...]
    revocations: Mapping[str, datetime]  # keyid -> revoke_time; read-only
    create_time: datetime
    expire_time: datetime
    envelope: envelope_pb2.Envelope
    digest: bytes

    def entry(self, keyid: str) -> KeyEntry | None:
        """This version's key with that keyid, if any."""
        return _find_entry(self.keys, keyid)


def _find_entry(entries: Iterable[KeyEntry], keyid: str) -> KeyEntry | None:
    return next((entry for entry in entries if entry.key.keyid == keyid), None)


def _invalid(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.KEYSET_INVALID, detail)


def _check_usable(entry: KeyEntry, revocations: Mapping[str, datetime], at: datetime) -> None:
    """KEY-10, KEY-11: the key may sign something created at `at`."""
    keyid = entry.key.keyid
    if not entry.not_before <= at < entry.not_after:
        raise RemoteProtocolError(
            Reason.KEY_NOT_VALID, f"key {keyid} signs from {entry.not_before} until {entry.not_after}, not at {at}"
        )
    revoke_time = revocations.get(keyid)
    if revoke_time is not None and revoke_time <= at:
        raise RemoteProtocolError(Reason.KEY_REVOKED, f"key {keyid} was revoked at {revoke_time}")


def _signer(entries: Iterable[KeyEntry], keyid: str, where: str) -> KeyEntry:
    entry = _find_entry(entries, keyid)
    if entry is None:
        raise RemoteProtocolError(Reason.KEYSET_WRONG_SIGNER, f"signing keyid {keyid} is not a key of {where}")
    return entry


def _check_version_follows(version: int, previous: KeySetVersion | None) -> None:
    """KEY-8: version 1 starts a chain and N may only be followed by N+1; LIM-15: up to MAX_KEYSET_VERSIONS.

    KEY-22: a receiver that holds nothing for the party judges as if it held version 0, so a
    first version 0 is KEYSET_ROLLBACK and a first version 2 or more KEYSET_VERSION_SKIPPED.
    """
    expected = 1 if previous is None else previous.version + 1
    if version == expected > MAX_KEYSET_VERSIONS:
        raise RemoteProtocolError(
            Reason.KEYSET_CHAIN_FULL, f"a chain has at most {MAX_KEYSET_VERSIONS} versions: enrol with a new one"
        )
    if version < expected:
        raise RemoteProtocolError(Reason.KEYSET_ROLLBACK, f"version {version}, expected {expected}")
    if version > expected:
        raise RemoteProtocolError(Reason.KEYSET_VERSION_SKIPPED, f"version {version}, expected {expected}")


def _read_keys(keyset: keys_pb2.KeySet) -> tuple[KeyEntry, ...]:
    """KEY-7: one to MAX_KEYS_PER_SET distinct keys, each with its own keyid and a non-empty window."""
    if not 0 < len(keyset.keys) <= MAX_KEYS_PER_SET:
        raise _invalid(f"{len(keyset.keys)} keys; a key set has 1 to {MAX_KEYS_PER_SET}")
    entries: dict[str, KeyEntry] = {}
    for index, key in enumerate(keyset.keys):
        try:
            public_key = VerifyKey.from_bytes(key.public_key)
        except ValueError as error:
            raise _invalid(f"keys[{index}] is not a {PUBLIC_KEY_BYTES}-byte Ed25519 public key") from error
        if key.keyid != public_key.keyid:
            raise _invalid(f"keys[{index}].keyid is not the keyid of its public key")
        if key.keyid in entries:
            raise _invalid(f"keys[{index}] repeats keyid {key.keyid}")
        entry = KeyEntry(
            public_key,
            read_time(key, "not_before", Reason.KEYSET_INVALID),
            read_time(key, "not_after", Reason.KEYSET_INVALID),
        )
        if entry.not_before >= entry.not_after:
            raise _invalid(f"keys[{index}] has not_before at or after not_after")
        entries[key.keyid] = entry
    return tuple(entries.values())


def _read_revocations(keyset: keys_pb2.KeySet, previous: KeySetVersion | None) -> Mapping[str, datetime]:
    """KEY-11: distinct revocations, every one of the previous version carried forward unchanged."""
    if len(keyset.revocations) > MAX_REVOCATIONS_PER_SET:
        raise _invalid(f"{len(keyset.revocations)} revocations; at most {MAX_REVOCATIONS_PER_SET}")
    revocations: dict[str, datetime] = {}
    for index, revocation in enumerate(keyset.revocations):
        if not is_keyid(revocation.keyid):
            raise _invalid(f"revocations[{index}].keyid is not a keyid")
        if revocation.keyid in revocations:
            raise _invalid(f"revocations[{index}] repeats keyid {revocation.keyid}")
        if len(revocation.reason) > MAX_REVOCATION_REASON_CHARS:
            raise _invalid(f"revocations[{index}].reason is longer than {MAX_REVOCATION_REASON_CHARS} characters")
        revocations[revocation.keyid] = read_time(revocation, "revoke_time", Reason.KEYSET_INVALID)
    if previous is not None:
        dropped = [keyid for keyid, at in previous.revocations.items() if revocations.get(keyid) != at]
        if dropped:
            raise _invalid(f"drops or changes the revocation of {', '.join(dropped)}")
    return MappingProxyType(revocations)


def _verify_version(envelope: envelope_pb2.Envelope, previous: KeySetVersion | None, limits: Limits) -> KeySetVersion:
    """Verify `envelope` as the version after `previous`, or as version 1 when `previous` is None."""
    signature = check_envelope_form(envelope, limits)
    if envelope.payload_type != KEYSET_PAYLOAD_TYPE:
        raise RemoteProtocolError(
            Reason.WRONG_PAYLOAD_TYPE, f"payloadType {envelope.payload_type!r}, not {KEYSET_PAYLOAD_TYPE}"
        )
    if previous is not None:
        # KEY-9, ENV-4: only a key of version N may sign N+1, checked before parsing.
        signer = _signer(previous.keys, signature.keyid, f"version {previous.version}")
        verify_signature(envelope, signer.key)
    keyset = parse_payload(keys_pb2.KeySet, envelope.payload)
    _check_version_follows(keyset.version, previous)
    keys = _read_keys(keyset)
    if previous is None:
        # Version 1 carries its own signer's key, so it is the one message parsed
        # before its signature is verified (an exception to ENV-4). The parse is
        # bounded by check_envelope_form's size limit and strict (no unknown
        # fields), and nothing parsed is trusted until the signature verifies.
        signer = _signer(keys, signature.keyid, "version 1 itself")
        verify_signature(envelope, signer.key)

    create_time, expire_time = check_header_form(keyset)
    header = keyset.header
    party_id = keyset.party_id
    if not is_party_id(party_id):
        raise _invalid(f"party_id must be 1 to {MAX_PARTY_ID_CHARS} characters of [A-Za-z0-9._:-] (HDR-13)")
    if previous is not None and party_id != previous.party_id:
        raise _invalid(f"party_id {party_id!r} is not the chain's {previous.party_id!r}")
    if header.sender != party_id:
        raise _invalid(f"header sender {header.sender!r} is not the party_id {party_id!r}")
    if header.recipient:
        raise _invalid("a key set is published to everyone: its recipient must be empty")
    if header.thread_id != keyset_thread_id(party_id):
        raise _invalid("thread_id is not the party's key set chain id")
    if header.sequence != keyset.version - 1:
        raise _invalid(f"sequence {header.sequence} is not version - 1")
    if header.previous_digest != (b"" if previous is None else previous.digest):
        raise RemoteProtocolError(
            Reason.PREVIOUS_DIGEST_MISMATCH, "previous_digest is not the digest of the previous version"
        )
    if previous is not None and create_time <= previous.create_time:
        raise _invalid("create_time is not after the previous version's")
    if not timedelta(0) < expire_time - create_time <= MAX_KEYSET_LIFETIME:
        raise _invalid(f"lifetime must be positive and at most {MAX_KEYSET_LIFETIME}")
    revocations = _read_revocations(keyset, previous)
    _check_usable(signer, revocations, create_time)
    return KeySetVersion(
        party_id=party_id,
        version=keyset.version,
        keys=keys,
        revocations=revocations,
        create_time=create_time,
        expire_time=expire_time,
        envelope=envelope,
        digest=digest(envelope),
    )


def make_key_set(
    *,
    party_id: str,
    version: int,
    keys: Sequence[KeyEntry],
    signer: SigningKey,
    previous: KeySetVersion | None,
    create_time: datetime,
    expire_time: datetime,
    revocations: Mapping[str, datetime] = _EMPTY,
    revocation_reasons: Mapping[str, str] = _EMPTY,
    message_id: bytes | None = None,
) -> envelope_pb2.Envelope:
    """Sign a key set version following `previous` (None for version 1).

    The previous version's revocations are carried forward, then `revocations`
    (keyid -> revoke_time) are added. `message_id` is random unless given (test
    vectors). LocalProtocolError if the result would not verify as the next
    version of the chain.
    """
    if not revocation_reasons.keys() <= revocations.keys():
        raise ValueError("revocation_reasons names a keyid not in revocations")
    # The previous version verified, so its payload parses; re-reading it keeps the reasons.
    carried = [] if previous is None else list(keys_pb2.KeySet.FromString(previous.envelope.payload).revocations)
    keyset = keys_pb2.KeySet(
        header=new_header(
            sender=party_id,
            recipient="",
            thread_id=keyset_thread_id(party_id),
            sequence=version - 1,
            previous_digest=b"" if previous is None else previous.digest,
            now=create_time,
            lifetime=expire_time - create_time,
            message_id=message_id,
        ),
        party_id=party_id,
        version=version,
        keys=[
            keys_pb2.PublicKey(
                keyid=entry.key.keyid,
                public_key=entry.key.raw,
                not_before=to_timestamp(entry.not_before),
                not_after=to_timestamp(entry.not_after),
            )
            for entry in keys
        ],
        revocations=carried
        + [
            keys_pb2.Revocation(keyid=keyid, revoke_time=to_timestamp(at), reason=revocation_reasons.get(keyid, ""))
            for keyid, at in revocations.items()
        ],
    )
    envelope = seal(keyset, signer)
    try:
        _verify_version(envelope, previous, DEFAULT_LIMITS)
    except RemoteProtocolError as error:
        raise LocalProtocolError(error.reason, error.detail) from error
    return envelope


@dataclass(frozen=True)
class KeyChain:
    """A party's verified key set chain, version 1 first.

    Obtain one from `KeyChain.verify`; `extend` returns a longer chain. The
    constructor trusts `versions` as given.
    """

    versions: tuple[KeySetVersion, ...]

    @classmethod
    def verify(
        cls,
        envelopes: Sequence[envelope_pb2.Envelope],
        *,
        pin: bytes | None = None,
        now: datetime | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> KeyChain:
        """Verify a whole chain, version 1 first, against the pinned fingerprint if given (KEY-12).

        With `now`, the newest version must not have expired (KEY-13).
        """
        if not envelopes:
            raise _invalid("the key set chain is empty")
        # KEY-12: checked first, so an unpinned version 1 is never even parsed.
        if pin is not None and digest(envelopes[0]) != pin:
            raise RemoteProtocolError(Reason.PIN_MISMATCH, "version 1 does not match the pinned fingerprint")
        chain = cls((_verify_version(envelopes[0], None, limits),))
        for envelope in envelopes[1:]:
            chain = chain.extend(envelope, limits=limits)
        if now is not None:
            chain.check_created_by(now, limits)
            chain.check_fresh(now)
        return chain

    def extend(
        self, envelope: envelope_pb2.Envelope, *, now: datetime | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> KeyChain:
        """The chain with `envelope` verified as its next version (KEY-8, KEY-9), and only it: the versions
        before were verified already (LIM-15). With `now`, KEY-13 too, and KEY-23: not created in the future."""
        chain = KeyChain((*self.versions, _verify_version(envelope, self.latest, limits)))
        if now is not None:
            chain.check_created_by(now, limits)
            chain.check_fresh(now)
        return chain

    @property
    def party_id(self) -> str:
        return self.versions[0].party_id

    @property
    def fingerprint(self) -> bytes:
        """The party's identity fingerprint: digest of version 1 (KEY-12)."""
        return self.versions[0].digest

    @property
    def latest(self) -> KeySetVersion:
        return self.versions[-1]

    @property
    def envelopes(self) -> tuple[envelope_pb2.Envelope, ...]:
        return tuple(version.envelope for version in self.versions)

    def candidate_keys(self, keyid: str) -> tuple[VerifyKey, ...]:
        """Keys with this keyid in any version: a lookup hint within this party only (KEY-6)."""
        keys = (entry.key for version in self.versions for entry in version.keys if entry.key.keyid == keyid)
        return tuple(dict.fromkeys(keys))

    def check_key_at(self, keyid: str, create_time: datetime) -> None:
        """KEY-6, KEY-10, KEY-11: the key could sign a message created at `create_time`.

        The key must belong to the version in force then (the newest created at or
        before it; version 1 for earlier times), be inside its window, and not be
        revoked by then according to the newest version.
        """
        in_force = next((v for v in reversed(self.versions) if v.create_time <= create_time), self.versions[0])
        entry = in_force.entry(keyid)
        if entry is None:
            raise RemoteProtocolError(
                Reason.UNKNOWN_KEY, f"keyid {keyid} is not in {self.party_id}'s key set version {in_force.version}"
            )
        _check_usable(entry, self.latest.revocations, create_time)

    def check_created_by(self, now: datetime, limits: Limits = DEFAULT_LIMITS) -> None:
        """KEY-23: no version was created after `now` plus the clock skew (versions are created in order, so
        the newest tells): a version dated ahead would otherwise become the version in force only later."""
        if self.latest.create_time > now + limits.max_clock_skew:
            raise RemoteProtocolError(
                Reason.MESSAGE_NOT_YET_VALID,
                f"{self.party_id}'s key set version {self.latest.version} is created {self.latest.create_time}, "
                f"after now ({now})",
            )

    def check_fresh(self, now: datetime) -> None:
        """KEY-13: the newest version has not expired, so a frozen chain is noticed."""
        if now >= self.latest.expire_time:
            raise RemoteProtocolError(
                Reason.KEYSET_EXPIRED, f"{self.party_id}'s key set version {self.latest.version} expired"
            )


def first_key_set(
    party_id: str, key: SigningKey, now: datetime, *, lifetime: timedelta = timedelta(days=365)
) -> envelope_pb2.Envelope:
    """A new party's self-signed key set version 1 listing `key`, valid from `now` for `lifetime` (KEY-9, KEY-12).

    Its digest is the party's identity fingerprint: what a biller prints beside enrolment codes.
    """
    return make_key_set(
        party_id=party_id,
        version=1,
        keys=[KeyEntry(key.public_key, now, now + lifetime)],
        signer=key,
        previous=None,
        create_time=now,
        expire_time=now + lifetime,
    )
