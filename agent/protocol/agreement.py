"""Agreements and their offline verification (PROTOCOL.md §17, BND-*).

An agreement is the accepted offer plus the acceptance, each signed by its
party. A bundle (`parley-bundle/1`) carries everything needed to check one with
no network and no clock: both parties' key set chains, the signed bill and the
whole negotiation thread. Verification replays the thread through the same
negotiation core the agents use, with each message judged at its own signed
create_time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.protocol.dsse import check_envelope_form, digest, envelope_from_json, envelope_to_json
from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import DEFAULT_LIMITS, MAX_KEYSET_VERSIONS
from agent.protocol.messages import Verified, check_sequence, open_envelope
from agent.protocol.moves import NEGOTIATION_TYPES, NegotiationPayload, thread_message
from agent.protocol.negotiation import Negotiation, Open, Role, State
from agent.protocol.terms import BillFacts, Terms
from parley.v1 import bill_pb2, envelope_pb2, negotiation_pb2

BUNDLE_FORMAT = "parley-bundle/1"

# The most envelopes a bundle can hold: two chains of at most MAX_KEYSET_VERSIONS (LIM-15), the bill, and a
# thread of the opening, at most max_rounds offers and the acceptance (NEG-5): 213 with the defaults.
MAX_BUNDLE_ENVELOPES = 2 * MAX_KEYSET_VERSIONS + 1 + DEFAULT_LIMITS.max_rounds + 2
# The most bytes `Bundle.load` reads: each envelope at most max_envelope_bytes (LIM-1) on the wire, and at most
# twice that in JSON (base64 is 4/3 of the bytes, plus the member names and any indentation), so about 28 MB,
# far above any real bundle (the demo's are a few kB). A larger file is refused unread, not parsed until
# memory runs out (`parley verify /dev/zero`).
MAX_BUNDLE_BYTES = 2 * DEFAULT_LIMITS.max_envelope_bytes * MAX_BUNDLE_ENVELOPES


class UnusableBundleError(ValueError):
    """The input is not a parley-bundle/1 document at all (exit code 2, not 1)."""


@dataclass(frozen=True)
class Bundle:
    """The parties' key set chains, the bill and the negotiation thread, as envelopes."""

    key_sets: Mapping[str, Sequence[envelope_pb2.Envelope]]
    bill: envelope_pb2.Envelope
    thread: Sequence[envelope_pb2.Envelope]

    def to_json(self) -> dict[str, object]:
        return {
            "format": BUNDLE_FORMAT,
            "keySets": {party: [envelope_to_json(e) for e in chain] for party, chain in self.key_sets.items()},
            "bill": envelope_to_json(self.bill),
            "thread": [envelope_to_json(e) for e in self.thread],
        }

    @classmethod
    def from_json(cls, document: object) -> Bundle:
        """Parse the JSON form; UnusableBundleError if it is not a bundle at all (BND-6).

        RemoteProtocolError(MALFORMED_ENVELOPE) if one of its envelopes is not DSSE JSON (BND-9).
        """
        if not isinstance(document, dict) or document.get("format") != BUNDLE_FORMAT:
            raise UnusableBundleError(f'not a {BUNDLE_FORMAT} document (missing "format": "{BUNDLE_FORMAT}")')
        key_sets, bill, thread = document.get("keySets"), document.get("bill"), document.get("thread")
        if not isinstance(key_sets, dict) or not isinstance(thread, list) or bill is None:
            raise UnusableBundleError('a bundle needs "keySets" (object), "bill" and "thread" (array)')
        if not all(isinstance(chain, list) for chain in key_sets.values()):
            raise UnusableBundleError('each "keySets" entry must be an array of envelopes')
        if len(key_sets) != 2:
            raise UnusableBundleError("a bundle carries the key sets of exactly two parties")
        # BND-9: a bundle that has its members is a bundle; an envelope in it that is not DSSE JSON
        # (ENV-12) makes it invalid with MALFORMED_ENVELOPE, decoded in document order.
        return cls(
            key_sets={str(party): [envelope_from_json(e) for e in chain] for party, chain in key_sets.items()},
            bill=envelope_from_json(bill),
            thread=[envelope_from_json(e) for e in thread],
        )

    @classmethod
    def load(cls, path: Path) -> Bundle:
        """The bundle in the file at `path`; UnusableBundleError if it cannot be read, is larger than
        MAX_BUNDLE_BYTES (read no further), is not UTF-8 JSON, or is not a bundle (BND-6)."""
        try:
            with path.open("rb") as file:
                data = file.read(MAX_BUNDLE_BYTES + 1)
        except OSError as error:
            raise UnusableBundleError(f"cannot read {path}: {error.strerror or error}") from error
        if len(data) > MAX_BUNDLE_BYTES:
            raise UnusableBundleError(
                f"{path} is larger than {MAX_BUNDLE_BYTES:,} bytes, far more than any bundle holds: not a bundle"
            )
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UnusableBundleError(f"cannot read {path}: {error}") from error
        except RecursionError:  # the parser recurses once per level: no bundle nests more than a few levels
            raise UnusableBundleError(f"cannot read {path}: its JSON is nested too deeply to be a bundle") from None
        return cls.from_json(document)


@dataclass(frozen=True)
class Agreement:
    """A verified agreement: who agreed what on which bill, and the signed evidence."""

    biller: KeyChain
    consumer: KeyChain
    bill: BillFacts
    terms: Terms
    offer: Verified[NegotiationPayload]
    accept: Verified[NegotiationPayload]
    thread: Sequence[Verified[NegotiationPayload]] = field(repr=False)

    @property
    def offered_by(self) -> Role:
        return Role.at(self.offer.header.sequence)


def _biller_chain(bill: envelope_pb2.Envelope, chains: Sequence[KeyChain]) -> KeyChain:
    """The chain whose keys the bill's keyid names; only that chain is then used to verify it (KEY-6)."""
    keyid = check_envelope_form(bill, DEFAULT_LIMITS).keyid
    owners = [chain for chain in chains if chain.candidate_keys(keyid)]
    if len(owners) != 1:
        raise RemoteProtocolError(Reason.UNKNOWN_KEY, "the bill is not signed by a key of either party")
    return owners[0]


def verify_bundle(bundle: Bundle, *, pins: Mapping[str, bytes] | None = None) -> Agreement:
    """Verify a bundle offline (BND-1..BND-6); RemoteProtocolError with the reason if it is invalid."""
    pins = pins or {}
    if len(bundle.key_sets) != 2:
        raise UnusableBundleError("a bundle carries the key sets of exactly two parties")
    unknown_pins = set(pins) - set(bundle.key_sets)
    if unknown_pins:
        raise RemoteProtocolError(Reason.PIN_MISMATCH, f"no key set for pinned party {sorted(unknown_pins)}")
    chains = [KeyChain.verify(list(chain), pin=pins.get(party)) for party, chain in bundle.key_sets.items()]
    for party, chain in zip(bundle.key_sets, chains, strict=True):
        if chain.party_id != party:
            raise RemoteProtocolError(Reason.KEYSET_INVALID, f"key set listed for {party!r} is {chain.party_id!r}'s")
    biller = _biller_chain(bundle.bill, chains)
    consumer = next(chain for chain in chains if chain is not biller)
    bill = open_envelope(bundle.bill, (bill_pb2.Bill,), sender_keys=biller, recipient=consumer.party_id, now=None)
    # BIL-6: a bill is a one-message thread, so its position is checked before its body.
    check_sequence(bill.header, expected_sequence=0, expected_previous=b"")
    try:
        facts = BillFacts.from_proto(bill.message)
    except LocalProtocolError as error:
        raise error.as_remote() from error

    negotiation = Negotiation(bill=facts, bill_digest=digest(bundle.bill))
    keys = {Role.CONSUMER: consumer, Role.BILLER: biller}
    verified: list[Verified[NegotiationPayload]] = []
    for sequence, envelope in enumerate(bundle.thread):
        # Position decides the sender: the consumer at even sequences, the biller at odd (NEG-7).
        role = Role.at(sequence)
        message = open_envelope(
            envelope, NEGOTIATION_TYPES, sender_keys=keys[role], recipient=keys[role.other].party_id, now=None
        )
        if verified and message.header.thread_id != verified[0].header.thread_id:
            raise RemoteProtocolError(Reason.MALFORMED_HEADER, f"message {sequence} belongs to another thread")
        if isinstance(message.message, negotiation_pb2.ThreadOpen) and message.message.bill_id != facts.bill_id:
            raise RemoteProtocolError(Reason.BILL_DIGEST_MISMATCH, "the opening names another bill")
        core_message = thread_message(message, role)
        if sequence == 0 and isinstance(core_message.move, Open):
            # TRM-11 offline (BND-5): what was received for the bill is not in the bundle; the balance the
            # thread restates is its opening's principal, when that is a balance of the bill (0 < it <= due).
            negotiation = Negotiation(
                bill=facts.restated_by(core_message.move.terms.principal), bill_digest=digest(bundle.bill)
            )
        negotiation.receive(core_message, core_message.create_time)
        verified.append(message)
    if negotiation.state is not State.AGREED:
        raise RemoteProtocolError(Reason.NOT_AGREED, f"the thread ends {negotiation.state.value}, not agreed")
    agreement, terms = negotiation.agreement, negotiation.agreed_terms
    assert agreement is not None
    assert terms is not None
    by_digest = {message.digest: message for message in verified}
    offer, accept = (by_digest[message.digest] for message in agreement)
    return Agreement(biller, consumer, facts, terms, offer, accept, verified)
