"""Enrolment (PROTOCOL.md §6): bind our party to an account with the biller's out-of-band code, pin the biller."""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl

from agent.consumer.party import Party
from agent.consumer.receive import Receiver, agreed_limits
from agent.consumer.results import BillerLink
from agent.consumer.sessions import Sessions
from agent.listen import is_endpoint
from agent.logs import log_step
from agent.protocol.enrolment import ENROLMENT_CODE_ALPHABET, normalize_enrolment_code
from agent.protocol.errors import Reason
from agent.protocol.limits import DIGEST_BYTES, MAX_ID_CHARS, THREAD_ID_BYTES
from agent.protocol.messages import is_party_id
from agent.stores.base import BillerLinkRecord, ConsumerStore, LinkedAccountRecord
from agent.transport.client import BillerClient, ClientTls
from agent.transport.status import CallError
from parley.v1 import enrolment_pb2

logger = logging.getLogger("parley.consumer")

_CODE_GROUP = f"[{ENROLMENT_CODE_ALPHABET}]{{4}}"
_CODE_FORM = re.compile(f"{_CODE_GROUP}-{_CODE_GROUP}-{_CODE_GROUP}")


class Enrolment:
    """The enrolment phase: `enrol` and the links it made."""

    def __init__(self, party: Party, store: ConsumerStore, receiver: Receiver, sessions: Sessions) -> None:
        self._party = party
        self._store = store
        self._receiver = receiver
        self._sessions = sessions

    async def enrol(
        self,
        target: str,
        *,
        biller_party_id: str,
        fingerprint: bytes,
        account_id: str,
        code: str,
        tls: ClientTls | None,
        insecure: bool,
    ) -> BillerLink:
        """See `ConsumerAgent.enrol`."""
        party = self._party
        normalized = normalize_enrolment_code(code)
        if not _CODE_FORM.fullmatch(normalized):
            raise ValueError("an enrolment code is 12 characters of Crockford base32, e.g. 7KQ2-M9XD-4RTB (ENR-7)")
        if not is_party_id(biller_party_id):
            raise ValueError(f"{biller_party_id!r} is not a party id (HDR-13)")
        if len(fingerprint) != DIGEST_BYTES:
            raise ValueError(f"an identity fingerprint is {DIGEST_BYTES} bytes (64 hex characters)")
        if not 0 < len(account_id) <= MAX_ID_CHARS:
            raise ValueError(f"account_id must be 1 to {MAX_ID_CHARS} characters")
        known = await self._store.get_link(biller_party_id)
        if known is not None and known.fingerprint != fingerprint:
            raise ValueError(f"{biller_party_id!r} is already pinned to another identity fingerprint (KEY-12)")
        link = BillerLinkRecord(
            biller_party_id=biller_party_id,
            target=target,
            fingerprint=fingerprint,
            insecure=insecure,
            root_certificates=None if tls is None else tls.root_certificates,
            server_name=None if tls is None else tls.server_name,
            enrolled_at=party.now() if known is None else known.enrolled_at,
        )
        client = self._sessions.connect(target, tls, insecure)
        try:
            hello = await client.hello()
            self._receiver.check_hello(hello, link)
            request = party.sign(
                enrolment_pb2.EnrolmentRequest(
                    header=party.header(biller_party_id, secrets.token_bytes(THREAD_ID_BYTES), 0, b"", party.now()),
                    account_id=account_id,
                    code=normalized,
                    consumer_key_set=party.key_chain.versions[0].envelope,
                )
            )
            response = await client.enrol(request)
            chain = self._receiver.check_enrolment(
                response, request, link, account_id, agreed_limits(party.limits, hello.limits)
            )
            await self._store.save_enrolment(
                link,
                [envelope.SerializeToString() for envelope in chain.envelopes],
                LinkedAccountRecord(
                    biller_party_id,
                    account_id,
                    party.now(),
                    request.SerializeToString(),
                    response.confirmation.SerializeToString(),
                ),
            )
            await self._publish_rotations(client)
        except BaseException:
            await client.close()
            raise
        stored = await self._store.get_link(biller_party_id)
        assert stored is not None
        await self._sessions.install(stored, client, chain, hello)
        log_step(logger, "enrolled", biller=biller_party_id, account=account_id)
        return await self.link_view(stored)

    async def links(self) -> list[BillerLink]:
        return [await self.link_view(link) for link in await self._store.links()]

    async def link_view(self, link: BillerLinkRecord) -> BillerLink:
        accounts = tuple(account.account_id for account in await self._store.linked_accounts(link.biller_party_id))
        tls = None if link.insecure else ClientTls(link.root_certificates, link.server_name)
        return BillerLink(link.biller_party_id, link.target, link.fingerprint, link.insecure, tls, accounts)

    async def _publish_rotations(self, client: BillerClient) -> None:
        """KEY-17: a biller learns our later key set versions before it sees a key only they list.

        The enrolment is stored by then, so a failure is logged, not raised.
        """
        for envelope in self._party.key_chain.envelopes[1:]:
            try:
                await client.publish_key_set(envelope)
            except CallError as error:
                if error.reason is not Reason.KEYSET_ROLLBACK:  # ROLLBACK: the biller holds a later version
                    log_step(
                        logger,
                        "key-set-publish-failed",
                        logging.WARNING,
                        reason=error.reason.name,
                        detail=error.detail,
                    )
                    return


# --- The enrolment link (ENR-8) ----------------------------------------------------------------------------

ENROLMENT_URI_PREFIX = "parley:enrol?"
_URI_FIELDS = ("endpoint", "biller", "fingerprint", "account", "code")
_MAX_URI_CHARS = 2048


class InvalidEnrolmentLink(ValueError):
    """The text is not a usable `parley:enrol?...` URI; the message says what is wrong, in one line."""


@dataclass(frozen=True)
class EnrolmentLink:
    """The enrolment material a biller printed as a `parley:enrol?...` URI (ENR-8), e.g. as a QR code."""

    target: str
    biller_party_id: str
    fingerprint: bytes
    account_id: str
    code: str
    """Normalised (ENR-7)."""


def parse_enrolment_uri(uri: str) -> EnrolmentLink:
    """The material of `parley:enrol?endpoint=&biller=&fingerprint=&account=&code=` (ENR-8), each value
    percent-encoded. InvalidEnrolmentLink names the first problem: another scheme, a missing, repeated or
    unknown field, or a value that is not what it should be (a code is checked as ENR-7 normalises it)."""
    text = uri.strip()
    if len(text) > _MAX_URI_CHARS:
        raise InvalidEnrolmentLink(f"an enrolment link is at most {_MAX_URI_CHARS} characters")
    if not text.startswith(ENROLMENT_URI_PREFIX):
        raise InvalidEnrolmentLink(f"an enrolment link starts with {ENROLMENT_URI_PREFIX!r}")
    values: dict[str, str] = {}
    for name, value in parse_qsl(text.removeprefix(ENROLMENT_URI_PREFIX), keep_blank_values=True):
        if name not in _URI_FIELDS:
            raise InvalidEnrolmentLink(f"unknown field {name!r} (expected {', '.join(_URI_FIELDS)})")
        if name in values:
            raise InvalidEnrolmentLink(f"field {name!r} appears twice")
        values[name] = value  # parse_qsl percent-decoded it
    missing = [name for name in _URI_FIELDS if not values.get(name)]
    if missing:
        raise InvalidEnrolmentLink(f"missing field {missing[0]!r}")
    if not is_endpoint(values["endpoint"]):
        raise InvalidEnrolmentLink(f"endpoint {values['endpoint']!r} is not host:port")
    if not is_party_id(values["biller"]):
        raise InvalidEnrolmentLink(f"biller {values['biller']!r} is not a party id")
    try:
        fingerprint = bytes.fromhex(values["fingerprint"])
    except ValueError:
        fingerprint = b""
    if len(fingerprint) != DIGEST_BYTES:
        raise InvalidEnrolmentLink(f"fingerprint is not {2 * DIGEST_BYTES} hex characters")
    account = values["account"]
    if len(account) > MAX_ID_CHARS:
        raise InvalidEnrolmentLink(f"account is longer than {MAX_ID_CHARS} characters")
    code = normalize_enrolment_code(values["code"])
    if not _CODE_FORM.fullmatch(code):
        raise InvalidEnrolmentLink("code is not an enrolment code (12 characters of Crockford base32)")
    return EnrolmentLink(values["endpoint"], values["biller"], fingerprint, account, code)


__all__ = [
    "ENROLMENT_URI_PREFIX",
    "Enrolment",
    "EnrolmentLink",
    "InvalidEnrolmentLink",
    "parse_enrolment_uri",
]
