"""Errors (§13), judged over every refusal seen earlier in the run."""

from __future__ import annotations

from agent.conformance.biller.target import (
    BillerTarget,
    hello_request,
    list_bills,
    vector,
)
from agent.conformance.client import (
    LIBRARY_CODES,
    Refusal,
)
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import ERROR_DOMAIN, Reason
from parley.v1 import biller_service_pb2

suite: Suite[BillerTarget] = Suite("biller/errors")


async def _provoke(ctx: BillerTarget) -> None:
    """A few refusals of our own, so that the error cases mean something when run alone."""
    await ctx.conn.call("Hello", hello_request(99))
    await list_bills(ctx, vector("two-signatures"))
    await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest(party_id="consumer:cf-nobody"))


def _error_info_problem(refusal: Refusal) -> str:
    if not refusal.status_readable:
        return "no google.rpc.Status in grpc-status-details-bin (or one contradicting the call)"
    if len(refusal.infos) != 1:
        return f"{len(refusal.infos)} ErrorInfo details, not exactly one"
    info = refusal.infos[0]
    if info.domain != ERROR_DOMAIN:
        return f"ErrorInfo domain {info.domain!r}, not {ERROR_DOMAIN!r}"
    reason = Reason.__members__.get(info.reason)
    if reason is None:
        return f"reason {info.reason!r} is not one of §13"
    if refusal.code.name != reason.grpc_code:
        return f"{info.reason} came with gRPC code {refusal.code.name}, not {reason.grpc_code}"
    if info.metadata.get("requirement") != reason.requirement:
        return (
            f"{info.reason} has metadata requirement {info.metadata.get('requirement')!r}, not {reason.requirement!r}"
        )
    return ""


@suite.case(
    "ERR-1/error-info",
    description="Every refusal in the run carried exactly one ErrorInfo, domain parley.v1, with the reason's code and "
    "requirement",
    quote="Every error a Parley service returns MUST be a `google.rpc.Status`, carried in the "
    "`grpc-status-details-bin` trailer, whose `code` is the gRPC status code of its reason in the table below and "
    "whose `details` hold exactly one `google.rpc.ErrorInfo`, with `reason` = the UPPER_SNAKE reason, `domain` = "
    '`"parley.v1"` and `metadata["requirement"]` = the id of the requirement that names the reason',
    covers=("ERR-5",),
)
async def error_info(ctx: BillerTarget) -> str:
    await _provoke(ctx)
    problems, checked = [], 0
    for refusal in ctx.conn.refusals:
        if refusal.code in LIBRARY_CODES and not refusal.infos:
            continue  # failures of the gRPC library itself carry no ErrorInfo (ERR-2)
        checked += 1
        problem = _error_info_problem(refusal)
        if problem:
            problems.append(f"{refusal.rpc}: {problem}")
    if problems:
        shown = "; ".join(dict.fromkeys(problems))
        raise Violation(f"{len(problems)} of {checked} refusals: {shown}")
    return f"{checked} refusals checked"


@suite.case(
    "ERR-2/no-unknown-code",
    description="No call of the run failed with the gRPC code UNKNOWN",
    quote="A service MUST NOT answer with the gRPC code `UNKNOWN`: every failure the protocol names uses its row of "
    "the table, and every other failure is `INTERNAL_ERROR` (ERR-3).",
)
async def no_unknown_code(ctx: BillerTarget) -> str:
    await _provoke(ctx)
    unknown = [r for r in ctx.conn.refusals if r.code.name == "UNKNOWN"]
    if unknown:
        raise Violation(f"{len(unknown)} calls failed with UNKNOWN, e.g. {unknown[0].rpc}: {unknown[0].message}")
    return f"{len(ctx.conn.refusals)} refusals checked"
