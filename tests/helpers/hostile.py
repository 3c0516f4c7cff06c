"""A hostile or broken biller for the tests: the shared `HostileServicer` over the real agent.

Tests of the consumer agent use it to play what the real biller never does —
answers lost on the way back, a phishing Hello, forged bills, instructions for
another amount, a receipt that does not match, an event stream with gaps — while
everything else is the real `BillerAgent` on a real SQLite file.

    async with running_biller(tmp_path, servicer=HostileServicer) as biller:
        hostile = hostile_of(biller)
        hostile.unavailable_after["Negotiate"] = 1                   # the biller applies the move, the answer is lost
        hostile.rewrite["ListBills"] = lambda request, answer: ...  # the answer is changed on its way
"""

from __future__ import annotations

from agent.conformance.peers import HostileServicer
from tests.helpers.peer import Biller


def hostile_of(biller: Biller) -> HostileServicer:
    """The hostile servicer a `running_biller(..., servicer=HostileServicer)` serves with."""
    assert isinstance(biller.servicer, HostileServicer)
    return biller.servicer
