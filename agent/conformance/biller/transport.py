"""Transport (§2): mutual TLS and the bounds on connections, which a client sees only as connections refused or
closed.

No message announces a target's connection bounds, so the operator gives them (`--idle-timeout`,
`--handshake-timeout`, `--max-connections-per-address`); without them those cases are skipped. Keepalive policing
needs no figure: the spec fixes how often a client may ping. TRN-10's total cap has no case: from the one address
a suite connects from, the per-address cap (TRN-11) is met first wherever it is lower, and holding a total cap's
800 connections (the reference's) would strain the machine the suite runs on more than the target.

TRN-9 applies only to a target that requires mutual TLS, which the operator says by giving a client certificate
(`--tls-client-cert`); reached in plaintext, or over TLS without one, the target does not, and the case is skipped
as not applicable.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from agent.conformance.biller.target import (
    SHOULD,
    BillerTarget,
    accepted,
    expect,
    hello_request,
    list_bills,
)
from agent.conformance.client import HTTP2_ENHANCE_YOUR_CALM, Connection, IdleConnection, Refusal, http2_ping
from agent.conformance.runner import Skip, Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.limits import PROTOCOL_VERSION

suite: Suite[BillerTarget] = Suite("biller/transport")

IDLE_CONNECTIONS = 8  # silent connections left for the target to reap (TRN-10)
PAST_THE_CAP = 4  # connections opened beyond the per-address cap (TRN-11)
IDLE_GRACE = 2.0  # seconds past the idle timeout before a connection still open is reported
CAP_GRACE = 5.0  # seconds the target has to close the connections past its cap
CAP_PAUSE = 1.0  # seconds between the connections up to the cap and those past it, for the target to see them
HANDSHAKE_TIMEOUT = 10.0
SILENT_CONNECTIONS = 2  # TCP connections that never start a handshake (TRN-10)
PINGS = 10  # HTTP/2 PINGs sent without a call in flight (TRN-10), PING_SPACING seconds apart
PING_SPACING = 0.1
PING_GRACE = 2.0  # seconds after the last ping before a connection still open is reported


def _connection_failed(number: int, count: int, error: BaseException) -> Violation:
    return Violation(f"connection {number} of {count} failed before any cap: {error!r}")


async def _idle_connections(ctx: BillerTarget, count: int, *, silent: bool = False) -> list[IdleConnection]:
    """`count` connections that make no call, opened one after the other (so that their order is the order of their
    age): past the TLS and HTTP/2 handshakes, or, `silent`, without even starting them (not a TLS ClientHello)."""
    connections: list[IdleConnection] = []
    try:
        for _ in range(count):
            if silent:
                connections.append(await IdleConnection.open_silent(ctx.target, HANDSHAKE_TIMEOUT))
            else:
                connections.append(await IdleConnection.open(ctx.target, ctx.tls, HANDSHAKE_TIMEOUT))
    except (OSError, TimeoutError, ConnectionError) as error:
        await _close_all(connections)
        raise _connection_failed(len(connections) + 1, count, error) from error
    return connections


async def _close_all(connections: list[IdleConnection]) -> None:
    for connection in connections:
        await connection.close()


async def _all_closed_within(
    ctx: BillerTarget, connections: list[IdleConnection], which: str, bound: float, bound_name: str
) -> str:
    """Every one of `connections` (which `which`) must be closed by the target within `bound` (its `bound_name`)
    plus IDLE_GRACE seconds, and a new call then served; the case's summary."""
    try:
        closed = await _closed_within(connections, bound + IDLE_GRACE, len(connections))
    finally:
        await _close_all(connections)
    if not all(closed):
        raise Violation(
            f"{closed.count(False)} of {len(closed)} connections that {which} were still open "
            f"{bound + IDLE_GRACE:g} s later ({bound_name} {bound:g} s)"
        )
    await _still_serves(ctx, f"the connections that {which} were closed")
    return f"{len(closed)} connections that {which} closed within {bound + IDLE_GRACE:g} s"


async def _closed_within(connections: list[IdleConnection], seconds: float, enough: int) -> list[bool]:
    """Wait until `enough` of `connections` are closed by the target, or `seconds` have passed; which are closed."""
    deadline = time.monotonic() + seconds
    while sum(c.closed.is_set() for c in connections) < enough and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return [c.closed.is_set() for c in connections]


async def _still_serves(ctx: BillerTarget, after: str) -> None:
    hello = await ctx.conn.call("Hello", hello_request(PROTOCOL_VERSION))
    accepted(hello, f"after {after}, Hello on a connection of its own")


@suite.case(
    "TRN-9/client-certificate-required",
    description="A target requiring mutual TLS refuses a client without a certificate in the handshake, and still "
    "judges requests by their signature",
    quote="a client certificate that chains to a certificate authority the biller is configured with, checked in the "
    "TLS handshake, so that a client without one is refused before any call reaches the service. Mutual TLS only "
    "narrows who can connect: a biller MUST still authenticate and authorize every request by its signed envelope",
)
async def client_certificate_required(ctx: BillerTarget) -> str:
    if ctx.tls is None:
        raise Skip("not applicable: the target is reached in plaintext, so it does not require mutual TLS")
    if ctx.tls.certificate_chain is None:
        raise Skip("not applicable: no client certificate given (--tls-client-cert), so mutual TLS is not required")
    anonymous = Connection.open(
        ctx.target, tls=replace(ctx.tls, certificate_chain=None, private_key=None), call_timeout=HANDSHAKE_TIMEOUT
    )
    try:
        answer = await anonymous.call("Hello", hello_request(PROTOCOL_VERSION))
    finally:
        await anonymous.close()
    if not isinstance(answer, Refusal):
        raise Violation("Hello from a client without a certificate was answered: the handshake must refuse it")
    if not answer.unreachable:
        raise Violation(f"a client without a certificate reached the service, which refused it: {answer.describe()}")
    stranger = ctx.new_party()  # holds a certificate's connection (ours), but was never enrolled
    expect(
        await list_bills(ctx, stranger.query("conformance-no-such-account")),
        Reason.NOT_ENROLLED,
        "a query signed by a party never enrolled, over the connection with a client certificate",
    )
    return f"the handshake refused a client without a certificate ({answer.code.name})"


@suite.case(
    "TRN-10/idle-connections-reaped",
    description="Connections that never make a call are closed after the target's idle timeout (--idle-timeout), "
    "and a new client is then served",
    quote="A biller MUST bound the connections it holds: […] idle connections (no call in flight, including "
    "connections that never made one) closed after an idle timeout",
)
async def idle_connections_reaped(ctx: BillerTarget) -> str:
    idle_timeout = ctx.bounds.idle_timeout
    if idle_timeout is None:
        raise Skip("the target's idle timeout is not known: give --idle-timeout SECONDS")
    cap = ctx.bounds.max_per_address  # stay below it (the suite's own connection counts too): idle is the point here
    connections = await _idle_connections(
        ctx, IDLE_CONNECTIONS if cap is None else max(1, min(IDLE_CONNECTIONS, cap - 2))
    )
    return await _all_closed_within(ctx, connections, "never made a call", idle_timeout, "idle timeout")


@suite.case(
    "TRN-10/handshake-deadline",
    description="TCP connections that never start their TLS or HTTP/2 handshake are closed by the target's handshake "
    "deadline (--handshake-timeout)",
    quote="A biller MUST bound the connections it holds: […] a deadline for the TLS and HTTP/2 handshake",
)
async def handshake_deadline(ctx: BillerTarget) -> str:
    deadline = ctx.bounds.handshake_timeout
    if deadline is None:
        raise Skip("the target's handshake deadline is not known: give --handshake-timeout SECONDS")
    connections = await _idle_connections(ctx, SILENT_CONNECTIONS, silent=True)
    return await _all_closed_within(ctx, connections, "never started a handshake", deadline, "handshake deadline")


@suite.case(
    "TRN-10/keepalive-pings-policed",
    description=f"A connection that sends HTTP/2 PINGs {PING_SPACING:g} s apart without a call in flight is closed "
    "by the target",
    quote="A biller MUST bound the connections it holds: […] keepalive pings from clients policed […] Clients MUST "
    "NOT send keepalive pings more often than once a minute without calls in flight",
)
async def keepalive_pings_policed(ctx: BillerTarget) -> str:
    try:
        connection = await IdleConnection.open(ctx.target, ctx.tls, HANDSHAKE_TIMEOUT)
    except (OSError, TimeoutError, ConnectionError) as error:
        raise _connection_failed(1, 1, error) from error
    try:
        sent = 0
        while sent < PINGS and not connection.closed.is_set():
            await connection.send(http2_ping(sent))
            sent += 1
            await asyncio.sleep(PING_SPACING)
        await _closed_within([connection], PING_GRACE, 1)
    finally:
        await connection.close()
    lived, idle_timeout = connection.lived, ctx.bounds.idle_timeout
    if lived is None:
        raise Violation(
            f"{sent} pings {PING_SPACING:g} s apart without a call in flight, and the connection was still open "
            f"{PING_GRACE:g} s after the last"
        )
    if idle_timeout is not None and lived >= idle_timeout:  # the idle timeout's doing, not the pings' policing
        raise Violation(
            f"{sent} pings {PING_SPACING:g} s apart without a call in flight: the connection was closed only after "
            f"{lived:.1f} s, by the idle timeout ({idle_timeout:g} s)"
        )
    await _still_serves(ctx, "the pinging connection was closed")
    how = {None: "without a GOAWAY", HTTP2_ENHANCE_YOUR_CALM: "with GOAWAY ENHANCE_YOUR_CALM"}.get(
        connection.goaway_code, f"with GOAWAY code {connection.goaway_code}"
    )
    return f"closed after {sent} pings ({lived:.1f} s), {how}"


@suite.case(
    "TRN-11/per-address-cap",
    description="Connections from one address past the target's cap (--max-connections-per-address) are closed, "
    "the newest first",
    quote="A biller SHOULD bound the connections one peer IP address holds (RECOMMENDED: 64), closing connections "
    "past the cap — the newest first — without an answer",
    level=SHOULD,
)
async def per_address_cap(ctx: BillerTarget) -> str:
    cap = ctx.bounds.max_per_address
    if cap is None:
        raise Skip("the target's per-address connection cap is not known: give --max-connections-per-address N")
    # Up to the cap (the suite's own connection is one), then, once the target has had time to see those, past it:
    # the older must stay, the newer be closed. The pause stays well inside the idle timeout, if one was given, and
    # an older connection closed only once idle that long is the idle timeout's doing (TRN-10), not the cap's.
    idle_timeout = ctx.bounds.idle_timeout
    pause = CAP_PAUSE if idle_timeout is None else min(CAP_PAUSE, idle_timeout / 4)
    older = await _idle_connections(ctx, cap - 1)
    newer: list[IdleConnection] = []
    try:
        await asyncio.sleep(pause)
        refused = 0  # closed by the target during their handshake, already
        for _ in range(PAST_THE_CAP + 1):
            try:
                newer.append(await IdleConnection.open(ctx.target, ctx.tls, HANDSHAKE_TIMEOUT))
            except (OSError, ConnectionError):
                refused += 1
        closed = refused + (await _closed_within(newer, CAP_GRACE, PAST_THE_CAP - refused)).count(True)
        premature = [c.lived for c in older if c.lived is not None and (idle_timeout is None or c.lived < idle_timeout)]
    finally:
        await _close_all(older + newer)
    if closed < PAST_THE_CAP:
        raise Violation(
            f"{cap - 1} connections from one address besides the suite's, then {PAST_THE_CAP + 1} more past the "
            f"cap of {cap}: {closed} of these closed within {CAP_GRACE:g} s"
        )
    if premature:
        raise Violation(
            f"{len(premature)} of the {cap - 1} connections opened within the cap were closed (after "
            f"{min(premature):.1f} s): the newest go first"
        )
    await _still_serves(ctx, "the connections past the cap were closed")
    return f"{closed} of the {PAST_THE_CAP + 1} connections past the cap closed, none of the {cap - 1} before"
