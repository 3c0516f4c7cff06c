"""Hardship disclosures (PROTOCOL.md §11, PRV-*): the commitment a ThreadOpen makes and the disclosure it commits to.

A consumer may open a thread with its circumstances (income date, hardship) without putting them in the
signed thread: the opening carries `disclosure_digest` = SHA-256 of the serialized `Disclosure` (salted,
PRV-3) and the disclosure travels beside it, so it can be erased later (PRV-4) while the signed
messages stay. These are the rules for checking such a pair, sans I/O: the biller applies them on
receipt, and an offline verifier or a consumer can apply the same ones.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import date

from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.limits import DISCLOSURE_SALT_BYTES, MAX_NEXT_PAY_DATE_DAYS, MAX_NOTE_CHARS
from agent.protocol.messages import parse_payload
from agent.protocol.terms import parse_date
from parley.v1 import negotiation_pb2

DISCLOSURE_PURPOSES = (
    negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_ARRANGEMENT,
    negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP,
)


def _malformed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.MALFORMED_PAYLOAD, detail)


def disclosure_digest(disclosure: bytes) -> bytes:
    """The commitment a ThreadOpen carries for the serialized disclosure beside it (PRV-3)."""
    return hashlib.sha256(disclosure).digest()


def check_disclosure(committed: bytes, disclosure: bytes, opened_on: date) -> negotiation_pb2.Disclosure | None:
    """PRV-3, PRV-9: `disclosure` is the one the opening committed to (`committed`, b"" for none), and parses strictly.

    Returns the parsed disclosure, or None when there is no commitment and no disclosure.
    RemoteProtocolError(MALFORMED_PAYLOAD) for a disclosure without commitment or the reverse, a
    mismatch, a wrong salt size, circumstances without a defined purpose, a bad date, a next pay date more
    than MAX_NEXT_PAY_DATE_DAYS from `opened_on` (the UTC date of the opening's create_time) or a long note.
    """
    if not committed:
        if disclosure:
            raise _malformed("a disclosure travels only beside a ThreadOpen that commits to it")
        return None
    if not disclosure:
        raise _malformed("the opening commits to a disclosure that was not sent")
    if not hmac.compare_digest(disclosure_digest(disclosure), committed):
        raise _malformed("the disclosure is not the one the opening commits to")
    try:
        parsed = parse_payload(negotiation_pb2.Disclosure, disclosure)
    except RemoteProtocolError as error:
        raise _malformed(f"the disclosure does not parse: {error.detail}") from error
    if len(parsed.salt) != DISCLOSURE_SALT_BYTES:
        raise _malformed(f"the disclosure salt must be {DISCLOSURE_SALT_BYTES} bytes")
    circumstances = parsed.circumstances
    if not parsed.HasField("circumstances") or circumstances.purpose not in DISCLOSURE_PURPOSES:
        raise _malformed("the disclosure must state circumstances with a defined purpose")
    if circumstances.next_pay_date:
        try:
            pay_day = parse_date(circumstances.next_pay_date)
        except LocalProtocolError as error:
            raise _malformed("next_pay_date is not a YYYY-MM-DD date") from error
        if abs((pay_day - opened_on).days) > MAX_NEXT_PAY_DATE_DAYS:  # a difference: cannot overflow
            raise _malformed(
                f"next_pay_date {pay_day} is more than {MAX_NEXT_PAY_DATE_DAYS} days from the opening's "
                f"date {opened_on} (PRV-9)"
            )
    if len(circumstances.note) > MAX_NOTE_CHARS:
        raise _malformed(f"the disclosure note is longer than {MAX_NOTE_CHARS} characters")
    return parsed


__all__ = ["DISCLOSURE_PURPOSES", "check_disclosure", "disclosure_digest"]
