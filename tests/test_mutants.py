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


def test_a_selection_matching_nothing_exits_2_with_or_without_list(capsys: pytest.CaptureFixture[str]) -> None:
    """`--list` listed nothing and exited 0 where the same selection without it exits 2."""
    for listing in (["--list"], []):
        assert main(["mutate", "--only", "NOPE", *listing]) == 2
        assert capsys.readouterr().out.strip() == "no mutant selected: none matches --only, --suite and --quick"


def test_the_implementation_runs_from_the_copy_and_the_judge_from_this_tree(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    copy_sources(copy)
    canary(copy, copy / "agent" / "protocol" / "dsse.py")  # raises unless the copy's module would be imported
    assert "PYTHONPATH" not in judge_environment()
    assert not (copy / ".venv").exists()
    assert (copy / "parley" / "v1").is_dir()
    assert str(SOURCE_ROOT) not in os.fspath(copy)


def test_a_known_mutant_is_killed_end_to_end() -> None:
    """Judged as CI judges (--targeted): by the cases exercising the requirement it breaks, against the copy."""
    known = next(m for m in load_mutants() if m.id == KNOWN_KILLED)
    only = mutate.cases_exercising("biller", {known.breaks})
    result = run_mutant(known, "biller", mutate.Judging(timeout=120, only=only))
    assert result.outcome == "KILLED", result
    assert result.file == "agent/protocol/messages.py"
    assert set(result.killed_by) <= set(only), result.killed_by


TWO_MUTANTS = """
[[mutant]]
id = "m-hdr3"
suite = "biller"
breaks = "HDR-3"
target = "agent/protocol/messages.py"
find = '''if header.sender != sender_keys.party_id:'''
replace = '''if not header.sender:'''
description = "d"

[[mutant]]
id = "m-env7"
suite = "biller"
breaks = "ENV-7"
target = "agent/protocol/messages.py"
find = '''message.DiscardUnknownFields()'''
replace = '''pass'''
description = "d"

[[mutant]]
id = "m-uncovered"
suite = "biller"
breaks = "XYZ-1"
target = "agent/protocol/messages.py"
find = '''message.DiscardUnknownFields()'''
replace = '''pass'''
description = "breaks a requirement no case exercises"
"""


def test_targeted_runs_judge_each_mutant_by_the_cases_exercising_what_it_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--targeted: each mutant's suite runs `--only` the cases exercising its requirement (their own or one they
    cover); each suite's baseline, those of all its mutants; a requirement no case exercises is an ERROR."""
    (tmp_path / "three.toml").write_text(TWO_MUTANTS)
    hdr3, env7 = mutate.cases_exercising("biller", {"HDR-3"}), mutate.cases_exercising("biller", {"ENV-7"})
    assert "HDR-3/wrong-sender" in hdr3
    assert "NEG-1/thread-open-position" in mutate.cases_exercising("biller", {"HDR-10"})  # it covers HDR-10
    judged: list[tuple[str, ...] | None] = []

    def judge(copy: Path, work: Path, judging: mutate.Judging) -> tuple[int, dict[str, object]]:
        judged.append(judging.only)
        if judging.only in (hdr3, env7):  # a mutant's run: killed by its first case
            return 1, {"cases": [{"id": judging.only[0], "outcome": "FAIL"}]}
        return 0, {"summary": {"PASS": 2}}  # the baseline, or a whole-suite run: passes

    monkeypatch.setitem(mutate.JUDGES, "biller", judge)
    assert main(["mutate", "--targeted", "--only", "m-hdr3,m-env7", "--mutants-dir", str(tmp_path)]) == 0
    assert judged[0] == mutate.cases_exercising("biller", {"ENV-7", "HDR-3"})  # the baseline first
    assert sorted(judged[1:], key=str) == sorted([hdr3, env7], key=str)
    assert mutate.Judging(only=hdr3).selection() == ["--only", ",".join(hdr3)]
    judged.clear()
    assert main(["mutate", "--targeted", "--no-baseline", "--only", "m-uncovered", "--mutants-dir", str(tmp_path)]) == 1
    assert judged == []  # nothing ran: no case exercises XYZ-1
    assert "no case of the biller suite exercises XYZ-1" in capsys.readouterr().out
    assert main(["mutate", "--no-baseline", "--only", "m-hdr3", "--mutants-dir", str(tmp_path)]) == 0
    assert judged == [None]  # without --targeted: the whole suite
    assert mutate.Judging().selection() == []


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
    monkeypatch.setitem(mutate.JUDGES, "biller", lambda copy, work, judging: (status, report))
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
    monkeypatch.setitem(mutate.JUDGES, "biller", lambda copy, work, judging: killed)
    assert main(["mutate", "--no-baseline", "--mutants-dir", str(tmp_path)]) == 1
    assert "documented as equivalent" in capsys.readouterr().out
