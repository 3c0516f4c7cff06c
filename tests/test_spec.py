"""docs/PROTOCOL.md and the code say the same thing.

Every error reason is in the spec's §13 table with its gRPC code and requirement
id; every tunable limit is in §14; every requirement id that code, tests, protos
or vectors cite is defined exactly once in the spec.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from agent.protocol.errors import Reason
from agent.protocol.limits import Limits

ROOT = Path(__file__).resolve().parent.parent
SPEC = (ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
ID = re.compile(r"\b((?:TRN|ENV|KEY|HDR|ENR|AUZ|BIL|TRM|NEG|PAY|EVT|PRV|ERR|LIM|VER|CNF|BND)-\d+)\b")
DEFINED = re.findall(r"\*\*((?:[A-Z]{3})-\d+)\*\*", SPEC)


def _section(number: int) -> str:
    match = re.search(rf"^## §?{number}\b.*?(?=^## )", SPEC, flags=re.S | re.M)
    assert match, f"PROTOCOL.md has no section {number}"
    return match.group(0)


def test_requirement_ids_are_defined_once() -> None:
    duplicates = sorted({i for i in DEFINED if DEFINED.count(i) > 1})
    assert not duplicates
    assert len(DEFINED) > 100


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.name)
def test_every_reason_is_in_the_error_table(reason: Reason) -> None:
    rows = [line for line in _section(13).splitlines() if line.startswith("|") and f"`{reason.name}`" in line]
    assert rows, f"{reason.name} missing from §13"
    assert reason.grpc_code in rows[0]
    assert reason.requirement in rows[0]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Limits)])
def test_every_limit_is_in_the_limits_table(field: str) -> None:
    assert f"`{field}`" in _section(14)


def _cited() -> set[str]:
    texts = [p.read_text(encoding="utf-8") for p in ROOT.glob("agent/**/*.py")]
    texts += [p.read_text(encoding="utf-8") for p in ROOT.glob("proto/**/*.proto")]
    texts += [p.read_text(encoding="utf-8") for p in ROOT.glob("tests/*.py") if p.name != "test_spec.py"]
    vectors = json.loads((ROOT / "agent" / "data" / "vectors.json").read_text(encoding="utf-8"))
    texts += [case["requirement"] for case in vectors["tests"]]
    return {i for text in texts for i in ID.findall(text)}


def test_every_cited_requirement_exists_in_the_spec() -> None:
    assert sorted(_cited() - set(DEFINED)) == []
