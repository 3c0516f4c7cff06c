"""The reference biller's configuration, from a TOML file (see reference_biller/sample.toml).

Loading validates everything up front: an unknown key, a missing key, a wrong
type or an amount that is not exact money in the biller's currency is a
`ConfigError` naming the key, so a typo never silently changes a policy. So is
what `serve` would otherwise misread: an account id that is empty, longer than
the protocol allows (MAX_ID_CHARS) or given twice; a `rail` other than the one
the reference biller implements (`simulated`); an early-payment discount larger
than the segment's smallest instalment (an incentive to pay early is a nudge of
a few percent; anything larger is almost surely a misplaced digit, and the
smallest payment the biller bothers to collect is a bound it already states);
a listen address whose port is outside 0-65535. `parley biller check-config`
runs exactly this, so it refuses everything `serve` would.

The optional `[simulation]` table turns on the monthly sample bills and sets the
upkeep interval (`Simulation`); `[[webhooks]]` lists outbound webhook endpoints
(`Webhook`, reference_biller/webhooks.py).

The optional `[server]` table holds serve options (listen address, state
directory, metrics address, log format and level, shutdown grace, TLS files,
tracing); a command-line flag or a PARLEY_* environment variable overrides each
(`reference_biller.settings`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property, partial
from pathlib import Path
from typing import Any, TypeVar

from agent.listen import parse_listen
from agent.logs import LOG_FORMATS, LOG_LEVELS
from agent.protocol.errors import LocalProtocolError
from agent.protocol.limits import MAX_ID_CHARS
from agent.protocol.messages import is_party_id
from agent.protocol.terms import Currency, Money
from agent.stores import check_store_location

T = TypeVar("T")
SAMPLE = Path(__file__).with_name("sample.toml")
RAILS = ("simulated",)
"""The payment rails the reference biller implements (reference_biller/rail.py's RAIL_NAME)."""
MAX_PORT = 65535
DEFAULT_UPKEEP_INTERVAL = timedelta(seconds=5)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


@dataclass(frozen=True)
class Hardship:
    programme_id: str
    description: str
    fees_waived: bool
    max_deferral_days: int
    max_instalments: int
    min_instalment_amount: Money
    max_interval_days: int
    max_first_delay_days: int
    requires_disclosure: bool


@dataclass(frozen=True)
class Segment:
    """The rules for one group of customers."""

    name: str
    deferral_max_days: int
    deferral_fee: Money
    instalment_max_count: int
    instalment_min_amount: Money
    instalment_min_interval_days: int
    instalment_max_interval_days: int
    instalment_max_first_delay_days: int
    instalment_fee: Money
    early_payment_days_before_due: int
    early_payment_discount: Money
    settlement_floor_percent: int
    hardship: tuple[Hardship, ...]


@dataclass(frozen=True)
class Payments:
    payee_name: str
    payee_account: str
    rail: str
    reference_prefix: str
    settlement_delay: timedelta


@dataclass(frozen=True)
class Reminders:
    before_due_days: int
    after_due_days: tuple[int, ...]  # one per escalation level: courteous, firm, final
    grace_days: int


@dataclass(frozen=True)
class Account:
    account_id: str
    holder: str
    segment: str


@dataclass(frozen=True)
class ServerSettings:
    """The optional [server] table: how `parley biller serve` runs; None where the file says nothing."""

    listen: str | None = None
    state_dir: str | None = None
    store: str | None = None
    metrics_listen: str | None = None
    log_format: str | None = None
    log_level: str | None = None
    shutdown_grace_seconds: float | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    otel: bool | None = None
    max_connections: int | None = None
    max_connections_per_address: int | None = None
    idle_timeout_seconds: float | None = None
    handshake_timeout_seconds: float | None = None


@dataclass(frozen=True)
class Simulation:
    """The optional [simulation] table: what the reference biller makes up on its own (demo, tests).

    `sample_bills`: once a month, a sample bill to each enrolled configured account
    (off unless asked for: a real deployment's bills come from `issue-bill`,
    `import` or the back-office API). `upkeep_interval`: how often `serve` runs its
    upkeep (simulated settlements, sample bills, reminders, purges).
    """

    sample_bills: bool = False
    upkeep_interval: timedelta = DEFAULT_UPKEEP_INTERVAL


WEBHOOK_EVENTS = ("agreement_reached", "arrangement_broken", "payment_received", "renegotiation_offered")
"""The outcomes an outbound webhook can report (reference_biller/webhooks.py)."""


@dataclass(frozen=True)
class Webhook:
    """One [[webhooks]] endpoint: where to POST, with which secrets (the first signs; all are sent during a
    rotation), for which outcomes."""

    url: str
    secret_files: tuple[str, ...]
    events: tuple[str, ...] = WEBHOOK_EVENTS


@dataclass(frozen=True)
class BillerConfig:
    party_id: str
    name: str
    currency: Currency
    payments: Payments
    reminders: Reminders
    segments: Mapping[str, Segment]
    accounts: tuple[Account, ...]
    server: ServerSettings = field(default_factory=ServerSettings)
    simulation: Simulation = field(default_factory=Simulation)
    webhooks: tuple[Webhook, ...] = ()
    stored_segments: Mapping[str, str] = field(default_factory=dict)
    """Segments recorded in the store for accounts added with `parley biller accounts add`
    (`reference_biller.accounts.with_stored_segments`); not part of the configuration file."""

    @cached_property
    def _configured_segments(self) -> dict[str, str]:
        return {account.account_id: account.segment for account in self.accounts}

    def segment_of(self, account_id: str) -> Segment:
        """The segment whose options the account's bills advertise: the configuration's for a configured
        account, else the one recorded when it was added, else the default ("standard", or the first).
        A dictionary lookup: the policy asks on every bill and every offer, whatever the number of accounts."""
        name = self._configured_segments.get(account_id) or self.stored_segments.get(account_id)
        if name is not None and name in self.segments:
            return self.segments[name]
        return self.segments["standard"] if "standard" in self.segments else next(iter(self.segments.values()))


def check_listen(text: str) -> str:
    """`text` if it is HOST:PORT with a port in 0-65535 (0: any free port); else ValueError saying which."""
    port = text.rpartition(":")[2]
    if port.isdigit() and int(port) > MAX_PORT:
        raise ValueError(f"port {port} in {text!r} is out of range: a port is 0-{MAX_PORT} (0: any free port)")
    parse_listen(text)
    return text


class _Table:
    """A TOML table read key by key; anything left unread is an unknown key."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'the file'}: expected a table")
        self.data: dict[str, Any] = data
        self.path = path
        self.read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type[T], default: T | None = None) -> T:
        self.read.add(name)
        if name not in self.data:
            if default is None:
                raise ConfigError(f"{self.key(name)}: missing")
            return default
        value = self.data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self.key(name)}: expected {kind.__name__}, got {value!r}")
        return value

    def optional(self, name: str, kind: type[T]) -> T | None:
        """The value, or None when the key is absent."""
        self.read.add(name)
        return self.get(name, kind) if name in self.data else None

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        value = self.optional(name, str)
        if value is not None and value.lower() not in choices:
            raise ConfigError(f"{self.key(name)}: expected one of {', '.join(choices)}, got {value!r}")
        return None if value is None else value.lower()

    def seconds(self, name: str) -> float | None:
        self.read.add(name)
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{self.key(name)}: expected a number of seconds (0 or more), got {value!r}")
        return float(value)

    def count(self, name: str) -> int | None:
        """A whole number 1 or more, or None when the key is absent."""
        self.read.add(name)
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{self.key(name)}: expected a whole number 1 or more, got {value!r}")
        return value

    def address(self, name: str) -> str | None:
        value = self.optional(name, str)
        if value is not None:
            try:
                check_listen(value)
            except ValueError as error:
                raise ConfigError(f"{self.key(name)}: {error}") from error
        return value

    def store(self, name: str) -> str | None:
        value = self.optional(name, str)
        if value is not None:
            try:
                check_store_location(value)
            except ValueError as error:
                raise ConfigError(f"{self.key(name)}: {error}") from error
        return value

    def natural(self, name: str, default: int | None = None, *, minimum: int = 0) -> int:
        value = self.get(name, int, default)
        if value < minimum:
            raise ConfigError(f"{self.key(name)}: must be at least {minimum}, got {value}")
        return value

    def money(self, name: str, currency: Currency, default: str | None = None) -> Money:
        value = self.data.get(name, default)
        if isinstance(value, int | float) and not isinstance(value, bool):  # a TOML number: maybe already inexact
            raise ConfigError(
                f'{self.key(name)}: write amounts as quoted decimal text, e.g. {name} = "{value}", '
                f"not the TOML number {value!r} (numbers are not exact money)"
            )
        text = self.get(name, str, default)
        try:
            return Money.parse(text, currency.code)
        except LocalProtocolError as error:  # keep the parser's reason: "has more than 2 decimals for EUR"...
            reason = error.detail.removeprefix(f"{text!r} ").removeprefix("is ")
            raise ConfigError(f"{self.key(name)}: {text!r} is not an amount in {currency.code} ({reason})") from error

    def table(self, name: str) -> _Table:
        self.read.add(name)
        return _Table(self.data.get(name, {}), self.key(name))

    def tables(self, name: str) -> list[_Table]:
        self.read.add(name)
        items = self.data.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(f"{self.key(name)}: expected an array of tables")
        return [_Table(item, f"{self.key(name)}[{i}]") for i, item in enumerate(items)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _each(table: _Table, build: Callable[[_Table], T]) -> T:
    result = build(table)
    table.done()
    return result


def _hardship(t: _Table, currency: Currency) -> Hardship:
    return Hardship(
        programme_id=t.get("id", str),
        description=t.get("description", str),
        fees_waived=t.get("fees_waived", bool),
        max_deferral_days=t.natural("max_deferral_days"),
        max_instalments=t.natural("max_instalments"),
        min_instalment_amount=t.money("min_instalment_amount", currency),
        max_interval_days=t.natural("max_interval_days"),
        max_first_delay_days=t.natural("max_first_delay_days"),
        requires_disclosure=t.get("requires_disclosure", bool),
    )


def _segment(name: str, t: _Table, currency: Currency) -> Segment:
    segment = Segment(
        name=name,
        deferral_max_days=t.natural("deferral_max_days"),
        deferral_fee=t.money("deferral_fee", currency, "0"),
        instalment_max_count=t.natural("instalment_max_count", minimum=2),
        instalment_min_amount=t.money("instalment_min_amount", currency),
        instalment_min_interval_days=t.natural("instalment_min_interval_days", minimum=1),
        instalment_max_interval_days=t.natural("instalment_max_interval_days", minimum=1),
        instalment_max_first_delay_days=t.natural("instalment_max_first_delay_days"),
        instalment_fee=t.money("instalment_fee", currency, "0"),
        early_payment_days_before_due=t.natural("early_payment_days_before_due", 0),
        early_payment_discount=t.money("early_payment_discount", currency, "0"),
        settlement_floor_percent=t.natural("settlement_floor_percent", 100),
        hardship=tuple(_each(h, lambda h: _hardship(h, currency)) for h in t.tables("hardship")),
    )
    if segment.instalment_min_interval_days > segment.instalment_max_interval_days:
        raise ConfigError(f"{t.key('instalment_min_interval_days')}: larger than instalment_max_interval_days")
    if segment.settlement_floor_percent > 100:
        raise ConfigError(f"{t.key('settlement_floor_percent')}: must be at most 100")
    if segment.early_payment_discount > segment.instalment_min_amount:
        raise ConfigError(
            f"{t.key('early_payment_discount')}: {segment.early_payment_discount} is more than the segment's "
            f"smallest instalment ({segment.instalment_min_amount}); an early-payment discount is a small nudge"
        )
    return segment


def _server(t: _Table) -> ServerSettings:
    return ServerSettings(
        listen=t.address("listen"),
        state_dir=t.optional("state_dir", str),
        store=t.store("store"),
        metrics_listen=t.address("metrics_listen"),
        log_format=t.choice("log_format", LOG_FORMATS),
        log_level=t.choice("log_level", LOG_LEVELS),
        shutdown_grace_seconds=t.seconds("shutdown_grace_seconds"),
        tls_cert=t.optional("tls_cert", str),
        tls_key=t.optional("tls_key", str),
        tls_client_ca=t.optional("tls_client_ca", str),
        otel=t.optional("otel", bool),
        max_connections=t.count("max_connections"),
        max_connections_per_address=t.count("max_connections_per_address"),
        idle_timeout_seconds=_positive(t, "idle_timeout_seconds"),
        handshake_timeout_seconds=_positive(t, "handshake_timeout_seconds"),
    )


def _positive(t: _Table, name: str) -> float | None:
    """A number of seconds above 0 (a connection idle for 0 s would be closed as it opens), or None."""
    value = t.seconds(name)
    if value == 0:
        raise ConfigError(f"{t.key(name)}: expected a number of seconds above 0, got 0")
    return value


def _simulation(t: _Table) -> Simulation:
    interval = t.seconds("upkeep_interval_seconds")
    if interval is not None and interval <= 0:
        raise ConfigError(f"{t.key('upkeep_interval_seconds')}: must be more than 0 seconds")
    return Simulation(
        sample_bills=t.get("sample_bills", bool, False),
        upkeep_interval=DEFAULT_UPKEEP_INTERVAL if interval is None else timedelta(seconds=interval),
    )


def _webhook(t: _Table) -> Webhook:
    url = t.get("url", str)
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise ConfigError(f"{t.key('url')}: {url!r} is not an http:// or https:// URL")
    secret_files = t.get("secret_files", list)
    if not secret_files or not all(isinstance(name, str) and name for name in secret_files):
        raise ConfigError(
            f"{t.key('secret_files')}: expected one or more file names (the first signs; list the old one "
            "too while receivers switch)"
        )
    events = t.get("events", list, list(WEBHOOK_EVENTS))
    unknown = [name for name in events if name not in WEBHOOK_EVENTS]
    if unknown or not events:
        raise ConfigError(f"{t.key('events')}: expected some of {', '.join(WEBHOOK_EVENTS)}, got {events!r}")
    return Webhook(url, tuple(secret_files), tuple(events))


def parse_config(data: Mapping[str, Any]) -> BillerConfig:
    """Validate a parsed TOML document."""
    root = _Table(dict(data), "")
    biller = root.table("biller")
    party_id = biller.get("party_id", str)
    if not is_party_id(party_id):
        raise ConfigError(f"biller.party_id: {party_id!r} is not a party id (1-128 of A-Z a-z 0-9 . _ : -)")
    code = biller.get("currency", str)
    try:
        currency = Currency.of(code)
    except LocalProtocolError as error:
        raise ConfigError(f"biller.currency: {code!r} is not an ISO 4217 currency with minor units") from error
    name = biller.get("name", str)
    biller.done()

    payments = _each(
        root.table("payments"),
        lambda t: Payments(
            payee_name=t.get("payee_name", str),
            payee_account=t.get("payee_account", str),
            rail=t.get("rail", str, "simulated"),
            reference_prefix=t.get("reference_prefix", str, "PAY"),
            settlement_delay=timedelta(hours=t.natural("settlement_delay_hours", 24)),
        ),
    )
    if payments.rail not in RAILS:
        raise ConfigError(
            f"payments.rail: {payments.rail!r} is not a rail this biller has: use one of {', '.join(RAILS)}"
        )
    reminders = _each(
        root.table("reminders"),
        lambda t: Reminders(
            before_due_days=t.natural("before_due_days", 3),
            after_due_days=tuple(t.get("after_due_days", list, [1, 7, 14])),
            grace_days=t.natural("grace_days", 3),
        ),
    )
    if len(reminders.after_due_days) != 3 or not all(isinstance(d, int) and d > 0 for d in reminders.after_due_days):
        raise ConfigError("reminders.after_due_days: expected three positive day counts (courteous, firm, final)")

    segments_table = root.table("segments")
    segments = {
        name: _each(segments_table.table(name), partial(_segment, name, currency=currency))
        for name in list(segments_table.data)
    }
    segments_table.done()
    if not segments:
        raise ConfigError("segments: at least one segment is needed")
    accounts = tuple(
        _each(t, lambda t: Account(t.get("id", str), t.get("holder", str), t.get("segment", str, "standard")))
        for t in root.tables("accounts")
    )
    first_index: dict[str, int] = {}
    for index, account in enumerate(accounts):
        if not 1 <= len(account.account_id) <= MAX_ID_CHARS:
            raise ConfigError(
                f"accounts[{index}].id: {account.account_id!r} must be 1 to {MAX_ID_CHARS} characters "
                "(the protocol's limit for ids)"
            )
        if account.account_id in first_index:
            raise ConfigError(
                f"accounts[{index}].id: {account.account_id!r} is already accounts[{first_index[account.account_id]}]"
                "'s id: each account once"
            )
        first_index[account.account_id] = index
        if account.segment not in segments:
            raise ConfigError(f"accounts[{index}].segment: no segment named {account.segment!r}")
    server = _each(root.table("server"), _server)
    simulation = _each(root.table("simulation"), _simulation)
    webhooks = tuple(_each(t, _webhook) for t in root.tables("webhooks"))
    urls = [webhook.url for webhook in webhooks]
    for index, url in enumerate(urls):
        if url in urls[:index]:
            raise ConfigError(f"webhooks[{index}].url: {url!r} is listed twice: each endpoint once")
    root.done()
    return BillerConfig(party_id, name, currency, payments, reminders, segments, accounts, server, simulation, webhooks)


def load_config(path: Path = SAMPLE) -> BillerConfig:
    """Read and validate a TOML configuration file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}): save the file as UTF-8") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    return parse_config(data)
