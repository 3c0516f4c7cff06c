"""The shipped test vectors: this library gives every case its expected verdict and reason."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent import vectors
from agent.cli import main
from agent.protocol.errors import Reason
from agent.protocol.messages import PAYLOAD_TYPES
from agent.protocol.terms import CURRENCY_TABLE_EDITION, currency_minor_units

DOCUMENT = vectors.load()
CASES: list[dict[str, Any]] = DOCUMENT["tests"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_vector(case: dict[str, Any]) -> None:
    assert vectors.judge(case, DOCUMENT) == (case["expected"], case["reason"]), case["comment"]


def test_vector_set_is_well_formed() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)) == DOCUMENT["numberOfTests"] >= 90
    kinds = Counter(c["kind"] for c in CASES)
    assert set(kinds) == {"message", "keyset", "bundle"}
    for case in CASES:
        assert case["comment"]
        assert case["requirement"]
        assert (case["expected"] == "valid") == (case["reason"] is None)
        if case["reason"] is not None:
            assert case["reason"] in Reason.__members__


def test_every_signed_payload_type_has_a_valid_vector() -> None:
    valid_types = {c["envelope"]["payloadType"] for c in CASES if c["kind"] == "message" and c["expected"] == "valid"}
    assert valid_types == set(PAYLOAD_TYPES) - {"parley.v1.KeySet"}


def test_the_currency_table_in_the_vectors_is_the_one_the_code_uses() -> None:
    """TRM-17: one dated table; the spec names its edition."""
    table = DOCUMENT["currencies"]
    assert table["edition"] == CURRENCY_TABLE_EDITION
    assert table["minorUnits"] == currency_minor_units()
    spec = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    published = re.search(r"published (\d{4}-\d{2}-\d{2})", CURRENCY_TABLE_EDITION)
    assert published is not None
    assert f"**{published.group(1)}**" in spec
    assert f"It lists {len(table['minorUnits'])} codes" in spec


# --- The JSON Schema of the document, checked by a small validator of the keywords it uses ----------

_ANNOTATIONS = {"$schema", "$id", "title", "description"}
_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "null": type(None),
    "boolean": bool,
}


def _is_type(value: object, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def schema_errors(value: object, schema: dict[str, Any], root: dict[str, Any], path: str = "$") -> list[str]:
    """Errors of `value` against a draft 2020-12 `schema` using only the keywords below (others are refused)."""
    errors: list[str] = []
    for keyword, rule in schema.items():
        if keyword in _ANNOTATIONS or keyword == "$defs":
            continue
        if keyword == "$ref":
            assert rule.startswith("#/$defs/"), rule
            errors += schema_errors(value, root["$defs"][rule.removeprefix("#/$defs/")], root, path)
        elif keyword == "type":
            names = rule if isinstance(rule, list) else [rule]
            if not any(_is_type(value, name) for name in names):
                errors.append(f"{path}: not of type {rule}")
        elif keyword == "const":
            if value != rule:
                errors.append(f"{path}: not {rule!r}")
        elif keyword == "enum":
            if value not in rule:
                errors.append(f"{path}: not one of {rule}")
        elif keyword == "pattern":
            if isinstance(value, str) and re.search(rule, value) is None:
                errors.append(f"{path}: {value!r} does not match {rule}")
        elif keyword == "minLength":
            if isinstance(value, str) and len(value) < rule:
                errors.append(f"{path}: shorter than {rule}")
        elif keyword == "minimum":
            if isinstance(value, int) and value < rule:
                errors.append(f"{path}: below {rule}")
        elif keyword == "minItems":
            if isinstance(value, list) and len(value) < rule:
                errors.append(f"{path}: fewer than {rule} items")
        elif keyword == "items":
            if isinstance(value, list):
                for index, item in enumerate(value):
                    errors += schema_errors(item, rule, root, f"{path}[{index}]")
        elif keyword == "required":
            if isinstance(value, dict):
                errors += [f"{path}: {name!r} missing" for name in rule if name not in value]
        elif keyword == "properties":
            if isinstance(value, dict):
                for name, sub in rule.items():
                    if name in value:
                        errors += schema_errors(value[name], sub, root, f"{path}.{name}")
        elif keyword == "additionalProperties":
            if isinstance(value, dict):
                extra = [name for name in value if name not in schema.get("properties", {})]
                for name in extra:
                    if rule is False:
                        errors.append(f"{path}: {name!r} not allowed")
                    elif rule is not True:
                        errors += schema_errors(value[name], rule, root, f"{path}.{name}")
        elif keyword == "propertyNames":
            if isinstance(value, dict):
                for name in value:
                    errors += schema_errors(name, rule, root, f"{path}.<{name}>")
        elif keyword == "allOf":
            for sub in rule:
                errors += schema_errors(value, sub, root, path)
        elif keyword == "oneOf":
            matching = [sub for sub in rule if not schema_errors(value, sub, root, path)]
            if len(matching) != 1:
                errors.append(f"{path}: matches {len(matching)} of oneOf, not 1")
        else:
            raise AssertionError(f"the schema uses {keyword!r}, which this validator does not implement")
    return errors


SCHEMA_DOCUMENT: dict[str, Any] = json.loads(vectors.schema_text())


def test_the_shipped_document_matches_its_schema() -> None:
    assert schema_errors(DOCUMENT, SCHEMA_DOCUMENT, SCHEMA_DOCUMENT) == []


def _broken(change: Any) -> dict[str, Any]:
    document = copy.deepcopy(DOCUMENT)
    change(document)
    return document


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("numberOfTests"),
        lambda d: d["tests"][0].__setitem__("reason", "BAD_SIGNATURE"),  # valid with a reason
        lambda d: d["tests"][-1].__setitem__("kind", "stream"),
        lambda d: d["tests"][0].__setitem__("extra", 1),
        lambda d: d["currencies"]["minorUnits"].__setitem__("eur", 2),
        lambda d: d["keys"]["biller-1"].__setitem__("keyid", "XYZ"),
    ],
    ids=["no-count", "valid-with-reason", "unknown-kind", "extra-member", "lower-case-code", "bad-keyid"],
)
def test_the_schema_refuses_broken_documents(change: Any) -> None:
    assert schema_errors(_broken(change), SCHEMA_DOCUMENT, SCHEMA_DOCUMENT) != []


def test_parley_vectors_writes_the_document_and_its_schema(tmp_path: Path) -> None:
    document, schema = tmp_path / "vectors.json", tmp_path / "vectors.schema.json"
    assert main(["vectors", "--out", str(document)]) == 0
    assert main(["vectors", "--schema", "--out", str(schema)]) == 0
    assert document.read_text(encoding="utf-8") == vectors.document_text()
    assert json.loads(schema.read_text(encoding="utf-8")) == SCHEMA_DOCUMENT
