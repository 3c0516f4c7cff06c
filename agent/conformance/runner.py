"""The conformance framework: cases tagged with requirement ids, run against a target, reported.

Shared by every Parley conformance suite (`parley conformance biller`, and the
consumer suite). A suite is a `Suite[C]` — an ordered registry of `Case`s over
a context type `C` that the suite defines (a connection to the target, the
target's announced features, fixtures…):

    suite: Suite[MyContext] = Suite("biller", precheck=why_not_runnable)

    @suite.case(
        "ENV-3/bad-signature",                  # "<requirement id>/<slug>", unique in the suite
        description="A flipped signature bit is refused with BAD_SIGNATURE",
        quote="A receiver MUST verify it … and MUST refuse the message with `BAD_SIGNATURE` …",
        level=Level.MUST,                       # MUST → FAIL when broken, SHOULD → WARN (CNF-5)
        needs=("negotiation",),                 # opaque tags, interpreted by `precheck`
        covers=("ENV-4",),                      # further ids the case exercises (the coverage table)
    )
    async def bad_signature(ctx: MyContext) -> str | None:
        ...                                     # raise Violation("what went wrong") when the target deviates
        return "optional detail shown on PASS"  # raise Skip("reason") when the case cannot run here

and `run_suite(suite, connect, options)` runs it: it selects the cases
(`--only`/`--skip`), connects (a `TargetUnreachable` from `connect` ends the
run with exit code 2), runs each case with a timeout, applies the
known-failing list, prints one line per case and the summary last, writes the
JUnit XML and JSON reports (`--junit FILE`; `--json` on stdout or `--json-out FILE`,
agent/tools/json_output.py), and returns the exit code.

Outcomes (PROTOCOL.md §1.4, CNF-5): PASS; FAIL (a MUST broken, a timeout, or
the case crashed); WARN (a SHOULD broken); SKIP (a feature or fixture the
target does not offer; the detail says which).

Exit codes: 0 when nothing failed; 1 when a case FAILed that is not listed as
known failing, or a known-failing entry passed (the list is stale: remove the
entry); 2 when the target is unreachable (or the suite cannot run at all:
`NotRunnable`, e.g. a client command that cannot start), the options are
unusable, or no case ran (none selected, or every selected case skipped).
The summary's last word is the verdict: OK (every selected case ran, none
failed), PARTIAL (exit 0, but some cases were skipped: it says how many and
why), FAILED or NOTHING RAN.

Cases run one after the other, unless the suite's cases are independent and
`RunOptions.jobs` allows several at once (the consumer suite's `--jobs`);
results are printed and reported in registration order either way.

Selecting cases: a pattern matches a case when it equals the case id
(`ENV-3/bad-signature`), its requirement id (`ENV-3`) or its requirement
prefix (`ENV`), or when it matches the case id as a shell-style glob
(`NEG-*`, `*/retry*`). `--only` keeps the cases matching any of its patterns,
`--skip` then drops those matching any of its patterns.

Known-failing file: one pattern per line (as above); blank lines and text
after `#` are ignored. A listed case that FAILs (or WARNs) is reported with its
real outcome but marked known, and does not fail the run; a listed case that
PASSes is reported as an unexpected pass and fails the run; patterns that
match no case run are printed as a note.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import fnmatch
import json
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from rich.console import Console
from rich.markup import escape

from agent.tools.json_output import STDOUT, add_json_options
from agent.tools.numbers import check_number
from agent.tools.paths import output_file_argument

C = TypeVar("C")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_RUN = 2
DEFAULT_TIMEOUT = 30.0
MAX_CASE_TIMEOUT = 3600.0  # seconds one case may be given
MAX_JOBS = 64  # cases at once: each consumer scenario is a biller and a client process


class Outcome(enum.StrEnum):
    PASS = "PASS"  # noqa: S105 - an outcome, not a password
    FAIL = "FAIL"
    WARN = "WARN"
    SKIP = "SKIP"


class Level(enum.StrEnum):
    """The key word of the requirement a case checks (RFC 2119): it decides FAIL versus WARN."""

    MUST = "MUST"
    SHOULD = "SHOULD"


class Violation(Exception):
    """The target deviates from the case's requirement: FAIL for a MUST case, WARN for a SHOULD case."""


class Skip(Exception):
    """The case cannot run against this target; the message says why (a feature, a fixture…)."""


class TargetUnreachable(Exception):
    """The target could not be reached at all: raised by a suite's `connect`; the run exits 2."""


class NotRunnable(TargetUnreachable):
    """The suite cannot run at all for another reason (e.g. the client under test cannot start); exit 2.

    Its message is reported as it is, without "the target is unreachable".
    """


CaseBody = Callable[[C], Awaitable[str | None]]


@dataclass(frozen=True)
class Case(Generic[C]):
    """One check of one requirement."""

    id: str
    level: Level
    description: str
    quote: str
    body: CaseBody[C]
    needs: tuple[str, ...] = ()
    covers: tuple[str, ...] = ()  # requirement ids exercised besides `requirement` (a violation of each FAILs it)

    @property
    def requirement(self) -> str:
        """The requirement id the case checks, e.g. "ENV-3" for "ENV-3/bad-signature"."""
        return self.id.split("/", 1)[0]

    @property
    def exercises(self) -> tuple[str, ...]:
        """Every requirement id the case exercises: its own first, then `covers` (docs/CONFORMANCE.md's
        coverage table is built from these)."""
        return (self.requirement, *(i for i in self.covers if i != self.requirement))

    def matches(self, pattern: str) -> bool:
        """See the module docstring: id, requirement id, requirement prefix, or glob on the id."""
        return pattern in (self.id, self.requirement, self.requirement.split("-", 1)[0]) or fnmatch.fnmatchcase(
            self.id, pattern
        )


class Suite(Generic[C]):
    """An ordered registry of cases over a context type `C`.

    `precheck(case, context)` returns a skip reason, or None when the case can
    run against the target (e.g. every tag in `case.needs` is a feature the
    target announced).

    `recover(context)` runs after a case that reached no conclusion (it timed
    out, or crashed): such a case was stopped anywhere, perhaps after the target
    applied a fixture call whose answer the suite never read. `recover` brings
    what the cases share back in step with the target (the biller suite's clock),
    so one stopped case does not fail the cases after it.
    """

    def __init__(
        self,
        name: str,
        *,
        precheck: Callable[[Case[C], C], str | None] | None = None,
        recover: Callable[[C], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.precheck = precheck
        self.recover = recover
        self._cases: dict[str, Case[C]] = {}

    @property
    def cases(self) -> list[Case[C]]:
        return list(self._cases.values())

    def case(
        self,
        case_id: str,
        *,
        description: str,
        quote: str,
        level: Level = Level.MUST,
        needs: Sequence[str] = (),
        covers: Sequence[str] = (),
    ) -> Callable[[CaseBody[C]], CaseBody[C]]:
        """Register the decorated coroutine function as a case (ValueError for a duplicate or bad id).

        `covers` names further requirement ids the case exercises: ids whose violation the case
        FAILs (or WARNs, for a SHOULD case) as surely as a violation of its own."""
        requirement, slash, slug = case_id.partition("/")
        if not (slash and slug and "-" in requirement):
            raise ValueError(f"case id {case_id!r} is not <requirement id>/<slug>")
        if case_id in self._cases:
            raise ValueError(f"case {case_id!r} is registered twice")

        def register(body: CaseBody[C]) -> CaseBody[C]:
            self._cases[case_id] = Case(case_id, level, description, quote, body, tuple(needs), tuple(covers))
            return body

        return register

    def include(self, section: Suite[C]) -> None:
        """Append the cases of `section` (a suite holding one part of this one), in its order.

        ValueError for a case id already registered here.
        """
        for case in section.cases:
            if case.id in self._cases:
                raise ValueError(f"case {case.id!r} is registered twice")
            self._cases[case.id] = case

    def select(self, only: Sequence[str] = (), skip: Sequence[str] = ()) -> list[Case[C]]:
        """The cases to run, in registration order."""
        chosen = [c for c in self.cases if not only or any(c.matches(p) for p in only)]
        return [c for c in chosen if not any(c.matches(p) for p in skip)]


# --- Results and reports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """The outcome of one case."""

    case_id: str
    requirement: str
    level: Level
    description: str
    quote: str
    outcome: Outcome
    detail: str
    duration: float
    known_failing: bool = False

    @property
    def unexpected_pass(self) -> bool:
        """Listed as known failing, yet it passed."""
        return self.known_failing and self.outcome is Outcome.PASS

    @property
    def fails_run(self) -> bool:
        """Whether this result makes the run exit 1."""
        return (self.outcome is Outcome.FAIL and not self.known_failing) or self.unexpected_pass

    def to_json(self) -> dict[str, object]:
        """One case of the JSON report: `requirement` is the quoted requirement, `spec_id` its id."""
        return {
            "id": self.case_id,
            "outcome": self.outcome.value,
            "detail": self.detail,
            "description": self.description,
            "requirement": self.quote,
            "spec_id": self.requirement,
            "level": self.level.value,
            "duration": round(self.duration, 3),
            "known_failing": self.known_failing,
            "unexpected_pass": self.unexpected_pass,
        }


@dataclass
class Report:
    """A whole run: what ran against what, and how each case ended."""

    suite: str
    target: str
    results: list[Result] = field(default_factory=list)
    duration: float = 0.0
    error: str = ""  # why nothing ran (unreachable target, no case selected…)
    unmatched_known_failing: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        """Counts per outcome, every outcome present."""
        return {outcome.value: sum(r.outcome is outcome for r in self.results) for outcome in Outcome}

    @property
    def ran(self) -> int:
        """Cases that actually ran (not skipped)."""
        return sum(r.outcome is not Outcome.SKIP for r in self.results)

    @property
    def exit_code(self) -> int:
        if self.error or not self.ran:
            return EXIT_NOT_RUN
        return EXIT_FAILED if any(r.fails_run for r in self.results) else EXIT_OK

    def skip_reasons(self) -> dict[str, int]:
        """How many cases were skipped for each reason, most frequent first."""
        reasons = Counter(r.detail or "no reason given" for r in self.results if r.outcome is Outcome.SKIP)
        return dict(reasons.most_common())

    @property
    def verdict(self) -> str:
        """The last word of the summary: OK only when every selected case ran and nothing failed.

        A run that skipped cases (a production biller without conformance control, a feature not
        announced) and failed none is PARTIAL — still exit code 0, since a skip is not a failure
        (CNF-5), but never a bare OK: the summary says how many cases did not run and why.
        """
        if self.exit_code == EXIT_NOT_RUN:
            return "NOTHING RAN"
        if self.exit_code == EXIT_FAILED:
            return "FAILED"
        return "PARTIAL" if self.ran < len(self.results) else "OK"

    def to_json(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "target": self.target,
            "cases": [r.to_json() for r in self.results],
            "summary": self.summary(),
            "known_failing": [r.case_id for r in self.results if r.known_failing and not r.unexpected_pass],
            "unexpected_passes": [r.case_id for r in self.results if r.unexpected_pass],
            "unmatched_known_failing": self.unmatched_known_failing,
            "duration": round(self.duration, 3),
            "error": self.error,
            "exit_code": self.exit_code,
            "verdict": self.verdict,
            "skipped": self.skip_reasons(),
        }

    def to_junit(self) -> bytes:
        """JUnit XML: FAIL and unexpected passes are failures; SKIP and known failures are skipped;
        WARN passes with the warning in system-out (and an `outcome` property on every case)."""
        summary = self.summary()
        suites = ET.Element("testsuites", name=f"parley-conformance-{self.suite}")
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"parley-conformance-{self.suite}",
            tests=str(len(self.results)),
            failures=str(sum(r.fails_run for r in self.results)),
            errors="1" if self.error else "0",
            skipped=str(
                summary[Outcome.SKIP.value] + sum(r.known_failing and not r.unexpected_pass for r in self.results)
            ),
            time=f"{self.duration:.3f}",
        )
        properties = ET.SubElement(suite, "properties")
        ET.SubElement(properties, "property", name="target", value=self.target)
        if self.error:
            ET.SubElement(suite, "system-err").text = self.error
        for result in self.results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"{self.suite}.{result.requirement.split('-', 1)[0]}",
                name=result.case_id,
                time=f"{result.duration:.3f}",
            )
            case_properties = ET.SubElement(case, "properties")
            for name, value in (
                ("outcome", result.outcome.value),
                ("requirement", result.requirement),
                ("level", result.level.value),
                ("description", result.description),
            ):
                ET.SubElement(case_properties, "property", name=name, value=value)
            text = f"{result.detail}\n\n{result.requirement}: {result.quote}"
            if result.unexpected_pass:
                ET.SubElement(
                    case, "failure", type="UNEXPECTED_PASS", message="listed as known failing, but it passed"
                ).text = text
            elif result.known_failing and result.outcome in (Outcome.FAIL, Outcome.WARN):
                ET.SubElement(case, "skipped", message=f"known failing ({result.outcome.value}): {result.detail}")
            elif result.outcome is Outcome.FAIL:
                ET.SubElement(case, "failure", type="FAIL", message=_first_line(result.detail)).text = text
            elif result.outcome is Outcome.SKIP:
                ET.SubElement(case, "skipped", message=result.detail)
            elif result.outcome is Outcome.WARN:
                ET.SubElement(case, "system-out").text = f"WARN (a SHOULD is not met): {text}"
        ET.indent(suites)
        body: bytes = ET.tostring(suites, encoding="utf-8", xml_declaration=False)
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body + b"\n"


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


# --- Running ----------------------------------------------------------------------------------------


async def run_case(
    case: Case[C],
    context: C,
    *,
    timeout: float,
    precheck: str | None = None,
    recover: Callable[[C], Awaitable[None]] | None = None,
) -> Result:
    """Run one case: skip it with `precheck`'s reason, else its body under a timeout.

    After a timeout or a crash, `recover(context)` runs (`Suite.recover`), under
    the same timeout; if it fails too, the case's detail says so.
    """
    started = time.monotonic()

    def result(outcome: Outcome, detail: str) -> Result:
        return Result(
            case.id,
            case.requirement,
            case.level,
            case.description,
            case.quote,
            outcome,
            detail,
            time.monotonic() - started,
        )

    if precheck is not None:
        return result(Outcome.SKIP, precheck)
    broken = Outcome.FAIL if case.level is Level.MUST else Outcome.WARN
    try:
        detail = await asyncio.wait_for(case.body(context), timeout)
    except Violation as violation:
        return result(broken, str(violation))
    except Skip as skip:
        return result(Outcome.SKIP, str(skip))
    except TimeoutError:
        stopped = result(broken, f"no conclusion within the case timeout of {timeout:g} s")
    except Exception as error:  # the case crashed: say so loudly, never pass
        stopped = result(Outcome.FAIL, f"the case could not complete: {_crash(error)}")
    else:
        return result(Outcome.PASS, detail or "")
    if recover is None:
        return stopped
    try:
        await asyncio.wait_for(recover(context), timeout)
    except Exception as error:  # reported with the case that needed it; the next cases run regardless
        failure = "no conclusion within the case timeout" if isinstance(error, TimeoutError) else _crash(error)
        return dataclasses.replace(stopped, detail=f"{stopped.detail}; then recovery failed: {failure}")
    return stopped


def _crash(error: Exception) -> str:
    """An unexpected exception, with the line of the suite (or library) it came from."""
    where = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})"


async def run_cases(
    suite: Suite[C],
    cases: Iterable[Case[C]],
    context: C,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    known_failing: Sequence[str] = (),
    on_result: Callable[[Result], None] | None = None,
    jobs: int = 1,
) -> list[Result]:
    """Run the cases, in registration order.

    By default one after the other (the biller suite's cases move the target's
    clock, so they never overlap). A suite whose cases are independent of each
    other (each consumer scenario has a biller of its own) may run up to `jobs`
    at once; results are still reported, through `on_result`, in registration
    order, each as soon as it and every case before it have ended.
    """
    chosen = list(cases)

    async def one(case: Case[C]) -> Result:
        reason = suite.precheck(case, context) if suite.precheck is not None else None
        result = await run_case(case, context, timeout=timeout, precheck=reason, recover=suite.recover)
        if any(case.matches(pattern) for pattern in known_failing):
            result = dataclasses.replace(result, known_failing=True)
        return result

    if jobs <= 1:
        results = []
        for case in chosen:
            result = await one(case)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results
    slots = asyncio.Semaphore(jobs)

    async def limited(case: Case[C]) -> Result:
        async with slots:
            return await one(case)

    tasks = [asyncio.ensure_future(limited(case)) for case in chosen]
    try:
        ordered = []
        for task in tasks:  # in registration order, each printed once it and those before it are done
            result = await task
            ordered.append(result)
            if on_result is not None:
                on_result(result)
        return ordered
    finally:  # interrupted: stop the cases still running, and let them clean up (their processes, servers)
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def load_known_failing(path: Path) -> list[str]:
    """The patterns of a known-failing file (OSError if unreadable)."""
    patterns = []
    for line in path.read_text(encoding="utf-8").splitlines():
        pattern = line.split("#", 1)[0].strip()
        if pattern:
            patterns.append(pattern)
    return patterns


_STYLE = {Outcome.PASS: "green", Outcome.FAIL: "bold red", Outcome.WARN: "yellow", Outcome.SKIP: "dim"}


def print_result(result: Result, out: Console) -> None:
    """One line per case as it ends (and its detail, unless it passed)."""
    marker = " [dim](known failing)[/]" if result.known_failing and not result.unexpected_pass else ""
    if result.unexpected_pass:
        marker = " [bold red](UNEXPECTED PASS: listed as known failing)[/]"
    style = _STYLE[result.outcome]
    out.print(
        f"[{style}]{result.outcome.value:<4}[/]  {escape(result.case_id)}  {escape(result.description)}{marker}",
        highlight=False,
        soft_wrap=True,
    )
    if result.outcome is not Outcome.PASS and result.detail:
        for line in result.detail.splitlines():
            out.print(f"        {escape(line)}", highlight=False, soft_wrap=True)


def print_summary(report: Report, out: Console) -> None:
    """The summary, printed last: counts per outcome, known failures, unexpected passes, the verdict."""
    summary = report.summary()
    known = [r for r in report.results if r.known_failing and not r.unexpected_pass]
    unexpected = [r for r in report.results if r.unexpected_pass]
    out.print()
    if report.error:
        out.print(f"[bold red]error:[/] {escape(report.error)}", highlight=False, soft_wrap=True)
    if report.unmatched_known_failing:
        names = ", ".join(report.unmatched_known_failing)
        out.print(f"note: known-failing entries matching no case run: {escape(names)}", highlight=False)
    if known:
        names = ", ".join(f"{r.case_id} ({r.outcome.value})" for r in known)
        out.print(f"known failing: {escape(names)}", highlight=False, soft_wrap=True)
    if unexpected:
        names = ", ".join(r.case_id for r in unexpected)
        out.print(
            f"[bold red]UNEXPECTED PASS[/] (remove from the known-failing file): {escape(names)}",
            highlight=False,
            soft_wrap=True,
        )
    counts = ", ".join(f"[{_STYLE[o]}]{summary[o.value]} {o.value}[/]" for o in Outcome)
    style = {"OK": "green", "PARTIAL": "yellow", "FAILED": "bold red", "NOTHING RAN": "bold red"}[report.verdict]
    verdict = f"[{style}]{report.verdict}[/]"
    skipped = summary[Outcome.SKIP.value]
    if skipped and report.results:
        reasons = "; ".join(f"{count}: {escape(reason)}" for reason, count in report.skip_reasons().items())
        verdict += f" ({skipped} of {len(report.results)} cases skipped — {reasons})"
    out.print(
        f"summary: parley conformance {report.suite} against {escape(report.target)}: "
        f"{len(report.results)} cases: {counts} in {report.duration:.1f} s: {verdict}",
        highlight=False,
        soft_wrap=True,
    )


@dataclass(frozen=True)
class RunOptions:
    """What the command line chose (see `add_run_arguments`)."""

    target: str
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    known_failing: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    junit: Path | None = None
    json: Path | None = None  # --json-out FILE (or the deprecated --json FILE)
    json_stdout: bool = False  # --json: the report on stdout (the command's console speaks on stderr)
    json_deprecated: bool = False  # `json` came from the deprecated `--json FILE`: say so
    jobs: int = 1  # cases run at once (only suites whose cases are independent offer --jobs)


def _patterns(values: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(p.strip() for value in values or () for p in value.split(",") if p.strip())


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every suite's command has: --only --skip --known-failing --timeout --junit --json --json-out."""
    parser.add_argument(
        "--only",
        action="append",
        metavar="IDS",
        help="run only these cases: comma-separated case ids, requirement ids (ENV-3), prefixes (ENV) or globs",
    )
    parser.add_argument("--skip", action="append", metavar="IDS", help="do not run these cases (same patterns)")
    parser.add_argument(
        "--known-failing",
        metavar="FILE",
        help="cases expected to fail, one pattern per line (# comments); one that passes is reported and fails the run",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds each case may take (default: %(default)g)",
    )
    parser.add_argument("--junit", type=output_file_argument, metavar="FILE", help="write a JUnit XML report")
    add_json_options(parser, "the report")


def run_options(args: argparse.Namespace, target: str) -> RunOptions:
    deprecated = args.json not in (None, STDOUT)  # the old `--json FILE`
    if args.json_out is not None:
        json_file: Path | None = args.json_out
    else:
        json_file = Path(args.json) if deprecated else None
    return RunOptions(
        target=target,
        only=_patterns(args.only),
        skip=_patterns(args.skip),
        known_failing=Path(args.known_failing) if args.known_failing else None,
        timeout=args.timeout,
        junit=args.junit,
        json=json_file,
        json_stdout=args.json == STDOUT,
        json_deprecated=deprecated and args.json_out is None,
        jobs=getattr(args, "jobs", 1),
    )


def _write_reports(report: Report, options: RunOptions, out: Console) -> None:
    def json_bytes() -> bytes:
        return (json.dumps(report.to_json(), indent=2) + "\n").encode()

    if options.json_stdout:
        sys.stdout.write(json_bytes().decode())
        sys.stdout.flush()
    for path, data in ((options.junit, report.to_junit), (options.json, json_bytes)):
        if path is None:
            continue
        try:
            path.write_bytes(data())
        except OSError as error:
            out.print(f"[bold red]cannot write {escape(str(path))}:[/] {escape(error.strerror or str(error))}")
    if options.json_deprecated and options.json is not None:
        out.print(
            f"note: --json FILE is deprecated, use --json-out {options.json} (--json alone prints JSON on stdout)",
            style="yellow",
            markup=False,
            highlight=False,
        )


async def run_suite(
    suite: Suite[C],
    connect: Callable[[], AbstractAsyncContextManager[C]],
    options: RunOptions,
    out: Console,
) -> int:
    """Select, connect, run, report; returns the exit code (see the module docstring)."""
    started = time.monotonic()
    report = Report(suite.name, options.target)

    def finish() -> int:
        report.duration = time.monotonic() - started
        _write_reports(report, options, out)
        print_summary(report, out)
        return report.exit_code

    try:
        check_number("--timeout", options.timeout, 0, MAX_CASE_TIMEOUT, above_low=True)
        check_number("--jobs", options.jobs, 1, MAX_JOBS)
    except ValueError as error:
        report.error = str(error)
        return finish()
    cases = suite.select(options.only, options.skip)
    if not cases:
        report.error = "no case matches the --only/--skip selection"
        return finish()
    known: list[str] = []
    if options.known_failing is not None:
        try:
            known = load_known_failing(options.known_failing)
        except (OSError, UnicodeDecodeError) as error:
            report.error = f"cannot read the known-failing file {options.known_failing}: {error}"
            return finish()
    out.print(f"parley conformance {suite.name}: {len(cases)} cases against {escape(options.target)}", highlight=False)
    try:
        async with connect() as context:
            report.results = await run_cases(
                suite,
                cases,
                context,
                timeout=options.timeout,
                known_failing=known,
                on_result=lambda result: print_result(result, out),
                jobs=options.jobs,
            )
    except NotRunnable as error:
        report.error = str(error)
        return finish()
    except TargetUnreachable as error:
        report.error = f"the target is unreachable: {error}"
        return finish()
    ran = {r.case_id for r in report.results}
    report.unmatched_known_failing = [p for p in known if not any(c.matches(p) for c in cases if c.id in ran)]
    return finish()


__all__ = [
    "DEFAULT_TIMEOUT",
    "EXIT_FAILED",
    "EXIT_NOT_RUN",
    "EXIT_OK",
    "Case",
    "Level",
    "NotRunnable",
    "Outcome",
    "Report",
    "Result",
    "RunOptions",
    "Skip",
    "Suite",
    "TargetUnreachable",
    "Violation",
    "add_run_arguments",
    "load_known_failing",
    "print_result",
    "print_summary",
    "run_case",
    "run_cases",
    "run_options",
    "run_suite",
]
