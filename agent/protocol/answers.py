"""The one vocabulary for answering an offer, shared by the biller's policy and the consumer's strategy.

A plugin (the biller's `Policy`, the consumer's `Strategy`) answers the offer on the table with one
of these; its agent turns the answer into a signed move of the negotiation core
(`agent.protocol.negotiation`: `AcceptOffer` becomes an `Accept` naming the offer's digest,
`CounterOffer` an `Offer`, `RejectOffer` a `Reject`, `Withdraw` a `Withdraw`). The words are the
same on both sides so that a rule written for one reads the same on the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.protocol.terms import Terms
from parley.v1 import negotiation_pb2


@dataclass(frozen=True)
class AcceptOffer:
    """Accept the offer on the table, exactly as offered."""


@dataclass(frozen=True)
class CounterOffer:
    """Counter with these terms (only while the thread has rounds left, NEG-16)."""

    terms: Terms


@dataclass(frozen=True)
class RejectOffer:
    """End the thread without agreement. `note` goes to the peer, so it says nothing private."""

    reason: negotiation_pb2.RejectReason.ValueType
    note: str = ""


@dataclass(frozen=True)
class Withdraw:
    """The consumer walks away from its own thread (NEG-9)."""

    note: str = ""


@dataclass(frozen=True)
class Escalate:
    """The consumer's strategy asks its person first; `reason` is shown to them, never sent."""

    reason: str


# What a biller's policy may answer; a consumer's strategy may also withdraw or escalate.
Answer = AcceptOffer | CounterOffer | RejectOffer
ConsumerAnswer = AcceptOffer | CounterOffer | RejectOffer | Withdraw | Escalate

__all__ = ["AcceptOffer", "Answer", "ConsumerAnswer", "CounterOffer", "Escalate", "RejectOffer", "Withdraw"]
