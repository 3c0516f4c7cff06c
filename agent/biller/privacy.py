"""Privacy (PROTOCOL.md §11, PRV-4): a consumer's request to erase the disclosures held for its account."""

from __future__ import annotations

import logging

from agent.biller.party import BillerParty
from agent.biller.receive import Inbound, idempotent_step, parsed_answer
from agent.logs import log_step
from agent.protocol.messages import check_sequence
from agent.stores.base import ReplayRecord
from parley.v1 import account_pb2, biller_service_pb2, envelope_pb2

logger = logging.getLogger("parley.biller")


class PrivacyPhase:
    def __init__(self, party: BillerParty) -> None:
        self.party = party

    async def request_erasure(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.RequestErasureResponse:
        """PRV-4: erase every disclosure held for the account; the signed messages stay."""
        party = self.party
        inbound = await party.receive.receive(envelope, (account_pb2.ErasureRequest,))
        await party.receive.authorize(inbound.sender, inbound.message.account_id)
        return await idempotent_step(
            party, inbound, lambda: self._erase(inbound), parsed_answer(biller_service_pb2.RequestErasureResponse)
        )

    async def _erase(self, inbound: Inbound[account_pb2.ErasureRequest]) -> biller_service_pb2.RequestErasureResponse:
        party = self.party
        account_id = inbound.message.account_id
        check_sequence(inbound.header, expected_sequence=0, expected_previous=b"")
        now = party.clock.now()
        responses: list[biller_service_pb2.RequestErasureResponse] = []

        def confirm(count: int) -> ReplayRecord:
            """The signed confirmation of `count` erasures, built inside the store's transaction."""
            confirmation = account_pb2.ErasureConfirmation(
                header=party.header(inbound.sender, inbound.header.thread_id, 1, inbound.verified.digest, now),
                account_id=account_id,
                erased_count=count,
            )
            response = biller_service_pb2.RequestErasureResponse(confirmation=party.seal(confirmation))
            responses.append(response)
            return party.replays.record(inbound, answer=response.SerializeToString())

        count = await party.store.erase_disclosures(account_id, confirm)
        log_step(
            logger,
            "erasure",
            account=account_id,
            erased=count,
            thread_id=inbound.header.thread_id,
            message_id=inbound.header.message_id,
        )
        return responses[-1]


__all__ = ["PrivacyPhase"]
