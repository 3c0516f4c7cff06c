"""The crash-safety harness (`parley chaos`, agent/tools/chaos.py): the short form CI runs, and its checks shown faults.

One short run (a few SIGKILLs of a real `parley biller serve` child under a
few signed clients) is shared by the tests: it must PASS, and copies of its
store, tampered with, must make exactly the right checks FAIL with the right
counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.conformance.peers import free_port
from agent.tools.chaos import (
    BillerProcess,
    ChaosOptions,
    ChaosReport,
    CheckResult,
    check_integrity,
    parse_pause,
    run_chaos,
    verify_state,
)

SHORT = ChaosOptions(kills=3, clients=4, seed=11, pause=(0.3, 1.0))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosReport]:
    state = tmp_path_factory.mktemp("chaos")
    yield asyncio.run(run_chaos(SHORT, state))
    shutil.rmtree(state, ignore_errors=True)


def _by_name(checks: tuple[CheckResult, ...]) -> dict[str, CheckResult]:
    return {check.name: check for check in checks}


def test_the_short_run_kills_the_biller_and_passes_every_check(short_run: ChaosReport) -> None:
    checks = _by_name(short_run.checks)
    assert short_run.passed, [check.to_json() for check in short_run.checks if not check.passed]
    assert set(checks) == {"clients", "acceptances", "payments", "events", "integrity"}
    summary = short_run.summary()
    assert summary["kills"] == 3
    assert summary["integrity"] == "ok"
    # Work was done across the kills, and every acknowledgement was checked.
    assert isinstance(summary["cycles_completed"], int)
    assert summary["cycles_completed"] >= SHORT.clients
    assert isinstance(summary["requests_resent"], int)
    assert summary["requests_resent"] > 0  # clients were cut off mid-request and resent the same bytes (TRN-6)
    assert checks["acceptances"].counts["verified"] == checks["acceptances"].counts["acknowledged"] > 0
    payments = checks["payments"]
    assert payments.counts["acknowledged_intents"] == payments.counts["stored_intents"] > 0
    assert payments.counts["payments"] + payments.counts["unsettled"] == payments.counts["acknowledged_intents"]
    assert checks["events"].counts["streamed_to_clients"] > 0
    document = json.loads(json.dumps(short_run.to_json()))  # what --json writes
    assert document["result"] == "PASS"
    assert document["checks"]["payments"]["faults"]["double_payments"] == 0
    assert {key: document[key] for key in summary} == summary
    # The child really died without its shutdown code 3 times: it started kills + 2 times (first start, after
    # each kill, once more for the checks) and closed its store only on the 2 graceful stops.
    log = (short_run.state_dir / "biller.log").read_text(encoding="utf-8")
    assert log.count("listening   127.0.0.1") == SHORT.kills + 2
    assert log.count("store closed") == 2


def _tamper(database: Path, report: ChaosReport) -> None:
    """One fault of each kind the checks look for: a paid instalment paid again under a second intent, an
    intent's instructions replaced by another's, an event deleted from the middle of a log the client had
    streamed, an acknowledged acceptance removed."""
    settled = next(intent for ledger in report.ledgers for intent in ledger.settled)
    accept_digest = report.ledgers[0].acceptances[0].accept_digest
    account = report.ledgers[1].account_id
    with sqlite3.connect(database) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(payment_intents)")]
        original = db.execute("SELECT * FROM payment_intents WHERE intent_id = ?", (settled,)).fetchone()
        row = dict(zip(columns, original, strict=True))
        row.update(intent_id=f"{settled}-again", payment_reference=f"{row['payment_reference']}-again")
        db.execute(
            f"INSERT INTO payment_intents ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
        )
        db.execute(
            """INSERT INTO settlements SELECT account_id, ?, amount_minor, rail_reference || '-again', settled_at,
               receipt FROM settlements WHERE intent_id = ?""",
            (f"{settled}-again", settled),
        )
        changed, other = (next(iter(ledger.intents)) for ledger in report.ledgers[2:4])
        swapped = db.execute(
            "UPDATE payment_intents SET instructions = (SELECT instructions FROM payment_intents WHERE intent_id = ?)"
            " WHERE intent_id = ?",
            (other, changed),
        )
        assert swapped.rowcount == 1
        assert db.execute("DELETE FROM binding_events WHERE account_id = ? AND sequence = 1", (account,)).rowcount == 1
        assert db.execute("DELETE FROM messages WHERE digest = ?", (accept_digest,)).rowcount == 1


def test_the_checks_fail_with_the_right_counts_on_a_tampered_store(short_run: ChaosReport, tmp_path: Path) -> None:
    state = tmp_path / "biller"
    shutil.copytree(short_run.state_dir / "biller", state)
    assert len(short_run.ledgers[1].events) >= 3  # the deleted event sits between two the client streamed
    _tamper(state / "biller.sqlite", short_run)

    biller = BillerProcess(state, free_port(), tmp_path / "biller.log")
    checks = _by_name(asyncio.run(verify_state(biller, short_run.ledgers, short_run.identity)))

    assert dict(checks["acceptances"].faults) == {"missing": 1, "unverifiable": 0}
    assert checks["payments"].faults["double_payments"] == 1
    assert checks["payments"].faults["duplicate_intents"] == 1
    assert checks["payments"].faults["changed_instructions"] == 1
    assert checks["payments"].faults["lost_intents"] == 0
    assert checks["payments"].faults["lost_settlements"] == 0
    events = checks["events"].faults
    assert (events["gaps"], events["changed"], events["duplicates"], events["unverifiable"]) == (1, 1, 0, 0)
    assert checks["integrity"].passed  # tampered through SQLite: consistent, just wrong
    assert checks["clients"].passed
    for name in ("acceptances", "payments", "events"):
        assert not checks[name].passed
        assert checks[name].details  # each fault is described, not only counted


def test_the_integrity_check_fails_on_a_damaged_database_file(short_run: ChaosReport, tmp_path: Path) -> None:
    database = tmp_path / "biller.sqlite"
    shutil.copy(short_run.state_dir / "biller" / "biller.sqlite", database)
    assert check_integrity(database).passed
    data = bytearray(database.read_bytes())
    page = 4096
    data[2 * page : 4 * page] = b"\xa5" * (2 * page)  # two pages past the schema overwritten
    database.write_bytes(bytes(data))
    damaged = check_integrity(database)
    assert not damaged.passed
    assert damaged.faults["integrity_errors"] >= 1


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def test_the_biller_child_never_outlives_an_interrupted_run(tmp_path: Path) -> None:
    async def interrupted() -> None:
        run = asyncio.create_task(run_chaos(ChaosOptions(kills=50, clients=2, pause=(0.5, 0.5)), tmp_path))
        log = tmp_path / "biller.log"
        for _ in range(300):  # until the first biller listens (bounded)
            await asyncio.sleep(0.1)
            if log.exists() and "listening" in log.read_text(encoding="utf-8"):
                break
        await asyncio.sleep(1.5)  # clients at work, a kill or restart about due
        assert _processes_mentioning(str(tmp_path)), "the biller child never started"
        run.cancel()  # what Ctrl-C does to asyncio.run's main task
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(interrupted())
    assert _processes_mentioning(str(tmp_path)) == []


def test_parse_pause() -> None:
    assert parse_pause("0.5:3") == (0.5, 3.0)
    assert parse_pause("2") == (2.0, 2.0)
    for bad in ("3:1", "-1:2", "soon"):
        with pytest.raises(Exception, match="expected"):
            parse_pause(bad)


def test_the_command_is_registered_and_refuses_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--kills", "--clients", "--seed", "--state-dir", "--json", "--seconds-between-kills"):
        assert option in help_text
    assert main(["chaos", "--seconds-between-kills", "3:1"]) == 2
    assert "0 ≤ MIN ≤ MAX" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--kills", "-3"], "--kills: expected a whole number from 0 to 10,000, got -3"),
        (["--clients", "100000"], "--clients: expected a whole number from 1 to 256, got 100000"),
        (["--seconds-between-kills", "0:inf"], "--seconds-between-kills MAX: expected a number from 0 to 3,600"),
    ],
)
def test_options_out_of_range_are_refused_before_anything_is_created(
    arguments: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["chaos", *arguments]) == 2
    assert message in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [], "a state directory was made for a run that could not start"
