"""The bench's cycle against the biller in one process, without gRPC: biller CPU per signed message, and counts.

    python scripts/inprocess_bench.py                       # 300 cycles: CPU per signed message and per cycle
    python scripts/inprocess_bench.py --cycles 600 --repeat 3
    python scripts/inprocess_bench.py --profile tottime     # + cProfile of the biller's side, top 30
    python scripts/inprocess_bench.py --log json            # with the biller's INFO log lines (to /dev/null)

What runs is `parley bench`'s biller (`agent.tools.bench`: the same policy, rail, instant settlement and
store preparation: consumers enrolled through the real Enrol path, bills issued through the agent) behind
the real `BillerServicer`, its request parsing (`add_biller_service`) and the metrics interceptor, all
called directly with request bytes: what a worker's Python does for a call, without gRPC's C core. A cycle
is the bench's: GetBill, Negotiate (an opening the policy counters), Negotiate (accept), CreatePaymentIntent
(settled at once), GetReceipt; 9 signed messages. The consumer's side (signing requests, verifying every
signed answer, as the bench's load generator) runs in the same process, one cycle at a time; only the
biller's calls are timed (`time.process_time` around each, every thread of the process: the store's
writer thread works only while a call waits for it), so "biller CPU" is the biller's alone.

Counts per cycle, from a second pass under cProfile (main thread only): store calls (a proxy around the
store), Ed25519 verifications and signatures, protobuf parses, serialisations and thread replays.
The figures are for comparing two versions of the code on one machine in one sitting
(docs/PERFORMANCE.md, "Fourth round"); they are not `parley bench` figures.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import logging
import pstats
import re
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from agent.conformance.peers import PeerIdentity, SignedParty
from agent.logs import configure_logging
from agent.metrics import MetricsInterceptor
from agent.protocol.dsse import digest, sign_envelope, verify_signature
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.messages import open_envelope
from agent.protocol.terms import Money, Terms
from agent.stores import SQLITE_SCHEME, BillerStore, open_biller_store
from agent.tools.bench import (
    BILLER_ID,
    SIGNED_PER_CYCLE,
    ConsumerSpec,
    _now,
    bench_agent,
    opening_terms,
    prepare_store,
)
from agent.transport.server import BillerServicer, add_biller_service, install_uvloop
from parley.v1 import bill_pb2, biller_service_pb2, envelope_pb2, negotiation_pb2, payment_pb2

# LIM-8: 20 signed requests/s per party (burst 40). A cycle is 5 of them, so at a few hundred cycles a
# second every party must come round less than 4 times a second: enough consumers, played in turn.
CONSUMERS = 96
WARM_UP_CYCLES = 100
ROOT = Path(__file__).resolve().parent.parent
SERVICE = "/parley.v1.BillerService/"


class CountingStore:
    """The store, with every call to it counted by method name."""

    def __init__(self, store: BillerStore) -> None:
        self._store = store
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


class _Context:
    """What the servicer and the metrics interceptor ask of a gRPC servicer context on a successful call."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def code(self) -> None:
        return None

    async def abort_with_status(self, status: Any) -> None:
        raise RuntimeError(f"the biller refused a bench request: {status}")


class _Server:
    """Collects what `add_biller_service` registers."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.handlers.extend(handlers)


@dataclass(frozen=True)
class _Details:
    method: str
    invocation_metadata: tuple[()] = ()


Call = Callable[[bytes, Any], Awaitable[Message]]


async def biller_calls(agent: Any) -> dict[str, tuple[Call, Callable[[Message], bytes]]]:
    """Each BillerService method as the server runs it: parse the bytes, the servicer, the metrics interceptor."""
    server = _Server()
    add_biller_service(BillerServicer(agent), server)  # type: ignore[arg-type]
    interceptor = MetricsInterceptor(agent.metrics)
    calls: dict[str, tuple[Call, Callable[[Message], bytes]]] = {}
    for method in ("GetBill", "Negotiate", "CreatePaymentIntent", "GetReceipt"):
        details = _Details(SERVICE + method)

        async def found(details: Any) -> Any:
            for handler in server.handlers:
                handler_ = handler.service(details)
                if handler_ is not None:
                    return handler_
            return None

        handler = await interceptor.intercept_service(found, details)  # type: ignore[arg-type]
        assert handler is not None
        assert handler.unary_unary is not None
        assert handler.response_serializer is not None
        calls[method] = (handler.unary_unary, handler.response_serializer)
    return calls


class Cycles:
    """The bench's cycle, the consumer side in this process, the biller's calls timed."""

    def __init__(self, calls: dict[str, tuple[Call, Callable[[Message], bytes]]], chain: KeyChain) -> None:
        self.calls = calls
        self.chain = chain
        self.biller_cpu = 0.0  # every thread of the process, during the biller's calls
        self.loop_cpu = 0.0  # the event loop's thread alone
        self.by_method: dict[str, float] = dict.fromkeys(self.calls, 0.0)
        self.profile: cProfile.Profile | None = None

    async def call(self, method: str, request: Message, peer: str, response_type: type[Message]) -> Any:
        data = request.SerializeToString()  # what the consumer sends (not the biller's work)
        handler, serialize = self.calls[method]
        started, started_loop = time.process_time(), time.thread_time()
        if self.profile is not None:
            self.profile.enable()
        answer = serialize(await handler(data, _Context(peer)))
        if self.profile is not None:
            self.profile.disable()
        self.loop_cpu += time.thread_time() - started_loop
        spent = time.process_time() - started
        self.biller_cpu += spent
        self.by_method[method] += spent
        return response_type.FromString(answer)

    def open(self, envelope: envelope_pb2.Envelope, expected: type[Any], party: SignedParty) -> Any:
        return open_envelope(envelope, (expected,), sender_keys=self.chain, recipient=party.party_id, now=_now())

    async def cycle(self, consumer: ConsumerSpec, party: SignedParty, bill_id: str, peer: str) -> None:
        account_id = consumer.account_id
        pb = biller_service_pb2
        query = party.query(account_id, bill_id=bill_id)
        got = await self.call("GetBill", pb.GetBillRequest(query=query), peer, pb.GetBillResponse)
        bill = self.open(got.bill, bill_pb2.Bill, party)
        amount, due = Money.from_proto(bill.message.amount_due), date.fromisoformat(bill.message.due_date)
        opening = party.open(bill_id, bill.digest, opening_terms(amount, due).to_proto())
        answer = await self.call("Negotiate", pb.NegotiateRequest(move=opening), peer, pb.NegotiateResponse)
        counter = self.open(answer.reply, negotiation_pb2.Offer, party)
        accept = party.move([opening, answer.reply], negotiation_pb2.Accept(offer_digest=counter.digest))
        agreed = await self.call("Negotiate", pb.NegotiateRequest(move=accept), peer, pb.NegotiateResponse)
        assert agreed.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_AGREED, agreed
        first = Terms.from_proto(counter.message.terms).schedule[0].amount
        intent_id = f"i-{secrets.token_hex(8)}"
        intent = party.intent(account_id, bill_id, intent_id, first.to_proto(), agreement_digest=digest(accept))
        request = pb.CreatePaymentIntentRequest(intent=intent)
        paid = await self.call("CreatePaymentIntent", request, peer, pb.CreatePaymentIntentResponse)
        assert Money.from_proto(self.open(paid.instructions, payment_pb2.PaymentInstructions, party).message.amount)
        query = party.query(account_id, intent_id=intent_id)
        got_receipt = await self.call("GetReceipt", pb.GetReceiptRequest(query=query), peer, pb.GetReceiptResponse)
        receipt = self.open(got_receipt.receipt, payment_pb2.Receipt, party)
        assert Money.from_proto(receipt.message.amount_received) == first


# What the profile's call counts are read for (substrings of pstats' function names).
_COUNTED = {
    "Ed25519 verify": r"crypto_sign_open>$",
    "Ed25519 sign": r"_sodium\.crypto_sign>$",
    "protobuf parses": r"(FromString|ParseFromString)",
    "protobuf serialisations": r"SerializeToString",
    "SHA-256": r"openssl_sha256",
    "thread replays (Negotiation.replay)": r"protocol/negotiation\.py:\d+\(replay\)",
    "KeyChain.verify": r"keysets\.py:\d+\(verify\)",
    "log_step": r"logs\.py:\d+\(log_step\)",
    "SQL statements on the loop": r"'execute' of 'sqlite3",
}


def _counts(profile: cProfile.Profile, cycles: int) -> dict[str, float]:
    stats = pstats.Stats(profile)
    totals: Counter[str] = Counter()
    for (file, line, name), (_cc, calls, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        label = f"{file}:{line}({name})" if file != "~" else name
        for what, pattern in _COUNTED.items():
            if re.search(pattern, label):
                totals[what] += calls
    return {what: totals[what] / cycles for what in _COUNTED}


async def run(args: argparse.Namespace) -> int:
    if args.log != "none":
        configure_logging(args.log, "info", open("/dev/null", "w"))  # noqa: SIM115 - for the whole run
    else:
        logging.getLogger().setLevel(logging.WARNING)
    if args.state_dir is not None:  # a directory to put the throwaway store in (e.g. on tmpfs): made if missing
        Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="parley-inproc-", dir=args.state_dir))
    url = f"{SQLITE_SCHEME}{state_dir / 'biller.db'}"
    identity = PeerIdentity.create(BILLER_ID, _now())
    cycles_run = min(args.cycles, WARM_UP_CYCLES) + args.cycles * (args.repeat + 1)  # warm-up, timed, counting
    bills_needed = -(-cycles_run // CONSUMERS) + 1
    consumers = await prepare_store(url, identity, CONSUMERS, bills_needed)
    store = CountingStore(await open_biller_store(url))
    try:
        agent = bench_agent(identity, store)
        cycles = Cycles(await biller_calls(agent), KeyChain.verify([stored for stored in identity_chain(identity)]))
        parties = [consumer.party() for consumer in consumers]
        peers = [f"ipv4:10.0.{index // 250}.{index % 250 + 1}:4{index:04d}" for index in range(CONSUMERS)]
        next_bill = [0] * CONSUMERS
        turn = 0

        async def batch(count: int) -> None:
            nonlocal turn
            for _ in range(count):
                index = turn % CONSUMERS
                turn += 1
                bill_id = consumers[index].bills[next_bill[index]]
                next_bill[index] += 1
                await cycles.cycle(consumers[index], parties[index], bill_id, peers[index])

        gc.collect()
        gc.freeze()  # as a serving process does (freeze_startup_heap)
        await batch(min(args.cycles, WARM_UP_CYCLES))  # warm-up: caches, the store's pages
        cycles.by_method = dict.fromkeys(cycles.calls, 0.0)
        per_message: list[float] = []
        loop_share: list[float] = []
        calibrations: list[float] = []
        for _ in range(args.repeat):
            before = calibration()
            cycles.biller_cpu = cycles.loop_cpu = 0.0
            await batch(args.cycles)
            per_message.append(cycles.biller_cpu / (args.cycles * SIGNED_PER_CYCLE) * 1e6)
            loop_share.append(cycles.loop_cpu / (args.cycles * SIGNED_PER_CYCLE) * 1e6)
            calibrations.append((before + calibration()) / 2)
        by_method = dict(cycles.by_method)
        store.calls.clear()
        cycles.profile = cProfile.Profile(time.thread_time)  # the loop thread's CPU, not the wall clock
        writer_profile = cProfile.Profile(time.thread_time)  # the store's writer thread, one commit at a time
        sqlite_store: Any = store._store
        group_commit = sqlite_store._group_commit
        sqlite_store._group_commit = lambda: writer_profile.runcall(group_commit)
        await batch(args.cycles)
        profile = cycles.profile
        cycles.profile = None
        del sqlite_store._group_commit
    finally:
        await store._store.close()
        shutil.rmtree(state_dir, ignore_errors=True)

    print(f"cycles per pass: {args.cycles} (bench cycle, 9 signed messages each); passes: {args.repeat}")
    print("biller CPU per signed message, each pass: " + ", ".join(f"{value:.0f} µs" for value in per_message))
    best, median = min(per_message), statistics.median(per_message)
    print(f"biller CPU per signed message: best {best:.0f} µs, median {median:.0f} µs")
    # The machine's speed of the moment (other processes, frequency, caches): CPU per message in units of a
    # fixed workload timed around each pass, to compare versions measured minutes apart on a shared machine.
    relative = [value / unit for value, unit in zip(per_message, calibrations, strict=True)]
    print(f"biller CPU per signed message in calibration units: median {statistics.median(relative):.3f}")
    print(f"biller CPU per cycle: best {best * SIGNED_PER_CYCLE / 1000:.2f} ms")
    print(f"  of which the event loop's thread: median {statistics.median(loop_share):.0f} µs per signed message")
    timed = args.cycles * args.repeat
    print(
        "biller CPU per cycle by call (all timed passes): "
        + ", ".join(f"{method} {spent / timed * 1e6:.0f} µs" for method, spent in by_method.items())
    )
    print("per cycle (counting pass):")
    print(f"  store calls: {sum(store.calls.values()) / args.cycles:.1f}")
    for name, count in sorted(store.calls.items()):
        print(f"    {name}: {count / args.cycles:.2f}")
    for what, per_cycle in _counts(profile, args.cycles).items():
        print(f"  {what}: {per_cycle:.2f}")
    loop_calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
    writer_calls = pstats.Stats(writer_profile).total_calls  # type: ignore[attr-defined]
    print(f"  Python function calls (cProfile, deterministic): loop {loop_calls / args.cycles:.0f}, ", end="")
    print(f"store writer {writer_calls / args.cycles:.0f}")
    writer_cpu = pstats.Stats(writer_profile).total_tt  # type: ignore[attr-defined]
    print(f"  the writer thread's CPU in its commits: {writer_cpu / args.cycles * 1000:.2f} ms (under the profiler)")
    if args.profile:
        for title, stats in (("the event loop's thread", profile), ("the store's writer thread", writer_profile)):
            out = io.StringIO()
            pstats.Stats(stats, stream=out).sort_stats(args.profile).print_stats(args.top)
            print(f"--- {title} ---\n{out.getvalue()}")
    if args.callers:
        pstats.Stats(profile).sort_stats("cumtime").print_callers(args.callers)
    if args.by_file:
        for title, stats in (("the event loop's thread", profile), ("the store's writer thread", writer_profile)):
            files: dict[str, float] = {}
            for (file, _line, name), (_cc, _calls, own, *_rest) in pstats.Stats(stats).stats.items():  # type: ignore[attr-defined]
                where = name if file == "~" else file.rpartition("site-packages/")[2].removeprefix(str(ROOT))
                files[where] = files.get(where, 0.0) + own
            total = sum(files.values())
            print(f"--- {title}: own time by file, of {total / args.cycles * 1000:.2f} ms per cycle ---")
            for file, own in sorted(files.items(), key=lambda item: -item[1])[: args.top]:
                print(f"  {own / total:6.1%}  {file}")
    return 0


_CALIBRATION_KEY = SigningKey.from_seed(bytes(32))
_CALIBRATION_ENVELOPE = sign_envelope(_CALIBRATION_KEY, "parley.calibration", bytes(300))


def calibration() -> float:
    """CPU-milliseconds of a fixed mix like the biller's (interpreted Python, protobuf, SQLite, Ed25519)."""
    started = time.process_time()
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    db.executemany("INSERT INTO t VALUES (?, ?)", ((k, bytes(64)) for k in range(500)))
    for round_ in range(600):
        verify_signature(_CALIBRATION_ENVELOPE, _CALIBRATION_KEY.public_key)
        envelope_pb2.Envelope.FromString(_CALIBRATION_ENVELOPE.SerializeToString())
        db.execute("SELECT v FROM t WHERE k = ?", (round_,)).fetchone()
        sum(index * index for index in range(200))
    db.close()
    return (time.process_time() - started) * 1000


def identity_chain(identity: PeerIdentity) -> list[envelope_pb2.Envelope]:
    return [envelope_pb2.Envelope.FromString(data) for data in identity.key_sets]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=300, help="cycles per pass (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes (default 3)")
    parser.add_argument("--profile", choices=("tottime", "cumtime", "ncalls"), help="print the profile, sorted")
    parser.add_argument("--top", type=int, default=30, help="profile lines (default 30)")
    parser.add_argument("--callers", default="", help="print the loop profile's callers of functions matching this")
    parser.add_argument("--by-file", action="store_true", help="print the profiles' own time summed by file")
    parser.add_argument("--log", choices=("none", "text", "json"), default="none", help="biller log at INFO")
    parser.add_argument("--state-dir", default=None, help="where the SQLite file goes (default: the temp dir)")
    args = parser.parse_args()
    install_uvloop()  # as the bench's workers
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
