"""Erasure proven on disk: a disclosed hardship note leaves the SQLite file and its WAL (PRV-4, PRV-6, PRV-7).

A consumer discloses its circumstances, carrying a unique marker, beside the
opening of a thread on a live biller (real gRPC, a real SQLite file). After an
erasure request, and separately after the retention period, the raw bytes of
every file of the store — the database, its `-wal` and `-shm` — are searched for
the marker, while the signed agreement still verifies offline from what
GetThread serves and GetThread still works.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from agent.biller import DISCLOSURE_RETENTION
from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.terms import Terms
from agent.stores import sqlite_base
from parley.v1 import account_pb2, envelope_pb2, negotiation_pb2
from parley.v1.biller_service_pb2 import GetThreadRequest, NegotiateRequest, RequestErasureRequest
from tests.helpers.peer import BILLER_ID, Biller, Consumer, biller_payload, hardship_terms, running_biller

ACCOUNT = "acct-1001"
AGREED = negotiation_pb2.NEGOTIATION_OUTCOME_AGREED


def run(tmp_path: Path, scenario: Callable[[Biller], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_biller(tmp_path) as biller:
            await scenario(biller)

    asyncio.run(main())


def hardship_disclosure(marker: str) -> bytes:
    circumstances = negotiation_pb2.Circumstances(
        purpose=negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP, hardship=True, note=marker
    )
    return negotiation_pb2.Disclosure(salt=secrets.token_bytes(16), circumstances=circumstances).SerializeToString()


def store_bytes(db_path: Path) -> dict[str, bytes]:
    """The raw bytes of the database file and its companions (-wal, -shm, -journal) that exist now."""
    files = [db_path, *(db_path.with_name(db_path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]
    return {path.name: path.read_bytes() for path in files if path.exists()}


def holding(db_path: Path, needle: bytes) -> list[str]:
    return [name for name, data in store_bytes(db_path).items() if needle in data]


async def disclose_and_agree(
    biller: Biller, marker: str
) -> tuple[Consumer, envelope_pb2.Envelope, list[envelope_pb2.Envelope], bytes]:
    """Enrol, bill, and open a hardship thread with a disclosure carrying `marker`; the biller agrees at once."""
    alice = await biller.enrolled(ACCOUNT, "consumer:alice")
    bill = await biller.bill(ACCOUNT)
    disclosure = hardship_disclosure(marker)
    opening = alice.open(bill, hardship_terms(), disclosure=disclosure)
    answer = await biller.stub.Negotiate(NegotiateRequest(move=opening, disclosure=disclosure))
    assert answer.outcome == AGREED  # the hardship programme binds only because hardship was disclosed
    thread = [opening, answer.reply]
    # The test can see the marker: it is on disk (database or WAL) before erasure.
    assert holding(biller.db_path, marker.encode())
    return alice, bill, thread, disclosure


async def agreement_survives(
    biller: Biller, alice: Consumer, bill: envelope_pb2.Envelope, thread: list[envelope_pb2.Envelope], disclosure: bytes
) -> None:
    """GetThread still serves the signed thread, and the bundle made from it verifies offline."""
    thread_id = biller_payload(thread[0]).header.thread_id  # type: ignore[attr-defined]
    served = await biller.stub.GetThread(GetThreadRequest(query=alice.query(ACCOUNT, thread_id=thread_id)))
    assert (list(served.messages), served.outcome) == (thread, AGREED)
    bundle = Bundle({BILLER_ID: biller.chain.envelopes, alice.party_id: [alice.key_set]}, bill, list(served.messages))
    agreement = verify_bundle(bundle, pins={BILLER_ID: biller.chain.fingerprint})
    assert agreement.terms == Terms.from_proto(hardship_terms())
    # The opening still commits to the erased disclosure: its salted digest, and nothing else (PRV-2).
    assert biller_payload(thread[0]).disclosure_digest == hashlib.sha256(disclosure).digest()  # type: ignore[attr-defined]


def test_an_erasure_request_removes_the_disclosure_from_the_database_and_its_wal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = f"HARDSHIP-MARKER-{secrets.token_hex(12)}"
    caplog.set_level(logging.DEBUG)

    async def scenario(biller: Biller) -> None:
        alice, bill, thread, disclosure = await disclose_and_agree(biller, marker)
        erasure = await biller.stub.RequestErasure(RequestErasureRequest(request=alice.erasure(ACCOUNT)))
        confirmation = account_pb2.ErasureConfirmation.FromString(erasure.confirmation.payload)
        assert confirmation.erased_count == 1
        for needle in (marker.encode(), disclosure):
            assert holding(biller.db_path, needle) == [], "erased disclosure still on disk"
        await agreement_survives(biller, alice, bill, thread, disclosure)

    run(tmp_path, scenario)
    assert marker not in caplog.text  # PRV-7: never logged either


def test_retention_expiry_removes_the_disclosure_from_the_database_and_its_wal(tmp_path: Path) -> None:
    marker = f"HARDSHIP-MARKER-{secrets.token_hex(12)}"

    async def scenario(biller: Biller) -> None:
        alice, bill, thread, disclosure = await disclose_and_agree(biller, marker)
        assert await biller.agent.purge_expired() == (0, 0)  # within retention: kept
        assert holding(biller.db_path, marker.encode())
        biller.clock.advance(DISCLOSURE_RETENTION + timedelta(days=1))
        _, erased = await biller.agent.purge_expired()
        assert erased == 1
        for needle in (marker.encode(), disclosure):
            assert holding(biller.db_path, needle) == [], "expired disclosure still on disk"
        await agreement_survives(biller, alice, bill, thread, disclosure)

    run(tmp_path, scenario)


def test_a_reader_pinning_the_wal_is_reported_and_the_next_purge_finishes_the_erasure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A shorter busy timeout (real SQLite, 0.3 s instead of 10 s) so that the checkpoint gives up quickly.
    monkeypatch.setattr(sqlite_base, "BUSY_TIMEOUT_MS", 300)
    marker = f"HARDSHIP-MARKER-{secrets.token_hex(12)}"

    async def scenario(biller: Biller) -> None:
        alice, *_ = await disclose_and_agree(biller, marker)
        reader = sqlite3.connect(biller.db_path, isolation_level=None)  # e.g. an operator's backup, mid-read
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT COUNT(*) FROM disclosures").fetchone() == (1,)
            erasure = await biller.stub.RequestErasure(RequestErasureRequest(request=alice.erasure(ACCOUNT)))
            assert account_pb2.ErasureConfirmation.FromString(erasure.confirmation.payload).erased_count == 1
            assert "WAL checkpoint incomplete" in caplog.text
            assert holding(biller.db_path, marker.encode()) == ["biller.sqlite-wal"]  # pinned by the reader
        finally:
            reader.close()
        assert await biller.agent.purge_expired() == (0, 0)  # the upkeep's next purge: nothing new to erase...
        assert holding(biller.db_path, marker.encode()) == []  # ...but its checkpoint completes the erasure

    run(tmp_path, scenario)
