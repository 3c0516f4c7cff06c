"""The mutation-testing harness (agent/tools/mutate.py): data, anchors, staleness, and one mutant killed end to end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.cli import main
from agent.tools import mutate
from agent.tools.mutate import (
    SOURCE_ROOT,
    Mutant,
    StaleMutant,
    UnusableMutants,
    apply_mutant,
    canary,
    check_anchors,
    copy_sources,
    judge_environment,
    load_mutants,
    locate,
    run_mutant,
)

# Killed by HDR-3/wrong-sender in a few seconds: the end-to-end check of the harness.
KNOWN_KILLED = "hdr3-sender-unchecked"


def mutant(find: str, target: str = "pkg", replace: str = "MUTATED") -> Mutant:
    return Mutant(
        id="m",
        suite="biller",
        breaks="ENV-3",
        target=target,
        find=find,
        replace=replace,
        description="a test mutant",
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("def f(x):\n    return x < 3\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("def g(y):\n    return y <= 3\n")
    return tmp_path


def test_the_shipped_mutants_load_and_every_anchor_matches_exactly_once() -> None:
    """A refactor that moves or duplicates an anchored snippet fails here: the mutant is stale, fix its anchor."""
    mutants = load_mutants()
    assert len(mutants) >= 30
    assert {m.suite for m in mutants} == {"biller", "consumer"}
    assert any(m.quick for m in mutants if m.suite == "biller")
    assert any(m.quick for m in mutants if m.suite == "consumer")
    assert check_anchors(mutants) == {}
    assert any(m.id == KNOWN_KILLED for m in mutants)


def test_a_mutant_applies_exactly_once_in_the_one_file_holding_its_anchor(tree: Path) -> None:
    changed = apply_mutant(mutant("y <= 3", replace="y < 3"), tree)
    assert changed == tree / "pkg" / "sub" / "b.py"
    assert changed.read_text() == "def g(y):\n    return y < 3\n"
    assert (tree / "pkg" / "a.py").read_text() == "def f(x):\n    return x < 3\n"


@pytest.mark.parametrize(
    ("find", "target", "why"),
    [
        ("< 3", "pkg", "occurs 2 times"),  # a.py and c.py (b.py has "<= 3")
        ("return w", "pkg", "occurs 0 times"),
        ("x < 3", "pkg/gone.py", "does not exist"),
    ],
)
def test_an_anchor_not_matching_exactly_once_is_stale(tree: Path, find: str, target: str, why: str) -> None:
    (tree / "pkg" / "c.py").write_text("def h(z):\n    return z < 3\n")
    with pytest.raises(StaleMutant, match=why):
        locate(mutant(find, target), tree)


def test_a_file_target_limits_the_search_to_that_file(tree: Path) -> None:
    assert locate(mutant("return", "pkg/a.py"), tree) == tree / "pkg" / "a.py"


def test_malformed_mutant_data_is_refused(tmp_path: Path) -> None:
    entry = (
        'id = "x"\nsuite = "biller"\nbreaks = "ENV-3"\ntarget = "agent"\nfind = "a"\nreplace = "b"\ndescription = "d"\n'
    )
    (tmp_path / "one.toml").write_text(f"[[mutant]]\n{entry}\n[[mutant]]\n{entry}")
    with pytest.raises(UnusableMutants, match="already used"):
        load_mutants(tmp_path)
    (tmp_path / "one.toml").write_text(f"[[mutant]]\n{entry}colour = 'red'\n")
    with pytest.raises(UnusableMutants, match="unknown fields"):
        load_mutants(tmp_path)
    (tmp_path / "one.toml").write_text(f"[[mutant]]\n{entry.replace('biller', 'server')}")
    with pytest.raises(UnusableMutants, match="suite must be"):
        load_mutants(tmp_path)


def test_the_command_reports_a_stale_mutant_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "stale.toml").write_text(
        '[[mutant]]\nid = "gone"\nsuite = "biller"\nbreaks = "ENV-3"\ntarget = "agent/protocol/dsse.py"\n'
        'find = "this text is not in dsse.py"\nreplace = "x"\ndescription = "refactored away"\n'
    )
    assert main(["mutate", "--check", "--mutants-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "STALE" in out
    assert "gone" in out
    assert main(["mutate", "--check"]) == 0


def test_the_implementation_runs_from_the_copy_and_the_judge_from_this_tree(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    copy_sources(copy)
    canary(copy, copy / "agent" / "protocol" / "dsse.py")  # raises unless the copy's module would be imported
    assert "PYTHONPATH" not in judge_environment()
    assert not (copy / ".venv").exists()
    assert (copy / "parley" / "v1").is_dir()
    assert str(SOURCE_ROOT) not in os.fspath(copy)


def test_a_known_mutant_is_killed_end_to_end() -> None:
    known = next(m for m in load_mutants() if m.id == KNOWN_KILLED)
    result = run_mutant(known, "biller", timeout=120)
    assert result.outcome == "KILLED", result
    assert result.file == "agent/protocol/messages.py"
    assert any(case.startswith("HDR-3/") for case in result.killed_by), result.killed_by


@pytest.mark.parametrize(
    ("status", "report", "outcome"),
    [
        (0, {"summary": {"PASS": 3}}, "SURVIVED"),
        (1, {"cases": [{"id": "HDR-3/wrong-sender", "outcome": "FAIL"}]}, "KILLED"),
        (1, {}, "ERROR"),  # exit 1 with no FAIL: the judge crashed, which is no verdict
        (2, {}, "ERROR"),  # the target was unreachable
    ],
)
def test_the_suite_exit_and_report_decide_the_outcome(
    monkeypatch: pytest.MonkeyPatch, status: int, report: dict[str, object], outcome: str
) -> None:
    monkeypatch.setitem(mutate.JUDGES, "biller", lambda copy, work, timeout, jobs: (status, report))
    known = next(m for m in load_mutants() if m.id == KNOWN_KILLED)
    assert run_mutant(known, "biller").outcome == outcome


def test_a_killed_mutant_documented_as_equivalent_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a refactor makes an 'equivalent' mutant observable, the run says its documentation is wrong."""
    (tmp_path / "one.toml").write_text(
        '[[mutant]]\nid = "now-reached"\nsuite = "biller"\nbreaks = "HDR-3"\ntarget = "agent/protocol/messages.py"\n'
        "find = '''if header.sender != sender_keys.party_id:'''\nreplace = '''if not header.sender:'''\n"
        'description = "d"\nequivalent = "unreached, once"\n'
    )
    killed = (1, {"cases": [{"id": "HDR-3/wrong-sender", "outcome": "FAIL"}]})
    monkeypatch.setitem(mutate.JUDGES, "biller", lambda copy, work, timeout, jobs: killed)
    assert main(["mutate", "--no-baseline", "--mutants-dir", str(tmp_path)]) == 1
    assert "documented as equivalent" in capsys.readouterr().out
