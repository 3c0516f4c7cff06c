"""Keys, key files, PAE, DSSE envelopes and their JSON form (PROTOCOL.md §3, §4.1)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from agent.protocol.dsse import (
    check_envelope_form,
    digest,
    envelope_from_json,
    envelope_to_json,
    pae,
    sign_envelope,
    verify_signature,
)
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keys import InsecureKeyFileError, SigningKey, VerifyKey, keyid_of
from agent.protocol.limits import DEFAULT_LIMITS, Limits
from parley.v1 import envelope_pb2

# RFC 8032 §7.1, TEST 1: secret key, public key, and the signature of the empty message.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
KEY = SigningKey.from_seed(RFC8032_SEED)

payload_types = st.text(min_size=1, max_size=128)
payloads = st.binary(min_size=1, max_size=512)


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8 % len(data)] ^= 1 << bit % 8
    return bytes(flipped)


def _reason(envelope: envelope_pb2.Envelope, key: VerifyKey = KEY.public_key) -> Reason | None:
    """The reason the envelope is refused when checked against `key`, or None if it verifies."""
    try:
        check_envelope_form(envelope, DEFAULT_LIMITS)
        verify_signature(envelope, key)
    except RemoteProtocolError as error:
        return error.reason
    return None


def test_rfc8032_vector() -> None:
    assert KEY.public_key.raw == RFC8032_PUBLIC
    assert KEY.sign(b"") == RFC8032_SIGNATURE
    assert KEY.public_key.verify(RFC8032_SIGNATURE, b"")
    assert not KEY.public_key.verify(RFC8032_SIGNATURE, b"x")
    assert KEY.seed == RFC8032_SEED


def test_keyid_is_truncated_sha256_of_raw_key() -> None:
    assert keyid_of(RFC8032_PUBLIC) == "21fe31dfa154a261626bf854046fd227"
    assert KEY.keyid == KEY.public_key.keyid == "21fe31dfa154a261626bf854046fd227"


def test_verify_key_from_bytes() -> None:
    key = VerifyKey.from_bytes(RFC8032_PUBLIC)
    assert key == KEY.public_key
    assert hash(key) == hash(KEY.public_key)
    assert key != SigningKey.generate().public_key
    for raw in (RFC8032_PUBLIC[:31], RFC8032_PUBLIC + b"\0", b""):
        with pytest.raises(ValueError, match="32 bytes"):
            VerifyKey.from_bytes(raw)


def test_from_seed_refuses_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SigningKey.from_seed(RFC8032_SEED[:31])


def test_repr_shows_only_the_keyid() -> None:
    text = repr(KEY) + str(KEY)
    assert KEY.keyid in text
    assert RFC8032_SEED.hex() not in text
    assert "PRIVATE" not in text


# ---- key files


def test_save_creates_a_0600_file_and_load_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    KEY.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert SigningKey.load(path).keyid == KEY.keyid


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        KEY.save(path)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_a_file_open_to_group_or_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "key.pem"
    KEY.save(path)
    os.chmod(path, mode)
    with pytest.raises(InsecureKeyFileError, match="chmod 600") as caught:
        SigningKey.load(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, PermissionError)


def test_load_accepts_owner_read_only(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    KEY.save(path)
    os.chmod(path, 0o400)
    assert SigningKey.load(path).keyid == KEY.keyid


# ---- PAE and signatures


def test_pae_matches_the_dsse_vector() -> None:
    expected = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert pae("http://example.com/HelloWorld", b"hello world") == expected


def test_pae_counts_utf8_bytes_not_characters() -> None:
    assert pae("é", b"") == "DSSEv1 2 é 0 ".encode()


def test_digest_is_sha256_of_pae() -> None:
    envelope = sign_envelope(KEY, "t", b"p")
    assert digest(envelope) == hashlib.sha256(b"DSSEv1 1 t 1 p").digest()
    # Signatures are not covered: the digest names the signed content.
    resigned = sign_envelope(SigningKey.generate(), "t", b"p")
    assert digest(resigned) == digest(envelope)
    assert digest(sign_envelope(KEY, "t", b"q")) != digest(envelope)


@given(payload_type=payload_types, payload=payloads)
def test_sign_and_verify_round_trip(payload_type: str, payload: bytes) -> None:
    envelope = sign_envelope(KEY, payload_type, payload)
    assert _reason(envelope) is None
    assert envelope.signatures[0].keyid == KEY.keyid


@given(payload_type=payload_types, payload=payloads, bit=st.integers(min_value=0))
def test_any_flipped_payload_bit_is_a_bad_signature(payload_type: str, payload: bytes, bit: int) -> None:
    envelope = sign_envelope(KEY, payload_type, payload)
    envelope.payload = _flip(payload, bit)
    assert _reason(envelope) is Reason.BAD_SIGNATURE


@given(payload_type=payload_types, payload=payloads, bit=st.integers(min_value=0))
def test_any_flipped_payload_type_bit_is_a_bad_signature(payload_type: str, payload: bytes, bit: int) -> None:
    envelope = sign_envelope(KEY, payload_type, payload)
    try:
        envelope.payload_type = _flip(payload_type.encode(), bit).decode()
    except UnicodeDecodeError:
        assume(False)  # not a string an envelope can carry
    assert _reason(envelope) is Reason.BAD_SIGNATURE


@given(payload=payloads, bit=st.integers(min_value=0, max_value=511))
def test_any_flipped_signature_bit_is_a_bad_signature(payload: bytes, bit: int) -> None:
    envelope = sign_envelope(KEY, "t", payload)
    envelope.signatures[0].sig = _flip(envelope.signatures[0].sig, bit)
    assert _reason(envelope) is Reason.BAD_SIGNATURE


def test_signature_must_be_over_the_pae_not_the_raw_payload() -> None:
    envelope = sign_envelope(KEY, "parley.v1.Offer", b"payload")
    envelope.signatures[0].sig = KEY.sign(b"payload")
    assert _reason(envelope) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "signed",
    [
        b"DSSEv1 15 parley.v1.Offer 8 payload",  # payload length off by one
        b"DSSEv1 16 parley.v1.Offer 7 payload",  # type length off by one
        b"DSSEv1 15 parley.v1.Offer 7 payload ",  # trailing separator
        b"DSSEv1 15 parley.v1.Offer 7  payload",  # extra separator
        b"DSSEv1 015 parley.v1.Offer 7 payload",  # non-canonical decimal
    ],
)
def test_a_wrong_pae_is_a_bad_signature(signed: bytes) -> None:
    envelope = sign_envelope(KEY, "parley.v1.Offer", b"payload")
    assert pae("parley.v1.Offer", b"payload") == b"DSSEv1 15 parley.v1.Offer 7 payload"
    envelope.signatures[0].sig = KEY.sign(signed)
    assert _reason(envelope) is Reason.BAD_SIGNATURE


def test_verify_signature_accepts_any_of_several_candidates() -> None:
    envelope = sign_envelope(KEY, "t", b"p")
    verify_signature(envelope, SigningKey.generate().public_key, KEY.public_key)
    with pytest.raises(RemoteProtocolError) as caught:
        verify_signature(envelope)
    assert caught.value.reason is Reason.BAD_SIGNATURE


# ---- envelope form


def _signed(**changes: object) -> envelope_pb2.Envelope:
    envelope = sign_envelope(KEY, "parley.v1.Offer", b"payload")
    for name, value in changes.items():
        if name in ("keyid", "sig"):
            setattr(envelope.signatures[0], name, value)
        else:
            setattr(envelope, name, value)
    return envelope


def _two_signatures() -> envelope_pb2.Envelope:
    envelope = _signed()
    envelope.signatures.append(envelope.signatures[0])
    return envelope


def _no_signature() -> envelope_pb2.Envelope:
    envelope = _signed()
    del envelope.signatures[:]
    return envelope


@pytest.mark.parametrize(
    "envelope",
    [
        pytest.param(_no_signature(), id="no signature"),
        pytest.param(_two_signatures(), id="two signatures"),
        pytest.param(_signed(keyid=KEY.keyid.upper()), id="uppercase keyid"),
        pytest.param(_signed(keyid=KEY.keyid[:-1]), id="short keyid"),
        pytest.param(_signed(keyid=""), id="empty keyid"),
        pytest.param(_signed(sig=b"\0" * 63), id="63-byte signature"),
        pytest.param(_signed(sig=b"\0" * 65), id="65-byte signature"),
        pytest.param(_signed(payload_type=""), id="empty payloadType"),
        pytest.param(_signed(payload_type="x" * 129), id="129-character payloadType"),
        pytest.param(_signed(payload=b""), id="empty payload"),
    ],
)
def test_malformed_envelopes(envelope: envelope_pb2.Envelope) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        check_envelope_form(envelope, DEFAULT_LIMITS)
    assert caught.value.reason is Reason.MALFORMED_ENVELOPE


def test_envelope_size_limit_is_checked_first() -> None:
    envelope = _two_signatures()
    size = envelope.ByteSize()
    with pytest.raises(RemoteProtocolError) as caught:
        check_envelope_form(envelope, Limits(max_envelope_bytes=size - 1))
    assert caught.value.reason is Reason.ENVELOPE_TOO_LARGE
    envelope = _signed()
    assert check_envelope_form(envelope, Limits(max_envelope_bytes=envelope.ByteSize())) == envelope.signatures[0]


# ---- JSON form


@given(payload_type=payload_types, payload=payloads)
def test_json_round_trip(payload_type: str, payload: bytes) -> None:
    envelope = sign_envelope(KEY, payload_type, payload)
    document = envelope_to_json(envelope)
    assert envelope_from_json(json.loads(json.dumps(document))) == envelope


def test_json_uses_dsse_names_and_padded_standard_base64() -> None:
    envelope = sign_envelope(KEY, "parley.v1.Offer", b"\xfb\xff")
    assert envelope_to_json(envelope) == {
        "payload": "+/8=",
        "payloadType": "parley.v1.Offer",
        "signatures": [{"keyid": KEY.keyid, "sig": base64.b64encode(envelope.signatures[0].sig).decode()}],
    }


def _json(**changes: object) -> dict[str, object]:
    document = envelope_to_json(sign_envelope(KEY, "parley.v1.Offer", b"\xfb\xff"))
    document.update(changes)
    return document


@pytest.mark.parametrize(
    "document",
    [
        pytest.param([], id="not an object"),
        pytest.param(_json(extra=1), id="extra member"),
        pytest.param({"payload": "+/8=", "payloadType": "t"}, id="missing member"),
        pytest.param(_json(payload="+/8"), id="unpadded base64"),
        pytest.param(_json(payload="-_8="), id="url-safe base64"),
        pytest.param(_json(payload="+/8=\n"), id="base64 with newline"),
        pytest.param(_json(payload="+/9="), id="non-canonical base64"),
        pytest.param(_json(payload=b"+/8="), id="bytes instead of string"),
        pytest.param(_json(payloadType=1), id="numeric payloadType"),
        pytest.param(_json(payloadType="\ud800"), id="lone surrogate"),
        pytest.param(_json(signatures={}), id="signatures not an array"),
        pytest.param(_json(signatures=[{"keyid": KEY.keyid}]), id="signature without sig"),
        pytest.param(_json(signatures=[{"keyid": KEY.keyid, "sig": "", "x": 1}]), id="signature with extra member"),
        pytest.param(_json(signatures=[{"keyid": None, "sig": ""}]), id="null keyid"),
        pytest.param(_json(signatures=["sig"]), id="signature not an object"),
    ],
)
def test_json_parsing_is_strict(document: object) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        envelope_from_json(document)
    assert caught.value.reason is Reason.MALFORMED_ENVELOPE
