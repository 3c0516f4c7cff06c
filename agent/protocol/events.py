"""The account event log's fixed facts (PROTOCOL.md §5.2): its thread id and the reminder levels."""

from __future__ import annotations

import hashlib

from agent.protocol.limits import THREAD_ID_BYTES

MAX_REMINDER_LEVEL = 3  # EVT-3: a courteous reminder escalates 1, 2, 3


def events_thread_id(biller_party_id: str, account_id: str) -> bytes:
    """The thread id of an account's event log (§5.2)."""
    seed = b"parley/v1/events/" + biller_party_id.encode() + b"\x00" + account_id.encode()
    return hashlib.sha256(seed).digest()[:THREAD_ID_BYTES]
