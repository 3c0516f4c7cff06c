"""Terms (§8), judged in thread openings (NEG-8)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    DEFERRAL_FEE,
    FIXTURES,
    INSIDE_DAYS,
    NEG,
    BillerTarget,
    IssuedBill,
    accepted,
    expect,
    inside_options,
    money,
    open_thread,
    terms,
)
from agent.conformance.client import Refusal
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.limits import MAX_TERMS_HORIZON_DAYS
from parley.v1 import terms_pb2

suite: Suite[BillerTarget] = Suite("biller/terms")


def _terms_case(  # noqa: PLR0917 - a table of cases reads best positionally
    case_id: str,
    description: str,
    quote: str,
    reason: Reason,
    variants: dict[str, Any],
    needs: tuple[str, ...] = NEG,
) -> None:
    """Each variant (bill -> Terms or None) opened on a fresh bill must be refused with `reason`; nothing changes."""

    # Every variant is an opening's terms, which NEG-8 requires to be valid and to match the bill.
    @suite.case(case_id, description=description, quote=quote, needs=needs, covers=("NEG-8",))
    async def body(ctx: BillerTarget) -> None:
        customer = await ctx.enrolled()
        bill = await ctx.issue_bill(customer)
        for name, make in variants.items():
            _, answer = await open_thread(ctx, customer, bill, make(bill))
            expect(answer, reason, f"an opening with {name}")
        _, answer = await open_thread(ctx, customer, bill, inside_options(bill))
        accepted(answer, "a valid opening on the same bill (the refused ones must have changed nothing)")


_DEFERRAL, _PLAN = terms_pb2.TERMS_KIND_DEFERRAL, terms_pb2.TERMS_KIND_INSTALMENT_PLAN
_FEE, _DISCOUNT = terms_pb2.LINE_KIND_FEE, terms_pb2.LINE_KIND_DISCOUNT


def _late(bill: IssuedBill, days: int = INSIDE_DAYS) -> date:
    return bill.due_date + timedelta(days=days)


_terms_case(
    "TRM-8/schedule-sum",
    "Terms whose schedule does not sum to the total are refused with SCHEDULE_SUM_MISMATCH",
    "The schedule's amounts MUST sum exactly to `total`; else `SCHEDULE_SUM_MISMATCH`.",
    Reason.SCHEDULE_SUM_MISMATCH,
    {
        "a schedule one cent short": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE - 1)], lines=[(_FEE, DEFERRAL_FEE)]
        ),
    },
)
_terms_case(
    "TRM-7/total-mismatch",
    "Terms whose total is a cent above or below principal plus fees minus discounts are refused with TOTAL_MISMATCH",
    "`total` MUST equal `principal + Σ FEE − Σ DISCOUNT − Σ SETTLEMENT_REDUCTION` over the lines, exactly, in minor "
    "units; else `TOTAL_MISMATCH`.",
    Reason.TOTAL_MISMATCH,
    {
        "a total one cent above the sum": lambda b: terms(
            _DEFERRAL,
            [(_late(b), AMOUNT_DUE + DEFERRAL_FEE + 1)],
            lines=[(_FEE, DEFERRAL_FEE)],
            total=AMOUNT_DUE + DEFERRAL_FEE + 1,
        ),
        "a total one cent below the sum": lambda b: terms(
            _DEFERRAL,
            [(_late(b), AMOUNT_DUE + DEFERRAL_FEE - 1)],
            lines=[(_FEE, DEFERRAL_FEE)],
            total=AMOUNT_DUE + DEFERRAL_FEE - 1,
        ),
    },
)
_terms_case(
    "TRM-11/principal-mismatch",
    "Terms whose principal is not the bill's outstanding balance (nothing paid: its amount due) are refused with "
    "PRINCIPAL_MISMATCH",
    "`principal` MUST equal the bill's outstanding balance when the thread opens (PAY-16: its `amount_due` less "
    "everything received for it; for a bill nothing was paid on, its `amount_due`), currency and minor units: a "
    "principal in another currency is refused with `CURRENCY_MISMATCH` (TRM-2), one of another amount with "
    "`PRINCIPAL_MISMATCH`.",
    Reason.PRINCIPAL_MISMATCH,
    {
        "a principal EUR 10.00 below the amount due": lambda b: terms(
            _DEFERRAL,
            [(_late(b), AMOUNT_DUE - 1_000 + DEFERRAL_FEE)],
            principal=AMOUNT_DUE - 1_000,
            lines=[(_FEE, DEFERRAL_FEE)],
        ),
    },
)
_terms_case(
    "TRM-2/currency-mismatch",
    "Terms mixing currencies, or in another currency than the bill, are refused with CURRENCY_MISMATCH",
    "All amounts of one message MUST be in one currency […] and terms MUST be in the currency of the bill they settle. "
    "A receiver MUST refuse a mix with `CURRENCY_MISMATCH`.",
    Reason.CURRENCY_MISMATCH,
    {
        "a fee line in USD": lambda b: terms_pb2.Terms(
            kind=_DEFERRAL,
            principal=money(AMOUNT_DUE),
            lines=[terms_pb2.Line(kind=_FEE, description="fee", amount=money(DEFERRAL_FEE, "USD"))],
            total=money(AMOUNT_DUE + DEFERRAL_FEE),
            schedule=[terms_pb2.Instalment(due_date=_late(b).isoformat(), amount=money(AMOUNT_DUE + DEFERRAL_FEE))],
        ),
        "terms wholly in USD": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE)], currency="USD"
        ),
    },
)
_terms_case(
    "TRM-1/unknown-currency",
    "Amounts in a code that is not an ISO 4217 currency with minor units are refused with UNKNOWN_CURRENCY",
    'Codes whose minor unit is "N.A." (XAU, XAG, XDR, XXX…), unknown codes, lower-case or otherwise malformed codes '
    "and the empty string MUST be refused with `UNKNOWN_CURRENCY`.",
    Reason.UNKNOWN_CURRENCY,
    {
        f"currency {code!r}": (
            lambda b, code=code: terms(
                _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE)], currency=code
            )
        )
        for code in ("XXX", "eur", "EURO", "")
    },
)
_terms_case(
    "TRM-4/invalid-date",
    "A schedule date that is not a valid YYYY-MM-DD day is refused with INVALID_DATE",
    "A receiver MUST refuse anything else — the empty string, `2026-2-1`, `2026-02-30`, `2026-02-01T00:00` — with "
    "`INVALID_DATE`.",
    Reason.INVALID_DATE,
    {
        f"schedule date {text!r}": (
            lambda b, text=text: terms(_DEFERRAL, [(text, AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE)])
        )
        for text in ("2027-02-30", "2027-2-1", "2027-02-01T00:00", "")
    },
)
_terms_case(
    "TRM-5/invalid-terms",
    "Terms of no kind, of the wrong shape, or missing are refused with INVALID_TERMS",
    "Undefined or unspecified kinds (ENV-13), a missing `terms` where an offer needs them (NEG-8), and any shape not "
    "allowed below MUST be refused with `INVALID_TERMS`.",
    Reason.INVALID_TERMS,
    {
        "TERMS_KIND_UNSPECIFIED": lambda b: terms(terms_pb2.TERMS_KIND_UNSPECIFIED, [(_late(b), AMOUNT_DUE)]),
        "kind number 42": lambda b: terms(42, [(_late(b), AMOUNT_DUE)]),
        "a DEFERRAL in two payments": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE // 2), (_late(b, 25), AMOUNT_DUE // 2)]
        ),
        "a DISCOUNT line on a DEFERRAL": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE - 100)], lines=[(_DISCOUNT, 100)]
        ),
        "no terms": lambda b: None,
    },
)


@suite.case(
    "TRM-5/shape-boundaries",
    description="PAY_IN_FULL dated the due date itself is accepted at once; 9 lines are INVALID_TERMS while 8 are "
    "not refused",
    quote="any shape not allowed below MUST be refused with `INVALID_TERMS`. … In every kind: at most 8 lines",
    needs=NEG,
    covers=("TRM-12", "NEG-12"),
)
async def shape_boundaries(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    _, answer = await open_thread(
        ctx, customer, bill, terms(terms_pb2.TERMS_KIND_PAY_IN_FULL, [(bill.due_date, AMOUNT_DUE)])
    )
    accepted(answer, "PAY_IN_FULL on the due date (on or before it, TRM-12)")
    got = answer.reply.payload_type if answer.HasField("reply") else "no reply"
    if got != "parley.v1.Accept":
        raise Violation(f"PAY_IN_FULL on the due date, with no line (inside any options), was answered with {got}")
    fees = 9
    bill = await ctx.issue_bill(customer)
    _, answer = await open_thread(
        ctx, customer, bill, terms(_DEFERRAL, [(_late(bill), AMOUNT_DUE + 100 * fees)], lines=[(_FEE, 100)] * fees)
    )
    expect(answer, Reason.INVALID_TERMS, f"a deferral with {fees} fee lines")
    _, answer = await open_thread(
        ctx, customer, bill, terms(_DEFERRAL, [(_late(bill), AMOUNT_DUE + 100 * 8)], lines=[(_FEE, 100)] * 8)
    )
    if isinstance(answer, Refusal):
        raise Violation(f"a deferral with exactly 8 fee lines (the most allowed) was refused with {answer.describe()}")


_terms_case(
    "TRM-9/dates-not-increasing",
    "An instalment plan whose dates do not strictly increase is refused with SCHEDULE_DATES_NOT_INCREASING",
    "Schedule dates MUST be strictly increasing; a date equal to or before the one before it is refused with "
    "`SCHEDULE_DATES_NOT_INCREASING`.",
    Reason.SCHEDULE_DATES_NOT_INCREASING,
    {
        "two instalments on one date": lambda b: terms(
            _PLAN, [(_late(b), AMOUNT_DUE // 2), (_late(b), AMOUNT_DUE // 2)]
        ),
        "a second instalment before the first": lambda b: terms(
            _PLAN, [(_late(b, 20), AMOUNT_DUE // 2), (_late(b, 5), AMOUNT_DUE // 2)]
        ),
    },
    needs=("negotiation", "instalments", FIXTURES),
)


def _even_plan(bill: IssuedBill, count: int) -> terms_pb2.Terms:
    """The bill's amount in `count` instalments 14 days apart from the due date, split by the remainder rule."""
    base, remainder = divmod(AMOUNT_DUE, count)
    schedule = [(_late(bill, 14 * i), base + (1 if i < remainder else 0)) for i in range(count)]
    return terms(_PLAN, schedule)


@suite.case(
    "LIM-6/max-instalments-boundary",
    description="A plan of max_instalments + 1 instalments is TOO_MANY_INSTALMENTS; one of exactly max_instalments "
    "is not",
    quote="Terms MUST NOT have more than `max_instalments` instalments, else `TOO_MANY_INSTALMENTS`",
    needs=("negotiation", "instalments", FIXTURES),
    covers=("LIM-10", "NEG-8"),
)
async def max_instalments_boundary(ctx: BillerTarget) -> str:
    most = ctx.limits.max_instalments or 36  # the announced limit (LIM-10), else the default
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    _, answer = await open_thread(ctx, customer, bill, _even_plan(bill, most + 1))
    expect(answer, Reason.TOO_MANY_INSTALMENTS, f"an opening with {most + 1} instalments (max_instalments {most})")
    _, answer = await open_thread(ctx, customer, bill, _even_plan(bill, most))
    if isinstance(answer, Refusal):
        raise Violation(
            f"an opening with exactly max_instalments ({most}) valid instalments was refused with "
            f"{answer.describe()}: the biller enforces a lower limit than it announces (LIM-10)"
        )
    return f"max_instalments {most}"


_terms_case(
    "TRM-3/amount-out-of-range",
    "A zero-amount line, or an amount of 10^(9 + exponent) minor units, is refused with AMOUNT_OUT_OF_RANGE",
    "`amount_minor` MUST satisfy `0 ≤ amount_minor < 10^(9 + exponent)` […] A receiver MUST refuse any other amount "
    "with `AMOUNT_OUT_OF_RANGE`.",
    Reason.AMOUNT_OUT_OF_RANGE,
    {
        "a fee line of EUR 0.00 (the total otherwise exact)": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE), (_FEE, 0)]
        ),
        "a fee line of 10^11 cents, one above the largest EUR amount": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, 10**11)], total=AMOUNT_DUE + DEFERRAL_FEE
        ),
    },
)
_terms_case(
    "TRM-12/terms-fit-bill",
    "A deferral to the due date itself, a payment in full after it, or a date before issue, is INVALID_TERMS",
    "Terms MUST fit the bill's dates and offers: no scheduled date before the bill's `issue_date`; a `PAY_IN_FULL` "
    "payment on or before `due_date`; a `DEFERRAL` payment after `due_date` […] A receiver MUST refuse terms breaking "
    "any of these with `INVALID_TERMS`.",
    Reason.INVALID_TERMS,
    {
        "a deferral to the due date itself (not after it)": lambda b: terms(
            _DEFERRAL, [(b.due_date, AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE)]
        ),
        "a payment in full one day after the due date": lambda b: terms(
            terms_pb2.TERMS_KIND_PAY_IN_FULL, [(b.due_date + timedelta(days=1), AMOUNT_DUE)]
        ),
        "a payment in full the day before the issue date": lambda b: terms(
            terms_pb2.TERMS_KIND_PAY_IN_FULL, [(b.issue_date - timedelta(days=1), AMOUNT_DUE)]
        ),
    },
)


def _order_pairs(bill: IssuedBill) -> list[tuple[str, terms_pb2.Terms, Reason]]:
    """Terms each breaking two §8.6 checks, with the reason of the earlier one."""
    deferred = AMOUNT_DUE + DEFERRAL_FEE
    fee = [(_FEE, DEFERRAL_FEE)]
    mixed = terms(_DEFERRAL, [(_late(bill), deferred)], lines=fee)
    mixed.total.currency_code = "USD"  # check 2 …
    mixed.lines[0].amount.currency_code = "EUX"  # … after check 1 (UNKNOWN_CURRENCY)
    return [
        ("an unknown currency in a line and the total in USD (check 1 before 2)", mixed, Reason.UNKNOWN_CURRENCY),
        (
            "a zero fee line and a wrong total (check 3 before 6)",
            terms(_DEFERRAL, [(_late(bill), deferred)], lines=[*fee, (_FEE, 0)], total=deferred + 1),
            Reason.AMOUNT_OUT_OF_RANGE,
        ),
        (
            "a wrong total and a schedule that sums to neither (check 6 before 7)",
            terms(_DEFERRAL, [(_late(bill), deferred - 7)], lines=fee, total=deferred + 1),
            Reason.TOTAL_MISMATCH,
        ),
        (
            "a schedule one cent short, on another principal (check 7 before 9)",
            terms(_DEFERRAL, [(_late(bill), deferred - 101)], lines=fee, principal=AMOUNT_DUE - 100),
            Reason.SCHEDULE_SUM_MISMATCH,
        ),
        (
            "another principal, deferred to the due date itself (check 9 before 10)",
            terms(_DEFERRAL, [(bill.due_date, deferred - 100)], lines=fee, principal=AMOUNT_DUE - 100),
            Reason.PRINCIPAL_MISMATCH,
        ),
    ]


@suite.case(
    "TRM-13/check-order",
    description="Terms breaking two §8.6 checks at once are refused with the reason of the first",
    quote="A receiver MUST check terms in this order and refuse them with the reason of the first failing check",
    needs=NEG,
    covers=("NEG-8",),
)
async def check_order(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    pairs = _order_pairs(bill)
    for what, offered, reason in pairs:
        _, answer = await open_thread(ctx, customer, bill, offered)
        expect(answer, reason, f"an opening with {what}")
    _, answer = await open_thread(ctx, customer, bill, inside_options(bill))
    accepted(answer, "a valid opening on the same bill (the refused ones must have changed nothing)")
    return f"{len(pairs)} pairs of defects"


def _unset(field: str) -> Any:
    """A deferral the options advertise, with one required Money field left unset (proto3's empty Money)."""

    def make(bill: IssuedBill) -> terms_pb2.Terms:
        offered = inside_options(bill)
        if field == "instalment":
            offered.schedule[0].ClearField("amount")
        elif field == "line":
            offered.lines[0].ClearField("amount")
        elif field == "principal":
            offered.ClearField("principal")
        else:
            offered.ClearField("total")
        return offered

    return make


_terms_case(
    "TRM-16/missing-amount",
    "Terms with an unset principal, total, line amount or instalment amount are refused with UNKNOWN_CURRENCY",
    "A required `Money` field — in terms `principal`, `total`, each line's `amount` and each instalment's `amount`; "
    "[…] — that is not set reads as proto3's default, an empty `Money` with an empty `currency_code`, and MUST be "
    "refused as TRM-1 refuses the empty code, with `UNKNOWN_CURRENCY`",
    Reason.UNKNOWN_CURRENCY,
    {
        f"an unset {name}": _unset(field)
        for name, field in (
            ("principal", "principal"),
            ("total", "total"),
            ("fee line amount", "line"),
            ("instalment amount", "instalment"),
        )
    },
)
_terms_case(
    "TRM-19/date-horizon",
    "Terms dated more than 1830 days after the bill's due date, up to the year 9999, are refused with INVALID_TERMS",
    "No scheduled date of any terms may be more than `MAX_TERMS_HORIZON_DAYS` (1830, §14) days after the bill's "
    "`due_date`; a receiver MUST refuse such terms with `INVALID_TERMS`",
    Reason.INVALID_TERMS,
    {
        "a deferral 1831 days after the due date": lambda b: terms(
            _DEFERRAL, [(_late(b, MAX_TERMS_HORIZON_DAYS + 1), AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE)]
        ),
        "a deferral to 9999-12-31": lambda b: terms(
            _DEFERRAL, [("9999-12-31", AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE)]
        ),
    },
)
_terms_case(
    "TRM-6/explicit-lines",
    "A total above the principal without a fee line is TOTAL_MISMATCH; a line of zero is AMOUNT_OUT_OF_RANGE",
    "Every amount by which the total differs from the principal MUST be an explicit line with a positive amount",
    Reason.TOTAL_MISMATCH,
    {
        "the deferral fee in the total but no fee line": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE)], total=AMOUNT_DUE + DEFERRAL_FEE
        ),
    },
)
_terms_case(
    "TRM-6/positive-lines",
    "A line of zero beside the fee (the total unchanged) is refused with AMOUNT_OUT_OF_RANGE",
    "Every amount by which the total differs from the principal MUST be an explicit line with a positive amount",
    Reason.AMOUNT_OUT_OF_RANGE,
    {
        "a zero discount line beside the fee": lambda b: terms(
            _DEFERRAL, [(_late(b), AMOUNT_DUE + DEFERRAL_FEE)], lines=[(_FEE, DEFERRAL_FEE), (_DISCOUNT, 0)]
        ),
    },
)
