"""`parley consumer run`: the reference consumer as a program, acting for one household.

    parley consumer run (--config household.toml | --from-env) [--state-dir DIR] [--once]
                        [--interval SECONDS] [--approve-all | --deny-all]

It reads the household's profile (`reference_consumer/sample.toml`: money, pay
day, buffer, outgoings, mandate, and per biller its priority and how to reach
it) and, on each pass:

1. **enrols** with every biller of the profile whose account is not enrolled
   yet, with the one-time code and the pinned identity fingerprint (KEY-12);
   later passes and runs reuse the stored, pinned link and never enrol again;
2. **fetches the bills** of every enrolled account, each verified against the
   pinned biller (BIL-3), and **reads the account's events** (EVT-5) that
   arrived since the last pass — from the live stream until it has been quiet
   for `EVENT_IDLE_SECONDS`, or, after `Household.follow` (background watches
   that store each event as it comes), from the store at once — so the pass
   acts on the news: an arrangement the
   biller ended (ARRANGEMENT_BROKEN) is not paid any more, and a bill it
   offered to renegotiate (RENEGOTIATION_OFFERED, EVT-7) is negotiated again
   for what is still owed — its amount due less what the household already
   paid of it (TRM-11, PAY-16); without such an offer, that outstanding
   balance is paid at once (step 5);
3. **negotiates**: first the threads left open by an earlier pass, then the new
   bills, planned together against one budget in the household's priority
   order (`strategy.plan_budget`, through `agent_strategy.ReferenceStrategy`),
   each through `ConsumerAgent.negotiate` with the reference cash-flow
   strategy inside the profile's mandate (NEG-20); a thread that ended without
   agreement is not reopened. With `household.pay_as_billed`, a bill the plan
   pays in full by its due date, inside the mandate, is not negotiated: it is
   paid as billed on that date (the decision stands for the run, its money
   committed in the budget);
4. **asks for approval** of anything outside the mandate: by default the
   request is stored in the consumer store with a stable id and the exact
   terms (`agent.consumer.ApprovalBook`), printed, and left pending — nothing is
   sent, the bot never agrees outside the mandate alone. The person answers it
   with `parley consumer approve ID` / `decline ID`; the next pass sends exactly
   the approved move, or, when the situation changed (other terms planned, the
   thread moved, its deadline passed), lets the approval lapse and asks anew.
   `--approve-all` / `--deny-all` answer every request, for unattended runs;
5. **pays what is due today**: each instalment of a standing agreement on or
   after its date, in order, exactly once (PAY-7), and the bills paid as
   billed, through `JsonLinesBank` (or the bank given to `Household.open`),
   then collects the receipts the biller has signed since (PAY-9). A payment
   the bank declines (`PaymentNotSent`) is reported and not tried again by
   this run: the person decides, and the biller reports a missed instalment;
6. reads the events again when the pass enrolled, negotiated or paid (what it
   caused: ARRANGEMENT_ACTIVE...), writes every agreement reached as a
   `parley-bundle/1` file under `agreements/` in the state directory (the
   household's proof, `agreement_file`), queues the notifications the profile
   asks for (`reference_consumer.notify`), and prints a summary in biller names
   and plain words.

`--once` runs one pass and exits; otherwise a pass runs every `--interval`
seconds (default 60) until SIGINT or SIGTERM, and the program exits 0.

The state directory (default `parley-consumer`, created 0700) holds the
household's Ed25519 key (`consumer.key`, mode 0600, made on the first run),
its key set chain (`consumer-keyset-v<N>.pb`: version 1's digest is the
household's identity fingerprint; a version near expiry is renewed as the next,
agent/identity.py, shared with the reference biller), the agent's SQLite store
(`consumer.sqlite`) and the bank's order book (`bank-orders.jsonl`). An empty
`--state-dir`, a path that is not a directory and a biller's state directory are
refused before anything is written (`household_state_dir`).

**The bank is a stand-in.** `JsonLinesBank` moves no money: it appends each
payment order — taken only from verified instructions (PAY-8) — as one JSON
line to `bank-orders.jsonl` (mode 0600, fsynced) and returns a reference. An
app with a real bank replaces it by its own `PaymentSender`.

`--from-env` replaces the profile file by the environment the consumer
conformance suite gives a client under test (docs/CONFORMANCE.md):
`PARLEY_TARGET`, `PARLEY_BILLER_PARTY_ID`, `PARLEY_FINGERPRINT` (hex),
`PARLEY_ACCOUNT_ID`, `PARLEY_ENROLMENT_CODE` and `PARLEY_STATE_DIR` (the
default state directory; empty counts as unset, as for the biller), for a
comfortable household that qualifies for hardship programmes (`profile_from_env`;
a refusal names the variable at fault):
the suite runs `parley consumer run --from-env --once --approve-all`.

Exit status: 0 when the pass (or the loop) ran; 3 when a `--once` pass left
requests waiting for the person's approval (and nothing worse happened); 1 when a biller refused or
failed verification in a `--once` pass (PIN_MISMATCH, a used enrolment code,
refused instructions, a disputed receipt...); 2 for an invalid profile (the
message names the key), unusable state, or a biller that cannot be reached. A
loop keeps going through biller failures (each pass reports them) and exits 0
when signalled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import threading
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent.clock import Clock, SystemClock
from agent.consumer import (
    AccountEvent,
    ApprovalBook,
    ApprovalPending,
    ApprovalRequest,
    ConsumerAgent,
    NegotiationResult,
    Payment,
    PaymentDispute,
    PaymentInDoubt,
    PaymentNotSent,
    PaymentOrder,
    PaymentReceipt,
    PaymentSender,
    ReceivedBill,
)
from agent.identity import IdentityDir, IdentityError, OtherPartyError, state_dir_path
from agent.listen import is_loopback
from agent.protocol.agreement import Bundle
from agent.protocol.errors import ParleyError, ProtocolError
from agent.protocol.keys import InsecureKeyFileError, SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.terms import BillFacts, Terms
from agent.stores import open_consumer_store
from agent.stores.base import ApprovalRecord, ApprovalState, IntentState, ThreadOutcome
from agent.stores.consumer_sqlite import SqliteConsumerStore
from agent.tools.numbers import number_argument
from agent.transport.client import DEFAULT_RETRY, ClientTls, RetryPolicy, is_transient
from agent.transport.diagnosis import Remedies, connection_hint
from agent.transport.status import CallError
from parley.v1 import event_pb2, terms_pb2
from reference_consumer.agent_strategy import ReferenceStrategy, agent_mandate
from reference_consumer.notify import Notifier, Outbox
from reference_consumer.profile import (
    BillerPreference,
    Profile,
    ProfileError,
    check_fingerprints,
    load_profile,
    parse_profile,
)
from reference_consumer.strategy import PlannedBill
from reference_consumer.words import (
    ACTION_WORDS,
    describe_terms,
    event_words,
    money_document,
    payment_next_command,
    payment_next_step,
)

logger = logging.getLogger("parley.reference_consumer")

KEY_FILE = "consumer.key"
KEYSET_FILE = "consumer-keyset-v1.pb"
STORE_FILE = "consumer.sqlite"
BANK_FILE = "bank-orders.jsonl"
AGREEMENTS_DIR = "agreements"
DEFAULT_STATE_DIR = "parley-consumer"
DEFAULT_INTERVAL = 60.0
MAX_INTERVAL = 86_400.0  # seconds between passes: a bot resting longer than a day misses due dates
# `--interval` of `run` and `serve`: nan would pass a `<= 0` test and make every rest end at once.
INTERVAL = number_argument(float, 0, MAX_INTERVAL, above_low=True)
EVENT_IDLE_SECONDS = 0.5
"""A pass reads an account's events until the stream has been quiet this long (it is live: it never ends)."""
NOTIFY_ONCE_SECONDS = 15.0
"""After a --once pass, notifications are tried for this long at most; the rest wait in the outbox."""
STOP_GRACE_SECONDS = 10.0
"""On SIGINT/SIGTERM a pass under way may finish for this long before it is cancelled."""
_KEY_BACKDATE = timedelta(minutes=5)  # a biller whose clock is a little behind still finds our key valid

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2
EXIT_APPROVALS_PENDING = 3
UNREACHABLE = "the biller cannot be reached"
"""A --once pass ended with requests waiting for the person (`parley consumer approve ID`)."""
DECLINED_NOW = "declined by the bank"
DECLINED_EARLIER = "declined by the bank earlier: not retried"
OUTSTANDING_NOTE = "the outstanding balance: the biller ended the arrangement and offered no new one"
"""The status of a payment the bank declined (`PaymentNotSent`): told to the person, not retried by this run."""


class Approval(enum.StrEnum):
    """What happens to a move outside the mandate (NEG-20)."""

    ASK = "ask"
    """Store and print the request, leave it pending: nothing is sent until the person answers it by id."""
    APPROVE = "approve"
    """Approve every request (--approve-all)."""
    DENY = "deny"
    """Decline every request (--deny-all): an opening is not sent, a thread is withdrawn."""


class StateError(Exception):
    """The state directory cannot be used (e.g. a key set without its key)."""


# --- Identity -------------------------------------------------------------------------------------------


def load_identity(
    state_dir: Path, party_id: str, now: datetime, *, named_by: str = "--state-dir"
) -> tuple[SigningKey, KeyChain]:
    """The household's signing key and key set chain, created in `state_dir` on first use, renewed near expiry.

    The one identity implementation (agent/identity.py, shared with the reference
    biller): the key is written with mode 0600 and never overwritten. ProfileError
    (naming household.party_id) if the state belongs to another party;
    InsecureKeyFileError if the key file is open to others; StateError for a key
    set that does not list the key, a key set without its key or a key without its
    key set, or a biller's state directory. `named_by` is how the person chose the
    directory, for the messages asking for another.
    """
    try:
        identity = IdentityDir(state_dir, "consumer", backdate=_KEY_BACKDATE, named_by=named_by).load(party_id, now)
    except OtherPartyError as error:
        raise ProfileError(
            "household.party_id",
            f"{party_id!r}, but {state_dir} holds the identity of {error.held_by!r}: use another {named_by}",
        ) from error
    except IdentityError as error:
        raise StateError(str(error)) from error
    return identity.key, identity.chain


def household_state_dir(text: str, named_by: str = "--state-dir") -> Path:
    """The household's state directory `text` names, checked before anything is written there; StateError when
    it is empty, not a directory, or a biller's (agent/identity.py's rules, the biller's too)."""
    try:
        state_dir = state_dir_path(text, named_by)
        IdentityDir(state_dir, "consumer", named_by=named_by).check()
    except IdentityError as error:
        raise StateError(str(error)) from error
    return state_dir


# --- The bank (a stand-in) -------------------------------------------------------------------------------


class JsonLinesBank:
    """A stand-in for the household's bank: it moves no money, it writes each order down.

    Each payment order (`agent.consumer.PaymentOrder`, built only from verified
    instructions, PAY-8) becomes one JSON line of `path` — amount as an exact
    decimal string, the payee, the payment reference to quote — written and
    fsynced before `send` returns its bank reference. The agent hands each
    intent over at most once (PAY-7), so the file never holds an order twice.
    A file that cannot be opened is a bank that cannot be reached: nothing was
    ordered, and `send` raises `PaymentNotSent` (a failed write stays in doubt).
    """

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock

    async def send(self, order: PaymentOrder) -> str:
        reference = f"simbank-{secrets.token_hex(8)}"
        exponent = order.amount.currency.exponent
        whole, fraction = divmod(order.amount.minor, 10**exponent)
        record = {
            "bank_reference": reference,
            "ordered_at": self._clock.now().isoformat(),
            "biller_party_id": order.biller_party_id,
            "account_id": order.account_id,
            "bill_id": order.bill_id,
            "intent_id": order.intent_id,
            "currency": order.amount.currency.code,
            "amount": f"{whole}.{fraction:0{exponent}d}" if exponent else str(whole),
            "rail": order.rail,
            "payee_name": order.payee_name,
            "payee_account": order.payee_account,
            "payment_reference": order.payment_reference,
            "pay_by_time": order.pay_by_time.isoformat(),
        }
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as error:
            # Nothing was written, so nothing was ordered: the bank is unreachable, and the payment may be tried
            # again later under its stored instructions (while their pay_by_time allows, PAY-8) — not left in doubt.
            raise PaymentNotSent(f"the bank's order book {self.path} cannot be opened: {error}") from error
        # One small synchronous write, so a cancelled task cannot stop it half way.
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        logger.info(
            "bank order %s: %s to %s ref %s", reference, order.amount, order.payee_name, order.payment_reference
        )
        return reference

    def orders(self) -> list[dict[str, str]]:
        """Every order written so far, oldest first."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- Approvals ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovalLine:
    """A request for approval met in a pass, and the answer it had then."""

    request: ApprovalRequest
    answer: Literal["pending", "approved", "declined"]


_ANSWERS: dict[ApprovalState, Literal["pending", "approved", "declined"]] = {
    ApprovalState.PENDING: "pending",
    ApprovalState.APPROVED: "approved",
    ApprovalState.DECLINED: "declined",
}


def _standing_answer(mode: Approval) -> bool | None:
    return {Approval.APPROVE: True, Approval.DENY: False, Approval.ASK: None}[mode]


# --- What a pass did ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something that went wrong with a biller; `exit_code` is what it means for a --once run (0: a warning)."""

    biller_party_id: str
    what: str
    detail: str
    exit_code: int


@dataclass(frozen=True)
class LinkLine:
    biller_party_id: str
    account_id: str
    target: str
    status: str


@dataclass(frozen=True)
class BillLine:
    biller_party_id: str
    bill: BillFacts
    status: str


@dataclass(frozen=True)
class NegotiationLine:
    biller_party_id: str
    bill_id: str
    outcome: str
    terms: Terms | None
    note: str = ""


@dataclass(frozen=True)
class PaymentLine:
    biller_party_id: str
    bill_id: str
    instalment: int  # 1-based, for people
    of: int
    due: date
    amount: str
    status: str
    bank_reference: str = ""
    receipt: str = ""
    note: str = ""
    next_step: str = ""  # what the household can do about a payment the bot will not move on alone


@dataclass
class PassReport:
    """Everything one pass found and did, for the summary."""

    party_id: str
    today: date
    links: list[LinkLine] = field(default_factory=list)
    bills: list[BillLine] = field(default_factory=list)
    plan: list[PlannedBill] = field(default_factory=list)
    negotiations: list[NegotiationLine] = field(default_factory=list)
    approvals: list[ApprovalLine] = field(default_factory=list)
    agreement_files: list[Path] = field(default_factory=list)
    """The agreement files written in this pass."""
    payments: list[PaymentLine] = field(default_factory=list)
    receipts: list[PaymentReceipt] = field(default_factory=list)
    events: list[AccountEvent] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    biller_names: dict[str, str] = field(default_factory=dict)

    def name(self, biller_party_id: str) -> str:
        """What the household calls the biller."""
        return self.biller_names.get(biller_party_id) or biller_party_id

    @property
    def pending_approvals(self) -> list[ApprovalLine]:
        return [line for line in self.approvals if line.answer == "pending"]

    @property
    def exit_code(self) -> int:
        """The worst problem's code; else EXIT_APPROVALS_PENDING when the person has something to answer."""
        worst = max((problem.exit_code for problem in self.problems), default=EXIT_OK)
        if worst == EXIT_OK and self.pending_approvals:
            return EXIT_APPROVALS_PENDING
        return worst


def _stuck_status(state: IntentState) -> str:
    return "in doubt: check with the bank" if state is IntentState.SENDING else "refused"


def _stuck(line: PaymentLine, intent: Payment) -> PaymentLine:
    """The line of a payment the bot will not move on alone (in doubt, or refused instructions): what to do."""
    status = _stuck_status(intent.state)
    next_step = f"{payment_next_step(intent.state)} {payment_next_command(intent.state, intent.intent_id)}"
    return replace(line, status=status, bank_reference=intent.proof, next_step=next_step)


def _failed(line: PaymentLine, error: BaseException) -> PaymentLine:
    """The line of a payment that failed in this pass: in doubt when the bank's sender failed without saying
    whether it paid (never tried again: what to do), else failed (tried again by the next pass)."""
    if isinstance(error, PaymentInDoubt):
        next_step = payment_next_step(IntentState.SENDING)
        return replace(
            line,
            status=_stuck_status(IntentState.SENDING),
            next_step=f"{next_step} {payment_next_command(IntentState.SENDING, error.intent_id)}",
        )
    return replace(line, status="failed")


def _problem(biller: str, what: str, error: BaseException) -> Problem:
    """A failure, classified: unreachable (2), refused or unverifiable (1), anything else (1)."""
    if isinstance(error, CallError):
        if is_transient(error):
            return Problem(biller, what, f"{UNREACHABLE}: {error.code.name} {error.detail}", 2)
        return Problem(biller, what, f"the biller refused: {error.reason.name} {error.detail}", 1)
    if isinstance(error, ProtocolError):
        return Problem(biller, what, f"{error.reason.name}: {error.detail}", 1)
    return Problem(biller, what, str(error), 1)


# --- The household's bot ------------------------------------------------------------------------------------


@dataclass
class _Bill:
    """A verified bill and where its negotiation stands in the store."""

    biller_party_id: str
    bill: ReceivedBill
    thread_id: bytes | None
    outcome: ThreadOutcome | None
    resumable: bool
    renegotiate: bool = False  # its arrangement was broken and the biller offered to negotiate again


@dataclass
class _News:
    """What the account's events say about arrangements (EVT-7): a broken one is not paid any more, and one
    the biller offered to renegotiate is negotiated again."""

    broken: set[tuple[str, bytes]] = field(default_factory=set)  # (biller, thread id)
    offered: set[tuple[str, str, bytes]] = field(default_factory=set)  # (biller, bill id, thread id)

    def take(self, events: Sequence[AccountEvent]) -> None:
        for event in events:
            if event.kind == event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN and event.thread_id:
                self.broken.add((event.biller_party_id, event.thread_id))
            elif event.kind == event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED:
                self.offered.add((event.biller_party_id, event.bill_id, event.thread_id))

    def ended(self, biller: str, bill_id: str, thread_id: bytes) -> bool:
        """Whether the arrangement of this agreed thread no longer stands."""
        return (biller, thread_id) in self.broken or (biller, bill_id, thread_id) in self.offered

    def broken_without_offer(self, biller: str, bill_id: str, thread_id: bytes) -> bool:
        """Whether the biller ended this arrangement without offering to renegotiate the bill: its outstanding
        balance is then owed at once (PAY-16)."""
        return (biller, thread_id) in self.broken and (biller, bill_id, thread_id) not in self.offered


class Household:
    """The reference consumer for one household: a `ConsumerAgent` over the state directory.

    household = await Household.open(profile, Path("state"), clock=SystemClock())
    try:
        report = await household.run_pass()
    finally:
        await household.close()
    """

    def __init__(
        self,
        *,
        profile: Profile,
        state_dir: Path,
        agent: ConsumerAgent,
        store: SqliteConsumerStore,
        strategy: ReferenceStrategy,
        approvals: ApprovalBook,
        bank: PaymentSender,
        tls: dict[str, ClientTls | None],
        event_idle: float,
        outbox: Outbox,
        fingerprint: bytes = b"",
    ) -> None:
        self.profile = profile
        self.state_dir = state_dir
        self.agent = agent
        self.store = store
        self.strategy = strategy
        self.approvals = approvals
        """The durable requests for approval: list them and answer them by id (the app's side)."""
        self.outbox = outbox
        """The notifications to deliver; `Notifier` delivers them (see `run_household`)."""
        self.bank = bank
        self.fingerprint = fingerprint
        """The household's identity fingerprint (KEY-12): what a verifier of its agreements pins."""
        self._tls = tls
        self._event_idle = event_idle
        self._declined: set[tuple[str, str, bytes, int]] = set()
        """Instalments (biller, bill, agreement digest, index) the bank declined: this run does not retry them
        on its own (the person is told; the biller's scheduler reports them missed)."""
        self._watches: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._as_billed: dict[tuple[str, str], Terms] = {}
        """The bills this run decided to pay as billed (`Profile.pay_as_billed`), with the planned terms, until
        paid: the decision stands (its money committed in the strategy), whatever later plans would say."""
        self._event_cursors: dict[tuple[str, str], int] = {}
        """With `follow`: per (biller, account), the first event sequence no pass has reported yet."""

    @classmethod
    async def open(
        cls,
        profile: Profile,
        state_dir: Path,
        *,
        clock: Clock | None = None,
        approval: Approval = Approval.ASK,
        retry: RetryPolicy = DEFAULT_RETRY,
        event_idle: float = EVENT_IDLE_SECONDS,
        bank: PaymentSender | None = None,
        strategy: ReferenceStrategy | None = None,
        state_dir_named_by: str = "--state-dir",
    ) -> Household:
        """Load or create the identity, open the store and build the agent.

        `bank` defaults to `JsonLinesBank` in the state directory; `strategy` to the
        reference strategy over the fixed profile (give one whose profile follows the
        household's balance day by day, as `parley demo` does); `state_dir_named_by`
        is how the person chose the state directory, for the messages asking for another.

        ProfileError for a profile without a reachable biller, with an
        unreadable `ca_file` or an unusable client certificate (naming the
        key), plus `load_identity`'s errors.
        """
        clock = clock or SystemClock()
        if not profile.connected():
            raise ProfileError("billers", "no biller says how to reach it (target, fingerprint, account_id)")
        check_fingerprints(profile)
        tls = {preference.biller_id: _client_tls(preference) for preference in profile.connected()}
        client_certificate = _client_certificate(profile)
        key, chain = await asyncio.to_thread(
            load_identity, state_dir, profile.party_id, clock.now(), named_by=state_dir_named_by
        )
        store = await open_consumer_store(state_dir / STORE_FILE)
        strategy = strategy or ReferenceStrategy(profile)
        outbox = Outbox(store, profile.notifications, clock)

        async def tell_the_person(record: ApprovalRecord) -> None:
            await outbox.add(
                f"approval_needed:{record.request_id}", "approval_needed", _approval_notice(profile, record)
            )

        approvals = ApprovalBook(store, clock, standing_answer=_standing_answer(approval), on_new=tell_the_person)
        bank = bank or JsonLinesBank(state_dir / BANK_FILE, clock)
        try:
            agent = ConsumerAgent(
                party_id=profile.party_id,
                signing_key=key,
                key_sets=chain,
                store=store,
                strategy=strategy,
                mandate=agent_mandate(profile),
                approve=approvals,
                payment_sender=bank,
                clock=clock,
                retry=retry,
                client_certificate=client_certificate,
            )
        except BaseException:
            await store.close()
            raise
        return cls(
            profile=profile,
            state_dir=state_dir,
            agent=agent,
            store=store,
            strategy=strategy,
            approvals=approvals,
            bank=bank,
            tls=tls,
            event_idle=event_idle,
            outbox=outbox,
            fingerprint=chain.fingerprint,
        )

    async def close(self) -> None:
        await self.agent.close()  # ends the watches of `follow`: their streams close
        for watch in self._watches.values():
            try:
                await asyncio.wait_for(watch, STOP_GRACE_SECONDS)
            except (TimeoutError, asyncio.CancelledError):
                watch.cancel()
            except Exception:  # reported, never raised on the way out
                logger.warning("an event watch ended with an error", exc_info=True)
        await self.store.close()

    async def follow(self) -> None:
        """Watch every enrolled account in the background from now on, each event stored as it arrives
        (EVT-5); a pass then reads the events stored since the last one at once, instead of reading the
        stream until it has been quiet. For a process that runs many passes close together (`parley demo`).
        Events stored before this call are not reported again."""
        for link in await self.agent.links():
            for account in link.accounts:
                stored = await self.agent.stored_events(link.biller_party_id, account_id=account)
                self._event_cursors[(link.biller_party_id, account)] = stored[-1].sequence + 1 if stored else 0
                events = self.agent.watch(link.biller_party_id, account_id=account)
                self._watches[(link.biller_party_id, account)] = asyncio.create_task(
                    _keep_watching(events), name=f"watch {account}"
                )

    def watch_failure(self, biller: str, account: str) -> BaseException | None:
        """The error that ended the background watch of an account (`follow`), if one did."""
        watch = self._watches.get((biller, account))
        if watch is None or not watch.done() or watch.cancelled():
            return None
        return watch.exception()

    # --- One pass ----------------------------------------------------------------------------------

    async def run_pass(self) -> PassReport:
        """Enrol, fetch, plan, negotiate, pay, collect receipts and events once; see the module docstring."""
        today = self.agent.clock.now().date()
        report = PassReport(self.profile.party_id, today)
        report.biller_names = {b.biller_id: self.profile.biller_name(b.biller_id) for b in self.profile.billers}
        self.approvals.asked = []
        enrolled = await self._enrol_all(report)
        fetched, answering = await self._fetch_bills(enrolled, report)
        await self._read_events(answering, report)  # first the news, then act on it
        news = await self._news(answering)
        bills = [await self._state_of(biller, bill, news) for biller, bill in fetched]
        await self._negotiate(bills, today, report)
        await self._pay(answering, today, report, news)
        await self._collect_receipts(answering, report)
        acted = report.negotiations or any(p.status == "paid now" for p in report.payments)
        if acted or any(link.status == "enrolled now" for link in report.links):
            await self._read_events(answering, report)  # what this pass caused (ARRANGEMENT_ACTIVE...)
            news = await self._news(answering)
        for item in bills:  # a negotiation that ended leaves nothing to approve
            if item.thread_id is not None and not item.resumable:
                await self.approvals.lapse_open(item.biller_party_id, item.bill.facts.bill_id, "the negotiation ended")
        report.bills = [await self._bill_line(item, news) for item in bills]
        report.approvals = [ApprovalLine(request, _ANSWERS[state]) for request, state in self.approvals.asked]
        report.agreement_files = await self.write_agreement_files()
        await self._queue_notifications(fetched, report)
        await self._explain_unreachable(report)
        return report

    async def _explain_unreachable(self, report: PassReport) -> None:
        """Give the first "cannot be reached" problem of each biller its likely cause, when one is found (TLS
        against plaintext, a missing client certificate…: agent/transport/diagnosis.py), in profile words."""
        explained: set[str] = set()
        for index, problem in enumerate(report.problems):
            biller = problem.biller_party_id
            if biller in explained or not problem.detail.startswith(UNREACHABLE):
                continue
            explained.add(biller)
            preference = next((b for b in self.profile.billers if b.biller_id == biller), None)
            connection = None if preference is None else preference.connection
            if connection is None:
                continue
            hint = await asyncio.to_thread(
                connection_hint,
                connection.target,
                problem.detail,
                insecure=connection.insecure,
                client_certificate=self.profile.client_certificate is not None,
                remedies=profile_remedies(biller),
            )
            if hint is not None:
                report.problems[index] = replace(problem, detail=f"{problem.detail}; hint: {hint}")

    # --- The household's proof and news --------------------------------------------------------------

    async def agreements(self) -> list[tuple[str, str, bytes]]:
        """(biller, bill id, thread id) of every agreement that reached the biller, oldest first per bill."""
        return await agreements_reached(self.agent, self.store)

    async def write_agreement_files(self) -> list[Path]:
        """Write each agreement reached as a `parley-bundle/1` file, once (BND-7); the files written now."""
        return await write_agreement_files(self.agent, self.store, self.state_dir)

    async def _queue_notifications(self, fetched: Sequence[tuple[str, ReceivedBill]], report: PassReport) -> None:
        """Queue the news of this pass, by ids that make a repeat a no-op (a restart or a new pass loses
        nothing and repeats nothing): new bills, agreements, payments made, reminders, missed instalments."""
        outbox, profile = self.outbox, self.profile
        if not profile.notifications.enabled:
            return
        for biller, bill in fetched:
            facts = bill.facts
            await outbox.add(
                f"new_bill:{_short_id(biller, facts.bill_id)}",
                "new_bill",
                {
                    "title": f"New bill from {profile.biller_name(biller)}: {facts.amount_due} due {facts.due_date}",
                    "biller": biller,
                    "biller_name": profile.biller_name(biller),
                    "bill_id": facts.bill_id,
                    "amount": money_document(facts.amount_due),
                    "due_date": facts.due_date.isoformat(),
                },
            )
        for biller, bill_id, thread_id in await self.agreements():
            result = await self.agent.negotiation(thread_id)
            assert result.agreement is not None
            terms = result.agreement.terms
            await outbox.add(
                f"agreement:{thread_id.hex()}",
                "agreement",
                {
                    "title": f"Agreed with {profile.biller_name(biller)}: {describe_terms(terms)}",
                    "biller": biller,
                    "biller_name": profile.biller_name(biller),
                    "bill_id": bill_id,
                    "terms": describe_terms(terms),
                    "file": str(agreement_file(self.state_dir, biller, bill_id, thread_id)),
                },
            )
        for payment in await self.agent.payments():
            if payment.state is not IntentState.PAID:
                continue
            biller = payment.biller_party_id
            await outbox.add(
                f"payment:{_short_id(biller, payment.intent_id)}",
                "payment",
                {
                    "title": f"Paid {payment.amount} to {profile.biller_name(biller)} for bill {payment.bill_id}",
                    "biller": biller,
                    "biller_name": profile.biller_name(biller),
                    "bill_id": payment.bill_id,
                    "amount": money_document(payment.amount),
                    "bank_reference": payment.proof,
                },
            )
        kinds = {event_pb2.EVENT_KIND_REMINDER: "reminder", event_pb2.EVENT_KIND_INSTALMENT_MISSED: "missed_instalment"}
        for event in report.events:
            kind = kinds.get(event.kind)
            if kind is None:
                continue
            biller = event.biller_party_id
            await outbox.add(
                f"{kind}:{_short_id(biller, event.account_id, str(event.sequence))}",
                kind,
                {
                    "title": f"{profile.biller_name(biller)}: {event_words(event.kind)} about bill {event.bill_id}",
                    "biller": biller,
                    "biller_name": profile.biller_name(biller),
                    "bill_id": event.bill_id,
                    "message": event.message,
                    "amount": None if event.amount is None else money_document(event.amount),
                    "date": None if event.date is None else event.date.isoformat(),
                },
            )

    async def _enrol_all(self, report: PassReport) -> list[BillerPreference]:
        """Enrol where not enrolled yet; the billers that can be used in this pass."""
        links = {link.biller_party_id: link for link in await self.agent.links()}
        usable = []
        for preference in self.profile.connected():
            biller, connection = preference.biller_id, preference.connection
            assert connection is not None
            link = links.get(biller)
            if link is not None and link.fingerprint != connection.fingerprint:
                report.problems.append(
                    Problem(
                        biller,
                        f'billers."{biller}".fingerprint',
                        f"{connection.fingerprint.hex()} is not the identity pinned at enrolment "
                        f"({link.fingerprint.hex()}); a biller's pin never changes (KEY-12)",
                        EXIT_UNUSABLE,
                    )
                )
                continue
            if link is not None and connection.account_id in link.accounts:
                if link.target != connection.target:
                    report.problems.append(
                        Problem(
                            biller,
                            "target",
                            f"the profile says {connection.target}; the enrolled link uses {link.target}",
                            EXIT_OK,
                        )
                    )
                report.links.append(LinkLine(biller, connection.account_id, link.target, "enrolled"))
                usable.append(preference)
                continue
            if connection.code is None:
                report.problems.append(
                    Problem(
                        biller,
                        f'billers."{biller}".code',
                        f"missing: account {connection.account_id} is not enrolled yet and needs its one-time code",
                        EXIT_UNUSABLE,
                    )
                )
                continue
            try:
                await self.agent.enrol(
                    connection.target,
                    biller_party_id=biller,
                    fingerprint=connection.fingerprint,
                    account_id=connection.account_id,
                    code=connection.code,
                    tls=self._tls[biller],
                    insecure=connection.insecure,
                )
            except (ParleyError, ValueError, LookupError) as error:
                report.problems.append(_problem(biller, "enrolment", error))
                report.links.append(LinkLine(biller, connection.account_id, connection.target, "not enrolled"))
                continue
            report.links.append(LinkLine(biller, connection.account_id, connection.target, "enrolled now"))
            usable.append(preference)
        return usable

    async def _fetch_bills(
        self, billers: Sequence[BillerPreference], report: PassReport
    ) -> tuple[list[tuple[str, ReceivedBill]], list[BillerPreference]]:
        """The verified bills of every enrolled account, and the billers that answered."""
        found: list[tuple[str, ReceivedBill]] = []
        answering = []
        for preference in billers:
            biller, connection = preference.biller_id, preference.connection
            assert connection is not None
            try:
                bills = await self.agent.bills(biller, account_id=connection.account_id)
            except (ParleyError, ValueError, LookupError) as error:
                report.problems.append(_problem(biller, "bills", error))
                continue
            answering.append(preference)
            found.extend((biller, bill) for bill in bills)
        return found, answering

    async def _news(self, billers: Sequence[BillerPreference]) -> _News:
        news = _News()
        for preference in billers:
            assert preference.connection is not None
            news.take(await self.agent.stored_events(preference.biller_id, account_id=preference.connection.account_id))
        return news

    async def _state_of(self, biller: str, bill: ReceivedBill, news: _News) -> _Bill:
        bill_id = bill.facts.bill_id
        threads = [t for t in await self.store.threads(biller, bill_id) if t.messages]
        if not threads:  # no thread, or only openings the biller refused
            return _Bill(biller, bill, None, None, False)
        latest = threads[-1]
        resumable = latest.outcome is ThreadOutcome.OPEN or latest.awaiting_answer
        offered = (biller, bill_id, latest.thread_id) in news.offered
        if latest.outcome is ThreadOutcome.AGREED and not resumable and offered:
            try:  # negotiated again, as a new bill for what is still owed (TRM-11, PAY-16)
                owed = await self.agent.owed(biller, bill_id)
            except ValueError:  # nothing owed any more (its balance paid), or a payment in doubt: `_pay` says
                return _Bill(biller, bill, latest.thread_id, latest.outcome, resumable)
            return _Bill(biller, replace(bill, facts=owed), None, None, False, renegotiate=True)
        return _Bill(biller, bill, latest.thread_id, latest.outcome, resumable)

    async def _negotiate(self, bills: list[_Bill], today: date, report: PassReport) -> None:
        """Resume open threads first, then open threads on the new bills in the shared budget's order."""
        strategy = self.strategy
        for biller, bill in strategy.pending():  # each pass plans afresh, from the store
            strategy.forget(biller, bill.bill_id)
        for item in bills:
            if item.resumable:
                self._settle(item, await self._negotiate_one(item, report))
        as_billed = await self._bills_with_own_payment()
        new: dict[tuple[str, str], _Bill] = {}
        for item in bills:
            key = (item.biller_party_id, item.bill.facts.bill_id)
            if item.thread_id is not None or key in as_billed or key in self._as_billed:
                continue
            currency = item.bill.facts.amount_due.currency.code
            if currency != self.profile.currency:
                report.problems.append(
                    Problem(
                        item.biller_party_id,
                        f"bill {item.bill.facts.bill_id}",
                        f"it is in {currency}; the household's budget is in {self.profile.currency}",
                        EXIT_FAILED,
                    )
                )
                continue
            new[(item.biller_party_id, item.bill.facts.bill_id)] = item
            strategy.consider(item.biller_party_id, item.bill.facts)
        if not new:
            return
        report.plan = strategy.plan(today, await self.agent.committed())
        for planned in report.plan:
            item_or_none = new.get((planned.biller_id, planned.bill.bill_id))
            if item_or_none is None:  # the others are threads still open, already resumed above
                continue
            if self.profile.pay_as_billed and planned.opening.pays_as_billed:
                # Nothing to negotiate: `_pay` pays the bill on the planned date; until then its money is
                # committed, so the bills planned after it leave room for it.
                terms = planned.opening.terms
                strategy.commit(planned.biller_id, planned.bill.bill_id, terms.schedule)
                self._as_billed[(planned.biller_id, planned.bill.bill_id)] = terms
                continue
            self._settle(item_or_none, await self._negotiate_one(item_or_none, report))

    async def _bills_with_own_payment(self) -> set[tuple[str, str]]:
        """(biller, bill id) of the bills with a payment intent of their own, outside any agreement (made,
        declined or in doubt): decided already, never planned again."""
        return {(p.biller_party_id, p.bill_id) for p in await self.agent.payments() if not p.agreement_digest}

    def _settle(self, item: _Bill, result: NegotiationResult | None) -> None:
        """A bill leaves the shared budget plan once decided: agreed (the agent then counts its instalments),
        ended, or its opening declined. While it waits for approval or for the biller, or failed, its planned
        payments keep their place, so the bills after it leave room for them (`plan_budget`)."""
        if result is not None and result.outcome is not ThreadOutcome.OPEN:
            self.strategy.forget(item.biller_party_id, item.bill.facts.bill_id)

    async def _negotiate_one(self, item: _Bill, report: PassReport) -> NegotiationResult | None:
        biller, bill_id = item.biller_party_id, item.bill.facts.bill_id
        asked_before = len(self.approvals.asked)
        try:
            result = await self.agent.negotiate(biller, bill_id)
        except ApprovalPending as pending:
            what = {"open": "opening", "counter": "counter-offer", "accept": "acceptance"}[pending.request.action]
            note = f"{what}: not sent; answer with `parley consumer approve {pending.request.request_id}`"
            report.negotiations.append(
                NegotiationLine(biller, bill_id, "awaiting your approval", pending.request.terms, note)
            )
            return None
        except (ParleyError, ValueError, LookupError) as error:
            report.problems.append(_problem(biller, f"negotiation on {bill_id}", error))
            return None
        asked = self.approvals.asked[asked_before:]
        await self.approvals.mark_sent([request for request, state in asked if state is ApprovalState.APPROVED])
        await self.approvals.lapse_open(biller, bill_id, "the negotiation moved on")
        terms = result.agreement.terms if result.agreement is not None else None
        if result.outcome is None:
            line = NegotiationLine(biller, bill_id, "not opened", None, "you declined the opening")
        elif result.outcome is ThreadOutcome.OPEN:
            why = result.refusal
            note = f"the biller refused our move: {why.reason.name} {why.detail}" if why is not None else "open"
            line = NegotiationLine(biller, bill_id, "open", None, note)
        else:
            note = ""
            if result.violation is not None:
                note = f"the biller broke {result.violation.reason.name}: {result.violation.detail}"
            line = NegotiationLine(biller, bill_id, result.outcome.value, terms, note)
        report.negotiations.append(line)
        return result

    async def _agreement(self, biller: str, bill_id: str) -> tuple[Terms, bytes, bytes] | None:
        """The terms, agreement digest and thread of the latest agreement on a bill that reached the biller."""
        agreed = await self.store.threads(biller, bill_id, ThreadOutcome.AGREED)
        if not agreed or agreed[-1].awaiting_answer:
            return None
        result = await self.agent.negotiation(agreed[-1].thread_id)
        assert result.agreement is not None
        return result.agreement.terms, result.agreement.accept.digest, agreed[-1].thread_id

    async def _pay(self, billers: Sequence[BillerPreference], today: date, report: PassReport, news: _News) -> None:
        """Pay every instalment due on or before today that is not paid yet, in order, of every arrangement
        that still stands."""
        for preference in billers:
            biller = preference.biller_id
            for (payee, bill_id), terms in list(self._as_billed.items()):
                if payee == biller:
                    await self._pay_as_billed(biller, bill_id, terms, today, report)
            intents = await self.agent.payments(biller)
            bill_ids = list(dict.fromkeys(record.bill_id for record in await self.store.list_bills(biller)))
            for bill_id in bill_ids:
                agreement = await self._agreement(biller, bill_id)
                if agreement is None:
                    continue
                if news.ended(biller, bill_id, agreement[2]):
                    if news.broken_without_offer(biller, bill_id, agreement[2]):
                        await self._pay_outstanding(biller, bill_id, today, report)
                    continue
                terms, agreement_digest, _ = agreement
                mine = {  # lapsed or set-aside intents are history: the instalment's live intent, if any, stands
                    p.instalment_index: p for p in intents if p.agreement_digest == agreement_digest and p.holds_payment
                }
                count = len(terms.schedule)
                for index, instalment in enumerate(terms.schedule):
                    before = mine.get(index)
                    if before is not None and before.state is IntentState.PAID:
                        continue
                    line = PaymentLine(
                        biller, bill_id, index + 1, count, instalment.due_date, str(instalment.amount), ""
                    )
                    if before is not None and before.state in (IntentState.SENDING, IntentState.REFUSED):
                        report.payments.append(_stuck(line, before))
                        continue
                    if instalment.due_date > today:
                        report.payments.append(replace(line, status="scheduled"))
                        continue
                    attempt = (biller, bill_id, agreement_digest, index)
                    if attempt in self._declined:
                        report.payments.append(replace(line, status=DECLINED_EARLIER))
                        break  # the next instalment waits for this one
                    try:
                        payment = await self.agent.pay(biller, bill_id, instalment_index=index)
                    except PaymentNotSent as declined:
                        self._declined.add(attempt)
                        report.payments.append(replace(line, status=DECLINED_NOW, note=str(declined)))
                        break
                    except (ParleyError, ValueError, LookupError) as error:  # a payment in doubt is a ParleyError too
                        report.problems.append(_problem(biller, f"payment of {bill_id} #{index + 1}", error))
                        report.payments.append(_failed(line, error))
                        break  # the next instalment waits for this one
                    report.payments.append(replace(line, status="paid now", bank_reference=payment.proof))

    async def _pay_outstanding(self, biller: str, bill_id: str, today: date, report: PassReport) -> None:
        """The biller ended the arrangement on the bill without offering to renegotiate it (EVT-7): what is owed
        now is the bill's outstanding balance (PAY-16), due at once — its amount due less what we already paid
        of it, never the whole amount again nor the broken plan's instalments. Paid once (PAY-7): a later pass
        reports the payment, and a renegotiation offered after it finds nothing owed."""
        own = [
            p
            for p in await self.agent.payments(biller)
            if p.bill_id == bill_id and not p.agreement_digest and p.holds_payment
        ]  # a lapsed or set-aside intent paid nothing and fixes no amount: the balance is owed afresh (PAY-16, PAY-17)
        before = own[-1] if own else None
        if before is not None and before.state is IntentState.PAID:
            return  # paid by an earlier pass: nothing is owed on it any more
        if before is not None and before.state in (IntentState.SENDING, IntentState.REFUSED):
            line = PaymentLine(biller, bill_id, 1, 1, today, str(before.amount), "", note=OUTSTANDING_NOTE)
            report.payments.append(_stuck(line, before))
            return
        attempt = (biller, bill_id, b"", 0)
        try:
            owed = before.amount if before is not None else (await self.agent.owed(biller, bill_id)).outstanding
        except ValueError as error:  # nothing owed any more
            report.problems.append(_problem(biller, f"payment of {bill_id}", error))
            return
        line = PaymentLine(biller, bill_id, 1, 1, today, str(owed), "", note=OUTSTANDING_NOTE)
        if attempt in self._declined:
            report.payments.append(replace(line, status=DECLINED_EARLIER))
            return
        try:
            payment = await self.agent.pay(biller, bill_id)
        except PaymentNotSent as declined:
            self._declined.add(attempt)
            report.payments.append(replace(line, status=DECLINED_NOW, note=str(declined)))
            return
        except (ParleyError, ValueError, LookupError) as error:  # tried again by the next pass, unless in doubt
            report.problems.append(_problem(biller, f"payment of {bill_id}", error))
            report.payments.append(_failed(line, error))
            return
        report.payments.append(
            replace(line, amount=str(payment.amount), status="paid now", bank_reference=payment.proof)
        )

    async def _pay_as_billed(self, biller: str, bill_id: str, terms: Terms, today: date, report: PassReport) -> None:
        """Pay a bill planned to be paid as billed (no agreement) once its planned date has come."""
        when = terms.schedule[0].due_date
        line = PaymentLine(biller, bill_id, 1, 1, when, str(terms.total), "scheduled")
        if when > today:
            report.payments.append(line)
            return
        try:
            payment = await self.agent.pay(biller, bill_id)
        except PaymentNotSent as declined:  # its intent now exists: the bill is not planned again on its own
            self._paid_or_declined(biller, bill_id)
            report.payments.append(replace(line, status=DECLINED_NOW, note=str(declined)))
            return
        except (ParleyError, ValueError, LookupError) as error:  # tried again by the next pass, unless in doubt
            report.problems.append(_problem(biller, f"payment of {bill_id}", error))
            report.payments.append(_failed(line, error))
            return
        self._paid_or_declined(biller, bill_id)
        report.payments.append(replace(line, status="paid now", bank_reference=payment.proof))

    def _paid_or_declined(self, biller: str, bill_id: str) -> None:
        """A bill paid as billed left the plan: paid, its money left the balance; declined, the person decides."""
        del self._as_billed[(biller, bill_id)]
        self.strategy.forget(biller, bill_id)

    async def _collect_receipts(self, billers: Sequence[BillerPreference], report: PassReport) -> None:
        """Fetch the receipts of paid intents that have none yet (PAY-9)."""
        for preference in billers:
            biller = preference.biller_id
            payments: list[Payment] = await self.agent.payments(biller)
            for payment in payments:
                if payment.state is not IntentState.PAID:
                    continue
                if await self.store.get_receipt(biller, payment.intent_id) is not None:
                    continue
                try:
                    receipt = await self.agent.receipt(biller, payment.intent_id)
                except PaymentDispute as dispute:
                    report.receipts.append(dispute.receipt)
                    report.problems.append(_problem(biller, f"receipt of {payment.bill_id}", dispute))
                    continue
                except (ParleyError, ValueError, LookupError) as error:
                    report.problems.append(_problem(biller, f"receipt of {payment.bill_id}", error))
                    continue
                if receipt is not None:
                    report.receipts.append(receipt)
                    for position, line in enumerate(report.payments):
                        if line.biller_party_id == biller and line.bank_reference == payment.proof:
                            report.payments[position] = replace(line, receipt=str(receipt.amount_received))

    async def _read_events(self, billers: Sequence[BillerPreference], report: PassReport) -> None:
        """The events that arrived since the last pass: read from the live stream until it is quiet (EVT-5),
        or, with `follow`, those its background watches stored since."""
        for preference in billers:
            biller, connection = preference.biller_id, preference.connection
            assert connection is not None
            account = connection.account_id
            if (biller, account) in self._watches:
                await self._read_followed(biller, account, report)
                continue
            stored = await self.agent.stored_events(biller, account_id=account)
            start = stored[-1].sequence + 1 if stored else 0
            stream = self.agent.watch(biller, account_id=account)
            try:
                while True:
                    await asyncio.wait_for(anext(stream), self._event_idle)
            except (TimeoutError, StopAsyncIteration):
                pass  # quiet: caught up
            except (ParleyError, ValueError, LookupError) as error:
                report.problems.append(_problem(biller, "events", error))
            finally:
                await stream.aclose()
            # Whatever the stream stored, even an event taken as the wait ended, is in the store.
            report.events.extend(await self.agent.stored_events(biller, account_id=account, start=start))

    async def _read_followed(self, biller: str, account: str, report: PassReport) -> None:
        failure = self.watch_failure(biller, account)
        if failure is not None:
            report.problems.append(_problem(biller, "events", failure))
        start = self._event_cursors.get((biller, account), 0)
        events = await self.agent.stored_events(biller, account_id=account, start=start)
        if events:
            self._event_cursors[(biller, account)] = events[-1].sequence + 1
        report.events.extend(events)

    async def _bill_line(self, item: _Bill, news: _News) -> BillLine:
        """Where a bill stands now, in words."""
        biller, facts = item.biller_party_id, item.bill.facts
        latest = await self._state_of(biller, item.bill, news)
        agreement = await self._agreement(biller, facts.bill_id)
        if agreement is not None and latest.outcome is ThreadOutcome.AGREED:
            terms, agreement_digest, thread_id = agreement
            if news.broken_without_offer(biller, facts.bill_id, thread_id):
                own = [p for p in await self.agent.payments(biller) if p.bill_id == facts.bill_id]
                settled = any(not p.agreement_digest and p.state is IntentState.PAID for p in own)
                return BillLine(biller, facts, f"arrangement ended: outstanding balance {'paid' if settled else 'due'}")
            if news.ended(biller, facts.bill_id, thread_id):
                return BillLine(biller, facts, "arrangement ended: waiting for the biller's offer to renegotiate")
            paid = sum(
                1
                for p in await self.agent.payments(biller)
                if p.agreement_digest == agreement_digest and p.state is IntentState.PAID
            )
            status = "paid" if paid == len(terms.schedule) else f"agreed, {paid}/{len(terms.schedule)} paid"
            return BillLine(biller, facts, status)
        answers = {
            _ANSWERS[state]
            for request, state in self.approvals.asked
            if (request.biller_party_id, request.bill.bill_id) == (biller, facts.bill_id)
        }
        first = "arrangement ended, to renegotiate" if latest.renegotiate else "new"
        planned = self._as_billed.get((biller, facts.bill_id))
        if latest.outcome is None and planned is not None:
            return BillLine(biller, facts, f"to pay as billed on {planned.schedule[0].due_date}")
        own = [p for p in await self.agent.payments(biller) if p.bill_id == facts.bill_id and not p.agreement_digest]
        if latest.outcome is None and own:
            paid = own[-1].state is IntentState.PAID
            return BillLine(biller, facts, "paid as billed" if paid else f"paying as billed: {own[-1].state.value}")
        if latest.outcome is None:
            if "pending" in answers:
                return BillLine(biller, facts, f"{first}: awaiting your approval")
            return BillLine(biller, facts, f"{first}: you declined the opening" if "declined" in answers else first)
        if latest.resumable:
            pending = "pending" in answers
            return BillLine(biller, facts, "negotiating, awaiting your approval" if pending else "negotiating")
        return BillLine(biller, facts, f"{latest.outcome.value}: no arrangement")


async def _keep_watching(stream: AsyncGenerator[AccountEvent, None]) -> None:
    async with contextlib.aclosing(stream) as events:
        async for _ in events:
            pass  # the agent stores each event before it yields it: a pass reads them from the store


_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def _read_pem(path: Path, key: str, marker: bytes, what: str) -> bytes:
    """The PEM file at `path`; ProfileError naming `key` if it cannot be read or holds no `marker` (`what`)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ProfileError(key, f"cannot read {path}: {error.strerror}") from None
    if marker not in data:
        raise ProfileError(key, f"{path} holds no PEM {what}")
    return data


def _client_certificate(profile: Profile) -> tuple[bytes, bytes] | None:
    """The household's TLS client certificate and key (PEM), or None; the key must be private to its owner."""
    files = profile.client_certificate
    if files is None:
        return None
    chain = _read_pem(files.certificate, "household.client_certificate", _PEM_CERTIFICATE, "certificate")
    with contextlib.suppress(OSError):  # an unreadable file is reported by the read below
        if files.key.stat().st_mode & 0o077:
            raise ProfileError("household.client_key", f"{files.key} is readable by group or others: chmod 600 it")
    private_key = _read_pem(files.key, "household.client_key", b"PRIVATE KEY-----", "private key")
    return chain, private_key


def profile_remedies(biller: str) -> Remedies:
    """How a household fixes a transport mismatch with `biller`: in its profile's words."""
    table = f'[billers."{biller}"]'
    return Remedies(
        to_plaintext=f"set insecure = true in {table} (loopback only, TRN-3)",
        to_tls=f"remove insecure = true from {table}, and give the CA of its certificate as ca_file there",
        trust=f"give the CA that issued its certificate as ca_file in {table}",
        client_certificate="give one as household.client_certificate and household.client_key in the profile",
    )


def _client_tls(preference: BillerPreference) -> ClientTls | None:
    """The TLS settings of a biller's connection; ProfileError naming ca_file if it cannot be read."""
    connection = preference.connection
    assert connection is not None
    if connection.insecure:
        return None
    roots = None
    if connection.ca_file is not None:
        key = f'billers."{preference.biller_id}".ca_file'
        roots = _read_pem(connection.ca_file, key, _PEM_CERTIFICATE, "certificate")
    return ClientTls(roots, connection.server_name)


# --- The summary ------------------------------------------------------------------------------------------


def _clean(text: str) -> Text:
    """Text from a biller (signed, but not ours): shown literally, without markup or control characters."""
    return Text("".join(c if c.isprintable() else " " for c in text))


def _short_id(*parts: str) -> str:
    """A short stable id for a notification about these things (no separator can make two collide)."""
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode()
        hasher.update(len(data).to_bytes(4, "big") + data)
    return hasher.hexdigest()[:16]


def _approval_notice(profile: Profile, record: ApprovalRecord) -> dict[str, object]:
    terms = Terms.from_proto(terms_pb2.Terms.FromString(record.terms))
    name = profile.biller_name(record.biller_party_id)
    return {
        "title": f"{name}: your approval is needed to {ACTION_WORDS[record.action]} {describe_terms(terms)}",
        "approval_id": record.request_id,
        "biller": record.biller_party_id,
        "biller_name": name,
        "bill_id": record.bill_id,
        "terms": describe_terms(terms),
        "why": list(record.violations) + ([record.reason] if record.reason else []),
    }


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


async def agreements_reached(agent: ConsumerAgent, store: SqliteConsumerStore) -> list[tuple[str, str, bytes]]:
    """(biller, bill id, thread id) of every agreement that reached the biller, oldest first per bill."""
    found = []
    for link in await agent.links():
        bill_ids = dict.fromkeys(record.bill_id for record in await store.list_bills(link.biller_party_id))
        for bill_id in bill_ids:
            for thread in await store.threads(link.biller_party_id, bill_id, ThreadOutcome.AGREED):
                if not thread.awaiting_answer:
                    found.append((link.biller_party_id, bill_id, thread.thread_id))
    return found


async def write_agreement_files(agent: ConsumerAgent, store: SqliteConsumerStore, state_dir: Path) -> list[Path]:
    """Write each agreement reached as a `parley-bundle/1` file under `state_dir`, once; the files written now.
    Reads the store only (the bundle is the stored chains, bill and thread, BND-7)."""
    written = []
    for biller, bill_id, thread_id in await agreements_reached(agent, store):
        path = agreement_file(state_dir, biller, bill_id, thread_id)
        if path.exists():
            continue
        bundle = await agent.export_bundle(thread_id)
        await asyncio.to_thread(write_private, path, _bundle_text(bundle))
        written.append(path)
    return written


def agreement_file(state_dir: Path, biller: str, bill_id: str, thread_id: bytes) -> Path:
    """Where the agreement of a thread is kept: `agreements/<biller>_<bill>_<thread>.parley-bundle.json`."""
    name = f"{_SAFE_NAME.sub('-', biller)}_{_SAFE_NAME.sub('-', bill_id)[:80]}_{thread_id.hex()[:16]}"
    return state_dir / AGREEMENTS_DIR / f"{name}.parley-bundle.json"


def _bundle_text(bundle: Bundle) -> str:
    return json.dumps(bundle.to_json(), indent=2, sort_keys=True) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write a file atomically, readable by its owner only (the household's papers)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


_SHORT_COLUMNS = frozenset({"#", "amount", "due", "date", "status", "outcome", "received", "remaining", "answer"})


def _table(title: str, *columns: str) -> Table:
    """A summary table; the short columns never wrap, so the long ones (terms, messages) take the width."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        short = column in _SHORT_COLUMNS
        table.add_column(column, no_wrap=short, overflow="ellipsis" if short else "fold")
    return table


def render(report: PassReport, out: Console) -> None:
    """The pass as readable tables, in biller names and plain words."""
    name = report.name
    out.print(
        f"[bold]parley consumer[/bold] {report.party_id} — {report.today.isoformat()}", highlight=False, soft_wrap=True
    )
    links = _table("Billers", "biller", "account", "endpoint", "status")
    for link in report.links:
        links.add_row(name(link.biller_party_id), link.account_id, link.target, link.status)
    out.print(links)
    if report.bills:
        bills = _table("Bills", "biller", "bill", "amount", "due", "description", "status")
        for bill in report.bills:
            facts = bill.bill
            bills.add_row(
                name(bill.biller_party_id),
                _clean(facts.bill_id),
                str(facts.amount_due),
                facts.due_date.isoformat(),
                _clean(facts.description),
                bill.status,
            )
        out.print(bills)
    if report.plan:
        plan = _table("Budget plan (priority order)", "biller", "bill", "we would propose", "affordable", "mandate")
        for planned in report.plan:
            opening = planned.opening
            plan.add_row(
                name(planned.biller_id),
                _clean(planned.bill.bill_id),
                describe_terms(opening.terms),
                "yes" if opening.affordable else "NO",
                "inside your limits" if not opening.violations else "needs your approval",
            )
        out.print(plan)
    if report.negotiations:
        negotiations = _table("Negotiations", "biller", "bill", "outcome", "terms", "note")
        for negotiation in report.negotiations:
            terms = describe_terms(negotiation.terms) if negotiation.terms is not None else ""
            negotiations.add_row(
                name(negotiation.biller_party_id),
                _clean(negotiation.bill_id),
                negotiation.outcome,
                terms,
                _clean(negotiation.note),
            )
        out.print(negotiations)
    if report.approvals:
        approvals = _table("Approvals (outside your mandate)", "id", "biller", "bill", "to", "terms", "why", "answer")
        for record in report.approvals:
            request = record.request
            why = "; ".join([*request.violations, *([request.reason] if request.reason else [])])
            approvals.add_row(
                request.request_id,
                name(request.biller_party_id),
                _clean(request.bill.bill_id),
                ACTION_WORDS[request.action],
                describe_terms(request.terms),
                _clean(why),
                record.answer,
            )
        out.print(approvals)
        if report.pending_approvals:
            out.print(
                "Nothing outside your mandate was sent. To answer: parley consumer approve ID (or decline ID "
                "--reason TEXT) with the same --state-dir; the next run sends exactly the approved terms. "
                "Unattended runs may use --approve-all or --deny-all.",
                highlight=False,
                soft_wrap=True,
            )
    if report.payments:
        payments = _table("Payments", "biller", "bill", "#", "due", "amount", "status", "bank ref", "receipt")
        for line in report.payments:
            payments.add_row(
                name(line.biller_party_id),
                _clean(line.bill_id),
                f"{line.instalment} of {line.of}",
                line.due.isoformat(),
                line.amount,
                f"{line.status}: {line.note}" if line.note else line.status,
                line.bank_reference,
                line.receipt,
            )
        out.print(payments)
        for line in report.payments:
            if line.next_step:
                where = f"{name(line.biller_party_id)}, bill {_clean(line.bill_id)} #{line.instalment}"
                out.print(f"{where}: {line.next_step}", highlight=False, soft_wrap=True)
    if report.receipts:
        receipts = _table("Receipts", "biller", "payment", "received", "still owed", "settled", "status")
        for receipt in report.receipts:
            remaining = str(receipt.remaining_balance) if receipt.remaining_balance is not None else ""
            receipts.add_row(
                name(receipt.biller_party_id),
                receipt.intent_id,
                str(receipt.amount_received),
                remaining,
                receipt.settle_time.isoformat(timespec="seconds"),
                _clean(f"DISPUTED: {receipt.dispute}") if receipt.dispute else Text("verified"),
            )
        out.print(receipts)
    if report.events:
        events = _table("News from your billers", "biller", "#", "what", "bill", "amount", "date", "message")
        for event in report.events:
            events.add_row(
                name(event.biller_party_id),
                str(event.sequence),
                event_words(event.kind),
                _clean(event.bill_id),
                str(event.amount) if event.amount is not None else "",
                event.date.isoformat() if event.date is not None else "",
                _clean(event.message),
            )
        out.print(events)
    for path in report.agreement_files:
        out.print(Text(f"agreement kept: {path}"), soft_wrap=True)
    for problem in report.problems:
        colour = "yellow" if problem.exit_code == EXIT_OK else "red"
        label = Text(f"{name(problem.biller_party_id)} — {problem.what}: ", style=f"bold {colour}")
        out.print(label + _clean(problem.detail), soft_wrap=True)


# --- Running ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    state_dir: Path
    once: bool = False
    interval: float = DEFAULT_INTERVAL
    approval: Approval = Approval.ASK
    event_idle: float = EVENT_IDLE_SECONDS
    retry: RetryPolicy = DEFAULT_RETRY
    state_dir_named_by: str = "--state-dir"
    """How the person chose `state_dir` (--state-dir, PARLEY_STATE_DIR), for the messages asking for another."""


async def run_household(
    profile: Profile,
    options: RunOptions,
    out: Console,
    *,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
    on_report: Callable[[PassReport], None] | None = None,
    wake: asyncio.Event | None = None,
) -> int:
    """One pass (`options.once`), or a pass every `options.interval` seconds until `stop` is set or the
    process gets SIGINT/SIGTERM (handlers are installed when running in the main thread). Setting `wake`
    starts the next pass at once (the web page after a person approved). Returns the exit status; raises
    what `Household.open` raises."""
    household = await Household.open(
        profile,
        options.state_dir,
        clock=clock,
        approval=options.approval,
        retry=options.retry,
        event_idle=options.event_idle,
        state_dir_named_by=options.state_dir_named_by,
    )
    if stop is None:
        stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = [] if options.once or threading.current_thread() is not threading.main_thread() else _SIGNALS
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier(household.store, profile.notifications, household.agent.clock)
    notifying: asyncio.Task[None] | None = None
    try:
        if options.once:
            report = await household.run_pass()
            render(report, out)
            if on_report is not None:
                on_report(report)
            if profile.notifications.enabled:  # one delivery round, bounded; what fails waits in the outbox
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(notifier.deliver_due(), NOTIFY_ONCE_SECONDS)
            return report.exit_code
        if profile.notifications.enabled:  # its own task: a slow receiver never holds a pass up
            notifying = asyncio.create_task(notifier.run(stop, household.outbox.wake))
        while not stop.is_set():
            report_or_none = await _pass_until_stopped(household, stop, out)
            if report_or_none is not None:
                render(report_or_none, out)
                if on_report is not None:
                    on_report(report_or_none)
            await _rest(stop, wake, options.interval)
        out.print("stopped", highlight=False)
        return EXIT_OK
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        if notifying is not None:
            notifying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await notifying
        await household.close()


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _rest(stop: asyncio.Event, wake: asyncio.Event | None, seconds: float) -> None:
    """Wait between passes: `seconds`, or less if the loop is stopped or woken (the wake is then used up)."""
    waiters = {asyncio.ensure_future(event.wait()) for event in (stop, wake) if event is not None}
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if wake is not None:
        wake.clear()


async def _pass_until_stopped(household: Household, stop: asyncio.Event, out: Console) -> PassReport | None:
    """One pass of a loop; a signal lets it finish for STOP_GRACE_SECONDS, then cancels it."""
    task = asyncio.create_task(household.run_pass())
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            out.print("stopping: finishing this pass", highlight=False)
            await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        try:
            return task.result()
        except Exception as error:  # a loop survives a failed pass; the next one tries again
            logger.exception("the pass failed")
            out.print(Text(f"the pass failed: {error}", style="red"), soft_wrap=True)
            return None
    finally:
        waiter.cancel()


FROM_ENV_PARTY_ID = "consumer:conformance-household"
_FROM_ENV_KEYS = {  # where each key of the generated profile comes from
    "household.party_id": "PARLEY_CONSUMER_PARTY_ID",
    "household.currency": "PARLEY_CURRENCY",
    "target": "PARLEY_TARGET",
    "fingerprint": "PARLEY_FINGERPRINT",
    "account_id": "PARLEY_ACCOUNT_ID",
    "code": "PARLEY_ENROLMENT_CODE",
}


def profile_from_env(environ: Mapping[str, str]) -> Profile:
    """The household of `--from-env`: one biller and account from the environment, comfortable money.

    Required: PARLEY_TARGET ("host:port"; plaintext when it is a loopback
    address, else TLS with the system's roots), PARLEY_BILLER_PARTY_ID,
    PARLEY_FINGERPRINT (hex), PARLEY_ACCOUNT_ID, PARLEY_ENROLMENT_CODE.
    Optional: PARLEY_CONSUMER_PARTY_ID (default "consumer:conformance-household")
    and PARLEY_CURRENCY (default EUR). The household has 100000 in the bank, no
    buffer or outgoings, 5000 of income on the 25th, and the sample mandate (fees
    up to 10, at most 6 instalments, at most 15 over the bill); it qualifies for
    hardship programmes (`household.hardship`), so it claims one, with a hardship
    disclosure, where nothing else advertised is affordable. ProfileError names
    the variable at fault.
    """
    required = ("PARLEY_TARGET", "PARLEY_BILLER_PARTY_ID", "PARLEY_FINGERPRINT", "PARLEY_ACCOUNT_ID")
    missing = [name for name in (*required, "PARLEY_ENROLMENT_CODE") if not environ.get(name)]
    if missing:
        raise ProfileError(missing[0], "missing from the environment (--from-env)")
    target = environ["PARLEY_TARGET"]
    biller: dict[str, object] = {
        "priority": 1,
        "target": target,
        "fingerprint": environ["PARLEY_FINGERPRINT"],
        "account_id": environ["PARLEY_ACCOUNT_ID"],
        "code": environ["PARLEY_ENROLMENT_CODE"],
    }
    if is_loopback(target.rpartition(":")[0].removeprefix("[").removesuffix("]")):
        biller["insecure"] = True
    document = {
        "household": {
            "party_id": environ.get("PARLEY_CONSUMER_PARTY_ID") or FROM_ENV_PARTY_ID,
            "currency": environ.get("PARLEY_CURRENCY") or "EUR",
            "balance": "100000",
            "buffer": "0",
            "hardship": True,
        },
        "income": {"amount": "5000", "pay_day": 25},
        "mandate": {"max_fee": "10", "max_instalments": 6, "max_total_over_bill": "15"},
        "billers": {environ["PARLEY_BILLER_PARTY_ID"]: biller},
    }
    try:
        return parse_profile(document)
    except ProfileError as error:
        raise _named_from_env(error) from None


def _named_from_env(error: ProfileError) -> ProfileError:
    """`error` naming the variable of --from-env that set the key at fault: the person set no profile key."""
    name = next(
        (variable for key, variable in _FROM_ENV_KEYS.items() if error.key.endswith(key)),
        "PARLEY_BILLER_PARTY_ID" if error.key.startswith("billers") else error.key,
    )
    return ProfileError(name, error.problem)


def _chosen_state_dir(args: argparse.Namespace) -> tuple[Path, str]:
    """`run`'s state directory and what named it: --state-dir, else PARLEY_STATE_DIR with --from-env (empty
    counts as unset, as for the biller), else the default. StateError as `household_state_dir` says."""
    if args.state_dir is not None:  # given, even empty: an empty one is refused, not replaced by the default
        text, named_by = args.state_dir, "--state-dir"
    elif args.from_env and os.environ.get("PARLEY_STATE_DIR"):
        text, named_by = os.environ["PARLEY_STATE_DIR"], "PARLEY_STATE_DIR"
    else:
        text, named_by = DEFAULT_STATE_DIR, "--state-dir"
    return household_state_dir(text, named_by), named_by


def run_command(args: argparse.Namespace, out: Console) -> int:
    """`parley consumer run`: what the CLI calls."""
    try:
        profile = profile_from_env(os.environ) if args.from_env else load_profile(args.config)
        state_dir, named_by = _chosen_state_dir(args)
    except ProfileError as error:
        out.print(Text("invalid profile ", style="bold red") + Text(str(error)), soft_wrap=True)
        return EXIT_UNUSABLE
    except StateError as error:
        out.print(Text(f"unusable state: {error}", style="bold red"), soft_wrap=True)
        return EXIT_UNUSABLE
    except OSError as error:
        out.print(Text(f"cannot read {args.config}: {error.strerror}", style="red"), soft_wrap=True)
        return EXIT_UNUSABLE
    approval = Approval.APPROVE if args.approve_all else Approval.DENY if args.deny_all else Approval.ASK
    options = RunOptions(
        state_dir, once=args.once, interval=args.interval, approval=approval, state_dir_named_by=named_by
    )
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(run_household(profile, options, out))
    except KeyboardInterrupt:  # Ctrl-C during a --once pass; the store keeps every step already taken
        out.print("interrupted", highlight=False)
        return 130
    except ProfileError as error:
        error = _named_from_env(error) if args.from_env else error
        out.print(Text("invalid profile ", style="bold red") + Text(str(error)), soft_wrap=True)
    except (StateError, InsecureKeyFileError) as error:
        out.print(Text(f"unusable state: {error}", style="bold red"), soft_wrap=True)
    except OSError as error:
        out.print(Text(f"unusable state directory: {error}", style="bold red"), soft_wrap=True)
    return EXIT_UNUSABLE


def add_consumer_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `parley consumer run` (and status, approve, decline, retry-payment, resolve-payment, enrol, serve,
    export-agreements) on the `parley` command's subparsers."""
    consumer = commands.add_parser("consumer", help="run the reference consumer (a household's bot)")
    actions = consumer.add_subparsers(dest="consumer_command", required=True, metavar="COMMAND")
    run = actions.add_parser(
        "run",
        help="enrol, fetch bills, negotiate inside the mandate and pay what is due; every --interval seconds",
        description="Act for the household of the profile: see reference_consumer/runner.py. Exit status of a "
        "--once pass: 0 done, 3 requests wait for your approval (parley consumer approve ID), 1 a biller refused "
        "or failed verification, 2 unusable profile or state, or a biller that cannot be reached.",
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", "--config", dest="config", metavar="FILE", help="the household's profile (TOML)")
    source.add_argument(
        "--from-env",
        action="store_true",
        help="a household built from the PARLEY_* variables of `parley conformance consumer` (docs/CONFORMANCE.md)",
    )
    run.add_argument(
        "--state-dir",
        help=f"key, key set, database and bank order book; created if missing (default: {DEFAULT_STATE_DIR}, "
        "or $PARLEY_STATE_DIR with --from-env)",
    )
    run.add_argument("--once", action="store_true", help="run one pass and exit")
    run.add_argument(
        "--interval", type=INTERVAL, default=DEFAULT_INTERVAL, help="seconds between passes (default: %(default)s)"
    )
    answer = run.add_mutually_exclusive_group()
    answer.add_argument(
        "--approve-all", action="store_true", help="approve every move outside the mandate (unattended runs)"
    )
    answer.add_argument("--deny-all", action="store_true", help="decline every move outside the mandate")
    run.set_defaults(handler=run_command)
    from reference_consumer.commands import add_household_commands  # noqa: PLC0415 - it builds on this module

    add_household_commands(actions)


__all__ = [
    "AGREEMENTS_DIR",
    "BANK_FILE",
    "EXIT_APPROVALS_PENDING",
    "KEYSET_FILE",
    "KEY_FILE",
    "STORE_FILE",
    "Approval",
    "ApprovalLine",
    "ApprovalPending",
    "Household",
    "JsonLinesBank",
    "PassReport",
    "RunOptions",
    "StateError",
    "add_consumer_commands",
    "agreement_file",
    "agreements_reached",
    "describe_terms",
    "household_state_dir",
    "load_identity",
    "profile_from_env",
    "render",
    "run_command",
    "run_household",
    "write_agreement_files",
    "write_private",
]
