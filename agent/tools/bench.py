"""`parley bench`: complete signed negotiations per second against a bare signed-RPC baseline, in one run.

What runs, all on 127.0.0.1 over real gRPC:

- **biller workers**: W processes (spawned before any gRPC object exists in
  this one), each one `grpc.aio` server (uvloop when installed) sharing one
  port through SO_REUSEPORT, each a real `BillerAgent` over the real durable
  store. The rail is instant: a payment intent's settlement is recorded before
  the intent is answered, so the receipt can be fetched at once.
- **load generators**: L processes, each with several channels (one TCP
  connection each), together running C concurrent slots. The kernel spreads
  connections over the workers at random (SO_REUSEPORT hashes them), so a
  load generator asks each new connection which worker answers it and keeps
  an equal number per worker: a chance 6-to-2 split would make one worker the
  bottleneck and vary the figures from run to run.
  each playing at least CONSUMERS_PER_SLOT enrolled consumers in turn (so that
  no key exceeds its LIM-8 rate limit, as in a crowd of households). A cycle is a
  complete negotiation: fetch the bill, open with an offer outside the
  advertised options, get the biller's counter-offer, accept it, send a
  payment intent for the first instalment, fetch the receipt. Every request
  is signed; every signed answer is verified on the one receive path
  (`open_envelope`) against the biller's key set chain.
- **baseline**: the physical limit of a signed RPC in this stack: W processes
  of a bare `grpc.aio` service that does one Ed25519 verify and one sign per
  call, driven by the same L, channels and C, with request and response
  payloads of the sizes the Parley phase measured.

Figures come from a window after a warm-up: completed cycles (calls) per
second, signed messages per second (every signed envelope on the wire:
requests, and signed envelopes in answers), latency percentiles of a complete
cycle, server CPU-seconds per signed message (utime + stime of the worker
processes from /proc/<pid>/stat) and peak RSS (VmHWM). By default a third
phase replays the Parley load at half of the peak rate to report latency at
half load.

The store is chosen by URL (`open_biller_store`): a SQLite file, a throwaway
PostgreSQL, or a PostgreSQL database given; `--prefill N` bulk-loads N agreed
negotiations first, so cost can be compared as data grows. docs/PERFORMANCE.md
has the method, the figures and how to read them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import queue
import secrets
import socket
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from agent.biller import BillerAgent, OfferContext
from agent.clock import SystemClock
from agent.conformance.peers import PeerIdentity, PeerPolicy, PeerRail, SignedParty
from agent.protocol.dsse import digest, sign_envelope, verify_signature
from agent.protocol.errors import ProtocolError
from agent.protocol.keys import SigningKey, VerifyKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import Limits
from agent.protocol.messages import open_envelope, parse_payload
from agent.protocol.terms import (
    AdvertisedOptions,
    InstalmentOption,
    Money,
    Terms,
    TermsKind,
    build_terms,
    monthly_dates,
)
from agent.stores import POSTGRES_SCHEMES, SQLITE_SCHEME, BillerStore, open_biller_store
from agent.stores.sqlite_base import ts
from agent.tools.json_output import add_json_options, emit_json
from agent.tools.numbers import check_number
from agent.tools.paths import directory_argument
from agent.transport.server import freeze_startup_heap, install_uvloop, serve_biller
from parley.v1 import (
    bill_pb2,
    biller_service_pb2,
    biller_service_pb2_grpc,
    envelope_pb2,
    negotiation_pb2,
    payment_pb2,
)

BILLER_ID = "biller:bench.example"
CURRENCY = "EUR"
BILL_AMOUNT = Money.parse("120.00", CURRENCY)
DUE_IN_DAYS = 20
OPENING_INSTALMENTS = 6  # outside the advertised options (at most 3): the policy counters
COUNTER_INSTALMENTS = 3
# LIM-8 limits each key to 20 signed requests/s: each concurrent slot plays enough consumers in turn that
# every key stays well inside its bucket at the fastest rate the run prepares for (`--max-rate`), as a crowd
# of households would; at least this many.
CONSUMERS_PER_SLOT = 16
REQUESTS_PER_CYCLE = 5
SIGNED_PER_CYCLE = 9  # 5 signed requests + bill, counter-offer, instructions and receipt
SIGNED_PER_BASELINE_CALL = 2
CALL_TIMEOUT_SECONDS = 30.0
START_TIMEOUT_SECONDS = 60.0
DRAIN_TIMEOUT_SECONDS = 30.0
PROGRESS_INTERVAL_SECONDS = 0.25
BASELINE_SERVICE = "parley.bench.SignedEcho"
BASELINE_METHOD = f"/{BASELINE_SERVICE}/Call"
WORKER_SERVICE = "parley.bench.Worker"  # on every worker: which process answers this connection
WORKER_PID_METHOD = f"/{WORKER_SERVICE}/Pid"
CONNECTION_TRIES_PER_CHANNEL = 8  # new connections tried per channel kept, to find a balanced set
PREFILL_BATCH = 5_000
PREFILL_AGREEMENTS_PER_ACCOUNT = 4
MIB = 1024 * 1024
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
    ("grpc.initial_reconnect_backoff_ms", 100),  # clients start with the servers: retry connecting soon
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


class BenchError(Exception):
    """The bench could not run as asked (bad options, a process that did not start, a missing back end)."""


# Upper bounds of the options: each is a count of processes, connections, rows or seconds that a typo
# would otherwise start or wait for, far above any useful run on one machine (the defaults are below).
MAX_PHASE_SECONDS = 3600.0
MAX_WARMUP_SECONDS = 600.0
MAX_CONCURRENCY = 1024
MAX_PROCESSES = 64  # worker and load-generator processes, each
MAX_CHANNELS = 64  # per load generator
MAX_PREFILL = 10_000_000  # agreements: about 38 GB of SQLite at 3.8 GB per million (docs/PERFORMANCE.md)
MAX_RATE = 10_000.0  # cycles/s
MAX_BILLS = 2_000_000  # issued beforehand (12,544 with the defaults)


@dataclass(frozen=True)
class BenchOptions:
    seconds: float = 10.0
    warmup: float = 2.0
    concurrency: int = 16
    workers: int = 2
    load_generators: int = 2
    channels: int = 4  # per load generator
    store: str = "sqlite"
    prefill: int = 0
    rate: float | None = None  # cycles/s for the Parley phase; None: as fast as it goes
    half_load: bool = True  # after the peak phase, a phase at half of the peak rate
    baseline: bool = True
    state_dir: Path | None = None
    # Bills are issued before the run, one per cycle: enough for this many cycles/s over every phase.
    max_rate: float = 500.0
    # How long to time fdatasync in the state directory first: the disk bounds every durable step's latency.
    disk_probe_seconds: float = 2.0

    def check(self) -> None:
        """Raise BenchError naming the option unless every option is usable (docs/PERFORMANCE.md, Method)."""
        try:
            check_number("--seconds", self.seconds, 0, MAX_PHASE_SECONDS, above_low=True)
            check_number("--warmup", self.warmup, 0, MAX_WARMUP_SECONDS)
            check_number("--concurrency", self.concurrency, 1, MAX_CONCURRENCY)
            check_number("--workers", self.workers, 1, MAX_PROCESSES)
            check_number("--load-generators", self.load_generators, 1, MAX_PROCESSES)
            check_number("--channels", self.channels, 1, MAX_CHANNELS)
            check_number("--prefill", self.prefill, 0, MAX_PREFILL)
            if self.rate is not None:
                check_number("--rate", self.rate, 0, MAX_RATE, above_low=True)
            check_number("--max-rate", self.max_rate, 0, MAX_RATE, above_low=True)
            check_number("--disk-probe", self.disk_probe_seconds, 0, MAX_WARMUP_SECONDS)
        except ValueError as error:
            raise BenchError(str(error)) from None
        if self.load_generators > self.concurrency:
            raise BenchError("--load-generators may not exceed --concurrency")
        if self.store not in DURABILITY and not self.store.startswith(POSTGRES_SCHEMES):
            raise BenchError("--store is sqlite, postgres or a postgresql:// URL")
        if self.prefill and self.store != "sqlite":
            raise BenchError("--prefill bulk-loads SQLite only")
        if (bills := self.bills_per_consumer() * self.consumers()) > MAX_BILLS:
            raise BenchError(
                f"the run would issue {bills:,} bills beforehand, one per cycle --max-rate can reach over every "
                f"phase's --warmup and --seconds; at most {MAX_BILLS:,}: lower --max-rate or --seconds"
            )

    def phases(self) -> int:
        """Parley phases: the peak, and the half-load one unless skipped or the rate is given."""
        return 1 + int(self.half_load and self.rate is None)

    def consumers(self) -> int:
        """Consumers enrolled beforehand: each slot plays several in turn (`consumers_per_slot`)."""
        return self.concurrency * consumers_per_slot(self.max_rate, self.concurrency)

    def bills_per_consumer(self) -> int:
        """Bills issued to each consumer beforehand: one per cycle at --max-rate over every phase, and one spare."""
        phases = self.phases()
        return math.ceil(self.max_rate * (self.warmup + self.seconds) * phases / self.consumers()) + phases


# === The biller under test ===============================================================================


def _counter_from_first_date(context: OfferContext) -> Terms:
    return counter_terms(context.bill.amount_due, context.offer.schedule[0].due_date)


def bench_policy() -> PeerPolicy:
    """Advertises up to 3 monthly instalments; counters any offer outside them with 3 from the offer's first date."""
    options = AdvertisedOptions(
        instalments=InstalmentOption(COUNTER_INSTALMENTS, Money.parse("40.00", CURRENCY), 14, 35, 30)
    )
    return PeerPolicy(options, _counter_from_first_date)


def opening_terms(amount: Money, due_date: date) -> Terms:
    return build_terms(
        TermsKind.INSTALMENT_PLAN, amount, monthly_dates(due_date + timedelta(days=5), OPENING_INSTALMENTS)
    )


def counter_terms(amount: Money, first: date) -> Terms:
    return build_terms(TermsKind.INSTALMENT_PLAN, amount, monthly_dates(first, COUNTER_INSTALMENTS))


BENCH_RAIL = PeerRail(payee_name="Bench Example Ltd", reference_prefix="BENCH", method="simulated-instant")


class InstantRailBiller(BillerAgent):
    """A biller whose rail settles at once: the settlement is recorded before the intent is answered."""

    async def create_payment_intent(
        self, envelope: envelope_pb2.Envelope
    ) -> biller_service_pb2.CreatePaymentIntentResponse:
        response = await super().create_payment_intent(envelope)
        intent = parse_payload(payment_pb2.PaymentIntent, envelope.payload)  # verified by the call above
        instructed = Money.from_proto(
            parse_payload(payment_pb2.PaymentInstructions, response.instructions.payload).amount
        )
        await self.record_settlement(intent.account_id, intent.intent_id, instructed, f"rail-{intent.intent_id}")
        return response


DURABILITY = {
    "sqlite": "SQLite WAL, synchronous=FULL: an acknowledged step is on disk (survives a power cut)",
    "postgres": "a throwaway PostgreSQL with fsync=off (agent/tools/pg_server.py): NOT durable, an upper bound",
}
GIVEN_DATABASE = "the PostgreSQL database given: as durable as that server is configured to be"


def store_url(store: str, state_dir: Path, resources: ExitStack) -> str:
    """The store's URL (`open_biller_store` opens any): a file in `state_dir`, the PostgreSQL URL given (an
    empty database), or a throwaway PostgreSQL server's database, which lives as long as `resources`."""
    if store == "sqlite":
        return f"{SQLITE_SCHEME}{state_dir / 'biller.db'}"
    if store.startswith(POSTGRES_SCHEMES):
        return store
    try:
        from agent.tools.pg_server import throwaway_postgres  # noqa: PLC0415 - needs the dev/postgres extras
    except ImportError as error:
        raise BenchError(f"--store postgres needs the postgres and dev extras ({error})") from error
    return resources.enter_context(throwaway_postgres()).create_database("parley_bench")


# The bench enrols its consumers before the workers start; the workers issue no codes, but a secret of
# their own keeps the agent's warning about an ephemeral one out of the report.
BENCH_ENROLMENT_SECRET = bytes(range(32))


def consumers_per_slot(max_rate: float, concurrency: int) -> int:
    """How many consumers one slot plays in turn so that none exceeds LIM-8 at `max_rate` cycles/s in all.

    With few slots one slot runs fast: one slot at 70 cycles/s would send each of 16 keys 22 requests/s,
    and the biller would rightly refuse some (a bench of one slot once reported 391 failed cycles)."""
    requests_per_key = Limits().rate_limit_per_second / 2  # half the bucket: room for bursts
    needed = math.ceil(max_rate / concurrency * REQUESTS_PER_CYCLE / requests_per_key)
    return max(CONSUMERS_PER_SLOT, needed)


def bench_agent(identity: PeerIdentity, store: BillerStore) -> InstantRailBiller:
    return InstantRailBiller(
        party_id=BILLER_ID,
        signing_key=identity.key,
        key_sets=identity.chain,
        store=store,
        policy=bench_policy(),
        rail=BENCH_RAIL,
        clock=SystemClock(),
        enrolment_secret=BENCH_ENROLMENT_SECRET,
    )


@dataclass(frozen=True)
class ConsumerSpec:
    """One virtual consumer: its party (key seed and key set version 1), account and bills to negotiate."""

    party_id: str
    seed: bytes
    key_set: bytes
    account_id: str
    bills: tuple[str, ...]

    def party(self) -> SignedParty:
        key_set = envelope_pb2.Envelope.FromString(self.key_set)
        return SignedParty(self.party_id, BILLER_ID, _now, SigningKey.from_seed(self.seed), [key_set])


def _now() -> datetime:
    return datetime.now(UTC)


Slot = tuple[ConsumerSpec, ...]  # the consumers one concurrent slot plays in turn


async def prepare_store(
    url: str, identity: PeerIdentity, consumers: int, bills_per_consumer: int
) -> tuple[ConsumerSpec, ...]:
    """Accounts with enrolled consumers (through the real Enrol path) and their bills, issued concurrently."""
    store = await open_biller_store(url)
    try:
        agent = bench_agent(identity, store)
        due = _now().date() + timedelta(days=DUE_IN_DAYS)

        async def consumer(index: int) -> ConsumerSpec:
            account_id = f"bench-{index:05d}"
            await agent.create_account(account_id, f"Bench household {index}")
            code = await agent.issue_enrolment_code(account_id)
            party = SignedParty.create(BILLER_ID, clock=_now, party_id=f"consumer:bench-{index:05d}")
            await agent.enrol(party.enrolment(account_id, code))
            bills = [
                await agent.issue_bill(account_id, BILL_AMOUNT, due, f"Bench bill {n}")
                for n in range(bills_per_consumer)
            ]
            return ConsumerSpec(
                party.party_id, party.key.seed, party.key_set.SerializeToString(), account_id, tuple(bills)
            )

        return tuple(await asyncio.gather(*(consumer(i) for i in range(consumers))))
    finally:
        await store.close()


def prefill_sqlite(path: str, identity: PeerIdentity, agreements: int) -> None:
    """Bulk-insert `agreements` agreed negotiations as the biller stores them, straight into the SQLite file.

    One real negotiation is signed first; its rows (bill, thread, the three
    messages, the ARRANGEMENT_ACTIVE event) are copied with fresh ids and
    digests, four agreements per account, all bound to one enrolled party. The
    rows have the sizes and the index entries of real ones; the copied
    signatures are not valid for the new ids, which nothing in the bench reads.
    """
    key = identity.key
    party = SignedParty.create(BILLER_ID, clock=_now, party_id="consumer:bench-prefill")
    template = _template_rows(key, party)
    now = ts(_now())
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=NORMAL")  # set-up, made durable by the checkpoint at the end
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO parties (party_id, fingerprint, enrolled_at) VALUES (?, ?, ?)",
            (party.party_id, party.chain.fingerprint, now),
        )
        db.execute(
            "INSERT INTO party_key_sets (party_id, version, envelope) VALUES (?, 1, ?)",
            (party.party_id, party.key_set.SerializeToString()),
        )
        db.execute("INSERT INTO party_keyids (keyid, party_id) VALUES (?, ?)", (party.key.keyid, party.party_id))
        db.execute("COMMIT")
        for start in range(0, agreements, PREFILL_BATCH):
            db.execute("BEGIN IMMEDIATE")  # a transaction per batch keeps the WAL small
            _prefill_batch(db, template, party.party_id, range(start, min(agreements, start + PREFILL_BATCH)), now)
            db.execute("COMMIT")
        # Fold the WAL into the file now, not in the first measured write (SQLite's automatic checkpoint).
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


@dataclass(frozen=True)
class _TemplateRows:
    bill: bytes
    messages: tuple[bytes, bytes, bytes]  # ThreadOpen, Offer, Accept
    event: bytes


def _template_rows(key: SigningKey, party: SignedParty) -> _TemplateRows:
    due = _now().date() + timedelta(days=DUE_IN_DAYS)
    bill = sign_envelope(key, "parley.v1.Bill", secrets.token_bytes(360))
    opening = party.open("bill-prefill", digest(bill), opening_terms(BILL_AMOUNT, due).to_proto())
    counter = sign_envelope(key, "parley.v1.Offer", secrets.token_bytes(300))
    accept = party.move([opening, counter], negotiation_pb2.Accept(offer_digest=digest(counter)))
    event = sign_envelope(key, "parley.v1.Event", secrets.token_bytes(260))
    return _TemplateRows(
        bill.SerializeToString(),
        (opening.SerializeToString(), counter.SerializeToString(), accept.SerializeToString()),
        event.SerializeToString(),
    )


def _prefill_batch(db: sqlite3.Connection, template: _TemplateRows, party_id: str, indexes: range, now: str) -> None:
    accounts, bills, threads, messages, events = [], [], [], [], []
    due = (_now().date() + timedelta(days=DUE_IN_DAYS)).isoformat()
    for index in indexes:
        account_id = f"prefill-{index // PREFILL_AGREEMENTS_PER_ACCOUNT:07d}"
        if index % PREFILL_AGREEMENTS_PER_ACCOUNT == 0:
            accounts.append((account_id, "Prefilled household", now))
        bill_id = f"prefill-bill-{index:08d}"
        thread_id = secrets.token_bytes(16)
        offer_digest, accept_digest = secrets.token_bytes(32), secrets.token_bytes(32)
        bills.append(
            (bill_id, account_id, template.bill, secrets.token_bytes(32), BILL_AMOUNT.minor, CURRENCY, due, now)
        )
        threads.append((thread_id, account_id, bill_id, party_id, now, now, offer_digest, accept_digest, now))
        for sequence, (envelope, message_digest) in enumerate(
            zip(template.messages, (secrets.token_bytes(32), offer_digest, accept_digest), strict=True)
        ):
            sender = BILLER_ID if sequence == 1 else party_id
            messages.append(
                (
                    thread_id,
                    sequence,
                    envelope,
                    message_digest,
                    sender,
                    secrets.token_bytes(16),
                    account_id,
                    bill_id,
                    now,
                )
            )
        events.append((account_id, index % PREFILL_AGREEMENTS_PER_ACCOUNT, template.event, secrets.token_bytes(32)))
    db.executemany("INSERT INTO accounts (account_id, holder_name, created_at) VALUES (?, ?, ?)", accounts)
    db.executemany(
        "INSERT INTO bindings (account_id, party_id, bound_at) VALUES (?, ?, ?)",
        [(account[0], party_id, now) for account in accounts],
    )
    db.executemany(
        """INSERT INTO bills (bill_id, account_id, envelope, digest, amount_minor, currency, due_date, status,
                              issued_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, 'under_arrangement', ?)""",
        bills,
    )
    db.executemany(  # ENR-12: each bill as presented to the party bound to its account
        "INSERT INTO bill_presentations (bill_id, party_id, envelope, digest, presented_at) VALUES (?, ?, ?, ?, ?)",
        [(bill[0], party_id, bill[2], bill[3], now) for bill in bills],
    )
    db.executemany(
        """INSERT INTO threads (thread_id, account_id, bill_id, consumer_party_id, outcome, deadline, opened_at,
                                hardship_disclosed, offer_digest, accept_digest, agreed_total_minor, agreed_at)
           VALUES (?, ?, ?, ?, 'agreed', ?, ?, 0, ?, ?, 12000, ?)""",
        threads,
    )
    db.executemany(
        """INSERT INTO messages (thread_id, sequence, envelope, digest, sender, payload_type, message_id,
                                 account_id, bill_id, received_at)
           VALUES (?, ?, ?, ?, ?, 'parley.v1.Offer', ?, ?, ?, ?)""",
        messages,
    )
    db.executemany(
        "INSERT INTO binding_events (account_id, party_id, sequence, envelope, digest, kind) VALUES (?, ?, ?, ?, ?, 3)",
        [(account_id, party_id, *rest) for account_id, *rest in events],
    )
    db.executemany(  # each log's length, kept beside its events as every append keeps it (store migration 7)
        """INSERT INTO event_log_lengths (account_id, party_id, length) VALUES (?, ?, ?)
           ON CONFLICT (account_id, party_id) DO UPDATE SET length = MAX(length, excluded.length)""",
        [(account_id, party_id, sequence + 1) for account_id, sequence, *_ in events],
    )


# === Processes ===========================================================================================


def reserve_port() -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on a free loopback port: held so no one else takes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass(frozen=True)
class WorkerSpec:
    port: int
    store_url: str  # "" for the baseline echo service
    identity: PeerIdentity
    response_bytes: int = 0  # baseline: the size of the payload it signs
    consumer_keys: tuple[bytes, ...] = ()  # baseline: raw public keys of the consumers


def _biller_worker(spec: WorkerSpec, ready: Queue[int], stop: Event) -> None:
    install_uvloop()
    asyncio.run(_serve_until_stopped(spec, ready, stop))


async def _serve_until_stopped(spec: WorkerSpec, ready: Queue[int], stop: Event) -> None:
    listen = f"127.0.0.1:{spec.port}"
    if not spec.store_url:
        server = _baseline_server(spec, listen)
        await server.start()
        try:
            ready.put(os.getpid())
            await asyncio.to_thread(stop.wait)
        finally:
            await server.stop(grace=1)
        return
    store = await open_biller_store(spec.store_url)
    try:
        running = await serve_biller(
            bench_agent(spec.identity, store),
            listen,
            insecure=True,
            reuse_port=True,
            services=(_add_worker_service,),
            service_names=(WORKER_SERVICE,),
        )
        freeze_startup_heap()  # as `parley biller serve` does
        try:
            ready.put(os.getpid())
            await asyncio.to_thread(stop.wait)
        finally:
            await running.stop(grace=1)
    finally:
        await store.close()


def _add_worker_service(server: grpc.aio.Server) -> None:
    """`Pid`: this process's id, so a load generator can spread its connections evenly over the workers."""

    async def pid(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return str(os.getpid()).encode()

    handler = grpc.method_handlers_generic_handler(WORKER_SERVICE, {"Pid": grpc.unary_unary_rpc_method_handler(pid)})
    server.add_generic_rpc_handlers((handler,))


def _baseline_server(spec: WorkerSpec, listen: str) -> grpc.aio.Server:
    """The physical limit: verify the request's signature with the sender's key, sign an answer of the same size."""
    key = spec.identity.key
    keys = {verify.keyid: verify for verify in (VerifyKey.from_bytes(raw) for raw in spec.consumer_keys)}
    payload = secrets.token_bytes(spec.response_bytes)

    async def call(
        request: envelope_pb2.Envelope, context: grpc.aio.ServicerContext[Any, Any]
    ) -> envelope_pb2.Envelope:
        sender = keys.get(request.signatures[0].keyid) if request.signatures else None
        if sender is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown key")
        assert sender is not None
        verify_signature(request, sender)
        return sign_envelope(key, "parley.bench.Answer", payload)

    handler = grpc.method_handlers_generic_handler(
        BASELINE_SERVICE,
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                call,
                request_deserializer=envelope_pb2.Envelope.FromString,
                response_serializer=envelope_pb2.Envelope.SerializeToString,
            )
        },
    )
    server = grpc.aio.server(options=(("grpc.so_reuseport", 1),))
    server.add_generic_rpc_handlers((handler,))
    _add_worker_service(server)
    server.add_insecure_port(listen)
    return server


def _cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _peak_rss_bytes(pid: int) -> int:
    """VmHWM: the process's peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmHWM for process {pid}")


@dataclass(frozen=True)
class _StartedWorkers:
    processes: list[SpawnProcess]
    ready: Queue[int]

    def pids(self) -> list[int]:
        """Their pids, once every one listens."""
        return _await_ready(self.ready, self.processes, "a server worker")


@contextmanager
def started_workers(
    context: multiprocessing.context.SpawnContext, specs: Sequence[WorkerSpec]
) -> Iterator[_StartedWorkers]:
    """Start the worker processes (the caller starts its clients meanwhile); always stop them on leaving."""
    ready: Queue[int] = context.Queue()
    stop = context.Event()
    processes = [context.Process(target=_biller_worker, args=(spec, ready, stop), daemon=True) for spec in specs]
    for process in processes:
        process.start()
    try:
        yield _StartedWorkers(processes, ready)
    finally:
        stop.set()
        _join(processes)


def _await_ready(ready: Queue[int], processes: Sequence[SpawnProcess], what: str) -> list[int]:
    """The pids the processes report once ready; BenchError as soon as one dies first, or at the timeout."""
    pids: list[int] = []
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while len(pids) < len(processes):
        try:
            pids.append(ready.get(timeout=PROGRESS_INTERVAL_SECONDS))
        except queue.Empty:
            if any(process.exitcode is not None for process in processes):
                raise BenchError(f"{what} exited before it was ready (see its error above)") from None
            if time.monotonic() > deadline:
                raise BenchError(f"{what} was not ready within {START_TIMEOUT_SECONDS:.0f} s") from None
    return pids


def _join(processes: Sequence[SpawnProcess]) -> None:
    for process in processes:
        process.join(DRAIN_TIMEOUT_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()


# === Load generators =====================================================================================


@dataclass(frozen=True)
class LoadSpec:
    target: str
    baseline: bool
    slots: tuple[Slot, ...]
    biller_key_sets: tuple[bytes, ...]
    channels: int
    workers: int  # the server processes the channels are spread over
    rate_per_slot: float | None  # cycles/s of each slot; None: back to back
    request_bytes: int = 0  # baseline: the size of the payload it signs


@dataclass
class LoadResult:
    """What one load generator saw inside the measurement window (cycles started in it)."""

    cycles: int = 0
    verified: int = 0
    signed_messages: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds per complete cycle (call)
    errors: dict[str, int] = field(default_factory=dict)
    bills_exhausted: int = 0
    requests: int = 0
    request_payload_bytes: int = 0
    responses: int = 0
    response_payload_bytes: int = 0


class CycleFailed(Exception):
    """A cycle that did not end as a verified agreement with its receipt."""


@dataclass
class _Coordination:
    """What the parent shares with its load generators: the phase window, the go signal, queues, a counter."""

    start: Any  # multiprocessing Value("d"): epoch seconds, set before `go`
    end: Any
    go: Event
    ready: Queue[int]
    results: Queue[LoadResult]
    progress: Any  # multiprocessing Value("q"): cycles completed, for the progress display


def _load_worker(spec: LoadSpec, shared: _Coordination) -> None:
    install_uvloop()
    shared.results.put(asyncio.run(_generate_load(spec, shared)))


async def _generate_load(spec: LoadSpec, shared: _Coordination) -> LoadResult:
    channels = await asyncio.wait_for(balanced_channels(spec), START_TIMEOUT_SECONDS)
    try:
        shared.ready.put(os.getpid())
        await asyncio.to_thread(shared.go.wait)
        start, end = shared.start.value, shared.end.value
        result = LoadResult()
        runner = _BaselineClient if spec.baseline else _ParleyClient
        chain = KeyChain.verify([envelope_pb2.Envelope.FromString(data) for data in spec.biller_key_sets])
        clients = [
            runner(slot, channels[index % len(channels)], chain, spec, result, shared.progress)
            for index, slot in enumerate(spec.slots)
        ]
        await asyncio.gather(*(client.run(start, end) for client in clients))
        return result
    finally:
        for channel in channels:
            await channel.close()


async def balanced_channels(spec: LoadSpec) -> list[grpc.aio.Channel]:
    """`spec.channels` channels, each its own connection, spread as evenly as they can be over the workers.

    New connections land on a worker the kernel picks; one that would make its worker's share larger than
    an even split is closed and another is tried (up to CONNECTION_TRIES_PER_CHANNEL per channel, after
    which the channel is kept wherever it landed).
    """
    share = math.ceil(spec.channels / spec.workers)
    kept: list[grpc.aio.Channel] = []
    per_worker: Counter[bytes] = Counter()
    tries = 0
    while len(kept) < spec.channels:
        channel = grpc.aio.insecure_channel(spec.target, options=_CHANNEL_OPTIONS)
        await channel.channel_ready()
        ask: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(WORKER_PID_METHOD)
        worker = await ask(b"", timeout=CALL_TIMEOUT_SECONDS)
        tries += 1
        if per_worker[worker] < share or tries >= CONNECTION_TRIES_PER_CHANNEL * spec.channels:
            per_worker[worker] += 1
            kept.append(channel)
        else:
            await channel.close()
    return kept


class _Client:
    """One concurrent slot running cycles from `start` until `end` (epoch seconds), its consumers in turn."""

    def __init__(  # noqa: PLR0917 - the same six for every kind of client, built in one place
        self,
        slot: Slot,
        channel: grpc.aio.Channel,
        chain: KeyChain,
        spec: LoadSpec,
        result: LoadResult,
        progress: Any,
    ) -> None:
        self.slot = slot
        self.parties = [consumer.party() for consumer in slot]
        self.channel = channel
        self.chain = chain
        self.spec = spec
        self.result = result
        self.progress = progress

    async def run(self, start: float, end: float) -> None:
        interval = None if self.spec.rate_per_slot is None else 1 / self.spec.rate_per_slot
        next_start = time.time() + (0 if interval is None else secrets.randbelow(1000) / 1000 * interval)
        for index in range(self._cycle_budget()):
            if interval is not None:
                await asyncio.sleep(max(0.0, next_start - time.time()))
                next_start += interval
            began = time.time()
            if began >= end:
                return
            try:
                signed = await self.cycle(index)
            except (CycleFailed, ProtocolError, grpc.aio.AioRpcError) as error:
                if began >= start:
                    reason = _failure_reason(error)
                    self.result.errors[reason] = self.result.errors.get(reason, 0) + 1
                    self.result.cycles += 1
                continue
            finished = time.time()
            with self.progress.get_lock():
                self.progress.value += 1
            if began >= start:
                self.result.cycles += 1
                self.result.verified += 1
                self.result.signed_messages += signed
                self.result.latencies.append(finished - began)
        if time.time() < end:
            self.result.bills_exhausted += 1

    def _cycle_budget(self) -> int:
        raise NotImplementedError

    async def cycle(self, index: int) -> int:
        """One complete cycle; returns the number of signed messages it exchanged."""
        raise NotImplementedError


def _failure_reason(error: Exception) -> str:
    if isinstance(error, ProtocolError):
        return error.reason.name
    if isinstance(error, grpc.aio.AioRpcError):
        return f"grpc {error.code().name}: {(error.details() or '')[:80]}"
    return str(error)


class _ParleyClient(_Client):
    """fetch bill → offer → counter → accept → payment intent → receipt, every answer verified."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.stub = biller_service_pb2_grpc.BillerServiceStub(self.channel)

    def _cycle_budget(self) -> int:
        return len(self.slot) * min(len(consumer.bills) for consumer in self.slot)

    def _open(self, envelope: envelope_pb2.Envelope, expected: type[Any], party: SignedParty) -> Any:
        self.result.responses += 1
        self.result.response_payload_bytes += len(envelope.payload)
        return open_envelope(envelope, (expected,), sender_keys=self.chain, recipient=party.party_id, now=_now())

    def _sent(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        self.result.requests += 1
        self.result.request_payload_bytes += len(envelope.payload)
        return envelope

    async def cycle(self, index: int) -> int:
        turn, round_ = index % len(self.slot), index // len(self.slot)
        party, account_id, bill_id = self.parties[turn], self.slot[turn].account_id, self.slot[turn].bills[round_]
        timeout = CALL_TIMEOUT_SECONDS
        query = self._sent(party.query(account_id, bill_id=bill_id))
        got = await self.stub.GetBill(biller_service_pb2.GetBillRequest(query=query), timeout=timeout)
        bill = self._open(got.bill, bill_pb2.Bill, party)
        facts = bill.message
        amount, due = Money.from_proto(facts.amount_due), date.fromisoformat(facts.due_date)
        opening = self._sent(party.open(bill_id, bill.digest, opening_terms(amount, due).to_proto()))
        answer = await self.stub.Negotiate(biller_service_pb2.NegotiateRequest(move=opening), timeout=timeout)
        if not answer.HasField("reply"):
            raise CycleFailed(f"no counter-offer (outcome {answer.outcome})")
        counter = self._open(answer.reply, negotiation_pb2.Offer, party)
        accept = self._sent(party.move([opening, answer.reply], negotiation_pb2.Accept(offer_digest=counter.digest)))
        agreed = await self.stub.Negotiate(biller_service_pb2.NegotiateRequest(move=accept), timeout=timeout)
        if agreed.outcome != negotiation_pb2.NEGOTIATION_OUTCOME_AGREED:
            raise CycleFailed(f"not agreed (outcome {agreed.outcome})")
        first = Terms.from_proto(counter.message.terms).schedule[0].amount
        intent_id = f"i-{secrets.token_hex(8)}"
        intent = self._sent(
            party.intent(account_id, bill_id, intent_id, first.to_proto(), agreement_digest=digest(accept))
        )
        paid = await self.stub.CreatePaymentIntent(
            biller_service_pb2.CreatePaymentIntentRequest(intent=intent), timeout=timeout
        )
        instructions = self._open(paid.instructions, payment_pb2.PaymentInstructions, party)
        if Money.from_proto(instructions.message.amount) != first:
            raise CycleFailed("the instructions are for another amount")
        query = self._sent(party.query(account_id, intent_id=intent_id))
        got_receipt = await self.stub.GetReceipt(biller_service_pb2.GetReceiptRequest(query=query), timeout=timeout)
        receipt = self._open(got_receipt.receipt, payment_pb2.Receipt, party)
        if Money.from_proto(receipt.message.amount_received) != first:
            raise CycleFailed("the receipt is for another amount")
        return SIGNED_PER_CYCLE


class _BaselineClient(_Client):
    """One signed call: sign a request of the measured size, verify the signed answer."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.call = self.channel.unary_unary(
            BASELINE_METHOD,
            request_serializer=envelope_pb2.Envelope.SerializeToString,
            response_deserializer=envelope_pb2.Envelope.FromString,
        )
        self.payload = secrets.token_bytes(self.spec.request_bytes)
        self.biller_keys = self.chain.latest.keys

    def _cycle_budget(self) -> int:
        return 1 << 62

    async def cycle(self, index: int) -> int:
        request = sign_envelope(self.parties[index % len(self.parties)].key, "parley.bench.Request", self.payload)
        answer = await self.call(request, timeout=CALL_TIMEOUT_SECONDS)
        verify_signature(answer, *(entry.key for entry in self.biller_keys))
        self.result.requests += 1
        self.result.request_payload_bytes += len(request.payload)
        self.result.responses += 1
        self.result.response_payload_bytes += len(answer.payload)
        return SIGNED_PER_BASELINE_CALL


# === Phases and the report ===============================================================================


@dataclass
class PhaseReport:
    name: str
    seconds: float
    cycles: int
    cycles_verified: int
    errors: dict[str, int]
    bills_exhausted: int
    cycles_per_second: float
    signed_messages: int
    signed_messages_per_second: float
    latency_ms: dict[str, float]
    server_cpu_seconds: float
    worker_cpu_seconds: list[float]  # each worker's share: an even load shows as even shares
    server_cpu_us_per_signed_message: float
    worker_peak_rss_mib: float  # the largest of the workers' VmHWM
    client_cpu_seconds: float  # the load generators': on one machine, what the server could not use
    mean_request_payload_bytes: float
    mean_response_payload_bytes: float
    target_rate: float | None = None


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _merge(results: Sequence[LoadResult]) -> LoadResult:
    merged = LoadResult()
    errors: Counter[str] = Counter()
    for result in results:
        merged.cycles += result.cycles
        merged.verified += result.verified
        merged.signed_messages += result.signed_messages
        merged.latencies += result.latencies
        merged.bills_exhausted += result.bills_exhausted
        merged.requests += result.requests
        merged.request_payload_bytes += result.request_payload_bytes
        merged.responses += result.responses
        merged.response_payload_bytes += result.response_payload_bytes
        errors.update(result.errors)
    merged.errors = dict(errors)
    return merged


def fdatasync_latency(directory: Path, seconds: float) -> dict[str, float] | None:
    """fdatasync of a 4 KiB append in `directory` for `seconds`, 200 a second: milliseconds at p50, p99, max.

    A durable step's COMMIT waits for one, so this bounds the latency of every negotiation: on a disk
    whose syncs now and then take 100 ms, so do some negotiations. None when `seconds` is 0.
    """
    if seconds <= 0:
        return None
    path = directory / "fdatasync-probe"
    block = secrets.token_bytes(4096)
    timings: list[float] = []
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.write(descriptor, block)
            started = time.perf_counter()
            os.fdatasync(descriptor)
            timings.append(time.perf_counter() - started)
            time.sleep(0.005)
    finally:
        os.close(descriptor)
        path.unlink()
    timings.sort()
    return {
        "syncs": len(timings),
        "p50": percentile(timings, 0.50) * 1000,
        "p99": percentile(timings, 0.99) * 1000,
        "max": timings[-1] * 1000,
    }


class Bench:
    """One run: prepare, then the phases, each against freshly started worker processes sharing one port."""

    def __init__(self, options: BenchOptions, console: Console, *, show_progress: bool = True) -> None:
        options.check()
        self.options = options
        self.console = console
        self.show_progress = show_progress
        self.context = multiprocessing.get_context("spawn")

    def run(self) -> dict[str, Any]:
        with ExitStack() as resources:
            state_dir = self.options.state_dir or Path(
                resources.enter_context(tempfile.TemporaryDirectory(prefix="parley-bench-"))
            )
            state_dir.mkdir(parents=True, exist_ok=True)
            disk = fdatasync_latency(state_dir, self.options.disk_probe_seconds)
            report = self._run(store_url(self.options.store, state_dir, resources))
            report["config"]["state_dir_fdatasync_ms"] = disk
            return report

    def _run(self, url: str) -> dict[str, Any]:
        options = self.options
        identity = PeerIdentity.create(BILLER_ID, _now())
        phases, consumer_count, bills = options.phases(), options.consumers(), options.bills_per_consumer()
        began = time.monotonic()
        consumers = asyncio.run(prepare_store(url, identity, consumer_count, bills))
        if options.prefill:
            self.console.print(f"prefilling {options.prefill:,} agreements…")
            prefill_sqlite(url.removeprefix(SQLITE_SCHEME), identity, options.prefill)
        prepared = time.monotonic() - began
        self.console.print(
            f"prepared {consumer_count:,} enrolled consumers and {bills * consumer_count:,} bills in {prepared:.1f} s"
        )
        per_phase = bills // phases
        peak_slots = _slots(consumers, options.concurrency, slice(0, per_phase))
        parley = self._phase("parley", url, identity, peak_slots, options.rate)
        report: dict[str, Any] = {"config": _config(options, prepared), "parley": asdict(parley)}
        if options.baseline:
            baseline = self._phase(
                "baseline",
                "",
                identity,
                peak_slots,
                None,
                request_bytes=round(parley.mean_request_payload_bytes),
                response_bytes=round(parley.mean_response_payload_bytes),
            )
            report["baseline"] = asdict(baseline)
            report["ratio"] = {
                "throughput": parley.signed_messages_per_second / baseline.signed_messages_per_second,
                "cpu_per_message": parley.server_cpu_us_per_signed_message / baseline.server_cpu_us_per_signed_message,
            }
        if phases == 2:
            half_slots = _slots(consumers, options.concurrency, slice(per_phase, None))
            half = self._phase("parley-half-load", url, identity, half_slots, parley.cycles_per_second / 2)
            report["parley"]["half_load"] = asdict(half)
        return report

    def _phase(
        self,
        name: str,
        url: str,
        identity: PeerIdentity,
        slots: Sequence[Slot],
        rate: float | None,
        *,
        request_bytes: int = 0,
        response_bytes: int = 0,
    ) -> PhaseReport:
        options = self.options
        port_holder = reserve_port()
        port = port_holder.getsockname()[1]
        consumer_keys = tuple(c.party().key.public_key.raw for slot in slots for c in slot) if not url else ()
        spec = WorkerSpec(port, url, identity, response_bytes, consumer_keys)
        try:
            with started_workers(self.context, [spec] * options.workers) as workers:
                loads = [tuple(slots[index :: options.load_generators]) for index in range(options.load_generators)]
                rate_per_slot = None if rate is None else rate / len(slots)
                specs = [
                    LoadSpec(
                        f"127.0.0.1:{port}",
                        not url,
                        part,
                        identity.key_sets,
                        options.channels,
                        options.workers,
                        rate_per_slot,
                        request_bytes,
                    )
                    for part in loads
                ]
                merged, per_worker, client_cpu, rss = self._drive(name, specs, workers)
                cpu = sum(per_worker)
        finally:
            port_holder.close()
        latencies = sorted(merged.latencies)
        return PhaseReport(
            name=name,
            seconds=options.seconds,
            cycles=merged.cycles,
            cycles_verified=merged.verified,
            errors=merged.errors,
            bills_exhausted=merged.bills_exhausted,
            cycles_per_second=merged.verified / options.seconds,
            signed_messages=merged.signed_messages,
            signed_messages_per_second=merged.signed_messages / options.seconds,
            latency_ms={
                "p50": percentile(latencies, 0.50) * 1000,
                "p95": percentile(latencies, 0.95) * 1000,
                "p99": percentile(latencies, 0.99) * 1000,
                "mean": statistics.fmean(latencies) * 1000 if latencies else math.nan,
            },
            server_cpu_seconds=cpu,
            worker_cpu_seconds=per_worker,
            server_cpu_us_per_signed_message=cpu / merged.signed_messages * 1e6 if merged.signed_messages else math.nan,
            worker_peak_rss_mib=rss / MIB,
            client_cpu_seconds=client_cpu,
            mean_request_payload_bytes=merged.request_payload_bytes / max(1, merged.requests),
            mean_response_payload_bytes=merged.response_payload_bytes / max(1, merged.responses),
            target_rate=rate,
        )

    def _drive(
        self, name: str, specs: Sequence[LoadSpec], workers: _StartedWorkers
    ) -> tuple[LoadResult, list[float], float, int]:
        """Run the load generators through warm-up and the window.

        Returns their merged result, each worker's and the clients' CPU-seconds in the window, the peak RSS.
        """
        options = self.options
        context = self.context
        shared = _Coordination(
            context.Value("d", 0.0),
            context.Value("d", 0.0),
            context.Event(),
            context.Queue(),
            context.Queue(),
            context.Value("q", 0),
        )
        processes = [context.Process(target=_load_worker, args=(spec, shared), daemon=True) for spec in specs]
        for process in processes:
            process.start()
        try:
            pids = workers.pids()
            clients = _await_ready(shared.ready, processes, "a load generator")
            now = time.time()
            shared.start.value = now + options.warmup
            shared.end.value = shared.start.value + options.seconds
            shared.go.set()
            self._wait(name, now, shared.start.value, shared.progress)
            cpu_before = [_cpu_seconds(pid) for pid in (*pids, *clients)]
            self._wait(name, now, shared.end.value, shared.progress)
            used = [_cpu_seconds(pid) - before for pid, before in zip((*pids, *clients), cpu_before, strict=True)]
            per_worker, client_cpu = used[: len(pids)], float(sum(used[len(pids) :]))
            rss = max(_peak_rss_bytes(pid) for pid in pids)
            collected = []
            for _ in processes:
                try:
                    collected.append(shared.results.get(timeout=CALL_TIMEOUT_SECONDS + DRAIN_TIMEOUT_SECONDS))
                except Exception as error:
                    raise BenchError("a load generator did not report (see its error above)") from error
        finally:
            _join(processes)
        return _merge(collected), per_worker, client_cpu, rss

    def _wait(self, name: str, began: float, until: float, progress: Any) -> None:
        """Sleep until `until` (epoch seconds), showing the phase's progress and completed cycles."""
        total = self.options.warmup + self.options.seconds
        if not self.show_progress:
            time.sleep(max(0.0, until - time.time()))
            return
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[cycles]:>8,} done"))
        with Progress(*columns, TimeRemainingColumn(), console=self.console, transient=True) as bar:
            task = bar.add_task(name, total=total, cycles=0)
            while (left := until - time.time()) > 0:
                bar.update(task, completed=time.time() - began, cycles=progress.value)
                time.sleep(min(left, PROGRESS_INTERVAL_SECONDS))


def _slots(consumers: Sequence[ConsumerSpec], count: int, bills: slice) -> tuple[Slot, ...]:
    """`count` slots of consumers, each consumer with its `bills` slice (one phase's share)."""
    share = [ConsumerSpec(c.party_id, c.seed, c.key_set, c.account_id, c.bills[bills]) for c in consumers]
    return tuple(tuple(share[index::count]) for index in range(count))


def _config(options: BenchOptions, prepared_seconds: float) -> dict[str, Any]:
    config = asdict(options)
    config["state_dir"] = None if options.state_dir is None else str(options.state_dir)
    config["cpus"] = os.cpu_count()
    config["uvloop"] = _has_uvloop()
    config["prepare_seconds"] = prepared_seconds
    config["durability"] = DURABILITY.get(options.store, GIVEN_DATABASE)
    if options.store.startswith(POSTGRES_SCHEMES):
        config["store"] = "postgresql://…"  # the URL may carry a password: never in the report
    return config


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report as a few lines for people."""
    parley = report["parley"]
    lines = [_phase_line("Parley", parley)]
    disk = report["config"].get("state_dir_fdatasync_ms")
    if disk is not None:
        lines.insert(
            0,
            f"state directory's disk: fdatasync p50 {disk['p50']:.2f} ms p99 {disk['p99']:.2f} ms "
            f"max {disk['max']:.1f} ms ({disk['syncs']} syncs)",
        )
    if "half_load" in parley:
        lines.append(_phase_line("Parley at half load", parley["half_load"]))
    if "baseline" in report:
        lines.append(_phase_line("baseline (verify + sign)", report["baseline"]))
        ratio = report["ratio"]
        lines.append(
            f"Parley/baseline: throughput {ratio['throughput']:.2f}, "
            f"CPU per signed message {ratio['cpu_per_message']:.2f}"
        )
    return lines


def _phase_line(label: str, phase: dict[str, Any]) -> str:
    latency = phase["latency_ms"]
    errors = sum(phase["errors"].values())
    return (
        f"{label}: {phase['cycles_per_second']:,.1f} cycles/s, "
        f"{phase['signed_messages_per_second']:,.0f} signed msgs/s, "
        f"p50 {latency['p50']:.1f} ms p95 {latency['p95']:.1f} ms p99 {latency['p99']:.1f} ms, "
        f"server CPU {phase['server_cpu_us_per_signed_message']:.0f} µs/msg, "
        f"peak RSS {phase['worker_peak_rss_mib']:.0f} MiB"
        + (f", {errors} failed" if errors else "")
        + (f", {phase['bills_exhausted']} consumers ran out of bills" if phase["bills_exhausted"] else "")
    )


def run_bench(
    options: BenchOptions, console: Console, *, json_path: Path | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Run the bench, print the summary, write the JSON report if asked; returns the report."""
    report = Bench(options, console, show_progress=show_progress).run()
    for line in summary_lines(report):
        console.print(line)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


__all__ = [
    "Bench",
    "BenchError",
    "BenchOptions",
    "InstantRailBiller",
    "add_bench_command",
    "bench_policy",
    "percentile",
    "run_bench",
    "store_url",
    "summary_lines",
]


# === The command =========================================================================================


def add_bench_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`parley bench`."""
    defaults = BenchOptions()
    bench = commands.add_parser(
        "bench",
        help="complete signed negotiations per second against a bare signed-RPC baseline (docs/PERFORMANCE.md)",
    )
    bench.add_argument("--seconds", type=float, default=defaults.seconds, help="measured seconds per phase")
    bench.add_argument("--warmup", type=float, default=defaults.warmup, help="seconds before measuring, per phase")
    bench.add_argument("--concurrency", type=int, default=defaults.concurrency, help="concurrent cycles (slots)")
    bench.add_argument("--workers", type=int, default=defaults.workers, help="biller processes sharing the port")
    bench.add_argument("--load-generators", type=int, default=defaults.load_generators, help="client processes")
    bench.add_argument("--channels", type=int, default=defaults.channels, help="channels per load generator")
    bench.add_argument(
        "--store",
        default=defaults.store,
        metavar="sqlite|postgres|URL",
        help="a SQLite file (durable), a throwaway PostgreSQL (fsync off), or an empty PostgreSQL database's URL",
    )
    bench.add_argument("--prefill", type=int, default=0, metavar="N", help="bulk-load N agreements first")
    bench.add_argument("--rate", type=float, help="cycles/s to offer instead of as fast as possible")
    bench.add_argument("--no-half-load", action="store_true", help="skip the phase at half of the peak rate")
    bench.add_argument("--no-baseline", action="store_true", help="skip the bare signed-RPC baseline")
    bench.add_argument(
        "--max-rate", type=float, default=defaults.max_rate, help="cycles/s the bills issued beforehand can cover"
    )
    bench.add_argument(
        "--disk-probe",
        type=float,
        default=defaults.disk_probe_seconds,
        metavar="SECONDS",
        help="time fdatasync in the state directory first (0: skip)",
    )
    bench.add_argument(
        "--state-dir",
        type=directory_argument,  # checked now, not at its mkdir after the biller's start
        metavar="DIR",
        help="keep the store here (default: a temporary directory)",
    )
    add_json_options(bench, "the report")
    bench.set_defaults(handler=_bench_command)


def _bench_command(args: argparse.Namespace, out: Console) -> int:
    options = BenchOptions(
        seconds=args.seconds,
        warmup=args.warmup,
        concurrency=args.concurrency,
        workers=args.workers,
        load_generators=args.load_generators,
        channels=args.channels,
        store=args.store,
        prefill=args.prefill,
        rate=args.rate,
        half_load=not args.no_half_load,
        baseline=not args.no_baseline,
        state_dir=args.state_dir,
        max_rate=args.max_rate,
        disk_probe_seconds=args.disk_probe,
    )
    try:
        report = run_bench(options, out)
    except BenchError as error:
        out.print(f"[red]bench: {error}[/red]")
        return 2
    emit_json(args, report, out)
    return 0
