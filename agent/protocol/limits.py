"""Every number the protocol fixes, in one place (PROTOCOL.md §14).

`PROTOCOL_VERSION` and the byte lengths are part of the wire format. `Limits`
holds the numbers a biller may tune and announces in Hello; the defaults are the
spec's. Nothing else in the code base writes these numbers down.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

MESSAGE_ID_BYTES = 16
THREAD_ID_BYTES = 16
DIGEST_BYTES = 32
KEYID_BYTES = 16
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
DISCLOSURE_SALT_BYTES = 16  # PRV-3: the salt of a hardship disclosure's commitment
MAX_NEXT_PAY_DATE_DAYS = 366  # PRV-9: a disclosed next pay day is within a year of the opening, either side
# PAY-1: a payment intent id, chosen by the consumer (its idempotency key, PAY-2)
INTENT_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"

MAX_PARTY_ID_CHARS = 128
MAX_PAYLOAD_TYPE_CHARS = 128
MAX_ID_CHARS = 64
MAX_TEXT_CHARS = 200
MAX_NOTE_CHARS = 500
MAX_LINES = 8
MAX_KEYS_PER_SET = 16
MAX_REVOCATIONS_PER_SET = 256
MAX_KEYSET_LIFETIME = timedelta(days=400)
# LIM-12: a revocation's free-text reason, at most this many characters (KEY-11).
MAX_REVOCATION_REASON_CHARS = MAX_TEXT_CHARS
# LIM-15: versions of one party's key set chain a biller keeps (and so ever verifies), and versions one party
# may publish in a day (per biller process). Monthly rotation fills 100 versions in eight years; a party that
# reaches the cap enrols afresh with a new chain.
MAX_KEYSET_VERSIONS = 100
MAX_KEYSET_PUBLISHES_PER_DAY = 4
# LIM-14: WatchEvents streams one party may hold open at once (per biller process).
MAX_OPEN_STREAMS_PER_PARTY = 4
# EVT-10: the longest a biller may go without checking that an open stream's query is still authorized.
MAX_STREAM_RECHECK_INTERVAL = timedelta(seconds=30)
# TRM-19: no date of any terms more than this many days after the bill's due date (five years: a plan of
# max_instalments monthly payments starting late still fits), so no agreed date is absurd or overflows.
MAX_TERMS_HORIZON_DAYS = 1830
# Largest amount: below 10**(9 + exponent) minor units, i.e. 999,999,999.99 for
# a two-decimal currency, as in the SEPA Request-to-Pay rulebook.
AMOUNT_MAJOR_DIGITS = 9
# LIM-8, LIM-12: rate-limit buckets remembered per process, for signing keys and for peer addresses each
# (least recently used forgotten first), so no sender can grow the limiter's memory.
RATE_LIMIT_MAX_TRACKED = 10_000
# LIM-8: a peer address's bucket (unsigned calls, refusals before verification) holds this many times a
# key's rate and burst: one address may be a NAT in front of many consumers, and what it can cost without
# a valid signature is at most one signature check per token.
PEER_RATE_LIMIT_FACTOR = 10
# ENR-3, LIM-12: wrong codes for an account id that does not exist are counted and locked like an existing
# account's (so the lock does not reveal which ids exist), remembered this long after the id's last attempt
# and for at most this many ids, the least recently tried forgotten first.
ENROLMENT_GUESS_MEMORY = timedelta(days=30)
MAX_ENROLMENT_GUESSES = 100_000
# PAY-15: an agreed payment (an instalment, a discounted or deferred payment) is instructed until the end of
# its agreed date plus this many days; later the agreement no longer sets it (PAY-16).
PAYMENT_GRACE_DAYS = 3
# PAY-14, LIM-12: payment intents stored per bill, settled or not.
MAX_PAYMENT_INTENTS_PER_BILL = 100
# LIM-16: negotiation threads one bill may have had, whatever their outcome (each keeps its messages).
MAX_THREADS_PER_BILL = 100


@dataclass(frozen=True)
class Limits:
    """Tunable limits; `Limits()` are the spec defaults."""

    max_envelope_bytes: int = 64 * 1024
    max_clock_skew: timedelta = timedelta(seconds=300)
    max_message_lifetime: timedelta = timedelta(hours=24)
    max_rounds: int = 10
    max_negotiation_time: timedelta = timedelta(days=7)
    max_instalments: int = 36
    max_open_threads_per_account: int = 3
    rate_limit_per_second: int = 20
    rate_limit_burst: int = 40
    enrolment_max_attempts: int = 5

    @property
    def grpc_max_receive_bytes(self) -> int:
        """gRPC receive limit: one envelope plus its request framing (LIM-1)."""
        return self.max_envelope_bytes + 1024


DEFAULT_LIMITS = Limits()
