"""A party's identity in a state directory: its signing key and its key set chain — create, load, renew, rotate.

    identity = IdentityDir(state_dir, "biller").load("biller:energy.example", clock.now())
    agent = BillerAgent(..., signing_key=identity.key, key_sets=identity.chain, ...)

Both reference agents keep their identity the same way (`role` is "biller" or
"consumer"), in files that earlier versions wrote and that keep working:

- `<role>.key`: the Ed25519 signing key, PKCS#8 PEM, mode 0600; a key file that
  the group or others may read is refused (`InsecureKeyFileError`).
- `<role>-keyset-v<N>.pb`: version N of the key set chain, one serialized
  envelope each; a version is written completely or not at all and never
  overwritten. Version 1's digest is the party's identity fingerprint (KEY-12).
- `.<role>.key.next`: a rotation's new key (or a new identity's first key),
  until the key set version listing it is written.

`load` creates the key and version 1 on first use and renews a key set close to
its expiry as the next version, signed by the current key (KEY-9). It creates
them only in a directory that holds neither: a key without key set version 1,
or a later version without an earlier one, is refused (a new version 1 would be
a new identity, with a new fingerprint);
`load_existing` does the same but never creates an identity (`NoIdentityError`:
offline commands must not mint a new identity in a mistyped directory); `rotate`
replaces the key while keeping the identity (KEY-17) and, like
`load_existing`, needs one to exist. All refuse a state directory that holds
another party's identity or the other role's (a biller's key beside a
consumer's), a key set that does not list the key, unreadable key set files or a
path that is not a directory (`IdentityError`, a ValueError). `check` applies
the rules about the directory itself (a directory, not the other role's) alone,
for commands to call before they write anything; `state_dir_path` refuses an
empty path (it would mean the working directory).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from google.protobuf.message import DecodeError

from agent.protocol.errors import ProtocolError
from agent.protocol.keys import InsecureKeyFileError, SigningKey
from agent.protocol.keysets import KeyChain, KeyEntry, make_key_set
from parley.v1 import envelope_pb2

logger = logging.getLogger("parley.identity")

KEYSET_LIFETIME = timedelta(days=365)
KEYSET_RENEW_BEFORE = timedelta(days=30)
DEFAULT_BACKDATE = timedelta(days=1)
"""A new key set version starts this long before `now`, so a peer whose clock is a little behind still finds
the key valid."""
ROLES = ("biller", "consumer")
"""The roles whose identities a state directory may hold, one role per directory: each agent's files (keys,
store) beside the other's would be run, backed up and rotated as one party's."""


class IdentityError(ValueError):
    """The state directory's identity cannot be used: a key set without its key, unreadable, another party's."""


class OtherPartyError(IdentityError):
    """The state directory holds the identity of another party (`held_by`)."""

    def __init__(self, message: str, held_by: str) -> None:
        super().__init__(message)
        self.held_by = held_by


class NoIdentityError(IdentityError):
    """The state directory holds no identity of this role (or does not exist): nothing to load, rotate or use."""


def state_dir_path(text: str, named_by: str = "--state-dir") -> Path:
    """The state directory `text` names; IdentityError when it is empty.

    `Path("")` is the working directory: an empty --state-dir would put a key and a database among whatever
    files are there instead of saying the name was left out.
    """
    if not text:
        raise IdentityError(f"{named_by} is empty: name a directory")
    return Path(text)


@dataclass(frozen=True)
class Identity:
    """A party's signing key and its verified key set chain, whose newest version lists the key."""

    key: SigningKey
    chain: KeyChain


@dataclass(frozen=True)
class IdentityDir:
    """Where and how one party keeps its identity: the files of `role` in `state_dir`."""

    state_dir: Path
    role: str
    backdate: timedelta = DEFAULT_BACKDATE
    named_by: str = "--state-dir"
    """How the person chose the directory (a flag, a variable), for the messages that ask for another one."""

    @property
    def key_path(self) -> Path:
        return self.state_dir / f"{self.role}.key"

    @property
    def next_key_path(self) -> Path:
        return self.state_dir / f".{self.role}.key.next"

    def keyset_path(self, version: int) -> Path:
        return self.state_dir / f"{self.role}-keyset-v{version}.pb"

    def exists(self) -> bool:
        """Whether the state directory holds anything of an identity of this role: its key or a key set version
        (a part alone is an identity to restore, never a place for a new one)."""
        return self.key_path.exists() or bool(self._stored_versions())

    def check(self) -> None:
        """IdentityError unless the state directory can be this role's: a path that is not a directory, or one
        that holds another role's identity, is refused. Reads only: commands call it before writing anything."""
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise IdentityError(f"the state directory {self.state_dir} is a file, not a directory")
        for other in ROLES:
            if other != self.role and IdentityDir(self.state_dir, other).exists():
                raise IdentityError(f"{self.state_dir} holds a {other}'s state: use another {self.named_by}")

    def require(self) -> None:
        """NoIdentityError unless the state directory holds an identity of this role, IdentityError if its key set
        chain is unusable (a version lost); reads and writes nothing, so a caller may check before it locks."""
        self.check()
        if not self.exists():
            where = "does not exist" if not self.state_dir.exists() else f"holds no {self.key_path.name}"
            raise NoIdentityError(f"the state directory {self.state_dir} {where}: no {self.role} identity there")
        self._read_chain()

    def load_existing(self, party_id: str, now: datetime) -> Identity:
        """As `load`, but NoIdentityError where there is no identity yet: never creates one."""
        self.require()
        return self.load(party_id, now)

    def load(self, party_id: str, now: datetime) -> Identity:
        """The identity from the state directory, created on first use, renewed near expiry.

        A rotation or a creation cut short is finished (its version was written) or undone (it was not).
        """
        self.check()
        chain = self._read_chain()  # before anything is written: a part of an identity is never completed anew
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if chain is None:
            chain = self._create(party_id, now)
        else:
            self._finish_rotation(chain)
        if not self.key_path.exists():
            raise IdentityError(f"{self.keyset_path(1)} exists but its key {self.key_path} does not: restore it")
        key = self._load_key(self.key_path)
        if chain.party_id != party_id:
            raise OtherPartyError(
                f"{self.state_dir} holds the identity of {chain.party_id!r}, not {party_id!r}", chain.party_id
            )
        if chain.latest.entry(key.keyid) is None:
            raise IdentityError(
                f"{self.key_path} is not a key of {party_id!r}'s key set version {chain.latest.version}"
            )
        return self.renew(Identity(key, chain), now)

    def _create(self, party_id: str, now: datetime) -> KeyChain:
        """A new key and key set version 1 listing it, in a directory that holds neither.

        The key is written as the pending key and takes its place once version 1 is written, as in a rotation: a
        crash in between leaves what the next `load` finishes or starts again, never a key without its key set
        (which `load` refuses: it cannot tell it from a key set version 1 lost since).
        """
        self.next_key_path.unlink(missing_ok=True)  # a creation cut short before its version 1: start again
        key = SigningKey.generate()
        key.save(self.next_key_path)
        version_1 = self._new_version(key, party_id, None, now)
        self._write_new(self.keyset_path(1), version_1.SerializeToString())
        os.replace(self.next_key_path, self.key_path)
        logger.info("new signing key %s", self.key_path)
        return KeyChain.verify([version_1])

    def read(self, party_id: str) -> Identity:
        """The identity as stored, for read-only views: nothing is created, renewed or finished.

        IdentityError if there is none, it is unreadable, or it is another party's (OtherPartyError).
        """
        self.check()
        chain = self._read_chain()
        if chain is None or not self.key_path.exists():
            raise IdentityError(f"{self.state_dir} holds no {self.role} identity yet")
        if chain.party_id != party_id:
            raise OtherPartyError(
                f"{self.state_dir} holds the identity of {chain.party_id!r}, not {party_id!r}", chain.party_id
            )
        return Identity(self._load_key(self.key_path), chain)

    def renew(self, identity: Identity, now: datetime) -> Identity:
        """The identity, its chain extended by a new version (same key, fresh validity) if the newest expires soon."""
        chain = identity.chain
        if now < chain.latest.expire_time - KEYSET_RENEW_BEFORE:
            return identity
        envelope = self._new_version(identity.key, chain.party_id, chain, now)
        renewed = chain.extend(envelope)
        self._write_new(self.keyset_path(renewed.latest.version), envelope.SerializeToString())
        logger.info("key set renewed: version %d until %s", renewed.latest.version, renewed.latest.expire_time)
        return Identity(identity.key, renewed)

    def rotate(self, party_id: str, now: datetime) -> Identity:
        """Replace the signing key, keeping the identity (KEY-17): the new key and the extended chain.

        A new key set version, signed by the current key, lists the current key until `now` (so everything it
        signed still verifies, offline too) and a new key from `now`; the new key then replaces the key file.
        The next renewal drops the old key. Run it while no process uses the state directory (they read the
        key when they start); a crash part-way is finished or undone by the next `load`.
        """
        current = self.load_existing(party_id, now)
        entry = current.chain.latest.entry(current.key.keyid)
        assert entry is not None  # load checked that the newest version lists the key
        new_key = SigningKey.generate()
        new_key.save(self.next_key_path)  # load removed any pending key not published
        keys = [
            KeyEntry(current.key.public_key, entry.not_before, now),
            KeyEntry(new_key.public_key, now, now + KEYSET_LIFETIME),
        ]
        version = self._new_version(current.key, party_id, current.chain, now, keys)
        rotated = current.chain.extend(version)
        self._write_new(self.keyset_path(rotated.latest.version), version.SerializeToString())
        os.replace(self.next_key_path, self.key_path)
        logger.info(
            "key rotated: %s -> %s in key set version %d", current.key.keyid, new_key.keyid, rotated.latest.version
        )
        return Identity(new_key, rotated)

    @staticmethod
    def _load_key(path: Path) -> SigningKey:
        """The key in `path`; IdentityError (one line) when the file is not a usable private key."""
        try:
            return SigningKey.load(path)
        except InsecureKeyFileError:
            raise  # already says what to run (chmod 600)
        except (ValueError, UnsupportedAlgorithm) as error:
            raise IdentityError(
                f"{path} is not a usable Ed25519 private key (PKCS#8 PEM): restore it from a backup"
            ) from error

    def _stored_versions(self) -> set[int]:
        """The version numbers of this role's key set files in the state directory."""
        if not self.state_dir.is_dir():
            return set()
        name = re.compile(rf"{re.escape(self.role)}-keyset-v([1-9][0-9]*)\.pb")
        return {int(found[1]) for path in self.state_dir.iterdir() if (found := name.fullmatch(path.name))}

    def _read_chain(self) -> KeyChain | None:
        """The stored chain; None when the directory holds neither key nor key set. IdentityError when a version
        is missing (version 1 beside the key, or one before a later one): the next `load` would otherwise write
        a new version 1 in its place, a new identity that no pinned fingerprint matches."""
        versions = self._stored_versions()
        if not versions and not self.key_path.exists():
            return None
        expected = set(range(1, max(versions, default=1) + 1))  # version 1, and each before the latest
        if missing := sorted(expected - versions):
            raise IdentityError(
                f"key set version {missing[0]} is missing from {self.state_dir}: restore it from your backup; "
                "nothing was changed"
            )
        envelopes: list[envelope_pb2.Envelope] = []
        try:
            for version in range(1, max(versions) + 1):
                envelopes.append(envelope_pb2.Envelope.FromString(self.keyset_path(version).read_bytes()))
            return KeyChain.verify(envelopes)
        except (ProtocolError, DecodeError) as error:
            raise IdentityError(f"the key sets in {self.state_dir} are not a usable chain: {error}") from error

    def _finish_rotation(self, chain: KeyChain) -> None:
        """A rotation's new key becomes the key once a written version lists it; otherwise it is discarded."""
        if not self.next_key_path.exists():
            return
        if chain.latest.entry(self._load_key(self.next_key_path).keyid) is not None:
            os.replace(self.next_key_path, self.key_path)
            logger.info("finished the key rotation of key set version %d", chain.latest.version)
        else:
            self.next_key_path.unlink()

    def _new_version(
        self,
        signer: SigningKey,
        party_id: str,
        previous: KeyChain | None,
        now: datetime,
        keys: Sequence[KeyEntry] = (),
    ) -> envelope_pb2.Envelope:
        """Version 1, or the one after `previous`, signed by `signer`, listing `keys` (default: the signer's key
        for the version's whole lifetime)."""
        start = now - self.backdate
        return make_key_set(
            party_id=party_id,
            version=1 if previous is None else previous.latest.version + 1,
            keys=keys or [KeyEntry(signer.public_key, start, start + KEYSET_LIFETIME)],
            signer=signer,
            previous=None if previous is None else previous.latest,
            create_time=start if previous is None else max(start, previous.latest.create_time + timedelta(seconds=1)),
            expire_time=start + KEYSET_LIFETIME,
        )

    @staticmethod
    def _write_new(path: Path, data: bytes) -> None:
        """Write a file that must not exist yet, completely or not at all."""
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        temporary.write_bytes(data)
        try:
            os.link(temporary, path)  # fails if `path` exists: a version is never overwritten
        finally:
            temporary.unlink()


__all__ = [
    "DEFAULT_BACKDATE",
    "KEYSET_LIFETIME",
    "KEYSET_RENEW_BEFORE",
    "Identity",
    "IdentityDir",
    "IdentityError",
    "NoIdentityError",
    "OtherPartyError",
]
