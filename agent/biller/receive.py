"""The biller's receive path (PROTOCOL.md §3.8) and the replay cache, with the one idempotent step.

Every signed request from a consumer goes: envelope form and payload type (`check_envelope`, once),
the sender resolved by keyid among enrolled parties (NOT_ENROLLED), `open_envelope` against that
party's chain, KEY-13 freshness, the signer's rate limit (LIM-8), then authorization of the account
named (AUZ-1). A mutating request then runs as an `idempotent_step`: the replay cache first (HDR-8,
HDR-12: an identical retry gets the stored answer, a different message with the same id is refused),
then the RPC's own rules; an error that a concurrent copy of the same message explains is answered
with that copy's stored answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Generic, TypeVar

from google.protobuf.message import Message

from agent.biller.party import BillerParty, stored_envelope
from agent.logs import log_step, request_ids, set_request_ids
from agent.lru import Lru
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import THREAD_ID_BYTES
from agent.protocol.messages import CheckedEnvelope, Verified, check_envelope, check_sequence, open_envelope
from agent.stores.base import AccountRecord, ReplayRecord
from parley.v1 import account_pb2, envelope_pb2, header_pb2

logger = logging.getLogger("parley.biller")

M = TypeVar("M", bound=Message)
R = TypeVar("R")

# In-process caches, bounded (agent/lru.py); what they forget is read and verified again.
_PARTY_CACHE_ENTRIES = 10_000  # consumers' verified chains and keyid -> party (a few KiB per party)
# A chain's size is the party's choice: at LIM-15's 100 versions with 256 revocations each it is about 6 MB, so
# the count alone would allow tens of GB. Typical chains (one or two versions, ~1 KiB) fill this at 10,000 parties.
_CHAIN_CACHE_BYTES = 64 * 1024 * 1024

_QUERY_TARGET = {"GetBill": "bill_id", "GetThread": "thread_id", "GetReceipt": "intent_id"}


def malformed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.MALFORMED_PAYLOAD, detail)


@dataclass(frozen=True)
class Inbound(Generic[M]):
    """A verified request and its sender's party id."""

    verified: Verified[M]
    sender: str

    @property
    def message(self) -> M:
        return self.verified.message

    @property
    def header(self) -> header_pb2.Header:
        return self.verified.header


def check_query_shape(query: account_pb2.AccountQuery, rpc: str) -> None:
    """AUZ-4: a read sets exactly the fields its RPC needs (start_sequence only for WatchEvents)."""
    target = _QUERY_TARGET.get(rpc)
    for name in ("bill_id", "thread_id", "intent_id"):
        if bool(getattr(query, name)) != (name == target):
            raise malformed(f"{rpc} needs {name} {'set' if name == target else 'empty'}")
    if target == "thread_id" and len(query.thread_id) != THREAD_ID_BYTES:
        raise malformed(f"thread_id must be {THREAD_ID_BYTES} bytes")
    if query.start_sequence and rpc != "WatchEvents":
        raise malformed(f"{rpc} needs start_sequence 0")


class ReceivePath:
    """§3.8 for requests from enrolled consumers, and what it needs: their verified chains, authorization."""

    def __init__(self, party: BillerParty) -> None:
        self.party = party
        # Verification cache, with the stored bytes of the chain's tip it was verified up to; the store is the truth.
        self._chains: Lru[str, tuple[bytes, KeyChain]] = Lru(_PARTY_CACHE_ENTRIES, max_weight=_CHAIN_CACHE_BYTES)
        # keyid -> enrolled party: a stored keyid never moves to another party (KEY-21), so a hit stays true.
        self._keyid_parties: Lru[str, str] = Lru(_PARTY_CACHE_ENTRIES)

    async def receive(self, envelope: envelope_pb2.Envelope, expected: tuple[type[M], ...]) -> Inbound[M]:
        """§3.8 steps 1-10 for a request from an enrolled consumer."""
        party = self.party
        checked = check_envelope(envelope, expected, party.limits)
        party_id = await self.party_of(checked.keyid)
        chain = await self.consumer_chain(party_id)
        now = party.clock.now()
        verified = self.open(checked, chain)
        set_request_ids(verified.header.thread_id, verified.header.message_id)
        party.rate_limiter.admit_signer(party_id, now)  # LIM-8: a verified request costs its party, whatever the key
        return Inbound(verified, party_id)

    def open(self, checked: CheckedEnvelope[M], chain: KeyChain) -> Verified[M]:
        """`open_envelope` against the sender's chain, as of now (KEY-13 freshness included)."""
        party = self.party
        return open_envelope(
            checked, sender_keys=chain, recipient=party.party_id, now=party.clock.now(), limits=party.limits
        )

    async def query(self, envelope: envelope_pb2.Envelope, rpc: str) -> account_pb2.AccountQuery:
        """A signed read: receive path, query shape (AUZ-4), authorization (AUZ-1).

        Reads have no effect, so they are neither recorded nor looked up in the
        replay cache (HDR-11): a retry is answered afresh.
        """
        query = await self.unauthorized_query(envelope, rpc)
        account = await self.party.store.get_account(query.account_id) if query.account_id else None
        self.authorize_read(account, query.header.sender)
        return query

    async def unauthorized_query(self, envelope: envelope_pb2.Envelope, rpc: str) -> account_pb2.AccountQuery:
        """`query` up to AUZ-1: for a read that brings the account together with what it reads (one store
        call), then calls `authorize_read` on it before looking at anything else it read."""
        inbound = await self.receive(envelope, (account_pb2.AccountQuery,))
        check_sequence(inbound.header, expected_sequence=0, expected_previous=b"")
        check_query_shape(inbound.message, rpc)
        return inbound.message  # header.sender is the verified signer (open_envelope)

    def authorize_read(self, account: AccountRecord | None, sender: str) -> None:
        """AUZ-1 for a signed read: the signer is bound to the account it names (read already)."""
        self.check_bound(account, sender)

    async def party_of(self, keyid: str) -> str:
        """AUZ-2: the enrolled party whose chain lists the keyid (at most one, KEY-21)."""
        party_id = self._keyid_parties.get(keyid) or await self.party.store.party_with_keyid(keyid)
        if party_id is None:
            raise RemoteProtocolError(Reason.NOT_ENROLLED, f"no enrolled party has key {keyid}")
        self._keyid_parties.put(keyid, party_id)
        return party_id

    async def consumer_chain(self, party_id: str) -> KeyChain:
        """The party's stored chain, each version verified once (LIM-15).

        Read on every request, so a version published through another replica counts at once, but only
        from the cached tip on: the tip's bytes (unchanged, or the chain is verified afresh) and the
        versions after it, which alone are verified, each against the one before.
        """
        cached = self._chains.get(party_id)
        if cached is not None:
            tip_bytes, chain = cached
            stored = await self.party.store.party_key_sets(party_id, after_version=chain.latest.version - 1)
            if stored and stored[0] == tip_bytes:
                if len(stored) > 1:  # newer versions: only they are verified (the hit is already the newest entry)
                    for data in stored[1:]:
                        chain = chain.extend(stored_envelope(data), limits=self.party.limits)
                    self.remember_chain(party_id, stored[-1], chain)
                return chain
        stored = await self.party.store.party_key_sets(party_id)
        if not stored:
            raise RemoteProtocolError(Reason.NOT_ENROLLED, f"{party_id!r} is not enrolled")
        chain = KeyChain.verify([stored_envelope(data) for data in stored], limits=self.party.limits)
        self.remember_chain(party_id, stored[-1], chain)
        return chain

    def remember_chain(self, party_id: str, tip: bytes, chain: KeyChain) -> None:
        """The party's chain grew to `chain`, whose newest version is stored as `tip`: no need to verify it again."""
        self._chains.put(party_id, (tip, chain), weight=sum(envelope.ByteSize() for envelope in chain.envelopes))

    async def check_keyids_free(self, keyids: Sequence[str], party_id: str) -> None:
        """KEY-21: no keyid of a new key set may be listed by another party's chain, the biller's own included."""
        own = {entry.key.keyid for version in self.party.key_chain.versions for entry in version.keys}
        for keyid in keyids:
            if keyid in own:
                raise RemoteProtocolError(Reason.KEYSET_INVALID, f"keyid {keyid} is another party's")
            owner = await self.party.store.party_with_keyid(keyid)
            if owner is not None and owner != party_id:
                raise RemoteProtocolError(Reason.KEYSET_INVALID, f"keyid {keyid} is another party's")

    async def authorize(
        self, sender: str, account_id: str, reason: Reason = Reason.ACCOUNT_ACCESS_DENIED
    ) -> AccountRecord:
        """AUZ-1: the signer is bound to the account (the same answer when the account does not exist)."""
        account = await self.party.store.get_account(account_id) if account_id else None
        return self.check_bound(account, sender, reason)

    @staticmethod
    def check_bound(
        account: AccountRecord | None, sender: str, reason: Reason = Reason.ACCOUNT_ACCESS_DENIED
    ) -> AccountRecord:
        """AUZ-1 on an account already read: the signer is bound to it."""
        if account is None or account.consumer_party_id != sender:
            what = "the account" if reason is Reason.ACCOUNT_ACCESS_DENIED else "it"
            raise RemoteProtocolError(reason, f"the signer is not bound to {what}")
        return account


class ReplayCache:
    """HDR-8, HDR-12, LIM-12: each sender's message ids, with the answer (or error) each one got."""

    def __init__(self, party: BillerParty) -> None:
        self.party = party

    def key(self, inbound: Inbound[M]) -> tuple[str, bytes]:
        """Where the message's entry is kept: (sender, message id). A step that reads its state in one store
        call reads the entry under this key with it (`idempotent_step(found=...)`)."""
        return inbound.sender, inbound.header.message_id

    async def lookup(self, inbound: Inbound[M]) -> bytes | None:
        """The stored answer to an identical earlier copy of this message, if any (see `answer`)."""
        return self.answer(inbound, await self.party.store.replay_lookup(*self.key(inbound)))

    def answer(self, inbound: Inbound[M], entry: ReplayRecord | None) -> bytes | None:
        """The stored answer in `entry`, the entry found under `key(inbound)`, if any.

        Raises REPLAYED_MESSAGE for a different message with the same id, and the
        stored error when the original was answered with one.
        """
        if entry is None:
            return None
        if entry.digest != inbound.verified.digest:
            raise RemoteProtocolError(Reason.REPLAYED_MESSAGE, "message id already used for another message")
        if entry.error_reason is not None:
            raise RemoteProtocolError(Reason[entry.error_reason], entry.error_detail)
        return entry.answer

    def record(
        self, inbound: Inbound[M], *, answer: bytes | None = None, error: RemoteProtocolError | None = None
    ) -> ReplayRecord:
        """What to store for this message, with its answer or error; kept until the message could no longer
        be accepted anyway (LIM-12)."""
        expire_time = inbound.header.expire_time.ToDatetime(tzinfo=UTC)
        return ReplayRecord(
            sender=inbound.sender,
            message_id=inbound.header.message_id,
            digest=inbound.verified.digest,
            expires_at=expire_time + self.party.limits.max_clock_skew,
            answer=answer,
            error_reason=None if error is None else error.reason.name,
            error_detail="" if error is None else error.detail,
        )


@dataclass(frozen=True)
class Found:
    """The replay cache's entry under `ReplayCache.key(inbound)` (None: no entry), read with the step's state."""

    entry: ReplayRecord | None


async def idempotent_step(
    party: BillerParty,
    inbound: Inbound[M],
    apply: Callable[[], Awaitable[R]],
    stored_answer: Callable[[bytes], Awaitable[R]],
    *,
    found: Found | None = None,
) -> R:
    """The one template of every mutating RPC, after its receive path and authorization.

    An identical earlier copy of the message gets its stored answer (`stored_answer` rebuilds the
    response from it); otherwise `apply` runs the RPC's rules and stores its effect together with its
    replay record. When `apply` fails with a protocol error, a copy of the same message received at the
    same time (a retry on another connection, or at another replica) may have been applied meanwhile:
    its effect is what this request ran into, so the copy's stored answer (or error) is this request's
    answer too. Otherwise the error stands. `found`: the entry was read already, with the step's state
    (one store call per step), so the first lookup does not read it again.
    """
    replays = party.replays
    answer = await replays.lookup(inbound) if found is None else replays.answer(inbound, found.entry)
    if answer is not None:
        return await stored_answer(answer)
    try:
        return await apply()
    except RemoteProtocolError:
        answer = await party.replays.lookup(inbound)
        if answer is None:
            raise
        return await stored_answer(answer)


def parsed_answer(response_type: type[M]) -> Callable[[bytes], Awaitable[M]]:
    """`stored_answer` for an RPC whose stored answer is its response as it was."""

    async def parse(answer: bytes) -> M:
        return response_type.FromString(answer)

    return parse


def log_read(rpc: str, account_id: str, **fields: object) -> None:
    """The structured log line of a signed read."""
    thread_id, message_id = request_ids()
    log_step(logger, "read", rpc=rpc, account=account_id, thread_id=thread_id, message_id=message_id, **fields)


__all__ = [
    "Found",
    "Inbound",
    "ReceivePath",
    "ReplayCache",
    "check_query_shape",
    "idempotent_step",
    "log_read",
    "malformed",
    "parsed_answer",
]
