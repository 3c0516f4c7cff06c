"""The biller links in memory: one channel and verified chain per biller, restored from the store on demand.

A session is opened with Hello first (VER-2), checked against the pinned identity (VER-4), and keeps
to the biller's announced limits (LIM-10). There is one session per enrolled biller, so the table is
bounded by the links in the store.
"""

from __future__ import annotations

import dataclasses

from agent.consumer.locks import KeyedLocks
from agent.consumer.party import BillerSession, Party
from agent.consumer.receive import Receiver, agreed_limits, envelope_of
from agent.protocol.keysets import KeyChain
from agent.stores.base import BillerLinkRecord, ConsumerStore
from agent.transport.client import BillerClient, ClientTls, RetryPolicy
from parley.v1 import biller_service_pb2


class Sessions:
    """`get(biller)` gives the biller's session; `close()` ends every channel."""

    def __init__(
        self,
        party: Party,
        store: ConsumerStore,
        receiver: Receiver,
        locks: KeyedLocks,
        *,
        retry: RetryPolicy,
        client_certificate: tuple[bytes, bytes] | None,
    ) -> None:
        self._party = party
        self._store = store
        self._receiver = receiver
        self._locks = locks
        self._retry = retry
        self._client_certificate = client_certificate
        self._sessions: dict[str, BillerSession] = {}

    def connect(self, target: str, tls: ClientTls | None, insecure: bool) -> BillerClient:
        """A channel to a biller, presenting our client certificate where TLS is on (TRN-9)."""
        return BillerClient.connect(
            target, tls=self._with_certificate(tls, insecure), insecure=insecure, retry=self._retry
        )

    def _with_certificate(self, tls: ClientTls | None, insecure: bool) -> ClientTls | None:
        """The channel's TLS settings with our client certificate, unless they carry one or the channel is plaintext."""
        if insecure or self._client_certificate is None or (tls is not None and tls.certificate_chain is not None):
            return tls
        chain, key = self._client_certificate
        base = tls or ClientTls()
        return dataclasses.replace(base, certificate_chain=chain, private_key=key)

    async def get(self, biller: str) -> BillerSession:
        """The biller's link in memory: restored from the store (chain re-verified against the pin)."""
        async with self._locks.hold(("session", biller)):
            session = self._sessions.get(biller)
            if session is not None:
                return session
            link = await self._store.get_link(biller)
            if link is None:
                raise LookupError(f"not enrolled with {biller!r}")
            envelopes = [envelope_of(data) for data in await self._store.link_key_sets(biller)]
            chain = KeyChain.verify(envelopes, pin=link.fingerprint, limits=self._party.limits)
            tls = None if link.insecure else ClientTls(link.root_certificates, link.server_name)
            client = self.connect(link.target, tls, link.insecure)
            session = BillerSession(link, client, chain, self._party.limits)
            try:
                await self.hello(session)  # VER-2: Hello first on a new channel
            except BaseException:
                await client.close()
                raise
            self._sessions[biller] = session
            return session

    async def install(
        self, link: BillerLinkRecord, client: BillerClient, chain: KeyChain, hello: biller_service_pb2.HelloResponse
    ) -> None:
        """The session of a biller just enrolled with, replacing any earlier one."""
        previous = self._sessions.pop(link.biller_party_id, None)
        if previous is not None:
            await previous.client.close()
        limits = agreed_limits(self._party.limits, hello.limits)
        self._sessions[link.biller_party_id] = BillerSession(link, client, chain, limits, hello)

    async def hello(self, session: BillerSession) -> biller_service_pb2.HelloResponse:
        """The biller's Hello, checked against the pin (VER-4), and the limits we then keep to (LIM-10)."""
        if session.hello is None:
            hello = await session.client.hello()
            self._receiver.check_hello(hello, session.link)
            session.hello = hello
            session.limits = agreed_limits(self._party.limits, hello.limits)
        return session.hello

    async def require(self, session: BillerSession, feature: str) -> None:
        """VER-3: use only what the biller announced."""
        if feature not in (await self.hello(session)).features:
            raise ValueError(f"{session.biller!r} does not offer {feature!r} (VER-3)")

    async def accounts(self, biller: str, account_id: str | None, *, one: bool = False) -> list[str]:
        """Our enrolled accounts with the biller (or the one named); LookupError for none."""
        accounts = [account.account_id for account in await self._store.linked_accounts(biller)]
        if account_id is not None:
            if account_id not in accounts:
                raise LookupError(f"account {account_id!r} is not enrolled with {biller!r}")
            return [account_id]
        if not accounts:
            raise LookupError(f"not enrolled with {biller!r}")
        if one and len(accounts) > 1:
            raise ValueError(f"several accounts are enrolled with {biller!r}: name one")
        return accounts

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.client.close()


__all__ = ["Sessions"]
