"""The biller conformance suite, itself tested.

1. Against the reference biller (in-process, conformance control on 127.0.0.1): every case PASSes but its
   documented WARN and the transport cases it cannot run in plaintext without bounds (`REFERENCE_SKIPS`).
2. Against deliberately broken billers (tests/broken_billers.py), one per class of defect: the suite
   FAILs exactly the cases that should fail, and nothing else.
3. The command line: an unreachable target and a run in which no case ran exit 2; known-failing lists;
   JUnit and JSON reports are well formed. The runner's rules are checked on a synthetic suite too.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from agent.cli import main
from agent.conformance import biller as biller_suite
from agent.conformance.biller.clock import suite as clock_suite
from agent.conformance.biller.target import FIXTURES, BillerTarget, connect
from agent.conformance.control import ControlledBiller, SteppingClock
from agent.conformance.peers import free_port
from agent.conformance.runner import (
    EXIT_FAILED,
    EXIT_NOT_RUN,
    EXIT_OK,
    Level,
    Outcome,
    RunOptions,
    Skip,
    Suite,
    TargetUnreachable,
    Violation,
    run_cases,
    run_suite,
)
from reference_biller.service import Biller as ReferenceBiller
from reference_biller.service import SteppableClock
from tests.broken_billers import BROKEN_BILLERS, BrokenBiller, Defect, reference_biller
from tests.broken_billers_extra import EXTRA_BROKEN_BILLERS
from tests.broken_billers_extra import BrokenBiller as ExtraBrokenBiller
from tests.helpers.biller_suite_runs import SuiteRun, SuiteRunResult, run_all

ROOT = Path(__file__).resolve().parent.parent
SPEC = (ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
CASE_IDS = [case.id for case in biller_suite.suite.cases]


# The suite runs the tests below judge (the reference, each broken biller) are made together, side by side in
# worker processes, before the first of them is judged: tests/helpers/biller_suite_runs.py says why and how.
# Each is one run against its own biller (the whole suite, or a broken biller's `cases_for`), and each test
# asserts on its own run's report.
SuiteRuns = dict[SuiteRun, SuiteRunResult]
BROKEN_TESTS = ("test_broken_biller_fails_exactly_its_cases", "test_extra_broken_biller_fails_exactly_its_cases")
REFERENCE_RUNS = {
    "test_reference_biller_passes_every_case": SuiteRun(),
    "test_without_conformance_control_fixture_cases_skip_with_the_reason": SuiteRun(conformance_control=False),
}


def run_judged_by(item: pytest.Item) -> SuiteRun | None:
    """The whole-suite run that `item` (a test of this module) judges, if any."""
    if not isinstance(item, pytest.Function) or item.path != Path(__file__):
        return None
    if item.originalname in BROKEN_TESTS:
        broken = item.callspec.params["broken"]
        assert isinstance(broken, BrokenBiller | ExtraBrokenBiller)
        return SuiteRun(broken.name, only=cases_for(broken))
    return REFERENCE_RUNS.get(item.originalname)


@pytest.fixture(scope="module")
def suite_runs(request: pytest.FixtureRequest) -> SuiteRuns:
    """Every run judged by the tests selected in this session (`-k` one broken biller: that run alone)."""
    return run_all(run for item in request.session.items if (run := run_judged_by(item)) is not None)


def judged(suite_runs: SuiteRuns, run: SuiteRun) -> tuple[int, dict[str, Any], str]:
    """The run's (exit code, JSON report, printed output); a run that could not complete fails its test alone."""
    result = suite_runs[run]
    assert result.error is None, result.error
    return result.code, result.report, result.output


def with_cli(tmp_path: Path, body: Callable[[str], Awaitable[None]], defect: Defect | None = None) -> None:
    """Serve a reference biller in this loop while `body(target)` runs `parley` in a worker thread."""

    async def scenario() -> None:
        async with reference_biller(tmp_path / "state", defect) as target:
            await body(target)

    asyncio.run(scenario())


def parley(*argv: str) -> Awaitable[int]:
    return asyncio.to_thread(main, list(argv))


# --- 1. The reference biller passes ------------------------------------------------------------------


REFERENCE_WARNS = {
    # KEY-16 is a SHOULD: the reference biller renews its key set in time but lists one key, with no second key
    # held offline (docs/CONFORMANCE.md, "What the reference biller does not do").
    # (which version is newest depends on how far the run has moved the clock: the reference renews in time)
    "KEY-16/biller-renews": ("WARN", re.compile(r"the biller's newest version \d+ lists 1 key, not two or more")),
}


# The transport cases this in-process run (plaintext, no connection bounds told) cannot run: skipped with these
# reasons (docs/CONFORMANCE.md, "Transport cases"); tests/test_conformance_biller_transport.py runs them against a
# reference biller served for them.
REFERENCE_SKIPS = {
    "TRN-9/client-certificate-required": "not applicable: the target is reached in plaintext, so it does not require "
    "mutual TLS",
    "TRN-10/idle-connections-reaped": "the target's idle timeout is not known: give --idle-timeout SECONDS",
    "TRN-10/handshake-deadline": "the target's handshake deadline is not known: give --handshake-timeout SECONDS",
    "TRN-10/total-cap": "the target's total connection cap is not known: give --max-connections N",
    "TRN-11/per-address-cap": "the target's per-address connection cap is not known: give "
    "--max-connections-per-address N",
}


def only_the_reference_warns(not_passed: dict[str, tuple[str, str]]) -> bool:
    """`not_passed` (id -> outcome, detail) is exactly the reference's documented WARNs and SKIPs."""
    expected = {**REFERENCE_WARNS, **{i: ("SKIP", re.compile(re.escape(r))) for i, r in REFERENCE_SKIPS.items()}}
    return not_passed.keys() == expected.keys() and all(
        not_passed[case_id][0] == outcome and detail.fullmatch(not_passed[case_id][1])
        for case_id, (outcome, detail) in expected.items()
    )


def test_reference_biller_passes_every_case(suite_runs: SuiteRuns) -> None:
    code, report, output = judged(suite_runs, SuiteRun())
    not_passed = {
        case["id"]: (case["outcome"], case["detail"]) for case in report["cases"] if case["outcome"] != "PASS"
    }
    assert only_the_reference_warns(not_passed), output
    assert code == EXIT_OK
    skips = len(REFERENCE_SKIPS)
    passed = len(CASE_IDS) - len(REFERENCE_WARNS) - skips
    assert report["summary"] == {"PASS": passed, "FAIL": 0, "WARN": 1, "SKIP": skips}
    assert (report["verdict"], report["skipped"]) == ("PARTIAL", dict.fromkeys(REFERENCE_SKIPS.values(), 1))
    assert f"PARTIAL ({skips} of {len(CASE_IDS)} cases skipped" in " ".join(output.split())
    assert [case["id"] for case in report["cases"]] == CASE_IDS
    assert output.rstrip().splitlines()[-1].startswith("summary: parley conformance biller")
    junit = ET.fromstring(suite_runs[SuiteRun()].junit)
    suite = junit.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (str(len(CASE_IDS)), "0", "0")


def test_without_conformance_control_fixture_cases_skip_with_the_reason(suite_runs: SuiteRuns) -> None:
    code, report, output = judged(suite_runs, SuiteRun(conformance_control=False))
    needs_fixtures = {case.id for case in biller_suite.suite.cases if FIXTURES in case.needs}
    outcomes = {case["id"]: (case["outcome"], case["detail"]) for case in report["cases"]}
    assert {i for i, (outcome, _) in outcomes.items() if outcome == "SKIP"} == needs_fixtures | set(REFERENCE_SKIPS)
    assert {detail for i, (_, detail) in outcomes.items() if i in needs_fixtures} == {
        "conformance-control not announced"
    }
    not_passed = {i: o for i, o in outcomes.items() if i not in needs_fixtures and o[0] != "PASS"}
    assert only_the_reference_warns(not_passed), output
    assert "neither announced nor served" in outcomes["CNF-3/feature-matches-service"][1]
    assert code == EXIT_OK
    # Honest skips: not a bare OK, but PARTIAL with how many cases did not run, and why.
    assert report["verdict"] == "PARTIAL"
    skipped = len(needs_fixtures) + len(REFERENCE_SKIPS)
    assert report["skipped"] == {
        "conformance-control not announced": len(needs_fixtures),
        **dict.fromkeys(REFERENCE_SKIPS.values(), 1),
    }
    last = " ".join(output.split("summary:")[-1].split())
    assert f"PARTIAL ({skipped} of {len(CASE_IDS)} cases skipped — {len(needs_fixtures)}: conformance-control " in last


# --- 2. Broken billers fail exactly their cases --------------------------------------------------------


# Cases added for issue 15 that catch a defect of tests/broken_billers.py as well (kept here, beside the
# suite they belong to, so that the broken billers' own lists stay those of the cases they were written for).
ALSO_CAUGHT: dict[str, frozenset[str]] = {
    "skips signature verification": frozenset({"ENV-10/check-order", "KEY-6/keyid-of-another-party"}),
    # a stale Accept agrees instead of ending the thread in PROTOCOL_ERROR, so that closed state is never reached
    "accepts a stale accept digest": frozenset({"NEG-14/closed-states"}),
    "loses events on resume": frozenset({"EVT-3/cursor-boundary", "EVT-9/stream-lifetime"}),
    # a re-bound account's earlier holder is served its reads instead of ACCOUNT_ACCESS_DENIED
    "lets one consumer read another's bills": frozenset({"ENR-12/re-enrolment"}),
}


# Defects on the path of every request (the receive path's verification, its replay cache, its order of checks):
# these run the whole suite, so that a case of any section failing them would show.
WHOLE_SUITE = frozenset(
    {
        "skips signature verification",
        "accepts a replay",
        "parses before verifying",
        "matches the keyid to the sender before verifying",
    }
)
# A negotiation agreed and its instalment paid: the path every other broken biller's run also crosses.
BASELINE = "PAY-3/agreement"


def expected_failures(broken: BrokenBiller | ExtraBrokenBiller) -> frozenset[str]:
    return broken.fails | ALSO_CAUGHT.get(broken.name, frozenset())


def cases_for(broken: BrokenBiller | ExtraBrokenBiller) -> tuple[str, ...]:
    """What a broken biller is run against: every case of each spec section (ENV, NEG, KEY…) holding a case it
    fails (the neighbours its defect could reach), and the baseline; the whole suite for the defects in
    WHOLE_SUITE.

    A case of another section never reaches the defect, so it plays as it does against the reference biller,
    which passes them all (test_reference_biller_passes_every_case). 27 whole runs of about 25 s were most of
    this module's three minutes.
    """
    if broken.name in WHOLE_SUITE:
        return ()
    sections = {section_of(case_id) for case_id in expected_failures(broken)}
    return tuple(case_id for case_id in CASE_IDS if section_of(case_id) in sections or case_id == BASELINE)


def section_of(case_id: str) -> str:
    return case_id.split("-", maxsplit=1)[0]  # "KEY-5/check-order" -> "KEY"


def ran_as_chosen(report: dict[str, Any], broken: BrokenBiller | ExtraBrokenBiller) -> set[str]:
    """The case ids of the run, checked to be exactly those `cases_for` chose (all, when it chose none)."""
    ran = [case["id"] for case in report["cases"]]
    assert ran == (list(cases_for(broken)) or CASE_IDS)
    return set(ran)


@pytest.mark.parametrize("broken", BROKEN_BILLERS, ids=[b.name for b in BROKEN_BILLERS])
def test_broken_biller_fails_exactly_its_cases(suite_runs: SuiteRuns, broken: BrokenBiller) -> None:
    code, report, output = judged(suite_runs, SuiteRun(broken.name, only=cases_for(broken)))
    ran = ran_as_chosen(report, broken)
    outcomes = {case["id"]: case["outcome"] for case in report["cases"]}
    failed = {case_id for case_id, outcome in outcomes.items() if outcome == "FAIL"}
    assert failed == expected_failures(broken), output
    warned = {case_id for case_id, outcome in outcomes.items() if outcome == "WARN"}
    assert warned == set(REFERENCE_WARNS) & ran, output  # the reference's own WARN, no other
    skipped = {case_id for case_id, outcome in outcomes.items() if outcome == "SKIP"}
    assert skipped == set(REFERENCE_SKIPS) & ran, output
    assert code == EXIT_FAILED


@pytest.mark.parametrize("broken", EXTRA_BROKEN_BILLERS, ids=[b.name for b in EXTRA_BROKEN_BILLERS])
def test_extra_broken_biller_fails_exactly_its_cases(suite_runs: SuiteRuns, broken: Any) -> None:
    """tests/broken_billers_extra.py: defects wrapped around the public BillerAgent, one per case of issue 15."""
    code, report, output = judged(suite_runs, SuiteRun(broken.name, only=cases_for(broken)))
    ran_as_chosen(report, broken)
    failed = {case["id"] for case in report["cases"] if case["outcome"] == "FAIL"}
    assert failed == broken.fails, output
    assert code == EXIT_FAILED


def test_the_broken_billers_runs_cover_their_sections_and_the_baseline() -> None:
    every = (*BROKEN_BILLERS, *EXTRA_BROKEN_BILLERS)
    assert {broken.name for broken in every} >= WHOLE_SUITE  # no name of a defect that is gone
    assert BASELINE in CASE_IDS
    (round_limit,) = [b for b in BROKEN_BILLERS if b.name == "ignores the round limit"]
    chosen = cases_for(round_limit)
    assert set(chosen) == {i for i in CASE_IDS if i.startswith("NEG-")} | {BASELINE}
    assert list(chosen) == [i for i in CASE_IDS if i in chosen]  # in the suite's own order
    for broken in every:
        assert expected_failures(broken) <= set(cases_for(broken) or CASE_IDS), broken.name
        assert (cases_for(broken) == ()) == (broken.name in WHOLE_SUITE), broken.name


def test_every_defect_class_is_covered() -> None:
    names = {b.name for b in BROKEN_BILLERS}
    assert names == {
        "skips signature verification",
        "accepts a replay",
        "ignores the round limit",
        "accepts a stale accept digest",
        "pays twice on a retried intent",
        "lets one consumer read another's bills",
        "loses events on resume",
    }
    for broken in BROKEN_BILLERS:
        assert broken.fails <= set(CASE_IDS), broken.name


# --- 3. The command line ---------------------------------------------------------------------------------


def test_unreachable_target_exits_2_with_the_json_report_alone_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"
    assert main(["conformance", "biller", "--target", target, "--insecure", "--json"]) == EXIT_NOT_RUN
    printed = capsys.readouterr()
    assert "unreachable" in printed.err  # the run's lines and summary: on stderr with --json
    document = json.loads(printed.out)  # stdout is one JSON document
    assert document["cases"] == []
    assert document["summary"] == {"PASS": 0, "FAIL": 0, "WARN": 0, "SKIP": 0}


def test_plaintext_to_a_remote_target_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "biller", "--target", "192.0.2.1:7443", "--insecure"]) == EXIT_NOT_RUN
    assert "loopback" in capsys.readouterr().out


def test_no_case_ran_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def body(target: str) -> None:
        assert await parley("conformance", "biller", "--target", target, "--insecure", "--only", "NOPE") == EXIT_NOT_RUN

    with_cli(tmp_path, body)
    assert "no case matches" in capsys.readouterr().out


def test_cli_reports_and_known_failing_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    known = tmp_path / "known-failing.txt"
    known.write_text("# passes, so it is reported\nVER-2/hello  # stale entry\n\nNOT-1/listed-but-not-run\n")
    junit, report = tmp_path / "r.xml", tmp_path / "r.json"

    async def body(target: str) -> None:
        code = await parley(
            "conformance", "biller", "--target", target, "--insecure", "--only", "VER,ENV-2",
            "--skip", "ENV-2/no-signature", "--known-failing", str(known),
            "--junit", str(junit), "--json-out", str(report), "--timeout", "20",
        )  # fmt: skip
        assert code == EXIT_FAILED  # an unexpected pass makes the list stale: the run fails

    with_cli(tmp_path, body)
    output = capsys.readouterr().out
    assert "UNEXPECTED PASS" in output
    assert "VER-2/hello" in output
    assert "NOT-1/listed-but-not-run" in output
    assert output.rstrip().splitlines()[-1].startswith("summary:")
    document = json.loads(report.read_text(encoding="utf-8"))
    ids = [case["id"] for case in document["cases"]]
    assert ids == ["VER-2/hello", "VER-2/no-common-version", "ENV-2/two-signatures", "ENV-2/enrolled-signer"]
    assert document["unexpected_passes"] == ["VER-2/hello"]
    assert document["summary"] == {"PASS": 4, "FAIL": 0, "WARN": 0, "SKIP": 0}
    for case in document["cases"]:
        assert {"id", "outcome", "detail", "description", "requirement"} <= case.keys()
        assert case["requirement"]
        assert case["description"]
    root = ET.parse(junit).getroot()
    failures = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None]
    assert failures == ["VER-2/hello"]


def test_known_failing_case_does_not_fail_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = next(b for b in BROKEN_BILLERS if b.name == "loses events on resume")
    known = tmp_path / "known-failing.txt"
    known.write_text("EVT-4/resume-from-cursor\n")

    async def body(target: str) -> None:
        argv = ("conformance", "biller", "--target", target, "--insecure", "--only", "EVT-4")
        assert await parley(*argv) == EXIT_FAILED
        assert await parley(*argv, "--known-failing", str(known)) == EXIT_OK

    with_cli(tmp_path, body, broken.defect)
    assert "known failing: EVT-4/resume-from-cursor (FAIL)" in capsys.readouterr().out


# --- The cases themselves -----------------------------------------------------------------------------


def test_every_case_names_a_spec_requirement_and_quotes_it() -> None:
    spec_text = " ".join(SPEC.split())
    for case in biller_suite.suite.cases:
        assert f"**{case.requirement}**" in SPEC, case.id
        assert 0 < len(case.description) <= 140, case.id
        for piece in re.split(r"\[[^\]]*\]|…", case.quote):
            fragment = " ".join(piece.split()).strip(" .,;:—")
            if len(fragment) > 12:
                assert fragment in spec_text, f"{case.id}: {fragment!r} is not in docs/PROTOCOL.md"


def test_cases_that_move_the_clock_come_last() -> None:
    clock_cases = [case.id for case in clock_suite.cases]
    assert clock_cases[:3] == ["NEG-6/deadline", "KEY-13/keyset-expired", "ENR-4/code-expired"]
    assert CASE_IDS[-len(clock_cases) - 2 :] == [*clock_cases, "ERR-1/error-info", "ERR-2/no-unknown-code"]


def test_every_section_module_is_in_the_running_order() -> None:
    """A section module left out of `SECTIONS` would silently never run."""
    package = Path(biller_suite.__file__).parent
    modules = {path.stem for path in package.glob("*.py")} - {"__init__", "target"}
    listed = {section.name.removeprefix("biller/") for section in biller_suite.SECTIONS}
    assert listed == modules
    assert sum(len(section.cases) for section in biller_suite.SECTIONS) == len(CASE_IDS)


def test_docs_list_every_case() -> None:
    docs = (ROOT / "docs" / "CONFORMANCE.md").read_text(encoding="utf-8")
    missing = [case_id for case_id in CASE_IDS if f"`{case_id}`" not in docs]
    assert missing == []


# --- The runner, on a synthetic suite ----------------------------------------------------------------------


class _Target:
    features: frozenset[str] = frozenset({"present"})


def _synthetic() -> Suite[_Target]:
    suite: Suite[_Target] = Suite(
        "synthetic", precheck=lambda case, ctx: None if set(case.needs) <= ctx.features else "feature not announced"
    )

    async def passes(ctx: _Target) -> str:
        return "fine"

    async def fails(ctx: _Target) -> None:
        raise Violation("broken")

    async def skips(ctx: _Target) -> None:
        raise Skip("no fixture")

    async def crashes(ctx: _Target) -> None:
        raise KeyError("oops")

    async def hangs(ctx: _Target) -> None:
        await asyncio.sleep(60)

    for case_id, body, level, needs in (
        ("AAA-1/passes", passes, Level.MUST, ()),
        ("AAA-2/fails", fails, Level.MUST, ()),
        ("AAA-3/warns", fails, Level.SHOULD, ()),
        ("AAA-4/skips", skips, Level.MUST, ()),
        ("AAA-5/needs", passes, Level.MUST, ("absent",)),
        ("BBB-1/crashes", crashes, Level.SHOULD, ()),
        ("BBB-2/hangs", hangs, Level.MUST, ()),
    ):
        suite.case(case_id, description=case_id, quote="quoted", level=level, needs=needs)(body)
    return suite


def _run_synthetic(tmp_path: Path, *, unreachable: bool = False, **options: Any) -> tuple[int, dict[str, Any], str]:
    """Run the synthetic suite; (exit code, JSON report, printed output)."""
    report = tmp_path / "synthetic.json"
    output = io.StringIO()

    @asynccontextmanager
    async def connect() -> AsyncIterator[_Target]:
        if unreachable:
            raise TargetUnreachable("nobody there")
        yield _Target()

    run_options = RunOptions(target="synthetic", json=report, timeout=0.2, **options)
    code = asyncio.run(run_suite(_synthetic(), connect, run_options, Console(file=output, width=200)))
    return code, json.loads(report.read_text(encoding="utf-8")), output.getvalue()


def test_runner_outcomes(tmp_path: Path) -> None:
    code, document, _ = _run_synthetic(tmp_path)
    outcomes = {case["id"]: (case["outcome"], case["detail"]) for case in document["cases"]}
    assert outcomes["AAA-1/passes"] == ("PASS", "fine")
    assert outcomes["AAA-2/fails"] == ("FAIL", "broken")
    assert outcomes["AAA-3/warns"] == ("WARN", "broken")
    assert outcomes["AAA-4/skips"] == ("SKIP", "no fixture")
    assert outcomes["AAA-5/needs"] == ("SKIP", "feature not announced")
    assert outcomes["BBB-1/crashes"][0] == "FAIL"
    assert "KeyError" in outcomes["BBB-1/crashes"][1]
    assert outcomes["BBB-2/hangs"][0] == "FAIL"
    assert "timeout" in outcomes["BBB-2/hangs"][1]
    assert document["summary"] == {"PASS": 1, "FAIL": 3, "WARN": 1, "SKIP": 2}
    assert document["verdict"] == "FAILED"
    assert code == EXIT_FAILED


def test_runner_selection_known_failing_and_exit_codes(tmp_path: Path) -> None:
    assert _run_synthetic(tmp_path, only=("AAA-1/passes", "AAA-3"))[0] == EXIT_OK  # a WARN does not fail the run
    code, document, output = _run_synthetic(tmp_path, only=("AAA-1", "AAA-4", "AAA-5"))
    assert code == EXIT_OK  # a skip is not a failure, but the verdict says the run was partial
    assert document["verdict"] == "PARTIAL"
    assert document["skipped"] == {"no fixture": 1, "feature not announced": 1}
    assert "PARTIAL (2 of 3 cases skipped — 1: no fixture; 1: feature not announced)" in " ".join(output.split())
    assert _run_synthetic(tmp_path, only=("AAA-4", "AAA-5"))[0] == EXIT_NOT_RUN  # every case skipped: nothing ran
    assert _run_synthetic(tmp_path, only=("AAA",), skip=("AAA-1", "AAA-2", "AAA-3"))[0] == EXIT_NOT_RUN
    assert _run_synthetic(tmp_path, unreachable=True)[0] == EXIT_NOT_RUN
    known = tmp_path / "known.txt"
    known.write_text("AAA-2/fails\nBBB-*  # every BBB case\n")
    code, document, output = _run_synthetic(tmp_path, known_failing=known, only=("AAA-1", "AAA-2", "BBB"))
    assert code == EXIT_OK
    assert document["known_failing"] == ["AAA-2/fails", "BBB-1/crashes", "BBB-2/hangs"]
    assert "known failing:" in output
    known.write_text("AAA-1/passes\n")
    code, document, output = _run_synthetic(tmp_path, known_failing=known, only=("AAA-1",))
    assert code == EXIT_FAILED
    assert "UNEXPECTED PASS" in output
    assert document["unexpected_passes"] == ["AAA-1/passes"]
    assert _run_synthetic(tmp_path, known_failing=tmp_path / "missing.txt")[0] == EXIT_NOT_RUN


def test_the_runner_recovers_after_a_case_that_reached_no_conclusion() -> None:
    recovered: list[str] = []

    async def recover(ctx: _Target) -> None:
        recovered.append("after")
        if len(recovered) == 2:
            raise ConnectionError("the target went away")

    suite: Suite[_Target] = Suite("synthetic", recover=recover)
    cases = {case.id: case for case in _synthetic().cases}
    for case_id in ("AAA-1/passes", "AAA-2/fails", "AAA-4/skips", "BBB-2/hangs", "BBB-1/crashes"):
        suite.case(case_id, description=case_id, quote="quoted")(cases[case_id].body)
    results = asyncio.run(run_cases(suite, suite.cases, _Target(), timeout=0.2))
    assert recovered == ["after", "after"]  # after the hang and the crash only: a verdict needs no recovery
    details = {result.case_id: result.detail for result in results}
    assert details["BBB-2/hangs"] == "no conclusion within the case timeout of 0.2 s"
    assert details["BBB-1/crashes"].startswith("the case could not complete: KeyError: 'oops'")
    assert "; then recovery failed: ConnectionError: the target went away (" in details["BBB-1/crashes"]


def test_a_case_stopped_after_moving_the_clock_leaves_the_next_in_step(tmp_path: Path) -> None:
    """Cancelled after the biller applied its AdvanceClock but before the suite read the answer, a case left
    the suite a day behind the biller, and every later case signing with the suite's time was refused."""

    async def moves_the_clock_unseen(ctx: BillerTarget) -> None:
        await ctx.conn.advance_clock(86_400)  # applied by the biller; the suite's clock is not told
        await asyncio.sleep(60)

    async def in_step(ctx: BillerTarget) -> str:
        answer = await ctx.conn.advance_clock(1)
        behind = answer.now.ToDatetime(tzinfo=UTC) - ctx.now()
        if abs(behind) > timedelta(seconds=30):
            raise Violation(f"the suite's clock is {behind} behind the biller's")
        return "in step"

    async def run(recover: Callable[[BillerTarget], Awaitable[None]] | None) -> list[str]:
        suite: Suite[BillerTarget] = Suite("clock", recover=recover)
        suite.case("CNF-4/moves", description="", quote="")(moves_the_clock_unseen)
        suite.case("CNF-4/in-step", description="", quote="")(in_step)
        async with (
            reference_biller(tmp_path / f"state-{recover is None}") as target,
            connect(target, insecure=True) as ctx,
        ):
            return [result.outcome for result in await run_cases(suite, suite.cases, ctx, timeout=1)]

    assert asyncio.run(run(None)) == [Outcome.FAIL, Outcome.FAIL]
    assert asyncio.run(run(biller_suite.suite.recover)) == [Outcome.FAIL, Outcome.PASS]


def test_outcome_names() -> None:
    assert [o.value for o in Outcome] == ["PASS", "FAIL", "WARN", "SKIP"]


def test_the_reference_biller_offers_what_conformance_control_needs() -> None:
    """`agent.conformance.control` serves any biller shaped like `ControlledBiller` (mypy checks the shape)."""

    def controlled(biller: ReferenceBiller) -> ControlledBiller:
        return biller

    assert callable(controlled)
    assert isinstance(SteppableClock(), SteppingClock)


def test_the_judge_builds_what_it_sends_itself() -> None:
    """The biller suite and its peers build headers and key sets without the library's builders
    (`agent.conformance.peers` says why): a bug in those would otherwise be shared by the judge and hidden."""
    builders = {"new_header", "seal", "make_key_set", "first_key_set", "KeyEntry"}
    conformance = ROOT / "agent" / "conformance"
    judged = [conformance / "peers.py", conformance / "client.py", *sorted((conformance / "biller").glob("*.py"))]
    for path in judged:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("agent.protocol"):
                shared = builders & {alias.name for alias in node.names}
                assert not shared, f"{path.relative_to(ROOT)} imports {sorted(shared)} from {node.module}"
