"""A runnable reference biller: configuration → keys → store → BillerAgent → gRPC server, plus its upkeep.

    config = load_config()                                  # reference_biller/sample.toml
    await run_biller(config, listen="127.0.0.1:7443", state_dir=Path("state"),
                     clock=SystemClock(), insecure=True)    # until cancelled

`state_dir` holds everything the biller keeps: its Ed25519 signing key
(`biller.key`, mode 0600), its key set chain (`biller-keyset-v<N>.pb`, one
serialized envelope per version) and, unless `--store` names another (a
PostgreSQL database shared by replicas), its SQLite store (`biller.sqlite`). The
first run creates the key and key set version 1, whose digest is the biller's
identity fingerprint (KEY-12); later runs load them, and a key set close to its
expiry is renewed as the next version, signed by the current key (KEY-9): see
agent/identity.py, which the reference consumer shares.

While serving, `Biller.maintain` runs every `interval` (`[simulation]
upkeep_interval_seconds`, 5 s by default): the accounts added with `parley
biller accounts add` are folded into the configuration, the simulated rail's due
settlements (receipts and PAYMENT_RECEIVED), this month's sample bill for each
enrolled configured account (only with `[simulation] sample_bills = true`), the
scheduler's reminders and missed-instalment handling, and (hourly) the agent's
retention purge. Outbound webhooks (`[[webhooks]]`) run as a task of their own
(reference_biller/webhooks.py).

A serving biller holds a shared `flock` on `serve.lock` in its state directory
for its whole life (`serve_lock`; replicas sharing the directory share it);
`parley biller rotate-key` takes it exclusively without waiting
(`exclusive_lock`), so it refuses while any biller serves that directory (the
serving process keeps its old key in memory, and what it signs after the
rotation would no longer verify), and a biller does not start mid-rotation.
A start that fails (port in use, unreachable store...) removes the state
directory it had just created, so a retry with the right options starts clean.

Serving follows docs/OPERATIONS.md: health says NOT_SERVING until the first
upkeep round is done, then SERVING; `metrics_listen` serves the agent's
Prometheus metrics over HTTP; leaving the `async with` block (SIGTERM in the
CLI) is a graceful stop — NOT_SERVING, event streams ended, no new calls,
in-flight calls given `shutdown_grace` seconds — and then the store is closed
(WAL checkpointed).

With `conformance_control=True` — and only then (CNF-1) — the same server also
serves `ConformanceControlService` (§16) and Hello announces the
"conformance-control" feature (CNF-3); the clock must then be one that can be
advanced (`SteppableClock`), and the biller says loudly in its log that it must
not be used in production (CNF-2).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import grpc

from agent.biller import FEATURES, BillerAgent
from agent.clock import Clock, SystemClock
from agent.conformance.control import ConformanceControlServicer, SteppingClock
from agent.identity import Identity, IdentityDir
from agent.listen import is_loopback
from agent.metrics import MetricsEndpoint, serve_metrics
from agent.protocol.keys import SigningKey
from agent.stores import SqlBillerStore, open_biller_store
from agent.stores.files import load_or_create_secret
from agent.transport.server import (
    DEFAULT_CONNECTION_LIMITS,
    DEFAULT_SHUTDOWN_GRACE,
    BillerServer,
    ConnectionLimits,
    freeze_startup_heap,
    serve_biller,
)
from parley.v1 import conformance_control_service_pb2 as cc
from parley.v1 import conformance_control_service_pb2_grpc as cc_grpc
from parley.v1 import envelope_pb2
from reference_biller import sample, scheduler
from reference_biller.accounts import with_stored_segments
from reference_biller.config import DEFAULT_UPKEEP_INTERVAL, BillerConfig
from reference_biller.policy import SegmentPolicy
from reference_biller.rail import SimulatedRail
from reference_biller.webhooks import Endpoint, WebhookDispatcher

logger = logging.getLogger("parley.reference_biller")

CONFORMANCE_FEATURE = "conformance-control"
STORE_FILE = "biller.sqlite"
SERVE_LOCK_FILE = "serve.lock"
DEFAULT_INTERVAL = DEFAULT_UPKEEP_INTERVAL
PURGE_INTERVAL = timedelta(hours=1)


# --- Clocks ------------------------------------------------------------------------------------------


class SteppableClock:
    """Real time plus an offset that only grows: time flows, and `advance` jumps ahead (for CNF-4)."""

    def __init__(self, base: Clock | None = None) -> None:
        self._base = base or SystemClock()
        self._offset = timedelta(0)

    def now(self) -> datetime:
        return self._base.now() + self._offset

    def advance(self, delta: timedelta) -> datetime:
        """Move forward by `delta` (ValueError if negative); returns the new time."""
        if delta < timedelta(0):
            raise ValueError(f"a clock does not go backwards (advance by {delta})")
        self._offset += delta
        return self.now()


# --- Identity ----------------------------------------------------------------------------------------


def identity_dir(state_dir: Path) -> IdentityDir:
    """Where the biller keeps its key and key set chain (agent/identity.py): `biller.key`, `biller-keyset-v<N>.pb`."""
    return IdentityDir(state_dir, "biller")


class StateDirInUse(OSError):
    """The state directory's `serve.lock` is held: a biller serves it (or a key rotation is under way)."""


@contextlib.contextmanager
def _flock(state_dir: Path, mode: int, busy: str) -> Iterator[None]:
    descriptor = os.open(state_dir / SERVE_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirInUse(busy) from None
        yield
    finally:
        os.close(descriptor)  # releases the lock


def serve_lock(state_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Held while a biller serves `state_dir` (shared: replicas may share it); StateDirInUse during a rotation."""
    return _flock(
        state_dir,
        fcntl.LOCK_SH,
        f"{state_dir} is locked by a key rotation (parley biller rotate-key): start the biller once it is done",
    )


def exclusive_lock(state_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Held by an offline command that must not run beside a serving biller; StateDirInUse if one serves."""
    return _flock(
        state_dir,
        fcntl.LOCK_EX,
        f"a biller is serving {state_dir} ({SERVE_LOCK_FILE} is held): stop every biller using it first",
    )


# --- The assembled biller ----------------------------------------------------------------------------


@dataclass
class Biller:
    """A reference biller assembled from its configuration, not necessarily serving."""

    config: BillerConfig
    agent: BillerAgent
    store: SqlBillerStore
    rail: SimulatedRail
    clock: Clock
    state_dir: Path
    key: SigningKey
    seed: int = sample.DEFAULT_SEED
    policy: SegmentPolicy | None = None  # its config: `config` plus the segments of accounts added since
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _last_purge: datetime | None = field(default=None, init=False)

    @property
    def fingerprint(self) -> bytes:
        return self.agent.key_chain.fingerprint

    async def maintain(self) -> list[envelope_pb2.Envelope]:
        """One round of upkeep at the clock's time; returns the receipts and events it signed."""
        async with self._lock:
            now = self.clock.now()
            identity = Identity(self.key, self.agent.key_chain)
            renewed = await asyncio.to_thread(identity_dir(self.state_dir).renew, identity, now)
            self.agent.key_chain = renewed.chain
            await self.refresh_segments()
            signed = await self.rail.settle_due(self.agent, now)
            if self.config.simulation.sample_bills:  # to the configuration file's accounts only
                await sample.bill_enrolled_accounts(self.agent, self.store, self.config, now.date(), seed=self.seed)
            # Every account that owes something, however it was made (configuration, `accounts add`, the
            # back-office API, conformance control): the scheduler reads them in one query.
            signed += await scheduler.tick(self.agent, self.config, now, store=self.store, rail=self.rail)
            if self._last_purge is None or now - self._last_purge >= PURGE_INTERVAL:
                await self.agent.purge_expired()
                self._last_purge = now
            return signed

    async def refresh_segments(self) -> None:
        """Give the policy the segments of the accounts added by `parley biller accounts add` (in any process
        sharing the store) since the last round."""
        if self.policy is not None:
            self.policy.config = await with_stored_segments(self.config, self.store)

    async def close(self) -> None:
        await self.store.close()


async def open_biller(
    config: BillerConfig,
    state_dir: Path,
    clock: Clock,
    *,
    conformance_control: bool = False,
    seed: int = sample.DEFAULT_SEED,
    store_location: str | None = None,
    create_identity: bool = True,
) -> Biller:
    """Load or create the identity, open the store, build the agent and create the configured accounts.

    `store_location` is a path or URL for `open_biller_store` (e.g. a PostgreSQL database shared by replicas);
    by default the SQLite file `STORE_FILE` in `state_dir`. With `create_identity=False` (offline commands)
    a state directory without an identity is NoIdentityError, and nothing is created.
    """
    now = clock.now()
    identities = identity_dir(state_dir)
    load = identities.load if create_identity else identities.load_existing
    identity = await asyncio.to_thread(load, config.party_id, now)
    store = await open_biller_store(state_dir / STORE_FILE if store_location is None else store_location)
    try:
        rail = SimulatedRail(config.payments)
        policy = SegmentPolicy(config)
        agent = BillerAgent(
            party_id=config.party_id,
            signing_key=identity.key,
            key_sets=identity.chain,
            store=store,
            policy=policy,
            rail=rail,
            clock=clock,
            features=(*FEATURES, CONFORMANCE_FEATURE) if conformance_control else FEATURES,
            enrolment_secret=load_or_create_secret(state_dir / "enrolment.secret"),  # ENR-8: not in the store
        )
        await sample.ensure_accounts(agent, config)
        await rail.restore(agent)  # intents instructed before a restart are still matched and settled
    except BaseException:
        await store.close()
        raise
    biller = Biller(config, agent, store, rail, clock, state_dir, identity.key, seed, policy)
    try:
        await biller.refresh_segments()
    except BaseException:
        await store.close()
        raise
    return biller


# --- Serving -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningBiller:
    """A biller serving on `host:port`; `metrics` is its /metrics endpoint when one was asked for."""

    biller: Biller
    server: grpc.aio.Server
    host: str
    port: int
    tls: bool
    serving: BillerServer | None = None
    metrics: MetricsEndpoint | None = None
    mutual_tls: bool = False  # clients must present a certificate from the configured client CA

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


async def _upkeep(biller: Biller, interval: timedelta, ready: Callable[[], Awaitable[None]]) -> None:
    """Upkeep every `interval`; `ready` is awaited once, after the first round (health turns SERVING)."""
    first = True
    while True:
        try:
            await biller.maintain()
        except Exception:
            logger.exception("biller upkeep failed; retrying in %s", interval)
        if first:
            first = False
            await ready()
        await asyncio.sleep(interval.total_seconds())


@asynccontextmanager
async def serving_biller(
    config: BillerConfig,
    *,
    listen: str,
    state_dir: Path,
    clock: Clock,
    tls: tuple[bytes, bytes] | None = None,
    tls_client_ca: bytes | None = None,
    insecure: bool = False,
    conformance_control: bool = False,
    interval: timedelta | None = None,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    seed: int = sample.DEFAULT_SEED,
    metrics_listen: str | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    store_location: str | None = None,
    webhooks: Sequence[Endpoint] = (),
    connection_limits: ConnectionLimits = DEFAULT_CONNECTION_LIMITS,
) -> AsyncIterator[RunningBiller]:
    """Serve a reference biller for the duration of the `async with` block, then shut it down cleanly.

    `tls` is (certificate chain PEM, private key PEM); `tls_client_ca` (PEM) makes
    it mutual TLS, refusing clients without a certificate from that CA (TRN-9).
    Plaintext needs `insecure=True` and a loopback `listen` host (TRN-2): anything
    else is ValueError before anything is opened, as is a client CA without TLS
    and conformance control with a clock that cannot advance.
    `metrics_listen` ("host:port") serves Prometheus metrics over HTTP;
    `interceptors` are added to the gRPC server (e.g. `agent.tracing`'s);
    `store_location` is as for `open_biller`; `interval` (default: the configuration's
    `[simulation] upkeep_interval_seconds`) is the upkeep's; `webhooks` are delivered by a
    `WebhookDispatcher` task of their own, so no protocol step waits for a receiver. On
    leaving the block the stop is graceful: calls in flight get `shutdown_grace`
    seconds to finish. `connection_limits` bound connections (TRN-10, TRN-11).
    """
    host = listen.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if tls is None and not insecure:
        raise ValueError("TLS is required (TRN-2): give a certificate and key, or choose plaintext on loopback")
    if tls is not None and insecure:
        raise ValueError("choose either TLS or plaintext, not both")
    if tls_client_ca is not None and tls is None:
        raise ValueError("mutual TLS (a client CA) needs TLS: give a certificate and key too")
    if insecure and not is_loopback(host):
        raise ValueError(f"plaintext is allowed only on a loopback address (TRN-2), not {host!r}")
    stepping = clock if isinstance(clock, SteppingClock) else None
    if conformance_control and stepping is None:
        raise ValueError("conformance control needs a clock that can be advanced (SteppableClock or ManualClock)")

    if state_dir.exists() and not state_dir.is_dir():
        raise ValueError(f"the state directory {state_dir} is a file, not a directory")
    fresh = not state_dir.exists()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with serve_lock(state_dir):
            async with _serving(
                config,
                listen=listen,
                host=host,
                state_dir=state_dir,
                clock=clock,
                stepping=stepping,
                tls=tls,
                tls_client_ca=tls_client_ca,
                insecure=insecure,
                conformance_control=conformance_control,
                interval=interval,
                shutdown_grace=shutdown_grace,
                seed=seed,
                metrics_listen=metrics_listen,
                interceptors=interceptors,
                store_location=store_location,
                webhooks=webhooks,
                connection_limits=connection_limits,
            ) as running:
                fresh = False  # it served: what it made is the biller's from now on
                yield running
    except BaseException:
        if fresh:  # nothing served from it: leave no key or database behind a failed start
            shutil.rmtree(state_dir, ignore_errors=True)
        raise


@asynccontextmanager
async def _serving(
    config: BillerConfig,
    *,
    listen: str,
    host: str,
    state_dir: Path,
    clock: Clock,
    stepping: SteppingClock | None,
    tls: tuple[bytes, bytes] | None,
    tls_client_ca: bytes | None,
    insecure: bool,
    conformance_control: bool,
    interval: timedelta | None,
    shutdown_grace: float,
    seed: int,
    metrics_listen: str | None,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    store_location: str | None,
    webhooks: Sequence[Endpoint],
    connection_limits: ConnectionLimits,
) -> AsyncIterator[RunningBiller]:
    """`serving_biller` once its arguments are checked and the state directory is locked."""
    biller = await open_biller(
        config, state_dir, clock, conformance_control=conformance_control, seed=seed, store_location=store_location
    )
    services: list[Callable[[grpc.aio.Server], None]] = []
    service_names: list[str] = []
    if conformance_control:
        assert stepping is not None
        servicer = ConformanceControlServicer(biller, stepping)
        services.append(lambda server: cc_grpc.add_ConformanceControlServiceServicer_to_server(servicer, server))
        service_names.append(cc.DESCRIPTOR.services_by_name["ConformanceControlService"].full_name)
        logger.warning(
            "CONFORMANCE CONTROL ENABLED: this biller mints accounts, bills, time and payments on request; "
            "never use it in production (CNF-2)"
        )
        if not is_loopback(host):
            logger.warning("conformance control is reachable from the network at %s: keep it on a test network", host)
    upkeep: asyncio.Task[None] | None = None
    dispatching: asyncio.Task[None] | None = None
    metrics: MetricsEndpoint | None = None
    try:
        if metrics_listen is not None:
            try:
                metrics = await serve_metrics(biller.agent.metrics.registry, metrics_listen)
            except OSError as error:
                raise OSError(f"cannot serve metrics on {metrics_listen}: {error.strerror or error}") from error
            logger.info("metrics on %s", metrics.url)
        try:
            running = await serve_biller(
                biller.agent,
                listen,
                tls=tls,
                tls_client_ca=tls_client_ca,
                insecure=insecure,
                services=services,
                service_names=service_names,
                interceptors=interceptors,
                serving=False,  # NOT_SERVING until the first upkeep round is done
                connection_limits=connection_limits,
            )
        except RuntimeError as error:  # gRPC says only "Failed to bind to address"; the CLI checked the TLS files
            raise OSError(
                f"cannot listen on {listen}: the port is in use or the address is not this machine's"
            ) from error
        try:
            every = config.simulation.upkeep_interval if interval is None else interval
            upkeep = asyncio.create_task(_upkeep(biller, every, running.set_serving), name="parley-biller-upkeep")
            if webhooks:
                dispatcher = WebhookDispatcher(biller.store, config.party_id, webhooks, clock)
                dispatching = asyncio.create_task(dispatcher.run(), name="parley-biller-webhooks")
            yield RunningBiller(
                biller, running.server, host, running.port, tls is not None, running, metrics, tls_client_ca is not None
            )
        finally:
            for task in (upkeep, dispatching):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await running.stop(shutdown_grace)
            logger.info("biller %s stopped", config.party_id)
    finally:
        if metrics is not None:
            await metrics.close()
        await biller.close()
        logger.info("biller %s store closed", config.party_id)


async def run_biller(
    config: BillerConfig,
    *,
    listen: str,
    state_dir: Path,
    clock: Clock,
    tls: tuple[bytes, bytes] | None = None,
    tls_client_ca: bytes | None = None,
    insecure: bool = False,
    conformance_control: bool = False,
    interval: timedelta | None = None,
    on_ready: Callable[[RunningBiller], None] | None = None,
    seed: int = sample.DEFAULT_SEED,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    metrics_listen: str | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    store_location: str | None = None,
    webhooks: Sequence[Endpoint] = (),
    connection_limits: ConnectionLimits = DEFAULT_CONNECTION_LIMITS,
) -> None:
    """Serve until cancelled (the CLI cancels on SIGTERM/SIGINT), then shut down gracefully.

    `on_ready` is called once the server listens (e.g. to print the address).
    See `serving_biller` for the arguments.
    """
    async with serving_biller(
        config,
        listen=listen,
        state_dir=state_dir,
        clock=clock,
        tls=tls,
        tls_client_ca=tls_client_ca,
        insecure=insecure,
        conformance_control=conformance_control,
        interval=interval,
        seed=seed,
        shutdown_grace=shutdown_grace,
        metrics_listen=metrics_listen,
        interceptors=interceptors,
        store_location=store_location,
        webhooks=webhooks,
        connection_limits=connection_limits,
    ) as running:
        if on_ready is not None:
            on_ready(running)
        freeze_startup_heap()
        await asyncio.Event().wait()


__all__ = [
    "CONFORMANCE_FEATURE",
    "SERVE_LOCK_FILE",
    "Biller",
    "RunningBiller",
    "StateDirInUse",
    "SteppableClock",
    "exclusive_lock",
    "identity_dir",
    "open_biller",
    "run_biller",
    "serve_lock",
    "serving_biller",
]
