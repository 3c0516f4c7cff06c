"""The embeddable biller agent: `BillerAgent` and the plugins an embedder supplies (`Policy`, `PaymentRail`).

The package is one module per phase of the protocol (`receive`, `keysets`, `enrolment`, `bills`,
`negotiation`, `payments`, `privacy`, `events`) behind the `BillerAgent` facade (`agent.py`); `plugins`
holds what an embedder implements and `results` what the embedding API returns.
"""

from agent.biller.agent import DISCLOSURE_RETENTION, FEATURES, SERVER_NAME, BillerAgent
from agent.biller.plugins import (
    AcceptOffer,
    Answer,
    BillContext,
    CounterOffer,
    Decision,
    OfferContext,
    PaymentDetails,
    PaymentRail,
    Policy,
    RejectOffer,
)
from agent.biller.results import Arrangement, AwaitedPayment
from agent.protocol.enrolment import ENROLMENT_CODE_ALPHABET, ENROLMENT_CODE_VALIDITY, normalize_enrolment_code
from agent.protocol.events import events_thread_id

__all__ = [
    "DISCLOSURE_RETENTION",
    "ENROLMENT_CODE_ALPHABET",
    "ENROLMENT_CODE_VALIDITY",
    "FEATURES",
    "SERVER_NAME",
    "AcceptOffer",
    "Answer",
    "Arrangement",
    "AwaitedPayment",
    "BillContext",
    "BillerAgent",
    "CounterOffer",
    "Decision",
    "OfferContext",
    "PaymentDetails",
    "PaymentRail",
    "Policy",
    "RejectOffer",
    "events_thread_id",
    "normalize_enrolment_code",
]
