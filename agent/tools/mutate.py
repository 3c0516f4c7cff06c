"""`parley mutate`: mutation testing of the conformance suites (docs/CONFORMANCE.md, "Mutation testing").

A mutant is one realistic bug that breaks one MUST of docs/PROTOCOL.md, kept as data in
`agent/conformance/mutants/*.toml`: the spec id it breaks, the suite that should catch it, a target
(a file, or a directory searched whole so the mutant survives code moving between modules) and an
exact snippet with its replacement. The snippet must occur exactly once under the target: when a
refactor changes or duplicates it, the mutant is reported STALE, never silently skipped.

For each mutant the source tree (agent, parley, reference_biller, reference_consumer) is copied to a
temporary directory and the mutant applied to the copy. The implementation under test runs from the
copy (PYTHONPATH and cwd point at it, ahead of the editable install; a canary checks that the mutated
module really is the copy's), while the suite — the judge — runs from this unmodified tree: the suite
shares modules with the implementation (the error table, terms, the receive path), so a mutation
there must not change the judge too.

Outcomes: KILLED (the suite failed a case), SURVIVED (the suite passed: a missing case, or an
equivalent mutant, documented with `equivalent = "why"`), STALE (the anchor no longer matches once),
ERROR (the mutant could not be judged: the implementation did not start, the suite could not run).

Exit codes: 0 nothing wrong; 1 a mutant of the quick set survived, any mutant is stale or in error, or
one documented as equivalent was killed (its documentation is out of date); 2 unusable options, no mutant
selected, or the unmutated baseline does not pass its suite.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape

from agent.conformance import biller as biller_cases
from agent.conformance import consumer_cases
from agent.conformance.runner import MAX_JOBS
from agent.tools.json_output import add_json_options, emit_json, wants_json
from agent.tools.numbers import number_argument

__all__ = [
    "MUTANTS_DIR",
    "SOURCE_ROOT",
    "Mutant",
    "MutantResult",
    "StaleMutant",
    "add_mutate_command",
    "apply_mutant",
    "check_anchors",
    "load_mutants",
    "locate",
    "run_mutant",
]

SOURCE_ROOT = Path(__file__).resolve().parents[2]
MUTANTS_DIR = SOURCE_ROOT / "agent" / "conformance" / "mutants"
# What a running agent imports: copied whole for each mutant. Bytecode caches come along (a mutated
# file's new mtime invalidates its own), so the copy starts as fast as the original.
COPIED_PACKAGES = ("agent", "parley", "reference_biller", "reference_consumer")
NOT_COPIED = shutil.ignore_patterns(".mypy_cache", "*.sqlite", "*.sqlite3", "*.db", "*.db-wal", "*.db-shm")

Suite = Literal["biller", "consumer"]
SUITES: tuple[Suite, ...] = ("biller", "consumer")
Outcome = Literal["KILLED", "SURVIVED", "STALE", "ERROR"]

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2
SUITE_EXIT_FAILED = 1  # `parley conformance`: a case failed
BILLER_START_SECONDS = 30.0
LOG_TAIL_CHARS = 1500
MAX_MUTANTS_AT_ONCE = 32  # each is a copy of the source tree and a suite run with its own processes
MAX_SUITE_SECONDS = 86_400.0  # one suite run: a day

REQUIRED_FIELDS = ("id", "suite", "breaks", "target", "find", "replace", "description")
OPTIONAL_FIELDS = ("quick", "equivalent")


class StaleMutant(Exception):
    """The mutant's anchor does not occur exactly once under its target any more: the code moved on."""


class HarnessError(Exception):
    """The mutant could not be judged (not a verdict on the suite): reported as ERROR."""


class UnusableMutants(Exception):
    """The mutant files themselves are malformed: the run exits 2."""


@dataclass(frozen=True)
class Mutant:
    id: str
    suite: Suite
    breaks: str  # the requirement id in docs/PROTOCOL.md the mutant violates
    target: str  # a file or a directory, relative to the source root
    find: str  # exact text that must occur exactly once under the target
    replace: str
    description: str
    quick: bool = False  # in the CI subset (`--quick`)
    equivalent: str = ""  # why surviving is right (the mutant breaks nothing a peer can observe)
    source: str = ""  # the data file it came from, for messages


@dataclass(frozen=True)
class MutantResult:
    id: str
    suite: Suite
    breaks: str
    outcome: Outcome
    seconds: float
    detail: str = ""
    file: str = ""  # where the anchor was found
    killed_by: tuple[str, ...] = ()  # the suite's failing case ids
    quick: bool = False
    equivalent: str = ""


# --- The data ------------------------------------------------------------------------------------------


def load_mutants(directory: Path = MUTANTS_DIR) -> list[Mutant]:
    """Every mutant of every `*.toml` file in the directory, in file then declaration order; ids unique."""
    mutants: list[Mutant] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.toml")):
        try:
            document = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise UnusableMutants(f"{path.name}: {error}") from None
        for number, entry in enumerate(document.get("mutant", []), start=1):
            where = f"{path.name}, mutant #{number}"
            missing = [
                name
                for name in REQUIRED_FIELDS
                if not isinstance(entry.get(name), str) or (not entry[name] and name != "replace")  # "": a deletion
            ]
            unknown = sorted(set(entry) - {*REQUIRED_FIELDS, *OPTIONAL_FIELDS})
            if missing or unknown:
                raise UnusableMutants(f"{where}: missing or empty {missing}, unknown fields {unknown}")
            if entry["suite"] not in SUITES:
                raise UnusableMutants(f"{where}: suite must be one of {SUITES}, not {entry['suite']!r}")
            if entry["find"] == entry["replace"]:
                raise UnusableMutants(f"{where}: find and replace are the same text")
            if entry["id"] in seen:
                raise UnusableMutants(f"{where}: id {entry['id']!r} already used in {seen[entry['id']]}")
            seen[entry["id"]] = path.name
            mutants.append(
                Mutant(
                    id=entry["id"],
                    suite=entry["suite"],
                    breaks=entry["breaks"],
                    target=entry["target"],
                    find=entry["find"],
                    replace=entry["replace"],
                    description=entry["description"],
                    quick=bool(entry.get("quick", False)),
                    equivalent=str(entry.get("equivalent", "")),
                    source=path.name,
                )
            )
    return mutants


def locate(mutant: Mutant, root: Path) -> Path:
    """The one file under the target holding the anchor; StaleMutant unless it occurs exactly once in all."""
    target = root / mutant.target
    if target.is_file():
        candidates = [target]
    elif target.is_dir():
        candidates = sorted(path for path in target.rglob("*.py") if "__pycache__" not in path.parts)
    else:
        raise StaleMutant(f"{mutant.id}: target {mutant.target} does not exist")
    found = [(path, path.read_text().count(mutant.find)) for path in candidates]
    hits = [(path, count) for path, count in found if count]
    total = sum(count for _, count in hits)
    if total != 1:
        places = ", ".join(f"{path.relative_to(root)} ×{count}" for path, count in hits) or "nowhere"
        raise StaleMutant(f"{mutant.id}: the anchor occurs {total} times under {mutant.target} ({places})")
    return hits[0][0]


def apply_mutant(mutant: Mutant, root: Path) -> Path:
    """Rewrite the one occurrence of the anchor under root; returns the file changed."""
    path = locate(mutant, root)
    path.write_text(path.read_text().replace(mutant.find, mutant.replace, 1))
    return path


def check_anchors(mutants: Iterable[Mutant], root: Path = SOURCE_ROOT) -> dict[str, str]:
    """Mutant id -> why it is stale, for every mutant whose anchor does not match exactly once."""
    stale: dict[str, str] = {}
    for mutant in mutants:
        try:
            locate(mutant, root)
        except StaleMutant as error:
            stale[mutant.id] = str(error)
    return stale


# --- Running one mutant ----------------------------------------------------------------------------------


def copy_sources(destination: Path, root: Path = SOURCE_ROOT) -> None:
    for package in COPIED_PACKAGES:
        shutil.copytree(root / package, destination / package, ignore=NOT_COPIED)


def implementation_environment(copy: Path) -> dict[str, str]:
    """The environment of a process running the implementation from the copy: the copy first on sys.path."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PARLEY_")}
    environment["PYTHONPATH"] = str(copy)
    environment["PYTHONDONTWRITEBYTECODE"] = "1"  # the copy is thrown away
    return environment


def judge_environment() -> dict[str, str]:
    """The suite's environment: this tree (no PYTHONPATH leading elsewhere)."""
    return {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}


def module_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def canary(copy: Path, mutated: Path) -> None:
    """HarnessError unless a process started like the implementation imports the mutated module from the copy."""
    module = module_of(mutated, copy)
    probe = f"import importlib.util; print(importlib.util.find_spec({module!r}).origin)"
    done = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-c", probe],
        cwd=copy,
        env=implementation_environment(copy),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    origin = done.stdout.strip()
    if done.returncode != 0 or Path(origin).resolve() != mutated.resolve():
        raise HarnessError(f"canary: {module} would be imported from {origin or done.stderr.strip()!r}, not the copy")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + BILLER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HarnessError(f"the biller exited with {process.returncode} at start-up: {tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise HarnessError(f"the biller did not listen on 127.0.0.1:{port} within {BILLER_START_SECONDS:.0f} s")


def tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-LOG_TAIL_CHARS:].strip()


def run_suite(command: list[str], report: Path, log: Path, timeout: float) -> tuple[int, dict[str, Any]]:
    """Run `parley conformance ...` from this tree; (exit code, its JSON report or {})."""
    with log.open("ab") as output:
        try:
            done = subprocess.run(  # noqa: S603 - our own interpreter and arguments
                [sys.executable, "-m", "agent.cli", "conformance", *command, "--json-out", str(report)],
                cwd=SOURCE_ROOT,
                env=judge_environment(),
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise HarnessError(f"the suite took longer than {timeout:.0f} s") from None
    document: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    return done.returncode, document


@dataclass(frozen=True)
class Judging:
    """How a suite run judges: its time limit, the consumer suite's scenarios at once, and the ids of the cases
    it runs (`only`; None: the whole suite)."""

    timeout: float = 600.0
    suite_jobs: int = 2
    only: tuple[str, ...] | None = None

    def selection(self) -> list[str]:
        return [] if self.only is None else ["--only", ",".join(self.only)]


def judge_biller(copy: Path, work: Path, judging: Judging) -> tuple[int, dict[str, Any]]:
    port = free_port()
    log = work / "biller.log"
    with log.open("wb") as output:
        biller = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, "-m", "agent.cli", "biller", "serve", "--conformance-control", "--insecure",
             "--listen", f"127.0.0.1:{port}", "--state-dir", str(work / "state")],
            cwd=copy,
            env=implementation_environment(copy),
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_listening(biller, port, log)
        return run_suite(
            ["biller", "--target", f"127.0.0.1:{port}", "--insecure", *judging.selection()],
            work / "report.json",
            work / "suite.log",
            judging.timeout,
        )
    finally:
        biller.terminate()
        try:
            biller.wait(timeout=10)
        except subprocess.TimeoutExpired:
            biller.kill()
            biller.wait()


def judge_consumer(copy: Path, work: Path, judging: Judging) -> tuple[int, dict[str, Any]]:
    # `env` sets the copy first on the client's sys.path; the suite itself stays on this tree.
    client = shlex.join(
        ["env", f"PYTHONPATH={copy}", "PYTHONDONTWRITEBYTECODE=1", sys.executable, "-m", "agent.cli",
         "consumer", "run", "--from-env", "--once", "--approve-all"]
    )  # fmt: skip
    return run_suite(
        ["consumer", "--client-cmd", client, "--jobs", str(judging.suite_jobs), *judging.selection()],
        work / "report.json",
        work / "suite.log",
        judging.timeout,
    )


JUDGES: dict[Suite, Callable[[Path, Path, Judging], tuple[int, dict[str, Any]]]] = {
    "biller": judge_biller,
    "consumer": judge_consumer,
}


def failed_cases(report: dict[str, Any]) -> tuple[str, ...]:
    return tuple(case["id"] for case in report.get("cases", []) if case.get("outcome") == "FAIL")


def run_mutant(mutant: Mutant | None, suite: Suite, judging: Judging = Judging()) -> MutantResult:
    """Copy the tree, apply the mutant (None: the unmutated baseline), run its suite from this tree, judge."""
    started = time.monotonic()
    name = mutant.id if mutant else f"baseline-{suite}"

    def result(outcome: Outcome, detail: str = "", file: str = "", killed_by: tuple[str, ...] = ()) -> MutantResult:
        return MutantResult(
            id=name,
            suite=suite,
            breaks=mutant.breaks if mutant else "",
            outcome=outcome,
            seconds=round(time.monotonic() - started, 1),
            detail=detail,
            file=file,
            killed_by=killed_by,
            quick=mutant.quick if mutant else False,
            equivalent=mutant.equivalent if mutant else "",
        )

    with tempfile.TemporaryDirectory(prefix=f"parley-mutant-{name}-") as directory:
        work = Path(directory)
        copy = work / "src"
        copy_sources(copy)
        file = ""
        try:
            if judging.only == ():  # targeted, and the coverage table has no case for the requirement
                what = mutant.breaks if mutant else "any chosen mutant's requirement"
                raise HarnessError(f"no case of the {suite} suite exercises {what}")
            if mutant is not None:
                mutated = apply_mutant(mutant, copy)
                file = str(mutated.relative_to(copy))
                canary(copy, mutated)
            status, report = JUDGES[suite](copy, work, judging)
        except StaleMutant as error:
            return result("STALE", str(error))
        except (HarnessError, subprocess.SubprocessError, OSError) as error:
            return result("ERROR", str(error), file)
        counts = report.get("summary", {})
        summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) if isinstance(counts, dict) else ""
        if status == EXIT_OK:
            return result("SURVIVED", f"the suite passed: {summary}", file)
        failed = failed_cases(report)
        if status == SUITE_EXIT_FAILED and failed:  # exit 1 without a FAIL is a crash of the judge, not a verdict
            return result("KILLED", summary, file, failed)
        return result("ERROR", f"the suite exited {status}: {tail(work / 'suite.log')}", file)


# --- The command -----------------------------------------------------------------------------------------


def select(mutants: Sequence[Mutant], only: str | None, quick: bool, suite: str | None) -> list[Mutant]:
    patterns = [pattern.strip() for pattern in (only or "").split(",") if pattern.strip()]
    return [
        mutant
        for mutant in mutants
        if (not patterns or any(fnmatch.fnmatchcase(mutant.id, p) or mutant.breaks == p for p in patterns))
        and (not quick or mutant.quick)
        and (suite is None or mutant.suite == suite)
    ]


@dataclass
class Summary:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # suite -> outcome -> n

    def add(self, result: MutantResult) -> None:
        outcome = "EQUIVALENT" if result.outcome == "SURVIVED" and result.equivalent else result.outcome
        per_suite = self.counts.setdefault(result.suite, {})
        per_suite[outcome] = per_suite.get(outcome, 0) + 1

    def kill_rate(self, suite: str) -> float | None:
        """Killed among those judged and not documented as equivalent."""
        counts = self.counts.get(suite, {})
        judged = counts.get("KILLED", 0) + counts.get("SURVIVED", 0)
        return counts.get("KILLED", 0) / judged if judged else None

    def line(self, suite: str) -> str:
        counts = self.counts.get(suite, {})
        rate = self.kill_rate(suite)
        shown = ", ".join(f"{counts[name]} {name}" for name in ("KILLED", "SURVIVED", "EQUIVALENT", "STALE", "ERROR")
                          if counts.get(name))  # fmt: skip
        return f"{suite}: {sum(counts.values())} mutants: {shown}; kill rate {'n/a' if rate is None else f'{rate:.0%}'}"


STYLE = {"KILLED": "green", "SURVIVED": "red", "STALE": "magenta", "ERROR": "yellow"}


def show(result: MutantResult, out: Console) -> None:
    label = "EQUIVALENT" if result.outcome == "SURVIVED" and result.equivalent else result.outcome
    style = "cyan" if label == "EQUIVALENT" else STYLE[result.outcome]
    why = {
        "KILLED": f"by {', '.join(result.killed_by[:4])}{' …' if len(result.killed_by) > 4 else ''}",
        "SURVIVED": result.detail,
        "EQUIVALENT": result.equivalent,
        "STALE": result.detail,
        "ERROR": result.detail,
    }[label]
    out.print(
        f"[{style}]{label:<10}[/{style}] {escape(result.id)} ({result.suite}, breaks {result.breaks}, "
        f"{result.seconds:.1f} s){escape(' [quick]') if result.quick else ''}: {escape(why)}",
        soft_wrap=True,  # one line per mutant, whatever the terminal's width: logs are grepped
    )


def cases_exercising(suite: Suite, requirements: Iterable[str]) -> tuple[str, ...]:
    """The ids of `suite`'s cases that exercise any of `requirements` (their own requirement, or one they cover:
    a violation of each fails the case), in the suite's order."""
    wanted = set(requirements)
    cases = biller_cases.suite.cases if suite == "biller" else consumer_cases.suite.cases
    return tuple(case.id for case in cases if wanted.intersection(case.exercises))


def judging_of(args: argparse.Namespace, mutants: Iterable[Mutant], suite: Suite) -> Judging:
    """How `mutants` of `suite` are judged: with --targeted, by the cases exercising the requirements they break
    (a mutant's own run, or the baseline's over all the chosen ones); else by the whole suite."""
    only = cases_exercising(suite, {m.breaks for m in mutants if m.suite == suite}) if args.targeted else None
    return Judging(timeout=args.timeout, suite_jobs=args.suite_jobs, only=only)


def baselines_pass(args: argparse.Namespace, chosen: list[Mutant], suites: Iterable[Suite], out: Console) -> bool:
    """Each suite judges an unmutated copy as it will judge the mutants, and passes: else every mutant would
    look killed."""
    for suite in suites:
        judging = judging_of(args, chosen, suite)
        baseline = run_mutant(None, suite, judging)
        if baseline.outcome != "SURVIVED":
            out.print(f"[red]the unmutated {suite} baseline does not pass:[/red] {escape(baseline.detail)}")
            return False
        requirements = ", ".join(sorted({m.breaks for m in chosen if m.suite == suite}))
        judged = "suite passes" if judging.only is None else f"{len(judging.only)} cases of {requirements} pass"
        out.print(f"baseline  {suite} {judged} unmutated ({baseline.seconds:.1f} s)")
    return True


def _run(args: argparse.Namespace, out: Console) -> int:
    try:
        mutants = load_mutants(Path(args.mutants_dir))
    except UnusableMutants as error:
        out.print(f"[red]unusable mutant data:[/red] {escape(str(error))}")
        return EXIT_UNUSABLE
    if not mutants:
        where = escape(args.mutants_dir)
        out.print(f"[red]no mutant data in {where}[/red] (parley mutate runs from a source checkout)")
        return EXIT_UNUSABLE
    stale = check_anchors(mutants)  # every mutant, whatever is selected: a refactor shows up at once
    chosen = select(mutants, args.only, args.quick, args.suite)
    if not chosen and not args.check:  # --check judges every mutant, whatever is selected
        out.print("[red]no mutant selected[/red]: none matches --only, --suite and --quick")
        return EXIT_UNUSABLE
    if args.list:
        for mutant in chosen:
            mark = "STALE " if mutant.id in stale else ""
            out.print(f"{mark}{mutant.id} ({mutant.suite}, breaks {mutant.breaks}): {escape(mutant.description)}")
        return EXIT_OK
    for why in stale.values():
        out.print(f"[magenta]STALE     [/magenta] {escape(why)}")
    if args.check:
        out.print(f"{len(mutants)} mutants, {len(stale)} stale")
        return EXIT_FAILED if stale else EXIT_OK
    started = time.monotonic()
    suites = sorted({mutant.suite for mutant in chosen})
    if not args.no_baseline and not baselines_pass(args, chosen, suites, out):
        return EXIT_UNUSABLE
    runnable = [mutant for mutant in chosen if mutant.id not in stale]
    results: list[MutantResult] = [
        MutantResult(mutant.id, mutant.suite, mutant.breaks, "STALE", 0.0, stale[mutant.id], quick=mutant.quick)
        for mutant in chosen
        if mutant.id in stale
    ]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [
            pool.submit(run_mutant, mutant, mutant.suite, judging_of(args, [mutant], mutant.suite))
            for mutant in runnable
        ]
        for future in as_completed(futures):
            results.append(future.result())
            show(results[-1], out)
    order = {mutant.id: index for index, mutant in enumerate(chosen)}
    results.sort(key=lambda result: order[result.id])
    summary = Summary()
    for result in results:
        summary.add(result)
    quick_survivors = [r.id for r in results if r.outcome == "SURVIVED" and r.quick and not r.equivalent]
    survivors = [r for r in results if r.outcome == "SURVIVED" and not r.equivalent]
    # Documented as equivalent yet killed: the documentation is wrong now (the code moved on); keep the data honest.
    wrongly_equivalent = [r.id for r in results if r.outcome == "KILLED" and r.equivalent]
    failed = bool(quick_survivors or stale or wrongly_equivalent or any(r.outcome == "ERROR" for r in results))
    if survivors:
        out.print("survivors (a missing case, or document the mutant as equivalent):")
        for result in survivors:
            out.print(f"  {escape(result.id)}: breaks {result.breaks}")
    for mutant_id in wrongly_equivalent:
        out.print(f"[red]killed, yet documented as equivalent:[/red] {escape(mutant_id)}: remove its `equivalent`")
    duration = time.monotonic() - started
    for suite in suites:
        out.print(f"summary: {summary.line(suite)}", soft_wrap=True)
    out.print(
        f"summary: {len(results)} mutants in {duration:.0f} s; {len(stale)} stale (of all {len(mutants)}); "
        f"quick-set survivors: {len(quick_survivors)}: {'FAILED' if failed else 'OK'}"
    )
    if wants_json(args):
        document = {
            "mutants": [asdict(result) for result in results],
            "stale": stale,
            "summary": {suite: summary.counts.get(suite, {}) for suite in suites}
            | {"kill_rate": {suite: summary.kill_rate(suite) for suite in suites}},
            "duration": round(duration, 1),
            "exit_code": EXIT_FAILED if failed else EXIT_OK,
        }
        emit_json(args, document, out)
    return EXIT_FAILED if failed else EXIT_OK


def add_mutate_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`parley mutate`."""
    mutate = commands.add_parser(
        "mutate",
        help="mutation-test the conformance suites: each mutant must make its suite fail",
        description="Apply each mutant (agent/conformance/mutants/*.toml) to a copy of the source tree, run the "
        "implementation from the copy and its conformance suite from this tree, and report each mutant KILLED, "
        "SURVIVED, STALE or ERROR. Exit codes: 0 nothing wrong; 1 a quick-set mutant survived, a mutant is "
        "stale or in error, or one documented as equivalent was killed; 2 unusable options or data, or the "
        "unmutated baseline fails.",
    )
    mutate.add_argument("--only", metavar="IDS", help="comma-separated mutant ids (globs) or requirement ids")
    mutate.add_argument("--suite", choices=SUITES, help="only the mutants judged by this suite")
    mutate.add_argument("--quick", action="store_true", help="only the quick set (for CI)")
    mutate.add_argument(
        "--targeted",
        action="store_true",
        help="judge each mutant by its suite's cases of the requirement it breaks, not the whole suite (for CI)",
    )
    mutate.add_argument(
        "--jobs",
        type=number_argument(int, 1, MAX_MUTANTS_AT_ONCE),
        default=1,
        metavar="N",
        help="mutants judged at once, each a copy of the tree and a suite run (default: 1)",
    )
    mutate.add_argument(
        "--suite-jobs",
        type=number_argument(int, 1, MAX_JOBS),
        default=2,
        metavar="N",
        help="scenarios at once in the consumer suite (default: 2)",
    )
    mutate.add_argument(
        "--timeout",
        type=number_argument(float, 0, MAX_SUITE_SECONDS, above_low=True),
        default=600.0,
        metavar="S",
        help="seconds one suite run may take (default: 600)",
    )
    mutate.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each suite")
    mutate.add_argument("--list", action="store_true", help="list the selected mutants and exit")
    mutate.add_argument("--check", action="store_true", help="only check every anchor matches exactly once")
    add_json_options(mutate, "the report")
    mutate.add_argument("--mutants-dir", default=str(MUTANTS_DIR), metavar="DIR", help=argparse.SUPPRESS)
    mutate.set_defaults(handler=_run)
