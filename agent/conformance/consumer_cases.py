"""The consumer-side conformance suite: `parley conformance consumer --client-cmd "CMD"`.

Each scenario starts a scripted biller of its own (`agent.conformance.hostile_biller`:
the real biller agent behind a servicer that forges what it sends and records
what it receives), on a free 127.0.0.1 port in plaintext, with a test account
and its one-time enrolment code, then runs the client under test — the shell
command CMD — once or twice with this environment:

| variable | value |
| --- | --- |
| `PARLEY_TARGET` | the biller's address, `127.0.0.1:PORT` (plaintext: loopback) |
| `PARLEY_BILLER_PARTY_ID` | the biller's party id |
| `PARLEY_FINGERPRINT` | the biller's identity fingerprint, hex — the pin (KEY-12) |
| `PARLEY_ACCOUNT_ID` | the account to enrol |
| `PARLEY_ENROLMENT_CODE` | its one-time code |
| `PARLEY_STATE_DIR` | a fresh directory for this scenario, kept between its runs |

Each run of CMD is one pass of the client: enrol if it has not, fetch and
verify the bills, negotiate, pay what is due today (a payment whose date — the
bill's due date without agreement, else each date the agreement sets — is
today or earlier, UTC), fetch receipts, read events — then exit. The biller
issues the bills as soon as the client has enrolled, each EUR 120.00 due
today and advertising a deferral of at most 30 days for a
EUR 5.00 fee, so one run goes the whole way. The client reports each payment
it makes as a JSON line of `$PARLEY_STATE_DIR/bank-orders.jsonl` (its bank);
the suite plays the payment rail and settles each order that carries the
reference of instructions the biller issued, for the instructed amount.

The verdict comes from what the biller observed — what the client accepted,
negotiated, sent payment intents for — and from the bank orders: a
conforming client never pays, nor negotiates, on forged or inconsistent
input. A scenario whose hostile input never reached the client fails with
"setup step failed" (the baseline scenario fails too for a client that does
nothing); one that needs an optional behaviour the client does not have
(negotiating, watching events, fetching receipts) is skipped with the reason.
A client command that cannot start (the shell's exit status 126 or 127) makes
every scenario skip, and the run exit 2.

docs/CONFORMANCE.md describes the scenarios and the client contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from agent.clock import Clock, SystemClock
from agent.conformance.hostile_biller import (
    AMOUNT_DUE,
    BANK_FILE,
    BILLER_PARTY_ID,
    DEFERRAL,
    BankOrder,
    Call,
    Forgery,
    HostileBiller,
    Instructed,
    hostile_biller,
    new_identity,
    payload_of,
    rotated_identity,
)
from agent.conformance.peers import KeySpec, PeerIdentity, build_key_set, reseal, resign
from agent.conformance.runner import Case, Level, NotRunnable, Skip, Suite, Violation
from agent.protocol.disclosures import check_disclosure
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, ProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.messages import header_of, new_header, seal
from agent.protocol.terms import (
    AdvertisedOptions,
    BillFacts,
    HardshipProgramme,
    Line,
    LineKind,
    Money,
    Terms,
    TermsKind,
    build_terms,
    within_options,
)
from parley.v1 import bill_pb2, envelope_pb2, event_pb2, negotiation_pb2, payment_pb2
from parley.v1 import biller_service_pb2 as pb

CLIENT_ENVIRONMENT = (
    "PARLEY_TARGET",
    "PARLEY_BILLER_PARTY_ID",
    "PARLEY_FINGERPRINT",
    "PARLEY_ACCOUNT_ID",
    "PARLEY_ENROLMENT_CODE",
    "PARLEY_STATE_DIR",
)
CANNOT_START = (126, 127)  # the shell's exit status for a command it could not execute, or found nowhere
LOG_TAIL_LINES = 4
SHELL = "/bin/sh"  # what asyncio.create_subprocess_shell runs CMD with, and so what judges its first word
# Calls a client makes only once it trusts its enrolment: after a refused one, it must make none (ENR-10).
ACCOUNT_CALLS = ("ListBills", "GetBill", "Negotiate", "GetThread", "CreatePaymentIntent", "GetReceipt", "WatchEvents")


# --- The client under test ----------------------------------------------------------------------------


@dataclass
class ConsumerContext:
    """The client under test: its command, where its scenarios live, and how long one run may take."""

    client_cmd: str
    work_dir: Path
    client_timeout: float
    unstartable: str = ""  # set once a run could not even start the command: every scenario then skips


def _precheck(case: Case[ConsumerContext], context: ConsumerContext) -> str | None:
    return context.unstartable or None


suite: Suite[ConsumerContext] = Suite("consumer", precheck=_precheck)


def check_command(client_cmd: str, path: str | None = None) -> None:
    """NotRunnable when the command is empty, or its first word is nothing the shell can run: neither a keyword,
    a builtin nor a program on PATH (`path`, default $PATH). The shell itself is asked (`command -v`), so that
    `exit 7` or `cd DIR && CMD` pass and no list of builtins here goes stale; shell syntax (a subshell, an
    assignment, an expansion) is let through for the shell to judge as it runs it (CANNOT_START then)."""
    lexer = shlex.shlex(client_cmd, posix=True, punctuation_chars=True)  # `a;b` is three words, as for sh
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError as error:
        raise NotRunnable(f"--client-cmd is not a shell command: {error}") from None
    if not words:
        raise NotRunnable("--client-cmd is empty")
    program = words[0]
    if "=" in program or any(c in client_cmd for c in "$`") or all(c in lexer.punctuation_chars for c in program):
        return  # an assignment, an expansion, or an operator such as `(`: the shell judges it as it runs
    environment = dict(os.environ) if path is None else {**os.environ, "PATH": path}
    found = subprocess.run(  # noqa: S603 - the word is an argument of a fixed script, never run itself
        [SHELL, "-c", 'command -v -- "$1" >/dev/null', "sh", program],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    if found.returncode != 0:
        raise NotRunnable(
            f"the client command cannot start: {SHELL} finds no command {program!r} "
            "(neither a shell builtin nor a program on PATH)"
        )


@asynccontextmanager
async def connect(client_cmd: str, *, timeout: float, work_dir: Path | None = None) -> AsyncIterator[ConsumerContext]:
    """The context the scenarios share; NotRunnable (exit 2) if the command cannot start at all.

    Each client run may take up to 40% of the case `timeout` (a scenario makes at
    most two). Scenario directories live under `work_dir` (default: a temporary
    directory, removed afterwards).
    """
    check_command(client_cmd)
    client_timeout = max(1.0, 0.4 * timeout)
    if work_dir is not None:
        try:  # the command line checked it (agent/tools/paths.py); a caller of the library may not have
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise NotRunnable(f"cannot make the work directory {work_dir}: {error.strerror or error}") from None
        yield ConsumerContext(client_cmd, work_dir, client_timeout)
        return
    with tempfile.TemporaryDirectory(prefix="parley-conformance-") as directory:
        yield ConsumerContext(client_cmd, Path(directory), client_timeout)


@dataclass(frozen=True)
class ClientRun:
    """One run of the client command."""

    number: int
    exit_code: int | None  # None: killed at the time limit
    duration: float
    log: Path  # its standard output and error

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines it printed, on one line."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(kept)[-400:]

    def describe(self) -> str:
        if self.exit_code is None:
            return f"run {self.number} killed after {self.duration:.1f} s"
        return f"run {self.number} exited {self.exit_code} after {self.duration:.1f} s"


class Scenario:
    """One scenario: its directory, its scripted biller, and the client runs made against it."""

    def __init__(self, context: ConsumerContext, directory: Path, biller: HostileBiller) -> None:
        self.context = context
        self.directory = directory
        self.state_dir = directory / "client-state"
        self.biller = biller
        self.runs: list[ClientRun] = []
        self.process: asyncio.subprocess.Process | None = None  # the client run under way

    def kill_client(self) -> None:
        """SIGKILL the client run under way, children included (a crash, for the scenarios that need one)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def environment(self) -> dict[str, str]:
        """The client's environment: ours without any PARLEY_* variable, plus the scenario's."""
        environment = {name: value for name, value in os.environ.items() if not name.startswith("PARLEY_")}
        environment.update(
            PARLEY_TARGET=self.biller.target,
            PARLEY_BILLER_PARTY_ID=self.biller.party_id,
            PARLEY_FINGERPRINT=self.biller.pinned_fingerprint.hex(),
            PARLEY_ACCOUNT_ID=self.biller.account_id,
            PARLEY_ENROLMENT_CODE=self.biller.enrolment_code,
            PARLEY_STATE_DIR=str(self.state_dir),
        )
        return environment

    async def run_client(self) -> ClientRun:
        """Run the command once, to its end or the time limit; then settle what it paid (the rail).

        Skip (and every later scenario skips) when the shell could not start it;
        Violation when it had to be killed.
        """
        number = len(self.runs) + 1
        self.biller.run = number
        log = self.directory / f"client-run-{number}.log"
        started = time.monotonic()
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_shell(
                self.context.client_cmd,
                env=self.environment(),
                cwd=self.directory,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group, so that a kill reaches its children
            )
            self.process = process
            try:
                exit_code: int | None = await asyncio.wait_for(process.wait(), self.context.client_timeout)
            except TimeoutError:
                exit_code = None
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(process.wait())
        run = ClientRun(number, exit_code, time.monotonic() - started, log)
        self.runs.append(run)
        self.biller.run = 0
        await self.biller.settle_orders()
        if exit_code in CANNOT_START and not self.biller.calls:
            reason = f"the client command could not start (exit {exit_code}): {run.tail()}"
            self.context.unstartable = self.context.unstartable or reason
            raise Skip(reason)
        if exit_code is None:
            raise Violation(
                f"the client did not exit within {self.context.client_timeout:g} s ({run.describe()}, killed): "
                f"a run of the client under test is one pass, then exit. So far it {self.summary()}"
            )
        return run

    # --- What the client did ---------------------------------------------------------------------------

    def enrolled(self) -> bool:
        return bool(self.biller.enrolled_party)

    def moves(self) -> list[tuple[Call, Any]]:
        """Every negotiation message the client sent, with its (unverified) payload."""
        return [(call, call.payload) for call in self.biller.calls_of("Negotiate") if call.payload is not None]

    def openings(self, bill_id: str) -> list[negotiation_pb2.ThreadOpen]:
        return [
            payload
            for _, payload in self.moves()
            if isinstance(payload, negotiation_pb2.ThreadOpen) and payload.bill_id == bill_id
        ]

    def intents(self, bill_id: str) -> list[payment_pb2.PaymentIntent]:
        return [
            call.payload
            for call in self.biller.calls_of("CreatePaymentIntent")
            if isinstance(call.payload, payment_pb2.PaymentIntent) and call.payload.bill_id == bill_id
        ]

    def orders(self, bill_id: str | None = None) -> list[BankOrder]:
        """The client's bank orders (those paying `bill_id`, when given)."""
        orders = self.biller.orders()
        return orders if bill_id is None else [order for order in orders if self.biller.bill_of(order) == bill_id]

    def bill_calls(self) -> list[Call]:
        """ListBills and GetBill calls the biller answered."""
        return [call for call in self.biller.calls_of("ListBills", "GetBill") if call.answered]

    def summary(self) -> str:
        """What the client did, in one sentence, for a detail."""
        biller = self.biller
        done = [f"enrolled as {biller.enrolled_party}" if self.enrolled() else "did not enrol"]
        fetched = len(self.bill_calls())
        if fetched:
            done.append(f"fetched its bills {fetched}×")
        opened = sorted({p.bill_id for _, p in self.moves() if isinstance(p, negotiation_pb2.ThreadOpen)})
        if opened:
            done.append(f"negotiated on {', '.join(opened)}")
        intents = [c.payload for c in biller.calls_of("CreatePaymentIntent") if c.payload is not None]
        if intents:
            bills = sorted({getattr(p, "bill_id", "?") for p in intents})
            done.append(f"sent payment intents for {', '.join(bills)}")
        orders = biller.orders()
        done.append(
            f"ordered {len(orders)} payment(s): {'; '.join(o.describe() for o in orders)}"
            if orders
            else "ordered no payment"
        )
        runs = ", ".join(run.describe() for run in self.runs)
        return "; ".join(done) + (f" ({runs})" if runs else "")


@asynccontextmanager
async def scenario(
    context: ConsumerContext,
    name: str,
    *,
    identity: PeerIdentity | None = None,
    pinned_fingerprint: bytes | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[Scenario]:
    """A fresh scenario directory and scripted biller (see `hostile_biller` for the arguments)."""
    directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=context.work_dir))
    state_dir = directory / "client-state"
    state_dir.mkdir()
    async with hostile_biller(
        directory / "biller",
        state_dir / BANK_FILE,
        identity=identity,
        pinned_fingerprint=pinned_fingerprint,
        clock=clock,
    ) as biller:
        yield Scenario(context, directory, biller)


def issue_bills_on_enrolment(biller: HostileBiller, count: int = 1) -> list[str]:
    """Have `count` bills issued as soon as the client enrols; the list fills with their ids then."""
    issued: list[str] = []

    async def issue() -> None:
        for index in range(count):
            issued.append(await biller.issue_bill(description=f"Electricity, conformance bill {index + 1}"))

    biller.on_enrolled.append(issue)
    return issued


def _now() -> datetime:
    return SystemClock().now()


def setup_failed(what: str, scenario: Scenario) -> Violation:
    """A scenario whose hostile input never reached the client: it proves nothing, and fails."""
    last = scenario.runs[-1] if scenario.runs else None
    output = f". Its last output: {last.tail()}" if last is not None and last.exit_code and last.tail() else ""
    return Violation(
        f"setup step failed: {what}, so the scenario could not be played. The client {scenario.summary()}{output}"
    )


BANK_DOWN_TARGET = "bank-unreachable"  # a directory that does not exist: the order book's link leads nowhere


def bank_unreachable(scenario: Scenario) -> Path:
    """From now on the client's bank cannot be reached: its order book is a link to a directory that does not
    exist, so nothing can be ordered (the client contract, "The client's bank"). Returns the link."""
    order_book = scenario.state_dir / BANK_FILE
    order_book.symlink_to(scenario.directory / BANK_DOWN_TARGET / BANK_FILE)
    return order_book


def _paid_once(scenario: Scenario, bill_id: str) -> BankOrder:
    """The one bank order paying `bill_id` under instructions the biller issued, for their amount (else Violation)."""
    biller = scenario.biller
    orders = scenario.orders(bill_id)
    if not orders:
        raise Violation(f"the client did not pay bill {bill_id}: it {scenario.summary()}")
    if len(orders) > 1:
        raise Violation(f"the client paid bill {bill_id} {len(orders)} times (PAY-7): it {scenario.summary()}")
    (order,) = orders
    instructed = biller.instructed.get(order.payment_reference)
    if instructed is None:
        raise Violation(f"the client ordered {order.describe()}: a reference the biller never instructed (PAY-8)")
    if order.amount != instructed.amount:
        raise Violation(
            f"the client ordered {order.describe()}, but the instructions under that reference are for "
            f"{instructed.amount}"
        )
    if order.payee_account and order.payee_account != instructed.payee_account:
        raise Violation(
            f"the client ordered {order.describe()} to account {order.payee_account!r}, but the instructions "
            f"name the payee account {instructed.payee_account!r} (BIL-3: payment details come only from them)"
        )
    return order


# --- 1. Baseline: an honest biller ----------------------------------------------------------------------


def _first_payment_after_today(terms: Terms | None, today: date) -> str | None:
    """When every payment the agreed `terms` set falls after `today` (UTC): what they set, in words; else None.

    "Due today" (docs/CONFORMANCE.md, the client contract): a payment is due in a run when its date — the
    bill's due date without agreement, else each date the agreement in force sets (a deferral's date, an
    instalment's, a pay-in-full's) — is today or earlier."""
    if terms is None or any(instalment.due_date <= today for instalment in terms.schedule):
        return None
    first = terms.schedule[0]
    if terms.kind is TermsKind.DEFERRAL:
        return f"a deferral to {first.due_date} ({terms.total})"
    if len(terms.schedule) == 1:
        return f"{terms.total} on {first.due_date}"
    return f"{len(terms.schedule)} payments of {terms.total} in all, the first on {first.due_date}"


@suite.case(
    "PAY-8/honest-biller-paid",
    description="Baseline: against an honest biller the client enrols, agrees and pays the bill once, as instructed",
    quote="A consumer MUST NOT pay under instructions that are not signed by a key of the biller's pinned key set "
    "chain … and it MUST carry `payment_reference` in the payment exactly as given.",
)
async def honest_biller(context: ConsumerContext) -> str:
    async with scenario(context, "honest-biller") as s:
        bills = issue_bills_on_enrolment(s.biller)
        await s.run_client()
        if not s.enrolled():
            raise Violation(
                "the client did not enrol with the code it was given "
                f"(PARLEY_ACCOUNT_ID, PARLEY_ENROLMENT_CODE): it {s.summary()}. Its output: {s.runs[-1].tail()}"
            )
        (bill_id,) = bills
        stray = [order for order in s.orders() if order.payment_reference not in s.biller.instructed]
        if stray:
            raise Violation(
                f"the client ordered {'; '.join(o.describe() for o in stray)}: a reference the biller never "
                f"instructed ({', '.join(o.problem for o in stray if o.problem) or 'PAY-8'}); it {s.summary()}"
            )
        agreed = await s.biller.agreement_on(bill_id)
        later = _first_payment_after_today(agreed, s.biller.today())
        if agreed is not None and later is not None and not s.orders(bill_id):
            # The client contract: a run pays what is due today. Agreed terms whose every payment falls
            # after today leave nothing to pay in this run (the client pays on the agreed date).
            return (
                f"the client enrolled and agreed {later}: nothing is due today, so it rightly paid nothing in "
                f"this run ({s.runs[-1].describe()})"
            )
        if not s.intents(bill_id):
            due = (
                "the bill, due today" if agreed is None else f"what its agreement sets on or before {s.biller.today()}"
            )
            raise Violation(f"the client sent no payment intent for its bill {bill_id} ({due}): it {s.summary()}")
        order = _paid_once(s, bill_id)
        receipts = [call for call in s.biller.calls_of("GetReceipt") if call.answered]
        negotiated = "agreed on it and " if s.openings(bill_id) else ""
        fetched = ", then fetched its receipt" if receipts else ""
        return f"the client enrolled, {negotiated}paid {order.describe()}{fetched} ({s.runs[-1].describe()})"


# --- 2. Bills that are not the pinned biller's ------------------------------------------------------------


def _bill_id_of(envelope: envelope_pb2.Envelope) -> str:
    payload = payload_of(envelope)
    return payload.bill_id if isinstance(payload, bill_pb2.Bill) else ""


def _no_dealings(scenario: Scenario, bill_id: str, what: str) -> None:
    """Violation if the client paid, sent an intent for, or negotiated on `bill_id` (`what` says what it is)."""
    if scenario.orders(bill_id):
        raise Violation(f"the client PAID {what} {bill_id}: it {scenario.summary()}")
    if scenario.intents(bill_id):
        raise Violation(f"the client sent a payment intent for {what} {bill_id}: it {scenario.summary()}")
    if scenario.openings(bill_id):
        raise Violation(f"the client negotiated on {what} {bill_id}: it {scenario.summary()}")


@suite.case(
    "BIL-3/forged-bill-signature",
    description="A bill whose signature is forged under the biller's keyid is never negotiated on nor paid",
    quote="A consumer MUST verify a bill — the receive path of §3.8 against the biller's pinned chain (as a stored "
    "answer), an account it enrolled (AUZ-6), and BIL-2 — before it shows the bill to its user, negotiates on it "
    "or pays it, and MUST NOT show or pay a bill that fails.",
    covers=("AUZ-6",),
)
async def forged_bill_signature(context: ConsumerContext) -> str:
    async with scenario(context, "forged-bill") as s:
        bills = issue_bills_on_enrolment(s.biller, 2)  # the first honest (a control), the second forged
        stranger = SigningKey.generate()
        s.biller.forgery = Forgery(
            stranger, keyid=s.biller.identity.key.keyid, only=lambda e: len(bills) > 1 and _bill_id_of(e) == bills[1]
        )
        await s.run_client()
        if not s.biller.forgery.delivered:
            raise setup_failed("the client never fetched its bills after enrolling (ListBills, GetBill)", s)
        honest, forged = bills
        _no_dealings(s, forged, "the forged bill")
        control = "paid" if s.orders(honest) else "did not pay"
        return (
            f"the forged bill {forged} (signed by a stranger's key under the biller's keyid) was delivered "
            f"{s.biller.forgery.delivered}× and never negotiated on nor paid; the client {control} the honest "
            f"bill {honest} ({s.runs[-1].describe()})"
        )


@suite.case(
    "KEY-12/unpinned-biller",
    description="A biller whose key set chain does not start at the pinned fingerprint is never trusted (ENR-10)",
    quote="A consumer MUST obtain the biller's fingerprint out of band (§6.1), pin it at enrolment, and verify every "
    "chain it receives for that biller against the pin (check 1 above), refusing a mismatch with `PIN_MISMATCH`",
    covers=("ENR-10", "VER-4", "TRN-4"),
)
async def unpinned_biller(context: ConsumerContext) -> str:
    genuine = new_identity(BILLER_PARTY_ID, _now())
    impostor = new_identity(BILLER_PARTY_ID, _now())
    async with scenario(context, "unpinned-biller", identity=impostor, pinned_fingerprint=genuine.fingerprint) as s:
        issue_bills_on_enrolment(s.biller)

        async def claim_the_pin(request: pb.HelloRequest, answer: pb.HelloResponse) -> pb.HelloResponse:
            lying = pb.HelloResponse()
            lying.CopyFrom(answer)
            lying.identity_fingerprint = genuine.fingerprint  # Hello is unsigned: an impostor can claim anything
            return lying

        s.biller.rewrite["Hello"] = claim_the_pin
        await s.run_client()
        if not s.biller.calls:
            raise setup_failed("the client never contacted the biller", s)
        trusted = s.biller.calls_of(*ACCOUNT_CALLS)
        if trusted:
            names = ", ".join(dict.fromkeys(call.rpc for call in trusted))
            raise Violation(
                "the biller's key set chain does not start at the pinned fingerprint, yet the client went on "
                f"as if enrolled ({names}): it {s.summary()}"
            )
        if s.orders():
            raise Violation(f"the client paid a biller whose chain does not match the pin: it {s.summary()}")
        seen = ", ".join(dict.fromkeys(call.rpc for call in s.biller.calls))
        answered = " (its enrolment answered with the impostor's chain)" if s.enrolled() else ""
        return f"the client made only these calls{answered}: {seen}; it paid nothing ({s.runs[-1].describe()})"


# --- 3. A key set rollback ----------------------------------------------------------------------------------


@suite.case(
    "KEY-8/keyset-rollback",
    description="After its chain rotated, a biller serving the older key set version again is not believed",
    quote="A receiver MUST refuse a version not above the one it holds (a rollback, including a second, different "
    "version `N`) with `KEYSET_ROLLBACK`",
    covers=("AUZ-6",),
)
async def keyset_rollback(context: ConsumerContext) -> str:
    identity = rotated_identity(BILLER_PARTY_ID, _now())
    retired = identity.retired
    assert retired is not None
    async with scenario(context, "keyset-rollback", identity=identity) as s:
        bills = issue_bills_on_enrolment(s.biller)

        async def roll_back(request: pb.GetKeySetsRequest, answer: pb.GetKeySetsResponse) -> pb.GetKeySetsResponse:
            return pb.GetKeySetsResponse(key_sets=identity.older)  # version 1 again, whatever was asked

        async def turn_hostile() -> None:
            # From the enrolment on (which gave the client versions 1 and 2), everything the biller signs is
            # signed by the key version 2 revoked, and its key sets are rolled back to version 1.
            s.biller.forgery = Forgery(retired)
            s.biller.rewrite["GetKeySets"] = roll_back

        s.biller.on_enrolled.append(turn_hostile)
        await s.run_client()
        if not s.enrolled():
            raise setup_failed("the client did not enrol", s)
        if not s.bill_calls():
            raise setup_failed("the client never fetched its bills after enrolling (ListBills, GetBill)", s)
        (bill_id,) = bills
        _no_dealings(s, bill_id, "the bill signed by the revoked key,")
        if s.orders():
            raise Violation(f"the client paid under messages signed by a revoked key: it {s.summary()}")
        enrolment = min(call.number for call in s.biller.calls_of("Enrol") if call.answered)
        refreshed = [call for call in s.biller.calls_of("GetKeySets") if call.answered and call.number > enrolment]
        served = (
            f"it fetched the biller's key sets {len(refreshed)}× and was served version 1 again"
            if refreshed
            else "it did not fetch the biller's key sets"
        )
        return (
            f"the bill {bill_id}, signed by the key version 2 dropped and revoked, was never negotiated on nor "
            f"paid; {served} ({s.runs[-1].describe()})"
        )


# --- 4. A duplicated event ------------------------------------------------------------------------------------


@suite.case(
    "EVT-5/duplicate-event",
    description="Every event delivered twice is processed once: the cursor never counts a copy, no bill is paid twice",
    quote="An event with a lower sequence than expected is a duplicate and is dropped",
    covers=("PAY-7",),
)
async def duplicate_event(context: ConsumerContext) -> str:
    async with scenario(context, "duplicate-event") as s:
        bills = issue_bills_on_enrolment(s.biller)
        s.biller.event_copies = 2
        await s.run_client()
        if s.enrolled():
            bills.append(await s.biller.issue_bill(description="Electricity, conformance bill 2"))
        await s.run_client()
        watches = s.biller.calls_of("WatchEvents")
        if not watches:
            raise Skip("the client never watched the account's events (WatchEvents): nothing to duplicate")
        if not s.biller.delivered_events:
            raise setup_failed("no event reached the client on its event streams", s)
        for call in watches:
            start = getattr(call.payload, "start_sequence", 0)
            if start > call.known_events:
                raise Violation(
                    f"the client resumed its events from sequence {start}, but only sequences 0 to "
                    f"{call.known_events - 1} had been delivered to it, each twice: it counted copies as events, "
                    f"so it would never see events {call.known_events} to {start - 1}"
                )
        for bill_id in bills:
            paid = s.orders(bill_id)
            if len(paid) > 1:
                raise Violation(f"the client paid bill {bill_id} {len(paid)} times: it {s.summary()}")
        starts = [getattr(call.payload, "start_sequence", 0) for call in watches]
        distinct = len(set(s.biller.delivered_events))
        paid_bills = sum(bool(s.orders(bill_id)) for bill_id in bills)
        return (
            f"{distinct} events delivered twice each over {len(watches)} streams, resumed from "
            f"{', '.join(map(str, starts))}; {paid_bills} of {len(bills)} bills paid, none twice "
            f"({', '.join(run.describe() for run in s.runs)})"
        )


# --- 5. A counter-offer to an offer inside the options -------------------------------------------------------


def _bill_facts(envelope: envelope_pb2.Envelope) -> BillFacts:
    return BillFacts.from_proto(bill_pb2.Bill.FromString(envelope.payload))


def counter_terms(bill: BillFacts) -> Terms:
    """The biller's counter: pay 14 days late for the deferral fee — tempting, and inside a sample mandate."""
    fee = Money.parse("5.00", bill.amount_due.currency.code)
    return build_terms(
        TermsKind.DEFERRAL,
        bill.amount_due,
        [bill.due_date + timedelta(days=14)],
        [Line(LineKind.FEE, "Deferral fee", fee)],
    )


def _thread_bill(biller: HostileBiller, thread_id: bytes) -> str:
    """The bill the client opened this thread on ("" if it opened none)."""
    for call in biller.calls_of("Negotiate"):
        payload = call.payload
        if isinstance(payload, negotiation_pb2.ThreadOpen) and payload.header.thread_id == thread_id:
            return payload.bill_id
    return ""


@dataclass
class _Counters:
    """The forged counter-offers sent, by thread id: (counter digest, the bill)."""

    sent: dict[bytes, tuple[bytes, str]] = field(default_factory=dict)
    answers: dict[bytes, pb.NegotiateResponse] = field(default_factory=dict)  # by the countered move's digest
    outside: list[str] = field(default_factory=list)  # bills on which the client's offer was outside the options


@suite.case(
    "NEG-12/counter-to-in-options-offer",
    description="A counter-offer to an offer inside the advertised options (OPTIONS_NOT_HONOURED) is never "
    "accepted nor paid",
    quote="When the pending offer is the consumer's and its terms are *within the bill's options*, the biller's next "
    "move MUST be an Accept of it; any other biller move (a counter-Offer, a Reject, a Withdraw) is a violation, "
    "`OPTIONS_NOT_HONOURED`. … A consumer that finds a violation in the biller's reply (for example "
    "`OPTIONS_NOT_HONOURED` on a counter-offer to an in-options offer) MUST record the thread as `PROTOCOL_ERROR`, "
    "keep the thread with the offending reply as evidence, and not act on the reply (in particular, not pay under it)",
    covers=("NEG-17",),
)
async def counter_to_in_options_offer(context: ConsumerContext) -> str:
    async with scenario(context, "options-not-honoured") as s:
        bills = issue_bills_on_enrolment(s.biller)
        counters = _Counters()
        biller = s.biller

        async def counter(request: pb.NegotiateRequest, answer: pb.NegotiateResponse) -> pb.NegotiateResponse:
            move = payload_of(request.move)
            if not isinstance(move, negotiation_pb2.ThreadOpen | negotiation_pb2.Offer):
                return answer
            if digest(request.move) in counters.answers:  # a retry of the move countered: the same counter
                return counters.answers[digest(request.move)]
            thread_id = move.header.thread_id
            bill_id = _thread_bill(biller, thread_id)
            if thread_id in counters.sent or bill_id not in bills:
                return answer  # countered once already, or not on a bill of the biller's
            bill = _bill_facts(await biller.bill_envelope(bill_id))
            try:
                offered = Terms.from_proto(move.terms)
            except LocalProtocolError:
                return answer  # the biller refused those terms anyway
            if not within_options(offered, bill, hardship_disclosed=False):
                counters.outside.append(bill_id)
                return answer
            header = new_header(
                sender=biller.party_id,
                recipient=move.header.sender,
                thread_id=thread_id,
                sequence=move.header.sequence + 1,
                previous_digest=digest(request.move),
                now=biller.agent.clock.now(),
                lifetime=timedelta(hours=1),
            )
            offer = seal(
                negotiation_pb2.Offer(header=header, terms=counter_terms(bill).to_proto()), biller.identity.key
            )
            counters.sent[thread_id] = (digest(offer), bill_id)
            forged = pb.NegotiateResponse(reply=offer, outcome=negotiation_pb2.NEGOTIATION_OUTCOME_OPEN)
            counters.answers[digest(request.move)] = forged
            return forged

        biller.rewrite["Negotiate"] = counter
        await s.run_client()
        if not s.moves():
            raise Skip("the client never negotiated (it may pay bills as issued): nothing to counter")
        if not counters.sent:
            if counters.outside:
                raise Skip("the client's opening was outside the bill's options, so the biller may counter it")
            raise setup_failed("no opening of the client reached the biller's answer", s)
        for _, payload in s.moves():
            thread_id = payload.header.thread_id
            if thread_id not in counters.sent or isinstance(payload, negotiation_pb2.ThreadOpen):
                continue
            counter_digest, bill_id = counters.sent[thread_id]
            if isinstance(payload, negotiation_pb2.Accept):
                named = "the counter-offer" if payload.offer_digest == counter_digest else "an offer"
                raise Violation(
                    f"the client ACCEPTED {named} on bill {bill_id} after the biller countered its in-options "
                    f"offer (OPTIONS_NOT_HONOURED): it {s.summary()}"
                )
            if isinstance(payload, negotiation_pb2.Offer):
                raise Violation(
                    f"the client negotiated on (a new Offer) after the biller countered its in-options offer on "
                    f"bill {bill_id}, instead of ending the thread PROTOCOL_ERROR: it {s.summary()}"
                )
        (bill_id,) = bills
        total = counter_terms(_bill_facts(await biller.bill_envelope(bill_id))).total
        under_counter = [order for order in s.orders(bill_id) if order.amount == total]
        if under_counter:
            raise Violation(f"the client paid the counter-offer's {total} on bill {bill_id}: it {s.summary()}")
        after = [
            type(payload).__name__
            for _, payload in s.moves()
            if payload.header.thread_id in counters.sent and not isinstance(payload, negotiation_pb2.ThreadOpen)
        ]
        moved = f"then sent only {', '.join(after)} on the thread" if after else "then made no move on the thread"
        return (
            f"the client's in-options offer on {bill_id} was countered with {total} in 14 days; it {moved}, "
            f"and paid nothing under the counter ({s.runs[-1].describe()})"
        )


# --- 6. Instructions for another amount ----------------------------------------------------------------------

EXTRA = Money.parse("80.00", "EUR")  # what the doctored instructions add to the intent's amount
SHORTFALL = Money.parse("20.00", "EUR")  # what the doctored receipt says is missing


@suite.case(
    "PAY-8/instructions-amount",
    description="Signed instructions asking for another amount than the intent's are never paid",
    quote="A consumer MUST NOT pay under instructions that are not signed by a key of the biller's pinned key set "
    "chain or fail any check of §3 and §5, that do not chain to its own intent (`intent_id`, thread, sequence 1, "
    "`previous_digest`), whose `amount` differs from its intent's `amount`, or whose `pay_by_time` has passed",
)
async def instructions_amount(context: ConsumerContext) -> str:
    async with scenario(context, "instructions-amount") as s:
        issue_bills_on_enrolment(s.biller)
        key = s.biller.identity.key

        async def ask_more(
            request: pb.CreatePaymentIntentRequest, answer: pb.CreatePaymentIntentResponse
        ) -> pb.CreatePaymentIntentResponse:
            def more(instructions: payment_pb2.PaymentInstructions) -> None:
                amount = Money.from_proto(instructions.amount)
                instructions.amount.CopyFrom((amount + Money(amount.currency, EXTRA.minor)).to_proto())

            return pb.CreatePaymentIntentResponse(instructions=reseal(answer.instructions, key, more))

        s.biller.rewrite["CreatePaymentIntent"] = ask_more
        await s.run_client()
        intents = [call for call in s.biller.calls_of("CreatePaymentIntent") if call.answered]
        if not intents:
            raise setup_failed("the client never sent a payment intent the biller answered", s)
        if s.orders():
            raise Violation(
                f"the client paid under instructions for more than its intent's amount (each asked "
                f"{EXTRA} more): it {s.summary()}"
            )
        asked = [Money.from_proto(getattr(call.payload, "amount")) for call in intents]  # noqa: B009
        return (
            f"instructions asking {EXTRA} more than the intent ({', '.join(map(str, asked))}) were answered "
            f"{len(intents)}×; the client paid nothing ({s.runs[-1].describe()})"
        )


# --- 7. A receipt for the wrong amount -------------------------------------------------------------------------


@suite.case(
    "PAY-9/receipt-wrong-amount",
    description="A receipt for less than the instructed amount is a dispute: the client pays nothing more on the bill",
    quote="A consumer MUST verify a receipt like any biller message and chain it to the instructions; a receipt whose "
    "`amount_received` differs from the instructed amount, or no receipt long after a settled transfer, is a dispute",
    covers=("EVT-8",),
)
async def receipt_wrong_amount(context: ConsumerContext) -> str:
    async with scenario(context, "receipt-wrong-amount") as s:
        bills = issue_bills_on_enrolment(s.biller)
        key = s.biller.identity.key
        claims: list[str] = []

        async def claim_less(request: pb.GetReceiptRequest, answer: pb.GetReceiptResponse) -> pb.GetReceiptResponse:
            def less(receipt: payment_pb2.Receipt) -> None:
                received = Money.from_proto(receipt.amount_received)
                short = Money(received.currency, SHORTFALL.minor)
                receipt.amount_received.CopyFrom((received - short).to_proto())
                receipt.remaining_balance.CopyFrom(short.to_proto())
                claims.append(f"{received - short} received of {received}")

            return pb.GetReceiptResponse(receipt=reseal(answer.receipt, key, less))

        s.biller.rewrite["GetReceipt"] = claim_less
        await s.run_client()
        (bill_id,) = bills
        if not s.orders(bill_id):
            raise setup_failed(f"the client did not pay its bill {bill_id}", s)
        if claims:  # the client took the receipt: the biller follows up on the "shortfall"
            today = s.biller.agent.clock.now().date()
            await s.biller.agent.emit_event(
                s.biller.account_id,
                event_pb2.EVENT_KIND_REMINDER,
                bill_id=bill_id,
                amount=Money(AMOUNT_DUE.currency, SHORTFALL.minor),
                day=today,
                reminder_level=1,
                message=f"{SHORTFALL} is still owed on bill {bill_id}.",
            )
        await s.run_client()
        receipts = [call for call in s.biller.calls_of("GetReceipt") if call.answered]
        if not receipts:
            raise Skip("the client never fetched the receipt of its payment (GetReceipt): nothing to dispute")
        first = receipts[0].number
        intents = [call for call in s.biller.calls_of("CreatePaymentIntent") if isinstance(call.payload, Message)]
        before = {getattr(call.payload, "intent_id", "") for call in intents if call.number < first}
        later = [
            call
            for call in intents
            if call.number > first
            and getattr(call.payload, "bill_id", "") == bill_id
            and getattr(call.payload, "intent_id", "") not in before
        ]
        if later:
            raise Violation(
                f"after a receipt claiming {claims[0]}, the client sent a new payment intent for bill {bill_id}: "
                f"it took the disputed receipt for the biller's account of the bill: it {s.summary()}"
            )
        orders = s.orders(bill_id)
        if len(orders) > 1:
            raise Violation(
                f"after a receipt claiming {claims[0]}, the client paid bill {bill_id} again "
                f"({len(orders)} payments): it {s.summary()}"
            )
        return (
            f"the receipt claimed {claims[0]} (and a reminder for the {SHORTFALL} followed); the client kept to its "
            f"one payment ({', '.join(run.describe() for run in s.runs)})"
        )


# --- 7a. Lost answers and refused calls: retries (TRN-6, PAY-10, ERR-6) ----------------------------------------


def _sent_bytes(call: Call) -> bytes:
    """The signed envelope a call carried, as bytes (b"" for none)."""
    envelope = call.envelope
    return envelope.SerializeToString() if envelope is not None else b""


def _second_move(lost: Call, later: list[Call]) -> Call | None:
    """The first of `later` Negotiate calls that is a second, different message meant to have the effect of the
    `lost` move while it may still take effect: another envelope at its thread and sequence, or — the lost move an
    opening — another opening on its bill sent before the client read the thread back (GetThread) or resent it."""
    lost_bytes, move = _sent_bytes(lost), lost.payload
    lost_header = getattr(move, "header", None)
    place = None if lost_header is None else (lost_header.thread_id, lost_header.sequence)
    for call in later:
        payload = call.payload
        if call.rpc == "GetThread":
            if place is not None and getattr(payload, "thread_id", b"") == place[0]:
                return None  # it read the thread back: it knows the move took effect
            continue
        if _sent_bytes(call) == lost_bytes:
            return None  # the very same envelope again: from then on the client knows the answer
        header = getattr(payload, "header", None)
        if header is not None and (header.thread_id, header.sequence) == place:
            return call
        reopened = isinstance(payload, negotiation_pb2.ThreadOpen) and isinstance(move, negotiation_pb2.ThreadOpen)
        if reopened and getattr(payload, "bill_id", "") == getattr(move, "bill_id", ""):
            return call
    return None


@suite.case(
    "TRN-6/negotiate-answer-lost",
    description="When the answer to its move is lost (UNAVAILABLE), the client never signs a second, different move "
    "in its place",
    quote="When a client does not know whether a request took effect (a timeout, `UNAVAILABLE`, `INTERNAL` or a lost "
    "connection), it SHOULD retry with the very same envelope bytes. … A client MUST NOT sign a second, different "
    "message meant to have the same effect while the first may still take effect",
)
async def negotiate_answer_lost(context: ConsumerContext) -> str:
    async with scenario(context, "negotiate-answer-lost") as s:
        issue_bills_on_enrolment(s.biller)
        s.biller.lose_answers("Negotiate")  # the biller applies the first move; its answer never arrives
        await s.run_client()
        await s.run_client()  # a client that kept the unanswered move sends it again now; others may sign anew
        moves = [call for call in s.biller.calls_of("Negotiate") if call.payload is not None]
        if not moves:
            raise Skip("the client never negotiated (it may pay bills as issued): no answer to lose")
        lost = moves[0]
        later = [call for call in s.biller.calls_of("Negotiate", "GetThread") if call.number > lost.number]
        second = _second_move(lost, later)
        if second is not None:
            what = type(lost.payload).__name__
            raise Violation(
                f"the answer to its {what} was lost (UNAVAILABLE, the move applied), and the client signed "
                f"another {type(second.payload).__name__} in its place instead of resending the same envelope: "
                f"it {s.summary()}"
            )
        resent = sum(_sent_bytes(call) == _sent_bytes(lost) for call in moves[1:])
        reread = [call for call in s.biller.calls_of("GetThread") if call.number > lost.number]
        how = (
            f"resent the very same envelope {resent}×"
            if resent
            else "read the thread back (GetThread)"
            if reread
            else "did not retry (TRN-6: it SHOULD)"
        )
        runs = ", ".join(run.describe() for run in s.runs)
        return f"the answer to its {type(lost.payload).__name__} was lost; the client {how} ({runs})"


def _intent_id_of(call: Call) -> str:
    return getattr(call.payload, "intent_id", "")


def _doctor_retried_intents(s: Scenario, change: Any) -> list[str]:
    """The answer to the client's first intent is lost (the biller instructs it, the instructions never arrive);
    every retry of an intent is answered with its stored instructions re-signed by the biller after `change`.
    The list fills with the intent ids so answered."""
    key = s.biller.identity.key
    doctored: list[str] = []

    async def retried(
        request: pb.CreatePaymentIntentRequest, answer: pb.CreatePaymentIntentResponse
    ) -> pb.CreatePaymentIntentResponse:
        intent_id = getattr(payload_of(request.intent), "intent_id", "")
        sent = [call for call in s.biller.calls_of("CreatePaymentIntent") if _intent_id_of(call) == intent_id]
        if len(sent) < 2:
            return answer  # not a retry
        doctored.append(intent_id)
        return pb.CreatePaymentIntentResponse(instructions=reseal(answer.instructions, key, change))

    s.biller.lose_answers("CreatePaymentIntent")
    s.biller.rewrite["CreatePaymentIntent"] = retried
    return doctored


PAY_10_QUOTE = (
    "Instructions returned for a retry and receipts fetched after their creation are stored answers (§1.6): a "
    "consumer MUST verify them with the full receive path except the `MESSAGE_EXPIRED` check of HDR-5 (their "
    "`expire_time` may have passed while they waited in the biller's store), judging key validity at their "
    "`create_time` as always; it still refuses `MESSAGE_NOT_YET_VALID`."
)
STORED_AGE = timedelta(hours=2)  # how long ago the stored instructions of a retry were signed (expired an hour ago)


def _signed_long_ago(instructions: payment_pb2.PaymentInstructions) -> None:
    created = instructions.header.create_time.ToDatetime(tzinfo=UTC) - STORED_AGE
    instructions.header.create_time.FromDatetime(created)
    instructions.header.expire_time.FromDatetime(created + timedelta(hours=1))


@suite.case(
    "PAY-10/retried-intent-instructions-from-the-future",
    description="Instructions answered to a retried intent but created 30 minutes ahead of the client's clock are "
    "never paid",
    quote=PAY_10_QUOTE,
    covers=("HDR-5",),
)
async def retried_intent_instructions_from_the_future(context: ConsumerContext) -> str:
    async with scenario(context, "retried-intent-future") as s:
        issue_bills_on_enrolment(s.biller)
        doctored = _doctor_retried_intents(s, _from_the_future)
        await s.run_client()
        if not s.biller.calls_of("CreatePaymentIntent"):
            raise setup_failed("the client never sent a payment intent", s)
        if not doctored:
            raise setup_failed("the client never retried its intent after the answer was lost", s)
        if s.orders():
            raise Violation(
                f"the client paid under the instructions answered to its retried intent, created {FUTURE} ahead of "
                f"its clock (MESSAGE_NOT_YET_VALID): it {s.summary()}"
            )
        return (
            f"the retried intent was answered {len(doctored)}× with its stored instructions created {FUTURE} ahead; "
            f"nothing paid ({s.runs[-1].describe()})"
        )


@suite.case(
    "PAY-10/retried-intent-instructions-expired",
    description="Honest instructions answered to a retried intent, expired while stored (signed 2 hours ago for an "
    "hour), are paid",
    quote=PAY_10_QUOTE,
)
async def retried_intent_instructions_expired(context: ConsumerContext) -> str:
    async with scenario(context, "retried-intent-expired") as s:
        bills = issue_bills_on_enrolment(s.biller)
        doctored = _doctor_retried_intents(s, _signed_long_ago)
        await s.run_client()
        if not s.biller.calls_of("CreatePaymentIntent"):
            raise setup_failed("the client never sent a payment intent", s)
        if not doctored:
            raise setup_failed("the client never retried its intent after the answer was lost", s)
        (bill_id,) = bills
        if not s.orders(bill_id):
            raise Violation(
                f"the client did not pay under the honest instructions answered to its retried intent, signed "
                f"{STORED_AGE} ago for an hour: a stored answer is judged without MESSAGE_EXPIRED (PAY-10); it "
                f"{s.summary()}"
            )
        order = _paid_once(s, bill_id)
        return f"the stored instructions, expired an hour ago, were paid: {order.describe()} ({s.runs[-1].describe()})"


@suite.case(
    "ERR-6/invalid-argument-not-resent",
    level=Level.SHOULD,
    description="A payment intent refused with INVALID_ARGUMENT (MALFORMED_PAYLOAD) is not sent again as it was",
    quote="A client SHOULD react to errors by class: `INVALID_ARGUMENT`, `UNAUTHENTICATED`, `PERMISSION_DENIED`, "
    "`NOT_FOUND` and `FAILED_PRECONDITION` — do not resend the same message",
)
async def invalid_argument_not_resent(context: ConsumerContext) -> str:
    async with scenario(context, "invalid-argument") as s:
        issue_bills_on_enrolment(s.biller)
        s.biller.refuse("CreatePaymentIntent", ProtocolError(Reason.MALFORMED_PAYLOAD, "the intent is refused"))
        await s.run_client()
        await s.run_client()
        intents = [call for call in s.biller.calls_of("CreatePaymentIntent") if call.envelope is not None]
        if not intents:
            raise setup_failed("the client never sent a payment intent", s)
        refused = _sent_bytes(intents[0])
        resent = [call for call in intents[1:] if _sent_bytes(call) == refused]
        if resent:
            runs = ", ".join(f"run {call.run}" for call in resent)
            raise Violation(
                f"the client resent its payment intent refused with INVALID_ARGUMENT (MALFORMED_PAYLOAD), byte for "
                f"byte, {len(resent)}× ({runs}): it {s.summary()}"
            )
        others = len(intents) - 1
        return (
            f"the intent refused INVALID_ARGUMENT was never resent as it was; {others} other intent message(s) "
            f"followed ({', '.join(run.describe() for run in s.runs)})"
        )


# --- 7b. Negotiation close to the deadline; disclosures (NEG-21, PRV-1, PRV-2, PRV-8) ------------------------

SHORT_WINDOW = timedelta(seconds=1)  # the negotiation time Hello announces beyond the skew: moves are late at once
LARGE_BILL = Money.parse("108000.00", "EUR")  # above what the sample household can pay within the options


@suite.case(
    "NEG-21/counter-close-to-the-deadline",
    level=Level.SHOULD,
    description="A counter-offer reaching the client less than max_clock_skew before the thread's deadline is "
    "not answered",
    quote="A consumer SHOULD NOT send a move later than `max_clock_skew` (§14) before the thread's deadline.",
)
async def counter_close_to_the_deadline(context: ConsumerContext) -> str:
    async with scenario(context, "counter-close-to-the-deadline") as s:
        biller = s.biller
        skew = biller.agent.limits.max_clock_skew
        window = skew + SHORT_WINDOW

        async def issue() -> None:
            await biller.issue_bill(LARGE_BILL, description="Electricity and heating, conformance bill (large)")

        biller.on_enrolled.append(issue)

        async def short_window(request: pb.HelloRequest, answer: pb.HelloResponse) -> pb.HelloResponse:
            shorter = pb.HelloResponse()
            shorter.CopyFrom(answer)
            shorter.limits.max_negotiation_seconds = int(window.total_seconds())
            return shorter

        late: dict[bytes, int] = {}  # thread id -> the number of the call whose counter came late
        far: list[datetime] = []  # deadlines set beyond the negotiation time Hello announced

        async def counter_late(request: pb.NegotiateRequest, answer: pb.NegotiateResponse) -> pb.NegotiateResponse:
            move = payload_of(request.move)
            reply = payload_of(answer.reply) if answer.HasField("reply") else None
            if not isinstance(move, negotiation_pb2.ThreadOpen) or not isinstance(reply, negotiation_pb2.Offer):
                return answer
            # Held until less than max_clock_skew is left before the deadline (by the biller's clock).
            deadline = move.deadline.ToDatetime(tzinfo=UTC)
            hold = (deadline - skew + timedelta(seconds=0.5) - _now()).total_seconds()
            if hold > SHORT_WINDOW.total_seconds() + 1:
                far.append(deadline)  # not the deadline Hello allowed: too far to bring close in a run
                return answer
            await asyncio.sleep(max(0.0, hold))
            late[move.header.thread_id] = biller.calls_of("Negotiate")[-1].number
            return answer

        biller.rewrite["Hello"] = short_window
        biller.rewrite["Negotiate"] = counter_late
        await s.run_client()
        if not s.moves():
            raise Skip("the client never negotiated (it may pay bills as issued): no counter to answer")
        if not late and far:
            raise Skip(
                f"the client's opening set its deadline at {far[0]}, beyond the {window} of negotiation Hello "
                "announced (LIM-13): a deadline that far cannot be brought close within a run"
            )
        if not late:
            raise Skip("the client's opening was inside the bill's options, so the biller had nothing to counter")
        after = [
            (call, payload)
            for call, payload in s.moves()
            if payload.header.thread_id in late and call.number > late[payload.header.thread_id]
        ]
        if after:
            names = ", ".join(type(payload).__name__ for _, payload in after)
            raise Violation(
                f"the biller's counter reached the client less than {skew} before the thread's deadline, and the "
                f"client still answered it ({names}): its move may reach the biller after the deadline; it "
                f"{s.summary()}"
            )
        return (
            f"the counter came less than {skew} before the deadline ({window} after the opening); the client sent "
            f"no move after it ({s.runs[-1].describe()})"
        )


HARDSHIP_OPTIONS = AdvertisedOptions(
    deferral=DEFERRAL,
    hardship_programmes=(
        HardshipProgramme(
            programme_id="conformance-hardship",
            description="Pay in up to 6 monthly instalments, fees waived, for households in hardship",
            fees_waived=True,
            max_deferral_days=60,
            max_instalments=6,
            min_instalment_amount=None,
            max_interval_days=31,
            max_first_delay_days=31,
            requires_disclosure=True,
        ),
    ),
)  # the bill of the disclosure scenarios: a programme that binds the biller only beside a hardship disclosure


async def _run_beside_a_hardship_programme(s: Scenario) -> None:
    """The run both disclosure cases judge: the client once, on a large bill with a hardship programme issued as it
    enrols. A client that did not enrol fails the set-up; one that never negotiated has no opening to disclose
    beside."""
    biller = s.biller

    async def issue() -> None:
        description = "Electricity and heating, conformance bill (hardship programme)"
        await biller.issue_bill(LARGE_BILL, description=description, options=HARDSHIP_OPTIONS)

    biller.on_enrolled.append(issue)
    await s.run_client()
    if not s.enrolled():
        raise setup_failed("the client did not enrol", s)
    if not s.moves():
        raise Skip("the client never negotiated (it may pay bills as issued): no opening to disclose beside")


def _disclosures(s: Scenario) -> list[tuple[Call, Any, negotiation_pb2.Disclosure | None]]:
    """Every Negotiate call of the client with its move and the disclosure beside it, checked as a receiver
    checks it (PRV-3: None for no disclosure); Violation for one that is not the Disclosure its opening commits to."""
    checked = []
    for call in s.biller.calls_of("Negotiate"):
        move = call.payload
        if move is None:
            continue
        sent = getattr(call.request, "disclosure", b"")
        committed = move.disclosure_digest if isinstance(move, negotiation_pb2.ThreadOpen) else b""
        try:
            opened_on = header_of(move).create_time.ToDatetime().date()
            checked.append((call, move, check_disclosure(committed, sent, opened_on)))
        except RemoteProtocolError as error:
            raise Violation(
                f"the client sent its {type(move).__name__} with a disclosure that breaks PRV-1/PRV-2: "
                f"{error.detail}; it {s.summary()}"
            ) from None
    return checked


@suite.case(
    "PRV-2/disclosure-as-committed",
    description="Whatever the client discloses is a salted Disclosure beside an opening committing to exactly its "
    "bytes, for a stated purpose",
    quote="A disclosure MUST be sent as the serialized bytes of a `Disclosure` message — a fresh random 16-byte "
    "`salt` and the `Circumstances` — in `NegotiateRequest.disclosure`, in the same request as the `ThreadOpen` whose "
    "`disclosure_digest` is the SHA-256 of exactly those bytes",
    covers=("PRV-1",),
)
async def disclosure_as_committed(context: ConsumerContext) -> str:
    async with scenario(context, "disclosure-as-committed") as s:
        await _run_beside_a_hardship_programme(s)
        disclosed = [parsed for _, _, parsed in _disclosures(s) if parsed is not None]
        if not disclosed:
            return f"the client negotiated and disclosed nothing, which PRV-1 allows ({s.runs[-1].describe()})"
        return f"{len(disclosed)} disclosure(s), each the salted Disclosure its opening commits to"


@suite.case(
    "PRV-8/disclosure-minimal",
    level=Level.SHOULD,
    description="A disclosure carries one circumstance for its purpose (hardship, or a pay date), not several nor a "
    "note besides",
    quote="A consumer SHOULD disclose no more than the purpose needs (for example `hardship` = true alone to claim a "
    "programme, or a `next_pay_date` alone to support a deferral past pay day)",
)
async def disclosure_minimal(context: ConsumerContext) -> str:
    async with scenario(context, "disclosure-minimal") as s:
        await _run_beside_a_hardship_programme(s)
        try:
            checked = _disclosures(s)
        except Violation as error:
            raise Skip(f"its disclosures break PRV-2, judged by PRV-2/disclosure-as-committed ({error})") from None
        disclosed = [parsed for _, _, parsed in checked if parsed is not None]
        for parsed in disclosed:
            circumstances = parsed.circumstances
            told = [
                name
                for name, given in (
                    ("hardship", circumstances.hardship),
                    ("next_pay_date", bool(circumstances.next_pay_date)),
                    ("a note", bool(circumstances.note)),
                )
                if given
            ]
            if len(told) > 1:
                raise Violation(
                    f"the client disclosed {', '.join(told)} together: more than one purpose needs; it {s.summary()}"
                )
        if not disclosed:
            return f"the client negotiated and disclosed nothing ({s.runs[-1].describe()})"
        return f"{len(disclosed)} disclosure(s), each of one circumstance ({s.runs[-1].describe()})"


# --- 8. Instructions that are not the biller's answer to this intent ---------------------------------------

PAY_8_QUOTE = (
    "A consumer MUST NOT pay under instructions that are not signed by a key of the biller's pinned key set chain or "
    "fail any check of §3 and §5, that do not chain to its own intent (`intent_id`, thread, sequence 1, "
    "`previous_digest`), whose `amount` differs from its intent's `amount`, or whose `pay_by_time` has passed"
)


def _reseal_instructions(biller: HostileBiller, change: Any) -> None:
    """Every PaymentInstructions answer re-signed by the biller's own key after `change(instructions)`."""
    key = biller.identity.key

    async def doctored(
        request: pb.CreatePaymentIntentRequest, answer: pb.CreatePaymentIntentResponse
    ) -> pb.CreatePaymentIntentResponse:
        return pb.CreatePaymentIntentResponse(instructions=reseal(answer.instructions, key, change))

    biller.rewrite["CreatePaymentIntent"] = doctored


def _forge_instructions(biller: HostileBiller) -> None:
    """Instructions signed by a stranger's key under the biller's keyid."""
    biller.forgery = Forgery(
        SigningKey.generate(),
        keyid=biller.identity.key.keyid,
        only=lambda envelope: envelope.payload_type == "parley.v1.PaymentInstructions",
    )


def _unchained(instructions: payment_pb2.PaymentInstructions) -> None:
    instructions.header.previous_digest = os.urandom(32)


def _other_thread(instructions: payment_pb2.PaymentInstructions) -> None:
    instructions.header.thread_id = os.urandom(16)


def _wrong_sequence(instructions: payment_pb2.PaymentInstructions) -> None:
    instructions.header.sequence = 2


def _other_intent(instructions: payment_pb2.PaymentInstructions) -> None:
    instructions.intent_id = f"{instructions.intent_id}-other"


def _pay_by_passed(instructions: payment_pb2.PaymentInstructions) -> None:
    instructions.pay_by_time.FromDatetime(_now() - timedelta(hours=1))


_DOCTORED_INSTRUCTIONS: tuple[tuple[str, str, Any], ...] = (
    ("PAY-8/instructions-forged-signature", "signed by a stranger's key under the biller's keyid", _forge_instructions),
    ("PAY-8/instructions-unchained", "whose previous_digest is not the intent's digest", _unchained),
    ("PAY-8/instructions-wrong-sequence", "at sequence 2 of the intent's thread instead of 1", _wrong_sequence),
    ("PAY-8/instructions-other-thread", "on another thread than the intent's", _other_thread),
    ("PAY-8/instructions-other-intent", "naming another intent_id than the intent's", _other_intent),
    ("PAY-8/instructions-pay-by-passed", "whose pay_by_time passed an hour ago", _pay_by_passed),
)


def _doctored_instructions_case(case_id: str, what: str, install: Any) -> None:
    """A scenario: every intent is answered with instructions `what`; the client must order no payment."""

    @suite.case(
        case_id,
        description=f"Instructions {what} are never paid",
        quote=PAY_8_QUOTE,
        covers=("AUZ-6",),
    )
    async def body(context: ConsumerContext) -> str:
        async with scenario(context, case_id.split("/", 1)[1]) as s:
            issue_bills_on_enrolment(s.biller)
            if install is _forge_instructions:
                _forge_instructions(s.biller)
            else:
                _reseal_instructions(s.biller, install)
            await s.run_client()
            intents = [call for call in s.biller.calls_of("CreatePaymentIntent") if call.answered]
            if not intents:
                raise setup_failed("the client never sent a payment intent the biller answered", s)
            if s.orders():
                raise Violation(f"the client paid under instructions {what}: it {s.summary()}")
            return f"instructions {what} answered {len(intents)} intent(s); nothing paid ({s.runs[-1].describe()})"


for _case_id, _what, _install in _DOCTORED_INSTRUCTIONS:
    _doctored_instructions_case(_case_id, _what, _install)


# --- 9. A bill for an account the client never enrolled ---------------------------------------------------


@suite.case(
    "AUZ-6/bill-for-another-account",
    description="A bill honestly signed by the biller but for an account the client never enrolled is never paid",
    quote="A consumer MUST NOT act on a biller message that is not signed by the biller's pinned chain and addressed "
    "to it, nor on a bill, event, instruction or receipt for an account it has not enrolled.",
    covers=("BIL-3",),
)
async def bill_for_another_account(context: ConsumerContext) -> str:
    async with scenario(context, "bill-for-another-account") as s:
        bills = issue_bills_on_enrolment(s.biller)
        key = s.biller.identity.key
        stranger_bills: list[str] = []

        def elsewhere(bill: bill_pb2.Bill) -> None:
            bill.account_id = f"{bill.account_id}-never-enrolled"
            bill.bill_id = f"{bill.bill_id}-elsewhere"
            bill.header.message_id = os.urandom(16)
            bill.header.thread_id = os.urandom(16)
            stranger_bills[:] = [bill.bill_id]

        async def with_a_stranger(request: pb.ListBillsRequest, answer: pb.ListBillsResponse) -> pb.ListBillsResponse:
            if not answer.bills:
                return answer
            extra = reseal(answer.bills[0], key, elsewhere)
            return pb.ListBillsResponse(bills=[*answer.bills, extra])

        s.biller.rewrite["ListBills"] = with_a_stranger
        await s.run_client()
        if not stranger_bills:
            raise setup_failed("the client never listed its bills after enrolling (ListBills)", s)
        (stranger,) = stranger_bills
        _no_dealings(s, stranger, "the bill for an account it never enrolled,")
        control = "paid" if s.orders(bills[0]) else "did not pay"
        return f"the bill {stranger} for another account was never acted on; the client {control} its own bill"


# --- 10. Keys revoked in the newest version; a bill judged as stored ------------------------------------------


class LaggingClock:
    """The system clock, `lag` behind while a scenario issues a bill in the past (then 0 again)."""

    def __init__(self) -> None:
        self.lag = timedelta(0)

    def now(self) -> datetime:
        return _now() - self.lag


def revoked_identity(party_id: str, now: datetime) -> PeerIdentity:
    """Version 1 (two days ago) lists K1 and K2; version 2 (an hour ago), signed by K2, still lists both but
    revokes K1 as of a day ago. A message K1 signed twelve hours ago falls under version 1 — which lists K1 —
    and only the newest version's revocation refuses it (KEY-11)."""
    old, current = SigningKey.generate(), SigningKey.generate()
    start, rotation, revoked = now - timedelta(days=2), now - timedelta(hours=1), now - timedelta(days=1)
    validity = timedelta(days=365)
    keys = [KeySpec(old.public_key, start, start + validity), KeySpec(current.public_key, start, start + validity)]
    version_1 = build_key_set(
        party_id=party_id, version=1, keys=keys, signer=current, create_time=start, expire_time=start + validity,
        previous=None,
    )  # fmt: skip
    version_2 = build_key_set(
        party_id=party_id, version=2, keys=keys, signer=current, create_time=rotation,
        expire_time=rotation + validity, previous=version_1, revocations={old.keyid: revoked},
    )  # fmt: skip
    return PeerIdentity(current.seed, (version_1.SerializeToString(), version_2.SerializeToString()), old.seed)


def _issue_in_the_past(biller: HostileBiller, clock: LaggingClock, lag: timedelta, count: int) -> list[str]:
    """Have `count` bills issued on enrolment, signed `lag` ago (create_time and issue date in the past)."""
    issued: list[str] = []

    async def issue() -> None:
        clock.lag = lag
        try:
            for index in range(count):
                issued.append(await biller.issue_bill(description=f"Electricity, conformance bill {index + 1}"))
        finally:
            clock.lag = timedelta(0)

    biller.on_enrolled.append(issue)
    return issued


@suite.case(
    "KEY-11/bill-signed-by-revoked-key",
    description="A bill signed by a key the newest key set version revokes, after its revoke_time, is never paid",
    quote="A key is **revoked** from its `revoke_time`: a message (key sets included) created at or after "
    "`revoke_time` and signed by that key MUST be refused with `KEY_REVOKED`",
    covers=("AUZ-6", "BIL-3"),
)
async def bill_signed_by_revoked_key(context: ConsumerContext) -> str:
    clock = LaggingClock()
    identity = revoked_identity(BILLER_PARTY_ID, _now())
    retired = identity.retired
    assert retired is not None
    async with scenario(context, "revoked-key", identity=identity, clock=clock) as s:
        bills = _issue_in_the_past(s.biller, clock, timedelta(hours=12), 2)  # the first honest, the second forged
        s.biller.forgery = Forgery(retired, only=lambda e: len(bills) > 1 and _bill_id_of(e) == bills[1])
        await s.run_client()
        if not s.biller.forgery.delivered:
            raise setup_failed("the client never fetched its bills after enrolling (ListBills, GetBill)", s)
        honest, revoked = bills
        _no_dealings(s, revoked, "the bill signed by a revoked key,")
        control = "paid" if s.orders(honest) else "did not pay"
        return f"the bill {revoked} signed by K1 after its revocation was never acted on; the client {control} {honest}"


@suite.case(
    "BIL-3/old-bill-stored",
    description="An honest bill signed 36 hours ago (its lifetime over) is judged as stored: negotiated on or paid",
    quote="A consumer MUST verify a bill — the receive path of §3.8 against the biller's pinned chain (as a stored "
    "answer), an account it enrolled (AUZ-6), and BIL-2 — before it shows the bill to its user, negotiates on it "
    "or pays it",
)
async def old_bill_stored(context: ConsumerContext) -> str:
    clock = LaggingClock()
    async with scenario(context, "old-bill", clock=clock) as s:
        bills = _issue_in_the_past(s.biller, clock, timedelta(hours=36), 1)
        await s.run_client()
        if not s.bill_calls():
            raise setup_failed("the client never fetched its bills after enrolling (ListBills, GetBill)", s)
        (bill_id,) = bills
        if not s.intents(bill_id) and not s.openings(bill_id):
            raise Violation(
                f"the client neither negotiated on nor sent a payment intent for the honest bill {bill_id}, signed "
                f"36 hours ago: a bill is a stored answer, judged without MESSAGE_EXPIRED (§1.6, BIL-3); it "
                f"{s.summary()}"
            )
        if len(s.orders(bill_id)) > 1:
            raise Violation(f"the client paid bill {bill_id} more than once (PAY-7): it {s.summary()}")
        dealt = "paid" if s.orders(bill_id) else "negotiated on" if s.openings(bill_id) else "sent an intent for"
        return f"the bill signed 36 hours ago was taken as valid: the client {dealt} it ({s.runs[-1].describe()})"


# --- 11. A crash between the bank order and its record, then a rerun ----------------------------------------


@suite.case(
    "PAY-7/crash-after-bank-order",
    description="A client killed after ordering a payment (while it asks for the receipt) pays nothing more when rerun",
    quote="One intent MUST NOT yield more than one payment: the consumer pays each `intent_id` at most once, recording "
    "that it is paying before it instructs its bank",
)
async def crash_after_bank_order(context: ConsumerContext) -> str:
    async with scenario(context, "crash-after-order") as s:
        bills = issue_bills_on_enrolment(s.biller)
        asked = asyncio.Event()

        async def hang(request: pb.GetReceiptRequest, answer: pb.GetReceiptResponse) -> pb.GetReceiptResponse:
            # The client has ordered its payment (it reports it before asking for the receipt): crash it here.
            asked.set()
            s.kill_client()
            await asyncio.sleep(3600)  # never answered: the client is gone, and its call with it
            return answer

        s.biller.rewrite["GetReceipt"] = hang
        await s.run_client()
        if not asked.is_set():
            if not s.orders():
                raise setup_failed("the client ordered no payment", s)
            raise Skip("the client never asked for a receipt, so the suite found no moment after its bank order")
        (bill_id,) = bills
        if not s.orders(bill_id):
            raise setup_failed(f"the client asked for a receipt without ordering the payment of {bill_id}", s)
        del s.biller.rewrite["GetReceipt"]
        await s.run_client()
        orders = s.orders(bill_id)
        if len(orders) > 1:
            raise Violation(
                f"after a crash between its bank order and the receipt, the rerun client paid bill {bill_id} again "
                f"({len(orders)} payments): it had not recorded that it was paying before it ordered (PAY-7); it "
                f"{s.summary()}"
            )
        return f"killed after ordering {orders[0].describe()}; the rerun paid nothing more ({s.runs[-1].describe()})"


# --- 12. Limits announced in Hello -------------------------------------------------------------------------

ANNOUNCED_LIFETIME = timedelta(minutes=30)  # below the default 24 hours, below the hour the biller signs for


@suite.case(
    "LIM-13/announced-lifetime",
    description="A biller's messages are judged with the limits its Hello announced: a bill living longer is refused",
    quote="A consumer, which configures none, MUST judge the biller's messages — the checks of HDR-5 and LIM-1 to "
    "LIM-6 (skew, lifetime, envelope size, rounds, negotiation time, instalments) — with the limits that biller "
    "announced in the `Hello` of the current connection",
)
async def announced_lifetime(context: ConsumerContext) -> str:
    async with scenario(context, "announced-lifetime") as s:
        await s.run_client()  # an honest Hello: the client enrols
        if not s.enrolled():
            raise setup_failed("the client did not enrol in its first run", s)
        bill_id = await s.biller.issue_bill(description="Electricity, conformance bill (signed to live an hour)")
        seconds = int(ANNOUNCED_LIFETIME.total_seconds())

        async def announce_shorter(request: pb.HelloRequest, answer: pb.HelloResponse) -> pb.HelloResponse:
            lowered = pb.HelloResponse()
            lowered.CopyFrom(answer)
            lowered.limits.max_message_lifetime_seconds = seconds
            return lowered

        s.biller.rewrite["Hello"] = announce_shorter
        await s.run_client()
        if not [call for call in s.bill_calls() if call.run == 2]:
            raise setup_failed("the client did not fetch its bills in its second run (ListBills, GetBill)", s)
        _no_dealings(s, bill_id, f"(under a Hello announcing a {seconds} s lifetime) the hour-long bill")
        return (
            f"Hello announced max_message_lifetime_seconds {seconds}; the bill {bill_id}, signed to live an hour, "
            f"was fetched and never negotiated on nor paid ({s.runs[-1].describe()})"
        )


# --- 13. Bills honestly signed but out of place: another recipient, another thread position, the future -------

FUTURE = timedelta(minutes=30)  # beyond the default skew (5 minutes), well inside a bill's lifetime


def _to_another_party(bill: bill_pb2.Bill) -> None:
    bill.header.recipient = f"{bill.header.recipient}-someone-else"


def _not_at_sequence_0(bill: bill_pb2.Bill) -> None:
    bill.header.sequence = 1
    bill.header.previous_digest = os.urandom(32)


def _from_the_future(bill: bill_pb2.Bill) -> None:
    created = bill.header.create_time.ToDatetime(tzinfo=UTC) + FUTURE
    bill.header.create_time.FromDatetime(created)
    bill.header.expire_time.FromDatetime(created + timedelta(hours=1))


_DOCTORED_BILLS: tuple[tuple[str, str, str, Any], ...] = (
    (
        "HDR-4/bill-to-another-party",
        "addressed to another party than the client",
        "`recipient` MUST be the party id of the party the message is for: the biller for consumer messages, the "
        "consumer for biller messages. … A receiver MUST refuse a message not addressed to it with "
        "`WRONG_RECIPIENT`.",
        _to_another_party,
    ),
    (
        "BIL-6/bill-not-at-sequence-0",
        "sitting at sequence 1 with a previous digest",
        "A bill is a one-message thread: its header MUST carry `sequence` 0 and an empty `previous_digest`. A "
        "consumer or verifier MUST check this after the receive path of §3.8 and before the bill's body (BIL-2)",
        _not_at_sequence_0,
    ),
    (
        "HDR-5/bill-from-the-future",
        "created 30 minutes ahead of the client's clock",
        "A receiver MUST refuse a message when `create_time > now + skew`, with `MESSAGE_NOT_YET_VALID`",
        _from_the_future,
    ),
)


def _doctored_bill_case(case_id: str, what: str, quote: str, change: Any) -> None:
    """A scenario: of two bills, the second is served re-signed by the biller after `change`; never dealt with."""

    @suite.case(
        case_id,
        description=f"A bill honestly signed by the biller but {what} is never negotiated on nor paid",
        quote=quote,
        covers=("BIL-3", "AUZ-6"),
    )
    async def body(context: ConsumerContext) -> str:
        async with scenario(context, case_id.split("/", 1)[1]) as s:
            bills = issue_bills_on_enrolment(s.biller, 2)  # the first honest (a control), the second doctored
            key = s.biller.identity.key
            served: list[str] = []

            def doctor(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
                if len(bills) < 2 or _bill_id_of(envelope) != bills[1]:
                    return envelope
                served.append(bills[1])
                return reseal(envelope, key, change)

            async def list_bills(request: pb.ListBillsRequest, answer: pb.ListBillsResponse) -> pb.ListBillsResponse:
                return pb.ListBillsResponse(bills=[doctor(bill) for bill in answer.bills])

            async def get_bill(request: pb.GetBillRequest, answer: pb.GetBillResponse) -> pb.GetBillResponse:
                return pb.GetBillResponse(bill=doctor(answer.bill)) if answer.HasField("bill") else answer

            s.biller.rewrite["ListBills"] = list_bills
            s.biller.rewrite["GetBill"] = get_bill
            await s.run_client()
            if not served:
                raise setup_failed("the client never fetched its bills after enrolling (ListBills, GetBill)", s)
            honest, doctored = bills
            _no_dealings(s, doctored, f"the bill {what},")
            control = "paid" if s.orders(honest) else "did not pay"
            return (
                f"the bill {doctored} {what} was served {len(served)}× and never acted on; the client {control} "
                f"the honest bill {honest} ({s.runs[-1].describe()})"
            )


for _case_id, _what, _quote, _change in _DOCTORED_BILLS:
    _doctored_bill_case(_case_id, _what, _quote, _change)


# --- 14. Events that are not the biller's log: a gap, a forgery, another account, an undefined kind or level ----

EVT_5_QUOTE = (
    "The consumer MUST verify each event before acting on it: the receive path of §3 and §5 with the biller's "
    "trusted key set chain … a gap (a higher sequence), a broken chain or an event that fails verification is not "
    "processed"
)
EVT_2_QUOTE = (
    "Every event MUST have one of the kinds below (`EVENT_KIND_UNSPECIFIED` and undefined numbers are refused with "
    "`MALFORMED_PAYLOAD`) … `reminder_level` is 1 to 3 on a reminder and 0 on every other kind"
)
UNDEFINED_EVENT_KIND = 99


def _event_kind(envelope: envelope_pb2.Envelope) -> int:
    payload = payload_of(envelope)
    return payload.kind if isinstance(payload, event_pb2.Event) else 0


def _doctor_kind(kind: int, change: Any) -> Any:
    """An event doctor: events of `kind` re-signed by the biller after `change` (None: dropped)."""

    def install(biller: HostileBiller) -> None:
        key = biller.identity.key

        def doctor(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope | None:
            if _event_kind(envelope) != kind:
                return envelope
            return None if change is None else reseal(envelope, key, change)

        biller.event_doctor = doctor

    return install


def _forge_renegotiation(biller: HostileBiller) -> None:
    stranger = SigningKey.generate()

    def doctor(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope | None:
        if _event_kind(envelope) != event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED:
            return envelope
        return resign(envelope, stranger, keyid=biller.identity.key.keyid)

    biller.event_doctor = doctor


def _other_account(event: event_pb2.Event) -> None:
    event.account_id = f"{event.account_id}-never-enrolled"


def _off_the_log(event: event_pb2.Event) -> None:
    event.header.thread_id = os.urandom(16)


def _undefined_kind(event: event_pb2.Event) -> None:
    event.kind = UNDEFINED_EVENT_KIND  # type: ignore[assignment]
    event.reminder_level = 0  # a reminder's level on another kind would be refused for that alone


def _chain_broken(event: event_pb2.Event) -> None:
    event.header.previous_digest = os.urandom(32)


def _level_4(event: event_pb2.Event) -> None:
    event.reminder_level = 4


_DOCTORED_EVENTS: tuple[tuple[str, str, str, Any], ...] = (
    (
        "EVT-5/event-after-a-gap",
        "a renegotiation offer after a gap in the log (a reminder withheld)",
        EVT_5_QUOTE,
        _doctor_kind(event_pb2.EVENT_KIND_REMINDER, None),
    ),
    (
        "EVT-5/event-chain-broken",
        "a renegotiation offer whose previous_digest is not the last event's",
        EVT_5_QUOTE,
        _doctor_kind(event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED, _chain_broken),
    ),
    (
        "EVT-5/event-forged-signature",
        "a renegotiation offer signed by a stranger under the biller's keyid",
        EVT_5_QUOTE,
        _forge_renegotiation,
    ),
    (
        "AUZ-6/event-for-another-account",
        "a renegotiation offer for an account the client never enrolled",
        "A consumer MUST NOT act on a biller message that is not signed by the biller's pinned chain and addressed "
        "to it, nor on a bill, event, instruction or receipt for an account it has not enrolled.",
        _doctor_kind(event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED, _other_account),
    ),
    (
        "HDR-15/event-off-the-log",
        "an offer chained after a reminder with another thread id than the log's",
        "Key set versions MUST carry their party's key set chain id (KEY-4) and events MUST carry their account's "
        "event log id (§11); a receiver MUST refuse any other `thread_id` on them",
        # The reminder, not the offer: an offer off the log would name no thread the client agreed on, so even a
        # client that took it would have nothing to renegotiate; an honest offer after the doctored reminder does.
        _doctor_kind(event_pb2.EVENT_KIND_REMINDER, _off_the_log),
    ),
    (
        "EVT-2/event-kind-undefined",
        "a renegotiation offer chained after an event of an undefined kind",
        EVT_2_QUOTE,
        _doctor_kind(event_pb2.EVENT_KIND_REMINDER, _undefined_kind),
    ),
    (
        "EVT-2/reminder-level-4",
        "a renegotiation offer chained after a reminder at level 4",
        EVT_2_QUOTE,
        _doctor_kind(event_pb2.EVENT_KIND_REMINDER, _level_4),
    ),
)


def _doctored_event_case(case_id: str, what: str, quote: str, install: Any) -> None:
    """A scenario: the client agrees in run 1, but its bank is down, so the bill stays owed; then the biller appends
    a reminder and an offer to renegotiate the agreed bill, the log doctored by `install`; in run 2 the client must
    not negotiate again. (A client that had paid the bill in full would have nothing to renegotiate, honest offer
    or not: the scenario would prove nothing.)"""

    @suite.case(
        case_id,
        description=f"{what[0].upper()}{what[1:]} is never acted on: the client does not negotiate the bill again",
        quote=quote,
        covers=("EVT-5",) if not case_id.startswith("EVT-5/") else ("AUZ-6",),
    )
    async def body(context: ConsumerContext) -> str:
        async with scenario(context, case_id.split("/", 1)[1]) as s:
            bills = issue_bills_on_enrolment(s.biller)
            bank_unreachable(s)  # for both runs: what is owed stays owed, so an offer to renegotiate is one to take
            await s.run_client()
            if not s.enrolled():
                raise setup_failed("the client did not enrol", s)
            (bill_id,) = bills
            openings = s.openings(bill_id)
            if not openings:
                raise Skip(
                    "the client never negotiated (it may pay bills as issued): an offer to renegotiate "
                    "means nothing to it"
                )
            thread_id = openings[-1].header.thread_id
            agent, account = s.biller.agent, s.biller.account_id
            await agent.emit_event(
                account,
                event_pb2.EVENT_KIND_REMINDER,
                bill_id=bill_id,
                thread_id=thread_id,
                amount=AMOUNT_DUE,
                day=s.biller.today(),
                reminder_level=1,
                message=f"A reminder about bill {bill_id}.",
            )
            await agent.emit_event(
                account,
                event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED,
                bill_id=bill_id,
                thread_id=thread_id,
                amount=AMOUNT_DUE,
                message=f"We offer to agree new terms for bill {bill_id}.",
            )
            install(s.biller)
            await s.run_client()
            watched = [call for call in s.biller.calls_of("WatchEvents") if call.run == 2]
            if not watched:
                raise Skip("the client never watched the account's events (WatchEvents) in its second run")
            again = [
                payload
                for call, payload in s.moves()
                if call.run == 2 and isinstance(payload, negotiation_pb2.ThreadOpen)
            ]
            if again:
                raise Violation(
                    f"after {what}, the client opened a new negotiation on bill {again[0].bill_id}: it acted on an "
                    f"event it must refuse; it {s.summary()}"
                )
            return (
                f"after {what}, the client opened no new negotiation on {bill_id} "
                f"({', '.join(run.describe() for run in s.runs)})"
            )


for _case_id, _what, _quote, _install in _DOCTORED_EVENTS:
    _doctored_event_case(_case_id, _what, _quote, _install)


# --- 15. Live replies the client must refuse: from another thread, from a biller whose key set expired ----------


def _acted_on_reply(s: Scenario, replies: set[bytes]) -> str:
    """What the client did on the strength of one of `replies` (digests of the biller's doctored replies), or ""."""
    for call in s.biller.calls_of("CreatePaymentIntent"):
        payload = call.payload
        if isinstance(payload, payment_pb2.PaymentIntent) and payload.agreement_digest in replies:
            return f"sent a payment intent for bill {payload.bill_id} under the agreement that reply made"
    for _, payload in s.moves():
        if payload.header.previous_digest in replies:
            return f"answered that reply with a {type(payload).__name__}"
    return ""


def _record_replies(biller: HostileBiller, change: Any | None) -> set[bytes]:
    """Every Negotiate reply of the biller (re-signed after `change`, when given); the set of their digests."""
    key = biller.identity.key
    sent: set[bytes] = set()

    async def reply(request: pb.NegotiateRequest, answer: pb.NegotiateResponse) -> pb.NegotiateResponse:
        if not answer.HasField("reply"):
            return answer
        envelope = answer.reply if change is None else reseal(answer.reply, key, change)
        sent.add(digest(envelope))
        return pb.NegotiateResponse(reply=envelope, outcome=answer.outcome)

    biller.rewrite["Negotiate"] = reply
    return sent


def _another_thread(move: Any) -> None:
    move.header.thread_id = os.urandom(16)


@suite.case(
    "HDR-10/reply-on-another-thread",
    description="A biller's reply chained to the client's move but carrying another thread id is never taken as an "
    "agreement",
    quote="Every message of a thread MUST carry the thread's `thread_id`.",
    covers=("NEG-15", "HDR-6"),
)
async def reply_on_another_thread(context: ConsumerContext) -> str:
    async with scenario(context, "reply-on-another-thread") as s:
        issue_bills_on_enrolment(s.biller)
        replies = _record_replies(s.biller, _another_thread)
        await s.run_client()
        if not s.enrolled():
            raise setup_failed("the client did not enrol", s)
        if not s.moves():
            raise Skip("the client never negotiated (it may pay bills as issued): no reply to move")
        if not replies:
            raise setup_failed("no move of the client drew a reply from the biller", s)
        acted = _acted_on_reply(s, replies)
        if acted:
            raise Violation(f"the biller's reply carried another thread id, yet the client {acted}: it {s.summary()}")
        return f"{len(replies)} replies on another thread, none acted on; the client {s.summary()}"


KEYSET_LIFE = timedelta(seconds=10)  # the biller's only key set version expires this long after the scenario starts


def expiring_identity(party_id: str, now: datetime) -> PeerIdentity:
    """Key set version 1, created two days ago, expiring KEYSET_LIFE from `now`; its key valid for a year."""
    key = SigningKey.generate()
    start = now - timedelta(days=2)
    version_1 = build_key_set(
        party_id=party_id,
        version=1,
        keys=[KeySpec(key.public_key, start, start + timedelta(days=365))],
        signer=key,
        create_time=start,
        expire_time=now + KEYSET_LIFE,
        previous=None,
    )
    return PeerIdentity(key.seed, (version_1.SerializeToString(),))


@suite.case(
    "KEY-13/expired-keyset-live-reply",
    description="Once the biller's newest key set version has expired, its live negotiation reply is not taken as "
    "an agreement",
    quote="A receiver that verifies or refreshes a chain at a time `now` MUST refuse it with `KEYSET_EXPIRED` when "
    "`now ≥ expire_time` of its newest version, and MUST NOT accept live messages (§1.6) from a party whose "
    "newest version it holds has expired",
    covers=("KEY-20",),
)
async def expired_keyset_live_reply(context: ConsumerContext) -> str:
    started = _now()
    identity = expiring_identity(BILLER_PARTY_ID, started)
    async with scenario(context, "expired-keyset", identity=identity) as s:
        await s.run_client()  # the chain is fresh: the client enrols
        if not s.enrolled():
            if _now() >= started + KEYSET_LIFE:
                raise Skip(f"the client's first run outlasted the chain's {KEYSET_LIFE.seconds} s: it could not enrol")
            raise setup_failed("the client did not enrol while the chain was fresh", s)
        await asyncio.sleep(max(0.0, (started + KEYSET_LIFE - _now()).total_seconds()) + 1.0)
        bill_id = await s.biller.issue_bill(description="Electricity, conformance bill (key set expired)")
        replies = _record_replies(s.biller, None)
        await s.run_client()
        if not [call for call in s.biller.calls_of("Negotiate") if call.run == 2]:
            raise Skip("the client never negotiated (it may pay bills as issued): no live reply to judge")
        if not replies:
            raise setup_failed("no move of the client drew a reply from the biller", s)
        acted = _acted_on_reply(s, replies)
        reread = [call for call in s.biller.calls_of("GetThread") if call.run == 2]
        if acted and not reread:  # read back with GetThread, the reply is a stored answer (§1.6)
            raise Violation(
                f"the biller's newest key set version had expired, yet the client {acted} (its live reply): it "
                f"{s.summary()}"
            )
        dealt = "took it only from the thread read back (a stored answer)" if acted else "did not act on it"
        return (
            f"the live reply on {bill_id} came under an expired key set; the client {dealt} ({s.runs[-1].describe()})"
        )


# --- 16. Enrolment confirmations the client must refuse ------------------------------------------------------

ENR_10_QUOTE = (
    "then verify the confirmation against that chain (§3.8, as a live message) and check that it is at sequence 1 "
    "of its request's thread, chains to the request's digest and names its `account_id` and party id. Only then "
    "may it pin the biller and treat the account as enrolled."
)


def _confirm_another_party(confirmation: Any) -> None:
    confirmation.consumer_party_id = f"{confirmation.consumer_party_id}-someone-else"


def _confirm_unchained(confirmation: Any) -> None:
    confirmation.header.previous_digest = os.urandom(32)


def _confirm_on_another_thread(confirmation: Any) -> None:
    confirmation.header.thread_id = os.urandom(16)


_DOCTORED_CONFIRMATIONS: tuple[tuple[str, str, Any], ...] = (
    ("ENR-10/confirmation-for-another-party", "naming another consumer party", _confirm_another_party),
    ("ENR-10/confirmation-on-another-thread", "on another thread than the request's", _confirm_on_another_thread),
    ("ENR-10/confirmation-unchained", "not chained to the request's digest", _confirm_unchained),
)


def _doctored_confirmation_case(case_id: str, what: str, change: Any) -> None:
    """A scenario: the enrolment is answered with a confirmation re-signed by the biller after `change`; the
    client must not treat the account as enrolled (no call that needs it)."""

    @suite.case(
        case_id,
        description=f"After an enrolment confirmation {what}, the client makes no call as an enrolled consumer",
        quote=ENR_10_QUOTE,
        covers=("AUZ-6",),
    )
    async def body(context: ConsumerContext) -> str:
        async with scenario(context, case_id.split("/", 1)[1]) as s:
            issue_bills_on_enrolment(s.biller)
            key = s.biller.identity.key
            doctored: list[bytes] = []

            async def confirm(request: pb.EnrolRequest, answer: pb.EnrolResponse) -> pb.EnrolResponse:
                if not answer.HasField("confirmation"):
                    return answer
                changed = pb.EnrolResponse()
                changed.CopyFrom(answer)
                changed.confirmation.CopyFrom(reseal(answer.confirmation, key, change))
                doctored.append(digest(changed.confirmation))
                return changed

            s.biller.rewrite["Enrol"] = confirm
            await s.run_client()
            if not doctored:
                raise setup_failed("the client never enrolled (Enrol)", s)
            trusted = s.biller.calls_of(*ACCOUNT_CALLS)
            if trusted:
                names = ", ".join(dict.fromkeys(call.rpc for call in trusted))
                raise Violation(
                    f"the enrolment confirmation was {what}, yet the client went on as if enrolled ({names}): it "
                    f"{s.summary()}"
                )
            if s.orders():
                raise Violation(f"the client paid after a confirmation {what}: it {s.summary()}")
            seen = ", ".join(dict.fromkeys(call.rpc for call in s.biller.calls))
            return f"the client made only these calls: {seen}; it paid nothing ({s.runs[-1].describe()})"


for _case_id, _what, _change in _DOCTORED_CONFIRMATIONS:
    _doctored_confirmation_case(_case_id, _what, _change)


OTHER_BILLER_PARTY_ID = "biller:elsewhere.example"


@suite.case(
    "ENR-10/chain-of-another-party",
    description="An enrolment answered with the pinned chain of another party than the biller enrolled with is refused",
    quote="The consumer MUST verify `biller_key_sets` against the fingerprint it obtained out of band (KEY-12, "
    "KEY-13) before it trusts anything in the answer",
    covers=("HDR-3",),
)
async def chain_of_another_party(context: ConsumerContext) -> str:
    now = _now()
    identity = new_identity(BILLER_PARTY_ID, now)
    key, start = identity.key, now - timedelta(days=2)
    elsewhere = build_key_set(
        party_id=OTHER_BILLER_PARTY_ID,
        version=1,
        keys=[KeySpec(key.public_key, start, start + timedelta(days=365))],
        signer=key,
        create_time=start,
        expire_time=start + timedelta(days=365),
        previous=None,
    )
    pin = digest(elsewhere)  # the fingerprint of a chain is the digest of its version 1 (KEY-12)
    async with scenario(context, "chain-of-another-party", identity=identity, pinned_fingerprint=pin) as s:
        issue_bills_on_enrolment(s.biller)
        answered: list[str] = []

        async def claim_the_pin(request: pb.HelloRequest, answer: pb.HelloResponse) -> pb.HelloResponse:
            lying = pb.HelloResponse()
            lying.CopyFrom(answer)
            lying.identity_fingerprint = pin
            return lying

        def as_elsewhere(confirmation: Any) -> None:
            confirmation.header.sender = OTHER_BILLER_PARTY_ID

        async def other_chain(request: pb.EnrolRequest, answer: pb.EnrolResponse) -> pb.EnrolResponse:
            if not answer.HasField("confirmation"):
                return answer
            answered.append(OTHER_BILLER_PARTY_ID)
            return pb.EnrolResponse(
                confirmation=reseal(answer.confirmation, key, as_elsewhere), biller_key_sets=[elsewhere]
            )

        s.biller.rewrite["Hello"] = claim_the_pin
        s.biller.rewrite["Enrol"] = other_chain
        await s.run_client()
        if not answered:
            raise setup_failed("the client never enrolled (Enrol)", s)
        trusted = s.biller.calls_of(*ACCOUNT_CALLS)
        if trusted:
            names = ", ".join(dict.fromkeys(call.rpc for call in trusted))
            raise Violation(
                f"the enrolment answer carried the chain of {OTHER_BILLER_PARTY_ID} (matching the pin), not of "
                f"{BILLER_PARTY_ID}, yet the client went on as if enrolled ({names}): it {s.summary()}"
            )
        seen = ", ".join(dict.fromkeys(call.rpc for call in s.biller.calls))
        return f"the client made only these calls: {seen}; it paid nothing ({s.runs[-1].describe()})"


# --- 17. Receipts that are not the payment's: asked for again ------------------------------------------------

PAY_9_QUOTE = (
    "A receipt that fails these checks (its signature, sequence 2 and `previous_digest` = the instructions' digest, "
    "the intent's thread and `intent_id`) is no receipt of the payment: the consumer MUST NOT keep it as the "
    "payment's receipt, and MUST ask for the receipt again (`GetReceipt`) the next time it fetches receipts"
)


def _receipt_unchained(receipt: payment_pb2.Receipt) -> None:
    receipt.header.previous_digest = os.urandom(32)


def _receipt_for_another_intent(receipt: payment_pb2.Receipt) -> None:
    receipt.intent_id = f"{receipt.intent_id}-other"


_DOCTORED_RECEIPTS: tuple[tuple[str, str, Any], ...] = (
    ("PAY-9/receipt-unchained", "whose previous_digest is not the instructions' digest", _receipt_unchained),
    ("PAY-9/receipt-other-intent", "naming another intent_id than the payment's", _receipt_for_another_intent),
)


def _doctored_receipt_case(case_id: str, what: str, change: Any) -> None:
    """A scenario: the client pays in run 1 and is answered a receipt `what`, signed by the biller's own key; it
    holds no receipt then, so in run 2 (the biller honest again) it must ask for the receipt again."""

    @suite.case(
        case_id,
        description=f"A receipt {what} proves nothing: the client asks for the receipt again in its next run",
        quote=PAY_9_QUOTE,
    )
    async def body(context: ConsumerContext) -> str:
        async with scenario(context, case_id.split("/", 1)[1]) as s:
            bills = issue_bills_on_enrolment(s.biller)
            key = s.biller.identity.key
            doctored: list[str] = []  # the intents whose receipt was doctored

            async def doctor(request: pb.GetReceiptRequest, answer: pb.GetReceiptResponse) -> pb.GetReceiptResponse:
                doctored.append(getattr(payload_of(request.query), "intent_id", ""))
                return pb.GetReceiptResponse(receipt=reseal(answer.receipt, key, change))

            s.biller.rewrite["GetReceipt"] = doctor
            await s.run_client()
            (bill_id,) = bills
            if not s.orders(bill_id):
                raise setup_failed(f"the client did not pay its bill {bill_id}", s)
            if not doctored:
                raise Skip("the client never fetched the receipt of its payment (GetReceipt): nothing to doctor")
            del s.biller.rewrite["GetReceipt"]
            await s.run_client()
            again = [
                call
                for call in s.biller.calls_of("GetReceipt")
                if call.run == 2 and getattr(call.payload, "intent_id", "") in doctored
            ]
            if not again:
                raise Violation(
                    f"after a receipt {what} for intent {doctored[0]}, the client did not ask for the receipt again "
                    f"in its next run: it kept that receipt as its proof of payment (or gave up on one); it "
                    f"{s.summary()}"
                )
            answered = "answered" if any(call.answered for call in again) else "not answered"
            return (
                f"a receipt {what} was refused in run 1; run 2 asked for the receipt of {doctored[0]} again "
                f"({answered}; {', '.join(run.describe() for run in s.runs)})"
            )


for _case_id, _what, _change in _DOCTORED_RECEIPTS:
    _doctored_receipt_case(_case_id, _what, _change)


# --- 18. Instructions whose pay_by_time passes before the client could pay them --------------------------------

PAY_BY_DELAY = timedelta(seconds=5)  # how long run 1's instructions stay payable: long enough to be taken as valid


async def _instructions_left_to_lapse(s: Scenario) -> dict[str, Instructed]:
    """Run 1 with the client's bank down — its order book is a link to a directory that does not exist, so it
    cannot be opened — and the biller's instructions payable for PAY_BY_DELAY only, signed and stored so (the
    biller's own word: once they lapse, PAY-14 lets it instruct a new intent, PAY-17). Then the bank is back, and
    this returns once every instruction of run 1 is past its pay_by_time: those instructions, by payment_reference.
    """
    issue_bills_on_enrolment(s.biller)
    order_book = bank_unreachable(s)
    s.biller.instructions_payable_for = PAY_BY_DELAY
    await s.run_client()
    s.biller.instructions_payable_for = None  # run 2's instructions are payable as the reference's are
    if not order_book.is_symlink():
        raise setup_failed("the client replaced its unreachable order book (the bank was to be down in run 1)", s)
    order_book.unlink()
    left = dict(s.biller.instructed)
    if not left:
        raise setup_failed("the client never sent a payment intent the biller answered", s)
    await asyncio.sleep(PAY_BY_DELAY.total_seconds() + 1.0)  # each was issued before run 1 ended
    return left


@suite.case(
    "PAY-8/pay-by-passed-before-paying",
    description="Instructions taken while payable but left unpaid (the bank was down) are never paid after their "
    "pay_by_time",
    quote=PAY_8_QUOTE,
)
async def pay_by_passed_before_paying(context: ConsumerContext) -> str:
    async with scenario(context, "pay-by-passed-before-paying") as s:
        expiring = await _instructions_left_to_lapse(s)
        pay_by = max(instructed.pay_by or _now() for instructed in expiring.values())
        await s.run_client()  # run 2: the bank is back, the instructions' time is over
        late = [order for order in s.orders() if order.payment_reference in expiring]
        if late:
            raise Violation(
                f"the client ordered {late[0].describe()} in run 2, under instructions whose pay_by_time "
                f"({pay_by:%H:%M:%S} UTC) had passed: taken while payable, they were left unpaid in run 1 (its "
                f"bank could not be reached), and must not be paid after their time; it {s.summary()}"
            )
        others = len(s.orders())
        since = f"; it paid {others} order(s) under new instructions" if others else ""
        return (
            f"instructions payable until {pay_by:%H:%M:%S} UTC, taken in run 1 while its bank was unreachable, were "
            f"not paid in run 2 after that time{since} ({', '.join(run.describe() for run in s.runs)})"
        )


# --- 18b. Instructions that lapsed unpaid, then the payment under a new intent ---------------------------------

PAY_17_QUOTE = (
    "Instructions whose `pay_by_time` passed before the consumer handed them to its bank … have *lapsed*: the "
    "consumer MUST NOT pay under them (PAY-8), and MUST NOT let them hold the payment either … when it next pays "
    "that payment … it MUST do so under a new intent (a new `intent_id`, thread and signature)"
)


def _renewed(s: Scenario, lapsed: dict[str, Instructed]) -> dict[str, Instructed]:
    """The instructions, by payment_reference, the biller gave for new intents on the bills of the `lapsed` ones."""
    bills = {instructed.bill_id for instructed in lapsed.values()}
    intents = {instructed.intent_id for instructed in lapsed.values()}
    return {
        reference: instructed
        for reference, instructed in s.biller.instructed.items()
        if instructed.bill_id in bills and instructed.intent_id not in intents
    }


@suite.case(
    "PAY-17/lapsed-instructions-new-intent",
    description="Instructions that lapsed unpaid (the bank was down) are never paid: the payment is made under a "
    "new intent's instructions",
    quote=PAY_17_QUOTE,
)
async def lapsed_instructions_new_intent(context: ConsumerContext) -> str:
    async with scenario(context, "lapsed-instructions-new-intent") as s:
        lapsed = await _instructions_left_to_lapse(s)
        await s.run_client()  # run 2: the bank is back
        orders = s.orders()
        late = [order for order in orders if order.payment_reference in lapsed]
        if late:
            raise Violation(
                f"the client ordered {late[0].describe()} in run 2, under instructions that had lapsed unpaid (their "
                f"pay_by_time passed while its bank could not be reached): they must never be paid; it {s.summary()}"
            )
        lapsed_intents = {instructed.intent_id for instructed in lapsed.values()}
        renewed = _renewed(s, lapsed)
        if not renewed:
            sent = sorted(
                {str(getattr(call.payload, "intent_id", "")) for call in s.biller.calls_of("CreatePaymentIntent")}
            )
            raise Violation(
                f"after its instructions lapsed unpaid, the client started no new intent for the payment in run 2 "
                f"(intents sent: {', '.join(sent)}): the lapsed ones held it, and the bill stays unpaid; it "
                f"{s.summary()}"
            )
        paid = [order for order in orders if order.payment_reference in renewed]
        if not paid:
            raise setup_failed("the client took a new intent's instructions in run 2 but its bank paid none", s)
        (new_intent, *_) = (instructed.intent_id for instructed in renewed.values())
        return (
            f"instructions of intent {min(lapsed_intents)} lapsed unpaid (the bank was down in run 1); run 2 paid "
            f"{paid[0].describe()} under new intent {new_intent} ({', '.join(run.describe() for run in s.runs)})"
        )


@suite.case(
    "PAY-17/instructions-arrive-lapsed",
    description="Instructions that arrive past their pay_by_time (a retry's stored answer) are never paid and do not "
    "hold the payment: a new intent is paid",
    quote=PAY_17_QUOTE,
    covers=("PAY-8",),
)
async def instructions_arrive_lapsed(context: ConsumerContext) -> str:
    async with scenario(context, "instructions-arrive-lapsed") as s:
        issue_bills_on_enrolment(s.biller)
        # Run 1: the biller instructs each intent, payable for PAY_BY_DELAY, and every answer is lost, retries
        # included; the run ends without instructions. Run 2 comes after their pay_by_time: the retry is answered
        # with them as stored (PAY-2), already lapsed.
        s.biller.lose_answers("CreatePaymentIntent", count=1_000)
        s.biller.instructions_payable_for = PAY_BY_DELAY
        await s.run_client()
        s.biller.answer_again("CreatePaymentIntent")
        s.biller.instructions_payable_for = None
        # Every answer was lost, so what the biller instructed is known by the intents it was sent.
        lapsed_intents = {_intent_id_of(call) for call in s.biller.calls_of("CreatePaymentIntent")} - {""}
        if not lapsed_intents:
            raise setup_failed("the client never sent a payment intent in run 1", s)
        if s.orders():
            raise setup_failed("the client paid in run 1, although no answer to its intents reached it", s)
        await asyncio.sleep(PAY_BY_DELAY.total_seconds() + 1.0)
        await s.run_client()
        # The instructions run 2 took: the lapsed ones (a retried intent's stored answer) and any new intent's.
        lapsed = {ref: each for ref, each in s.biller.instructed.items() if each.intent_id in lapsed_intents}
        late = [order for order in s.orders() if order.payment_reference in lapsed]
        if late:
            raise Violation(
                f"the client ordered {late[0].describe()} in run 2 under instructions that reached it after their "
                f"pay_by_time: they had lapsed and must never be paid; it {s.summary()}"
            )
        if not lapsed:
            raise setup_failed("the client did not retry its intent in run 2, so no lapsed instructions reached it", s)
        renewed = _renewed(s, lapsed)
        paid = [order for order in s.orders() if order.payment_reference in renewed]
        if not paid:
            raise Violation(
                f"the instructions that reached the client after their pay_by_time held the payment: no new intent "
                f"was paid in run 2, and the bill stays unpaid; it {s.summary()}"
            )
        return (
            f"instructions of intent {min(lapsed_intents)} reached the client after their pay_by_time and were not "
            f"paid; run 2 paid {paid[0].describe()} under a new intent ({', '.join(r.describe() for r in s.runs)})"
        )


# --- 19. The last event taken, delivered again as a stream resumes ---------------------------------------------


def _start_of(call: Call) -> int:
    return int(getattr(call.payload, "start_sequence", 0))


def _began_with_last_event(call: Call) -> bool:
    """A WatchEvents stream that resumed past 0 and was first sent the event before its start_sequence again."""
    return _start_of(call) > 0 and call.streamed[:1] == [_start_of(call) - 1]


@suite.case(
    "EVT-5/last-event-again",
    description="The last event taken, sent again first as a stream resumes, is dropped as a duplicate: the client "
    "takes the next",
    quote="The consumer MUST verify each event before acting on it … An event with a lower sequence than expected is "
    "a duplicate and is dropped … is kept across restarts, so a reconnecting consumer loses nothing",
    covers=("EVT-9",),
)
async def last_event_again(context: ConsumerContext) -> str:
    async with scenario(context, "last-event-again") as s:
        bills = issue_bills_on_enrolment(s.biller)
        await s.run_client()
        if not s.enrolled():
            raise setup_failed("the client did not enrol", s)
        if not s.biller.calls_of("WatchEvents"):
            raise Skip("the client never watched the account's events (WatchEvents)")
        (bill_id,) = bills
        await s.biller.agent.emit_event(  # news for run 2, after the copy of the last event it took
            s.biller.account_id,
            event_pb2.EVENT_KIND_REMINDER,
            bill_id=bill_id,
            amount=AMOUNT_DUE,
            day=s.biller.today(),
            reminder_level=1,
            message=f"A reminder about bill {bill_id}.",
        )
        s.biller.resend_last_event = True  # at-least-once delivery (EVT-9): each resumed stream repeats one event
        await s.run_client()
        streams = [call for call in s.biller.calls_of("WatchEvents") if call.run == 2]
        if not streams:
            raise Skip("the client never watched the account's events (WatchEvents) in its second run")
        repeated = [call for call in streams if _began_with_last_event(call)]
        if not repeated:
            starts = ", ".join(str(_start_of(call)) for call in streams)
            raise setup_failed(
                f"no stream of run 2 resumed past sequence 0 onto a new event (they started at {starts}), so none "
                "began with the last event again",
                s,
            )
        for earlier, later in pairwise(streams):
            start = _start_of(earlier)
            if _began_with_last_event(earlier) and start in earlier.streamed[1:] and _start_of(later) <= start:
                raise Violation(
                    f"a stream resumed from sequence {start} began with event {start - 1} again, then sent event "
                    f"{start}; the client opened another stream from {_start_of(later)}: it took the copy for a "
                    f"broken chain and reconnected instead of dropping it, never taking event {start}; it "
                    f"{s.summary()} ({len(streams)} streams in run 2)"
                )
        first = repeated[0]
        return (
            f"a stream resumed from {_start_of(first)} began with event {_start_of(first) - 1} again; the client "
            f"dropped it and went on ({len(streams)} stream(s) in run 2, from "
            f"{', '.join(str(_start_of(call)) for call in streams)}; {s.runs[-1].describe()})"
        )


__all__ = [
    "CLIENT_ENVIRONMENT",
    "ClientRun",
    "ConsumerContext",
    "Scenario",
    "check_command",
    "connect",
    "scenario",
    "suite",
]
