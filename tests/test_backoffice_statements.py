"""Settlement from the bank's own file (reference_biller/statements.py): camt.054 and camt.053 files written to
the standard (tests/data/camt/), matched to the payments a real biller awaits, and hostile files refused whole."""

from __future__ import annotations

import asyncio
import itertools
from datetime import date
from pathlib import Path

import pytest

from agent.biller import AwaitedPayment, PaymentDetails
from agent.protocol.terms import Money
from parley.v1 import envelope_pb2, event_pb2
from parley.v1.biller_service_pb2 import CreatePaymentIntentRequest
from reference_biller.statements import (
    Credit,
    Outcome,
    StatementError,
    import_statement,
    match_credit,
    parse_statement,
    rf_reference_valid,
)
from tests.fixtures import BILL
from tests.helpers.peer import Biller, running_biller

CAMT = Path(__file__).parent / "data" / "camt"
ACCOUNTS = ("acct-1", "acct-2", "acct-3")  # their intents get references PRL-000001..3, in this order


class SerialRail:
    """References PRL-000001, PRL-000002... in the order intents are instructed: what the statement files carry."""

    def __init__(self) -> None:
        self._serial = itertools.count(1)

    def instructions(self, account_id: str, intent_id: str, amount: Money) -> PaymentDetails:
        return PaymentDetails("simulated", "Energy Example Ltd", "SIM-0001", f"PRL-{next(self._serial):06d}")


async def awaiting_three_payments(biller: Biller) -> None:
    """Three enrolled accounts, each billed EUR 120.00 and paying it in full: three payments awaited."""
    for number, account in enumerate(ACCOUNTS, 1):
        consumer = await biller.enrolled(account, f"consumer:c{number}")
        await biller.bill(account, bill_id=f"bill-{number}")
        intent = consumer.intent(account, f"bill-{number}", f"pay-{number}", BILL.amount_due)
        await biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))


async def received(biller: Biller, account: str) -> int:
    count = await biller.agent._store.event_count(account)
    events = await biller.agent._store.events(account, 0, count)
    kinds = [event_pb2.Event.FromString(_payload(e.envelope)).kind for e in events]
    return kinds.count(event_pb2.EVENT_KIND_PAYMENT_RECEIVED)


def _payload(envelope: bytes) -> bytes:
    return envelope_pb2.Envelope.FromString(envelope).payload


def test_a_notification_settles_what_matches_and_reports_the_rest_and_a_second_import_records_nothing(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_biller(tmp_path, rail=SerialRail()) as biller:
            await awaiting_three_payments(biller)
            data = (CAMT / "camt054_v08_credits.xml").read_bytes()
            report = await import_statement(biller.agent, data)
            assert (report.message_type, report.message_id) == ("camt.054.001.08", "NTF20260320-0001")
            outcomes = [(line.credit.position, line.outcome, line.intent_id) for line in report.lines]
            assert outcomes == [
                ("entry 1", Outcome.SETTLED, "pay-1"),  # EndToEndId
                ("entry 2, transaction 1", Outcome.SETTLED, "pay-2"),  # the reference inside Ustrd
                ("entry 2, transaction 2", Outcome.UNMATCHED, ""),  # a valid RF reference nobody awaits
                ("entry 3", Outcome.PARTIAL, "pay-3"),  # EUR 50.00 of 120.00: no receipt (PAY-6)
                ("entry 4", Outcome.DEBIT, ""),
                ("entry 5", Outcome.REVERSAL, ""),
                ("entry 6", Outcome.NOT_BOOKED, ""),
                ("entry 7", Outcome.INVALID_REFERENCE, ""),  # RF19... fails mod 97
            ]
            assert report.lines[0].credit.rail_reference == "camt:2026032000001"
            assert report.lines[1].credit.rail_reference == "camt:2026032000002-1"
            assert [await received(biller, account) for account in ACCOUNTS] == [1, 1, 0]
            assert [a.intent_id for a in await biller.agent.awaited_payments()] == ["pay-3"]

            again = await import_statement(biller.agent, data)
            assert again.count(Outcome.SETTLED) == 0
            assert [await received(biller, account) for account in ACCOUNTS] == [1, 1, 0]

            # The rest arrives in full on the next day's statement (camt.053.001.02, amounts in AmtDtls).
            statement = await import_statement(biller.agent, (CAMT / "camt053_v02_statement.xml").read_bytes())
            assert statement.message_type == "camt.053.001.02"
            [line] = statement.lines
            assert (line.outcome, line.account_id, line.intent_id) == (Outcome.SETTLED, "acct-3", "pay-3")
            assert line.credit.booking_date == date(2026, 3, 21)
            assert await received(biller, "acct-3") == 1
            assert await biller.agent.awaited_payments() == []

    asyncio.run(scenario())


def test_a_dry_run_records_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_biller(tmp_path, rail=SerialRail()) as biller:
            await awaiting_three_payments(biller)
            report = await import_statement(biller.agent, (CAMT / "camt054_v08_credits.xml").read_bytes(), dry_run=True)
            assert report.count(Outcome.SETTLED) == 2
            assert len(await biller.agent.awaited_payments()) == 3

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("xxe.xml", "DTD"),
        ("entity_expansion.xml", "DTD"),
        ("malformed.xml", "not well-formed"),
        ("pain001_wrong_type.xml", "not a camt.054 or camt.053 document"),
    ],
)
def test_a_hostile_or_wrong_file_is_one_clear_error_and_nothing_is_recorded(
    tmp_path: Path, name: str, message: str
) -> None:
    async def scenario() -> None:
        async with running_biller(tmp_path, rail=SerialRail()) as biller:
            await awaiting_three_payments(biller)
            with pytest.raises(StatementError, match=message):
                await import_statement(biller.agent, (CAMT / name).read_bytes())
            assert len(await biller.agent.awaited_payments()) == 3

    asyncio.run(scenario())


def test_an_entry_without_details_is_one_credit_and_the_old_versions_read_alike() -> None:
    statement = parse_statement((CAMT / "camt054_v02_entry_only.xml").read_bytes())
    assert statement.message_type == "camt.054.001.02"
    [credit] = statement.credits
    assert credit.amount == Money.parse("75.10", "EUR")
    assert credit.booked
    assert credit.is_credit
    assert credit.booking_date == date(2026, 3, 22)
    assert credit.rail_reference == "camt:NTF20260322-0001/1"  # no bank reference: message id and position
    assert match_credit(credit, []).outcome is Outcome.UNMATCHED


def test_a_bad_amount_or_indicator_is_refused_with_where() -> None:
    good = (CAMT / "camt054_v08_credits.xml").read_text()
    with pytest.raises(StatementError, match=r"entry 1: amount '120,00'"):
        parse_statement(good.replace('<Amt Ccy="EUR">120.00</Amt>', '<Amt Ccy="EUR">120,00</Amt>', 1).encode())
    with pytest.raises(StatementError, match="CdtDbtInd is 'CRED'"):
        parse_statement(good.replace("<CdtDbtInd>CRDT</CdtDbtInd>", "<CdtDbtInd>CRED</CdtDbtInd>", 1).encode())
    future = good.replace("camt.054.001.08", "camt.054.001.13")  # a later version: read by its namespace prefix
    assert parse_statement(future.encode()).message_type == "camt.054.001.13"


def test_rf_creditor_references_are_checked_mod_97() -> None:
    assert rf_reference_valid("RF18539007547034")
    assert rf_reference_valid("rf18 5390 0754 7034")
    assert rf_reference_valid("RF432026INV0001")
    assert not rf_reference_valid("RF19539007547034")
    assert not rf_reference_valid("RF18")
    assert not rf_reference_valid("RF18-5390")


def test_matching_by_an_rf_reference_and_by_amount() -> None:
    eur = Money.parse("120.00", "EUR")
    awaited = [AwaitedPayment("acct-9", "pay-9", eur, "RF432026INV0001")]
    credit = Credit(
        position="entry 1",
        bank_reference="B1",
        rail_reference="camt:B1",
        amount=Money.parse("130.00", "EUR"),
        is_credit=True,
        reversal=False,
        booked=True,
        booking_date=None,
        references=("RF43 2026 INV0 001",),
        remittance=(),
    )
    assert match_credit(credit, awaited).outcome is Outcome.EXCESS
    exact = match_credit(Credit(**{**credit.__dict__, "amount": eur}), awaited)
    assert exact.outcome is Outcome.SETTLED
    assert exact.payment == awaited[0]
    in_dollars = Credit(**{**credit.__dict__, "amount": Money.parse("120.00", "USD")})
    assert match_credit(in_dollars, awaited).outcome is Outcome.EXCESS


def test_a_reference_in_remittance_text_is_matched_as_a_whole_word() -> None:
    awaited = [AwaitedPayment("acct-1", "pay-1", Money.parse("120.00", "EUR"), "PRL-000001")]
    base = Credit(
        position="entry 1",
        bank_reference="B1",
        rail_reference="camt:B1",
        amount=Money.parse("120.00", "EUR"),
        is_credit=True,
        reversal=False,
        booked=True,
        booking_date=None,
        references=(),
        remittance=(),
    )

    def outcome(*lines: str) -> Outcome:
        return match_credit(Credit(**{**base.__dict__, "remittance": lines}), awaited).outcome

    assert outcome("Invoice prl-000001, thanks") is Outcome.SETTLED
    assert outcome("Invoice PRL-0000", "01 thanks") is Outcome.SETTLED  # split across lines by the bank
    assert outcome("Invoice PRL-0000012") is Outcome.UNMATCHED
    assert outcome("XPRL-000001") is Outcome.UNMATCHED
