"""Parley's one error hierarchy and its table of reasons (PROTOCOL.md §13).

Every failure carries a `Reason`: the UPPER_SNAKE string sent on the wire in
`google.rpc.ErrorInfo.reason` (domain "parley.v1"), the gRPC status code it maps
to, and the id of the requirement that names it. As in h11, errors split by
whose fault they are:

- `RemoteProtocolError`: something we *received* breaks the protocol.
- `LocalProtocolError`: something we *tried to send* would break it.

The core raises these; the transports translate them. The table below is the
only place a reason's code and meaning are written down in code; the spec's
table is checked against it by the test suite.
"""

from __future__ import annotations

import enum

ERROR_DOMAIN = "parley.v1"


class Reason(enum.Enum):
    """Why a message or request was refused: (gRPC code, requirement id, meaning)."""

    # Envelopes and signatures (§3)
    MALFORMED_ENVELOPE = (
        "INVALID_ARGUMENT",
        "ENV-1",
        "The envelope is not a well-formed DSSE envelope with exactly one signature.",
    )
    ENVELOPE_TOO_LARGE = ("RESOURCE_EXHAUSTED", "LIM-1", "The serialized envelope exceeds max_envelope_bytes.")
    WRONG_PAYLOAD_TYPE = ("INVALID_ARGUMENT", "ENV-5", "The payloadType is not one this call or position accepts.")
    UNKNOWN_KEY = ("UNAUTHENTICATED", "KEY-6", "No key with that keyid in the expected sender's trusted key set.")
    KEY_REVOKED = ("UNAUTHENTICATED", "KEY-11", "The signing key was revoked before the message was created.")
    KEY_NOT_VALID = ("UNAUTHENTICATED", "KEY-10", "The message was created outside the signing key's validity window.")
    BAD_SIGNATURE = ("UNAUTHENTICATED", "ENV-3", "The signature does not verify over the PAE of the received bytes.")
    MALFORMED_PAYLOAD = ("INVALID_ARGUMENT", "ENV-6", "The verified payload does not parse as its payloadType.")
    UNKNOWN_FIELD = ("INVALID_ARGUMENT", "ENV-7", "The signed payload carries a field this version does not define.")
    # Header (§5)
    UNSUPPORTED_VERSION = (
        "FAILED_PRECONDITION",
        "HDR-1",
        "The header's protocol_version is not one the receiver speaks.",
    )
    MALFORMED_HEADER = ("INVALID_ARGUMENT", "HDR-2", "A header field is missing or has the wrong length or form.")
    WRONG_SENDER = ("PERMISSION_DENIED", "HDR-3", "The header's sender is not the party whose key signed.")
    WRONG_RECIPIENT = ("PERMISSION_DENIED", "HDR-4", "The header's recipient is not the receiver.")
    MESSAGE_NOT_YET_VALID = (
        "FAILED_PRECONDITION",
        "HDR-5",
        "The message was created in the future beyond the clock skew.",
    )
    MESSAGE_EXPIRED = ("FAILED_PRECONDITION", "HDR-5", "The message's expire_time has passed, beyond the clock skew.")
    LIFETIME_TOO_LONG = ("INVALID_ARGUMENT", "HDR-5", "expire_time - create_time is not positive or exceeds the limit.")
    SEQUENCE_MISMATCH = ("ABORTED", "HDR-6", "The sequence number is not the next one in the thread.")
    PREVIOUS_DIGEST_MISMATCH = ("ABORTED", "HDR-7", "previous_digest is not the digest of the thread's last message.")
    REPLAYED_MESSAGE = ("ALREADY_EXISTS", "HDR-8", "A different message with this message id was already received.")
    # Key sets (§4)
    KEYSET_INVALID = (
        "INVALID_ARGUMENT",
        "KEY-7",
        "The key set is malformed: no keys, duplicate or wrong keyid, bad key length.",
    )
    KEYSET_ROLLBACK = ("FAILED_PRECONDITION", "KEY-8", "The key set's version is not above the current one.")
    KEYSET_VERSION_SKIPPED = (
        "FAILED_PRECONDITION",
        "KEY-8",
        "The key set's version skips one: N may only be followed by N+1.",
    )
    KEYSET_WRONG_SIGNER = ("UNAUTHENTICATED", "KEY-9", "The key set is not signed by a key of the previous version.")
    KEYSET_EXPIRED = ("FAILED_PRECONDITION", "KEY-13", "The newest key set version has expired (freeze protection).")
    PIN_MISMATCH = (
        "PERMISSION_DENIED",
        "KEY-12",
        "The key set chain does not start at the pinned identity fingerprint.",
    )
    # Enrolment and authorization (§6)
    ENROLMENT_CODE_INVALID = ("PERMISSION_DENIED", "ENR-3", "The enrolment code is wrong for the account.")
    ENROLMENT_CODE_EXPIRED = ("PERMISSION_DENIED", "ENR-4", "The enrolment code has expired.")
    ENROLMENT_CODE_USED = ("PERMISSION_DENIED", "ENR-2", "The enrolment code was already used.")
    ENROLMENT_LOCKED = ("PERMISSION_DENIED", "ENR-5", "Too many wrong codes: enrolment on the account is locked.")
    PARTY_ID_TAKEN = ("ALREADY_EXISTS", "ENR-6", "The party id is already bound to a different key set chain.")
    NOT_ENROLLED = ("UNAUTHENTICATED", "AUZ-2", "The sender is not an enrolled party of this biller.")
    ACCOUNT_ACCESS_DENIED = (
        "PERMISSION_DENIED",
        "AUZ-1",
        "The signer is not bound to the account (or it does not exist).",
    )
    NOT_FOUND = ("NOT_FOUND", "AUZ-3", "The bill, thread or intent does not exist on the caller's account.")
    # Negotiation (§9)
    BILL_DIGEST_MISMATCH = (
        "FAILED_PRECONDITION",
        "NEG-2",
        "The thread opening names a bill digest other than the bill's.",
    )
    BILL_NOT_NEGOTIABLE = (
        "FAILED_PRECONDITION",
        "NEG-3",
        "The bill is settled, already under an arrangement, or past negotiation.",
    )
    NEGOTIATION_LIMITS_INVALID = (
        "INVALID_ARGUMENT",
        "NEG-4",
        "The opening's max_rounds or deadline is outside the advertised limits.",
    )
    TOO_MANY_OPEN_THREADS = ("RESOURCE_EXHAUSTED", "LIM-7", "The account already has the most open threads allowed.")
    TOO_MANY_THREADS = ("RESOURCE_EXHAUSTED", "LIM-16", "The bill has had the most negotiation threads allowed.")
    OUT_OF_TURN = ("FAILED_PRECONDITION", "NEG-7", "The sender moved when it was the other party's turn.")
    ROUND_LIMIT_EXCEEDED = ("FAILED_PRECONDITION", "NEG-5", "An offer beyond the thread's max_rounds.")
    NEGOTIATION_DEADLINE_PASSED = ("FAILED_PRECONDITION", "NEG-6", "A move received after the thread's deadline.")
    THREAD_CLOSED = ("FAILED_PRECONDITION", "NEG-14", "A move on a thread that already has an outcome.")
    ACCEPT_DIGEST_MISMATCH = (
        "FAILED_PRECONDITION",
        "NEG-9",
        "The accept names a digest other than the other party's last offer.",
    )
    OPTIONS_NOT_HONOURED = (
        "FAILED_PRECONDITION",
        "NEG-12",
        "The biller answered an offer inside its advertised options with other than Accept.",
    )
    # Terms (§8)
    UNKNOWN_CURRENCY = ("INVALID_ARGUMENT", "TRM-1", "Not an ISO 4217 currency with minor units.")
    CURRENCY_MISMATCH = ("INVALID_ARGUMENT", "TRM-2", "Amounts in one message use more than one currency.")
    AMOUNT_OUT_OF_RANGE = (
        "INVALID_ARGUMENT",
        "TRM-3",
        "An amount is not positive or exceeds the largest amount allowed.",
    )
    INVALID_DATE = ("INVALID_ARGUMENT", "TRM-4", "A date is not a valid YYYY-MM-DD calendar date.")
    INVALID_TERMS = ("INVALID_ARGUMENT", "TRM-5", "The terms' kind, lines or schedule shape is not allowed.")
    TOTAL_MISMATCH = ("INVALID_ARGUMENT", "TRM-7", "total is not principal plus fees minus discounts.")
    SCHEDULE_SUM_MISMATCH = ("INVALID_ARGUMENT", "TRM-8", "The schedule's amounts do not sum exactly to total.")
    SCHEDULE_DATES_NOT_INCREASING = ("INVALID_ARGUMENT", "TRM-9", "Schedule dates are not strictly increasing.")
    TOO_MANY_INSTALMENTS = ("INVALID_ARGUMENT", "LIM-6", "More instalments than max_instalments.")
    PRINCIPAL_MISMATCH = (
        "INVALID_ARGUMENT",
        "TRM-11",
        "principal is not the bill's outstanding balance (its amount due less what was received).",
    )
    # Payments (§10)
    IDEMPOTENCY_CONFLICT = ("ALREADY_EXISTS", "PAY-2", "The intent id was used before with different content.")
    PAYMENT_AMOUNT_MISMATCH = (
        "INVALID_ARGUMENT",
        "PAY-3",
        "The intent's amount is not the amount owed for that bill or instalment.",
    )
    PAYMENT_NOT_SETTLED = ("FAILED_PRECONDITION", "PAY-5", "No settlement yet: the receipt does not exist.")
    PAYMENT_IN_PROGRESS = (
        "FAILED_PRECONDITION",
        "PAY-14",
        "Another intent for the same payment is instructed, not settled, and not past its pay-by time.",
    )
    TOO_MANY_PAYMENT_INTENTS = ("RESOURCE_EXHAUSTED", "PAY-14", "The bill has the most payment intents allowed.")
    # Events (§11)
    CURSOR_OUT_OF_RANGE = ("OUT_OF_RANGE", "EVT-3", "The start sequence is beyond the end of the log.")
    # Limits (§14)
    RATE_LIMITED = (
        "RESOURCE_EXHAUSTED",
        "LIM-8",
        "The signing party, or for unverified requests the peer address, sent more requests than the limit allows.",
    )
    TOO_MANY_STREAMS = (
        "RESOURCE_EXHAUSTED",
        "LIM-14",
        "The party, or address, already has the most open event streams allowed.",
    )
    KEYSET_CHAIN_FULL = (
        "RESOURCE_EXHAUSTED",
        "LIM-15",
        "The party's key set chain has the most versions allowed, or it published too many today.",
    )
    # Offline verification (§17)
    NOT_AGREED = ("FAILED_PRECONDITION", "BND-4", "The bundle's thread does not end in an agreement.")
    # Transport
    INTERNAL_ERROR = ("INTERNAL", "ERR-3", "The receiver failed; the request may be retried with the same message.")

    def __init__(self, grpc_code: str, requirement: str, meaning: str) -> None:
        self.grpc_code = grpc_code
        self.requirement = requirement
        self.meaning = meaning


class ParleyError(Exception):
    """The root of every error Parley raises: catch this to catch them all (protocol, transport, payment).

    Below it: `ProtocolError`, a broken rule with its spec reason, split into `LocalProtocolError` (we were
    about to break the protocol) and `RemoteProtocolError` (the peer did), as h11 splits them; transport
    failures (`agent.transport.status.TransportError`) and the consumer's payment outcomes apart.
    """


class ProtocolError(ParleyError):
    """A protocol failure with a spec reason and a human-readable detail."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.name}: {detail or reason.meaning}")
        self.reason = reason
        self.detail = detail or reason.meaning


class RemoteProtocolError(ProtocolError):
    """What the peer sent breaks the protocol."""


class LocalProtocolError(ProtocolError):
    """What we tried to send would break the protocol."""

    def as_remote(self) -> RemoteProtocolError:
        """The same failure, blamed on the peer (used when checking received input)."""
        error = RemoteProtocolError(self.reason, self.detail)
        error.__cause__ = self
        return error
