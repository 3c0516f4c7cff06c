"""Key sets: serving the biller's own chain (KEY-20) and extending a consumer's with its next version (KEY-19)."""

from __future__ import annotations

import logging

from agent.biller.party import BillerParty
from agent.logs import log_step
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.messages import check_envelope
from agent.stores.base import KeySetRecord, StoreConflict
from parley.v1 import biller_service_pb2, envelope_pb2, keys_pb2

logger = logging.getLogger("parley.biller")


class KeySetsPhase:
    def __init__(self, party: BillerParty) -> None:
        self.party = party

    def get_key_sets(self, request: biller_service_pb2.GetKeySetsRequest) -> biller_service_pb2.GetKeySetsResponse:
        """KEY-20: our own chain above `after_version`; consumers' chains are not served (NOT_FOUND)."""
        party = self.party
        if request.party_id not in ("", party.party_id):
            raise RemoteProtocolError(Reason.NOT_FOUND, "this biller serves only its own key set chain")
        versions = [v.envelope for v in party.key_chain.versions if v.version > request.after_version]
        return biller_service_pb2.GetKeySetsResponse(key_sets=versions)

    async def publish_key_set(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.PublishKeySetResponse:
        """KEY-19: extend the publishing consumer's chain with its next version."""
        party, receive = self.party, self.party.receive
        now = party.clock.now()
        checked = check_envelope(envelope, (keys_pb2.KeySet,), party.limits)
        party_id = await receive.party_of(checked.keyid)
        chain = await receive.consumer_chain(party_id)
        if digest(envelope) == chain.latest.digest:  # a retry of the version just stored (HDR-12)
            party.rate_limiter.admit_signer(party_id, now)
            return biller_service_pb2.PublishKeySetResponse(version=chain.latest.version)
        extended = chain.extend(envelope, now=now, limits=party.limits)  # verifies only the new version
        party.rate_limiter.admit_signer(party_id, now)
        keyids = tuple(entry.key.keyid for entry in extended.latest.keys)
        await receive.check_keyids_free(keyids, party_id)
        party.rate_limiter.check_publish(party_id, now)  # LIM-15; charged below, once the version is stored
        response = biller_service_pb2.PublishKeySetResponse(version=extended.latest.version)
        stored = envelope.SerializeToString()
        try:
            await party.store.append_key_set(KeySetRecord(party_id, extended.latest.version, stored, keyids))
        except StoreConflict:  # HDR-12: a copy of this version, published at the same time, was stored first
            if digest(envelope) != (await receive.consumer_chain(party_id)).latest.digest:
                raise
            return response
        party.rate_limiter.count_publish(party_id, now)
        receive.remember_chain(party_id, stored, extended)
        party.wakeups.notify_party(party_id)  # EVT-10: its open streams check their key against the new version
        log_step(logger, "key-set-published", party=party_id, version=extended.latest.version)
        return response


__all__ = ["KeySetsPhase"]
