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

from agent.identity import KEYSET_RENEW_BEFORE, IdentityDir, IdentityError, OtherPartyError
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
