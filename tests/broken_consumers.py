"""Deliberately broken consumers, one per class of defect, to show that the consumer conformance suite catches each.

Each is the reference consumer (`parley consumer run --from-env --once
--approve-all`) with one defect patched into the agent before the command
runs, as a program the suite can start. The defects go into the agent's
receive path (`agent.consumer.receive.Receiver`, where every check of what a
biller sends lives) or the protocol core, never into the agent's private
methods:

    python tests/broken_consumers.py DEFECT consumer run --from-env --once --approve-all

`BrokenConsumer.command` is that command line; `fails` lists exactly the
scenarios the suite must FAIL against it (tests/test_conformance_consumer.py
asserts that every other scenario passes).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONSUMER_ARGS = ("consumer", "run", "--from-env", "--once", "--approve-all")


def reference_command() -> str:
    """The reference consumer, as the suite runs it."""
    return shlex.join([sys.executable, "-m", "agent.cli", *CONSUMER_ARGS])


# --- The defects ----------------------------------------------------------------------------------------


def skips_bill_verification() -> None:
    """Bills are parsed and kept without checking their signature (BIL-3)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415 - patched in the broken program only
    from agent.protocol.dsse import digest  # noqa: PLC0415
    from agent.protocol.terms import BillFacts  # noqa: PLC0415
    from agent.stores.base import ReceivedBillRecord  # noqa: PLC0415
    from parley.v1 import bill_pb2  # noqa: PLC0415

    async def unchecked_bill(self: Any, session: Any, envelope: Any, account_id: str) -> ReceivedBillRecord:
        facts = BillFacts.from_proto(bill_pb2.Bill.FromString(envelope.payload))
        return ReceivedBillRecord(
            session.biller, facts.bill_id, account_id, envelope.SerializeToString(), digest(envelope), self._party.now()
        )

    Receiver.check_bill = unchecked_bill  # type: ignore[method-assign]


def accepts_keyset_rollback() -> None:
    """A key set version not above the one held is taken as the biller's current one ("it knows best", KEY-8)."""
    from agent.protocol.keysets import KeyChain  # noqa: PLC0415
    from agent.protocol.limits import DEFAULT_LIMITS, Limits  # noqa: PLC0415
    from parley.v1 import keys_pb2  # noqa: PLC0415

    extend = KeyChain.extend

    def rolled_back(
        self: KeyChain, envelope: Any, *, now: datetime | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> KeyChain:
        version = keys_pb2.KeySet.FromString(envelope.payload).version
        if 0 < version <= self.latest.version:
            if version == 1:
                return KeyChain.verify([envelope], now=now, limits=limits)
            return extend(KeyChain(self.versions[: version - 1]), envelope, now=now, limits=limits)
        return extend(self, envelope, now=now, limits=limits)

    KeyChain.extend = rolled_back  # type: ignore[method-assign]


def pays_instructions_for_another_amount() -> None:
    """Instructions whose amount differs from the intent's are paid all the same (PAY-8)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415

    check = Receiver.check_instructions

    def lenient(self: Any, verified: Any, intent: Any, digests: set[bytes]) -> tuple[str, str] | None:
        refusal = check(self, verified, intent, digests)
        return None if refusal is not None and refusal[0] == "PAYMENT_AMOUNT_MISMATCH" else refusal

    Receiver.check_instructions = lenient  # type: ignore[method-assign, assignment]


def accepts_counter_to_in_options_offer() -> None:
    """The negotiation core never finds an offer within the options, so a biller's counter to one is no
    violation (NEG-12) and the strategy may accept it."""
    from agent.protocol.negotiation import Negotiation  # noqa: PLC0415

    Negotiation._pending_within_options = lambda self: False  # type: ignore[method-assign]


def skips_the_pin() -> None:
    """Neither Hello nor the enrolment's key set chain is compared with the pinned fingerprint (KEY-12)."""
    from agent.consumer.receive import Receiver  # noqa: PLC0415
    from agent.protocol.keysets import KeyChain  # noqa: PLC0415

    verify = KeyChain.verify.__func__  # type: ignore[attr-defined]

    def unpinned(cls: type[KeyChain], /, envelopes: Any, *, pin: bytes | None = None, **options: Any) -> KeyChain:
        return verify(cls, envelopes, **options)  # type: ignore[no-any-return]

    KeyChain.verify = classmethod(unpinned)  # type: ignore[method-assign, assignment]
    Receiver.check_hello = lambda self, hello, link: None  # type: ignore[method-assign]


DEFECTS: dict[str, Callable[[], None]] = {
    "skips-bill-verification": skips_bill_verification,
    "accepts-keyset-rollback": accepts_keyset_rollback,
    "pays-instructions-for-another-amount": pays_instructions_for_another_amount,
    "accepts-counter-to-in-options-offer": accepts_counter_to_in_options_offer,
    "skips-the-pin": skips_the_pin,
}


@dataclass(frozen=True)
class BrokenConsumer:
    """A broken consumer: its defect class, the program's defect argument and the scenarios it must FAIL."""

    name: str
    defect: str
    fails: frozenset[str]

    @property
    def command(self) -> str:
        return shlex.join([sys.executable, str(Path(__file__).resolve()), self.defect, *CONSUMER_ARGS])


BROKEN_CONSUMERS = (
    BrokenConsumer(
        "pays a forged bill",
        "skips-bill-verification",
        # The bill of the rollback scenario is signed by a revoked key: a client that checks no bill takes it too.
        frozenset({"BIL-3/forged-bill-signature", "KEY-8/keyset-rollback"}),
    ),
    BrokenConsumer("accepts a key set rollback", "accepts-keyset-rollback", frozenset({"KEY-8/keyset-rollback"})),
    BrokenConsumer(
        "pays instructions for another amount",
        "pays-instructions-for-another-amount",
        frozenset({"PAY-8/instructions-amount"}),
    ),
    BrokenConsumer(
        "accepts a counter to an in-options offer",
        "accepts-counter-to-in-options-offer",
        frozenset({"NEG-12/counter-to-in-options-offer"}),
    ),
    BrokenConsumer("ignores the pinned fingerprint", "skips-the-pin", frozenset({"KEY-12/unpinned-biller"})),
)


def main(argv: list[str]) -> int:
    """`broken_consumers.py DEFECT ARGS...`: patch the defect in, then run `parley ARGS...`."""
    if not argv or argv[0] not in DEFECTS:
        print(f"usage: {Path(__file__).name} {{{','.join(DEFECTS)}}} PARLEY-ARGS...", file=sys.stderr)
        return 2
    DEFECTS[argv[0]]()
    from agent.cli import main as parley  # noqa: PLC0415

    return parley(argv[1:])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
