"""Runs of the biller conformance suite against the in-process reference biller, several at once.

tests/test_conformance_biller.py runs the suite once per broken biller (tests/broken_billers.py,
tests/broken_billers_extra.py: the whole suite, or the sections its defect reaches, `cases_for` there) and
twice, whole, against the reference itself. Run after run, a whole run takes about 25 s, and most of that
is not computing:

- the reference biller's store commits with `synchronous=FULL`, and every AdvanceClock runs an upkeep
  round that claims and releases a lease for each account the run has made so far (two commits, two
  fsyncs each): on a disk that alone is about 11 s of a run. A run's state directory is throwaway, so
  it is put on tmpfs when the machine has one (tests/helpers/scratch.py);
- the suite itself waits: a log is read until it stays quiet for a few seconds (EVT-3, EVT-7, PRV-7),
  and a stream's end is seen at the reference's next recheck (EVT-9), about 12 s of a run.

So `run_all` runs them side by side: one spawned worker process per run in flight (a pool of
`workers()`, each one run at a time, each with its own biller on its own port and its own state
directory), so that one run's waiting overlaps others' computing on every core. Each run is the whole
suite or the cases the test chose for it (`SuiteRun.only`), and the test of each broken biller checks its
own run's report.
"""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import traceback
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from agent.conformance import biller as biller_suite
from agent.conformance.runner import RunOptions, run_suite
from tests.broken_billers import BROKEN_BILLERS, Defect, reference_biller
from tests.broken_billers_extra import EXTRA_BROKEN_BILLERS
from tests.helpers.scratch import scratch_directory


@dataclass(frozen=True)
class SuiteRun:
    """One run of the suite: against the reference biller with the defect of the broken biller named `broken`
    (None: the reference as it is), with conformance control unless told, over the cases `only` names (empty:
    the whole suite)."""

    broken: str | None = None
    conformance_control: bool = True
    only: tuple[str, ...] = ()


@dataclass(frozen=True)
class SuiteRunResult:
    """What a run gave: its exit code, JSON report, printed output and JUnit XML, or the error that stopped it."""

    code: int
    report: dict[str, Any]
    output: str
    junit: str
    error: str | None = None


def defect_of(broken: str) -> Defect:
    """The defect of the broken biller named `broken`, in either list."""
    (defect,) = [b.defect for b in (*BROKEN_BILLERS, *EXTRA_BROKEN_BILLERS) if b.name == broken]
    return defect


async def run_once(run: SuiteRun, work: Path) -> SuiteRunResult:
    """The whole suite against a reference biller (with the run's defect) served in this loop, state in `work`."""
    report, junit, output = work / "report.json", work / "report.xml", io.StringIO()
    defect = None if run.broken is None else defect_of(run.broken)
    async with reference_biller(work / "state", defect, conformance_control=run.conformance_control) as target:
        code = await run_suite(
            biller_suite.suite,
            lambda: biller_suite.connect(target, insecure=True),
            RunOptions(target=target, only=run.only, json=report, junit=junit),
            Console(file=output, width=200),
        )
    return SuiteRunResult(
        code, json.loads(report.read_text(encoding="utf-8")), output.getvalue(), junit.read_text(encoding="utf-8")
    )


def run_in_worker(run: SuiteRun) -> SuiteRunResult:
    """`run_once` in a fresh loop and a throwaway directory; an error is returned, so that it fails one test."""
    try:
        with scratch_directory("parley-biller-suite-") as work:
            return asyncio.run(run_once(run, work))
    except Exception:
        return SuiteRunResult(-1, {}, "", "", error=traceback.format_exc())


def workers() -> int:
    """Runs in flight at once: a run computes about a third of its time, so three per core keep them busy."""
    return 3 * (os.cpu_count() or 1)


def run_all(runs: Iterable[SuiteRun]) -> dict[SuiteRun, SuiteRunResult]:
    """Every run in `runs`, side by side in a pool of spawned processes (a fork would copy gRPC's threads)."""
    chosen = sorted(dict.fromkeys(runs), key=lambda run: bool(run.only))  # whole runs, the longest, start first
    if not chosen:
        return {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers(), len(chosen)), mp_context=context) as pool:
        return dict(zip(chosen, pool.map(run_in_worker, chosen), strict=True))
