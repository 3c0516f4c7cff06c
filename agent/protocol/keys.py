"""Ed25519 keys, key ids and key files (PROTOCOL.md §4.1); envelopes are `agent.protocol.dsse`.

The algorithm is fixed by the key (Ed25519, RFC 8032), never read from a message.

Signing and verifying use libsodium (PyNaCl): measured on the reference
machine it verifies about twice as fast as `cryptography` and signs as fast
(docs/PERFORMANCE.md), and it refuses small-order keys and non-canonical
signatures. `cryptography` only reads and writes PKCS#8 key files.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.exceptions import BadSignatureError

from agent.protocol.limits import KEYID_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES

SEED_BYTES = 32
_KEYID_FORM = re.compile(f"[0-9a-f]{{{2 * KEYID_BYTES}}}")


def is_keyid(text: str) -> bool:
    """Whether `text` has the form of a keyid: 32 lowercase hex characters (KEY-2)."""
    return _KEYID_FORM.fullmatch(text) is not None


def keyid_of(raw_public: bytes) -> str:
    """KEY-2: lowercase hex of the first 16 bytes of SHA-256 of the raw public key."""
    return hashlib.sha256(raw_public).digest()[:KEYID_BYTES].hex()


class VerifyKey:
    """An Ed25519 public key; equal and hashed by its raw 32 bytes."""

    __slots__ = ("_key", "_keyid", "_raw")

    def __init__(self, key: nacl.signing.VerifyKey) -> None:
        self._key = key
        self._raw = bytes(key)
        self._keyid = keyid_of(self._raw)

    @property
    def raw(self) -> bytes:
        """The raw 32-byte public key."""
        return self._raw

    @property
    def keyid(self) -> str:
        """The keyid (KEY-2)."""
        return self._keyid

    @classmethod
    def from_bytes(cls, raw: bytes) -> VerifyKey:
        """The key whose raw encoding is `raw`; ValueError unless it is a 32-byte Ed25519 key."""
        if len(raw) != PUBLIC_KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
        return cls(nacl.signing.VerifyKey(raw))

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether `signature` is this key's Ed25519 signature over `data`."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            self._key.verify(data, signature)
        except BadSignatureError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey(keyid={self.keyid!r})"


class InsecureKeyFileError(PermissionError):
    """A private key file is accessible to group or others."""


class SigningKey:
    """An Ed25519 private key. Its repr shows only the keyid, never key material."""

    __slots__ = ("_key", "_public_key")

    def __init__(self, key: nacl.signing.SigningKey) -> None:
        self._key = key
        self._public_key = VerifyKey(key.verify_key)

    @property
    def public_key(self) -> VerifyKey:
        return self._public_key

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """The key with this 32-byte RFC 8032 seed (deterministic test vectors)."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"an Ed25519 seed is {SEED_BYTES} bytes, not {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def keyid(self) -> str:
        """The keyid of the public key (KEY-2)."""
        return self._public_key.keyid

    @property
    def seed(self) -> bytes:
        """SECRET: the 32-byte seed, the whole private key. Only for generating test vectors."""
        return bytes(self._key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature over `data`."""
        return self._key.sign(data).signature

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as unencrypted PKCS#8 PEM to a new file created with mode 0600.

        The file is created with its final mode (never briefly world-readable) and
        never replaces an existing file: FileExistsError if `path` exists.
        """
        pem = Ed25519PrivateKey.from_private_bytes(self.seed).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
        except BaseException:
            # Leave no truncated key behind: a retry must not hit FileExistsError.
            os.unlink(path)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Read a key written by `save`; InsecureKeyFileError if group or others have any access."""
        with open(path, "rb") as file:
            # fstat the opened file, not the path, so the checked file is the one read.
            mode = os.fstat(file.fileno()).st_mode
            if mode & 0o077:
                raise InsecureKeyFileError(
                    f"private key file {Path(path)} has mode {stat.filemode(mode)}, "
                    f"open to group or others; run: chmod 600 {Path(path)}"
                )
            key = serialization.load_pem_private_key(file.read(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{Path(path)} does not hold an Ed25519 private key")
        return cls.from_seed(
            key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        )

    def __repr__(self) -> str:
        return f"SigningKey(keyid={self.keyid!r})"
