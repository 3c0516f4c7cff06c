"""The shipped test vectors: this library gives every case its expected verdict and reason."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from agent import vectors
from agent.protocol.errors import Reason
from agent.protocol.messages import PAYLOAD_TYPES

DOCUMENT = vectors.load()
CASES: list[dict[str, Any]] = DOCUMENT["tests"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_vector(case: dict[str, Any]) -> None:
    assert vectors.judge(case, DOCUMENT) == (case["expected"], case["reason"]), case["comment"]


def test_vector_set_is_well_formed() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)) == DOCUMENT["numberOfTests"] >= 40
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
