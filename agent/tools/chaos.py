"""The crash-safety harness behind `parley chaos`: SIGKILL a loaded biller, restart it, check nothing was lost.

    parley chaos [--kills N] [--clients C] [--seed S] [--state-dir DIR]
                 [--seconds-between-kills MIN:MAX] [--json | --json-out FILE]

The reference biller runs as a separate process (`parley biller serve
--conformance-control --insecure` on a free loopback port). Many consumer
clients — asyncio tasks here, each its own party, key and gRPC channel — run
complete cycles against it: a test bill, a negotiation ending in an agreement
(accepted at once, or countered and then accepted), a payment intent for the
agreement, settlement through the conformance control, the receipt, the events.
Every call that fails because the biller is gone is sent again with the very
same bytes (TRN-6), and each client keeps a `Ledger` of what it was
acknowledged. Meanwhile a seeded killer sends SIGKILL at random moments and
restarts the biller on the same state directory and port, `kills` times.

Then the load stops, the biller is stopped gracefully and started once more,
and four checks run, each a separate function over what was observed:

1. `check_acceptances`: every acceptance acknowledged to a client is in its
   thread (GetThread), and the agreement bundle verifies offline (BND-1);
2. `check_payments`: no intent was settled twice, no logical payment (bill,
   agreement, instalment) got two intents or two payments, every acknowledged
   intent is stored with the instructions it was answered, every acknowledged
   settlement is stored, receipts agree (PAY-7);
3. `check_events`: each account's log read from sequence 0 verifies, has no gap
   and no duplicate, chains, and holds every event a client was sent, unchanged
   (EVT-4);
4. `check_integrity`: `PRAGMA integrity_check` of the stopped biller's SQLite file;

and `check_clients` reports refusals during the load that no crash explains.

Clients never advance the biller's clock: its `SteppableClock` restarts from
real time after each kill, so everything here is signed at real time.

The reference rail keeps payment instructions in memory only
(`reference_biller/rail.py`), so an intent acknowledged before a kill can no
longer be settled through `SettlePayments` afterwards: such intents are counted
as `unsettled`, not as faults. A settlement is a fault to lose only when
`SettlePayments` answered with no kill since the intent was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.markup import escape

from agent.conformance.client import Connection, Refusal
from agent.conformance.peers import SignedParty, free_port
from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.dsse import digest
from agent.protocol.errors import ProtocolError, Reason
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import PROTOCOL_VERSION
from agent.protocol.messages import open_envelope
from agent.tools.json_output import add_json_options, emit_json
from agent.tools.numbers import check_number
from agent.tools.paths import directory_argument
from parley.v1 import biller_service_pb2, envelope_pb2, event_pb2, negotiation_pb2, terms_pb2
from reference_biller.service import STORE_FILE

DEFAULT_KILLS = 20
DEFAULT_CLIENTS = 8
DEFAULT_PAUSE = (0.5, 3.0)  # seconds between kills, drawn uniformly
# Upper bounds: each client is a connection and a task, each kill a restart of the biller.
MAX_KILLS = 10_000
MAX_CLIENTS = 256
MAX_PAUSE_SECONDS = 3600.0
READY_TIMEOUT = 45.0  # a (re)started biller must be SERVING within this
STOP_TIMEOUT = 20.0  # a graceful stop must end within this, or the process is killed
OUTAGE_LIMIT = 90.0  # a client gives up (and the run fails) on a biller unreachable this long
CALL_TIMEOUT = 10.0
RETRY_PAUSE = 0.1
RATE_LIMIT_PAUSE = 0.5  # LIM-8: a key's bucket refills at rate_limit_per_second (20 by default)
DRAIN_TIMEOUT = 30.0  # after the last kill, clients get this long to finish their cycle
LOAD_EVENT_IDLE = 0.3  # a client's watch ends after this long without an event
FINAL_EVENT_IDLE = 1.0  # the final read of a log ends after this long without an event
DETAILS_KEPT = 10  # problems described per check (the counts cover all of them)
EXIT_PASS, EXIT_FAIL, EXIT_UNUSABLE = 0, 1, 2

# The cycle's bill and offers, within the reference biller's "standard" segment (reference_biller/sample.toml):
# deferrals of up to 30 days for a 5.00 fee are advertised, so 20 days is accepted at once and 45 is countered.
CURRENCY = "EUR"
AMOUNT_DUE = 12_000
DEFERRAL_FEE = 500
DUE_IN_DAYS = 30
INSIDE_DAYS = 20
OUTSIDE_DAYS = 45

# Reconnect quickly after a restart (gRPC's default backoff grows to two minutes).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)
_AGREED = negotiation_pb2.NEGOTIATION_OUTCOME_AGREED


class ChaosError(RuntimeError):
    """The harness could not run (the biller would not start, stayed unreachable…): neither PASS nor FAIL."""


class UnexpectedAnswer(Exception):
    """An answer that no crash explains (a refusal, a negotiation not agreed): a fault in the client's ledger."""


def _now() -> datetime:
    return datetime.now(UTC)


# --- The biller process ------------------------------------------------------------------------------


class BillerProcess:
    """The reference biller in a child process, on one state directory and port across restarts.

    `generation` counts the stops and kills so far: it is raised *before* the
    signal is sent, so a client that reads the same generation before a request
    and after an answer knows that one process served both.
    """

    def __init__(self, state_dir: Path, port: int, log_path: Path) -> None:
        self.state_dir = state_dir
        self.port = port
        self.log_path = log_path
        self.generation = 0
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def database(self) -> Path:
        return self.state_dir / STORE_FILE

    async def start(self) -> None:
        """Start the biller and wait (bounded) until its health check says SERVING."""
        command = [
            sys.executable,
            "-m",
            "agent.cli",
            "biller",
            "serve",
            "--conformance-control",
            "--insecure",
            "--listen",
            self.target,
            "--state-dir",
            str(self.state_dir),
        ]
        with self.log_path.open("ab") as log:
            # A session of its own: a Ctrl-C at the terminal reaches the harness only, which then kills the child.
            self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.starts += 1
        await self._wait_ready()

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, the store is left as the crash leaves it."""
        process = self._running()
        self.generation += 1
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait)

    async def stop(self) -> None:
        """SIGTERM, a graceful stop (WAL checkpointed); SIGKILL if it does not end in time."""
        process = self._running()
        self.generation += 1
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
            raise ChaosError(f"the biller did not stop within {STOP_TIMEOUT:g} s of SIGTERM") from None

    def ensure_dead(self) -> None:
        """Kill the child if it still runs (always called on the way out, errors and Ctrl-C included)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            raise ChaosError("the biller is not running")
        return self._process

    async def _wait_ready(self) -> None:
        process = self._running()
        deadline = time.monotonic() + READY_TIMEOUT
        request = health_pb2.HealthCheckRequest(service="")
        async with grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health's stubs type no methods on it
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise ChaosError(f"the biller exited with status {process.returncode}; see {self.log_path}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(request, timeout=1.0)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(RETRY_PAUSE)
        raise ChaosError(f"the biller was not SERVING within {READY_TIMEOUT:g} s; see {self.log_path}")


def open_connection(target: str) -> Connection:
    """A plaintext loopback connection that reconnects within half a second of a restart."""
    channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
    return Connection(channel, call_timeout=CALL_TIMEOUT)


# --- What clients were acknowledged --------------------------------------------------------------


@dataclass(frozen=True)
class AckedAcceptance:
    """An acceptance a client saw acknowledged: its Negotiate call answered AGREED."""

    bill_id: str
    thread_id: bytes
    accept_digest: bytes


@dataclass
class Ledger:
    """Everything one client was acknowledged, and every refusal no crash explains."""

    party: SignedParty
    account_id: str = ""
    cycles: int = 0
    acceptances: list[AckedAcceptance] = field(default_factory=list)
    intents: dict[str, bytes] = field(default_factory=dict)  # intent id → digest of the instructions answered
    settled: set[str] = field(default_factory=set)  # intents SettlePayments settled with no kill in between
    receipts: dict[str, set[bytes]] = field(default_factory=dict)  # digests of the receipts seen, per intent
    events: dict[int, bytes] = field(default_factory=dict)  # sequence → digest of each event streamed
    event_conflicts: int = 0  # a sequence streamed twice with two different events
    retries: Counter[str] = field(default_factory=Counter)  # calls resent (once or more), by cause
    unexpected: list[str] = field(default_factory=list)


# --- The load -------------------------------------------------------------------------------------


def _money(minor: int) -> terms_pb2.Money:
    return terms_pb2.Money(currency_code=CURRENCY, amount_minor=minor)


def deferral_terms(due: date, days: int) -> terms_pb2.Terms:
    """The whole bill plus the deferral fee, paid once, `days` after the due date."""
    total = AMOUNT_DUE + DEFERRAL_FEE
    return terms_pb2.Terms(
        kind=terms_pb2.TERMS_KIND_DEFERRAL,
        principal=_money(AMOUNT_DUE),
        lines=[terms_pb2.Line(kind=terms_pb2.LINE_KIND_FEE, description="deferral fee", amount=_money(DEFERRAL_FEE))],
        total=_money(total),
        schedule=[terms_pb2.Instalment(due_date=(due + timedelta(days=days)).isoformat(), amount=_money(total))],
    )


async def until_answered(
    call: Callable[[], Awaitable[Any]], allowed: Sequence[Reason] = (), retries: Counter[str] | None = None
) -> Any:
    """The call's answer (or a refusal for one of the `allowed` reasons), the same request sent again while
    the biller is unreachable (TRN-6) or rate-limits us (ERR-6); UnexpectedAnswer for any other refusal.
    `retries` counts the calls that had to be resent, by the first cause ("unreachable", "rate_limited")."""
    deadline = time.monotonic() + OUTAGE_LIMIT
    resent = False
    while True:
        answer = await call()
        if not isinstance(answer, Refusal) or answer.reason in {reason.name for reason in allowed}:
            return answer
        rate_limited = answer.reason == Reason.RATE_LIMITED.name
        if not (answer.unreachable or rate_limited):
            raise UnexpectedAnswer(f"{answer.rpc}: {answer.describe()}")
        if time.monotonic() > deadline:
            raise ChaosError(f"the biller kept refusing for {OUTAGE_LIMIT:g} s: {answer.describe()}")
        if retries is not None and not resent:
            retries["rate_limited" if rate_limited else "unreachable"] += 1
        resent = True
        await asyncio.sleep(RATE_LIMIT_PAUSE if rate_limited else RETRY_PAUSE)


class LoadClient:
    """One consumer: enrols, then runs cycles until told to stop, recording every acknowledgement."""

    def __init__(self, name: str, connection: Connection, biller: BillerProcess, ledger: Ledger) -> None:
        self.name = name
        self.conn = connection
        self.biller = biller
        self.ledger = ledger

    async def run(self, stop: asyncio.Event) -> None:
        await self._enrol()
        while not stop.is_set():
            try:
                await self.cycle()
            except UnexpectedAnswer as error:
                self.ledger.unexpected.append(f"{self.name}: {error}")
            else:
                self.ledger.cycles += 1

    async def _enrol(self) -> None:
        account = await self._control(self.conn.create_test_account)
        enrolment = self.ledger.party.enrolment(account.account_id, account.enrolment_code)
        await self._call("Enrol", biller_service_pb2.EnrolRequest(request=enrolment))
        self.ledger.account_id = account.account_id

    async def cycle(self) -> None:
        """Bill → negotiation to agreement → intent → settlement → receipt → events."""
        party, account_id = self.ledger.party, self.ledger.account_id
        due = _now().date() + timedelta(days=DUE_IN_DAYS)
        issued = await self._control(
            lambda: self.conn.issue_test_bill(account_id, _money(AMOUNT_DUE), due.isoformat(), None)
        )
        fetched = await self._call(
            "GetBill", biller_service_pb2.GetBillRequest(query=party.query(account_id, bill_id=issued.bill_id))
        )
        bill: envelope_pb2.Envelope = fetched.bill
        acceptance = await self._agree(issued.bill_id, bill, due)
        intent_id = f"chaos-{self.name}-{self.ledger.cycles}-{acceptance.accept_digest.hex()[:8]}"
        intent = party.intent(
            account_id,
            issued.bill_id,
            intent_id,
            _money(AMOUNT_DUE + DEFERRAL_FEE),
            agreement_digest=acceptance.accept_digest,
        )
        generation = self.biller.generation
        answer = await self._call("CreatePaymentIntent", biller_service_pb2.CreatePaymentIntentRequest(intent=intent))
        self.ledger.intents[intent_id] = digest(answer.instructions)
        await self._control(self.conn.settle_payments)
        if self.biller.generation == generation:  # one process took the intent and settled it
            self.ledger.settled.add(intent_id)
        receipt = await self._call(
            "GetReceipt",
            biller_service_pb2.GetReceiptRequest(query=party.query(account_id, intent_id=intent_id)),
            allowed=(Reason.PAYMENT_NOT_SETTLED,),
        )
        if not isinstance(receipt, Refusal):
            self.ledger.receipts.setdefault(intent_id, set()).add(digest(receipt.receipt))
        await self._watch()

    async def _agree(self, bill_id: str, bill: envelope_pb2.Envelope, due: date) -> AckedAcceptance:
        """Even cycles open inside the advertised options (accepted at once), odd ones outside (countered)."""
        party = self.ledger.party
        countered = self.ledger.cycles % 2 == 1
        opening = party.open(bill_id, digest(bill), deferral_terms(due, OUTSIDE_DAYS if countered else INSIDE_DAYS))
        answer = await self._call("Negotiate", biller_service_pb2.NegotiateRequest(move=opening))
        thread_id = negotiation_pb2.ThreadOpen.FromString(opening.payload).header.thread_id
        if countered:
            if answer.reply.payload_type != "parley.v1.Offer":
                raise UnexpectedAnswer(self._odd("an opening outside the options", answer))
            accept = party.move([opening, answer.reply], negotiation_pb2.Accept(offer_digest=digest(answer.reply)))
            answer = await self._call("Negotiate", biller_service_pb2.NegotiateRequest(move=accept))
            accept_digest = digest(accept)
        else:
            accept_digest = digest(answer.reply)
        if answer.outcome != _AGREED:
            raise UnexpectedAnswer(self._odd("the acceptance", answer))
        acceptance = AckedAcceptance(bill_id, thread_id, accept_digest)
        self.ledger.acceptances.append(acceptance)
        return acceptance

    @staticmethod
    def _odd(what: str, answer: biller_service_pb2.NegotiateResponse) -> str:
        outcome = negotiation_pb2.NegotiationOutcome.Name(answer.outcome)
        return f"Negotiate: {what} was answered {answer.reply.payload_type or 'no reply'}, {outcome}"

    async def _watch(self) -> None:
        """Stream the account's events from the next unseen sequence until the log goes quiet."""
        start = max(self.ledger.events, default=-1) + 1
        query = self.ledger.party.query(self.ledger.account_id, start_sequence=start)
        async with self.conn.watch(query) as stream:
            while True:
                try:
                    event = await stream.next(LOAD_EVENT_IDLE)
                except TimeoutError:
                    return
                if event is None or isinstance(event, Refusal):  # the biller went away: the next cycle resumes
                    return
                sequence = event_pb2.Event.FromString(event.payload).header.sequence
                known = self.ledger.events.setdefault(sequence, digest(event))
                if known != digest(event):
                    self.ledger.event_conflicts += 1

    async def _call(self, rpc: str, request: Message, *, allowed: Sequence[Reason] = ()) -> Any:
        return await until_answered(lambda: self.conn.call(rpc, request), allowed, self.ledger.retries)

    async def _control(self, call: Callable[[], Awaitable[Any]]) -> Any:
        return await until_answered(call, (), self.ledger.retries)


# --- Observing the biller after the run ----------------------------------------------------------


@dataclass
class Observed:
    """What the restarted biller serves for the clients' acknowledgements, read over gRPC."""

    threads: dict[bytes, biller_service_pb2.GetThreadResponse | None] = field(default_factory=dict)
    bills: dict[str, envelope_pb2.Envelope | None] = field(default_factory=dict)
    receipts: dict[str, envelope_pb2.Envelope | None] = field(default_factory=dict)  # by intent id
    events: dict[str, list[envelope_pb2.Envelope]] = field(default_factory=dict)  # by account, read from 0


async def _read_or_none(conn: Connection, rpc: str, request: Message, *missing: Reason) -> Any:
    """A read's answer, or None when it is refused for one of the `missing` reasons."""
    try:
        answer = await until_answered(lambda: conn.call(rpc, request), missing)
    except UnexpectedAnswer as error:
        raise ChaosError(f"the restarted biller refused a read: {error}") from error
    return None if isinstance(answer, Refusal) else answer


async def _observe_client(conn: Connection, ledger: Ledger, observed: Observed) -> None:
    party, account_id = ledger.party, ledger.account_id
    for acceptance in ledger.acceptances:
        thread_query = party.query(account_id, thread_id=acceptance.thread_id)
        observed.threads[acceptance.thread_id] = await _read_or_none(
            conn, "GetThread", biller_service_pb2.GetThreadRequest(query=thread_query), Reason.NOT_FOUND
        )
        bill_query = party.query(account_id, bill_id=acceptance.bill_id)
        bill = await _read_or_none(
            conn, "GetBill", biller_service_pb2.GetBillRequest(query=bill_query), Reason.NOT_FOUND
        )
        observed.bills[acceptance.bill_id] = None if bill is None else bill.bill
    for intent_id in ledger.intents:
        receipt_query = party.query(account_id, intent_id=intent_id)
        receipt = await _read_or_none(
            conn,
            "GetReceipt",
            biller_service_pb2.GetReceiptRequest(query=receipt_query),
            Reason.NOT_FOUND,
            Reason.PAYMENT_NOT_SETTLED,
        )
        observed.receipts[intent_id] = None if receipt is None else receipt.receipt
    log: list[envelope_pb2.Envelope] = []
    deadline = time.monotonic() + OUTAGE_LIMIT
    # The reads above spend this key's LIM-8 budget: a rate-limited stream resumes where it stopped (ERR-6).
    while (refusal := await _read_events(conn, party.query(account_id, start_sequence=len(log)), log)) is not None:
        if refusal.reason != Reason.RATE_LIMITED.name or time.monotonic() > deadline:
            raise ChaosError(f"the restarted biller's event stream failed: {refusal.describe()}")
        await asyncio.sleep(RATE_LIMIT_PAUSE)
    observed.events[account_id] = log


async def _read_events(
    conn: Connection, query: envelope_pb2.Envelope, log: list[envelope_pb2.Envelope]
) -> Refusal | None:
    """Append the stream's events to `log` until it stays idle; the refusal that ended it, if one did."""
    async with conn.watch(query) as stream:
        while True:
            try:
                event = await stream.next(FINAL_EVENT_IDLE)
            except TimeoutError:
                return None
            if event is None or isinstance(event, Refusal):
                return event
            log.append(event)


async def observe(target: str, ledgers: Sequence[Ledger]) -> Observed:
    """Read back every acknowledged thread, bill and receipt, and every client's whole event log."""
    observed = Observed()
    connections = [open_connection(target) for _ in ledgers]
    try:
        await asyncio.gather(
            *(_observe_client(conn, ledger, observed) for conn, ledger in zip(connections, ledgers, strict=True))
        )
    finally:
        for conn in connections:
            await conn.close()
    return observed


@dataclass(frozen=True)
class StoredIntent:
    """A payment intent row: which instalment of which agreement it pays, and the instructions it was given."""

    account_id: str
    intent_id: str
    bill_id: str
    agreement_digest: bytes
    instalment_index: int
    instructions_digest: bytes

    @property
    def payment(self) -> tuple[str, str, bytes, int]:
        """The logical payment: one instalment of one agreement on one bill of one account."""
        return (self.account_id, self.bill_id, self.agreement_digest, self.instalment_index)


@dataclass(frozen=True)
class StoredPayments:
    """The biller's payment tables, read from its SQLite file after it stopped."""

    intents: tuple[StoredIntent, ...]
    settlements: tuple[tuple[str, str, bytes], ...]  # account, intent, receipt digest


def _read_only(database: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)


def _envelope_digest(serialized: bytes) -> bytes:
    return digest(envelope_pb2.Envelope.FromString(serialized))


def read_payments(database: Path) -> StoredPayments:
    with contextlib.closing(_read_only(database)) as db:
        intents = [
            StoredIntent(account, intent, bill, agreement, index, _envelope_digest(instructions))
            for account, intent, bill, agreement, index, instructions in db.execute(
                """SELECT account_id, intent_id, bill_id, agreement_digest, instalment_index, instructions
                   FROM payment_intents"""
            )
        ]
        settlements = [
            (account, intent, _envelope_digest(receipt))
            for account, intent, receipt in db.execute("SELECT account_id, intent_id, receipt FROM settlements")
        ]
    return StoredPayments(tuple(intents), tuple(settlements))


# --- The checks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One check: what it counted, the faults it found (each must be 0), and the first problems described."""

    name: str
    counts: Mapping[str, int]
    faults: Mapping[str, int]
    details: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not any(self.faults.values())

    def to_json(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "counts": dict(self.counts),
            "faults": dict(self.faults),
            "details": list(self.details),
        }


class _Problems:
    """Fault counters and the first few descriptions."""

    def __init__(self, *kinds: str) -> None:
        self.faults: Counter[str] = Counter({kind: 0 for kind in kinds})
        self.details: list[str] = []

    def add(self, kind: str, detail: str, count: int = 1) -> None:
        self.faults[kind] += count
        if len(self.details) < DETAILS_KEPT:
            self.details.append(detail)

    def result(self, name: str, counts: Mapping[str, int]) -> CheckResult:
        return CheckResult(name, dict(counts), dict(self.faults), tuple(self.details))


def check_acceptances(
    ledgers: Sequence[Ledger], observed: Observed, biller_id: str, biller_key_sets: Sequence[envelope_pb2.Envelope]
) -> CheckResult:
    """(1) Every acknowledged acceptance is stored in its thread and its agreement bundle verifies offline."""
    problems = _Problems("missing", "unverifiable")
    checked = verified = 0
    for ledger in ledgers:
        for acceptance in ledger.acceptances:
            checked += 1
            thread = observed.threads.get(acceptance.thread_id)
            bill = observed.bills.get(acceptance.bill_id)
            label = f"thread {acceptance.thread_id.hex()} on bill {acceptance.bill_id}"
            if thread is None or bill is None:
                problems.add("missing", f"{label}: {'thread' if thread is None else 'bill'} not found")
                continue
            if acceptance.accept_digest not in {digest(message) for message in thread.messages}:
                problems.add("missing", f"{label}: the acknowledged acceptance is not in the thread")
                continue
            bundle = Bundle(
                key_sets={biller_id: list(biller_key_sets), ledger.party.party_id: list(ledger.party.key_sets)},
                bill=bill,
                thread=list(thread.messages),
            )
            try:
                agreement = verify_bundle(bundle)
            except (ProtocolError, ValueError) as error:
                problems.add("unverifiable", f"{label}: the bundle does not verify: {error}")
                continue
            if agreement.accept.digest != acceptance.accept_digest:
                problems.add("unverifiable", f"{label}: the bundle's acceptance is not the one acknowledged")
                continue
            verified += 1
    return problems.result("acceptances", {"acknowledged": checked, "verified": verified})


def _payment_received(events: Iterable[envelope_pb2.Envelope]) -> Counter[bytes]:
    """How many PAYMENT_RECEIVED events name each receipt digest."""
    named: Counter[bytes] = Counter()
    for envelope in events:
        event = event_pb2.Event.FromString(envelope.payload)
        if event.kind == event_pb2.EVENT_KIND_PAYMENT_RECEIVED:
            named[event.related_digest] += 1
    return named


def check_payments(ledgers: Sequence[Ledger], observed: Observed, stored: StoredPayments) -> CheckResult:
    """(2) One intent, at most one payment; one logical payment, one intent; nothing acknowledged is lost."""
    problems = _Problems(
        "double_payments",
        "duplicate_intents",
        "lost_intents",
        "changed_instructions",
        "lost_settlements",
        "receipt_mismatches",
    )
    per_intent = Counter((account, intent) for account, intent, _ in stored.settlements)
    for (account, intent), count in per_intent.items():
        if count > 1:
            problems.add("double_payments", f"intent {intent} on {account} settled {count} times", count - 1)
    stored_intent = {(intent.account_id, intent.intent_id): intent for intent in stored.intents}
    payment_of = Counter(intent.payment for intent in stored.intents)
    for (account, bill, _, index), count in payment_of.items():
        if count > 1:
            problems.add(
                "duplicate_intents", f"{count} intents for instalment {index} of {bill} on {account}", count - 1
            )
    settled_payment = Counter(stored_intent[key].payment for key in per_intent if key in stored_intent)
    for payment, count in settled_payment.items():
        if count > 1:
            problems.add("double_payments", f"instalment {payment[3]} of {payment[1]} paid {count} times", count - 1)
    receipt_of = {(account, intent): receipt for account, intent, receipt in stored.settlements}
    announced: Counter[bytes] = Counter()
    for log in observed.events.values():
        announced.update(_payment_received(log))
    unsettled = acknowledged = 0
    for ledger in ledgers:
        for intent_id, instructions in ledger.intents.items():
            acknowledged += 1
            key = (ledger.account_id, intent_id)
            if key not in stored_intent:
                problems.add("lost_intents", f"acknowledged intent {intent_id} is not stored")
                continue
            if stored_intent[key].instructions_digest != instructions:
                problems.add("changed_instructions", f"intent {intent_id}: stored instructions are not those sent")
            stored_receipt = receipt_of.get(key)
            if stored_receipt is None:
                if intent_id in ledger.settled:
                    problems.add("lost_settlements", f"intent {intent_id}: SettlePayments answered, no settlement")
                else:
                    unsettled += 1
                continue
            served = observed.receipts.get(intent_id)
            seen = ledger.receipts.get(intent_id, set())
            if served is None or digest(served) != stored_receipt or seen - {stored_receipt}:
                problems.add(
                    "receipt_mismatches", f"intent {intent_id}: receipts served or seen differ from the stored"
                )
            if announced[stored_receipt] != 1:
                problems.add(
                    "receipt_mismatches",
                    f"intent {intent_id}: {announced[stored_receipt]} PAYMENT_RECEIVED events for its receipt",
                )
    counts = {
        "acknowledged_intents": acknowledged,
        "stored_intents": len(stored.intents),
        "payments": len(stored.settlements),
        "unsettled": unsettled,
    }
    return problems.result("payments", counts)


def check_events(ledgers: Sequence[Ledger], observed: Observed, biller_chain: KeyChain) -> CheckResult:
    """(3) Each log read from 0 verifies, is gapless, duplicate-free and chained, and holds what clients saw."""
    problems = _Problems("unverifiable", "gaps", "duplicates", "broken_links", "changed")
    total = seen_total = 0
    for ledger in ledgers:
        log = observed.events.get(ledger.account_id, [])
        total += len(log)
        seen_total += len(ledger.events)
        by_sequence: dict[int, bytes] = {}
        previous = b""
        for envelope in log:
            try:
                event = open_envelope(
                    envelope, (event_pb2.Event,), sender_keys=biller_chain, recipient=ledger.party.party_id, now=None
                )
            except ProtocolError as error:
                problems.add("unverifiable", f"{ledger.account_id}: an event does not verify: {error}")
                continue
            sequence = event.header.sequence
            if sequence in by_sequence:
                problems.add("duplicates", f"{ledger.account_id}: sequence {sequence} served twice")
            elif by_sequence and event.header.previous_digest != previous:
                problems.add("broken_links", f"{ledger.account_id}: event {sequence} does not chain to the one before")
            by_sequence.setdefault(sequence, event.digest)
            previous = event.digest
        if by_sequence:
            missing = max(by_sequence) + 1 - len(by_sequence)
            if missing:
                problems.add("gaps", f"{ledger.account_id}: {missing} sequence(s) missing", missing)
        for sequence, seen in sorted(ledger.events.items()):
            if by_sequence.get(sequence) != seen:
                problems.add("changed", f"{ledger.account_id}: event {sequence} streamed earlier is gone or changed")
        if ledger.event_conflicts:
            problems.add(
                "changed",
                f"{ledger.account_id}: {ledger.event_conflicts} sequence(s) streamed twice as different events",
                ledger.event_conflicts,
            )
    return problems.result("events", {"events": total, "streamed_to_clients": seen_total})


def check_integrity(database: Path) -> CheckResult:
    """(4) PRAGMA integrity_check of the (stopped) biller's SQLite file, opened read-only."""
    problems = _Problems("integrity_errors")
    try:
        with contextlib.closing(_read_only(database)) as db:
            pages = int(db.execute("PRAGMA page_count").fetchone()[0])
            rows = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as error:  # too damaged to check at all ("file is not a database"...)
        problems.add("integrity_errors", str(error))
        return problems.result("integrity", {"pages": 0})
    if rows != ["ok"]:
        for row in rows:
            problems.add("integrity_errors", row)
    return problems.result("integrity", {"pages": pages})


def check_clients(ledgers: Sequence[Ledger]) -> CheckResult:
    """Refusals during the load that no crash explains (e.g. a retry answered differently after a restart)."""
    problems = _Problems("unexpected_refusals")
    for ledger in ledgers:
        for text in ledger.unexpected:
            problems.add("unexpected_refusals", text)
    counts = {
        "cycles": sum(ledger.cycles for ledger in ledgers),
        "resent_unreachable": sum(ledger.retries["unreachable"] for ledger in ledgers),
        "resent_rate_limited": sum(ledger.retries["rate_limited"] for ledger in ledgers),
    }
    return problems.result("clients", counts)


# --- Running it ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosOptions:
    kills: int = DEFAULT_KILLS
    clients: int = DEFAULT_CLIENTS
    seed: int = 0
    pause: tuple[float, float] = DEFAULT_PAUSE
    state_dir: Path | None = None  # None: a temporary directory, removed after a PASS

    def check(self) -> None:
        """Raise ValueError naming the option unless every option is usable; nothing is started or created before."""
        check_number("--kills", self.kills, 0, MAX_KILLS)
        check_number("--clients", self.clients, 1, MAX_CLIENTS)
        low, high = self.pause
        check_number("--seconds-between-kills MIN", low, 0, MAX_PAUSE_SECONDS)
        check_number("--seconds-between-kills MAX", high, low, MAX_PAUSE_SECONDS)


@dataclass(frozen=True)
class Identity:
    """The biller as Hello and GetKeySets present it."""

    party_id: str
    key_sets: tuple[envelope_pb2.Envelope, ...]

    @property
    def chain(self) -> KeyChain:
        return KeyChain.verify(list(self.key_sets))


@dataclass(frozen=True)
class ChaosReport:
    """The outcome: what was done, each check, PASS or FAIL."""

    kills: int
    seed: int
    clients: int
    seconds: float
    state_dir: Path
    checks: tuple[CheckResult, ...]
    ledgers: tuple[Ledger, ...] = field(repr=False)
    identity: Identity = field(repr=False)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def check(self, name: str) -> CheckResult:
        return next(check for check in self.checks if check.name == name)

    def summary(self) -> dict[str, object]:
        """The headline counts."""
        acceptances, payments = self.check("acceptances"), self.check("payments")
        integrity = self.check("integrity")
        return {
            "kills": self.kills,
            "cycles_completed": self.check("clients").counts["cycles"],
            "requests_resent": self.check("clients").counts["resent_unreachable"],
            "acceptances_checked": acceptances.counts["acknowledged"],
            "intents": payments.counts["acknowledged_intents"],
            "payments": payments.counts["payments"],
            "unsettled_intents": payments.counts["unsettled"],
            "events": self.check("events").counts["events"],
            "integrity": "ok" if integrity.passed else "; ".join(integrity.details),
        }

    def to_json(self) -> dict[str, object]:
        return {
            "result": "PASS" if self.passed else "FAIL",
            "seed": self.seed,
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "state_dir": str(self.state_dir),
            **self.summary(),
            "checks": {check.name: check.to_json() for check in self.checks},
        }


async def _identity(target: str) -> Identity:
    conn = open_connection(target)
    try:
        hello = await conn.call("Hello", biller_service_pb2.HelloRequest(protocol_versions=[PROTOCOL_VERSION]))
        key_sets = await conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest())
    finally:
        await conn.close()
    for answer in (hello, key_sets):
        if isinstance(answer, Refusal):
            raise ChaosError(f"the biller refused {answer.rpc}: {answer.describe()}")
    return Identity(hello.biller_party_id, tuple(key_sets.key_sets))


async def verify_state(biller: BillerProcess, ledgers: Sequence[Ledger], identity: Identity) -> tuple[CheckResult, ...]:
    """Start the (stopped) biller, read everything back, stop it gracefully, and run the four checks."""
    await biller.start()
    try:
        observed = await observe(biller.target, ledgers)
    finally:
        await biller.stop()
    return (
        check_clients(ledgers),
        check_acceptances(ledgers, observed, identity.party_id, identity.key_sets),
        check_payments(ledgers, observed, read_payments(biller.database)),
        check_events(ledgers, observed, identity.chain),
        check_integrity(biller.database),
    )


def _progress(line: str) -> None:
    """A progress line on stderr (a run takes minutes; stdout keeps the report)."""
    print(line, file=sys.stderr, flush=True)


async def _load_and_kill(
    biller: BillerProcess, ledgers: Sequence[Ledger], options: ChaosOptions, rng: random.Random
) -> None:
    """Clients cycle while the biller is killed and restarted `options.kills` times; then they finish up."""
    stop = asyncio.Event()
    connections = [open_connection(biller.target) for _ in ledgers]
    clients = [
        LoadClient(f"c{n}", conn, biller, ledger)
        for n, (conn, ledger) in enumerate(zip(connections, ledgers, strict=True))
    ]
    tasks = [asyncio.create_task(client.run(stop), name=f"chaos-{client.name}") for client in clients]
    try:
        for kill in range(1, options.kills + 1):
            done, _pending = await asyncio.wait(tasks, timeout=rng.uniform(*options.pause))
            for task in done:
                task.result()  # a client that stopped early failed: say why now
            await biller.kill()
            await biller.start()
            _progress(f"chaos: kill {kill} of {options.kills}: the biller was SIGKILLed and is serving again")
        _progress("chaos: last kill done; the clients finish their work")
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT)
        if pending:
            raise ChaosError(f"{len(pending)} client(s) did not finish within {DRAIN_TIMEOUT:g} s after the last kill")
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in connections:
            await conn.close()


async def run_chaos(options: ChaosOptions, state_dir: Path) -> ChaosReport:
    """The whole run on `state_dir` (the biller's state goes in `state_dir/biller`); always kills the child."""
    options.check()
    state_dir.mkdir(parents=True, exist_ok=True)
    biller = BillerProcess(state_dir / "biller", free_port(), state_dir / "biller.log")
    rng = random.Random(options.seed)  # noqa: S311 - reproducible kill timing, nothing secret
    started = time.monotonic()
    try:
        await biller.start()
        identity = await _identity(biller.target)
        ledgers = [Ledger(SignedParty.create(identity.party_id, clock=_now)) for _ in range(options.clients)]
        await _load_and_kill(biller, ledgers, options, rng)
        await biller.stop()
        _progress("chaos: checking every acknowledged agreement, payment and event, and the database")
        checks = await verify_state(biller, ledgers, identity)
    finally:
        biller.ensure_dead()
    return ChaosReport(
        kills=options.kills,
        seed=options.seed,
        clients=options.clients,
        seconds=time.monotonic() - started,
        state_dir=state_dir,
        checks=checks,
        ledgers=tuple(ledgers),
        identity=identity,
    )


# --- The command ----------------------------------------------------------------------------------


def parse_pause(text: str) -> tuple[float, float]:
    """Seconds between kills as MIN:MAX (or one number for a fixed pause)."""
    low, _, high = text.partition(":")
    try:
        pause = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX in seconds, not {text!r}") from None
    if not 0 <= pause[0] <= pause[1]:
        raise argparse.ArgumentTypeError(f"expected 0 ≤ MIN ≤ MAX, not {text!r}")
    return pause


def print_report(report: ChaosReport, out: Console) -> None:
    for check in report.checks:
        verdict = "[green]ok[/]" if check.passed else "[bold red]FAIL[/]"
        counts = ", ".join(f"{name} {value}" for name, value in check.counts.items())
        faults = ", ".join(f"{name} {value}" for name, value in check.faults.items() if value) or "no faults"
        out.print(f"{check.name:<12} {verdict}  {escape(counts)}")
        out.print(f"             {escape(faults)}")
        for detail in check.details:
            out.print(f"             [red]{escape(detail)}[/]")
    for name, value in report.summary().items():
        out.print(f"{name:<20} {escape(str(value))}")
    out.print(f"{'seconds':<20} {report.seconds:.1f}")
    out.print("[bold green]PASS[/]" if report.passed else f"[bold red]FAIL[/] (state kept in {report.state_dir})")


def _chaos(args: argparse.Namespace, out: Console) -> int:
    options = ChaosOptions(
        kills=args.kills,
        clients=args.clients,
        seed=args.seed,
        pause=args.seconds_between_kills,
        state_dir=args.state_dir,
    )
    try:
        options.check()
    except ValueError as error:
        out.print(f"[bold red]chaos could not run:[/] {escape(str(error))}")
        return EXIT_UNUSABLE
    state_dir = options.state_dir or Path(tempfile.mkdtemp(prefix="parley-chaos-"))
    out.print(
        f"chaos: {options.kills} kills, {options.clients} clients, seed {options.seed}, "
        f"{options.pause[0]:g}-{options.pause[1]:g} s between kills, state {escape(str(state_dir))}"
    )
    try:
        report = asyncio.run(run_chaos(options, state_dir))
    except (ChaosError, ValueError) as error:
        out.print(f"[bold red]chaos could not run:[/] {escape(str(error))}")
        return EXIT_UNUSABLE
    print_report(report, out)
    emit_json(args, report.to_json(), out)
    if report.passed and options.state_dir is None:
        shutil.rmtree(state_dir, ignore_errors=True)
    return EXIT_PASS if report.passed else EXIT_FAIL


def add_chaos_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`parley chaos`."""
    chaos = commands.add_parser(
        "chaos", help="SIGKILL a loaded reference biller again and again; check nothing acknowledged was lost"
    )
    chaos.add_argument("--kills", type=int, default=DEFAULT_KILLS, help="SIGKILLs to send (default: %(default)s)")
    chaos.add_argument(
        "--clients", type=int, default=DEFAULT_CLIENTS, help="concurrent consumer clients (default: %(default)s)"
    )
    chaos.add_argument("--seed", type=int, default=0, help="seed of the kill timing (default: %(default)s)")
    chaos.add_argument(
        "--seconds-between-kills",
        type=parse_pause,
        default=DEFAULT_PAUSE,
        metavar="MIN:MAX",
        help=f"pause before each kill, drawn uniformly (default: {DEFAULT_PAUSE[0]:g}:{DEFAULT_PAUSE[1]:g})",
    )
    chaos.add_argument(
        "--state-dir",
        type=directory_argument,  # checked now, not at its mkdir once the run has started
        metavar="DIR",
        help="where the biller's state and log go (default: a temporary directory, kept on FAIL)",
    )
    add_json_options(chaos, "the report")
    chaos.set_defaults(handler=_chaos)


__all__ = [
    "AckedAcceptance",
    "BillerProcess",
    "ChaosError",
    "ChaosOptions",
    "ChaosReport",
    "CheckResult",
    "Identity",
    "Ledger",
    "Observed",
    "StoredIntent",
    "StoredPayments",
    "add_chaos_command",
    "check_acceptances",
    "check_clients",
    "check_events",
    "check_integrity",
    "check_payments",
    "observe",
    "read_payments",
    "run_chaos",
    "verify_state",
]
