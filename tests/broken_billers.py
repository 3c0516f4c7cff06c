"""Deliberately broken billers, one per class of defect, to show that the conformance suite catches each.

Each `BrokenBiller` is the reference biller (`reference_biller.service`, served
in-process with conformance control on 127.0.0.1) with one defect built in
through a real seam: one phase object of its `BillerAgent` (`agent.party.receive`,
`.replays`, `.negotiation`, `.payments`, `.events`) replaced by a subclass that
overrides one public method. Every caller reaches phases through the party at
call time, so the replacement is what the wire reaches; no private name is
patched. `fails` lists exactly the cases the suite must FAIL against it
(tests/test_conformance_biller.py asserts that no other case fails).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import Message

from agent.biller import BillerAgent
from agent.biller.events import EventsPhase, Watch
from agent.biller.negotiation import NegotiationPhase
from agent.biller.payments import PaymentsPhase
from agent.biller.receive import Inbound, ReceivePath, ReplayCache
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keys import VerifyKey
from agent.protocol.keysets import KeyChain
from agent.protocol.negotiation import Accept, Negotiation, State, ThreadMessage
from agent.stores.base import AccountRecord, BillRecord, PaymentIntentRecord, ReplayRecord, ThreadRecord
from parley.v1 import biller_service_pb2, envelope_pb2, payment_pb2
from reference_biller.config import load_config
from reference_biller.service import SteppableClock, serving_biller

Defect = Callable[[BillerAgent], None]
M = TypeVar("M", bound=Message)


@asynccontextmanager
async def reference_biller(
    state_dir: Path, defect: Defect | None = None, *, conformance_control: bool = True
) -> AsyncIterator[str]:
    """The reference biller (with conformance control unless told) on a free 127.0.0.1 port; yields its address."""
    async with serving_biller(
        load_config(),
        listen="127.0.0.1:0",
        state_dir=state_dir,
        clock=SteppableClock(),
        insecure=True,
        conformance_control=conformance_control,
        interval=timedelta(hours=1),  # no background upkeep during a run: AdvanceClock does it
        shutdown_grace=0,
    ) as running:
        if defect is not None:
            defect(running.biller.agent)
        yield running.address


# --- 1. Skips signature verification ----------------------------------------------------------------


class _TrustingKey(VerifyKey):
    """A key that 'verifies' every signature."""

    def verify(self, signature: bytes, data: bytes) -> bool:
        return True


class _TrustingChain(KeyChain):
    """A consumer chain whose keys verify anything: the receive path never checks a signature."""

    def candidate_keys(self, keyid: str) -> tuple[VerifyKey, ...]:
        return tuple(_TrustingKey.from_bytes(key.raw) for key in super().candidate_keys(keyid))


class _TrustingReceivePath(ReceivePath):
    async def consumer_chain(self, party_id: str) -> KeyChain:
        return _TrustingChain((await super().consumer_chain(party_id)).versions)


def skips_signature_verification(agent: BillerAgent) -> None:
    agent.party.receive = _TrustingReceivePath(agent.party)


# --- 2. Accepts a replay ------------------------------------------------------------------------------


def _cache_key(message_id: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(message_id + digest).digest()[:16]


class _ContentKeyedReplayCache(ReplayCache):
    """The replay cache is keyed by (message id, digest): the same id on other content looks new."""

    def key(self, inbound: Inbound[M]) -> tuple[str, bytes]:
        return inbound.sender, _cache_key(inbound.header.message_id, inbound.verified.digest)

    def record(
        self, inbound: Inbound[M], *, answer: bytes | None = None, error: RemoteProtocolError | None = None
    ) -> ReplayRecord:
        original = super().record(inbound, answer=answer, error=error)
        return dataclasses.replace(original, message_id=_cache_key(original.message_id, original.digest))


def accepts_replay(agent: BillerAgent) -> None:
    agent.party.replays = _ContentKeyedReplayCache(agent.party)


# --- 3. Ignores the round limit; 4. accepts a stale accept digest ----------------------------------------


class _UnlimitedRounds(NegotiationPhase):
    def thread_state(
        self, thread: ThreadRecord | None, bill: BillRecord, *, hardship_disclosed: bool, received_minor: int = 0
    ) -> Negotiation:
        negotiation = super().thread_state(
            thread, bill, hardship_disclosed=hardship_disclosed, received_minor=received_minor
        )
        if thread is not None:
            negotiation.max_rounds = 1_000_000
        return negotiation


def ignores_round_limit(agent: BillerAgent) -> None:
    agent.party.negotiation = _UnlimitedRounds(agent.party)


class _StaleAcceptNegotiation(Negotiation):
    """Takes any Accept as an acceptance of the pending offer, whatever digest it names."""

    def receive(self, message: ThreadMessage, now: datetime) -> State:
        if isinstance(message.move, Accept) and self.pending is not None:
            message = dataclasses.replace(message, move=Accept(self.pending.digest))
        return super().receive(message, now)


class _StaleAccepts(NegotiationPhase):
    negotiation_type = _StaleAcceptNegotiation


def accepts_stale_accept(agent: BillerAgent) -> None:
    agent.party.negotiation = _StaleAccepts(agent.party)


# --- 5. Pays twice on a retried intent ------------------------------------------------------------------


class _PaysTwice(PaymentsPhase):
    """A later message with a known intent_id is instructed as a new payment instead of getting the first answer."""

    async def same_intent(
        self, inbound: Inbound[payment_pb2.PaymentIntent], existing: PaymentIntentRecord, content_hash: bytes
    ) -> biller_service_pb2.CreatePaymentIntentResponse:
        party, intent = self.party, inbound.message
        if existing.content_hash != content_hash:  # the conflict check is kept: only the retry is broken
            raise RemoteProtocolError(Reason.IDEMPOTENCY_CONFLICT, "the intent id was used with other content")
        now = party.clock.now()
        instructions = payment_pb2.PaymentInstructions.FromString(
            envelope_pb2.Envelope.FromString(existing.instructions).payload
        )
        instructions.header.CopyFrom(
            party.header(inbound.sender, inbound.header.thread_id, 1, inbound.verified.digest, now)
        )
        instructions.payment_reference = f"{instructions.payment_reference}-AGAIN-{intent.header.message_id.hex()[:6]}"
        return biller_service_pb2.CreatePaymentIntentResponse(instructions=party.seal(instructions))


def pays_twice(agent: BillerAgent) -> None:
    agent.party.payments = _PaysTwice(agent.party)


# --- 6. Lets one consumer read another's bills -------------------------------------------------------------


class _UnauthorizedReads(ReceivePath):
    """Signed reads skip the account binding check (AUZ-1): any enrolled party reads any account."""

    def authorize_read(self, account: AccountRecord | None, sender: str) -> None:
        return  # the defect: whoever is bound, if anyone


def reads_other_accounts(agent: BillerAgent) -> None:
    agent.party.receive = _UnauthorizedReads(agent.party)


# --- 7. Loses events on resume ------------------------------------------------------------------------------


class _LossyResume(EventsPhase):
    """A resumed watch starts one past its cursor (an off-by-one in the resume path)."""

    def follow(self, watch: Watch, cursor: int) -> AsyncIterator[envelope_pb2.Envelope]:
        return super().follow(watch, cursor + 1 if cursor else cursor)


def loses_events_on_resume(agent: BillerAgent) -> None:
    agent.party.events = _LossyResume(agent.party, watch_poll_interval=agent.party.events.watch_poll_interval)


@dataclass(frozen=True)
class BrokenBiller:
    """A reference biller with one defect, and the cases the suite must FAIL against it."""

    name: str
    defect: Defect
    fails: frozenset[str]


BROKEN_BILLERS = (
    BrokenBiller(
        "skips signature verification",
        skips_signature_verification,
        frozenset(
            {
                "ENV-3/bad-signature",
                "ENV-3/tampered-payload",
                "ENV-3/signed-payload-not-pae",
                "ENV-3/pae-wrong-length",
                "ENV-3/payload-type-swapped",
            }
        ),
    ),
    BrokenBiller("accepts a replay", accepts_replay, frozenset({"HDR-8/replayed-intent", "HDR-8/replayed-move"})),
    BrokenBiller("ignores the round limit", ignores_round_limit, frozenset({"NEG-5/round-limit"})),
    BrokenBiller("accepts a stale accept digest", accepts_stale_accept, frozenset({"NEG-9/accept-stale-digest"})),
    BrokenBiller("pays twice on a retried intent", pays_twice, frozenset({"PAY-2/same-intent-same-instructions"})),
    BrokenBiller(
        "lets one consumer read another's bills",
        reads_other_accounts,
        # Not AUZ-1/watch-other-account any more: since ENR-12 the intruder's stream reads its own (empty) log of
        # the account, and the stream's recheck (EVT-10, `EventsPhase.check_watch`) refuses it on its first
        # wake-up — defence in depth this defect no longer gets past.
        frozenset({"AUZ-1/read-other-account"}),
    ),
    BrokenBiller("loses events on resume", loses_events_on_resume, frozenset({"EVT-4/resume-from-cursor"})),
)
