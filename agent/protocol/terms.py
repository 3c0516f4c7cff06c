"""Exact terms: money, dates, schedules, bills and their advertised options (PROTOCOL.md §7-§8).

Money is integer minor units of an ISO 4217 currency (never a float); dates are
`datetime.date`, "YYYY-MM-DD" on the wire. Decoding (`from_proto`) checks structure
only; `validate_terms` checks a terms' arithmetic and shape, `validate_against_bill`
checks it against the bill it settles, and `within_options` decides whether it lies
inside the options the biller advertised (NEG-12). Every check raises
`LocalProtocolError`; callers checking received input convert it with `.as_remote()`.
"""

from __future__ import annotations

import calendar
import contextlib
import enum
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta
from importlib import resources
from itertools import pairwise
from typing import TypeVar

from agent.protocol.errors import LocalProtocolError, Reason
from agent.protocol.limits import (
    AMOUNT_MAJOR_DIGITS,
    DEFAULT_LIMITS,
    MAX_ID_CHARS,
    MAX_LINES,
    MAX_TERMS_HORIZON_DAYS,
    MAX_TEXT_CHARS,
    Limits,
)
from parley.v1 import bill_pb2, terms_pb2

_P = TypeVar("_P")
_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.IntEnum)

UINT32_MAX = 2**32 - 1  # the largest value of a uint32 wire field: counts and numbers of days
_DECIMAL = re.compile(r"([0-9]{1,32})(?:\.([0-9]{1,32}))?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _field(path: str, decode: Callable[[_P], _T], value: _P) -> _T:
    """`decode(value)`, prefixing the detail of any failure with the field's path."""
    try:
        return decode(value)
    except LocalProtocolError as error:
        raise LocalProtocolError(error.reason, f"{path}: {error.detail}") from error


def _enum(kind: type[_E], value: int) -> _E:
    """TRM-5: a known, specified enum value (UNSPECIFIED and unknown numbers are INVALID_TERMS)."""
    try:
        return kind(value)
    except ValueError:
        raise LocalProtocolError(Reason.INVALID_TERMS, f"{value} is not a valid {kind.__name__}") from None


def _check_length(path: str, text: str, maximum: int, minimum: int = 0) -> None:
    """A string field's length is within [minimum, maximum] characters (INVALID_TERMS)."""
    if not minimum <= len(text) <= maximum:
        raise LocalProtocolError(
            Reason.INVALID_TERMS, f"{path} has {len(text)} characters; allowed {minimum}..{maximum}"
        )


def _check_uint32(path: str, value: int, minimum: int = 0) -> None:
    """A count or number of days fits its uint32 wire field and is at least `minimum` (INVALID_TERMS)."""
    if not minimum <= value <= UINT32_MAX:
        raise LocalProtocolError(Reason.INVALID_TERMS, f"{path} is {value}; allowed {minimum}..{UINT32_MAX}")


def _check_count(count: int) -> None:
    """Schedule helpers produce at least one element."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")


# --- Money -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Currency:
    """An ISO 4217 currency with minor units (TRM-1); obtain one with `Currency.of`."""

    code: str
    exponent: int

    @classmethod
    def of(cls, code: str) -> Currency:
        """TRM-1: the currency for an upper-case ISO 4217 code with minor units, else UNKNOWN_CURRENCY."""
        try:
            return _CURRENCIES[code]
        except KeyError:
            raise LocalProtocolError(
                Reason.UNKNOWN_CURRENCY, f"{code!r} is not an ISO 4217 currency code with minor units"
            ) from None


def _shipped_currency_table() -> tuple[str, dict[str, Currency]]:
    """TRM-1, TRM-17: the dated ISO 4217 table shipped in agent/data/currencies.json, read once.

    The table is package data, not a library's idea of "the current edition", so every
    verifier of one protocol revision agrees on which codes exist (the vectors carry the
    same table). Codes whose minor units are "N.A." (XAU, XXX...) are not in it; lower-case
    and malformed codes never match.
    """
    text = resources.files("agent").joinpath("data/currencies.json").read_text(encoding="utf-8")
    table = json.loads(text)
    return table["edition"], {code: Currency(code, exponent) for code, exponent in table["minorUnits"].items()}


CURRENCY_TABLE_EDITION, _CURRENCIES = _shipped_currency_table()


def currency_minor_units() -> dict[str, int]:
    """The currency table in force (TRM-1): ISO 4217 code -> minor units, as shipped."""
    return {code: currency.exponent for code, currency in _CURRENCIES.items()}


@dataclass(frozen=True)
class Money:
    """An exact amount: integer minor units of one currency (TRM-1, TRM-3).

    Construction enforces TRM-3: 0 ≤ minor < 10**(AMOUNT_MAJOR_DIGITS + exponent), and
    `minor` is an int (not a bool). `+`, `-` and the orderings only combine amounts of
    one currency (TRM-2, CURRENCY_MISMATCH); a negative difference is AMOUNT_OUT_OF_RANGE.
    """

    currency: Currency
    minor: int

    def __post_init__(self) -> None:
        bound = 10 ** (AMOUNT_MAJOR_DIGITS + self.currency.exponent)
        if type(self.minor) is not int or not 0 <= self.minor < bound:
            raise LocalProtocolError(
                Reason.AMOUNT_OUT_OF_RANGE,
                f"{self.minor!r} minor units of {self.currency.code} is outside 0..{bound - 1}",
            )

    @classmethod
    def of(cls, minor: int, code: str) -> Money:
        """`minor` units of the currency `code`."""
        return cls(Currency.of(code), minor)

    @classmethod
    def zero(cls, code: str) -> Money:
        """No money in the currency `code`."""
        return cls.of(0, code)

    @classmethod
    def parse(cls, text: str, code: str) -> Money:
        """Exact decimal text in major units, e.g. "12.34" (TRM-3).

        Only ASCII digits with an optional "." and at most `exponent` decimals; signs,
        exponents, spaces and other characters are AMOUNT_OUT_OF_RANGE.
        """
        currency = Currency.of(code)
        match = _DECIMAL.fullmatch(text)
        if match is None:
            raise LocalProtocolError(Reason.AMOUNT_OUT_OF_RANGE, f"{text!r} is not a plain decimal amount")
        whole, fraction = match.group(1), match.group(2) or ""
        if len(fraction) > currency.exponent:
            raise LocalProtocolError(
                Reason.AMOUNT_OUT_OF_RANGE, f"{text!r} has more than {currency.exponent} decimals for {code}"
            )
        return cls(currency, int(whole + fraction.ljust(currency.exponent, "0")))

    def __str__(self) -> str:
        """The code and the exact decimal amount: "EUR 12.34", "JPY 1200", "BHD 1.500"."""
        exponent = self.currency.exponent
        if exponent == 0:
            return f"{self.currency.code} {self.minor}"
        whole, fraction = divmod(self.minor, 10**exponent)
        return f"{self.currency.code} {whole}.{fraction:0{exponent}d}"

    def _minor_of(self, other: Money) -> int:
        """`other`'s minor units, once it is known to be in this currency (TRM-2)."""
        if other.currency != self.currency:
            raise LocalProtocolError(
                Reason.CURRENCY_MISMATCH, f"cannot combine {self.currency.code} with {other.currency.code}"
            )
        return other.minor

    def __add__(self, other: Money) -> Money:
        return Money(self.currency, self.minor + self._minor_of(other))

    def __sub__(self, other: Money) -> Money:
        return Money(self.currency, self.minor - self._minor_of(other))

    def __lt__(self, other: Money) -> bool:
        return self.minor < self._minor_of(other)

    def __le__(self, other: Money) -> bool:
        return self.minor <= self._minor_of(other)

    def __gt__(self, other: Money) -> bool:
        return self.minor > self._minor_of(other)

    def __ge__(self, other: Money) -> bool:
        return self.minor >= self._minor_of(other)

    def to_proto(self) -> terms_pb2.Money:
        return terms_pb2.Money(currency_code=self.currency.code, amount_minor=self.minor)

    @classmethod
    def from_proto(cls, pb: terms_pb2.Money) -> Money:
        """TRM-1, TRM-3; and TRM-16: a required Money left unset reads as proto3's default, an
        empty Money, so it fails here as UNKNOWN_CURRENCY at its place in decoding order."""
        return cls.of(pb.amount_minor, pb.currency_code)


def _optional_to_proto(money: Money | None) -> terms_pb2.Money | None:
    return None if money is None else money.to_proto()


# --- Dates -------------------------------------------------------------------------------------


def parse_date(text: str) -> date:
    """TRM-4: exactly "YYYY-MM-DD" (10 ASCII characters) naming a real calendar date."""
    if _DATE.fullmatch(text):
        with contextlib.suppress(ValueError):
            return date.fromisoformat(text)
    raise LocalProtocolError(Reason.INVALID_DATE, f"{text!r} is not a YYYY-MM-DD calendar date")


def format_date(day: date) -> str:
    """TRM-4: "YYYY-MM-DD"."""
    return day.isoformat()


def shift_days(day: date, days: int) -> date:
    """`day` moved by `days`, clamped to the calendar's ends (date.min..date.max) instead of overflowing:
    every reminder, grace period and deadline computed from a date received or stored goes through here,
    so no date, however extreme, can make date arithmetic raise."""
    ordinal = min(max(day.toordinal() + days, date.min.toordinal()), date.max.toordinal())
    return date.fromordinal(ordinal)


def _month_after(first: date, months: int) -> date:
    year, month_index = divmod(first.year * 12 + first.month - 1 + months, 12)
    month = month_index + 1
    return date(year, month, min(first.day, calendar.monthrange(year, month)[1]))


def monthly_dates(first: date, count: int) -> tuple[date, ...]:
    """`count` dates a month apart on `first`'s day of the month, each clamped to its month's end.

    The clamp starts from `first.day` every month: Jan 31 → Feb 28/29 → Mar 31.
    ValueError if count < 1.
    """
    _check_count(count)
    if first.year * 12 + first.month - 1 + count - 1 >= 10000 * 12:
        raise ValueError(f"{count} monthly dates from {first} run past year 9999")
    return tuple(_month_after(first, months) for months in range(count))


def every_days(first: date, count: int, days: int) -> tuple[date, ...]:
    """`count` dates `days` apart starting at `first`. ValueError if count < 1 or days < 1."""
    _check_count(count)
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if first.toordinal() + days * (count - 1) > date.max.toordinal():
        raise ValueError(f"{count} dates {days} days apart from {first} run past year 9999")
    return tuple(first + timedelta(days=days * index) for index in range(count))


# --- Terms -------------------------------------------------------------------------------------


class TermsKind(enum.IntEnum):
    """TRM-5: the kinds of terms, numbered as in terms.proto."""

    PAY_IN_FULL = terms_pb2.TERMS_KIND_PAY_IN_FULL
    DEFERRAL = terms_pb2.TERMS_KIND_DEFERRAL
    INSTALMENT_PLAN = terms_pb2.TERMS_KIND_INSTALMENT_PLAN
    SETTLEMENT = terms_pb2.TERMS_KIND_SETTLEMENT


class LineKind(enum.IntEnum):
    """TRM-6: the kinds of explicit adjustment lines, numbered as in terms.proto."""

    FEE = terms_pb2.LINE_KIND_FEE
    DISCOUNT = terms_pb2.LINE_KIND_DISCOUNT
    SETTLEMENT_REDUCTION = terms_pb2.LINE_KIND_SETTLEMENT_REDUCTION


@dataclass(frozen=True)
class Line:
    """An explicit fee, discount or settlement reduction (TRM-6)."""

    kind: LineKind
    description: str
    amount: Money

    def to_proto(self) -> terms_pb2.Line:
        return terms_pb2.Line(
            kind=terms_pb2.LineKind.ValueType(self.kind), description=self.description, amount=self.amount.to_proto()
        )

    @classmethod
    def from_proto(cls, pb: terms_pb2.Line) -> Line:
        return cls(
            _field("kind", lambda value: _enum(LineKind, value), pb.kind),
            pb.description,
            _field("amount", Money.from_proto, pb.amount),
        )


@dataclass(frozen=True)
class Instalment:
    """One scheduled payment."""

    due_date: date
    amount: Money

    def to_proto(self) -> terms_pb2.Instalment:
        return terms_pb2.Instalment(due_date=format_date(self.due_date), amount=self.amount.to_proto())

    @classmethod
    def from_proto(cls, pb: terms_pb2.Instalment) -> Instalment:
        return cls(_field("due_date", parse_date, pb.due_date), _field("amount", Money.from_proto, pb.amount))


@dataclass(frozen=True)
class Terms:
    """Exact terms of an arrangement (TRM-5..TRM-9); check them with `validate_terms`."""

    kind: TermsKind
    principal: Money
    lines: tuple[Line, ...]
    total: Money
    schedule: tuple[Instalment, ...]
    hardship_programme_id: str = ""

    def to_proto(self) -> terms_pb2.Terms:
        return terms_pb2.Terms(
            kind=terms_pb2.TermsKind.ValueType(self.kind),
            principal=self.principal.to_proto(),
            lines=[line.to_proto() for line in self.lines],
            total=self.total.to_proto(),
            schedule=[instalment.to_proto() for instalment in self.schedule],
            hardship_programme_id=self.hardship_programme_id,
        )

    @classmethod
    def from_proto(cls, pb: terms_pb2.Terms) -> Terms:
        """Structural decoding only (TRM-1, TRM-3, TRM-4, TRM-5 enum values); no arithmetic checks."""
        return cls(
            kind=_field("kind", lambda value: _enum(TermsKind, value), pb.kind),
            principal=_field("principal", Money.from_proto, pb.principal),
            lines=tuple(_field(f"lines[{i}]", Line.from_proto, line) for i, line in enumerate(pb.lines)),
            total=_field("total", Money.from_proto, pb.total),
            schedule=tuple(
                _field(f"schedule[{i}]", Instalment.from_proto, instalment) for i, instalment in enumerate(pb.schedule)
            ),
            hardship_programme_id=pb.hardship_programme_id,
        )


def split_evenly(total: Money, count: int) -> tuple[Money, ...]:
    """TRM-10: `count` shares summing exactly to `total`, differing by at most one minor unit.

    base = total // count and r = total - base * count; the first r shares are base + 1.
    ValueError if count < 1 or a share would be zero.
    """
    _check_count(count)
    base, remainder = divmod(total.minor, count)
    if base == 0:
        raise ValueError(f"{total} cannot be split into {count} positive shares")
    return tuple(Money(total.currency, base + 1 if index < remainder else base) for index in range(count))


def _total_minor(principal: Money, lines: Sequence[Line]) -> int:
    """TRM-7: principal + fees − discounts − settlement reductions, in minor units."""
    return principal.minor + sum(
        line.amount.minor if line.kind is LineKind.FEE else -line.amount.minor for line in lines
    )


def build_terms(
    kind: TermsKind,
    principal: Money,
    due_dates: Sequence[date],
    lines: Sequence[Line] = (),
    hardship_programme_id: str = "",
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Terms:
    """Terms with the TRM-7 total split over `due_dates` by the remainder rule (TRM-10).

    The result passes `validate_terms(terms, limits)`, which is applied before returning
    (so inconsistent arguments raise its LocalProtocolError). ValueError, from
    `split_evenly`, if `due_dates` is empty or the total is less than one minor unit per date.
    """
    total = Money(principal.currency, _total_minor(principal, lines))
    shares = split_evenly(total, len(due_dates))
    terms = Terms(
        kind,
        principal,
        tuple(lines),
        total,
        tuple(Instalment(day, share) for day, share in zip(due_dates, shares, strict=True)),
        hardship_programme_id,
    )
    validate_terms(terms, limits)
    return terms


def validate_terms(terms: Terms, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a terms' arithmetic and shape, in this order, each failure its own reason.

    - CURRENCY_MISMATCH (TRM-2): an amount's currency differs from the principal's.
    - AMOUNT_OUT_OF_RANGE (TRM-3): principal, total, a line or an instalment is zero.
    - INVALID_TERMS (TRM-5, TRM-6): PAY_IN_FULL, DEFERRAL and SETTLEMENT have exactly one
      instalment, INSTALMENT_PLAN at least two; more than MAX_LINES lines; SETTLEMENT has
      exactly one SETTLEMENT_REDUCTION line and the other kinds none; DISCOUNT lines only
      on PAY_IN_FULL; a description over MAX_TEXT_CHARS; a hardship id over MAX_ID_CHARS.
    - TOO_MANY_INSTALMENTS (LIM-6): more than `limits.max_instalments`.
    - TOTAL_MISMATCH (TRM-7): total ≠ principal + fees − discounts − settlement reductions.
    - SCHEDULE_SUM_MISMATCH (TRM-8): the instalments do not sum exactly to total.
    - SCHEDULE_DATES_NOT_INCREASING (TRM-9): a date is not after the one before it.
    """
    amounts = [
        ("principal", terms.principal),
        ("total", terms.total),
        *((f"lines[{i}].amount", line.amount) for i, line in enumerate(terms.lines)),
        *((f"schedule[{i}].amount", instalment.amount) for i, instalment in enumerate(terms.schedule)),
    ]
    currency = terms.principal.currency
    for path, amount in amounts:
        if amount.currency != currency:
            raise LocalProtocolError(
                Reason.CURRENCY_MISMATCH, f"{path} is in {amount.currency.code}; principal is in {currency.code}"
            )
    for path, amount in amounts:
        if amount.minor == 0:
            raise LocalProtocolError(Reason.AMOUNT_OUT_OF_RANGE, f"{path} is zero; it must be positive")

    kind, count = terms.kind, len(terms.schedule)
    if kind is TermsKind.INSTALMENT_PLAN and count < 2:
        raise LocalProtocolError(Reason.INVALID_TERMS, f"INSTALMENT_PLAN needs at least 2 instalments, has {count}")
    if kind is not TermsKind.INSTALMENT_PLAN and count != 1:
        raise LocalProtocolError(Reason.INVALID_TERMS, f"{kind.name} needs exactly 1 instalment, has {count}")
    if len(terms.lines) > MAX_LINES:
        raise LocalProtocolError(Reason.INVALID_TERMS, f"{len(terms.lines)} lines; at most {MAX_LINES} allowed")
    reductions = sum(line.kind is LineKind.SETTLEMENT_REDUCTION for line in terms.lines)
    wanted = 1 if kind is TermsKind.SETTLEMENT else 0
    if reductions != wanted:
        raise LocalProtocolError(
            Reason.INVALID_TERMS, f"{kind.name} needs {wanted} SETTLEMENT_REDUCTION lines, has {reductions}"
        )
    for i, line in enumerate(terms.lines):
        if line.kind is LineKind.DISCOUNT and kind is not TermsKind.PAY_IN_FULL:
            raise LocalProtocolError(Reason.INVALID_TERMS, f"lines[{i}] is a DISCOUNT, allowed only on PAY_IN_FULL")
        _check_length(f"lines[{i}].description", line.description, MAX_TEXT_CHARS)
    _check_length("hardship_programme_id", terms.hardship_programme_id, MAX_ID_CHARS)

    if count > limits.max_instalments:
        raise LocalProtocolError(
            Reason.TOO_MANY_INSTALMENTS, f"{count} instalments; at most {limits.max_instalments} allowed"
        )
    expected = _total_minor(terms.principal, terms.lines)
    if terms.total.minor != expected:
        raise LocalProtocolError(
            Reason.TOTAL_MISMATCH,
            f"total is {terms.total.minor} minor units; principal + fees - discounts - reductions is {expected}",
        )
    scheduled = sum(instalment.amount.minor for instalment in terms.schedule)
    if scheduled != terms.total.minor:
        raise LocalProtocolError(
            Reason.SCHEDULE_SUM_MISMATCH,
            f"schedule sums to {scheduled} minor units; total is {terms.total.minor}",
        )
    for i, (before, after) in enumerate(pairwise(terms.schedule), start=1):
        if after.due_date <= before.due_date:
            raise LocalProtocolError(
                Reason.SCHEDULE_DATES_NOT_INCREASING,
                f"schedule[{i}].due_date {after.due_date} is not after schedule[{i - 1}].due_date {before.due_date}",
            )


# --- Bills and advertised options (bill.proto) -------------------------------------------------


@dataclass(frozen=True)
class DeferralOption:
    """Paying in one payment up to `max_days` after the due date; `fee` absent or zero is free."""

    max_days: int
    fee: Money | None = None

    def to_proto(self) -> bill_pb2.DeferralOption:
        return bill_pb2.DeferralOption(max_days=self.max_days, fee=_optional_to_proto(self.fee))

    @classmethod
    def from_proto(cls, pb: bill_pb2.DeferralOption) -> DeferralOption:
        return cls(pb.max_days, _field("fee", Money.from_proto, pb.fee) if pb.HasField("fee") else None)


@dataclass(frozen=True)
class InstalmentOption:
    """Paying in 2..max_count instalments of at least `min_amount`; `fee` absent or zero is free."""

    max_count: int
    min_amount: Money
    min_interval_days: int
    max_interval_days: int
    max_first_delay_days: int
    fee: Money | None = None

    def to_proto(self) -> bill_pb2.InstalmentOption:
        return bill_pb2.InstalmentOption(
            max_count=self.max_count,
            min_amount=self.min_amount.to_proto(),
            min_interval_days=self.min_interval_days,
            max_interval_days=self.max_interval_days,
            max_first_delay_days=self.max_first_delay_days,
            fee=_optional_to_proto(self.fee),
        )

    @classmethod
    def from_proto(cls, pb: bill_pb2.InstalmentOption) -> InstalmentOption:
        return cls(
            max_count=pb.max_count,
            min_amount=_field("min_amount", Money.from_proto, pb.min_amount),
            min_interval_days=pb.min_interval_days,
            max_interval_days=pb.max_interval_days,
            max_first_delay_days=pb.max_first_delay_days,
            fee=_field("fee", Money.from_proto, pb.fee) if pb.HasField("fee") else None,
        )


@dataclass(frozen=True)
class EarlyPaymentDiscount:
    """`discount` off for paying in full by `pay_by_date`."""

    pay_by_date: date
    discount: Money

    def to_proto(self) -> bill_pb2.EarlyPaymentDiscount:
        return bill_pb2.EarlyPaymentDiscount(
            pay_by_date=format_date(self.pay_by_date), discount=self.discount.to_proto()
        )

    @classmethod
    def from_proto(cls, pb: bill_pb2.EarlyPaymentDiscount) -> EarlyPaymentDiscount:
        return cls(_field("pay_by_date", parse_date, pb.pay_by_date), _field("discount", Money.from_proto, pb.discount))


@dataclass(frozen=True)
class HardshipProgramme:
    """A hardship programme; claiming it replaces the limits of the advertised options (bill.proto)."""

    programme_id: str
    description: str
    fees_waived: bool
    max_deferral_days: int
    max_instalments: int
    min_instalment_amount: Money | None
    max_interval_days: int
    max_first_delay_days: int
    requires_disclosure: bool

    def to_proto(self) -> bill_pb2.HardshipProgramme:
        return bill_pb2.HardshipProgramme(
            programme_id=self.programme_id,
            description=self.description,
            fees_waived=self.fees_waived,
            max_deferral_days=self.max_deferral_days,
            max_instalments=self.max_instalments,
            min_instalment_amount=_optional_to_proto(self.min_instalment_amount),
            max_interval_days=self.max_interval_days,
            max_first_delay_days=self.max_first_delay_days,
            requires_disclosure=self.requires_disclosure,
        )

    @classmethod
    def from_proto(cls, pb: bill_pb2.HardshipProgramme) -> HardshipProgramme:
        return cls(
            programme_id=pb.programme_id,
            description=pb.description,
            fees_waived=pb.fees_waived,
            max_deferral_days=pb.max_deferral_days,
            max_instalments=pb.max_instalments,
            min_instalment_amount=(
                _field("min_instalment_amount", Money.from_proto, pb.min_instalment_amount)
                if pb.HasField("min_instalment_amount")
                else None
            ),
            max_interval_days=pb.max_interval_days,
            max_first_delay_days=pb.max_first_delay_days,
            requires_disclosure=pb.requires_disclosure,
        )


@dataclass(frozen=True)
class AdvertisedOptions:
    """The arrangements a biller commits to accept (NEG-12); an absent option is not offered."""

    deferral: DeferralOption | None = None
    instalments: InstalmentOption | None = None
    early_payment: EarlyPaymentDiscount | None = None
    hardship_programmes: tuple[HardshipProgramme, ...] = ()

    def to_proto(self) -> bill_pb2.AdvertisedOptions:
        return bill_pb2.AdvertisedOptions(
            deferral=None if self.deferral is None else self.deferral.to_proto(),
            instalments=None if self.instalments is None else self.instalments.to_proto(),
            early_payment=None if self.early_payment is None else self.early_payment.to_proto(),
            hardship_programmes=[programme.to_proto() for programme in self.hardship_programmes],
        )

    @classmethod
    def from_proto(cls, pb: bill_pb2.AdvertisedOptions) -> AdvertisedOptions:
        return cls(
            deferral=_field("deferral", DeferralOption.from_proto, pb.deferral) if pb.HasField("deferral") else None,
            instalments=(
                _field("instalments", InstalmentOption.from_proto, pb.instalments)
                if pb.HasField("instalments")
                else None
            ),
            early_payment=(
                _field("early_payment", EarlyPaymentDiscount.from_proto, pb.early_payment)
                if pb.HasField("early_payment")
                else None
            ),
            hardship_programmes=tuple(
                _field(f"hardship_programmes[{i}]", HardshipProgramme.from_proto, programme)
                for i, programme in enumerate(pb.hardship_programmes)
            ),
        )


def outstanding_balance(amount_due: Money, received: Iterable[Money]) -> Money:
    """PAY-16: a bill's outstanding balance — its amount due less every amount received for it, under any
    agreement or none. The one implementation: the biller (what an intent without agreement carries, what
    RENEGOTIATION_OFFERED states, `BillFacts.outstanding`) and the consumer (what it pays and restates after
    a broken plan, from its own record of payments) both compute it here.

    LocalProtocolError (CURRENCY_MISMATCH) for an amount in another currency; ValueError when what was
    received adds up to more than the amount due (no receipt may say so, PAY-16).
    """
    total = 0
    for amount in received:
        total += amount_due._minor_of(amount)  # CURRENCY_MISMATCH for another currency
        if total > amount_due.minor:
            raise ValueError(f"more than the {amount_due} due was received for the bill")
    return Money(amount_due.currency, amount_due.minor - total)


@dataclass(frozen=True)
class BillFacts:
    """What a bill fixes for negotiation: the amount due, its dates and the advertised options.

    Construction validates the bill (so decoded and locally built bills are both checked):
    - INVALID_TERMS: bill_id and account_id empty or over MAX_ID_CHARS, description over
      MAX_TEXT_CHARS, due_date before issue_date, a count or day number outside uint32,
      instalments.max_count < 2, min_interval_days > max_interval_days, early_payment
      pay_by_date outside issue_date..due_date, a programme id empty, over MAX_ID_CHARS or
      repeated, a programme description over MAX_TEXT_CHARS.
    - CURRENCY_MISMATCH (TRM-2): an option's amount is not in the amount due's currency.
    - AMOUNT_OUT_OF_RANGE (TRM-3): amount_due zero; the early-payment discount zero or not
      below the amount due; `received_minor` negative or not below the amount due; the amount due
      plus the deferral's or the instalment plan's fee past the amount ceiling (BIL-2 item 9).

    `received_minor` is not part of the bill: it is what was received for it before the
    negotiation opened (PAY-16), so `outstanding` — amount due less that — is the principal
    its terms restate (TRM-11). 0 for a bill nothing was paid on; `with_received` sets it.
    """

    bill_id: str
    account_id: str
    amount_due: Money
    issue_date: date
    due_date: date
    description: str
    options: AdvertisedOptions
    received_minor: int = 0

    @property
    def outstanding(self) -> Money:
        """The outstanding balance when the negotiation opened (PAY-16): what its terms' principal is (TRM-11)."""
        return outstanding_balance(self.amount_due, [Money(self.amount_due.currency, self.received_minor)])

    def with_received(self, received_minor: int) -> BillFacts:
        """These facts for a negotiation opened after `received_minor` was received for the bill."""
        return self if received_minor == self.received_minor else replace(self, received_minor=received_minor)

    def restated_by(self, principal: Money) -> BillFacts:
        """These facts as a thread whose opening restated `principal` saw them (TRM-11): received is the amount
        due less it. A replayed thread is judged against the balance it opened on, whatever was paid since;
        a principal that is no balance of this bill (another currency, zero, more than due) gives 0 received,
        so the thread's own terms are then refused as they were (PRINCIPAL_MISMATCH)."""
        if principal.currency != self.amount_due.currency or not 0 < principal.minor <= self.amount_due.minor:
            return self.with_received(0)
        return self.with_received(self.amount_due.minor - principal.minor)

    def __post_init__(self) -> None:
        _check_length("bill_id", self.bill_id, MAX_ID_CHARS, minimum=1)
        _check_length("account_id", self.account_id, MAX_ID_CHARS, minimum=1)
        _check_length("description", self.description, MAX_TEXT_CHARS)
        for path, amount in self._option_amounts():
            if amount.currency != self.amount_due.currency:
                raise LocalProtocolError(
                    Reason.CURRENCY_MISMATCH,
                    f"{path} is in {amount.currency.code}; amount_due is in {self.amount_due.currency.code}",
                )
        if self.amount_due.minor == 0:
            raise LocalProtocolError(Reason.AMOUNT_OUT_OF_RANGE, "amount_due is zero; it must be positive")
        if not 0 <= self.received_minor < self.amount_due.minor:
            raise LocalProtocolError(
                Reason.AMOUNT_OUT_OF_RANGE,
                f"received {self.received_minor} minor units: it must be 0 or more and below amount_due",
            )
        if self.due_date < self.issue_date:
            raise LocalProtocolError(
                Reason.INVALID_TERMS, f"due_date {self.due_date} is before issue_date {self.issue_date}"
            )
        options = self.options
        if options.deferral is not None:
            _check_uint32("options.deferral.max_days", options.deferral.max_days)
        if options.instalments is not None:
            plan = options.instalments
            _check_uint32("options.instalments.max_count", plan.max_count, minimum=2)
            _check_uint32("options.instalments.min_interval_days", plan.min_interval_days)
            _check_uint32("options.instalments.max_interval_days", plan.max_interval_days, plan.min_interval_days)
            _check_uint32("options.instalments.max_first_delay_days", plan.max_first_delay_days)
        if options.early_payment is not None:
            early = options.early_payment
            if not self.issue_date <= early.pay_by_date <= self.due_date:
                raise LocalProtocolError(
                    Reason.INVALID_TERMS,
                    f"options.early_payment.pay_by_date {early.pay_by_date} is outside "
                    f"{self.issue_date}..{self.due_date}",
                )
            if not 0 < early.discount.minor < self.amount_due.minor:
                raise LocalProtocolError(
                    Reason.AMOUNT_OUT_OF_RANGE,
                    f"options.early_payment.discount {early.discount} must be positive and below amount_due",
                )
        seen: set[str] = set()
        for i, programme in enumerate(options.hardship_programmes):
            path = f"options.hardship_programmes[{i}]"
            _check_length(f"{path}.programme_id", programme.programme_id, MAX_ID_CHARS, minimum=1)
            if programme.programme_id in seen:
                raise LocalProtocolError(
                    Reason.INVALID_TERMS, f"{path}.programme_id {programme.programme_id!r} is repeated"
                )
            seen.add(programme.programme_id)
            _check_length(f"{path}.description", programme.description, MAX_TEXT_CHARS)
            for name in ("max_deferral_days", "max_instalments", "max_interval_days", "max_first_delay_days"):
                _check_uint32(f"{path}.{name}", getattr(programme, name))
        for path, fee in self._fees():
            try:  # BIL-2 item 9: terms that take the option (the amount due plus its fee) must be expressible
                self.amount_due + fee
            except LocalProtocolError as error:
                raise LocalProtocolError(
                    Reason.AMOUNT_OUT_OF_RANGE,
                    f"amount_due {self.amount_due} plus {path} {fee} is above the amount ceiling: "
                    "no terms could take that option",
                ) from error

    def _fees(self) -> Iterator[tuple[str, Money]]:
        options = self.options
        if options.deferral is not None and options.deferral.fee is not None:
            yield "options.deferral.fee", options.deferral.fee
        if options.instalments is not None and options.instalments.fee is not None:
            yield "options.instalments.fee", options.instalments.fee

    def _option_amounts(self) -> Iterator[tuple[str, Money]]:
        options = self.options
        if options.deferral is not None and options.deferral.fee is not None:
            yield "options.deferral.fee", options.deferral.fee
        if options.instalments is not None:
            yield "options.instalments.min_amount", options.instalments.min_amount
            if options.instalments.fee is not None:
                yield "options.instalments.fee", options.instalments.fee
        if options.early_payment is not None:
            yield "options.early_payment.discount", options.early_payment.discount
        for i, programme in enumerate(options.hardship_programmes):
            if programme.min_instalment_amount is not None:
                yield f"options.hardship_programmes[{i}].min_instalment_amount", programme.min_instalment_amount

    def programme(self, programme_id: str) -> HardshipProgramme | None:
        """The advertised hardship programme with this id, if any."""
        return next((p for p in self.options.hardship_programmes if p.programme_id == programme_id), None)

    def to_proto(self) -> bill_pb2.Bill:
        """The bill's body; the caller sets the header."""
        return bill_pb2.Bill(
            bill_id=self.bill_id,
            account_id=self.account_id,
            amount_due=self.amount_due.to_proto(),
            issue_date=format_date(self.issue_date),
            due_date=format_date(self.due_date),
            description=self.description,
            options=self.options.to_proto(),
        )

    @classmethod
    def from_proto(cls, pb: bill_pb2.Bill) -> BillFacts:
        """Decode and validate a bill's body; its header is ignored (checked by the envelope layer)."""
        return cls(
            bill_id=pb.bill_id,
            account_id=pb.account_id,
            amount_due=_field("amount_due", Money.from_proto, pb.amount_due),
            issue_date=_field("issue_date", parse_date, pb.issue_date),
            due_date=_field("due_date", parse_date, pb.due_date),
            description=pb.description,
            options=_field("options", AdvertisedOptions.from_proto, pb.options),
        )


def validate_against_bill(terms: Terms, bill: BillFacts) -> None:
    """Check terms against the bill they settle.

    - CURRENCY_MISMATCH (TRM-2): principal not in the amount due's currency.
    - PRINCIPAL_MISMATCH (TRM-11): principal ≠ the outstanding balance (the amount due less what was
      received before the negotiation opened, PAY-16).
    - INVALID_TERMS (TRM-12, TRM-19): a date before the issue date; a date more than
      MAX_TERMS_HORIZON_DAYS after the due date; PAY_IN_FULL dated after the due date;
      DEFERRAL dated on or before the due date; SETTLEMENT total not below the principal;
      a hardship_programme_id the bill does not advertise.
    """
    if terms.principal.currency != bill.amount_due.currency:
        raise LocalProtocolError(
            Reason.CURRENCY_MISMATCH,
            f"principal is in {terms.principal.currency.code}; the bill is in {bill.amount_due.currency.code}",
        )
    if terms.principal != bill.outstanding:
        owed = (
            f"the bill's amount due is {bill.amount_due}"
            if bill.received_minor == 0
            else f"the bill's outstanding balance is {bill.outstanding} ({bill.amount_due} due, "
            f"{Money(bill.amount_due.currency, bill.received_minor)} received)"
        )
        raise LocalProtocolError(Reason.PRINCIPAL_MISMATCH, f"principal is {terms.principal}; {owed}")
    for i, instalment in enumerate(terms.schedule):
        day, path = instalment.due_date, f"schedule[{i}].due_date {instalment.due_date}"
        if day < bill.issue_date:
            raise LocalProtocolError(Reason.INVALID_TERMS, f"{path} is before the issue date {bill.issue_date}")
        if (day - bill.due_date).days > MAX_TERMS_HORIZON_DAYS:  # a difference: cannot overflow
            raise LocalProtocolError(
                Reason.INVALID_TERMS,
                f"{path} is more than {MAX_TERMS_HORIZON_DAYS} days after the due date {bill.due_date} (TRM-19)",
            )
        if terms.kind is TermsKind.PAY_IN_FULL and day > bill.due_date:
            raise LocalProtocolError(Reason.INVALID_TERMS, f"{path} is after the due date {bill.due_date}")
        if terms.kind is TermsKind.DEFERRAL and day <= bill.due_date:
            raise LocalProtocolError(Reason.INVALID_TERMS, f"{path} is not after the due date {bill.due_date}")
    if terms.kind is TermsKind.SETTLEMENT and terms.total.minor >= terms.principal.minor:
        raise LocalProtocolError(Reason.INVALID_TERMS, f"SETTLEMENT total {terms.total} is not below the principal")
    if terms.hardship_programme_id and bill.programme(terms.hardship_programme_id) is None:
        raise LocalProtocolError(
            Reason.INVALID_TERMS, f"hardship_programme_id {terms.hardship_programme_id!r} is not offered by the bill"
        )


def _fee_lines_ok(lines: tuple[Line, ...], fee: Money | None, programme: HardshipProgramme | None) -> bool:
    """The fee rule: one FEE line equal to the fee when it is > 0 and not waived, else no lines."""
    if fee is None or fee.minor == 0 or (programme is not None and programme.fees_waived):
        return not lines
    return len(lines) == 1 and lines[0].kind is LineKind.FEE and lines[0].amount == fee


def within_options(terms: Terms, bill: BillFacts, *, hardship_disclosed: bool, limits: Limits = DEFAULT_LIMITS) -> bool:
    """NEG-12: whether the terms lie inside the options the bill advertised (the biller must accept).

    The rule, exactly:
    1. The terms pass `validate_terms(terms, limits)` and `validate_against_bill(terms, bill)`.
    2. If they claim a hardship programme (the "programme") that requires disclosure,
       `hardship_disclosed` is true.
    3. By kind ("due" is the bill's due date, d(x) the number of days after it; the
       fee rule: exactly one FEE line equal to the option's fee when that fee is present,
       above zero and not waived by the programme's fees_waived; otherwise no lines):
       - PAY_IN_FULL (dated on or before due, by step 1): no lines, or exactly one
         DISCOUNT line equal to early_payment.discount and dated on or before
         early_payment.pay_by_date.
       - DEFERRAL: the deferral option is advertised; d(date) ≤ the programme's
         max_deferral_days if a programme is claimed, else deferral.max_days; the fee
         rule with deferral.fee.
       - INSTALMENT_PLAN: the instalments option is advertised; count ≤ the programme's
         max_instalments if a programme is claimed, else max_count; every amount ≥ the
         programme's min_instalment_amount if set, else min_amount; every interval
         between consecutive dates is within [min_interval_days, max_interval_days],
         the programme's max_interval_days replacing the latter when non-zero;
         d(first date) ≤ max_first_delay_days, the programme's when non-zero; the fee
         rule with instalments.fee.
       - SETTLEMENT: never (the settlement floor is private policy).
    A programme only relaxes an advertised option: without the option, the kind is outside.
    """
    try:
        validate_terms(terms, limits)
        validate_against_bill(terms, bill)
    except LocalProtocolError:
        return False
    return within_advertised_options(terms, bill, hardship_disclosed=hardship_disclosed)


def within_advertised_options(terms: Terms, bill: BillFacts, *, hardship_disclosed: bool) -> bool:
    """Steps 2 and 3 of `within_options`, for terms known to pass its step 1 (`validate_terms` and
    `validate_against_bill` with the same bill and limits): a negotiation's pending offer passed both
    when it was received, so the core judges the options without checking its terms again."""
    programme = bill.programme(terms.hardship_programme_id) if terms.hardship_programme_id else None
    if programme is not None and programme.requires_disclosure and not hardship_disclosed:
        return False
    options, dates = bill.options, [instalment.due_date for instalment in terms.schedule]
    if terms.kind is TermsKind.PAY_IN_FULL:
        early = options.early_payment
        return not terms.lines or (
            early is not None
            and len(terms.lines) == 1
            and terms.lines[0].kind is LineKind.DISCOUNT
            and terms.lines[0].amount == early.discount
            and dates[0] <= early.pay_by_date
        )
    if terms.kind is TermsKind.DEFERRAL:
        deferral = options.deferral
        if deferral is None:
            return False
        max_days = deferral.max_days if programme is None else programme.max_deferral_days
        return (dates[0] - bill.due_date).days <= max_days and _fee_lines_ok(terms.lines, deferral.fee, programme)
    if terms.kind is TermsKind.INSTALMENT_PLAN:
        plan = options.instalments
        if plan is None:
            return False
        max_count, min_amount = plan.max_count, plan.min_amount
        max_interval, max_first_delay = plan.max_interval_days, plan.max_first_delay_days
        if programme is not None:
            max_count = programme.max_instalments
            if programme.min_instalment_amount is not None:
                min_amount = programme.min_instalment_amount
            max_interval = programme.max_interval_days or max_interval
            max_first_delay = programme.max_first_delay_days or max_first_delay
        return (
            len(dates) <= max_count
            and all(instalment.amount >= min_amount for instalment in terms.schedule)
            and all(
                plan.min_interval_days <= (after - before).days <= max_interval for before, after in pairwise(dates)
            )
            and (dates[0] - bill.due_date).days <= max_first_delay
            and _fee_lines_ok(terms.lines, plan.fee, programme)
        )
    return False
