"""The household's private space, part 1: status, approvals by id, agreement files, enrolment by link.

Real gRPC against the reference biller on 127.0.0.1 (helpers shared with test_consumer_run.py). The
bot's passes run through `Household` on a ManualClock that moves both sides; the commands the person
types (`status`, `approve`, `decline`, `enrol`, `export-agreements`) run through `parley` itself.
"""

from __future__ import annotations

import asyncio
import json
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from agent.biller import BillerAgent
from agent.clock import ManualClock, SystemClock
from agent.conformance.peers import free_port
from agent.consumer import (
    ApprovalBook,
    ApprovalClosed,
    ApprovalPending,
    ApprovalRequest,
    InvalidEnrolmentLink,
    ReceivedBill,
    UnknownApproval,
    parse_enrolment_uri,
)
from agent.consumer.approvals import REQUEST_ID_HEX_CHARS, Approvals
from agent.consumer.plugins import terms_digest
from agent.protocol.enrolment import normalize_enrolment_code
from agent.protocol.terms import (
    AdvertisedOptions,
    BillFacts,
    Line,
    LineKind,
    Money,
    TermsKind,
    build_terms,
    monthly_dates,
)
from agent.stores.base import ApprovalState, BillerLinkRecord, IntentRecord, IntentState, LinkedAccountRecord
from agent.stores.consumer_sqlite import SqliteConsumerStore
from parley.v1 import envelope_pb2
from reference_biller import sample
from reference_consumer.profile import ProfileError, load_profile, parse_profile
from reference_consumer.runner import (
    EXIT_APPROVALS_PENDING,
    KEY_FILE,
    STORE_FILE,
    Approval,
    Household,
    PassReport,
    render,
)
from reference_consumer.words import describe_terms
from tests.test_consumer_run import (
    ACCOUNT,
    BILLER,
    SHORT,
    START,
    cli,
    code_for,
    reference_biller,
    wide_console,  # noqa: F401 - the autouse fixture: wide tables
    write_profile,
)


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


async def bill_600(agent: BillerAgent) -> None:
    await agent.issue_bill(ACCOUNT, eur("600.00"), date(2026, 3, 26), "Winter energy", bill_id="winter")


async def one_pass(profile: Path, state: Path, clock: ManualClock, approval: Approval = Approval.ASK) -> PassReport:
    household = await Household.open(load_profile(profile), state, clock=clock, approval=approval)
    try:
        report = await household.run_pass()
    finally:
        await household.close()
    render(report, Console(width=240))
    return report


async def status_document(profile: Path, state: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert await cli("consumer", "status", "--profile", str(profile), "--state-dir", str(state), "--json") == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


def floats_in(value: object) -> list[object]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for item in value.values() for f in floats_in(item)]
    if isinstance(value, list):
        return [f for item in value for f in floats_in(item)]
    return []


async def approvals_in(state: Path) -> list[tuple[str, ApprovalState]]:
    store = await SqliteConsumerStore.open(state / STORE_FILE)
    try:
        return [(record.request_id, record.state) for record in await store.approvals()]
    finally:
        await store.close()


def test_an_approval_by_id_sends_exactly_the_terms_shown_and_status_shows_the_proof(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = ManualClock(START)
    state, profile = tmp_path / "state", tmp_path / "household.toml"

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            code = await code_for(running)
            write_profile(
                profile,
                target=f"127.0.0.1:{running.port}",
                fingerprint=running.biller.fingerprint.hex(),
                code=code,
                household=SHORT,
            )
            # The bot would defer with a fee outside the mandate: asked, stored, nothing sent; exit 3.
            report = await one_pass(profile, state, clock)
            assert report.exit_code == EXIT_APPROVALS_PENDING
            [line] = report.approvals
            request = line.request
            assert line.answer == "pending"
            assert "parley consumer approve" in capsys.readouterr().out
            assert await running.biller.store.open_thread_bills(ACCOUNT, clock.now()) == []

            # The same pass again asks the same request under the same id: nothing new to answer.
            report = await one_pass(profile, state, clock)
            assert [line.request.request_id for line in report.approvals] == [request.request_id]
            assert await approvals_in(state) == [(request.request_id, ApprovalState.PENDING)]

            document = await status_document(profile, state, capsys)
            assert {"bills", "agreements", "payments", "approvals", "events", "upcoming"} <= set(document)
            [approval] = document["approvals"]
            assert approval["id"] == request.request_id
            assert approval["state"] == "pending"
            assert approval["terms_digest"] == terms_digest(request.terms).hex()
            assert approval["terms"]["text"] == describe_terms(request.terms)
            assert approval["terms"]["total"] == {"minor": 60500, "currency": "EUR", "text": "EUR 605.00"}
            assert any("fee EUR 5.00 exceeds" in why for why in approval["why"])
            [bill] = document["bills"]
            assert (bill["biller_name"], bill["bill_id"], bill["state"]) == (
                "energy.example",
                "winter",
                "awaiting_approval",
            )
            assert bill["amount"] == {"minor": 60000, "currency": "EUR", "text": "EUR 600.00"}
            assert floats_in(document) == []
            text = json.dumps(document)
            assert code not in text
            assert normalize_enrolment_code(code).replace("-", "") not in text
            assert (state / KEY_FILE).read_text().strip().splitlines()[1] not in text

            # Unknown id: one line, exit 1, nothing changed.
            capsys.readouterr()
            assert await cli("consumer", "approve", "0000000000000000", "--state-dir", str(state)) == 1
            assert len(capsys.readouterr().out.strip().splitlines()) == 1
            assert await approvals_in(state) == [(request.request_id, ApprovalState.PENDING)]

            assert await cli("consumer", "approve", request.request_id, "--state-dir", str(state)) == 0
            assert "approved" in capsys.readouterr().out
            assert await cli("consumer", "decline", request.request_id, "--state-dir", str(state)) == 1  # answered
            assert await approvals_in(state) == [(request.request_id, ApprovalState.APPROVED)]

            # The next pass sends exactly the approved terms: inside the biller's options, agreed at once.
            report = await one_pass(profile, state, clock)
            assert report.exit_code == 0
            assert [n.outcome for n in report.negotiations] == ["agreed"]
            [negotiation] = report.negotiations
            assert negotiation.terms is not None
            assert terms_digest(negotiation.terms) == terms_digest(request.terms)
            assert await approvals_in(state) == [(request.request_id, ApprovalState.SENT)]
            [agreement_path] = report.agreement_files
            assert agreement_path.stat().st_mode & 0o777 == 0o600

            document = await status_document(profile, state, capsys)
            [agreement] = document["agreements"]
            assert agreement["verifies"] is True
            assert agreement["file"] == str(agreement_path)
            assert [u["due_date"] for u in document["upcoming"]] == ["2026-03-29"]
            assert document["bills"][0]["state"] == "agreed"
            assert [e["kind"] for e in document["events"]][:1] == ["bill_issued"]

            # The human view speaks in names and words.
            capsys.readouterr()
            assert await cli("consumer", "status", "--config", str(profile), "--state-dir", str(state)) == 0
            human = capsys.readouterr().out
            assert "energy.example" in human
            assert "pay later: EUR 605.00 on 2026-03-29" in human
            assert "DEFERRAL" not in human
            assert BILLER not in human

            # The proof travels: exported, and a damaged copy is reported, never a crash.
            out_dir = tmp_path / "exported"
            argv = ("consumer", "export-agreements", "--profile", str(profile), "--state-dir", str(state))
            assert await cli(*argv, "--out", str(out_dir)) == 0
            assert (out_dir / agreement_path.name).read_bytes() == agreement_path.read_bytes()
            bundle = json.loads(agreement_path.read_text())
            bundle["thread"] = bundle["thread"][:1]
            agreement_path.write_text(json.dumps(bundle))
            document = await status_document(profile, state, capsys)
            [agreement] = document["agreements"]
            assert agreement["verifies"] is False
            assert document["problems"]

    asyncio.run(main())


def test_a_stale_approval_lapses_and_a_new_request_is_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = ManualClock(START)
    state, profile = tmp_path / "state", tmp_path / "household.toml"

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            target, fingerprint = f"127.0.0.1:{running.port}", running.biller.fingerprint.hex()
            write_profile(
                profile, target=target, fingerprint=fingerprint, code=await code_for(running), household=SHORT
            )
            [first] = (await one_pass(profile, state, clock)).approvals
            assert await cli("consumer", "approve", first.request.request_id, "--state-dir", str(state)) == 0

            # Pay day moves: the bot now plans another deferral. The approval was for other terms: it lapses,
            # the new terms are asked, and nothing is sent.
            write_profile(
                profile, target=target, fingerprint=fingerprint, code=None, household=SHORT.replace("28", "27")
            )
            report = await one_pass(profile, state, clock)
            [second] = report.approvals
            assert second.answer == "pending"
            assert second.request.request_id != first.request.request_id
            assert terms_digest(second.request.terms) != terms_digest(first.request.terms)
            assert dict(await approvals_in(state)) == {
                first.request.request_id: ApprovalState.LAPSED,
                second.request.request_id: ApprovalState.PENDING,
            }
            assert await running.biller.store.open_thread_bills(ACCOUNT, clock.now()) == []
            assert report.exit_code == EXIT_APPROVALS_PENDING

            # Declined: the bot does not send it, and does not ask again.
            capsys.readouterr()
            argv = ("consumer", "decline", second.request.request_id, "--state-dir", str(state), "--reason", "no fees")
            assert await cli(*argv) == 0
            report = await one_pass(profile, state, clock)
            assert [n.outcome for n in report.negotiations] == ["not opened"]
            assert report.exit_code == 0
            assert await running.biller.store.open_thread_bills(ACCOUNT, clock.now()) == []
            document = await status_document(profile, state, capsys)
            assert document["bills"][0]["state"] == "declined"
            declined = next(a for a in document["approvals"] if a["id"] == second.request.request_id)
            assert (declined["state"], declined["note"]) == ("declined", "no fees")

    asyncio.run(main())


def test_status_reads_the_state_alone_and_never_calls_a_biller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = ManualClock(START)
    state, profile = tmp_path / "state", tmp_path / "household.toml"

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            write_profile(
                profile,
                target=f"127.0.0.1:{running.port}",
                fingerprint=running.biller.fingerprint.hex(),
                code=await code_for(running),
                household=SHORT,
            )
            await one_pass(profile, state, clock, Approval.APPROVE)
        # The biller is gone, its port unused; any attempt to open a channel fails the test.
        write_profile(
            profile,
            target=f"127.0.0.1:{free_port()}",
            fingerprint=running.biller.fingerprint.hex(),
            code=None,
            household=SHORT,
        )

        def no_network(*args: object, **kwargs: object) -> None:
            raise AssertionError("status opened a channel to a biller")

        monkeypatch.setattr("agent.consumer.sessions.BillerClient.connect", no_network)
        monkeypatch.setattr("grpc.aio.insecure_channel", no_network)
        monkeypatch.setattr("grpc.aio.secure_channel", no_network)
        document = await status_document(profile, state, capsys)
        assert [b["bill_id"] for b in document["bills"]] == ["winter"]
        assert document["agreements"][0]["verifies"] is True

        # Another household's profile cannot read this state; an empty state is an empty document.
        other = tmp_path / "other.toml"
        other.write_text(profile.read_text().replace("household-7", "household-8"))
        capsys.readouterr()
        assert await cli("consumer", "status", "--profile", str(other), "--state-dir", str(state), "--json") == 2
        captured = capsys.readouterr()
        message = captured.out + captured.err
        assert "another household" in message
        assert "winter" not in message
        document = await status_document(other, tmp_path / "nothing-yet", capsys)
        assert document["state"] == "empty"
        assert document["bills"] == []
        assert not (tmp_path / "nothing-yet").exists()

    asyncio.run(main())


# --- Enrolment by link ------------------------------------------------------------------------------------

BARE = """
[household]
party_id = "consumer:household-7"
currency = "EUR"
balance = "5000.00"
buffer = "100.00"

[income]
amount = "3000.00"
pay_day = 25

[mandate]
max_fee = "10.00"
max_instalments = 6
max_total_over_bill = "15.00"
"""


def test_enrolment_by_the_link_the_biller_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state, profile = tmp_path / "state", tmp_path / "household.toml"
    profile.write_text(BARE)

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, SystemClock()) as running:
            link = sample.enrolment_uri(
                f"127.0.0.1:{running.port}", BILLER, running.biller.fingerprint, ACCOUNT, await code_for(running)
            )
            for bad in (
                "https://example.com/enrol",
                link.replace("fingerprint=", "fingerprint=zz"),
                link.replace("&code=", "&code=!!"),
                link.replace(f"%3A{running.port}", ""),  # no port
                link + "&code=AAAA-AAAA-AAAA",
                link.replace("&account=", "&colour=red&account="),
            ):
                capsys.readouterr()
                argv = ("consumer", "enrol", bad, "--profile", str(profile), "--state-dir", str(state))
                assert await cli(*argv) == 2, bad
                assert len(capsys.readouterr().out.strip().splitlines()) == 1
                assert profile.read_text() == BARE
                assert not state.exists()

            capsys.readouterr()
            argv = ("consumer", "enrol", link, "--profile", str(profile), "--state-dir", str(state))
            assert await cli(*argv) == 0
            assert "enrolled account acct-1001 with energy.example" in capsys.readouterr().out
            [added] = load_profile(profile).connected()
            assert added.connection is not None
            assert (added.biller_id, added.connection.account_id) == (BILLER, ACCOUNT)
            assert added.connection.code is None
            account = await running.biller.agent.account(ACCOUNT)
            assert account is not None
            assert account.consumer_party_id == "consumer:household-7"

            # The bot then works from the profile the link filled in: no code needed.
            run = ("consumer", "run", "--profile", str(profile), "--state-dir", str(state), "--once")
            assert await cli(*run) == 0
            assert "enrolled now" not in capsys.readouterr().out

    asyncio.run(main())


def test_a_profile_entry_may_carry_the_link() -> None:
    fingerprint = bytes(range(32))
    link = sample.enrolment_uri("127.0.0.1:7443", BILLER, fingerprint, "acct 1/x", "7kq2 m9xd 4rtb")
    base = parse_profile(_document({}))
    profile = parse_profile(_document({"uri": link, "insecure": True, "name": "Energy"}))
    [preference] = profile.connected()
    assert preference.connection is not None
    assert preference.connection.target == "127.0.0.1:7443"
    assert preference.connection.fingerprint == fingerprint
    assert preference.connection.account_id == "acct 1/x"
    assert preference.connection.code == "7KQ2-M9XD-4RTB"
    assert profile.biller_name(BILLER) == "Energy"
    assert base.biller_name(BILLER) == "energy.example"
    with pytest.raises(ProfileError, match="uri or the values"):
        parse_profile(_document({"uri": link, "account_id": "x"}))
    with pytest.raises(ProfileError, match="not a usable enrolment link"):
        parse_profile(_document({"uri": "parley:enrol?endpoint=x"}))
    other = sample.enrolment_uri("127.0.0.1:7443", "biller:other.example", fingerprint, "a", "7KQ2M9XD4RTB")
    with pytest.raises(ProfileError, match=r"is for 'biller:other\.example'"):
        parse_profile(_document({"uri": other}))
    with pytest.raises(InvalidEnrolmentLink, match="missing field 'code'"):
        parse_enrolment_uri(link.partition("&code=")[0])


def _document(entry: dict[str, object]) -> dict[str, object]:
    return {
        "household": {"party_id": "consumer:h", "currency": "EUR", "balance": "10", "buffer": "0"},
        "income": {"amount": "10", "pay_day": 1},
        "mandate": {"max_fee": "0", "max_instalments": 0, "max_total_over_bill": "0"},
        "billers": {BILLER: {"priority": 1, **entry}},
    }


def test_terms_are_described_in_plain_words() -> None:
    total = eur("120.00")
    plan = build_terms(TermsKind.INSTALMENT_PLAN, total, monthly_dates(date(2026, 4, 1), 3))
    assert describe_terms(plan) == "3 monthly instalments of EUR 40.00, 2026-04-01 to 2026-06-01"
    full = build_terms(TermsKind.PAY_IN_FULL, total, (date(2026, 4, 1),))
    assert describe_terms(full) == "pay in full: EUR 120.00 by 2026-04-01"


def _request(
    terms_total: str, *, deadline: datetime | None = None, in_reply_to: bytes | None = None
) -> ApprovalRequest:
    facts = BillFacts("winter", ACCOUNT, eur("600.00"), date(2026, 3, 1), date(2026, 3, 26), "", AdvertisedOptions())
    bill = ReceivedBill(BILLER, ACCOUNT, facts, b"d" * 32, envelope_pb2.Envelope(), START)
    fee = Line(LineKind.FEE, "deferral fee", eur(terms_total) - eur("600.00"))
    terms = build_terms(TermsKind.DEFERRAL, eur("600.00"), (date(2026, 3, 29),), (fee,))
    thread = None if in_reply_to is None else b"t" * 16
    return Approvals.request(
        "open" if thread is None else "accept",
        bill,
        terms,
        ["fee too high"],
        thread_id=thread,
        deadline=deadline,
        in_reply_to=in_reply_to,
    )


def test_request_ids_are_stable_and_bind_the_terms_and_the_point_of_the_negotiation() -> None:
    assert _request("605.00").request_id == _request("605.00").request_id
    assert len(_request("605.00").request_id) == REQUEST_ID_HEX_CHARS
    assert _request("605.00").request_id != _request("606.00").request_id
    assert _request("605.00", in_reply_to=b"a" * 32).request_id != _request("605.00", in_reply_to=b"b" * 32).request_id


def test_the_approval_book_answers_by_id_and_lets_a_superseded_approval_lapse(tmp_path: Path) -> None:
    clock = ManualClock(START)

    async def main() -> None:
        store = await SqliteConsumerStore.open(tmp_path / "c.sqlite")
        try:
            book = ApprovalBook(store, clock)
            first, second = _request("605.00"), _request("606.00")
            with pytest.raises(ApprovalPending):
                await book(first)
            assert [r.request_id for r in await book.pending()] == [first.request_id]
            with pytest.raises(UnknownApproval):
                await book.answer("feedfeedfeedfeed", True)
            await book.answer(first.request_id, True)
            with pytest.raises(ApprovalClosed):
                await book.answer(first.request_id, False)
            assert await book(first) is True  # exactly this move: approved
            # The bot now wants another move on the bill: the approval lapses, a new request waits.
            with pytest.raises(ApprovalPending):
                await book(second)
            states = {r.request_id: r.state for r in await store.approvals()}
            assert states == {first.request_id: ApprovalState.LAPSED, second.request_id: ApprovalState.PENDING}
            # Back to the first move: asked again, not approved by the old answer.
            with pytest.raises(ApprovalPending):
                await book(first)
            # A request whose negotiation deadline passed cannot be answered any more.
            late = _request("607.00", deadline=START + timedelta(hours=1), in_reply_to=b"c" * 32)
            with pytest.raises(ApprovalPending):
                await book(late)
            clock.advance(timedelta(hours=2))
            with pytest.raises(ApprovalClosed, match="deadline"):
                await book.answer(late.request_id, True)
            assert (await store.get_approval(late.request_id)).state is ApprovalState.LAPSED  # type: ignore[union-attr]
        finally:
            await store.close()

    asyncio.run(main())


def test_refused_instructions_are_set_aside_by_retry_payment_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`retry-payment` on refused instructions: set aside (kept as evidence), said in one line; a second time, or
    on a payment that is not refused, or an unknown id, refused in one line with nothing changed."""
    state = tmp_path / "state"
    state.mkdir()
    now = SystemClock().now()

    async def refused_payment() -> None:
        store = await SqliteConsumerStore.open(state / STORE_FILE)
        try:
            link = BillerLinkRecord(BILLER, "127.0.0.1:1", b"p" * 32, True, None, None, now)
            await store.save_enrolment(link, [b"v1"], LinkedAccountRecord(BILLER, ACCOUNT, now, b"r", b"c"))
            intent = IntentRecord(
                BILLER, "pi-1", ACCOUNT, "winter", b"", 0, 60000, "EUR", b"t" * 16, IntentState.CREATED, now, (b"m",)
            )
            await store.create_intent(intent)
            await store.record_instructions(BILLER, "pi-1", b"forged", ("PAYMENT_AMOUNT_MISMATCH", "EUR 600.01"))
        finally:
            await store.close()

    async def intent_now() -> IntentRecord:
        store = await SqliteConsumerStore.open(state / STORE_FILE)
        try:
            found = await store.get_intent(BILLER, "pi-1")
            assert found is not None
            return found
        finally:
            await store.close()

    async def main() -> None:
        await refused_payment()
        for argv, status, said in (
            (("retry-payment", "pi-nope"), 1, "no payment 'pi-nope'"),
            (("resolve-payment", "pi-1", "--not-paid"), 1, "is refused, not in doubt"),
            (("retry-payment", "pi-1"), 0, "set aside the refused instructions of payment pi-1 (EUR 600.00"),
            (("retry-payment", "pi-1"), 1, "was already set aside"),
        ):
            capsys.readouterr()
            assert await cli("consumer", *argv, "--state-dir", str(state)) == status, argv
            out = capsys.readouterr().out
            assert said in out, out
            if status:
                assert len(out.strip().splitlines()) == 1, out
        intent = await intent_now()
        assert (intent.state, intent.instructions, intent.holds_payment) == (IntentState.REFUSED, b"forged", False)
        assert await cli("consumer", "retry-payment", "pi-1", "--state-dir", str(tmp_path / "none")) == 2

    asyncio.run(main())
