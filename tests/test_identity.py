"""agent/identity.py: one party's key and key set chain in a state directory, for both reference agents.

The reference biller's own cases (creation, renewal, rotation, a rotation cut short) are in
tests/test_reference_biller_runtime.py; these are the consumer's, which shares the implementation: its
existing state directories keep working, it now renews its key set, and unusable state is refused.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.identity import KEYSET_RENEW_BEFORE, IdentityDir, IdentityError, OtherPartyError, state_dir_path
from agent.protocol.keys import InsecureKeyFileError, SigningKey
from agent.protocol.keysets import KeyChain, first_key_set
from parley.v1 import envelope_pb2
from reference_consumer.profile import ProfileError
from reference_consumer.runner import KEY_FILE, KEYSET_FILE, StateError, load_identity

NOW = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
HOUSEHOLD = "consumer:household-1"


def test_a_consumer_state_directory_written_before_keeps_its_identity(tmp_path: Path) -> None:
    """The layout the consumer wrote on its own (consumer.key, consumer-keyset-v1.pb from first_key_set)."""
    key = SigningKey.generate()
    key.save(tmp_path / KEY_FILE)
    version_1 = first_key_set(HOUSEHOLD, key, NOW - timedelta(minutes=5))
    (tmp_path / KEYSET_FILE).write_bytes(version_1.SerializeToString())
    loaded, chain = load_identity(tmp_path, HOUSEHOLD, NOW + timedelta(days=3))
    assert loaded.keyid == key.keyid
    assert chain.fingerprint == KeyChain.verify([version_1]).fingerprint
    assert len(chain.versions) == 1


def test_the_consumer_renews_its_key_set_near_expiry_keeping_its_identity(tmp_path: Path) -> None:
    key, chain = load_identity(tmp_path, HOUSEHOLD, NOW)
    assert os.stat(tmp_path / KEY_FILE).st_mode & 0o777 == 0o600
    assert chain.latest.create_time == NOW - timedelta(minutes=5)  # the consumer's backdate, as before
    later = chain.latest.expire_time - KEYSET_RENEW_BEFORE + timedelta(days=1)
    renewed_key, renewed = load_identity(tmp_path, HOUSEHOLD, later)
    assert (renewed_key.keyid, renewed.fingerprint, renewed.latest.version) == (key.keyid, chain.fingerprint, 2)
    assert (tmp_path / "consumer-keyset-v2.pb").exists()
    stored = [envelope_pb2.Envelope.FromString((tmp_path / f"consumer-keyset-v{n}.pb").read_bytes()) for n in (1, 2)]
    assert KeyChain.verify(stored).latest.version == 2  # the renewal is signed by the key of version 1


def test_the_consumer_refuses_unusable_state(tmp_path: Path) -> None:
    load_identity(tmp_path, HOUSEHOLD, NOW)
    with pytest.raises(ProfileError, match=r"household\.party_id"):
        load_identity(tmp_path, "consumer:someone-else", NOW)
    (tmp_path / KEY_FILE).chmod(0o640)
    with pytest.raises(InsecureKeyFileError):
        load_identity(tmp_path, HOUSEHOLD, NOW)
    (tmp_path / KEY_FILE).unlink()
    with pytest.raises(StateError, match="restore"):  # a key set without its key: never a new identity
        load_identity(tmp_path, HOUSEHOLD, NOW)


def test_a_key_the_key_set_does_not_list_is_refused(tmp_path: Path) -> None:
    identities = IdentityDir(tmp_path, "consumer")
    identities.load(HOUSEHOLD, NOW)
    identities.key_path.unlink()
    SigningKey.generate().save(identities.key_path)
    with pytest.raises(IdentityError, match="is not a key of"):
        identities.load(HOUSEHOLD, NOW)
    with pytest.raises(OtherPartyError) as other:
        identities.load("consumer:other", NOW)
    assert other.value.held_by == HOUSEHOLD


def files_in(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


@pytest.mark.parametrize("role", ["biller", "consumer"])
def test_a_key_without_its_key_set_version_1_is_refused_never_given_a_new_identity(tmp_path: Path, role: str) -> None:
    """A lost version 1 (beside a later version, or the key alone) must be restored: a new one is a new identity."""
    party = f"{role}:party-1"
    identities = IdentityDir(tmp_path, role)
    identities.load(party, NOW)
    identities.rotate(party, NOW + timedelta(days=1))  # version 2 too: a new version 1 would not fit it
    identities.keyset_path(1).unlink()
    for left in ("version 2", "the key alone"):
        before = files_in(tmp_path)
        with pytest.raises(IdentityError, match=r"key set version 1 is missing from .*: restore it"):
            identities.load(party, NOW)
        with pytest.raises(IdentityError, match="key set version 1 is missing"):
            identities.rotate(party, NOW)
        assert files_in(tmp_path) == before, left  # nothing written, version 1 above all
        assert identities.exists()  # a part of an identity: never "no identity", so never created anew
        identities.keyset_path(2).unlink(missing_ok=True)
    assert not identities.keyset_path(1).exists()


def test_a_creation_cut_short_is_finished_or_started_again(tmp_path: Path) -> None:
    """The first key is written as the pending key and takes its place once version 1 is: a crash between the
    two never leaves a key without its key set (which is refused)."""
    identities = IdentityDir(tmp_path, "consumer")
    SigningKey.generate().save(identities.next_key_path)  # cut short before version 1: started again
    created = identities.load(HOUSEHOLD, NOW)
    assert not identities.next_key_path.exists()
    identities.key_path.rename(identities.next_key_path)  # cut short after version 1: finished
    finished = identities.load(HOUSEHOLD, NOW)
    assert (finished.key.keyid, finished.chain.fingerprint) == (created.key.keyid, created.chain.fingerprint)
    assert not identities.next_key_path.exists()


@pytest.mark.parametrize(("role", "other"), [("biller", "consumer"), ("consumer", "biller")])
def test_a_state_directory_of_the_other_role_is_refused_before_anything_is_written(
    tmp_path: Path, role: str, other: str
) -> None:
    IdentityDir(tmp_path, other).load(f"{other}:party-1", NOW)
    before = files_in(tmp_path)
    identities = IdentityDir(tmp_path, role, named_by="PARLEY_STATE_DIR")
    for attempt in (identities.check, lambda: identities.load(f"{role}:party-2", NOW)):
        with pytest.raises(IdentityError, match=f"holds a {other}'s state: use another PARLEY_STATE_DIR"):
            attempt()
    assert files_in(tmp_path) == before


def test_an_empty_state_directory_is_refused_not_read_as_the_working_directory() -> None:
    with pytest.raises(IdentityError, match=r"^--state-dir is empty: name a directory$"):
        state_dir_path("")
    assert state_dir_path("state") == Path("state")
