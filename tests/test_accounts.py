"""Accounts and enrolment codes (reference_biller/accounts.py): `parley biller accounts` and `codes --account`."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.cli import main
from agent.clock import ManualClock, SystemClock
from agent.protocol.errors import ProtocolError
from agent.stores import open_biller_store
from agent.stores.base import (
    AccountRecord,
    BillerStore,
    Enrolment,
    EnrolmentCodeRecord,
    KeySetRecord,
    ReplayRecord,
    WebhookCursor,
)
from reference_biller.accounts import with_stored_segments
from reference_biller.config import SAMPLE, load_config
from reference_biller.service import open_biller
from tests.helpers.peer import Consumer

NOW = datetime(2026, 12, 1, 9, tzinfo=UTC)


def output(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


async def bind(store: BillerStore, account_id: str, party_id: str) -> None:
    """Bind `account_id` to a new party straight in the store (a code spent, the party's key set stored)."""
    code_hash = hashlib.sha256(party_id.encode()).digest()
    await store.add_enrolment_code(EnrolmentCodeRecord(account_id, b"s" * 16, code_hash, NOW, used=False), NOW)
    replay = ReplayRecord(party_id, party_id.encode()[:16].ljust(16), code_hash, NOW + timedelta(hours=1))
    key_set = KeySetRecord(party_id, 1, b"key-set", (f"key-of-{party_id}",))
    await store.enrol(Enrolment(account_id, code_hash, party_id, b"f" * 32, key_set, NOW, replay))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_store_keeps_segments_cursors_and_revokes_codes(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    location = str(tmp_path / "b.sqlite") if backend == "sqlite" else request.getfixturevalue("postgres_dsn")

    async def run() -> None:
        store = await open_biller_store(location)
        try:
            await store.create_account("b-1", "B", NOW)
            await store.create_account("a-1", "A", NOW)
            assert [record.account_id for record in await store.list_accounts()] == ["a-1", "b-1"]
            await store.set_account_segment("a-1", "standard")
            await store.set_account_segment("a-1", "hardship")
            assert await store.account_segments() == {"a-1": "hardship"}
            assert await store.webhook_cursors("https://x") == {}
            for party_id in ("consumer:first", "consumer:second"):  # a-1 re-bound: two holders, two logs
                await bind(store, "a-1", party_id)
            await store.save_webhook_cursor("https://x", WebhookCursor("a-1", "consumer:first", 3))
            failing = WebhookCursor("a-1", "consumer:first", 3, 2, NOW + timedelta(seconds=20), "HTTP 503")
            await store.save_webhook_cursor("https://x", failing)
            second = WebhookCursor("a-1", "consumer:second", 1)
            await store.save_webhook_cursor("https://x", second)
            assert await store.webhook_cursors("https://x") == {
                ("a-1", "consumer:first"): failing,
                ("a-1", "consumer:second"): second,
            }
            assert await store.webhook_cursors("https://y") == {}
            assert await store.revoke_enrolment_codes("a-1", NOW) == 0
        finally:
            await store.close()

    asyncio.run(run())


def test_accounts_add_list_show_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert main(["biller", "init", *state]) == 0
    add = ["biller", "accounts", "add"]
    assert main([*add, "w-1", "--holder", "Ann Water", *state]) == 0
    assert main([*add, "w-1", "--holder", "Someone Else", *state]) == 1
    assert "already exists (holder 'Ann Water'): nothing changed" in output(capsys)
    assert main([*add, "bad id", "--holder", "X", *state]) == 2
    assert main([*add, "x" * 65, "--holder", "X", *state]) == 2
    assert main([*add, "w-2", "--holder", "X", "--segment", "vip", *state]) == 1
    assert "no segment 'vip'" in output(capsys)
    assert main(["biller", "accounts", "list", "--json", *state]) == 0
    listed = {entry["account_id"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert listed["w-1"]["configured"] is False
    assert listed["w-1"]["segment"] == "standard"
    assert listed["acct-1001"]["configured"] is True  # the sample configuration's accounts remain
    assert "w-2" not in listed
    assert main(["biller", "accounts", "show", "w-1", *state]) == 0
    assert "Ann Water" in output(capsys)
    assert main(["biller", "accounts", "show", "nobody", *state]) == 1


def test_a_new_code_supersedes_the_unspent_ones_and_revoke_leaves_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert main(["biller", "init", *state]) == 0
    assert main(["biller", "accounts", "add", "w-1", "--holder", "Ann Water", *state]) == 0
    codes = ["biller", "codes", "--account", "w-1", "--json", *state]
    capsys.readouterr()
    assert main(codes) == 0
    first = json.loads(capsys.readouterr().out)["accounts"][0]
    assert main([*codes, "--endpoint", "127.0.0.1:7443"]) == 0
    second = json.loads(capsys.readouterr().out)["accounts"][0]
    assert second["superseded"] == 1
    assert second["enrolment_uri"].startswith("parley:enrol?endpoint=127.0.0.1%3A7443")

    async def enrol_with(code: str) -> str | None:
        biller = await open_biller(load_config(SAMPLE), tmp_path / "state", SystemClock())
        try:
            consumer = Consumer("consumer:w-1", ManualClock(datetime.now(UTC)))
            try:
                await biller.agent.enrol(consumer.enrolment("w-1", code))
            except ProtocolError as error:
                return error.reason.name
            return None
        finally:
            await biller.close()

    assert asyncio.run(enrol_with(first["code"])) is not None  # superseded: refused
    assert main(["biller", "codes", "--account", "w-1", "--revoke", *state]) == 0
    assert "1 unspent code(s) revoked" in output(capsys)
    assert asyncio.run(enrol_with(second["code"])) is not None  # revoked: refused
    assert main(codes) == 0
    third = json.loads(capsys.readouterr().out)["accounts"][0]
    assert third["superseded"] == 0
    assert asyncio.run(enrol_with(third["code"])) is None


def test_qr_codes_in_the_terminal_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert main(["biller", "init", *state]) == 0
    assert main(["biller", "accounts", "add", "w-1", "--holder", "Ann Water", *state]) == 0
    codes = ["biller", "codes", "--account", "w-1", *state]
    assert main([*codes, "--qr"]) == 2
    assert "give --endpoint" in output(capsys)
    svg, png = tmp_path / "code.svg", tmp_path / "code.png"
    assert main([*codes, "--endpoint", "127.0.0.1:7443", "--qr", "--qr-svg", str(svg), "--qr-png", str(png)]) == 0
    assert "█" in output(capsys)
    assert svg.read_text().startswith("<?xml")
    assert png.read_bytes().startswith(b"\x89PNG")
    assert main(["biller", "codes", "--account", "nobody", *state]) == 2  # unusable input: refused before issuing
    assert "no account 'nobody'" in output(capsys)
    assert main(["biller", "codes", "--revoke", *state]) == 2


def test_qr_files_are_written_with_json_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json printed the document and returned before writing the --qr-svg/--qr-png files, exit 0."""
    state = ["--state-dir", str(tmp_path / "state")]
    assert main(["biller", "init", *state]) == 0
    capsys.readouterr()
    svg, png = tmp_path / "code.svg", tmp_path / "code.png"
    codes = ["biller", "codes", "--account", "acct-1001", "--endpoint", "127.0.0.1:7443", "--json", *state]
    assert main([*codes, "--qr-svg", str(svg), "--qr-png", str(png)]) == 0
    document = json.loads(capsys.readouterr().out)  # stdout holds the document alone
    assert document["accounts"][0]["enrolment_uri"].startswith("parley:enrol?endpoint=127.0.0.1%3A7443")
    assert svg.read_text().startswith("<?xml")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_stored_segments_reach_the_policy_without_listing_every_account(tmp_path: Path) -> None:
    """What the serving biller's policy reads: a configured account keeps its segment, an added one has the
    segment recorded for it, an API-made one or one whose segment is gone has the default. Only the recorded
    segments are read (`account_segments`), never the list of accounts."""
    sample = load_config(SAMPLE)
    configured = sample.accounts[0]
    other = "gentle"
    gentle = dataclasses.replace(sample.segments[configured.segment], name=other, deferral_max_days=60)
    config = dataclasses.replace(sample, segments={**sample.segments, other: gentle})

    async def run() -> dict[str, str]:
        store = await open_biller_store(str(tmp_path / "b.sqlite"))
        try:
            await store.create_account(configured.account_id, "Household One", NOW)
            await store.set_account_segment(configured.account_id, other)  # the configuration still decides
            await store.create_account("added", "Added", NOW)
            await store.set_account_segment("added", other)
            await store.create_account("api-made", "Made Through The API", NOW)  # no segment recorded
            await store.create_account("gone", "Segment Removed", NOW)
            await store.set_account_segment("gone", "a-segment-no-longer-configured")

            async def no_listing() -> list[AccountRecord]:
                raise AssertionError("the segments were read by listing every account")

            store.list_accounts = no_listing  # type: ignore[method-assign]
            merged = await with_stored_segments(config, store)
        finally:
            await store.close()
        ids = (configured.account_id, "added", "api-made", "gone", "never-heard-of")
        return {account_id: merged.segment_of(account_id).name for account_id in ids}

    default = config.segment_of("never-heard-of").name
    assert asyncio.run(run()) == {
        configured.account_id: config.segments[configured.segment].name,
        "added": config.segments[other].name,
        "api-made": default,
        "gone": default,
        "never-heard-of": default,
    }
