"""Who we are and who we talk to: our party (identity, key, clock) and one biller session in memory."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from google.protobuf.message import Message

from agent.clock import Clock
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import THREAD_ID_BYTES, Limits
from agent.protocol.messages import new_header, seal
from agent.stores.base import BillerLinkRecord
from agent.transport.client import BillerClient
from parley.v1 import account_pb2, biller_service_pb2, envelope_pb2, header_pb2


@dataclass(frozen=True)
class Party:
    """The consumer party the agent acts for: its id, signing key and key set chain, and the clock,
    limits and message lifetime (HDR-14) everything it signs is made with."""

    party_id: str
    key: SigningKey
    key_chain: KeyChain
    clock: Clock
    limits: Limits
    lifetime: timedelta

    def now(self) -> datetime:
        return self.clock.now()

    def header(
        self, recipient: str, thread_id: bytes, sequence: int, previous_digest: bytes, now: datetime
    ) -> header_pb2.Header:
        return new_header(
            sender=self.party_id,
            recipient=recipient,
            thread_id=thread_id,
            sequence=sequence,
            previous_digest=previous_digest,
            now=now,
            lifetime=self.lifetime,
        )

    def sign(self, message: Message) -> envelope_pb2.Envelope:
        return seal(message, self.key)

    def query(
        self,
        biller: str,
        account_id: str,
        *,
        bill_id: str = "",
        thread_id: bytes = b"",
        intent_id: str = "",
        start_sequence: int = 0,
    ) -> envelope_pb2.Envelope:
        """A signed read (§6.3): a one-message thread with exactly the fields its RPC needs (AUZ-4)."""
        query = account_pb2.AccountQuery(
            header=self.header(biller, secrets.token_bytes(THREAD_ID_BYTES), 0, b"", self.now()),
            account_id=account_id,
            bill_id=bill_id,
            thread_id=thread_id,
            intent_id=intent_id,
            start_sequence=start_sequence,
        )
        return self.sign(query)


@dataclass
class BillerSession:
    """One biller link in memory: its channel, its verified chain and what Hello said (mutable: the chain
    grows when the biller rotates its key, the limits are lowered to what Hello announces)."""

    link: BillerLinkRecord
    client: BillerClient
    chain: KeyChain
    limits: Limits
    hello: biller_service_pb2.HelloResponse | None = None
    refreshed_at: datetime | None = None

    @property
    def biller(self) -> str:
        return self.link.biller_party_id


__all__ = ["BillerSession", "Party"]
