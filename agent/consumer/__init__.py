"""The embeddable consumer agent: `ConsumerAgent` (the facade) and what an embedder supplies or receives.

The package is laid out by phase: `receive` (everything the biller sends, judged against the pinned
chain), `enrolment`, `bills`, `negotiation`, `payments`, `events`; `plugins` holds the protocols the
embedder implements (`Strategy`, `Approver`, `PaymentSender`) with their context objects, `mandate`
the one mandate check (NEG-20), `results` the returned views and `errors` the payment outcomes.
Answers to an offer use the one vocabulary of `agent.protocol.answers`, re-exported here.
"""

from agent.consumer.agent import ConsumerAgent
from agent.consumer.approvals import ApprovalBook, ApprovalClosed, ApprovalPending, UnknownApproval
from agent.consumer.enrolment import EnrolmentLink, InvalidEnrolmentLink, parse_enrolment_uri
from agent.consumer.errors import (
    EventLogForked,
    EventLogFull,
    PaymentDispute,
    PaymentInDoubt,
    PaymentNotSent,
    PaymentRefused,
)
from agent.consumer.mandate import Mandate
from agent.consumer.negotiation import DECLINED_NOTE, NO_ROUNDS_NOTE
from agent.consumer.plugins import (
    ApprovalRequest,
    Approver,
    AskAndWait,
    Circumstances,
    OpeningContext,
    PaymentOrder,
    PaymentSender,
    ResponseContext,
    Strategy,
)
from agent.consumer.receive import KEYSET_REFRESH_INTERVAL
from agent.consumer.results import (
    AccountEvent,
    BillerLink,
    NegotiationResult,
    Payment,
    PaymentReceipt,
    ReceivedBill,
)
from agent.protocol.answers import AcceptOffer, ConsumerAnswer, CounterOffer, Escalate, RejectOffer, Withdraw

__all__ = [
    "DECLINED_NOTE",
    "KEYSET_REFRESH_INTERVAL",
    "NO_ROUNDS_NOTE",
    "AcceptOffer",
    "AccountEvent",
    "ApprovalBook",
    "ApprovalClosed",
    "ApprovalPending",
    "ApprovalRequest",
    "Approver",
    "AskAndWait",
    "BillerLink",
    "Circumstances",
    "ConsumerAgent",
    "ConsumerAnswer",
    "CounterOffer",
    "EnrolmentLink",
    "Escalate",
    "EventLogForked",
    "EventLogFull",
    "InvalidEnrolmentLink",
    "Mandate",
    "NegotiationResult",
    "OpeningContext",
    "Payment",
    "PaymentDispute",
    "PaymentInDoubt",
    "PaymentNotSent",
    "PaymentOrder",
    "PaymentReceipt",
    "PaymentRefused",
    "PaymentSender",
    "ReceivedBill",
    "RejectOffer",
    "ResponseContext",
    "Strategy",
    "UnknownApproval",
    "Withdraw",
    "parse_enrolment_uri",
]
