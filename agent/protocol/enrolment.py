"""Enrolment codes (PROTOCOL.md §6): their alphabet, how a typed code is normalized, and what is stored of it.

The biller issues a code with the paper bill; the consumer's app sends it once, signed, to bind its
party to the account. Both sides read codes the same way, so the rules live here.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

ENROLMENT_CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32 (ENR-7)
ENROLMENT_CODE_VALIDITY = timedelta(days=30)  # ENR-4
CODE_SALT_BYTES = 16  # ENR-8, legacy (unkeyed) code hashes only
SECRET_BYTES = 32  # ENR-8: the biller's HMAC key, as long as the hash
_CODE_ALIASES = str.maketrans({"I": "1", "L": "1", "O": "0"})


def normalize_enrolment_code(text: str) -> str:
    """ENR-7: upper-case, drop spaces and hyphens, read I and L as 1 and O as 0, regroup by four with hyphens."""
    compact = text.upper().replace(" ", "").replace("-", "").translate(_CODE_ALIASES)
    return "-".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def code_hmac(secret: bytes, code: str) -> bytes:
    """ENR-8: what a biller stores of a code, HMAC-SHA-256 of the normalized code under the biller's secret
    (kept outside its database, so a stolen database alone cannot test guesses offline)."""
    return hmac.new(secret, normalize_enrolment_code(code).encode(), hashlib.sha256).digest()


def legacy_code_hash(salt: bytes, code: str) -> bytes:
    """ENR-8's unkeyed form, SHA-256(salt || normalized code): what was stored before the biller had a
    secret. Such codes still verify until they expire (ENR-4); none is issued any more."""
    return hashlib.sha256(salt + normalize_enrolment_code(code).encode()).digest()


def code_matches(code: str, *, salt: bytes, stored_hash: bytes, presented_hmac: bytes) -> bool:
    """ENR-3: does the presented code match a stored one, compared in constant time. `presented_hmac` is
    `code_hmac(secret, code)`, computed once per request whatever the account (equal work, ENR-3)."""
    expected = presented_hmac if not salt else legacy_code_hash(salt, code)
    return hmac.compare_digest(expected, stored_hash)
