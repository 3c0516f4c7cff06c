"""DSSE v1 envelopes and message digests (PROTOCOL.md §3).

The signature covers the PAE of the payload type and the exact payload bytes
received, so verifiers never re-serialize (ENV-3). Keys are `agent.protocol.keys`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey, VerifyKey, is_keyid
from agent.protocol.limits import KEYID_BYTES, MAX_PAYLOAD_TYPE_CHARS, SIGNATURE_BYTES, Limits
from parley.v1 import envelope_pb2


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is signed and digested (ENV-3)."""
    type_bytes = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def digest(envelope: envelope_pb2.Envelope) -> bytes:
    """A message's digest: SHA-256 of its PAE (previous_digest, accepts, fingerprints)."""
    return hashlib.sha256(pae(envelope.payload_type, envelope.payload)).digest()


def sign_envelope(key: SigningKey, payload_type: str, payload: bytes) -> envelope_pb2.Envelope:
    """An envelope carrying `payload` with `key`'s one signature over its PAE."""
    signature = envelope_pb2.Signature(keyid=key.keyid, sig=key.sign(pae(payload_type, payload)))
    return envelope_pb2.Envelope(payload=payload, payload_type=payload_type, signatures=[signature])


def _malformed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.MALFORMED_ENVELOPE, detail)


def check_envelope_form(envelope: envelope_pb2.Envelope, limits: Limits) -> envelope_pb2.Signature:
    """LIM-1, ENV-1, ENV-2: the envelope's size and shape; returns its one signature."""
    size = envelope.ByteSize()
    if size > limits.max_envelope_bytes:
        raise RemoteProtocolError(
            Reason.ENVELOPE_TOO_LARGE, f"envelope is {size} bytes, limit {limits.max_envelope_bytes}"
        )
    if len(envelope.signatures) != 1:
        raise _malformed(f"envelope has {len(envelope.signatures)} signatures, not exactly one")
    signature = envelope.signatures[0]
    if not is_keyid(signature.keyid):
        raise _malformed(f"keyid is not {2 * KEYID_BYTES} lowercase hex characters")
    if len(signature.sig) != SIGNATURE_BYTES:
        raise _malformed(f"signature is {len(signature.sig)} bytes, not {SIGNATURE_BYTES}")
    if not 0 < len(envelope.payload_type) <= MAX_PAYLOAD_TYPE_CHARS:
        raise _malformed(f"payloadType must be 1 to {MAX_PAYLOAD_TYPE_CHARS} characters")
    if not envelope.payload:
        raise _malformed("payload is empty")
    return signature


def verify_signature(envelope: envelope_pb2.Envelope, *keys: VerifyKey) -> None:
    """ENV-3: BAD_SIGNATURE unless one of `keys` signed the PAE of the bytes as received."""
    signed = pae(envelope.payload_type, envelope.payload)
    sig = envelope.signatures[0].sig
    if not any(key.verify(sig, signed) for key in keys):
        raise RemoteProtocolError(Reason.BAD_SIGNATURE, f"signature by keyid {envelope.signatures[0].keyid} fails")


def envelope_to_json(envelope: envelope_pb2.Envelope) -> dict[str, object]:
    """The DSSE JSON form, with standard padded base64 (bundles, test vectors)."""
    return {
        "payload": base64.b64encode(envelope.payload).decode("ascii"),
        "payloadType": envelope.payload_type,
        "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in envelope.signatures],
    }


def _json_fields(obj: object, fields: frozenset[str], what: str) -> dict[str, object]:
    if not isinstance(obj, dict) or obj.keys() != fields:
        raise _malformed(f"{what} must be an object with exactly the members {sorted(fields)}")
    return obj


def _json_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _malformed(f"{what} must be a string")
    return value


def _json_base64(value: object, what: str) -> bytes:
    text = _json_str(value, what)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _malformed(f"{what} is not standard padded base64") from error
    # Only the canonical encoding, so one envelope has one JSON form.
    if base64.b64encode(raw).decode("ascii") != text:
        raise _malformed(f"{what} is not canonical base64")
    return raw


def envelope_from_json(obj: object) -> envelope_pb2.Envelope:
    """Parse the DSSE JSON form strictly: exact members, types and base64; else MALFORMED_ENVELOPE."""
    fields = _json_fields(obj, frozenset({"payload", "payloadType", "signatures"}), "envelope")
    signatures = fields["signatures"]
    if not isinstance(signatures, list):
        raise _malformed("signatures must be an array")
    envelope = envelope_pb2.Envelope()
    try:
        envelope.payload = _json_base64(fields["payload"], "payload")
        envelope.payload_type = _json_str(fields["payloadType"], "payloadType")
        for index, member in enumerate(signatures):
            what = f"signatures[{index}]"
            signature = _json_fields(member, frozenset({"keyid", "sig"}), what)
            envelope.signatures.add(
                keyid=_json_str(signature["keyid"], f"{what}.keyid"),
                sig=_json_base64(signature["sig"], f"{what}.sig"),
            )
    except ValueError as error:  # a string protobuf cannot hold, e.g. a lone surrogate
        raise _malformed("envelope strings are not valid Unicode") from error
    return envelope
