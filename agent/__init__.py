"""Parley: bots that settle bills with bots, over signed gRPC messages.

The public API, by layer (each importable from here; the packages say more):

- `agent.protocol` — every rule of docs/PROTOCOL.md, sans I/O: keys and DSSE envelopes, key set
  chains, money and terms, the negotiation state machine, agreement bundles and their offline
  verification, the error hierarchy (`ParleyError` at its root).
- `agent.biller` — `BillerAgent`, the embeddable biller, with the plugins a biller supplies
  (`Policy`, `PaymentRail`).
- `agent.consumer` — `ConsumerAgent`, the embeddable personal-finance bot, with its plugins
  (`Strategy`, `Mandate`, approvals, `PaymentSender`).
- `agent.stores` (SQLite, PostgreSQL), `agent.transport` (gRPC), `agent.identity` (a party's key and
  key set chain in a state directory), `agent.clock`.

Names are loaded on first use, so `import agent.protocol` (an offline verifier) does not pull in
gRPC or a database driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.lazy import served_lazily
from agent.version import __version__

if TYPE_CHECKING:
    from agent.biller import BillerAgent, PaymentRail, Policy
    from agent.clock import Clock, ManualClock, SystemClock
    from agent.consumer import ConsumerAgent, Mandate, Strategy
    from agent.protocol.agreement import Bundle, verify_bundle
    from agent.protocol.answers import AcceptOffer, CounterOffer, Escalate, RejectOffer, Withdraw
    from agent.protocol.errors import LocalProtocolError, ParleyError, ProtocolError, Reason, RemoteProtocolError
    from agent.protocol.keys import SigningKey, VerifyKey
    from agent.protocol.keysets import KeyChain, first_key_set
    from agent.protocol.terms import Money, Terms, TermsKind
    from agent.stores import SqliteBillerStore, SqliteConsumerStore, open_biller_store
    from agent.transport.server import start_biller_server
    from agent.transport.status import CallError, RpcError, TransportError

_HOMES = {
    "BillerAgent": "agent.biller",
    "PaymentRail": "agent.biller",
    "Policy": "agent.biller",
    "Clock": "agent.clock",
    "ManualClock": "agent.clock",
    "SystemClock": "agent.clock",
    "ConsumerAgent": "agent.consumer",
    "Mandate": "agent.consumer",
    "Strategy": "agent.consumer",
    "Bundle": "agent.protocol.agreement",
    "verify_bundle": "agent.protocol.agreement",
    "AcceptOffer": "agent.protocol.answers",
    "CounterOffer": "agent.protocol.answers",
    "Escalate": "agent.protocol.answers",
    "RejectOffer": "agent.protocol.answers",
    "Withdraw": "agent.protocol.answers",
    "LocalProtocolError": "agent.protocol.errors",
    "ParleyError": "agent.protocol.errors",
    "ProtocolError": "agent.protocol.errors",
    "Reason": "agent.protocol.errors",
    "RemoteProtocolError": "agent.protocol.errors",
    "SigningKey": "agent.protocol.keys",
    "VerifyKey": "agent.protocol.keys",
    "KeyChain": "agent.protocol.keysets",
    "first_key_set": "agent.protocol.keysets",
    "Money": "agent.protocol.terms",
    "Terms": "agent.protocol.terms",
    "TermsKind": "agent.protocol.terms",
    "SqliteBillerStore": "agent.stores",
    "SqliteConsumerStore": "agent.stores",
    "open_biller_store": "agent.stores",
    "start_biller_server": "agent.transport.server",
    "CallError": "agent.transport.status",
    "RpcError": "agent.transport.status",
    "TransportError": "agent.transport.status",
}


__getattr__ = served_lazily(__name__, _HOMES)


__all__ = [
    "AcceptOffer",
    "BillerAgent",
    "Bundle",
    "CallError",
    "Clock",
    "ConsumerAgent",
    "CounterOffer",
    "Escalate",
    "KeyChain",
    "LocalProtocolError",
    "Mandate",
    "ManualClock",
    "Money",
    "ParleyError",
    "PaymentRail",
    "Policy",
    "ProtocolError",
    "Reason",
    "RejectOffer",
    "RemoteProtocolError",
    "RpcError",
    "SigningKey",
    "SqliteBillerStore",
    "SqliteConsumerStore",
    "Strategy",
    "SystemClock",
    "Terms",
    "TermsKind",
    "TransportError",
    "VerifyKey",
    "Withdraw",
    "__version__",
    "first_key_set",
    "open_biller_store",
    "start_biller_server",
    "verify_bundle",
]
