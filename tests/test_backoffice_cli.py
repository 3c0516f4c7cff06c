"""`parley biller backoffice | settle | import-statement` (reference_biller/backoffice_cli.py), run as commands."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from agent.cli import main
from agent.clock import ManualClock
from agent.protocol.terms import Money
from parley.backoffice.v1 import backoffice_service_pb2 as bo
from parley.backoffice.v1 import backoffice_service_pb2_grpc as bo_grpc
from parley.v1 import biller_service_pb2, biller_service_pb2_grpc
from tests.helpers.peer import Consumer
from tests.helpers.process import BANNER_TIMEOUT, lines_of, serving_process

CAMT = Path(__file__).parent / "data" / "camt"
TOKEN = "a-token-of-forty-characters-0123456789ab"


def printed(capsys: pytest.CaptureFixture[str]) -> str:
    """What a command printed: its messages go to stdout (stderr with --json), as the other biller commands'."""
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_import_statement_reports_every_movement_and_records_nothing_unmatched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert main(["biller", "import-statement", str(CAMT / "camt054_v08_credits.xml"), *state]) == 0
    printed = capsys.readouterr().out
    assert "camt.054.001.08 NTF20260320-0001" in printed
    assert "total       8 movement(s); unmatched: 4, invalid-reference: 1, reversal: 1, debit: 1, not-booked: 1" in (
        printed
    )
    assert main(["biller", "import-statement", str(CAMT / "camt054_v08_credits.xml"), "--json", *state]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["movements"][0]["rail_reference"] == "camt:2026032000001"
    assert document["movements"][0]["amount_minor"] == 12000


def test_a_hostile_statement_is_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert main(["biller", "import-statement", str(CAMT / "xxe.xml"), *state]) == 1
    error = printed(capsys)
    assert "DTD" in error
    assert "nothing recorded" in error
    assert "root:" not in error  # nothing of /etc/passwd


def test_settle_needs_an_awaited_payment_and_exact_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    settle = ["biller", "settle", "--reference", "EE-nobody-1", "--currency", "EUR", *state]
    assert main([*settle, "--amount", "12.34"]) == 1
    assert "unmatched" in printed(capsys)
    assert main([*settle, "--amount", "12.345"]) == 2
    assert main([*settle, "--amount", "12.34", "--date", "2026-02-30"]) == 2


def test_the_back_office_is_never_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serve = ["biller", "backoffice", "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0", "--insecure"]
    assert main(serve) == 2
    assert "never open" in printed(capsys)
    short = tmp_path / "short.token"
    short.write_text("short")
    assert main([*serve, "--token-file", str(short)]) == 2
    assert "shorter than 32" in printed(capsys)


@pytest.mark.slow
def test_the_backoffice_command_serves_a_billing_system(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    command = [sys.executable, "-m", "agent.cli", "biller", "backoffice", "--state-dir", str(tmp_path / "state")]
    command += ["--listen", "127.0.0.1:0", "--insecure", "--token-file", str(token)]
    with (tmp_path / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        lines, banner = lines_of(process.stdout), {}
        while "backoffice" not in banner:
            name, _, value = lines.get(timeout=BANNER_TIMEOUT).partition(" ")
            banner[name] = value.strip()
        target = banner["backoffice"].split()[0]

        async def call() -> bo.CreateAccountResponse:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = bo_grpc.BackOfficeServiceStub(channel)
                request = bo.CreateAccountRequest(request_id="1", account_id="acct-77", holder_name="B. Example")
                answer: bo.CreateAccountResponse = await stub.CreateAccount(
                    request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10
                )
                return answer

        assert asyncio.run(call()).created
        process.terminate()
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert TOKEN not in (tmp_path / "stderr.log").read_text()  # never logged


@pytest.mark.slow
def test_the_back_office_works_beside_serve_on_the_same_store(tmp_path: Path) -> None:
    """Two processes, one SQLite store: the billing system bills and settles; the consumer is served by `serve`."""
    state = str(tmp_path / "state")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    serve = ["--insecure", "--listen", "127.0.0.1:0", "--state-dir", state]
    with serving_process(serve, log=tmp_path / "serve.log") as (_, banner):
        serve_target = banner["listening"].split()[0]
        command = [sys.executable, "-m", "agent.cli", "biller", "backoffice", "--state-dir", state]
        command += ["--listen", "127.0.0.1:0", "--insecure", "--token-file", str(token)]
        with (tmp_path / "backoffice.log").open("w") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            lines, office_banner = lines_of(process.stdout), {}
            while "backoffice" not in office_banner:
                name, _, value = lines.get(timeout=BANNER_TIMEOUT).partition(" ")
                office_banner[name] = value.strip()
            office_target = office_banner["backoffice"].split()[0]

            async def scenario() -> None:
                async with (
                    grpc.aio.insecure_channel(office_target) as office_channel,
                    grpc.aio.insecure_channel(serve_target) as serve_channel,
                ):
                    office = bo_grpc.BackOfficeServiceStub(office_channel)
                    biller = biller_service_pb2_grpc.BillerServiceStub(serve_channel)
                    account = bo.CreateAccountRequest(request_id="a", account_id="acct-side", holder_name="S. Ide")
                    await office.CreateAccount(account, metadata=auth, timeout=10)
                    code_request = bo.IssueEnrolmentCodeRequest(request_id="c", account_id="acct-side")
                    code = await office.IssueEnrolmentCode(code_request, metadata=auth, timeout=10)
                    alice = Consumer("consumer:side", ManualClock(datetime.now(UTC)))
                    enrolment = alice.enrolment("acct-side", code.enrolment_code)
                    await biller.Enrol(biller_service_pb2.EnrolRequest(request=enrolment), timeout=10)
                    bill = bo.IssueBillRequest(
                        request_id="b",
                        bill_id="INV-side-1",
                        account_id="acct-side",
                        amount_due=bo.Money(currency_code="EUR", amount_minor=4250),
                        due_date=(datetime.now(UTC).date() + timedelta(days=20)).isoformat(),
                        description="Water, this month",
                    )
                    assert (await office.IssueBill(bill, metadata=auth, timeout=10)).created
                    intent = alice.intent("acct-side", "INV-side-1", "pay-side", Money.parse("42.50", "EUR"))
                    request = biller_service_pb2.CreatePaymentIntentRequest(intent=intent)
                    await biller.CreatePaymentIntent(request, timeout=10)
                    listed = await office.ListAwaitedPayments(bo.ListAwaitedPaymentsRequest(), metadata=auth)
                    [awaited] = [p for p in listed.payments if p.intent.account_id == "acct-side"]
                    settle = bo.RecordSettlementRequest(
                        request_id="s",
                        payment_reference=awaited.payment_reference,
                        amount=awaited.amount,
                        rail_reference="BANK-SIDE-1",
                    )
                    await office.RecordSettlement(settle, metadata=auth, timeout=10)
                    receipt_query = alice.query("acct-side", intent_id="pay-side")
                    answer = await biller.GetReceipt(
                        biller_service_pb2.GetReceiptRequest(query=receipt_query), timeout=10
                    )
                    assert answer.receipt.payload  # the consumer's receipt, signed by the other process

            asyncio.run(scenario())
        finally:
            process.terminate()
            process.wait(timeout=15)
