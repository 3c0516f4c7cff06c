"""Enrolment (PROTOCOL.md §6): one-time codes for account holders, and binding a consumer's key set to an account."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timedelta

from agent.biller.party import BillerParty, stored_envelope
from agent.biller.receive import Inbound, idempotent_step, parsed_answer
from agent.logs import log_step, set_request_ids
from agent.protocol.dsse import digest
from agent.protocol.enrolment import (
    ENROLMENT_CODE_ALPHABET,
    ENROLMENT_CODE_VALIDITY,
    SECRET_BYTES,
    code_hmac,
    code_matches,
    normalize_enrolment_code,
)
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keysets import KeyChain
from agent.protocol.messages import check_envelope, check_sequence, parse_payload
from agent.stores.base import Enrolment, EnrolmentAttemptOutcome, EnrolmentCodeRecord, KeySetRecord
from parley.v1 import biller_service_pb2, enrolment_pb2, envelope_pb2

logger = logging.getLogger("parley.biller")

_CODE_CHARACTERS = 12  # 60 bits of Crockford base32, shown as three groups of four (ENR-7)


class EnrolmentPhase:
    def __init__(self, party: BillerParty, secret: bytes | None = None) -> None:
        """`secret` is the biller's HMAC key for codes (ENR-8), kept outside the database (see
        `agent.stores.files.load_or_create_secret`). Without one, a random key lives as long as this
        object: codes it issues verify only in this process (fine for tests, not for a service)."""
        self.party = party
        if secret is None:
            secret = secrets.token_bytes(SECRET_BYTES)
            # Said in words: an embedder without logging configured sees only this line on stderr.
            logger.warning(
                "enrolment-secret-ephemeral: no enrolment secret was given, so enrolment codes issued now "
                "verify only in this process (pass enrolment_secret; see agent.stores.files.load_or_create_secret)"
            )
        if len(secret) < SECRET_BYTES:
            raise ValueError(f"the enrolment secret must be at least {SECRET_BYTES} bytes")
        self._secret = secret

    async def issue_code(self, account_id: str, valid_for: timedelta = ENROLMENT_CODE_VALIDITY) -> str:
        """A fresh one-time code for the account holder (see `BillerAgent.issue_enrolment_code`)."""
        party = self.party
        if await party.store.get_account(account_id) is None:
            raise LookupError(f"no account {account_id!r}")
        code = normalize_enrolment_code(
            "".join(secrets.choice(ENROLMENT_CODE_ALPHABET) for _ in range(_CODE_CHARACTERS))
        )
        now = party.clock.now()
        record = EnrolmentCodeRecord(account_id, b"", code_hmac(self._secret, code), now + valid_for, used=False)
        await party.store.add_enrolment_code(record, now)
        log_step(logger, "enrolment-code-issued", account=account_id)  # the code itself: never logged
        return code

    async def enrol(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.EnrolResponse:
        """Bind the consumer's key set to an account with a one-time code, in the order of ENR-1."""
        party, receive = self.party, self.party.receive
        now = party.clock.now()
        # (1)-(2) The request carries the key that verifies it: parse only to take that key set.
        checked = check_envelope(envelope, (enrolment_pb2.EnrolmentRequest,), party.limits)
        unverified = parse_payload(enrolment_pb2.EnrolmentRequest, envelope.payload)
        if not unverified.HasField("consumer_key_set"):
            raise RemoteProtocolError(Reason.KEYSET_INVALID, "the request carries no consumer_key_set")
        # (3) The carried version 1 as a chain, and KEY-21.
        carried = KeyChain.verify([unverified.consumer_key_set], now=now, limits=party.limits)
        party_id = carried.party_id
        await receive.check_keyids_free(tuple(entry.key.keyid for entry in carried.latest.keys), party_id)
        # (4) The party's stored chain if it is the same chain (it may have rotated since).
        stored = await party.store.party_key_sets(party_id)
        same_chain = bool(stored) and digest(stored_envelope(stored[0])) == carried.fingerprint
        chain = await receive.consumer_chain(party_id) if same_chain else carried
        # (5) The receive path against that chain.
        verified = receive.open(checked, chain)
        party.rate_limiter.admit_signer(verified.keyid, now, authenticates=False)  # anyone can make a key set
        inbound = Inbound(verified, party_id)
        set_request_ids(inbound.header.thread_id, inbound.header.message_id)

        async def apply() -> biller_service_pb2.EnrolResponse:
            request = inbound.message
            check_sequence(inbound.header, expected_sequence=0, expected_previous=b"")
            # (7) The code checks, and (8) the party id.
            matched_hash = await self.check_code(request.account_id, request.code, now)
            if party_id == party.party_id or (stored and not same_chain):
                raise RemoteProtocolError(Reason.PARTY_ID_TAKEN, f"party id {party_id!r} is taken")
            confirmation = enrolment_pb2.EnrolmentConfirmation(
                header=party.header(party_id, inbound.header.thread_id, 1, verified.digest, now),
                account_id=request.account_id,
                consumer_party_id=party_id,
            )
            response = biller_service_pb2.EnrolResponse(
                confirmation=party.seal(confirmation), biller_key_sets=party.key_chain.envelopes
            )
            key_set = KeySetRecord(
                party_id,
                1,
                unverified.consumer_key_set.SerializeToString(),
                tuple(e.key.keyid for e in carried.latest.keys),
            )
            enrolment = Enrolment(
                request.account_id,
                matched_hash,
                party_id,
                carried.fingerprint,
                key_set,
                now,
                party.replays.record(inbound, answer=response.SerializeToString()),
                present=party.bills.presenter(party_id, now),  # ENR-12: the unpaid bills, signed to it
            )
            party.wakeups.notify(await party.store.enrol(enrolment))
            party.metrics.enrolments.inc()
            log_step(
                logger,
                "enrolled",
                account=request.account_id,
                party=party_id,
                thread_id=inbound.header.thread_id,
                message_id=inbound.header.message_id,
            )
            return response

        # (6) Replay: a retry of the request that spent the code gets its confirmation (ENR-2).
        return await idempotent_step(party, inbound, apply, parsed_answer(biller_service_pb2.EnrolResponse))

    async def check_code(self, account_id: str, code: str, now: datetime) -> bytes:
        """ENR-3, ENR-5, ENR-2, ENR-4 in the order of ENR-1 step 7; returns the matching code's hash.

        A wrong account and a wrong code cannot be told apart (ENR-3): the same reason and message, the
        same work (one HMAC, one write transaction), and an account id that does not exist is counted and
        locked like one that does. The lock check, the count and the comparison are one store transaction,
        counted first, so concurrent wrong codes are never compared beyond the limit (ENR-5).
        """
        presented = code_hmac(self._secret, code)

        def matches(record: EnrolmentCodeRecord) -> bool:
            return code_matches(code, salt=record.salt, stored_hash=record.code_hash, presented_hmac=presented)

        attempt = await self.party.store.attempt_enrolment_code(
            account_id, matches, self.party.limits.enrolment_max_attempts, now
        )
        if attempt.outcome is EnrolmentAttemptOutcome.LOCKED:
            raise RemoteProtocolError(Reason.ENROLMENT_LOCKED, "too many wrong codes; ask the biller for a new one")
        match = attempt.match
        if match is None:
            log_step(logger, "enrolment-code-mismatch", logging.WARNING, account=account_id)  # never the code
            raise RemoteProtocolError(Reason.ENROLMENT_CODE_INVALID, "wrong account or code")
        if match.used:
            raise RemoteProtocolError(Reason.ENROLMENT_CODE_USED, "the code was already used")
        if now >= match.expires_at:
            raise RemoteProtocolError(Reason.ENROLMENT_CODE_EXPIRED, "the code has expired")
        return match.code_hash


__all__ = ["EnrolmentPhase"]
