"""Transport (§2): mutual TLS and the bounds on connections, which a client sees only as connections refused or
closed.

No message announces a target's connection bounds, so the operator gives them (`--idle-timeout`,
`--handshake-timeout`, `--max-connections`, `--max-connections-per-address`); without them those cases are
skipped. Keepalive policing needs no figure: the spec fixes how often a client may ping. TRN-10's total cap is
reached from several source addresses, so that the per-address cap (TRN-11), met first from one address wherever
it is lower, does not close them instead: the suite binds its connections to 127.0.0.2, 127.0.0.3… (all of
127.0.0.0/8 is the loopback interface on Linux), which reaches only a target on 127.0.0.0/8; and it opens at most
MAX_TOTAL_TRIED connections, so the operator runs the target with a total cap that low for the run.

TRN-9 applies only to a target that requires mutual TLS, which the operator says by giving a client certificate
(`--tls-client-cert`); reached in plaintext, or over TLS without one, the target does not, and the case is skipped
as not applicable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
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
PAST_THE_CAP = 4  # connections opened beyond a cap (TRN-10's total, TRN-11's per address)
MAX_TOTAL_TRIED = 256  # the largest total cap the suite fills (TRN-10)
PER_SOURCE = 4  # connections from each of the suite's source addresses while it fills a total cap
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
    "TRN-10/total-cap",
    description="Connections past the target's total cap (--max-connections), each from an address under its "
    "per-address cap, are closed",
    quote="A biller MUST bound the connections it holds: a total cap",
)
async def total_cap(ctx: BillerTarget) -> str:
    cap = ctx.bounds.max_connections
    if cap is None:
        raise Skip("the target's total connection cap is not known: give --max-connections N")
    if cap > MAX_TOTAL_TRIED:
        raise Skip(
            f"the target's total cap {cap} is more than the suite fills ({MAX_TOTAL_TRIED}): run the target with a "
            "lower one for the run"
        )
    sources = _loopback_sources(ctx, cap)
    # Up to the cap (the suite's own connection is one), a few from each address; then past it, from a further
    # address that holds none yet, so that no per-address cap can be what closes them.
    closed, premature = await _past_a_cap(ctx, sources[:-1], sources[-1])
    if closed < PAST_THE_CAP:
        raise Violation(
            f"{cap - 1} connections besides the suite's, from {len(set(sources)) - 1} addresses, then "
            f"{PAST_THE_CAP + 1} more past the total cap of {cap} from another: {closed} of these closed within "
            f"{CAP_GRACE:g} s"
        )
    if premature:
        raise Violation(
            f"{len(premature)} of the {cap - 1} connections opened within the total cap were closed (after "
            f"{min(premature):.1f} s)"
        )
    await _still_serves(ctx, "the connections past the total cap were closed")
    return f"{closed} of the {PAST_THE_CAP + 1} connections past the total cap of {cap} closed, none of those before"


def _loopback_sources(ctx: BillerTarget, cap: int) -> list[str]:
    """The source address of each of `cap` - 1 connections up to a total cap, PER_SOURCE (or fewer, below the
    per-address cap) to an address from 127.0.0.2 on, then one more address for the connections past it."""
    host = ctx.target.rpartition(":")[0].removeprefix("[").removesuffix("]")
    try:
        on_loopback = ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8")
    except ValueError:  # a name
        on_loopback = False
    if not on_loopback:
        raise Skip(
            f"the suite reaches a total cap from several addresses of 127.0.0.0/8, which reach only a target on "
            f"127.0.0.0/8, not {host}: run the suite on the target's machine"
        )
    per_address = ctx.bounds.max_per_address
    share = PER_SOURCE if per_address is None else max(1, min(PER_SOURCE, per_address - 1))
    first = int(ipaddress.IPv4Address("127.0.0.2"))
    within = [str(ipaddress.IPv4Address(first + number // share)) for number in range(cap - 1)]
    return [*within, str(ipaddress.IPv4Address(first + (cap - 1 + share - 1) // share))]


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
    # Up to the cap (the suite's own connection is one), then past it, all from the suite's own address.
    closed, premature = await _past_a_cap(ctx, [None] * (cap - 1), None)
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


async def _past_a_cap(ctx: BillerTarget, within: Sequence[str | None], past: str | None) -> tuple[int, list[float]]:
    """Open one connection from each of `within`'s source addresses (None: the suite's own), then, once the target
    has had time to see them, PAST_THE_CAP + 1 more from `past`. Returns how many of the later were closed within
    CAP_GRACE seconds (or during their handshake) and how long the earlier that were closed had lived.

    The pause stays well inside the idle timeout, if one was given; a connection closed only once idle that long is
    the idle timeout's doing (TRN-10), not a cap's, so it counts neither as closed past the cap nor as premature.
    """
    idle_timeout = ctx.bounds.idle_timeout
    pause = CAP_PAUSE if idle_timeout is None else min(CAP_PAUSE, idle_timeout / 4)
    older: list[IdleConnection] = []
    newer: list[IdleConnection] = []
    try:
        for number, source in enumerate(within, 1):
            try:
                older.append(await IdleConnection.open(ctx.target, ctx.tls, HANDSHAKE_TIMEOUT, source=source))
            except (OSError, TimeoutError, ConnectionError) as error:
                raise _connection_failed(number, len(within), error) from error
        await asyncio.sleep(pause)
        refused = 0  # closed by the target during their handshake, already
        for _ in range(PAST_THE_CAP + 1):
            try:
                newer.append(await IdleConnection.open(ctx.target, ctx.tls, HANDSHAKE_TIMEOUT, source=past))
            except (OSError, ConnectionError):
                refused += 1
        await _closed_within(newer, CAP_GRACE, PAST_THE_CAP - refused)
    finally:
        await _close_all(older + newer)

    def before_idle(connection: IdleConnection) -> bool:
        lived = connection.lived
        return lived is not None and (idle_timeout is None or lived < idle_timeout)

    closed = refused + sum(before_idle(c) for c in newer)
    return closed, [c.lived for c in older if c.lived is not None and before_idle(c)]
