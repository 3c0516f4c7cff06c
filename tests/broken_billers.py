"""Deliberately broken billers, one per class of defect, to show that the conformance suite catches each.

Each `BrokenBiller` is the reference biller (`reference_biller.service`, served
in-process with conformance control on 127.0.0.1) with one defect patched into
its `BillerAgent` instance — the servicer holds that very object, so the
patched methods are the ones the wire reaches. `fails` lists exactly the cases
the suite must FAIL against it (tests/test_conformance_biller.py asserts that
no other case fails).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.biller import BillerAgent
from agent.biller import agent as agent_biller
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keys import VerifyKey
from agent.protocol.keysets import KeyChain
from agent.protocol.messages import Verified, check_sequence, seal
from agent.protocol.moves import thread_message
from agent.protocol.negotiation import Accept, Negotiation, Role, State, ThreadMessage
from agent.stores.base import BillRecord, ReplayRecord, ThreadRecord
from parley.v1 import account_pb2, biller_service_pb2, envelope_pb2, payment_pb2
from reference_biller.config import load_config
from reference_biller.service import SteppableClock, serving_biller

Defect = Callable[[BillerAgent], None]


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


def _patch(agent: BillerAgent, name: str, replacement: Any) -> None:
    """Replace one method of this agent instance (the servicer calls through the same object)."""
    setattr(agent, name, replacement)


# --- 1. Skips signature verification ----------------------------------------------------------------


class _TrustingKey(VerifyKey):
    """A key that 'verifies' every signature."""

    def verify(self, signature: bytes, data: bytes) -> bool:
        return True


class _TrustingChain(KeyChain):
    """A consumer chain whose keys verify anything: the receive path never checks a signature."""

    def candidate_keys(self, keyid: str) -> tuple[VerifyKey, ...]:
        return tuple(_TrustingKey.from_bytes(key.raw) for key in super().candidate_keys(keyid))


def skips_signature_verification(agent: BillerAgent) -> None:
    consumer_chain = agent._consumer_chain

    async def trusting(party_id: str) -> KeyChain:
        return _TrustingChain((await consumer_chain(party_id)).versions)

    _patch(agent, "_consumer_chain", trusting)


# --- 2. Accepts a replay ------------------------------------------------------------------------------


def _cache_key(message_id: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(message_id + digest).digest()[:16]


def accepts_replay(agent: BillerAgent) -> None:
    """The replay cache is keyed by (message id, digest): the same id on other content looks new."""
    store, replay_record = agent._store, agent._replay_record

    async def replayed(inbound: Any) -> bytes | None:
        entry = await store.replay_lookup(
            inbound.sender, _cache_key(inbound.header.message_id, inbound.verified.digest)
        )
        if entry is None:
            return None
        if entry.error_reason is not None:
            raise RemoteProtocolError(Reason[entry.error_reason], entry.error_detail)
        return entry.answer

    def record(inbound: Any, **answer: Any) -> ReplayRecord:
        original = replay_record(inbound, **answer)
        return dataclasses.replace(original, message_id=_cache_key(original.message_id, original.digest))

    _patch(agent, "_replayed", replayed)
    _patch(agent, "_replay_record", record)


# --- 3. Ignores the round limit; 4. accepts a stale accept digest ----------------------------------------


def ignores_round_limit(agent: BillerAgent) -> None:
    replay_thread = agent._replay_thread

    def unlimited(thread: ThreadRecord, bill: BillRecord) -> Negotiation:
        negotiation = replay_thread(thread, bill)
        negotiation.max_rounds = 1_000_000
        return negotiation

    _patch(agent, "_replay_thread", unlimited)


class _StaleAcceptNegotiation(Negotiation):
    """Takes any Accept as an acceptance of the pending offer, whatever digest it names."""

    def receive(self, message: ThreadMessage, now: Any) -> State:
        if isinstance(message.move, Accept) and self.pending is not None:
            message = dataclasses.replace(message, move=Accept(self.pending.digest))
        return super().receive(message, now)


def accepts_stale_accept(agent: BillerAgent) -> None:
    def replay_thread(thread: ThreadRecord, bill: BillRecord) -> Negotiation:
        negotiation = _StaleAcceptNegotiation(
            bill=agent_biller._bill_facts(bill),
            bill_digest=bill.digest,
            role=Role.BILLER,
            limits=agent.limits,
            hardship_disclosed=thread.hardship_disclosed,
        )
        for record in thread.messages:
            envelope = envelope_pb2.Envelope.FromString(record.envelope)
            payload = agent_biller._stored_payload(envelope)
            verified = Verified(payload, envelope, record.digest, envelope.signatures[0].keyid)
            if record.sender == agent.party_id:
                negotiation.send(thread_message(verified, Role.BILLER), record.received_at)
            else:
                with suppress(RemoteProtocolError):
                    negotiation.receive(thread_message(verified, Role.CONSUMER), record.received_at)
        return negotiation

    _patch(agent, "_replay_thread", replay_thread)


# --- 5. Pays twice on a retried intent ------------------------------------------------------------------


def pays_twice(agent: BillerAgent) -> None:
    """A later message with a known intent_id is instructed as a new payment instead of getting the first answer."""

    async def same_intent(
        inbound: Any, existing: Any, content_hash: bytes
    ) -> biller_service_pb2.CreatePaymentIntentResponse:
        intent: payment_pb2.PaymentIntent = inbound.message
        if existing.content_hash != content_hash:  # the conflict check is kept: only the retry is broken
            raise RemoteProtocolError(Reason.IDEMPOTENCY_CONFLICT, "the intent id was used with other content")
        now = agent.clock.now()
        instructions = payment_pb2.PaymentInstructions.FromString(
            envelope_pb2.Envelope.FromString(existing.instructions).payload
        )
        instructions.header.CopyFrom(
            agent._header(inbound.sender, inbound.header.thread_id, 1, inbound.verified.digest, now)
        )
        instructions.payment_reference = f"{instructions.payment_reference}-AGAIN-{intent.header.message_id.hex()[:6]}"
        return biller_service_pb2.CreatePaymentIntentResponse(instructions=seal(instructions, agent._key))

    _patch(agent, "_same_intent", same_intent)


# --- 6. Lets one consumer read another's bills -------------------------------------------------------------


def reads_other_accounts(agent: BillerAgent) -> None:
    """Signed reads skip the account binding check (AUZ-1): any enrolled party reads any account."""

    async def query(envelope: envelope_pb2.Envelope, rpc: str) -> account_pb2.AccountQuery:
        inbound = await agent._receive(envelope, (account_pb2.AccountQuery,))
        check_sequence(inbound.header, expected_sequence=0, expected_previous=b"")
        agent_biller._check_query_shape(inbound.message, rpc)
        return inbound.message

    _patch(agent, "_query", query)


# --- 7. Loses events on resume ------------------------------------------------------------------------------


def loses_events_on_resume(agent: BillerAgent) -> None:
    """A resumed watch starts one past its cursor (an off-by-one in the resume path)."""
    follow = agent._follow

    def lossy(account_id: str, cursor: int) -> AsyncIterator[envelope_pb2.Envelope]:
        return follow(account_id, cursor + 1 if cursor else cursor)

    _patch(agent, "_follow", lossy)


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
        frozenset({"AUZ-1/read-other-account", "AUZ-1/watch-other-account"}),
    ),
    BrokenBiller("loses events on resume", loses_events_on_resume, frozenset({"EVT-4/resume-from-cursor"})),
)
