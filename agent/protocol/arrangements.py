"""What is still owed under an agreed arrangement: the one reading of "paid" and "unpaid" instalments.

An arrangement's schedule (its agreed `Terms`) lists instalments by index; each settled payment
names the index it paid (PAY-3). The biller (which instalment an intent may pay, what a scheduler
reminds of), the consumer (which instalment to pay next) and an offline reader all ask this module.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.protocol.terms import Instalment, Terms


def unpaid_instalments(terms: Terms, paid: Iterable[int]) -> tuple[tuple[int, Instalment], ...]:
    """(index, instalment) of each scheduled payment whose index is not in `paid`, in schedule order."""
    settled = frozenset(paid)
    return tuple((index, instalment) for index, instalment in enumerate(terms.schedule) if index not in settled)


__all__ = ["unpaid_instalments"]
