"""The coverage table: every MUST and SHOULD id of docs/PROTOCOL.md that a peer can observe has a case.

The table is generated from the cases' declarations (`agent/conformance/coverage.py`) and published in
docs/CONFORMANCE.md; see there for what covered, not observable and gap mean.
"""

from __future__ import annotations

import re

import pytest

from agent.conformance import biller as biller_suite
from agent.conformance import consumer_cases
from agent.conformance.coverage import (
    DOC_PATH,
    GAPS,
    NOT_OBSERVABLE,
    coverage_rows,
    figures,
    main,
    refreshed_document,
    render_table,
    spec_requirements,
)

ROWS = coverage_rows()
SPEC_IDS = {r.id for r in spec_requirements()}


def test_the_spec_is_read_whole() -> None:
    """Every bold requirement id of the spec is found, once, with a level."""
    defined = re.findall(r"\*\*([A-Z]{3}-\d+)\*\*", DOC_PATH.with_name("PROTOCOL.md").read_text(encoding="utf-8"))
    assert sorted(SPEC_IDS) == sorted(set(defined))
    assert len(spec_requirements()) == len(defined)
    levels = {r.id: r.level for r in spec_requirements()}
    assert levels["ENV-3"] == "MUST"
    assert levels["HDR-14"] == "SHOULD"


def test_every_observable_requirement_has_a_case_or_is_a_listed_gap() -> None:
    """A MUST or SHOULD id is covered, or not observable (with the reason), or a gap in the open."""
    unclassified = [row.requirement.id for row in ROWS if row.status == "unclassified"]
    assert unclassified == [], "give each a case (covers=…), or list it in NOT_OBSERVABLE or GAPS with the reason"


def test_no_listed_gap_or_unobservable_id_has_a_case() -> None:
    """A gap that gained a case leaves GAPS; an id a case exercises is observable after all."""
    stale = [row.requirement.id for row in ROWS if row.covered and row.requirement.id in {*GAPS, *NOT_OBSERVABLE}]
    assert stale == []
    assert not set(GAPS) & set(NOT_OBSERVABLE)


def test_listed_ids_exist_in_the_spec() -> None:
    assert sorted({*GAPS, *NOT_OBSERVABLE} - SPEC_IDS) == []
    assert all(reason.strip() for reason in (*GAPS.values(), *NOT_OBSERVABLE.values()))


@pytest.mark.parametrize("suite", [biller_suite.suite, consumer_cases.suite], ids=lambda s: s.name)
def test_every_declared_id_is_a_spec_requirement(suite: object) -> None:
    cases = getattr(suite, "cases")  # noqa: B009 - the suites have different context types
    declared = {(case.id, requirement) for case in cases for requirement in case.exercises}
    assert sorted((case_id, r) for case_id, r in declared if r not in SPEC_IDS) == []


def test_most_observable_musts_are_covered() -> None:
    """A floor, so that coverage only grows: raise it when cases are added."""
    counts = figures(ROWS)["MUST"]
    assert counts["covered"] >= 121
    assert counts["covered"] + counts["gaps"] == counts["observable"]


def test_the_published_table_is_fresh() -> None:
    document = DOC_PATH.read_text(encoding="utf-8")
    assert refreshed_document(document, render_table(ROWS)) == document, (
        "docs/CONFORMANCE.md: run python -m agent.conformance.coverage"
    )
    assert main(["--check"]) == 0


def test_the_case_tables_list_every_case_in_running_order() -> None:
    """docs/CONFORMANCE.md's tables of cases (biller) and scenarios (consumer), row by row, in the suites' order."""
    document = DOC_PATH.read_text(encoding="utf-8")
    biller_rows = re.findall(r"^\| `([A-Z]{3}-\d+/[a-z0-9-]+)` \| (?:MUST|SHOULD) \|", document, re.M)
    consumer_rows = re.findall(r"^\| `([A-Z]{3}-\d+/[a-z0-9-]+)` \| \d \|", document, re.M)
    assert biller_rows == [case.id for case in biller_suite.suite.cases]
    assert consumer_rows == [case.id for case in consumer_cases.suite.cases]
