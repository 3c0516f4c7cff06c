"""Settlement from the bank's own file: ISO 20022 camt.054 / camt.053 credits matched to awaited payments.

    report = await import_statement(agent, Path("camt054.xml").read_bytes())
    for line in report.lines: print(line.outcome, line.credit.amount, line.detail)

The bank's debit/credit notification (camt.054, `BkToCstmrDbtCdtNtfctn`) or
statement (camt.053, `BkToCstmrStmt`) is untrusted XML: it is parsed with
defusedxml (no DTD at all, so no entity expansion, no external entities: an XXE
attempt is refused like any malformed file), namespace-aware, and read element
by element, never by string slicing. Every version whose namespace starts with
`urn:iso:std:iso:20022:tech:xsd:camt.054.001.` (or `camt.053.001.`) is read; the
elements used are the ones common to .02 to .08 (docs/BACKOFFICE.md says which
versions the tests cover). The whole file is read first: a file that is not a
usable statement raises `StatementError` and nothing is recorded.

Each booked (BOOK) credit (CRDT), one per transaction (`TxDtls`) of an entry, is
matched to a payment the biller awaits by its payment reference — the
EndToEndId, a structured creditor reference (`Strd/CdtrRefInf/Ref`, an ISO 11649
RF reference checked mod 97) or the reference inside unstructured remittance
text (`Ustrd`) — and then by amount (`match_credit`, pure). A match with the
instructed amount is recorded with `BillerAgent.record_settlement` (the
consumer's signed receipt and the PAYMENT_RECEIVED thanks follow); everything
else is reported and left alone: unmatched credits, partial or excess payments
(PAY-6: no receipt, resolve out of band), reversals (RvslInd), debits, entries
not booked.

Idempotent: a credit is recorded under the rail reference
"camt:<bank reference>" (its AcctSvcrRef, else the entry's, else the message id
with the NtryRef or the entry's position), so importing the same file twice records nothing
new: a settled payment is no longer awaited, and the agent answers a repeated
settlement with the same receipt.
"""

from __future__ import annotations

import enum
import logging
import re
import xml.etree.ElementTree as ET  # element types and ParseError only; parsing is defusedxml's
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime

import defusedxml.ElementTree as DefusedET
from defusedxml import DefusedXmlException

from agent.biller import AwaitedPayment, BillerAgent
from agent.protocol.errors import ProtocolError
from agent.protocol.terms import Money, parse_date

logger = logging.getLogger("parley.reference_biller.statements")

NAMESPACE_PREFIXES = {
    "camt.054": "urn:iso:std:iso:20022:tech:xsd:camt.054.001.",
    "camt.053": "urn:iso:std:iso:20022:tech:xsd:camt.053.001.",
}
# The message element under Document, and the element holding the entries, by message.
_MESSAGE_ELEMENTS = {"camt.054": ("BkToCstmrDbtCdtNtfctn", "Ntfctn"), "camt.053": ("BkToCstmrStmt", "Stmt")}
MAX_STATEMENT_BYTES = 50 * 1024 * 1024
RAIL_REFERENCE_PREFIX = "camt:"
_NOT_PROVIDED = "NOTPROVIDED"  # the EndToEndId a payer leaves when it gave none


class StatementError(ValueError):
    """The file is not a usable camt.054/camt.053 document; nothing was recorded."""


# --- Reading the file --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credit:
    """One movement of the file: an entry's transaction (or the entry itself when it has none)."""

    position: str  # "entry 3" or "entry 3, transaction 2": where to look in the file
    bank_reference: str  # AcctSvcrRef (transaction, else entry) or NtryRef; "" if the bank gave none
    rail_reference: str  # what the settlement is recorded under: stable for the same file
    amount: Money | None  # None when the file gives no amount for the transaction
    is_credit: bool  # CdtDbtInd: CRDT (True) or DBIT
    reversal: bool  # RvslInd: the entry reverses an earlier one
    booked: bool  # status BOOK (not PDNG or INFO)
    booking_date: date | None
    references: tuple[str, ...]  # EndToEndId and structured creditor references, as written
    remittance: tuple[str, ...]  # unstructured remittance lines (Ustrd), as written


@dataclass(frozen=True)
class Statement:
    """What a camt file says: its message type and version (e.g. "camt.054.001.08"), id and movements."""

    message_type: str
    message_id: str
    credits: tuple[Credit, ...]


class _Reader:
    """Namespace-qualified lookups in one document."""

    def __init__(self, namespace: str) -> None:
        self._ns = namespace

    def path(self, path: str) -> str:
        return "/".join(f"{{{self._ns}}}{step}" for step in path.split("/"))

    def all(self, element: ET.Element, path: str) -> list[ET.Element]:
        return element.findall(self.path(path))

    def text(self, element: ET.Element, path: str) -> str:
        found = element.find(self.path(path))
        return "" if found is None or found.text is None else found.text.strip()

    def texts(self, element: ET.Element, path: str) -> tuple[str, ...]:
        return tuple(text for found in self.all(element, path) if (text := (found.text or "").strip()))


def parse_statement(data: bytes) -> Statement:
    """Read a camt.054 or camt.053 document; StatementError (one clear message) if it is not usable."""
    if len(data) > MAX_STATEMENT_BYTES:
        raise StatementError(f"the file is larger than {MAX_STATEMENT_BYTES} bytes")
    try:
        root = DefusedET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as error:
        raise StatementError(f"refused: the file declares a DTD or entities ({type(error).__name__})") from None
    except ET.ParseError as error:
        raise StatementError(f"not well-formed XML: {error}") from None
    namespace, _, local = root.tag.removeprefix("{").partition("}")
    kind = next((name for name, prefix in NAMESPACE_PREFIXES.items() if namespace.startswith(prefix)), None)
    if local != "Document" or kind is None:
        raise StatementError(
            f"not a camt.054 or camt.053 document: the root element is {root.tag!r} "
            f"(expected Document in {NAMESPACE_PREFIXES['camt.054']}NN or {NAMESPACE_PREFIXES['camt.053']}NN)"
        )
    version = namespace.removeprefix(NAMESPACE_PREFIXES[kind])
    if not (version.isascii() and version.isdigit()):
        raise StatementError(f"unknown {kind} version {version!r} in namespace {namespace!r}")
    reader = _Reader(namespace)
    message_name, report_name = _MESSAGE_ELEMENTS[kind]
    message = root.find(reader.path(message_name))
    if message is None:
        raise StatementError(f"a {kind} document without its {message_name} element")
    message_id = reader.text(message, "GrpHdr/MsgId")
    if not message_id:
        raise StatementError("the group header has no MsgId")
    credits: list[Credit] = []
    entries = [entry for report in reader.all(message, report_name) for entry in reader.all(report, "Ntry")]
    for number, entry in enumerate(entries, 1):
        credits.extend(_credits_of(reader, entry, number, message_id))
    return Statement(f"{kind}.001.{version}", message_id, tuple(credits))


def _money(reader: _Reader, element: ET.Element, path: str, where: str) -> Money | None:
    found = element.find(reader.path(path))
    if found is None:
        return None
    currency = found.get("Ccy", "")
    try:
        return Money.parse((found.text or "").strip(), currency)
    except ProtocolError as error:
        raise StatementError(f"{where}: amount {found.text!r} {currency!r}: {error.detail}") from None


def _indicator(reader: _Reader, element: ET.Element, where: str) -> bool:
    indicator = reader.text(element, "CdtDbtInd")
    if indicator not in ("CRDT", "DBIT"):
        raise StatementError(f"{where}: CdtDbtInd is {indicator!r}, not CRDT or DBIT")
    return indicator == "CRDT"


def _booking_date(reader: _Reader, entry: ET.Element, where: str) -> date | None:
    text = reader.text(entry, "BookgDt/Dt") or reader.text(entry, "BookgDt/DtTm")[:10]
    if not text:
        return None
    try:
        return parse_date(text)
    except ProtocolError:
        raise StatementError(f"{where}: booking date {text!r} is not a date") from None


def _credits_of(reader: _Reader, entry: ET.Element, number: int, message_id: str) -> list[Credit]:
    where = f"entry {number}"
    amount = _money(reader, entry, "Amt", where)
    if amount is None:
        raise StatementError(f"{where} has no Amt")
    credit = _indicator(reader, entry, where)
    # Sts is a code up to .05 (<Sts>BOOK</Sts>) and a choice from .06 on (<Sts><Cd>BOOK</Cd></Sts>).
    status = reader.text(entry, "Sts/Cd") or reader.text(entry, "Sts")
    reversal = reader.text(entry, "RvslInd").lower() in ("true", "1")
    servicer_reference = reader.text(entry, "AcctSvcrRef")  # the bank's own, unique across its files
    entry_reference = servicer_reference or reader.text(entry, "NtryRef")  # NtryRef: unique in this file only
    shared = Credit(
        position=where,
        bank_reference=entry_reference,
        rail_reference=RAIL_REFERENCE_PREFIX + (servicer_reference or f"{message_id}/{entry_reference or number}"),
        amount=amount,
        is_credit=credit,
        reversal=reversal,
        booked=status == "BOOK",
        booking_date=_booking_date(reader, entry, where),
        references=(),
        remittance=(),
    )
    transactions = reader.all(entry, "NtryDtls/TxDtls")
    if not transactions:
        return [shared]
    credits = []
    for index, transaction in enumerate(transactions, 1):
        place = where if len(transactions) == 1 else f"{where}, transaction {index}"
        own_amount = _money(reader, transaction, "Amt", place)  # .03 on
        if own_amount is None:
            own_amount = _money(reader, transaction, "AmtDtls/TxAmt/Amt", place)  # .02
        own_reference = reader.text(transaction, "Refs/AcctSvcrRef")
        if own_reference:
            rail_reference = RAIL_REFERENCE_PREFIX + own_reference
        elif len(transactions) == 1:
            rail_reference = shared.rail_reference
        else:
            rail_reference = f"{shared.rail_reference}/{index}"
        end_to_end = reader.text(transaction, "Refs/EndToEndId")
        references = tuple(
            reference
            for reference in (end_to_end, *reader.texts(transaction, "RmtInf/Strd/CdtrRefInf/Ref"))
            if reference and reference.upper() != _NOT_PROVIDED
        )
        credits.append(
            replace(
                shared,
                position=place,
                bank_reference=own_reference or entry_reference,
                rail_reference=rail_reference,
                amount=own_amount if own_amount is not None else (amount if len(transactions) == 1 else None),
                is_credit=_indicator(reader, transaction, place) if reader.text(transaction, "CdtDbtInd") else credit,
                references=references,
                remittance=reader.texts(transaction, "RmtInf/Ustrd"),
            )
        )
    return credits


# --- Matching ----------------------------------------------------------------------------------------


def rf_reference_valid(reference: str) -> bool:
    """ISO 11649: "RF", two check digits, 1 to 21 letters or digits; valid when the number mod 97 is 1."""
    compact = normalize_reference(reference)
    if not (5 <= len(compact) <= 25 and compact.startswith("RF") and compact.isascii() and compact.isalnum()):
        return False
    if not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(character, 36)) for character in rearranged)) % 97 == 1


def normalize_reference(text: str) -> str:
    """A payment reference as banks pass it on: spaces dropped (they regroup them), upper case."""
    return "".join(text.split()).upper()


async def awaited_payment_by_reference(agent: BillerAgent, reference: str) -> AwaitedPayment | None:
    """The awaited payment whose instructions carry `reference` (as `normalize_reference` compares them)."""
    wanted = normalize_reference(reference)
    return next((a for a in await agent.awaited_payments() if normalize_reference(a.payment_reference) == wanted), None)


def _mentions(text: str, reference: str) -> bool:
    """Whether free text quotes the reference as a whole word, however the bank spaced it or cased it.

    "Invoice PRL-000001, thanks" and "RF18 5390 0754 7034" quote theirs; "PRL-0000012" does not quote PRL-000001.
    """
    spaced = r"\s*".join(re.escape(character) for character in reference)
    return re.search(rf"(?<![0-9A-Za-z]){spaced}(?![0-9A-Za-z])", text, re.IGNORECASE) is not None


class Outcome(enum.StrEnum):
    """What became of one movement of the file."""

    SETTLED = "settled"  # matched by reference and amount: settlement recorded, receipt sent
    UNMATCHED = "unmatched"  # no awaited payment has its reference (unknown, or settled already)
    PARTIAL = "partial"  # matched, but less than the instructed amount: not recorded (PAY-6)
    EXCESS = "excess"  # matched, but more than the instructed amount (or another currency): not recorded
    INVALID_REFERENCE = "invalid-reference"  # an RF creditor reference whose check digits are wrong
    REVERSAL = "reversal"  # RvslInd: reverses an earlier entry; reported, nothing recorded
    DEBIT = "debit"  # money out: ignored, reported
    NOT_BOOKED = "not-booked"  # pending or information only: settled when booked
    REFUSED = "refused"  # the agent refused the settlement (e.g. settled under another bank reference)


@dataclass(frozen=True)
class Match:
    """`match_credit`'s answer: the outcome, the awaited payment concerned (if any) and why."""

    outcome: Outcome
    payment: AwaitedPayment | None
    detail: str


def match_credit(credit: Credit, awaited: Sequence[AwaitedPayment]) -> Match:
    """Which awaited payment a movement settles, if any: by payment reference, then by amount. Pure."""
    if not credit.booked:
        return Match(Outcome.NOT_BOOKED, None, "not booked yet (pending or information only)")
    if credit.reversal:
        what = "an earlier debit" if credit.is_credit else "an earlier credit (money returned)"
        return Match(Outcome.REVERSAL, None, f"reverses {what}: nothing recorded, check it by hand")
    if not credit.is_credit:
        return Match(Outcome.DEBIT, None, "a debit: ignored")
    by_reference = {normalize_reference(payment.payment_reference): payment for payment in awaited}
    invalid = [ref for ref in credit.references if ref.upper().startswith("RF") and not rf_reference_valid(ref)]
    payment = next((by_reference[normalize_reference(ref)] for ref in credit.references
                    if normalize_reference(ref) in by_reference), None)  # fmt: skip
    if payment is None:
        text = "\n".join(credit.remittance)
        payment = next((p for key, p in by_reference.items() if key and _mentions(text, key)), None)
    if payment is None:
        if invalid:
            return Match(Outcome.INVALID_REFERENCE, None, f"creditor reference {invalid[0]!r} fails its check digits")
        quoted = ", ".join(repr(r) for r in (*credit.references, *credit.remittance)) or "none"
        return Match(Outcome.UNMATCHED, None, f"no awaited payment has its reference (references: {quoted})")
    if credit.amount is None:
        return Match(Outcome.UNMATCHED, payment, "the file gives no amount for this transaction")
    if credit.amount.currency != payment.amount.currency or credit.amount > payment.amount:
        return Match(Outcome.EXCESS, payment, f"received {credit.amount}, instructed {payment.amount}: not recorded")
    if credit.amount < payment.amount:
        return Match(Outcome.PARTIAL, payment, f"received {credit.amount} of {payment.amount}: not recorded")
    return Match(Outcome.SETTLED, payment, f"settles {payment.account_id}/{payment.intent_id}")


# --- Importing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportLine:
    """One movement and what became of it."""

    credit: Credit
    outcome: Outcome
    detail: str
    account_id: str = ""
    intent_id: str = ""


@dataclass(frozen=True)
class ImportReport:
    """The outcome of importing one file; with `dry_run`, SETTLED means "would be settled"."""

    message_type: str
    message_id: str
    lines: tuple[ReportLine, ...]
    dry_run: bool

    def count(self, outcome: Outcome) -> int:
        return sum(1 for line in self.lines if line.outcome is outcome)


async def settle_matched(
    agent: BillerAgent, credits: Sequence[Credit], *, dry_run: bool = False
) -> tuple[ReportLine, ...]:
    """Match each movement against the payments awaited now and record the settlements that match exactly.

    A payment matched once is taken out of the pool, so a second credit for it in
    the same run is reported as unmatched rather than settling it twice.
    """
    awaited = list(await agent.awaited_payments())
    lines = []
    for credit in credits:
        match = match_credit(credit, awaited)
        payment = match.payment
        outcome, detail = match.outcome, match.detail
        if outcome is Outcome.SETTLED and payment is not None and credit.amount is not None:
            awaited.remove(payment)
            if not dry_run:
                settle_time = (
                    None if credit.booking_date is None else datetime(*credit.booking_date.timetuple()[:3], tzinfo=UTC)
                )
                try:
                    await agent.record_settlement(
                        payment.account_id,
                        payment.intent_id,
                        credit.amount,
                        credit.rail_reference,
                        settle_time=settle_time,
                    )
                except (LookupError, ValueError) as error:
                    outcome, detail = Outcome.REFUSED, str(error)
        lines.append(
            ReportLine(
                credit,
                outcome,
                detail,
                payment.account_id if payment else "",
                payment.intent_id if payment else "",
            )
        )
        logger.info("statement %s: %s %s", credit.position, outcome, detail)
    return tuple(lines)


async def import_statement(agent: BillerAgent, data: bytes, *, dry_run: bool = False) -> ImportReport:
    """Read a camt.054/053 file and settle what it credits; StatementError (nothing recorded) if unusable."""
    statement = parse_statement(data)
    lines = await settle_matched(agent, statement.credits, dry_run=dry_run)
    return ImportReport(statement.message_type, statement.message_id, lines, dry_run)


__all__ = [
    "MAX_STATEMENT_BYTES",
    "NAMESPACE_PREFIXES",
    "Credit",
    "ImportReport",
    "Match",
    "Outcome",
    "ReportLine",
    "Statement",
    "StatementError",
    "awaited_payment_by_reference",
    "import_statement",
    "match_credit",
    "normalize_reference",
    "parse_statement",
    "rf_reference_valid",
    "settle_matched",
]
