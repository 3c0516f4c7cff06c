"""The biller-side conformance suite: `parley conformance biller --target HOST:PORT`.

Every case checks one requirement of docs/PROTOCOL.md that a client can
observe over the wire, and is named after it (`ENV-3/bad-signature`). The
suite plays hostile and honest consumers (`agent.conformance.client`): it
enrols them on test accounts, has bills issued, negotiates, pays and watches
events, breaking exactly one rule at a time and checking the biller's answer —
the reason of the one `ErrorInfo` of a refusal (§13), the signed reply, and
that a refused request changed nothing.

Fixtures come from the target's `ConformanceControlService` (§16): cases
that need them (tag `fixtures`) are skipped with "conformance-control not
announced" when Hello does not announce it (CNF-5); cases that need an
optional feature ("negotiation", "events", "erasure", "instalments",
"hardship") are skipped when Hello does not announce it (VER-3).

One module per spec section holds its cases (`target` holds what they share:
the connection, fixtures, customers, bills, calls and checks); `SECTIONS`
below is the running order. Every case works on its own fresh accounts, so
the cases are independent of each other and any subset can be run (`--only`,
`--skip`); the order matters only where `SECTIONS` says so.

The envelope test vectors (docs/VECTORS.md) are delivered over the wire where
the biller's verdict does not depend on whom they were signed by — the form
and size checks that come before any key lookup (vectors `two-signatures`,
`no-signature`, `envelope-too-large`, `payload-type-not-for-call`) and the
vector signed by a key no enrolled party has (`unknown-key`, refused
`NOT_ENROLLED` by a biller, AUZ-2). The other envelope vectors are signed by
test keys the target has never enrolled, so their defects are reproduced on
messages signed by an enrolled party of the suite (`client.flip_signature`,
…), each case naming the vector it mirrors.
"""

from __future__ import annotations

from agent.conformance.biller import (
    authorization,
    bills,
    clock,
    codes_and_times,
    enrolment,
    envelopes,
    errors,
    events,
    headers,
    hello,
    keysets,
    limits,
    negotiation,
    parsing,
    payments,
    privacy,
    reenrolment,
    replay,
    terms,
    transport,
)
from agent.conformance.biller.target import BillerTarget, connect, precheck
from agent.conformance.runner import Suite

SECTIONS: tuple[Suite[BillerTarget], ...] = (
    hello.suite,  # §15, §14, §4.6: first, as a smoke test of the connection and of Hello
    transport.suite,  # §2
    envelopes.suite,  # §3
    parsing.suite,  # §3.4
    headers.suite,  # §5
    replay.suite,  # §5.3
    enrolment.suite,  # §6.1, §6.2
    keysets.suite,  # §4
    authorization.suite,  # §6.3, §6.4
    bills.suite,  # §7
    negotiation.suite,  # §9
    terms.suite,  # §8
    payments.suite,  # §10
    events.suite,  # §11
    reenrolment.suite,  # §6.2 ENR-11, ENR-12 with BIL-7 and EVT-11: an account re-bound by a second code
    privacy.suite,  # §12
    limits.suite,  # §14: each case spends the budget of a party of its own
    codes_and_times.suite,  # ENR-7, HDR-14, HDR-16, EVT-6
    # Order matters from here on:
    # - the cases that move the biller's clock (AdvanceClock) run after every other case that signs with
    #   the target's time, so that those run at an unmoved clock (a moved clock can expire the key sets,
    #   codes and deadlines the earlier cases hold);
    clock.suite,
    # - the error cases judge every refusal seen in the run (`Connection.refusals`), so they come last.
    errors.suite,
)

suite: Suite[BillerTarget] = Suite("biller", precheck=precheck, recover=BillerTarget.resync)
for section in SECTIONS:
    suite.include(section)

__all__ = ["SECTIONS", "BillerTarget", "connect", "suite"]
