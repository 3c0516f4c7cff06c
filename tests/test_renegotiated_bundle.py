"""BND-5 after TRM-11: an agreement file (bundle) of a renegotiation verifies offline.

A renegotiation after a half-paid plan broke restates the outstanding balance (60.00 of the 120.00 bill),
which is below the amount due; what was received is not in the bundle, so the verifier takes the balance
from the opening's principal when it is in the bill's currency, positive and at most the amount due. A
principal above the amount due is judged against the amount due (PRINCIPAL_MISMATCH), one in another
currency is CURRENCY_MISMATCH, a zero one AMOUNT_OUT_OF_RANGE (TRM-3, before TRM-11), and a counter-offer
restating more than the opening did is PRINCIPAL_MISMATCH. The bundles are the shipped vectors
(`bundle-renegotiated-*`, scripts/gen_vectors.py), checked here through `verify_bundle` and `parley verify`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import vectors
from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.terms import Money, TermsKind

CASES: dict[str, dict[str, Any]] = {case["id"]: case for case in vectors.load()["tests"]}
REFUSED = {
    "bundle-renegotiated-above-amount-due": Reason.PRINCIPAL_MISMATCH,
    "bundle-renegotiated-other-currency": Reason.CURRENCY_MISMATCH,
    "bundle-renegotiated-zero-principal": Reason.AMOUNT_OUT_OF_RANGE,
    "bundle-renegotiated-counter-restates-more": Reason.PRINCIPAL_MISMATCH,
}


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


def verify_command(tmp_path: Path, bundle: object) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "agreement.json"
    path.write_text(json.dumps(bundle), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "verify", "--json", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_a_renegotiated_agreement_restating_the_outstanding_balance_verifies_offline(tmp_path: Path) -> None:
    case = CASES["bundle-renegotiated-outstanding-balance"]
    agreement = verify_bundle(Bundle.from_json(case["bundle"]))
    assert agreement.bill.amount_due == eur("120.00")
    assert agreement.terms.kind is TermsKind.INSTALMENT_PLAN
    assert agreement.terms.principal == eur("60.00")
    assert [instalment.amount for instalment in agreement.terms.schedule] == [eur("30.00"), eur("30.00")]
    code, verdict = verify_command(tmp_path, case["bundle"])
    assert (code, verdict["verdict"], verdict["bill_id"]) == (0, "valid", agreement.bill.bill_id)


@pytest.mark.parametrize("case_id", sorted(REFUSED))
def test_a_renegotiated_agreement_restating_no_balance_of_the_bill_is_refused(tmp_path: Path, case_id: str) -> None:
    case = CASES[case_id]
    with pytest.raises(RemoteProtocolError) as refused:
        verify_bundle(Bundle.from_json(case["bundle"]))
    assert refused.value.reason is REFUSED[case_id], case["comment"]
    code, verdict = verify_command(tmp_path, case["bundle"])
    assert (code, verdict["verdict"], verdict["reason"]) == (1, "invalid", REFUSED[case_id].name)
