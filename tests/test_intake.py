"""Bill intake (reference_biller/intake.py): `parley biller issue-bill` and `parley biller import`."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from agent.cli import main
from agent.clock import ManualClock, SystemClock
from agent.protocol.terms import BillFacts
from agent.stores.base import BillRecord
from parley.v1 import bill_pb2, biller_service_pb2, biller_service_pb2_grpc, envelope_pb2
from reference_biller.config import SAMPLE, load_config
from reference_biller.service import open_biller
from tests.helpers.peer import Consumer
from tests.helpers.process import serving_process

DUE = (datetime.now(UTC).date() + timedelta(days=30)).isoformat()
HEADER = "bill_id,account_id,amount,due_date,description,period\n"


def output(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def config_file(tmp_path: Path) -> Path:
    """The sample configuration without sample bills: only what the test issues is billed."""
    path = tmp_path / "biller.toml"
    path.write_text(SAMPLE.read_text().replace("sample_bills = true", "sample_bills = false"))
    return path


def state_options(tmp_path: Path) -> list[str]:
    return ["--config", str(config_file(tmp_path)), "--state-dir", str(tmp_path / "state")]


def enrol(tmp_path: Path, account_id: str, capsys: pytest.CaptureFixture[str], *, add: bool = True) -> None:
    """Add the account and enrol a consumer on it, in process (the way `serve` would answer Enrol)."""
    state = state_options(tmp_path)
    if add:
        assert main(["biller", "accounts", "add", account_id, "--holder", "A. Holder", *state]) == 0
        capsys.readouterr()
    assert main(["biller", "codes", "--account", account_id, "--json", *state]) == 0
    code = json.loads(capsys.readouterr().out)["accounts"][0]["code"]

    async def run() -> None:
        biller = await open_biller(load_config(config_file(tmp_path)), tmp_path / "state", SystemClock())
        try:
            consumer = Consumer(f"consumer:{account_id}", ManualClock(datetime.now(UTC)))
            await biller.agent.enrol(consumer.enrolment(account_id, code))
        finally:
            await biller.close()

    asyncio.run(run())


def stored_bills(tmp_path: Path, account_id: str) -> list[BillRecord]:
    async def run() -> list[BillRecord]:
        biller = await open_biller(load_config(config_file(tmp_path)), tmp_path / "state", SystemClock())
        try:
            return await biller.store.list_bills(account_id)
        finally:
            await biller.close()

    return asyncio.run(run())


def description_of(record: BillRecord) -> str:
    return bill_pb2.Bill.FromString(envelope_pb2.Envelope.FromString(record.envelope).payload).description


def test_a_file_is_imported_once_and_a_changed_bill_is_refused_by_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enrol(tmp_path, "w-1", capsys)
    bills = tmp_path / "bills.csv"
    bills.write_text(
        HEADER + f"INV-1,w-1,42.50,{DUE},Water,December 2026\nINV-2,w-1,10.00,{DUE},Sewerage,\n", encoding="utf-8"
    )
    state = state_options(tmp_path)
    assert main(["biller", "import", str(bills), "--dry-run", *state]) == 0
    assert "would issue: 2 (dry run: nothing issued)" in output(capsys)
    assert stored_bills(tmp_path, "w-1") == []

    assert main(["biller", "import", str(bills), *state]) == 0
    assert "issued: 2" in output(capsys)
    records = {record.bill_id: record for record in stored_bills(tmp_path, "w-1")}
    assert description_of(records["INV-1"]) == "Water, December 2026"  # the biller's own text, not "energy"
    assert records["INV-1"].amount_minor == 4250
    options = BillFacts.from_proto(
        bill_pb2.Bill.FromString(envelope_pb2.Envelope.FromString(records["INV-1"].envelope).payload)
    ).options
    assert options.instalments is not None
    assert options.instalments.max_count == 6

    assert main(["biller", "import", str(bills), *state]) == 0  # again: nothing changes
    assert "unchanged: 2" in output(capsys)

    changed = tmp_path / "changed.csv"
    changed.write_text(HEADER + f"INV-3,w-1,5.00,{DUE},Meter,\nINV-1,w-1,43.50,{DUE},Water,December 2026\n")
    assert main(["biller", "import", str(changed), *state]) == 1
    said = output(capsys)
    assert "line 3" in said
    assert "INV-1" in said
    assert "amount EUR 42.50" in said
    assert "nothing issued" in said
    assert {r.bill_id for r in stored_bills(tmp_path, "w-1")} == {"INV-1", "INV-2"}  # INV-3 not half-imported


def test_every_bad_row_is_reported_with_its_line_and_nothing_is_issued(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enrol(tmp_path, "w-2", capsys)
    rows = [
        f"OK-1,w-2,12.00,{DUE},Water,",  # line 2: fine, but not issued since others are bad
        f"BAD-1,w-2,12.345,{DUE},Water,",  # line 3: three decimals
        "BAD-2,w-2,12.00,2026-02-30,Water,",  # line 4: no such date
        f"BAD-3,nobody,12.00,{DUE},Water,",  # line 5: unknown account
        f"OK-1,w-2,12.00,{DUE},Water,",  # line 6: the same id twice in the file
        f"bad id,w-2,12.00,{DUE},Water,",  # line 7
        f"BAD-4,w-2,0.00,{DUE},Water,",  # line 8: the protocol refuses a zero bill
        f"BAD-5,w-2,1.00,{DUE},,",  # line 9: no description
    ]
    bills = tmp_path / "bills.csv"
    bills.write_text(HEADER + "\n".join(rows) + "\n")
    assert main(["biller", "import", str(bills), "--json", *state_options(tmp_path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["refused"] is True
    invalid = {row["line"]: row["detail"] for row in report["rows"] if row["outcome"] == "invalid"}
    assert sorted(invalid) == [3, 4, 5, 6, 7, 8, 9]
    assert "decimals" in invalid[3]
    assert "no account 'nobody'" in invalid[5]
    assert "also on line 2" in invalid[6]
    assert "description is missing" in invalid[9]
    assert stored_bills(tmp_path, "w-2") == []


def test_json_lines_and_the_header_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enrol(tmp_path, "w-3", capsys)
    state = state_options(tmp_path)
    lines = tmp_path / "bills.jsonl"
    good = {"bill_id": "J-1", "account_id": "w-3", "amount": "7.10", "due_date": DUE, "description": "Water"}
    lines.write_text(json.dumps(good) + "\n" + json.dumps({**good, "bill_id": "J-2", "amount": 7.1}) + "\nnot json\n")
    assert main(["biller", "import", str(lines), *state]) == 1
    said = output(capsys)
    assert "line 2" in said
    assert "numbers are not exact money" in said
    assert "line 3" in said
    lines.write_text(json.dumps(good) + "\n")
    assert main(["biller", "import", str(lines), *state]) == 0
    assert [r.bill_id for r in stored_bills(tmp_path, "w-3")] == ["J-1"]

    header = tmp_path / "header.csv"
    header.write_text("bill,account_id,amount\n")
    assert main(["biller", "import", str(header), *state]) == 1
    assert "missing column(s) bill_id, due_date, description; unknown column(s) bill" in output(capsys)


def test_issue_bill_is_idempotent_by_id_and_needs_an_enrolled_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = state_options(tmp_path)
    assert main(["biller", "accounts", "add", "w-4", "--holder", "Not Yet", *state]) == 0
    issue = ["biller", "issue-bill", "--account", "w-4", "--amount", "19.99", "--due", DUE, "--id", "B-1"]
    issue += ["--description", "Water", "--period", "2026-12", *state]
    assert main(issue) == 1
    assert "no enrolled consumer" in output(capsys)
    enrol(tmp_path, "w-4", capsys, add=False)
    assert main(issue) == 0
    assert "issued" in output(capsys)
    assert main(issue) == 0
    assert "unchanged" in output(capsys)
    assert description_of(stored_bills(tmp_path, "w-4")[0]) == "Water, 2026-12"


def test_an_issue_date_more_than_a_year_from_today_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--issue-date 0001-01-01` was issued and signed. A new bill's issue date is within 366 days of today, either
    way (MAX_ISSUE_DATE_DAYS); an old bill re-imported is still unchanged."""
    enrol(tmp_path, "w-5", capsys)
    state = state_options(tmp_path)
    today = datetime.now(UTC).date()
    far_due = (today + timedelta(days=400)).isoformat()

    def issue(bill_id: str, issued: str) -> list[str]:
        return ["biller", "issue-bill", "--account", "w-5", "--amount", "10.00", "--due", far_due, "--id", bill_id,
                "--description", "Water", "--issue-date", issued, *state]  # fmt: skip

    for bill_id, issued in (("B-0", "0001-01-01"), ("B-9", "9999-12-31"), ("B-1", str(today + timedelta(days=367)))):
        assert main(issue(bill_id, issued)) == 1
        said = output(capsys)
        assert f"issue_date {issued} is more than 366 days from today ({today})" in said
        assert "within a year of today" in said
    assert stored_bills(tmp_path, "w-5") == []
    for bill_id, days in (("B-2", -366), ("B-3", 366)):
        assert main(issue(bill_id, str(today + timedelta(days=days)))) == 0
        assert "issued" in output(capsys)
    assert {record.bill_id for record in stored_bills(tmp_path, "w-5")} == {"B-2", "B-3"}


@pytest.mark.slow
def test_intake_works_while_serve_runs_on_the_same_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve` and the intake commands, two processes on one SQLite store (WAL): the consumer sees the bill."""
    config = config_file(tmp_path)
    state = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    serve = ["--insecure", "--listen", "127.0.0.1:0", *state]
    with serving_process(serve, log=tmp_path / "serve.log") as (_, banner):
        target = banner["listening"].split()[0]
        assert main(["biller", "accounts", "add", "side-1", "--holder", "S. Ide", *state]) == 0
        capsys.readouterr()
        assert main(["biller", "codes", "--account", "side-1", "--json", *state]) == 0
        code = json.loads(capsys.readouterr().out)["accounts"][0]["code"]
        consumer = Consumer("consumer:side", ManualClock(datetime.now(UTC)))

        async def enrol_and_list(after: bool) -> list[str]:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                if not after:
                    await stub.Enrol(
                        biller_service_pb2.EnrolRequest(request=consumer.enrolment("side-1", code)), timeout=10
                    )
                    return []
                answer = await stub.ListBills(
                    biller_service_pb2.ListBillsRequest(query=consumer.query("side-1")), timeout=10
                )
                return [bill_pb2.Bill.FromString(envelope.payload).description for envelope in answer.bills]

        asyncio.run(enrol_and_list(after=False))
        bills = tmp_path / "bills.csv"
        bills.write_text(HEADER + f"S-1,side-1,42.50,{DUE},Water,December 2026\n")
        assert main(["biller", "import", str(bills), *state]) == 0
        assert asyncio.run(enrol_and_list(after=True)) == ["Water, December 2026"]
