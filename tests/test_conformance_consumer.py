"""The consumer conformance suite, itself tested.

1. Against the reference consumer (`parley consumer run --from-env --once --approve-all`, a real process per
   run): every scenario PASSes.
2. Against deliberately broken consumers (tests/broken_consumers.py), one per class of defect: the suite FAILs
   exactly the scenarios that should fail, and passes the others.
3. A client that does nothing cannot pass; a client command that cannot start, or a run in which no scenario
   ran, exits 2; known-failing lists, JUnit and JSON through the command line.
4. The scenarios name and quote spec requirements, and docs/CONFORMANCE.md lists them; `--from-env` builds the
   reference consumer's household from the environment; the runner's `jobs` keeps the report's order.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shlex
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from agent.cli import main
from agent.conformance import consumer_cases
from agent.conformance.hostile_biller import read_bank_orders
from agent.conformance.runner import (
    EXIT_FAILED,
    EXIT_NOT_RUN,
    EXIT_OK,
    Level,
    NotRunnable,
    RunOptions,
    Suite,
    run_cases,
    run_suite,
)
from reference_consumer.profile import ProfileError
from reference_consumer.runner import profile_from_env
from tests import deferring_consumer
from tests.broken_consumers import BROKEN_CONSUMERS, BrokenConsumer, reference_command
from tests.helpers.scratch import scratch_directory

ROOT = Path(__file__).resolve().parent.parent
SPEC = (ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
CASE_IDS = [case.id for case in consumer_cases.suite.cases]
JOBS = 4  # scenarios are independent: run them side by side (each is mostly waiting on its client process)
TIMEOUT = 60.0  # per scenario: generous, for a loaded machine


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """This module's directories (the scenarios', the reports) on tmpfs when the machine has one: its whole
    suite runs commit thousands of times, and on a disk the fsyncs were half a run's time (tests/helpers/scratch.py).
    """
    with scratch_directory("parley-consumer-suite-") as directory:
        yield directory


def run_against(tmp_path: Path, client_cmd: str, **options: Any) -> tuple[int, dict[str, Any], str]:
    """Run the suite in-process against a client command; (exit code, JSON report, printed output)."""
    return asyncio.run(suite_run(tmp_path, client_cmd, **options))


async def suite_run(tmp_path: Path, client_cmd: str, **options: Any) -> tuple[int, dict[str, Any], str]:
    """`run_against` in the running loop, so that several runs can go side by side."""
    report = tmp_path / "report.json"
    output = io.StringIO()
    options.setdefault("jobs", JOBS)
    options.setdefault("timeout", TIMEOUT)
    run_options = RunOptions(target=client_cmd, json=report, **options)
    timeout = run_options.timeout

    code = await run_suite(
        consumer_cases.suite,
        lambda: consumer_cases.connect(client_cmd, timeout=timeout, work_dir=tmp_path / "work"),
        run_options,
        Console(file=output, width=200),
    )
    return code, json.loads(report.read_text(encoding="utf-8")), output.getvalue()


def outcomes_of(report: dict[str, Any]) -> dict[str, str]:
    return {case["id"]: case["outcome"] for case in report["cases"]}


# --- 1. The reference consumer passes ---------------------------------------------------------------------


def test_reference_consumer_passes_every_scenario(tmp_path: Path) -> None:
    code, report, output = run_against(tmp_path, reference_command(), junit=tmp_path / "report.xml")
    not_passed = {c["id"]: (c["outcome"], c["detail"]) for c in report["cases"] if c["outcome"] != "PASS"}
    assert not_passed == {}, output
    assert code == EXIT_OK
    assert [case["id"] for case in report["cases"]] == CASE_IDS
    assert report["summary"] == {"PASS": len(CASE_IDS), "FAIL": 0, "WARN": 0, "SKIP": 0}
    assert output.rstrip().splitlines()[-1].startswith("summary: parley conformance consumer")
    details = {case["id"]: case["detail"] for case in report["cases"]}
    assert "paid EUR 120.00 under reference 'CF-" in details["PAY-8/honest-biller-paid"]
    assert "served version 1 again" in details["KEY-8/keyset-rollback"]  # the rollback was really delivered
    assert "delivered twice" in details["EVT-5/duplicate-event"]
    assert "claimed EUR 100.00 received of EUR 120.00" in details["PAY-9/receipt-wrong-amount"]
    suite = ET.parse(tmp_path / "report.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (str(len(CASE_IDS)), "0", "0")
    # The client's bank: the baseline's one order, as the contract in docs/CONFORMANCE.md says.
    (baseline,) = (tmp_path / "work").glob("honest-biller-*")
    (order,) = read_bank_orders(baseline / "client-state" / "bank-orders.jsonl")
    assert (str(order.amount), order.payment_reference[:3], order.problem) == ("EUR 120.00", "CF-", "")


def test_a_client_that_defers_and_pays_on_the_agreed_date_passes_the_baseline(tmp_path: Path) -> None:
    """Issue 14 item 17: "pay what is due today" means what is due today. A client that agrees a deferral (inside
    the options) and pays on the agreed date pays nothing on the day the bill arrives, and conforms."""
    code, report, output = run_against(
        tmp_path, deferring_consumer.command(), only=("PAY-8/honest-biller-paid",), jobs=1
    )
    (case,) = report["cases"]
    assert (case["outcome"], code) == ("PASS", EXIT_OK), output
    assert "agreed a deferral to " in case["detail"]
    assert "nothing is due today" in case["detail"]
    assert (
        read_bank_orders(next((tmp_path / "work").glob("honest-biller-*")) / "client-state" / "bank-orders.jsonl") == []
    )


# --- 2. Broken consumers fail exactly their scenarios ------------------------------------------------------


RUNS_AT_ONCE = 2  # a run keeps about one core busy with its clients' processes (JOBS scenarios at once)
Run = tuple[int, dict[str, Any], str]
BASELINE = "PAY-8/honest-biller-paid"  # the whole flow with an honest biller: the broken consumer still works
# Defects on a path every scenario crosses (bill intake, the payments' record, the limits every message is judged
# by): these run the whole suite, so that a scenario of another requirement failing them would show.
WHOLE_SUITE = frozenset({"skips-bill-verification", "records-payments-in-memory-only", "ignores-announced-limits"})


def scenarios_for(broken: BrokenConsumer) -> tuple[str, ...]:
    """What a broken consumer is run against: every scenario of each requirement it fails or skips (the
    neighbours its defect could reach), and the baseline; the whole suite for the defects in WHOLE_SUITE.

    Every other scenario never reaches the defect, so it plays as it does against the reference consumer, which
    passes them all (test_reference_consumer_passes_every_scenario). Running all 48 for each of the 24 defects
    was 15.5 of the 19 minutes of a two-worker test run: each scenario starts its own client processes.
    """
    if broken.defect in WHOLE_SUITE:
        return tuple(CASE_IDS)
    reached = {case_id.split("/")[0] for case_id in broken.fails | broken.skips}
    return tuple(case_id for case_id in CASE_IDS if case_id.split("/")[0] in reached or case_id == BASELINE)


@pytest.fixture(scope="module")
def broken_runs(request: pytest.FixtureRequest) -> dict[str, Run | BaseException]:
    """The run of each broken consumer selected in this session (`-k` one: that run alone) over its scenarios
    (`scenarios_for`), made RUNS_AT_ONCE at a time in one loop before the first is judged; each test still judges
    its own run."""
    selected = {
        item.callspec.params["broken"]
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.path == Path(__file__)
        and item.originalname == "test_broken_consumer_fails_exactly_its_scenarios"
    }
    chosen = [broken for broken in BROKEN_CONSUMERS if broken in selected]

    async def side_by_side(root: Path) -> dict[str, Run | BaseException]:
        slots = asyncio.Semaphore(RUNS_AT_ONCE)

        async def one(broken: BrokenConsumer) -> Run:
            async with slots:
                work = root / broken.defect
                work.mkdir()
                return await suite_run(work, broken.command, only=scenarios_for(broken))

        runs = await asyncio.gather(*(one(broken) for broken in chosen), return_exceptions=True)
        return {broken.defect: run for broken, run in zip(chosen, runs, strict=True)}

    with scratch_directory("parley-consumer-suites-") as root:
        return asyncio.run(side_by_side(root))


@pytest.mark.parametrize("broken", BROKEN_CONSUMERS, ids=[b.defect for b in BROKEN_CONSUMERS])
def test_broken_consumer_fails_exactly_its_scenarios(
    broken_runs: dict[str, Run | BaseException], broken: BrokenConsumer
) -> None:
    run = broken_runs[broken.defect]
    if isinstance(run, BaseException):
        raise run
    code, report, output = run
    outcomes = outcomes_of(report)
    assert list(outcomes) == list(scenarios_for(broken)), output
    failed = {case_id for case_id, outcome in outcomes.items() if outcome == "FAIL"}
    assert failed == broken.fails, output
    skipped = {case_id for case_id, outcome in outcomes.items() if outcome == "SKIP"}
    assert skipped == broken.skips, output
    assert set(outcomes.values()) <= {"PASS", "FAIL", "SKIP"}, output
    assert code == EXIT_FAILED


def test_the_broken_consumers_runs_cover_their_requirements_and_the_baseline() -> None:
    for broken in BROKEN_CONSUMERS:
        scenarios = scenarios_for(broken)
        assert broken.fails | broken.skips | {BASELINE} <= set(scenarios), broken.defect
    assert {broken.defect for broken in BROKEN_CONSUMERS} >= WHOLE_SUITE
    whole = [broken for broken in BROKEN_CONSUMERS if broken.defect in WHOLE_SUITE]
    assert all(scenarios_for(broken) == tuple(CASE_IDS) for broken in whole)
    played = sum(len(scenarios_for(broken)) for broken in BROKEN_CONSUMERS)
    assert played < len(BROKEN_CONSUMERS) * len(CASE_IDS) / 3  # the point of scoping: see `scenarios_for`


def test_every_defect_class_is_covered() -> None:
    assert {b.name for b in BROKEN_CONSUMERS} == {
        "pays a forged bill",
        "accepts a key set rollback",
        "pays instructions for another amount",
        "accepts a counter to an in-options offer",
        "ignores the pinned fingerprint",
        "pays unchained instructions",
        "pays instructions for another intent",
        "pays after the pay-by time",
        "trusts any signature on instructions",
        "takes bills for any account",
        "ignores key revocations",
        "judges bills as live",
        "records payments in memory only",
        "ignores the limits Hello announced",
        "takes a lost answer for a refusal",
        "skips the time checks of stored instructions",
        "judges instructions as live",
        "discloses unsalted circumstances",
        "keeps unchained receipts",
        "keeps receipts for another intent",
        "checks the pay-by time only when instructions arrive",
        "takes the last event again for a broken chain",
        "keeps instructions that lapsed unpaid",
        "refuses instructions that arrive lapsed",
    }
    for broken in BROKEN_CONSUMERS:
        assert broken.fails <= set(CASE_IDS), broken.name


# --- 3. Clients that do nothing, or cannot start; the command line ------------------------------------------


def test_a_client_that_does_nothing_cannot_pass(tmp_path: Path) -> None:
    code, report, output = run_against(tmp_path, "true")
    outcomes = outcomes_of(report)
    assert outcomes["PAY-8/honest-biller-paid"] == "FAIL", output
    skipped = {case_id for case_id, outcome in outcomes.items() if outcome == "SKIP"}
    optional = {
        "EVT-5/duplicate-event",
        "NEG-12/counter-to-in-options-offer",
        "NEG-21/counter-close-to-the-deadline",
        "TRN-6/negotiate-answer-lost",
    }
    assert skipped == optional, output  # optional behaviour: it never negotiated nor watched events
    levels = {case.id: case.level for case in consumer_cases.suite.cases}
    played = {case_id: outcome for case_id, outcome in outcomes.items() if case_id not in skipped}
    assert {outcome for case_id, outcome in played.items() if levels[case_id] is Level.MUST} == {"FAIL"}, output
    assert {outcome for case_id, outcome in played.items() if levels[case_id] is Level.SHOULD} == {"WARN"}, output
    details = {case["id"]: case["detail"] for case in report["cases"]}
    assert details["BIL-3/forged-bill-signature"].startswith("setup step failed:")
    assert code == EXIT_FAILED


def test_a_program_found_nowhere_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    argv = ["conformance", "consumer", "--client-cmd", "no-such-parley-client --once", "--json", str(report)]
    assert main(argv) == EXIT_NOT_RUN  # the deprecated `--json FILE` still writes FILE, and says so
    output = capsys.readouterr().out
    assert "cannot start" in output
    assert "unreachable" not in output
    assert f"--json FILE is deprecated, use --json-out {report}" in output
    document = json.loads(report.read_text(encoding="utf-8"))
    assert (document["cases"], document["exit_code"]) == ([], EXIT_NOT_RUN)


@pytest.mark.parametrize(
    "command", ["exit 7", "true; exit 7", "cd / && true", "(exit 3)", "{ true; }", "X=1 true", "$CLIENT --once"]
)
def test_a_command_sh_would_run_is_let_through(command: str) -> None:
    """The help says CMD is run by sh: a builtin (`exit 7` was refused as "not an executable found on PATH"), a
    list, a subshell or a group is a command, judged by the shell itself."""
    consumer_cases.check_command(command)


def test_a_first_word_the_shell_finds_nowhere_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(NotRunnable, match="finds no command 'no-such-parley-client'"):
        consumer_cases.check_command("no-such-parley-client --once")
    with pytest.raises(NotRunnable, match="finds no command 'ls'"):
        consumer_cases.check_command("ls", path=str(tmp_path))  # an empty PATH: no program is found
    consumer_cases.check_command("exit 7", path=str(tmp_path))  # a builtin needs no PATH


def test_a_command_the_shell_cannot_run_makes_every_scenario_skip_and_exits_2(tmp_path: Path) -> None:
    missing = shlex.quote(str(tmp_path / "missing-client"))
    code, report, output = run_against(tmp_path, f"cd {shlex.quote(str(tmp_path))} && {missing} --once")
    assert set(outcomes_of(report).values()) == {"SKIP"}, output
    assert all("could not start (exit 127)" in case["detail"] for case in report["cases"]), output
    assert code == EXIT_NOT_RUN
    assert "NOTHING RAN" in output


def test_a_client_that_never_exits_is_killed_and_fails(tmp_path: Path) -> None:
    started = time.monotonic()
    code, report, output = run_against(tmp_path, "sleep 30", only=("PAY-8/honest-biller-paid",), timeout=3.0)
    assert time.monotonic() - started < 15
    (case,) = report["cases"]
    assert case["outcome"] == "FAIL", output
    assert "did not exit within 1.2 s" in case["detail"]
    assert code == EXIT_FAILED


def test_no_scenario_selected_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "consumer", "--client-cmd", "true", "--only", "NOPE"]) == EXIT_NOT_RUN
    assert "no case matches" in capsys.readouterr().out
    assert main(["conformance", "consumer", "--client-cmd", "true", "--jobs", "0"]) == EXIT_NOT_RUN
    assert "--jobs: expected a whole number from 1 to 64, got 0" in capsys.readouterr().out


def test_cli_known_failing_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = next(b for b in BROKEN_CONSUMERS if b.defect == "pays-instructions-for-another-amount")
    known = tmp_path / "known-failing.txt"
    known.write_text("PAY-8/instructions-amount  # the broken consumer's known defect\n")
    junit, report = tmp_path / "r.xml", tmp_path / "r.json"
    argv = [
        "conformance", "consumer", "--client-cmd", broken.command,
        "--only", "PAY-8/honest-biller-paid,PAY-8/instructions-amount",
        "--jobs", "2", "--timeout", str(TIMEOUT), "--junit", str(junit), "--json-out", str(report),
    ]  # fmt: skip
    assert main([*argv, "--work-dir", str(tmp_path / "kept")]) == EXIT_FAILED
    (kept,) = (tmp_path / "kept").glob("instructions-amount-*")  # what the client printed, kept for its author
    assert "parley consumer" in (kept / "client-run-1.log").read_text(encoding="utf-8")
    assert '"amount": "200.00"' in (kept / "client-state" / "bank-orders.jsonl").read_text(encoding="utf-8")
    assert main([*argv, "--known-failing", str(known)]) == EXIT_OK
    output = capsys.readouterr().out
    assert "known failing: PAY-8/instructions-amount (FAIL)" in output
    document = json.loads(report.read_text(encoding="utf-8"))
    assert [case["id"] for case in document["cases"]] == ["PAY-8/honest-biller-paid", "PAY-8/instructions-amount"]
    assert document["known_failing"] == ["PAY-8/instructions-amount"]
    assert document["summary"] == {"PASS": 1, "FAIL": 1, "WARN": 0, "SKIP": 0}
    assert document["suite"] == "consumer"
    for case in document["cases"]:
        assert case["requirement"]
        assert case["description"]
        assert case["spec_id"] == "PAY-8"
    root = ET.parse(junit).getroot()
    skipped = [c.get("name") for c in root.iter("testcase") if c.find("skipped") is not None]
    assert skipped == ["PAY-8/instructions-amount"]  # a known failure is reported skipped


# --- 4. The scenarios, the docs, the adapter and the runner -----------------------------------------------


def test_every_scenario_names_a_spec_requirement_and_quotes_it() -> None:
    spec_text = " ".join(SPEC.split())
    assert len(CASE_IDS) >= 8
    for case in consumer_cases.suite.cases:
        assert f"**{case.requirement}**" in SPEC, case.id
        assert 0 < len(case.description) <= 140, case.id
        assert case.level in (Level.MUST, Level.SHOULD), case.id
        if case.level is Level.SHOULD:  # it judges a SHOULD (WARN), never a MUST
            assert "SHOULD" in case.quote, case.id
            assert "MUST" not in case.quote, case.id
        for piece in re.split(r"\[[^\]]*\]|…", case.quote):
            fragment = " ".join(piece.split()).strip(" .,;:—")
            if len(fragment) > 12:
                assert fragment in spec_text, f"{case.id}: {fragment!r} is not in docs/PROTOCOL.md"


def test_docs_list_every_scenario_and_the_client_contract() -> None:
    docs = (ROOT / "docs" / "CONFORMANCE.md").read_text(encoding="utf-8")
    assert [case_id for case_id in CASE_IDS if f"`{case_id}`" not in docs] == []
    for name in (*consumer_cases.CLIENT_ENVIRONMENT, "bank-orders.jsonl", "--from-env", "--jobs"):
        assert name in docs, name
    for broken in BROKEN_CONSUMERS:
        assert broken.name in docs, broken.name


def test_from_env_builds_a_household_and_names_the_variable_at_fault() -> None:
    environment = {
        "PARLEY_TARGET": "127.0.0.1:7443",
        "PARLEY_BILLER_PARTY_ID": "biller:energy.example",
        "PARLEY_FINGERPRINT": "ab" * 32,
        "PARLEY_ACCOUNT_ID": "acct-1",
        "PARLEY_ENROLMENT_CODE": "7KQ2-M9XD-4RTB",
    }
    profile = profile_from_env(environment)
    assert profile.hardship  # it claims a hardship programme where nothing else is affordable (PRV-1)
    (biller,) = profile.connected()
    assert biller.biller_id == "biller:energy.example"
    assert biller.connection is not None
    assert biller.connection.insecure  # loopback: plaintext
    assert (profile.party_id, profile.currency) == ("consumer:conformance-household", "EUR")
    remote = profile_from_env({**environment, "PARLEY_TARGET": "billing.example:443"}).connected()[0]
    assert remote.connection is not None
    assert not remote.connection.insecure
    for name, value in (("PARLEY_FINGERPRINT", "zz"), ("PARLEY_ENROLMENT_CODE", "nope"), ("PARLEY_TARGET", "x")):
        with pytest.raises(ProfileError) as bad:
            profile_from_env({**environment, name: value})
        assert bad.value.key == name
    with pytest.raises(ProfileError) as missing:
        profile_from_env({k: v for k, v in environment.items() if k != "PARLEY_ACCOUNT_ID"})
    assert missing.value.key == "PARLEY_ACCOUNT_ID"


def test_runner_jobs_run_cases_together_and_report_them_in_order() -> None:
    suite: Suite[None] = Suite("synthetic")
    started: list[str] = []

    def case(name: str, delay: float) -> None:
        async def body(context: None) -> str:
            started.append(name)
            await asyncio.sleep(delay)
            return name

        suite.case(f"AAA-{name}/case", description=name, quote="q")(body)

    for name, delay in (("1", 0.3), ("2", 0.0), ("3", 0.1)):
        case(name, delay)
    printed: list[str] = []

    async def scenario() -> list[str]:
        results = await run_cases(
            suite, suite.cases, None, jobs=3, on_result=lambda result: printed.append(result.detail)
        )
        return [result.detail for result in results]

    assert asyncio.run(scenario()) == ["1", "2", "3"]
    assert printed == ["1", "2", "3"]
    assert started == ["1", "2", "3"]  # all three started before the first ended


def test_run_client_environment_is_the_scenarios(tmp_path: Path) -> None:
    """The client sees exactly the scenario's PARLEY_* variables (an inherited one is dropped)."""
    dump = tmp_path / "env.json"
    program = f"import json, os; json.dump(dict(os.environ), open({str(dump)!r}, 'w'))"
    client = shlex.join([sys.executable, "-c", program])

    async def scenario() -> dict[str, str]:
        async with (
            consumer_cases.connect(client, timeout=30, work_dir=tmp_path / "work") as context,
            consumer_cases.scenario(context, "environment") as played,
        ):
            await played.run_client()
            seen: dict[str, str] = json.loads(dump.read_text(encoding="utf-8"))
            assert seen["PARLEY_TARGET"] == played.biller.target
            assert seen["PARLEY_FINGERPRINT"] == played.biller.identity.fingerprint.hex()
            assert seen["PARLEY_STATE_DIR"] == str(played.state_dir)
            return seen

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARLEY_STRAY", "inherited")
        seen = asyncio.run(scenario())
    assert sorted(name for name in seen if name.startswith("PARLEY_")) == sorted(consumer_cases.CLIENT_ENVIRONMENT)
