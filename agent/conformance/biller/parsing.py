"""Parsing payload bytes (§3.4, ENV-14): the protobuf encoding rules, neither stricter nor looser.

The `parse-*` vectors are signed by test keys no target has enrolled, so their bytes are rebuilt here on a query
signed by an enrolled party of the suite: each variant is the honest query's payload with one field re-encoded.
"""

from __future__ import annotations

from agent.conformance.biller.target import (
    FIXTURES,
    BillerTarget,
    Customer,
    accepted,
    expect,
    list_bills,
    query_envelope,
)
from agent.conformance.runner import Suite
from agent.protocol.errors import Reason
from agent.protocol.messages import encode_varint
from parley.v1 import account_pb2, envelope_pb2

suite: Suite[BillerTarget] = Suite("biller/parsing")

# AccountQuery's field numbers (proto/parley/v1/account.proto) and the wire types used below.
ACCOUNT_ID, START_SEQUENCE = 2, 6
VARINT, LENGTH_DELIMITED, START_GROUP, END_GROUP = 0, 2, 3, 4
UNDEFINED_FIELD = 15  # no field of AccountQuery has this number


def _tag(field: int, wire_type: int) -> bytes:
    return encode_varint(field << 3 | wire_type)


def _string(field: int, value: bytes) -> bytes:
    return _tag(field, LENGTH_DELIMITED) + encode_varint(len(value)) + value


def _without_account(customer: Customer) -> bytes:
    """The honest query's payload with its account_id left out (each variant below writes its own)."""
    query = account_pb2.AccountQuery.FromString(query_envelope(customer).payload)
    query.ClearField("account_id")
    return query.SerializeToString()


def _signed(customer: Customer, payload: bytes) -> envelope_pb2.Envelope:
    return customer.party.sign_bytes("parley.v1.AccountQuery", payload)


async def _served(ctx: BillerTarget, customer: Customer, payload: bytes, what: str) -> None:
    accepted(await list_bills(ctx, _signed(customer, payload)), f"{what}, a well-formed query by the encoding rules")


@suite.case(
    "ENV-14/encoding-rules",
    description="Payloads are read by protobuf's rules: long varints, repeated fields accepted; bad UTF-8, "
    "truncations, open groups MALFORMED_PAYLOAD",
    quote='A receiver MUST parse a payload by the protobuf binary encoding rules (protobuf.dev, "Encoding"), neither '
    "stricter nor looser",
    needs=(FIXTURES,),
)
async def encoding_rules(ctx: BillerTarget) -> str:
    customer, other = await ctx.enrolled(), await ctx.enrolled()
    base = _without_account(customer)
    account = customer.account_id.encode()
    # Looser than a strict reader, as protobuf is: these mean the honest query.
    await _served(ctx, customer, base + _string(ACCOUNT_ID, account), "the honest query, fields re-ordered")
    long_zero = _tag(START_SEQUENCE, VARINT) + b"\x80\x80\x80\x00"  # 0 in four bytes instead of one
    await _served(ctx, customer, base + _string(ACCOUNT_ID, account) + long_zero, "a varint longer than minimal")
    twice = _string(ACCOUNT_ID, other.account_id.encode()) + _string(ACCOUNT_ID, account)
    await _served(ctx, customer, base + twice, "account_id written twice, the signer's own last (the last one wins)")
    # Refused, each with its reason.
    refusals = [
        ("account_id that is not UTF-8", _string(ACCOUNT_ID, b"\xff" + account), Reason.MALFORMED_PAYLOAD),
        ("a field whose length runs past the payload", _tag(ACCOUNT_ID, LENGTH_DELIMITED) + b"\x7f" + account,
         Reason.MALFORMED_PAYLOAD),
        ("a group never closed", _string(ACCOUNT_ID, account) + _tag(UNDEFINED_FIELD, START_GROUP),
         Reason.MALFORMED_PAYLOAD),
        ("a well-formed group at an undefined number", _string(ACCOUNT_ID, account)
         + _tag(UNDEFINED_FIELD, START_GROUP) + _tag(UNDEFINED_FIELD, END_GROUP), Reason.UNKNOWN_FIELD),
    ]  # fmt: skip
    for what, tail, reason in refusals:
        expect(await list_bills(ctx, _signed(customer, base + tail)), reason, f"a query with {what}")
    return f"3 readings accepted, {len(refusals)} refused"
