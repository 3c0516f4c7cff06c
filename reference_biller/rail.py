"""The reference biller's simulated payment rail: a toy bank account that money is paid into.

`SimulatedRail` implements `agent.biller.PaymentRail`. For each payment intent it
gives instructions naming the configured payee and a payment reference unique
to the intent, `<prefix>-<account>-<n>` (PAY-4). A consumer's bank then pays
under that reference — `pay(reference, amount, now)` records the incoming
transfer — and after the configured settlement delay `settle_due(agent, now)`
settles it with `BillerAgent.record_settlement`, which signs the `Receipt` and
appends the `PAYMENT_RECEIVED` thanks (PAY-5). Time always comes from the
caller (the biller's injected clock), never from the wall clock.

Transfers that cannot be counted as the intent's payment are recorded as
received and kept for a person to resolve, never settled:

- **wrong amount** (`MISMATCH`): PAY-6 allows a receipt only for the instructed
  amount, so the rail does not settle a transfer of another amount; the
  consumer sees no receipt and treats that as a dispute (PAY-9). A later transfer
  of the right amount under the same reference still settles the intent.
- **second payment** (`OVERPAYMENT`): one settlement per reference (PAY-7); any
  further transfer under a paid or pending reference is money to refund.
- **unknown reference** (`UNMATCHED`).

`disputes()` lists them. The references are derived from (account, intent), so
they stay unique across restarts without any stored counter; the reference table
is rebuilt from the store's unsettled intents (`restore`) when the biller starts
and before every settlement pass, so an intent instructed before a crash, or by
another replica, is still matched. Transfers received but not yet settled live
in this process's memory, so a restart forgets them (a real rail keeps them on
its side).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from agent.biller import BillerAgent, PaymentDetails
from agent.protocol.terms import Money
from parley.v1 import envelope_pb2
from reference_biller.config import Payments

logger = logging.getLogger("parley.reference_biller.rail")

RAIL_NAME = "simulated"
_REFERENCE_DIGITS = 10


class TransferStatus(enum.StrEnum):
    PENDING = "pending"  # received, waiting for the settlement delay
    SETTLED = "settled"  # settled: the intent has its receipt
    MISMATCH = "mismatch"  # another amount than instructed: no receipt (PAY-6), resolve out of band
    OVERPAYMENT = "overpayment"  # a further transfer under a paid reference: refund it (PAY-7)
    UNMATCHED = "unmatched"  # no such reference: return it
    FAILED = "failed"  # the biller refused to record it (see the log): resolve out of band


_COUNTED = (TransferStatus.PENDING, TransferStatus.SETTLED)  # at most one per reference (PAY-7)


@dataclass(frozen=True)
class Instruction:
    """What the rail told the biller for one intent."""

    account_id: str
    intent_id: str
    amount: Money
    reference: str


@dataclass(frozen=True)
class Transfer:
    """Money that arrived on the rail under a reference."""

    transfer_id: str  # the rail's own reference, stated in the receipt as rail_reference
    reference: str
    amount: Money
    received_at: datetime
    status: TransferStatus
    instruction: Instruction | None
    receipt: envelope_pb2.Envelope | None = None


def payment_reference(prefix: str, account_id: str, intent_id: str, attempt: int = 0) -> str:
    """`<prefix>-<account>-<n>`: n is derived from the intent, so no counter has to survive a restart."""
    seed = f"{account_id}\x00{intent_id}\x00{attempt}".encode()
    n = int.from_bytes(hashlib.sha256(seed).digest()[:8], "big") % 10**_REFERENCE_DIGITS
    return f"{prefix}-{account_id}-{n:0{_REFERENCE_DIGITS}d}"


class SimulatedRail:
    """`agent.biller.PaymentRail` on an in-memory ledger; see the module docstring."""

    def __init__(self, payments: Payments) -> None:
        self.payments = payments
        self._instructions: dict[str, Instruction] = {}  # by reference
        self._by_intent: dict[tuple[str, str], Instruction] = {}
        self._transfers: list[Transfer] = []
        self._serial = itertools.count(1)
        self._lock = asyncio.Lock()  # one settlement pass at a time: each transfer is settled once

    # --- PaymentRail ------------------------------------------------------------------------------

    def instructions(self, account_id: str, intent_id: str, amount: Money) -> PaymentDetails:
        """Where to pay and the reference to quote; the same intent always gets the same reference."""
        known = self._by_intent.get((account_id, intent_id))
        if known is None or known.amount != amount:
            for attempt in itertools.count():
                reference = payment_reference(self.payments.reference_prefix, account_id, intent_id, attempt)
                taken = self._instructions.get(reference)
                if taken is None or (taken.account_id, taken.intent_id) == (account_id, intent_id):
                    break
            known = Instruction(account_id, intent_id, amount, reference)
            self._instructions[reference] = known
            self._by_intent[(account_id, intent_id)] = known
        return PaymentDetails(RAIL_NAME, self.payments.payee_name, self.payments.payee_account, known.reference)

    async def restore(self, agent: BillerAgent) -> int:
        """Learn the instructions of every intent awaiting payment from the agent's store; returns how many
        were new here. Run after a restart (the table above lives in memory) and before settling, so an intent
        instructed before a crash, or by another replica, is still matched and settled."""
        learned = 0
        for awaited in await agent.awaited_payments():
            key = (awaited.account_id, awaited.intent_id)
            if key in self._by_intent:
                continue
            known = Instruction(awaited.account_id, awaited.intent_id, awaited.amount, awaited.payment_reference)
            self._instructions[awaited.payment_reference] = known
            self._by_intent[key] = known
            learned += 1
        return learned

    # --- The payer's side ---------------------------------------------------------------------------

    def pay(self, reference: str, amount: Money, now: datetime) -> Transfer:
        """Record a transfer arriving under `reference` (what the consumer's bank does); returns it."""
        instruction = self._instructions.get(reference)
        if instruction is None:
            status = TransferStatus.UNMATCHED
        elif any(t.reference == reference and t.status in _COUNTED for t in self._transfers):
            status = TransferStatus.OVERPAYMENT
        elif amount != instruction.amount:
            status = TransferStatus.MISMATCH
        else:
            status = TransferStatus.PENDING
        transfer = Transfer(self._next_id(), reference, amount, now, status, instruction)
        self._transfers.append(transfer)
        if status is not TransferStatus.PENDING:
            logger.warning("transfer %s of %s under %r held: %s", transfer.transfer_id, amount, reference, status.value)
        return transfer

    # --- The biller's side --------------------------------------------------------------------------

    async def settle_due(self, agent: BillerAgent, now: datetime) -> list[envelope_pb2.Envelope]:
        """Settle every pending transfer older than the settlement delay; returns the new receipts.

        Each transfer is settled exactly once, even when this runs twice at once
        (a lock here, and `record_settlement` is idempotent in the store).
        """
        delay = self.payments.settlement_delay
        async with self._lock:
            return await self._settle(agent, now, lambda t: t.received_at + delay <= now, delayed=True)

    async def settle_all(self, agent: BillerAgent, now: datetime) -> list[envelope_pb2.Envelope]:
        """Settle now every pending transfer, and every instructed intent not paid yet at its instructed amount.

        For the conformance control's `SettlePayments` (CNF-4); returns the new receipts.
        An instructed intent the biller does not know (its instructions lost a race
        and were never sent) is skipped.
        """
        async with self._lock:
            await self.restore(agent)
            receipts = await self._settle(agent, now, lambda _: True, delayed=False)
            covered = {t.reference for t in self._transfers if t.status in _COUNTED}
            for instruction in list(self._instructions.values()):
                if instruction.reference in covered:
                    continue
                transfer_id = self._next_id()
                try:
                    receipt = await agent.record_settlement(
                        instruction.account_id, instruction.intent_id, instruction.amount, transfer_id, settle_time=now
                    )
                except LookupError:
                    continue
                except ValueError as refused:
                    logger.warning("intent %s not settled: %s", instruction.intent_id, refused)
                    continue
                self._transfers.append(
                    Transfer(
                        transfer_id,
                        instruction.reference,
                        instruction.amount,
                        now,
                        TransferStatus.SETTLED,
                        instruction,
                        receipt,
                    )
                )
                receipts.append(receipt)
            return receipts

    def transfers(self) -> list[Transfer]:
        """Every transfer received, oldest first."""
        return list(self._transfers)

    def disputes(self) -> list[Transfer]:
        """Transfers held for a person to resolve: wrong amount, overpayment, unknown reference, refused."""
        held = (TransferStatus.MISMATCH, TransferStatus.OVERPAYMENT, TransferStatus.UNMATCHED, TransferStatus.FAILED)
        return [t for t in self._transfers if t.status in held]

    def pending_intents(self, account_id: str) -> set[str]:
        """The account's intents whose money arrived but is not settled yet (schedulers hold off on them)."""
        return {
            t.instruction.intent_id
            for t in self._transfers
            if t.status is TransferStatus.PENDING
            and t.instruction is not None
            and t.instruction.account_id == account_id
        }

    # --- Internals ------------------------------------------------------------------------------------

    def _next_id(self) -> str:
        return f"SIM-{next(self._serial):08d}"

    async def _settle(
        self, agent: BillerAgent, now: datetime, ready: Callable[[Transfer], bool], *, delayed: bool
    ) -> list[envelope_pb2.Envelope]:
        receipts = []
        for index, transfer in enumerate(self._transfers):
            if transfer.status is not TransferStatus.PENDING or not ready(transfer):
                continue
            instruction = transfer.instruction
            assert instruction is not None
            settle_time = min(now, transfer.received_at + self.payments.settlement_delay) if delayed else now
            try:
                receipt = await agent.record_settlement(
                    instruction.account_id,
                    instruction.intent_id,
                    transfer.amount,
                    transfer.transfer_id,
                    settle_time=settle_time,
                )
            except (LookupError, ValueError) as refused:
                logger.warning("transfer %s not settled: %s", transfer.transfer_id, refused)
                self._transfers[index] = replace(transfer, status=TransferStatus.FAILED)
                continue
            self._transfers[index] = replace(transfer, status=TransferStatus.SETTLED, receipt=receipt)
            receipts.append(receipt)
        return receipts


__all__ = ["RAIL_NAME", "Instruction", "SimulatedRail", "Transfer", "TransferStatus", "payment_reference"]
