"""`parley demo`: two billers and six households settle three months of bills over real gRPC, in seconds.

What runs, all in this process and all real:

- two **reference billers** (`reference_biller.service.open_biller`): the energy
  supplier of `reference_biller/sample.toml` and the telecom operator of
  `reference_biller/telecom.toml`, each with its own signing key, SQLite store and
  simulated payment rail, each served by `start_biller_server` on a free port of
  127.0.0.1 with TLS (a throwaway development CA, `agent.tools.certs`);
- six **households** (`reference_consumer.households`): each the reference
  consumer itself, `reference_consumer.runner.Household` — what `parley consumer
  run` runs — in its own state directory (key, key set, SQLite store, agreement
  files), with the reference cash-flow strategy inside the profile's mandate.
  The demo gives it only the world around it: a bank (`DemoBank`) that pays
  into the biller's simulated rail, and a strategy whose profile follows a
  ledger that moves the balance as pay days, outgoings and payments come
  (`Household.open(bank=..., strategy=...)`);
- one **ManualClock** shared by every party. It starts on the billers' March bill
  run and moves day by day to early June. Each day, at 09:00, the billers run
  their upkeep (settle the rail's transfers into signed receipts, then the
  scheduler: reminders, instalment notices, missed instalments), every event
  reaches the households through their event watch (`Household.follow`), and
  each household runs one pass (`Household.run_pass`): it plans newly issued
  bills against its budget and negotiates (or pays a plain bill as billed,
  `Profile.pay_as_billed`), renegotiates when invited, pays what is due that
  day, and collects its receipts. A household that acted runs a second pass,
  to see the billers' answers the same day. `DemoHousehold` only tells the
  story of each pass report; it decides nothing.

At the end every agreement bundle is written as `parley-bundle/1` JSON, read back
and verified offline with both identities pinned, each household's outcome is
checked against its scenario, and the story is printed (Rich). `run` returns 0
when everything held and 1 otherwise; every server and store is closed in
either case. `summary=PATH` also writes the outcome as JSON; `state_dir=DIR`
keeps every party's state there (by default a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.clock import ManualClock
from agent.consumer import (
    AccountEvent,
    ConsumerAgent,
    NegotiationResult,
    PaymentNotSent,
    PaymentOrder,
    PaymentReceipt,
)
from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.errors import ProtocolError, Reason
from agent.protocol.moves import NEGOTIATION_TYPES, NegotiationPayload, move_of
from agent.protocol.negotiation import Accept, Offer, Open, Reject, Role, Withdraw
from agent.protocol.terms import BillFacts, LineKind, Money, Terms, TermsKind
from agent.tools.certs import DevCA, issue_server_cert, make_dev_ca
from agent.tools.json_output import add_json_options, emit_json, wants_json
from agent.tools.paths import directory_argument
from agent.transport.client import ClientTls, RetryPolicy
from agent.transport.server import start_biller_server
from agent.transport.status import CallError
from agent.web import check_listen_address, start_site
from parley.v1 import event_pb2
from reference_biller import sample, scheduler
from reference_biller.config import SAMPLE, BillerConfig, load_config
from reference_biller.rail import RAIL_NAME, SimulatedRail, TransferStatus
from reference_biller.service import Biller, open_biller
from reference_consumer import runner
from reference_consumer.agent_strategy import ReferenceStrategy, agent_mandate
from reference_consumer.households import END, HOUSEHOLDS, PAYMENT_TERM, START, Household, Scenario
from reference_consumer.profile import BillerConnection, BillerPreference, Profile

logger = logging.getLogger("parley.demo")

TELECOM_CONFIG = SAMPLE.with_name("telecom.toml")
DAY_TIME = 9  # o'clock UTC: when the billers run their upkeep and the households act
EVENT_TIMEOUT = 20.0  # real seconds for an event to reach its household before the demo gives up
FIRST_PASS_EVENT_IDLE = 0.02
"""Seconds of quiet that end the event read of the enrolling pass (nothing is billed yet); later passes read
what the household's background watches stored (`Household.follow`), without waiting."""
SHUTDOWN_GRACE = 1.0
RETRY = RetryPolicy(attempts=3, initial_backoff=0.05, max_backoff=0.5, call_timeout=10.0)

K = event_pb2.EventKind
BILL_ISSUED, REMINDER, PAYMENT_RECEIVED = K.EVENT_KIND_BILL_ISSUED, K.EVENT_KIND_REMINDER, K.EVENT_KIND_PAYMENT_RECEIVED
INSTALMENT_MISSED, ARRANGEMENT_BROKEN = K.EVENT_KIND_INSTALMENT_MISSED, K.EVENT_KIND_ARRANGEMENT_BROKEN
RENEGOTIATION_OFFERED = K.EVENT_KIND_RENEGOTIATION_OFFERED
_PAYLOADS = {cls.DESCRIPTOR.full_name: cls for cls in NEGOTIATION_TYPES}


def at(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, DAY_TIME, tzinfo=UTC)


def kind_name(kind: int) -> str:
    return K.Name(event_pb2.EventKind.ValueType(kind)).removeprefix("EVENT_KIND_")


def describe(terms: Terms) -> str:
    """Terms in one line for people: "3 instalments of EUR 83.50, 2026-04-06 → 2026-06-06 (fee EUR 1.50)"."""
    schedule = terms.schedule
    if terms.kind is TermsKind.INSTALMENT_PLAN:
        amounts = sorted({instalment.amount.minor for instalment in schedule})
        each = str(schedule[0].amount) if len(amounts) == 1 else f"about {schedule[0].amount}"
        text = f"{len(schedule)} instalments of {each}, {schedule[0].due_date} → {schedule[-1].due_date}"
    elif terms.kind is TermsKind.DEFERRAL:
        text = f"defer to {schedule[0].due_date}: {terms.total}"
    elif terms.kind is TermsKind.SETTLEMENT:
        text = f"settle for {terms.total} on {schedule[0].due_date}"
    else:
        text = f"pay {terms.total} on {schedule[0].due_date}"
    extras = [f"{line.kind.name.lower()} {line.amount}" for line in terms.lines]
    if terms.hardship_programme_id:
        extras.append(f"programme {terms.hardship_programme_id}")
    return f"{text} ({', '.join(extras)})" if extras else text


def options_text(bill: BillFacts) -> str:
    options, parts = bill.options, []
    if options.early_payment is not None:
        early = options.early_payment
        parts.append(f"{early.discount} off if paid by {early.pay_by_date:%m-%d}")
    if options.deferral is not None:
        fee = f" +{options.deferral.fee}" if options.deferral.fee and options.deferral.fee.minor else ""
        parts.append(f"defer ≤{options.deferral.max_days}d{fee}")
    if options.instalments is not None:
        plan = options.instalments
        fee = f" +{plan.fee}" if plan.fee and plan.fee.minor else ""
        parts.append(f"≤{plan.max_count} instalments ≥{plan.min_amount}{fee}")
    parts += [f"hardship programme {p.programme_id}" for p in options.hardship_programmes]
    return "; ".join(parts)


def terms_json(terms: Terms) -> dict[str, Any]:
    return {
        "kind": terms.kind.name,
        "principal": str(terms.principal),
        "total": str(terms.total),
        "lines": [
            {"kind": line.kind.name, "description": line.description, "amount": str(line.amount)}
            for line in terms.lines
        ],
        "hardship_programme_id": terms.hardship_programme_id,
        "schedule": [{"date": i.due_date.isoformat(), "amount": str(i.amount)} for i in terms.schedule],
    }


class DemoFailure(Exception):
    """Something the demo needs did not happen (an event that never arrived, a watch that died)."""


# --- The billers ------------------------------------------------------------------------------------------


@dataclass
class BillerSite:
    """A reference biller serving over gRPC with TLS, and its upkeep run at the simulated time."""

    biller: Biller
    server: grpc.aio.Server
    port: int

    @property
    def config(self) -> BillerConfig:
        return self.biller.config

    @property
    def name(self) -> str:
        return self.biller.config.name

    @property
    def party_id(self) -> str:
        return self.biller.config.party_id

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def fingerprint(self) -> bytes:
        return self.biller.fingerprint

    @classmethod
    async def start(cls, config: BillerConfig, state_dir: Path, clock: ManualClock, ca: DevCA) -> BillerSite:
        biller = await open_biller(config, state_dir, clock)
        try:
            certificate = issue_server_cert(ca, hostnames=["localhost"], ips=["127.0.0.1"])
            server, port = await start_biller_server(
                biller.agent, "127.0.0.1:0", tls=(certificate.chain_pem, certificate.key_pem)
            )
        except BaseException:
            await biller.close()
            raise
        return cls(biller, server, port)

    async def stop(self) -> None:
        try:
            await self.server.stop(SHUTDOWN_GRACE)
        finally:
            await self.biller.close()

    async def upkeep(self) -> None:
        """Settle what the rail received (receipts and thanks), then the scheduler's reminders and notices."""
        biller, now = self.biller, self.biller.clock.now()
        await biller.rail.settle_due(biller.agent, now)
        await scheduler.tick(biller.agent, biller.config, now, store=biller.store, rail=biller.rail)
        await biller.agent.purge_expired()


# --- A household's money ----------------------------------------------------------------------------------


def _falls_on(day_of_month: int, day: date) -> bool:
    last = (day.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
    return day.day == min(day_of_month, last.day)


class Ledger:
    """The household's bank account: income and outgoings land at the start of their day, payments leave it.

    `profile_on(day)` is the profile with the money the household has that morning (what the
    cash-flow model calls the balance at the start of today, less what was paid today already).
    """

    def __init__(self, profile: Profile, first_day: date) -> None:
        self.profile = profile
        self.currency = profile.balance.currency
        self.day = first_day
        self.opening = profile.balance.minor
        self.paid_today = 0
        self.balance = self.opening + self._flows(first_day)
        self._lowest = (self.balance, first_day)

    @property
    def lowest(self) -> tuple[int, date]:
        """The lowest end-of-day balance so far (today's as it stands), and its day."""
        return min(self._lowest, (self.balance, self.day))

    def _flows(self, day: date) -> int:
        profile = self.profile
        income = profile.income.amount.minor if _falls_on(profile.income.pay_day, day) else 0
        return income - sum(e.amount.minor for e in profile.expenses if _falls_on(e.day, day))

    def advance(self, day: date) -> None:
        while self.day < day:
            self._lowest = self.lowest
            self.day += timedelta(days=1)
            self.opening, self.paid_today = self.balance, 0
            self.balance += self._flows(self.day)

    def profile_on(self, day: date) -> Profile:
        if day != self.day:
            raise ValueError(f"the ledger is at {self.day}, not {day}")
        return dataclasses.replace(self.profile, balance=Money(self.currency, max(0, self.opening - self.paid_today)))

    def withdraw(self, amount: Money) -> None:
        if amount.minor > self.balance:
            raise PaymentNotSent(f"insufficient funds for {amount}")
        self.balance -= amount.minor
        self.paid_today += amount.minor

    def money(self, minor: int) -> str:
        sign = "-" if minor < 0 else ""
        return f"{sign}{Money(self.currency, abs(minor))}"


class DemoBank:
    """The household's bank (`PaymentSender`): pays the payee account named by verified instructions.

    A transfer to a biller's account lands on that biller's simulated rail under the
    instructed reference; the rail settles it after its delay and the biller signs the
    receipt. `declined` are the orders (1 = the first) the bank declines.
    """

    def __init__(
        self,
        ledger: Ledger,
        rails: Mapping[str, SimulatedRail],
        clock: ManualClock,
        declined: frozenset[int],
        problem: Callable[[str], None],
    ) -> None:
        self._ledger, self._rails, self._clock = ledger, rails, clock
        self._declined, self._problem = declined, problem
        self.orders = 0

    async def send(self, order: PaymentOrder) -> str:
        self.orders += 1
        if self.orders in self._declined:
            raise PaymentNotSent("the bank declined the transfer")
        rail = self._rails.get(order.payee_account)
        if rail is None or order.rail != RAIL_NAME:
            raise PaymentNotSent(f"the bank cannot reach {order.payee_name} ({order.rail})")
        self._ledger.withdraw(order.amount)
        transfer = rail.pay(order.payment_reference, order.amount, self._clock.now())
        if transfer.status is not TransferStatus.PENDING:
            self._problem(f"transfer {transfer.transfer_id} to {order.payee_name} held: {transfer.status.value}")
        return transfer.transfer_id


# --- What a household did ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoveView:
    """One signed message of a thread, for people: who sent it, what move, its terms or note."""

    by: str  # "household" or "biller"
    move: str
    terms: Terms | None = None
    note: str = ""

    def text(self) -> str:
        detail = f": {describe(self.terms)}" if self.terms is not None else ""
        return f"{self.move}{detail}" + (f" ({self.note})" if self.note else "")


@dataclass
class NegotiationRecord:
    biller: str
    bill: BillFacts
    day: date
    result: NegotiationResult
    renegotiation: bool
    bundle_file: str | None = None

    def moves(self) -> list[MoveView]:
        """Each signed message of the thread, in order (the household's at even sequences, NEG-7)."""
        moves = []
        for sequence, envelope in enumerate(self.result.messages):
            payload: NegotiationPayload = _PAYLOADS[envelope.payload_type].FromString(envelope.payload)
            by = "household" if Role.at(sequence) is Role.CONSUMER else "biller"
            move = move_of(payload)
            if isinstance(move, Open):
                moves.append(MoveView(by, "open + disclosure" if move.disclosure_digest else "open", move.terms))
            elif isinstance(move, Offer):
                moves.append(MoveView(by, "counter", move.terms))
            elif isinstance(move, Accept):
                moves.append(MoveView(by, "accept"))
            elif isinstance(move, Reject):
                moves.append(MoveView(by, "reject", note=move.note))
            elif isinstance(move, Withdraw):
                moves.append(MoveView(by, "withdraw", note=move.note))
        return moves


@dataclass
class PaymentRecord:
    biller: str
    bill_id: str
    what: str
    index: int
    amount: Money
    day: date
    state: str  # "paid" | "declined"
    intent_id: str = ""
    transfer: str = ""
    agreement_digest: bytes = b""
    receipt: PaymentReceipt | None = None
    note: str = ""


@dataclass
class SeenEvent:
    day: date
    biller: str
    event: AccountEvent


# --- A household ------------------------------------------------------------------------------------------


class DemoHousehold:
    """One household of the demo: the reference consumer (`reference_consumer.runner.Household`, what
    `parley consumer run` runs) acting for it, the world around it (its ledger, and a bank that pays into
    the billers' simulated rails), and what the demo saw it do, taken from its pass reports and its store.

    The demo decides nothing for the household: each `run_pass` is the reference household's own pass.
    """

    def __init__(
        self,
        spec: Household,
        *,
        clock: ManualClock,
        sites: Mapping[str, BillerSite],
        story: Story,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.profile = spec.profile
        self.clock = clock
        self.sites = sites
        self.story = story
        self.ledger = Ledger(spec.profile, clock.now().date())
        rails = {site.config.payments.payee_account: site.biller.rail for site in sites.values()}
        self.bank = DemoBank(self.ledger, rails, clock, spec.declined_orders, self.problem)
        self.problems: list[str] = []
        self.bills: dict[tuple[str, str], BillFacts] = {}
        self.plans: list[tuple[date, str, str, str, str]] = []  # (day, biller, bill, step, terms)
        self.negotiations: list[NegotiationRecord] = []
        self.broken: set[bytes] = set()  # thread ids of agreements the biller ended
        self.payments: list[PaymentRecord] = []
        self.seen: list[SeenEvent] = []
        self._told: list[tuple[date, str]] = []
        self._following = False
        self._household: runner.Household | None = None
        self.opened_profile: Profile | None = None  # the profile the reference household runs with

    @property
    def household(self) -> runner.Household:
        assert self._household is not None, "open() first"
        return self._household

    @property
    def agent(self) -> ConsumerAgent:
        return self.household.agent

    @property
    def fingerprint(self) -> bytes:
        return self.household.fingerprint

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.tell(self.clock.now().date(), f"[red]PROBLEM[/red] {escape(text)}")

    def tell(self, day: date, text: str) -> None:
        """A line of the story, printed by `flush` (households act at once; their stories are told in turn)."""
        self._told.append((day, text))

    def flush(self) -> None:
        told, self._told = self._told, []
        for day, text in told:
            self.story.line(day, self.name, text)

    def site(self, biller: str) -> BillerSite:
        return self.sites[biller]

    # --- life cycle ---

    async def open(self, state_dir: Path, ca_file: Path, codes: Mapping[str, str]) -> None:
        """Open the reference household in `state_dir`, its profile saying how to reach each biller with the
        one-time code and pinned fingerprint of its paper bill (`codes`: account id → code)."""
        connections = {
            account.biller_party_id: BillerConnection(
                target=self.site(account.biller_party_id).target,
                fingerprint=self.site(account.biller_party_id).fingerprint,
                account_id=account.account_id,
                code=codes[account.account_id],
                ca_file=ca_file,
            )
            for account in self.spec.accounts
        }
        billers = {preference.biller_id: preference for preference in self.profile.billers}
        preferences = [
            dataclasses.replace(billers.get(biller, BillerPreference(biller, 0)), connection=connection)
            for biller, connection in connections.items()
        ]
        profile = dataclasses.replace(self.profile, billers=tuple(preferences))
        self.opened_profile = profile
        strategy = ReferenceStrategy(self.ledger.profile_on, cushion=self.spec.cushion)
        self._household = await runner.Household.open(
            profile,
            state_dir,
            clock=self.clock,
            approval=runner.Approval.DENY,  # the households never leave their mandate: any question is a problem
            retry=RETRY,
            event_idle=FIRST_PASS_EVENT_IDLE,
            bank=self.bank,
            strategy=strategy,
        )

    async def close(self) -> None:
        if self._household is not None:
            await self._household.close()

    async def follow(self) -> None:
        """Enrolled: from now on events are stored as they arrive and each pass reads them at once."""
        await self.household.follow()
        self._following = True

    async def delivered(self, biller: str, account_id: str) -> int:
        """How many of the account's events the household's watch has stored."""
        failure = self.household.watch_failure(biller, account_id)
        if failure is not None:
            raise DemoFailure(f"{self.name}'s event watch failed: {failure!r}")
        return len(await self.agent.stored_events(biller, account_id=account_id))

    # --- each day ---

    async def run_pass(self, day: date) -> bool:
        """The reference household's pass, told as the story; whether it negotiated or paid."""
        stored = {  # before `follow` (the enrolling pass), nothing is stored yet
            (account.biller_party_id, account.account_id): await self.delivered(
                account.biller_party_id, account.account_id
            )
            for account in self.spec.accounts
            if self._following
        }
        report = await self.household.run_pass()
        news = [e for e in report.events if e.sequence < stored.get((e.biller_party_id, e.account_id), 0)]
        for event in news:  # what the pass read before acting: told first
            self._saw(day, event)
        for bill_line in report.bills:
            self.bills[(bill_line.biller_party_id, bill_line.bill.bill_id)] = bill_line.bill
        self._planned(day, report)
        for negotiation in report.negotiations:
            await self._negotiated(day, negotiation)
        for approval in report.approvals:
            request = approval.request
            why = "; ".join(request.violations) or request.reason
            self.problem(f"asked to approve {request.action} on {request.bill.bill_id} ({why}): {approval.answer}")
        acted = bool(report.negotiations)
        for line in report.payments:
            if line.status in ("paid now", runner.DECLINED_NOW):
                await self._paid(day, line)
                acted = True
        for receipt in report.receipts:
            self._receipt(day, receipt)
        for event in report.events[len(news) :]:  # the billers' answers to what it did
            self._saw(day, event)
        for problem in report.problems:
            self.problem(f"{problem.what}: {problem.detail}")
        return acted

    def _saw(self, day: date, event: AccountEvent) -> None:
        biller = event.biller_party_id
        self.seen.append(SeenEvent(day, biller, event))
        if event.kind == ARRANGEMENT_BROKEN and event.thread_id:
            self.broken.add(event.thread_id)
        if event.kind == BILL_ISSUED:
            return  # told with the bill run
        level = f" {event.reminder_level}" if event.kind == REMINDER else ""
        colour = "red" if event.kind in (INSTALMENT_MISSED, ARRANGEMENT_BROKEN) else "cyan"
        self.tell(
            day,
            f"← {self.site(biller).name}: [{colour}]{kind_name(event.kind)}{level}[/{colour}] {escape(event.message)}",
        )

    def _planned(self, day: date, report: runner.PassReport) -> None:
        """Record each decision of the budget plan the first time it is made (a bill paid as billed is
        planned again each day until it is paid, with the same terms)."""
        known = {(biller, bill_id, terms) for _, biller, bill_id, _, terms in self.plans}
        fresh = [p for p in report.plan if (p.biller_id, p.bill.bill_id, describe(p.opening.terms)) not in known]
        if len(fresh) > 1:
            order = ", then ".join(
                f"{self.site(p.biller_id).name} (priority {self.profile.priority_of(p.biller_id)})" for p in fresh
            )
            self.tell(day, f"plans one budget for {len(fresh)} bills: {order}")
        for planned in fresh:
            biller, bill, opening = planned.biller_id, planned.bill, planned.opening
            self.plans.append((day, biller, bill.bill_id, opening.step.name, describe(opening.terms)))
            if self.profile.pay_as_billed and opening.pays_as_billed:
                self.tell(
                    day,
                    f"→ {self.site(biller).name} {bill.bill_id}: no negotiation needed, "
                    f"will {describe(opening.terms)} (due {bill.due_date})",
                )

    async def _negotiated(self, day: date, line: runner.NegotiationLine) -> None:
        biller, bill_id = line.biller_party_id, line.bill_id
        threads = [thread for thread in await self.household.store.threads(biller, bill_id) if thread.messages]
        if not threads:
            self.problem(f"the negotiation on {bill_id} was not opened: {line.note or line.outcome}")
            return
        result = await self.agent.negotiation(threads[-1].thread_id)
        known = next((r for r in self.negotiations if r.result.thread_id == result.thread_id), None)
        if known is not None:  # a thread resumed by a later pass
            known.result = result
        else:
            renegotiation = any(record.bill.bill_id == bill_id for record in self.negotiations)
            bill = self.bills[(biller, bill_id)]
            known = NegotiationRecord(biller, bill, day, result, renegotiation)
            self.negotiations.append(known)
        steps = "; ".join(f"{'←' if move.by == 'biller' else '→'} {move.text()}" for move in known.moves())
        outcome = result.outcome.value.upper() if result.outcome is not None else "NOT OPENED"
        colour = "green" if result.agreed else "red"
        again = "renegotiates" if known.renegotiation else "negotiates"
        self.tell(day, f"{again} {bill_id} with {self.site(biller).name}: {steps} ⇒ [{colour}]{outcome}[/]")
        if not result.agreed:
            self.problem(f"the negotiation on {bill_id} ended {outcome}")

    async def _paid(self, day: date, line: runner.PaymentLine) -> None:
        """A payment the pass made, or the bank declined, with the intent it was made under."""
        biller, index = line.biller_party_id, line.instalment - 1
        what = "in full" if line.of == 1 else f"instalment {line.instalment} of {line.of}"
        intents = [p for p in await self.agent.payments(biller) if p.bill_id == line.bill_id]
        if line.status == runner.DECLINED_NOW:
            intent = next(p for p in reversed(intents) if p.instalment_index == index)
            record = PaymentRecord(biller, line.bill_id, what, index, intent.amount, day, "declined", note=line.note)
            record.agreement_digest = intent.agreement_digest
            self.payments.append(record)
            self.tell(
                day,
                f"[red]its bank declined[/red] the payment of {intent.amount} for {line.bill_id}, {what} "
                f"({escape(line.note)}): the bot tells its user and does not retry on its own",
            )
            return
        intent = next(p for p in intents if p.proof == line.bank_reference)
        record = PaymentRecord(biller, line.bill_id, what, index, intent.amount, day, "paid", intent.intent_id)
        record.transfer, record.agreement_digest = intent.proof, intent.agreement_digest
        self.payments.append(record)
        self.tell(
            day,
            f"pays {self.site(biller).name} {intent.amount} for {line.bill_id}, {what} (bank transfer {intent.proof})",
        )

    def _receipt(self, day: date, receipt: PaymentReceipt) -> None:
        record = next((p for p in self.payments if p.intent_id == receipt.intent_id), None)
        if record is None:
            self.problem(f"a receipt for {receipt.intent_id}, a payment the demo did not see")
            return
        record.receipt = receipt
        left = f", {receipt.remaining_balance} left on the bill" if receipt.remaining_balance is not None else ""
        self.tell(
            day,
            f"  receipt verified: {receipt.amount_received} for {record.bill_id}, settled "
            f"{receipt.settle_time:%Y-%m-%d %H:%M} ({receipt.rail_reference}){left}",
        )


# --- The story --------------------------------------------------------------------------------------------


class Story:
    """The printed story: a dated timeline while the clock moves, then the tables."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def line(self, day: date, who: str, text: str) -> None:
        self.console.print(f"[dim]{day}[/dim] [bold]{escape(who)}[/bold] {text}", highlight=False, soft_wrap=True)


# --- The checks -------------------------------------------------------------------------------------------


def _agreements(bot: DemoHousehold) -> list[NegotiationRecord]:
    return [record for record in bot.negotiations if record.result.agreed]


def _due_in_view(record: NegotiationRecord) -> list[int]:
    agreement = record.result.agreement
    assert agreement is not None
    return [i for i, instalment in enumerate(agreement.terms.schedule) if instalment.due_date <= END]


def _paid(bot: DemoHousehold, record: NegotiationRecord, index: int) -> PaymentRecord | None:
    agreement = record.result.agreement
    assert agreement is not None
    return next(
        (
            payment
            for payment in bot.payments
            if payment.state == "paid"
            and payment.agreement_digest == agreement.accept.digest
            and payment.index == index
        ),
        None,
    )


def _check_plan_paid(bot: DemoHousehold, record: NegotiationRecord, problems: list[str]) -> None:
    agreement = record.result.agreement
    assert agreement is not None
    for index in _due_in_view(record):
        instalment = agreement.terms.schedule[index]
        payment = _paid(bot, record, index)
        if payment is None:
            problems.append(f"{record.bill.bill_id}: instalment {index + 1} due {instalment.due_date} was not paid")
        elif payment.day != instalment.due_date or payment.amount != instalment.amount:
            problems.append(f"{record.bill.bill_id}: instalment {index + 1} paid {payment.amount} on {payment.day}")


def _common_checks(bot: DemoHousehold) -> list[str]:
    problems = list(bot.problems)
    for payment in bot.payments:
        if payment.state != "paid":
            continue
        if payment.receipt is None:
            problems.append(f"no receipt for {payment.what} of {payment.bill_id} paid {payment.day}")
        elif payment.receipt.amount_received != payment.amount or payment.receipt.disputed:
            problems.append(f"the receipt for {payment.intent_id} says {payment.receipt.amount_received}")
    receipts = {payment.receipt.digest for payment in bot.payments if payment.receipt is not None}
    for seen in bot.seen:
        if seen.event.kind == PAYMENT_RECEIVED and seen.event.related_digest not in receipts:
            problems.append(f"thanks on {seen.day} name a receipt the household does not hold (EVT-8)")
    lowest, on = bot.ledger.lowest
    if lowest < bot.profile.buffer.minor:
        below = bot.ledger.money(lowest)
        problems.append(f"the balance fell to {below} on {on}, below the buffer {bot.profile.buffer}")
    return problems


def _check_shared_budget(bot: DemoHousehold) -> tuple[list[str], str]:
    problems: list[str] = []
    ranked = sorted(bot.spec.accounts, key=lambda a: bot.profile.priority_of(a.biller_party_id) or 0)
    first, second = ranked[0], ranked[1]
    decided = [biller for _, biller, _, _, _ in bot.plans]
    if decided[:2] != [first.biller_party_id, second.biller_party_id]:
        problems.append(f"bills decided in the order {decided}, not by priority")
    paid_first = [p for p in bot.payments if p.biller == first.biller_party_id and p.state == "paid"]
    first_bill = bot.bills.get((first.biller_party_id, sample.bill_id_for(first.account_id, START)))
    if len(paid_first) != 1 or first_bill is None or paid_first[0].day > first_bill.due_date:
        problems.append(f"the {bot.site(first.biller_party_id).name} bill (priority 1) was not paid by its due date")
    elif paid_first[0].amount != first.amount:
        problems.append(f"the priority bill was paid {paid_first[0].amount}, not in full")
    later = [r for r in _agreements(bot) if r.biller == second.biller_party_id]
    if len(later) != 1 or later[0].result.agreement is None:
        problems.append("the second biller's bill has no agreement")
        return problems, ""
    terms = later[0].result.agreement.terms
    pay_day = bot.profile.income.pay_day
    if terms.kind is not TermsKind.DEFERRAL or terms.schedule[0].due_date.day != pay_day + 1:
        problems.append(f"the second bill was agreed as {describe(terms)}, not deferred past pay day")
    _check_plan_paid(bot, later[0], problems)
    return problems, (
        f"{bot.site(first.biller_party_id).name} paid {paid_first[0].amount if paid_first else '-'} on time; "
        f"{bot.site(second.biller_party_id).name} deferred past pay day: {describe(terms)}"
    )


def _single_agreement(bot: DemoHousehold, problems: list[str]) -> NegotiationRecord | None:
    agreed = _agreements(bot)
    if len(agreed) != 1:
        problems.append(f"{len(agreed)} agreements, expected 1")
        return None
    return agreed[0]


def _check_early_discount(bot: DemoHousehold) -> tuple[list[str], str]:
    problems: list[str] = []
    record = _single_agreement(bot, problems)
    if record is None or record.result.agreement is None:
        return problems, ""
    terms, bill = record.result.agreement.terms, record.bill
    discount = [line for line in terms.lines if line.kind is LineKind.DISCOUNT]
    if terms.kind is not TermsKind.PAY_IN_FULL or not discount:
        problems.append(f"agreed {describe(terms)}, not the early-payment discount")
    paid = [p for p in bot.payments if p.state == "paid"]
    if len(paid) != 1 or paid[0].amount >= bill.amount_due or paid[0].day != bill.issue_date:
        problems.append("the bill was not paid at once for less than it asked")
    _check_plan_paid(bot, record, problems)
    return problems, f"paid {terms.total} for a bill of {bill.amount_due} on the day it arrived"


def _check_deferral(bot: DemoHousehold) -> tuple[list[str], str]:
    problems: list[str] = []
    record = _single_agreement(bot, problems)
    if record is None or record.result.agreement is None:
        return problems, ""
    terms, bill = record.result.agreement.terms, record.bill
    when = terms.schedule[0].due_date
    if terms.kind is not TermsKind.DEFERRAL or when <= bill.due_date or when.day != bot.profile.income.pay_day + 1:
        problems.append(f"agreed {describe(terms)}, not a deferral to the day after pay day")
    _check_plan_paid(bot, record, problems)
    return problems, f"deferred from {bill.due_date} to {when}, the day after pay day"


def _check_counter_offer(bot: DemoHousehold) -> tuple[list[str], str]:
    problems: list[str] = []
    record = _single_agreement(bot, problems)
    if record is None or record.result.agreement is None:
        return problems, ""
    agreement, bill = record.result.agreement, record.bill
    plan = bill.options.instalments
    moves = record.moves()
    opening = moves[0].terms
    if plan is None or opening is None or len(opening.schedule) <= plan.max_count:
        problems.append("the household did not ask for more instalments than advertised")
    if not any(move.by == "biller" and move.move == "counter" for move in moves):
        problems.append("the biller did not counter")
    if agreement.offered_by is not Role.BILLER or (moves[-1].by, moves[-1].move) != ("household", "accept"):
        problems.append("the household did not accept the biller's counter-offer")
    violations = agent_mandate(bot.profile).violations(agreement.terms, bill)
    if violations:
        problems.append(f"the agreement is outside the mandate: {'; '.join(violations)}")
    _check_plan_paid(bot, record, problems)
    asked = len(opening.schedule) if opening is not None else 0
    return problems, (
        f"asked {asked} instalments (≤{plan.max_count if plan else '?'} advertised), "
        f"accepted the counter: {describe(agreement.terms)}"
    )


def _check_hardship(bot: DemoHousehold) -> tuple[list[str], str]:
    problems: list[str] = []
    record = _single_agreement(bot, problems)
    if record is None or record.result.agreement is None:
        return problems, ""
    terms, bill = record.result.agreement.terms, record.bill
    programme = bill.programme(terms.hardship_programme_id) if terms.hardship_programme_id else None
    if programme is None:
        problems.append("the agreement claims no hardship programme")
    if any(line.kind is LineKind.FEE for line in terms.lines):
        problems.append("the hardship agreement carries fees")
    moves = record.moves()
    if not moves or moves[0].move != "open + disclosure":
        problems.append("the household disclosed nothing")
    _check_plan_paid(bot, record, problems)
    return problems, f"{terms.hardship_programme_id}, disclosed for ASSESS_HARDSHIP, no fees: {describe(terms)}"


def _check_missed(bot: DemoHousehold) -> tuple[list[str], str]:
    problems: list[str] = []
    agreed = _agreements(bot)
    if len(agreed) != 2 or agreed[0].bill.bill_id != agreed[1].bill.bill_id:
        problems.append(f"{len(agreed)} agreements, expected a plan and its renegotiation on the same bill")
        return problems, ""
    first, second = agreed
    declined = [p for p in bot.payments if p.state == "declined"]
    if (
        len(declined) != 1
        or first.result.agreement is None
        or declined[0].agreement_digest != (first.result.agreement.accept.digest)
    ):
        problems.append("no instalment of the first plan was declined")
    kinds = [seen.event.kind for seen in bot.seen]
    wanted = [INSTALMENT_MISSED, ARRANGEMENT_BROKEN, RENEGOTIATION_OFFERED]
    positions = [kinds.index(kind) if kind in kinds else -1 for kind in wanted]
    if -1 in positions or positions != sorted(positions):
        problems.append("the biller did not report the missed instalment, end the plan and offer renegotiation")
    if not second.renegotiation:
        problems.append("the second agreement is not a renegotiation")
    _check_plan_paid(bot, second, problems)
    assert second.result.agreement is not None
    return problems, f"missed instalment 1, plan broken, renegotiated: {describe(second.result.agreement.terms)}"


CHECKS: dict[Scenario, Callable[[DemoHousehold], tuple[list[str], str]]] = {
    Scenario.SHARED_BUDGET: _check_shared_budget,
    Scenario.EARLY_DISCOUNT: _check_early_discount,
    Scenario.DEFERRAL: _check_deferral,
    Scenario.COUNTER_OFFER: _check_counter_offer,
    Scenario.HARDSHIP: _check_hardship,
    Scenario.MISSED_INSTALMENT: _check_missed,
}


# --- The run ----------------------------------------------------------------------------------------------


@dataclass
class BundleCheck:
    file: str
    household: str
    biller: str
    bill_id: str
    verified: bool
    detail: str


@dataclass
class Outcome:
    households: list[DemoHousehold] = field(default_factory=list)
    bundles: list[BundleCheck] = field(default_factory=list)
    verdicts: dict[str, tuple[list[str], str]] = field(default_factory=dict)
    phishing: str = ""
    errors: list[str] = field(default_factory=list)
    site_facts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and bool(self.verdicts)
            and all(not problems for problems, _ in self.verdicts.values())
            and all(check.verified for check in self.bundles)
        )


async def _events_delivered(bots: Sequence[DemoHousehold], sites: Mapping[str, BillerSite]) -> None:
    """Wait until every event the billers appended has reached its household's watch."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EVENT_TIMEOUT
    waiting = [(bot, account) for bot in bots for account in bot.spec.accounts]
    while waiting:
        behind = []
        for bot, account in waiting:
            count = await sites[account.biller_party_id].biller.store.event_count(account.account_id)
            if await bot.delivered(account.biller_party_id, account.account_id) < count:
                behind.append((bot, account))
        waiting = behind
        if waiting:
            if loop.time() > deadline:
                names = ", ".join(f"{bot.name} ({account.account_id})" for bot, account in waiting)
                raise DemoFailure(f"events did not reach {names} within {EVENT_TIMEOUT:.0f}s")
            await asyncio.sleep(0.002)


async def _passes(bots: Sequence[DemoHousehold], day: date) -> list[bool]:
    """A pass of every household at once (their waits for the billers and stores overlap), then each
    household's story of it, in turn; the first failure is raised, the other passes cancelled. Whether each
    household acted."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(bot.run_pass(day)) for bot in bots]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    finally:
        for bot in bots:
            bot.flush()
    return [task.result() for task in tasks]


async def _phishing(bot: DemoHousehold, real: BillerSite, state_dir: Path, clock: ManualClock, ca: DevCA) -> str:
    """A look-alike endpoint with the real party id and a valid TLS certificate, refused by the pin (KEY-12)."""
    fake = await BillerSite.start(real.config, state_dir / "look-alike", clock, ca)
    try:
        account = bot.spec.accounts[0]
        code = await fake.biller.agent.issue_enrolment_code(account.account_id)
        try:
            await bot.agent.enrol(
                fake.target,
                biller_party_id=real.party_id,
                fingerprint=real.fingerprint,
                account_id=account.account_id,
                code=code,
                tls=ClientTls(root_certificates=ca.cert_pem),
            )
        except (ProtocolError, CallError) as error:
            return error.reason.name
        return "ACCEPTED"
    finally:
        await fake.stop()


async def _issue_bills(sites: Mapping[str, BillerSite], bots: Sequence[DemoHousehold], story: Story) -> None:
    for site in sites.values():
        issued = []
        for bot in bots:
            for account in bot.spec.accounts:
                if account.biller_party_id != site.party_id:
                    continue
                await site.biller.agent.issue_bill(
                    account.account_id,
                    account.amount,
                    START + PAYMENT_TERM,
                    account.description,
                    bill_id=sample.bill_id_for(account.account_id, START),
                )
                issued.append(f"{account.account_id} {account.amount}")
        story.line(START, site.name, f"bill run: {len(issued)} signed bills ({', '.join(issued)})")


async def _simulate(story: Story, outcome: Outcome, state: Path) -> None:
    """The three months, with every party's state under `state` (each household's in `state/<its key>`)."""
    console = story.console
    clock = ManualClock(at(START) - timedelta(hours=1))
    ca = make_dev_ca("Parley demo CA")
    ca_file = state / "demo-ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    async with contextlib.AsyncExitStack() as stack:
        sites: dict[str, BillerSite] = {}
        for config in (load_config(SAMPLE), load_config(TELECOM_CONFIG)):
            site = await BillerSite.start(config, state / config.party_id.replace(":", "-"), clock, ca)
            stack.push_async_callback(site.stop)
            sites[site.party_id] = site
            outcome.site_facts.append(
                {
                    "party_id": site.party_id,
                    "name": site.name,
                    "address": site.target,
                    "tls": True,
                    "fingerprint": site.fingerprint.hex(),
                }
            )
        bots = [DemoHousehold(spec, clock=clock, sites=sites, story=story) for spec in HOUSEHOLDS]
        for bot in bots:  # the paper bill: a one-time code per account, and the biller's fingerprint
            codes = {}
            for account in bot.spec.accounts:
                biller = sites[account.biller_party_id].biller
                codes[account.account_id] = await biller.agent.issue_enrolment_code(account.account_id)
            await bot.open(state / bot.spec.key, ca_file, codes)
            stack.push_async_callback(bot.close)
            outcome.households.append(bot)
        _print_setup(console, sites, bots)

        target, real = bots[0], sites[bots[0].spec.accounts[0].biller_party_id]
        outcome.phishing = await _phishing(target, real, state, clock, ca)
        story.line(
            clock.now().date(),
            target.name,
            f"is sent a look-alike '{real.name}' endpoint (a valid TLS certificate, the same party id, "
            f"another key): refused before anything is sent, [bold]{outcome.phishing}[/bold]",
        )
        if outcome.phishing != Reason.PIN_MISMATCH.name:
            outcome.errors.append(f"the look-alike endpoint was not refused ({outcome.phishing})")
        # The first pass enrols, with the codes and pinned fingerprints of the profile.
        await _passes(bots, clock.now().date())
        for bot in bots:
            await bot.follow()
        accounts = ", ".join(account.account_id for bot in bots for account in bot.spec.accounts)
        story.line(
            clock.now().date(),
            "Households",
            f"enrol with the one-time codes and pinned fingerprints from their paper bills: {accounts}",
        )
        console.rule("[bold]Three months, day by day[/bold] (09:00 UTC: billers' upkeep, then the households)")

        day = START
        while day <= END + timedelta(days=1):
            clock.set(at(day))
            for bot in bots:
                bot.ledger.advance(day)
            if day == START:
                await _issue_bills(sites, bots, story)
            for site in sites.values():
                await site.upkeep()
            await _events_delivered(bots, sites)
            passes = await _passes(bots, day)
            acted = [bot for bot, did in zip(bots, passes, strict=True) if did]
            if acted:  # a second look: the billers' answers to what the households just did
                await _events_delivered(acted, sites)
                await _passes(acted, day)
            day += timedelta(days=1)
        for site in sites.values():
            for transfer in site.biller.rail.disputes():
                outcome.errors.append(f"{site.name} holds transfer {transfer.transfer_id}: {transfer.status.value}")


def _write_bundles(out_dir: Path, bots: Sequence[DemoHousehold], outcome: Outcome) -> None:
    """Each agreement as `parley-bundle/1` JSON, read back and verified offline with both identities pinned."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for bot in bots:
        counts: Counter[str] = Counter()
        for record in _agreements(bot):
            bill_id = record.bill.bill_id
            counts[bill_id] += 1
            path = out_dir / f"agreement-{bill_id}-{counts[bill_id]}.json"
            path.write_text(json.dumps(record.result.bundle().to_json(), indent=1) + "\n", encoding="utf-8")
            record.bundle_file = path.name
            site = bot.site(record.biller)
            try:
                agreement = verify_bundle(
                    Bundle.load(path), pins={site.party_id: site.fingerprint, bot.profile.party_id: bot.fingerprint}
                )
                expected = record.result.agreement
                assert expected is not None
                verified = agreement.accept.digest == expected.accept.digest and agreement.terms == expected.terms
                detail = "VALID" if verified else "VALID, but not the agreement the household holds"
            except (ProtocolError, ValueError) as error:
                verified, detail = False, f"INVALID {getattr(error, 'reason', Reason.INTERNAL_ERROR).name}: {error}"
            outcome.bundles.append(BundleCheck(path.name, bot.name, site.name, bill_id, verified, detail))


def _judge(outcome: Outcome) -> None:
    for bot in outcome.households:
        problems = _common_checks(bot)
        scenario_problems, headline = CHECKS[bot.spec.scenario](bot)
        problems += scenario_problems
        for check in outcome.bundles:
            if check.household == bot.name and not check.verified:
                problems.append(f"bundle {check.file} did not verify: {check.detail}")
        outcome.verdicts[bot.spec.key] = (problems, headline)


# --- Printing ---------------------------------------------------------------------------------------------


def _print_setup(console: Console, sites: Mapping[str, BillerSite], bots: Sequence[DemoHousehold]) -> None:
    billers = Table(title="Billers (reference billers over gRPC + TLS on 127.0.0.1)", title_justify="left")
    for column in ("biller", "party id", "endpoint", "identity fingerprint", "accounts"):
        billers.add_column(column)
    for site in sites.values():
        accounts = ", ".join(account.account_id for account in site.config.accounts)
        billers.add_row(site.name, site.party_id, site.target, site.fingerprint.hex()[:16] + "…", accounts)
    console.print(billers)
    households = Table(title="Households (reference consumer agents, cash-flow strategy)", title_justify="left")
    for column in ("household", "scenario", "money", "mandate", "accounts"):
        households.add_column(column)
    for bot in bots:
        profile = bot.profile
        money = (
            f"{profile.balance} now, {profile.income.amount} on the {profile.income.pay_day}th, buffer {profile.buffer}"
        )
        mandate = profile.mandate
        limits = f"fees ≤{mandate.max_fee}, ≤{mandate.max_instalments} instalments"
        if profile.hardship:
            limits += ", may disclose hardship"
        accounts = ", ".join(
            f"{account.account_id} ({sites[account.biller_party_id].name})" for account in bot.spec.accounts
        )
        households.add_row(bot.name, bot.spec.summary, money, limits, accounts)
    console.print(households)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for column in columns:
        table.add_column(column)
    return table


def _bills_table(bots: Sequence[DemoHousehold]) -> Table:
    table = _table(
        "Bills (signed by the biller, verified against its pinned identity)",
        "biller", "account", "household", "amount", "due", "advertised options",
    )  # fmt: skip
    rows = sorted(
        ((bot.site(biller).name, facts, bot) for bot in bots for (biller, _), facts in bot.bills.items()),
        key=lambda row: (row[0], row[1].account_id),
    )
    for name, facts, bot in rows:
        table.add_row(name, facts.account_id, bot.name, str(facts.amount_due), str(facts.due_date), options_text(facts))
    return table


def _negotiations_table(bots: Sequence[DemoHousehold]) -> Table:
    table = _table("Negotiations (alternating signed offers)", "household", "bill", "moves", "outcome")
    for bot in bots:
        for record in bot.negotiations:
            moves = "\n".join(f"{move.by}: {move.text()}" for move in record.moves())
            result = record.result.outcome.value if record.result.outcome is not None else "not opened"
            table.add_row(bot.name, record.bill.bill_id, escape(moves), result)
    return table


def _agreements_table(bots: Sequence[DemoHousehold]) -> Table:
    table = _table("Agreements (the accepted offer + the acceptance)", "household", "bill", "terms", "status", "bundle")
    for bot in bots:
        for record in _agreements(bot):
            agreement = record.result.agreement
            assert agreement is not None
            count = len(agreement.terms.schedule)
            paid = sum(1 for p in bot.payments if p.state == "paid" and p.agreement_digest == agreement.accept.digest)
            if record.result.thread_id in bot.broken:
                status = f"[red]broken[/red] ({paid} of {count} paid)"
            elif paid == count:
                status = "[green]completed[/green]"
            else:
                status = f"{paid} of {count} paid"
            table.add_row(bot.name, record.bill.bill_id, describe(agreement.terms), status, record.bundle_file or "")
    return table


def _payments_table(bots: Sequence[DemoHousehold]) -> Table:
    table = _table("Payments and signed receipts", "date", "household", "bill", "what", "amount", "receipt")
    rows = sorted(((p.day, bot, p) for bot in bots for p in bot.payments), key=lambda row: (row[0], row[1].name))
    for day, bot, payment in rows:
        if payment.state == "declined":
            receipt = f"[red]declined by the bank[/red] ({escape(payment.note)})"
        elif payment.receipt is None:
            receipt = "[red]none[/red]"
        else:
            receipt = f"settled {payment.receipt.settle_time:%m-%d %H:%M}, {payment.receipt.rail_reference}"
        table.add_row(f"{day:%m-%d}", bot.name, payment.bill_id, payment.what, str(payment.amount), receipt)
    return table


def _events_table(bots: Sequence[DemoHousehold]) -> Table:
    table = _table("What each household saw on its event watch (signed, in order)", "household", "events")
    for bot in bots:
        counts = Counter(kind_name(seen.event.kind) for seen in bot.seen)
        table.add_row(bot.name, ", ".join(f"{kind} ×{n}" if n > 1 else kind for kind, n in counts.items()))
    return table


def _bundles_table(outcome: Outcome) -> Table:
    table = _table("Agreement bundles, verified offline with both identities pinned", "file", "household", "verdict")
    for check in outcome.bundles:
        verdict = f"[green]{check.detail}[/green]" if check.verified else f"[red]{escape(check.detail)}[/red]"
        table.add_row(check.file, check.household, verdict)
    return table


def _outcomes_table(outcome: Outcome) -> Table:
    table = _table("Outcomes", "household", "scenario", "outcome")
    for bot in outcome.households:
        problems, headline = outcome.verdicts.get(bot.spec.key, (["not judged"], ""))
        text = f"[red]✗[/red] {escape('; '.join(problems))}" if problems else f"[green]✓[/green] {escape(headline)}"
        table.add_row(bot.name, bot.spec.scenario.value, text)
    return table


def _print_tables(console: Console, outcome: Outcome) -> None:
    bots = outcome.households
    for table in (
        _bills_table(bots),
        _negotiations_table(bots),
        _agreements_table(bots),
        _payments_table(bots),
        _events_table(bots),
        _bundles_table(outcome),
        _outcomes_table(outcome),
    ):
        console.print(table)


def _summary(outcome: Outcome, elapsed: float) -> dict[str, Any]:
    households = []
    for bot in outcome.households:
        problems, headline = outcome.verdicts.get(bot.spec.key, (["not judged"], ""))
        lowest, lowest_on = bot.ledger.lowest
        households.append(
            {
                "key": bot.spec.key,
                "name": bot.name,
                "party_id": bot.profile.party_id,
                "scenario": bot.spec.scenario.value,
                "ok": not problems,
                "problems": problems,
                "outcome": headline,
                "bills": [
                    {
                        "biller": biller,
                        "bill_id": bill_id,
                        "account_id": facts.account_id,
                        "amount": str(facts.amount_due),
                        "issued": facts.issue_date.isoformat(),
                        "due": facts.due_date.isoformat(),
                        "max_instalments": facts.options.instalments.max_count if facts.options.instalments else 0,
                    }
                    for (biller, bill_id), facts in bot.bills.items()
                ],
                "plans": [
                    {"day": day.isoformat(), "biller": biller, "bill_id": bill_id, "step": step, "terms": terms}
                    for day, biller, bill_id, step, terms in bot.plans
                ],
                "negotiations": [
                    {
                        "biller": record.biller,
                        "bill_id": record.bill.bill_id,
                        "day": record.day.isoformat(),
                        "renegotiation": record.renegotiation,
                        "outcome": record.result.outcome.value if record.result.outcome is not None else None,
                        "moves": [
                            {
                                "by": move.by,
                                "move": move.move,
                                "terms": None if move.terms is None else terms_json(move.terms),
                                "note": move.note,
                            }
                            for move in record.moves()
                        ],
                        "bundle": record.bundle_file,
                    }
                    for record in bot.negotiations
                ],
                "agreements": [
                    {
                        "biller": record.biller,
                        "bill_id": record.bill.bill_id,
                        "offered_by": record.result.agreement.offered_by.name.lower(),
                        "broken": record.result.thread_id in bot.broken,
                        "terms": terms_json(record.result.agreement.terms),
                        "bundle": record.bundle_file,
                    }
                    for record in _agreements(bot)
                    if record.result.agreement is not None
                ],
                "payments": [
                    {
                        "biller": payment.biller,
                        "bill_id": payment.bill_id,
                        "what": payment.what,
                        "amount": str(payment.amount),
                        "day": payment.day.isoformat(),
                        "state": payment.state,
                        "note": payment.note,
                        "receipt": None
                        if payment.receipt is None
                        else {
                            "amount": str(payment.receipt.amount_received),
                            "settled": payment.receipt.settle_time.isoformat(),
                            "rail_reference": payment.receipt.rail_reference,
                        },
                    }
                    for payment in bot.payments
                ],
                "events": {
                    "counts": dict(Counter(kind_name(seen.event.kind) for seen in bot.seen)),
                    "log": [
                        {
                            "day": seen.day.isoformat(),
                            "biller": seen.biller,
                            "kind": kind_name(seen.event.kind),
                            "bill_id": seen.event.bill_id,
                            "message": seen.event.message,
                        }
                        for seen in bot.seen
                    ],
                },
                "balance": {
                    "start": str(bot.profile.balance),
                    "end": bot.ledger.money(bot.ledger.balance),
                    "lowest": bot.ledger.money(lowest),
                    "lowest_on": lowest_on.isoformat(),
                    "buffer": str(bot.profile.buffer),
                },
            }
        )
    return {
        "ok": outcome.ok,
        "start": START.isoformat(),
        "end": END.isoformat(),
        "elapsed_seconds": round(elapsed, 2),
        "phishing_refused_with": outcome.phishing,
        "errors": outcome.errors,
        "billers": outcome.site_facts,
        "households": households,
        "bundles": [dataclasses.asdict(check) for check in outcome.bundles],
    }


async def _serve_spaces(households: Sequence[DemoHousehold], listen: str, out: Console) -> None:
    """The six households' spaces on one site (one token for the demo) until Ctrl-C: the pages of
    `parley consumer serve`, reading each reference household's own state directory."""
    from reference_consumer.web import (  # noqa: PLC0415 - the pages' templates only when asked for
        HouseholdSource,
        StateDirSource,
        create_space_app,
        space_config,
    )

    host, _, port = listen.rpartition(":")
    sources: dict[str, HouseholdSource] = {}
    for bot in households:
        assert bot.opened_profile is not None
        profile = dataclasses.replace(bot.ledger.profile_on(bot.ledger.day), billers=bot.opened_profile.billers)
        home = bot.household.state_dir
        sources[bot.spec.key] = StateDirSource(profile, home, clock=bot.clock, name=bot.name)
    app = create_space_app(sources, space_config("Parley demo households", host=host.strip("[]")), live=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with start_site(app, host.strip("[]"), int(port)) as site:
            out.print(f"The households' spaces (one link for all six): {site.opening_url}", highlight=False)
            out.print("Ctrl-C stops the pages.", highlight=False)
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run(
    out_dir: Path,
    console: Console | None = None,
    *,
    summary: Path | None = None,
    state_dir: Path | None = None,
    serve: str | None = None,
) -> int:
    """Run the demo; 0 when every scenario reached its outcome and every bundle verified, 1 otherwise.

    `state_dir` keeps every party's state (keys, stores; each household's reference consumer state
    directory is `state_dir/<household key>`, as `parley consumer run --state-dir` uses it); by default
    it is a temporary directory, removed at the end. With `serve` ("127.0.0.1:PORT") the six households'
    spaces (the pages of `parley consumer serve`) are then served from those directories until Ctrl-C.
    """
    out = console or Console()
    story = Story(out)
    outcome = Outcome()
    started = time.monotonic()
    out.rule("[bold]Parley demo[/bold]: two billers, six households, three months — real gRPC, TLS, signatures")
    try:
        with contextlib.ExitStack() as scratch:
            if state_dir is None:
                state_dir = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="parley-demo-")))
            state_dir.mkdir(parents=True, exist_ok=True)
            asyncio.run(_simulate(story, outcome, state_dir))
            code = _report(out_dir, out, outcome, summary, started)
            if serve is not None and outcome.households:
                out.rule("[bold]The households' own spaces[/bold]")
                with contextlib.suppress(KeyboardInterrupt):
                    asyncio.run(_serve_spaces(outcome.households, serve, out))
            return code
    except Exception as failure:  # the demo reports every failure, then exits 1
        outcome.errors.append(f"{type(failure).__name__}: {failure}")
        out.print("[bold red]The demo failed:[/bold red]")
        out.print_exception(max_frames=4)
    return _report(out_dir, out, outcome, summary, started)


def _report(out_dir: Path, out: Console, outcome: Outcome, summary: Path | None, started: float) -> int:
    """Write and verify the bundles, judge, print the tables and the verdict: 0 when everything held."""
    try:
        _write_bundles(out_dir, outcome.households, outcome)  # also what was agreed before a failure
    except OSError as unwritable:
        outcome.errors.append(f"cannot write the bundles to {out_dir}: {unwritable}")
    _judge(outcome)
    if outcome.households:
        out.rule("[bold]The story in tables[/bold]")
        _print_tables(out, outcome)
    elapsed = time.monotonic() - started
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(_summary(outcome, elapsed), indent=2) + "\n", encoding="utf-8")
    verified = sum(check.verified for check in outcome.bundles)
    if outcome.ok:
        first = outcome.bundles[0]
        pin = next(
            f"{site['party_id']}={site['fingerprint']}" for site in outcome.site_facts if site["name"] == first.biller
        )
        out.print(
            f"[bold green]All {len(outcome.verdicts)} households reached their outcomes; "
            f"{verified} agreement bundles in {out_dir} verified offline[/bold green] ({elapsed:.1f}s). "
            f"Check one yourself: parley verify --pin {pin} {out_dir / first.file}",
            highlight=False,
            soft_wrap=True,
        )
        return 0
    for text in outcome.errors:
        out.print(f"[red]error:[/red] {escape(text)}")
    failed = [key for key, (problems, _) in outcome.verdicts.items() if problems]
    out.print(
        f"[bold red]The demo did not hold[/bold red]: {len(failed)} household(s) off their outcome, "
        f"{len(outcome.bundles) - verified} bundle(s) invalid, {len(outcome.errors)} error(s) ({elapsed:.1f}s)"
    )
    return 1


def _demo_command(args: argparse.Namespace, out: Console) -> int:
    if args.serve is not None:
        host, _, port = args.serve.rpartition(":")
        try:
            check_listen_address(host.strip("[]"), tls_cert=None, tls_key=None, client_ca=None)
        except ValueError as error:
            out.print(f"[red]--serve: {escape(str(error))}[/red]")
            return 2
        if not port.isdigit() or int(port) > 65535:
            out.print("[red]--serve wants HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:8080[/red]")
            return 2
    if not wants_json(args):
        return run(Path(args.out), out, serve=args.serve)
    with tempfile.TemporaryDirectory(prefix="parley-demo-") as scratch:
        summary = Path(scratch) / "summary.json"
        status = run(Path(args.out), out, summary=summary, serve=args.serve)
        emit_json(args, json.loads(summary.read_text(encoding="utf-8")), out)
    return status


def add_demo_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `parley demo` on the `parley` command's subparsers."""
    demo = commands.add_parser(
        "demo", help="two billers and six households over gRPC for three simulated months; bundles verified offline"
    )
    demo.add_argument(
        "--out",
        type=directory_argument,  # checked now: the bundles are written after the whole run
        default="parley-demo",
        metavar="DIR",
        help="directory for the agreement bundles (default: %(default)s)",
    )
    add_json_options(demo, "the outcome (per household and bundle)")
    demo.add_argument(
        "--serve",
        metavar="HOST:PORT",
        help="then serve the six households' spaces (the pages of `parley consumer serve`) on this loopback address "
        "until Ctrl-C; one link, printed, opens all six",
    )
    demo.set_defaults(handler=_demo_command)


__all__ = ["DemoFailure", "add_demo_command", "run"]
