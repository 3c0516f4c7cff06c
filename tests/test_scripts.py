"""The measurement scripts in `scripts/` still run against today's library (their figures are in the docs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(ROOT / "scripts" / name), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


@pytest.mark.slow
def test_upkeep_cost_measures_rounds_that_append_nothing() -> None:
    run = run_script("upkeep_cost.py", "--accounts", "3", "--rounds", "2")
    assert run.returncode == 0, run.stderr
    rounds = [line for line in run.stdout.splitlines() if line.startswith("round over 3 owing accounts")]
    assert len(rounds) == 2
    assert all(", 0 events appended; the loop left other work waiting up to " in line for line in rounds)


def test_upkeep_cost_refuses_a_store_it_does_not_know() -> None:
    run = run_script("upkeep_cost.py", "--store", "mysql")
    assert run.returncode == 2
    assert "--store: expected sqlite, postgres or a postgresql:// URL, got 'mysql'" in run.stderr
    assert "Traceback" not in run.stderr


def test_upkeep_many_accounts_times_rounds_and_the_segment_lookup() -> None:
    run = run_script("upkeep_many_accounts.py", "--accounts", "50", "--rounds", "2")
    assert run.returncode == 0, run.stderr
    assert len([line for line in run.stdout.splitlines() if line.startswith("upkeep round with 50 accounts")]) == 2
    assert "segment lookup:" in run.stdout
