"""Bill intake: the biller's own bills into Parley, one (`parley biller issue-bill`) or a file (`parley biller import`).

A file is CSV with this header (order free; `period`, `issue_date` and
`currency` may be left out or empty):

    bill_id,account_id,amount,due_date,description,period,issue_date,currency

or JSON lines, one object per line with the same keys (amounts as decimal
*text*, "123.45", never JSON numbers: a float is not exact money). `amount` is
in the biller's currency (`currency`, if given, must be that one); dates are
YYYY-MM-DD; `period` ("2026-12", "December 2026"...) is appended to the
description the consumer sees ("Water, December 2026"), as bills carry no
separate period field.

Rules:
- **Idempotent by bill id.** A bill id already issued with the same content is
  `unchanged`; with other content it is refused (line number and what differs).
  Re-importing a file changes nothing.
- **All or nothing, by validation.** Every row is checked first — syntax, ids,
  amounts, dates, the account (exists, has an enrolled consumer), the bill the
  protocol would sign (`BillFacts`, with the options the account's segment
  advertises) and duplicates within the file — and every bad row is reported
  with its line number. If any row is bad, nothing is issued. Only then are the
  bills issued, one store transaction each (the agent signs and stores a bill
  with its BILL_ISSUED event atomically). A crash midway leaves a prefix of the
  file issued; importing the same file again issues the rest and leaves the
  prefix unchanged.
- **An issue date within a year of today** (`MAX_ISSUE_DATE_DAYS`, either way, by
  the biller's clock): a bill issued late for an earlier month or ahead of time
  is fine; 0001-01-01 or 2206-01-01 is a typo, and the bill would carry it signed.
  Only a bill to be issued is held to it: re-importing an old file still finds
  its bills unchanged.
- `dry_run` validates and reports without issuing.

Intake runs in its own process beside `parley biller serve` on the same store
(SQLite in WAL mode, or PostgreSQL); the serving biller's consumers see the new
bills and their BILL_ISSUED events at once.
"""

from __future__ import annotations

import csv
import enum
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from agent.biller import BillContext, BillerAgent
from agent.protocol.errors import ProtocolError
from agent.protocol.limits import MAX_ID_CHARS
from agent.protocol.terms import AdvertisedOptions, BillFacts, Currency, Money, parse_date
from agent.stores.base import AlreadyExists, BillerStore, BillRecord
from parley.v1 import bill_pb2, envelope_pb2
from reference_biller.accounts import ID_PATTERN, with_stored_segments
from reference_biller.config import BillerConfig
from reference_biller.policy import SegmentPolicy

REQUIRED_COLUMNS = ("bill_id", "account_id", "amount", "due_date", "description")
OPTIONAL_COLUMNS = ("period", "issue_date", "currency")
MAX_DESCRIPTION_CHARS = 500
MAX_ROWS = 100_000
MAX_ISSUE_DATE_DAYS = 366
"""How far a new bill's issue date may be from today, either way: a year and a day, so that last year's bill of the
same date still goes. One rule for `issue-bill`, `import` and the back-office API's IssueBill."""


class IntakeError(ValueError):
    """The file as a whole is unusable (unreadable, no header, unknown columns); nothing was issued."""


class RowOutcome(enum.StrEnum):
    ISSUED = "issued"
    WOULD_ISSUE = "would issue"  # dry run
    VALID = "valid"  # fine, but not issued: another row of the file is invalid
    UNCHANGED = "unchanged"  # the same bill was issued before
    INVALID = "invalid"


@dataclass(frozen=True)
class BillRow:
    """One bill as the billing system gave it, checked."""

    line: int
    bill_id: str
    account_id: str
    amount: Money
    due_date: date
    description: str  # with the period appended
    issue_date: date | None


@dataclass(frozen=True)
class RowReport:
    line: int
    bill_id: str
    outcome: RowOutcome
    detail: str = ""


@dataclass(frozen=True)
class IntakeReport:
    rows: tuple[RowReport, ...]
    dry_run: bool

    @property
    def refused(self) -> bool:
        """Some row is invalid: nothing was issued."""
        return any(row.outcome is RowOutcome.INVALID for row in self.rows)

    def count(self, outcome: RowOutcome) -> int:
        return sum(1 for row in self.rows if row.outcome is outcome)


class _RowError(Exception):
    """A row's problem, worded for the operator."""


# --- Reading ---------------------------------------------------------------------------------------


def read_records(data: bytes, *, json_lines: bool) -> Iterator[tuple[int, Mapping[str, object]]]:
    """(line number, fields) per record of a CSV or JSON-lines file; IntakeError if the file is unusable.

    A JSON line that is not an object is yielded as a record without fields
    (reported as bad by `check_row`), so one bad line does not hide the others.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise IntakeError(f"not UTF-8 text (byte {error.start}): save the file as UTF-8") from None
    if json_lines:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, {"": f"not JSON: {error.msg}"}
                continue
            yield number, value if isinstance(value, dict) else {"": "not a JSON object"}
        return
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    header = [name.strip() for name in reader.fieldnames or ()]
    if not header:
        raise IntakeError(f"no header line: the first line names the columns ({','.join(REQUIRED_COLUMNS)}...)")
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    unknown = [name for name in header if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing or unknown:
        problems = [f"missing column(s) {', '.join(missing)}"] * bool(missing) + [
            f"unknown column(s) {', '.join(unknown)}"
        ] * bool(unknown)
        raise IntakeError(f"header: {'; '.join(problems)} (columns: {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})")
    reader.fieldnames = header
    try:
        for row in reader:
            if None in row:
                yield reader.line_num, {"": "more fields than the header has columns"}
                continue
            yield reader.line_num, row
    except csv.Error as error:
        raise IntakeError(f"line {reader.line_num}: not CSV: {error}") from None


def _text(fields: Mapping[str, object], name: str, *, required: bool) -> str:
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise _RowError(f"{name} is missing")
        return ""
    if not isinstance(value, str):
        hint = ' (write amounts as text, "123.45": numbers are not exact money)' if name == "amount" else ""
        raise _RowError(f"{name} must be text, got {value!r}{hint}")
    return value.strip()


def check_row(line: int, fields: Mapping[str, object], config: BillerConfig) -> BillRow:
    """The row as a bill, or _RowError saying what is wrong with it (the first problem found)."""
    if "" in fields:
        raise _RowError(str(fields[""]))
    unknown = sorted(str(name) for name in fields if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    if unknown:
        raise _RowError(f"unknown field(s) {', '.join(unknown)}")
    bill_id = _text(fields, "bill_id", required=True)
    account_id = _text(fields, "account_id", required=True)
    for name, value in (("bill_id", bill_id), ("account_id", account_id)):
        if not ID_PATTERN.fullmatch(value):
            raise _RowError(f"{name} {value!r}: 1 to {MAX_ID_CHARS} characters of A-Z a-z 0-9 . _ : -")
    currency = _text(fields, "currency", required=False) or config.currency.code
    if currency != config.currency.code:
        raise _RowError(f"currency {currency!r}: this biller bills in {config.currency.code}")
    amount_text = _text(fields, "amount", required=True)
    try:
        amount = Money.parse(amount_text, config.currency.code)
        due = parse_date(_text(fields, "due_date", required=True))
        issue_text = _text(fields, "issue_date", required=False)
        issued = parse_date(issue_text) if issue_text else None
    except ProtocolError as error:
        raise _RowError(error.detail) from None
    description = _text(fields, "description", required=True)
    period = _text(fields, "period", required=False)
    if period:
        description = f"{description}, {period}"
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise _RowError(f"description (with the period) is over {MAX_DESCRIPTION_CHARS} characters")
    return BillRow(line, bill_id, account_id, amount, due, description, issued)


# --- Checking against the store, then issuing ---------------------------------------------------------


def _differences(existing: BillRecord, row: BillRow) -> list[str]:
    bill = bill_pb2.Bill.FromString(envelope_pb2.Envelope.FromString(existing.envelope).payload)
    differences = []
    if existing.account_id != row.account_id:
        differences.append(f"account {existing.account_id!r}")
    if existing.amount_minor != row.amount.minor or existing.currency != row.amount.currency.code:
        differences.append(f"amount {Money(Currency.of(existing.currency), existing.amount_minor)}")
    if existing.due_date != row.due_date:
        differences.append(f"due date {existing.due_date.isoformat()}")
    if bill.description != row.description:
        differences.append(f"description {bill.description!r}")
    if row.issue_date is not None and bill.issue_date != row.issue_date.isoformat():
        differences.append(f"issue date {bill.issue_date}")
    return differences


def check_issue_date(issue_date: date, today: date) -> None:
    """ValueError unless `issue_date` is within MAX_ISSUE_DATE_DAYS of `today`, either way."""
    if abs((issue_date - today).days) > MAX_ISSUE_DATE_DAYS:
        raise ValueError(
            f"issue_date {issue_date} is more than {MAX_ISSUE_DATE_DAYS} days from today ({today}): give a date "
            "within a year of today, or none for today"
        )


def _options_for(row: BillRow, agent: BillerAgent, policy: SegmentPolicy) -> tuple[AdvertisedOptions, date]:
    """The options the account's segment advertises on this bill, and the bill's issue date; _RowError if the
    date is too far from today or the protocol would refuse the bill (BillFacts' checks, run here so that a bad
    row is found before any is issued)."""
    today = agent.clock.now().date()
    issue_date = row.issue_date or today
    try:
        check_issue_date(issue_date, today)
    except ValueError as error:
        raise _RowError(str(error)) from None
    options = policy.advertise(BillContext(row.account_id, row.amount, issue_date, row.due_date))
    try:
        BillFacts(row.bill_id, row.account_id, row.amount, issue_date, row.due_date, row.description, options)
    except ProtocolError as error:
        raise _RowError(error.detail) from None
    return options, issue_date


async def intake(
    agent: BillerAgent,
    store: BillerStore,
    config: BillerConfig,
    records: Sequence[tuple[int, Mapping[str, object]]],
    *,
    dry_run: bool = False,
) -> IntakeReport:
    """Check every record, then (unless a row is invalid, or `dry_run`) issue the new bills; see the module."""
    if len(records) > MAX_ROWS:
        raise IntakeError(f"{len(records)} rows: at most {MAX_ROWS} per file, split it")
    config = await with_stored_segments(config, store)  # the segments of accounts added with `accounts add`
    policy = SegmentPolicy(config)
    reports: list[RowReport] = []
    to_issue: list[tuple[BillRow, AdvertisedOptions, date]] = []
    first_line: dict[str, int] = {}
    for line, fields in records:
        bill_id = str(fields.get("bill_id") or "")
        try:
            row = check_row(line, fields, config)
            if row.bill_id in first_line:
                raise _RowError(f"bill id {row.bill_id!r} is also on line {first_line[row.bill_id]}: each bill once")
            first_line[row.bill_id] = line
            account = await agent.account(row.account_id)
            if account is None:
                raise _RowError(f"no account {row.account_id!r}: add it with `parley biller accounts add`")
            existing = await store.get_bill(row.bill_id)
            if existing is not None:
                differences = _differences(existing, row)
                if differences:
                    raise _RowError(
                        f"bill {row.bill_id!r} was issued with other content ({'; '.join(differences)}): "
                        "a bill is never changed; issue a new one under a new id"
                    )
                reports.append(RowReport(line, row.bill_id, RowOutcome.UNCHANGED))
                continue
            if account.consumer_party_id is None:
                raise _RowError(
                    f"account {row.account_id!r} has no enrolled consumer yet: send the holder an enrolment code "
                    "(`parley biller codes --account`) and bill them once enrolled"
                )
            options, issue_date = _options_for(row, agent, policy)
        except _RowError as error:
            reports.append(RowReport(line, bill_id, RowOutcome.INVALID, str(error)))
            continue
        to_issue.append((row, options, issue_date))
        reports.append(RowReport(line, row.bill_id, RowOutcome.WOULD_ISSUE))
    if any(report.outcome is RowOutcome.INVALID for report in reports):
        return IntakeReport(
            tuple(
                RowReport(r.line, r.bill_id, RowOutcome.VALID) if r.outcome is RowOutcome.WOULD_ISSUE else r
                for r in reports
            ),
            dry_run,
        )
    if dry_run:
        return IntakeReport(tuple(reports), dry_run)
    issued_lines = set()
    for row, options, issue_date in to_issue:
        try:
            await agent.issue_bill(
                row.account_id,
                row.amount,
                row.due_date,
                row.description,
                issue_date=issue_date,
                bill_id=row.bill_id,
                options=options,
            )
        except AlreadyExists:  # issued meanwhile by another process: unchanged if it is the same bill
            existing = await store.get_bill(row.bill_id)
            if existing is None or _differences(existing, row):
                raise
            continue
        issued_lines.add(row.line)
    final = tuple(
        RowReport(r.line, r.bill_id, RowOutcome.ISSUED)
        if r.line in issued_lines
        else (RowReport(r.line, r.bill_id, RowOutcome.UNCHANGED) if r.outcome is RowOutcome.WOULD_ISSUE else r)
        for r in reports
    )
    return IntakeReport(final, dry_run)


__all__ = [
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "BillRow",
    "IntakeError",
    "IntakeReport",
    "RowOutcome",
    "RowReport",
    "check_issue_date",
    "check_row",
    "intake",
    "read_records",
]
