"""Enrolment codes (PROTOCOL.md §6): their alphabet, how a typed code is normalized, and what is stored of it.

The biller issues a code with the paper bill; the consumer's app sends it once, signed, to bind its
party to the account. Both sides read codes the same way, so the rules live here.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

ENROLMENT_CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32 (ENR-7)
ENROLMENT_CODE_VALIDITY = timedelta(days=30)  # ENR-4
CODE_SALT_BYTES = 16  # ENR-8
_CODE_ALIASES = str.maketrans({"I": "1", "L": "1", "O": "0"})


def normalize_enrolment_code(text: str) -> str:
    """ENR-7: upper-case, drop spaces and hyphens, read I and L as 1 and O as 0, regroup by four with hyphens."""
    compact = text.upper().replace(" ", "").replace("-", "").translate(_CODE_ALIASES)
    return "-".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def code_hash(salt: bytes, code: str) -> bytes:
    """ENR-8: only SHA-256(salt || normalized code) is ever stored."""
    return hashlib.sha256(salt + normalize_enrolment_code(code).encode()).digest()
