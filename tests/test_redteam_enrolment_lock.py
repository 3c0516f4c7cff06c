"""Red team issue 13 items 7, 8, 13: enrolment does not reveal which accounts exist, its lock counts every
wrong code (even concurrent ones, on both store back ends), and a stolen database cannot test codes offline."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections import Counter
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from agent.biller.enrolment import EnrolmentPhase
from agent.protocol.enrolment import code_hmac, legacy_code_hash, normalize_enrolment_code
from agent.protocol.errors import Reason
from agent.protocol.limits import DEFAULT_LIMITS
from agent.stores.base import EnrolmentCodeRecord
from agent.transport.status import error_from_rpc
from parley.v1.biller_service_pb2 import EnrolRequest
from tests.helpers.peer import Biller, Consumer
from tests.test_biller_grpc import run

ACCOUNT, MISSING = "acct-1001", "acct-9999"
WRONG = "0000-0000-0000"
ATTEMPTS = DEFAULT_LIMITS.enrolment_max_attempts


async def answer(biller: Biller, consumer: Consumer, account_id: str, code: str) -> tuple[Reason | None, str]:
    """The reason and message an Enrol gets (or "ok")."""
    try:
        await biller.stub.Enrol(EnrolRequest(request=consumer.enrolment(account_id, code)))
    except grpc.aio.AioRpcError as failure:
        error = error_from_rpc(failure)
        return error.reason, failure.details() or ""
    return None, "ok"


def test_a_missing_account_and_a_wrong_code_get_the_same_answers_lock_included(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        await biller.agent.create_account(ACCOUNT, "Alice Example")
        await biller.agent.issue_enrolment_code(ACCOUNT)
        mallory = Consumer("consumer:mallory", biller.clock)
        existing = [await answer(biller, mallory, ACCOUNT, WRONG) for _ in range(ATTEMPTS + 2)]
        missing = [await answer(biller, mallory, MISSING, WRONG) for _ in range(ATTEMPTS + 2)]
        assert missing == existing
        assert [r for r, _ in existing] == [Reason.ENROLMENT_CODE_INVALID] * ATTEMPTS + [Reason.ENROLMENT_LOCKED] * 2

    run(tmp_path, scenario)


async def concurrent_wrong_codes(biller: Biller, tries: int = 24) -> Counter[Reason | None]:
    await biller.agent.create_account(ACCOUNT, "Alice Example")
    await biller.agent.issue_enrolment_code(ACCOUNT)
    mallory = Consumer("consumer:mallory", biller.clock)
    answers = await asyncio.gather(*(answer(biller, mallory, ACCOUNT, WRONG) for _ in range(tries)))
    return Counter(r for r, _ in answers)


def test_concurrent_wrong_codes_are_compared_at_most_the_limit_sqlite(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        counted = await concurrent_wrong_codes(biller)
        assert counted == {Reason.ENROLMENT_CODE_INVALID: ATTEMPTS, Reason.ENROLMENT_LOCKED: 24 - ATTEMPTS}

    run(tmp_path, scenario)


def test_concurrent_wrong_codes_are_compared_at_most_the_limit_postgres(tmp_path: Path, postgres_dsn: str) -> None:
    async def scenario(biller: Biller) -> None:
        counted = await concurrent_wrong_codes(biller)
        assert counted == {Reason.ENROLMENT_CODE_INVALID: ATTEMPTS, Reason.ENROLMENT_LOCKED: 24 - ATTEMPTS}

    run(tmp_path, scenario, store=postgres_dsn)


def test_a_stolen_database_holds_no_code_test_without_the_secret(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        await biller.agent.create_account(ACCOUNT, "Alice Example")
        code = await biller.agent.issue_enrolment_code(ACCOUNT)
        with sqlite3.connect(biller.db_path) as db:
            salt, stored = db.execute("SELECT salt, code_hash FROM enrolment_codes").fetchone()
        normalized = normalize_enrolment_code(code).encode()
        # What the database holds is neither an unkeyed hash of the code nor computable from it alone.
        assert stored not in {hashlib.sha256(salt + normalized).digest(), hashlib.sha256(normalized).digest()}
        assert stored == code_hmac(biller.agent.party.enrolment._secret, code)
        alice = Consumer("consumer:alice", biller.clock)
        assert await answer(biller, alice, ACCOUNT, code) == (None, "ok")

    run(tmp_path, scenario)


def test_a_code_stored_before_the_secret_still_enrols_until_it_expires(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        await biller.agent.create_account(ACCOUNT, "Alice Example")
        salt, code = b"s" * 16, "7KQ2-M9XD-4RTB"
        now = biller.clock.now()
        legacy = EnrolmentCodeRecord(ACCOUNT, salt, legacy_code_hash(salt, code), now + timedelta(days=1), used=False)
        await biller.agent.party.store.add_enrolment_code(legacy, now)
        alice = Consumer("consumer:alice", biller.clock)
        biller.clock.advance(timedelta(days=1))
        assert (await answer(biller, alice, ACCOUNT, code))[0] is Reason.ENROLMENT_CODE_EXPIRED
        await biller.agent.party.store.add_enrolment_code(
            EnrolmentCodeRecord(ACCOUNT, salt * 2, legacy_code_hash(salt * 2, code), now + timedelta(days=2), False),
            now,
        )
        assert await answer(biller, alice, ACCOUNT, code) == (None, "ok")

    run(tmp_path, scenario)


@pytest.mark.parametrize("secret", [b"", b"short"])
def test_a_short_enrolment_secret_is_refused(tmp_path: Path, secret: bytes) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        EnrolmentPhase(None, secret)  # type: ignore[arg-type]
