"""The reference biller's configuration, from a TOML file (see reference_biller/sample.toml).

Loading validates everything up front: an unknown key, a missing key, a wrong
type or an amount that is not exact money in the biller's currency is a
`ConfigError` naming the key, so a typo never silently changes a policy. So is
what `serve` would otherwise misread: an account id that `parley biller accounts
add` would refuse (`ID_PATTERN`) or given twice; a holder, biller name, payee or
payment reference prefix that is blank; a `rail` other than the one the
reference biller implements (`simulated`); an early-payment discount larger
than the segment's smallest instalment (an incentive to pay early is a nudge of
a few percent; anything larger is almost surely a misplaced digit, and the
smallest payment the biller bothers to collect is a bound it already states);
a hardship programme a bill could not carry (its id empty, too long or repeated);
a listen address whose port is outside 0-65535. `parley biller check-config`
runs exactly this, so it refuses everything `serve` would.

Every number has an allowed range (`WholeRange`, `SecondsRange`), finite and
bounded above, so that no value overflows what it later becomes (a timedelta,
gRPC's C int of milliseconds, a uint32 in a signed bill) and crashes a command,
or is accepted here only to have every bill refused: the options a segment
advertises are bounded by what a bill can carry, the biller's own day counts by
the protocol's terms horizon (TRM-19), the serve options by what gRPC and a
process can take. A boolean is not a number here (TOML tells them apart; Python's
bool is an int). The serve options' ranges are also those of their flags and
PARLEY_* variables (reference_biller/settings.py).

The optional `[simulation]` table turns on the monthly sample bills and sets the
upkeep interval (`Simulation`); `[[webhooks]]` lists outbound webhook endpoints
(`Webhook`, reference_biller/webhooks.py).

The optional `[server]` table holds serve options (listen address, state
directory, metrics address, log format and level, shutdown grace, TLS files,
tracing); a command-line flag or a PARLEY_* environment variable overrides each
(`reference_biller.settings`).
"""

from __future__ import annotations

import re
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
from agent.protocol.limits import MAX_ID_CHARS, MAX_TERMS_HORIZON_DAYS, MAX_TEXT_CHARS
from agent.protocol.messages import is_party_id
from agent.protocol.terms import UINT32_MAX, Currency, Money
from agent.stores import check_store_location
from agent.transport.server import MAX_CONNECTIONS_LIMIT, MAX_GRPC_DURATION

T = TypeVar("T")
SAMPLE = Path(__file__).with_name("sample.toml")
RAILS = ("simulated",)
"""The payment rails the reference biller implements (reference_biller/rail.py's RAIL_NAME)."""
MAX_PORT = 65535
DEFAULT_UPKEEP_INTERVAL = timedelta(seconds=5)
ID_PATTERN = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_CHARS}}}")
"""An account (or bill) id the reference biller uses: it survives a URI, a CSV file and a paper bill. One rule for
the configuration's [[accounts]], `parley biller accounts add` and intake (reference_biller/accounts.py, intake.py)."""
ID_RULE = f"1 to {MAX_ID_CHARS} characters of A-Z a-z 0-9 . _ : -"
MAX_HOLDER_CHARS = 200


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


@dataclass(frozen=True)
class WholeRange:
    """The whole numbers a setting may take, `least` to `most`: the one rule for it (see the module)."""

    least: int
    most: int
    unit: str
    why: str = ""  # why `most` is what it is, for the message

    def __str__(self) -> str:
        why = f" ({self.why})" if self.why else ""
        return f"a whole number of {self.unit} from {self.least:,} to {self.most:,}{why}"

    def check(self, value: object) -> int:
        """`value` if it is a whole number in range; else ValueError saying what is allowed."""
        if isinstance(value, bool) or not isinstance(value, int) or not self.least <= value <= self.most:
            raise ValueError(f"expected {self}, got {value!r}")
        return value

    def parse(self, text: str) -> int:
        """The whole number `text` says, if in range (a flag's or variable's value)."""
        try:
            return self.check(int(text))
        except ValueError:
            raise ValueError(f"expected {self}, got {text!r}") from None


@dataclass(frozen=True)
class SecondsRange:
    """The numbers of seconds a setting may take: 0 (or, if `above_zero`, more than 0) to `most`."""

    most: int
    above_zero: bool = False
    why: str = ""  # why `most` is what it is, for the message

    def __str__(self) -> str:
        least = "above 0" if self.above_zero else "0 or more"
        why = f" ({self.why})" if self.why else ""
        return f"a number of seconds {least} and at most {self.most:,}{why}"

    def check(self, value: object) -> float:
        """`value` as a float if it is a number of seconds in range; else ValueError saying what is allowed."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected {self}, got {value!r}")
        least_ok = value > 0 if self.above_zero else value >= 0
        if not (least_ok and value <= self.most):  # NaN fails every comparison, so it is refused too
            raise ValueError(f"expected {self}, got {value!r}")
        return float(value)

    def parse(self, text: str) -> float:
        """The seconds `text` says, if in range (a flag's or variable's value)."""
        try:
            return self.check(float(text))
        except ValueError:
            raise ValueError(f"expected {self}, got {text!r}") from None


# What a bill can carry: every count and day number of its advertised options is a uint32 on the wire, and
# BillFacts refuses a bill whose options do not fit (agent/protocol/terms.py, the same bound). A segment past it
# would have every bill of its accounts refused at issue.
_ON_A_BILL = "the most a bill's options can carry"
ADVERTISED_DAYS = WholeRange(0, UINT32_MAX, "days", _ON_A_BILL)
ADVERTISED_INTERVAL_DAYS = WholeRange(1, UINT32_MAX, "days", _ON_A_BILL)
ADVERTISED_INSTALMENTS = WholeRange(2, UINT32_MAX, "instalments", _ON_A_BILL)
HARDSHIP_INSTALMENTS = WholeRange(0, UINT32_MAX, "instalments", _ON_A_BILL)
# The biller's own day counts (reminders, grace, the early-payment window): no terms name a date more than
# MAX_TERMS_HORIZON_DAYS after the due date (TRM-19), so a longer count could never apply to a bill.
_HORIZON = "the protocol's terms horizon, TRM-19"
BILLER_DAYS = WholeRange(0, MAX_TERMS_HORIZON_DAYS, "days", _HORIZON)
REMINDER_DAYS = WholeRange(1, MAX_TERMS_HORIZON_DAYS, "days", _HORIZON)
PERCENT = WholeRange(0, 100, "percent")
SETTLEMENT_DELAY_HOURS = WholeRange(0, 366 * 24, "hours", "a year")
UPKEEP_INTERVAL = SecondsRange(86_400, above_zero=True, why="a day: each day's reminders are sent by an upkeep round")
SHUTDOWN_GRACE = SecondsRange(86_400, why="a day")
CONNECTION_TIMEOUT = SecondsRange(
    int(MAX_GRPC_DURATION.total_seconds()), above_zero=True, why="gRPC takes it as a C int of milliseconds"
)
CONNECTIONS = WholeRange(
    1, MAX_CONNECTIONS_LIMIT, "connections", "a process holds no more sockets than its open-file limit, ulimit -n"
)
CONNECTIONS_PER_ADDRESS = WholeRange(1, MAX_CONNECTIONS_LIMIT, "connections", "the most a process may hold in all")


def holder_name(text: str) -> str:
    """An account holder's name as kept: `text` without surrounding blanks; ValueError unless that is 1 to
    MAX_HOLDER_CHARS characters. One rule for [[accounts]] and `parley biller accounts add`."""
    holder = text.strip()
    if not 0 < len(holder) <= MAX_HOLDER_CHARS:
        raise ValueError(f"the holder name must be 1 to {MAX_HOLDER_CHARS} characters (not blank), got {text!r}")
    return holder


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

    def text(self, name: str, default: str | None = None) -> str:
        """A string that is not blank: a blank name or account would reach bills and payment instructions."""
        value = self.get(name, str, default)
        if not value.strip():
            raise ConfigError(f"{self.key(name)}: must not be empty, got {value!r}")
        return value

    def optional_text(self, name: str) -> str | None:
        """A string that is not blank, or None when the key is absent (a blank path would name the working
        directory)."""
        self.read.add(name)
        return self.text(name) if name in self.data else None

    def seconds(self, name: str, bounds: SecondsRange) -> float | None:
        """A number of seconds within `bounds`, or None when the key is absent."""
        self.read.add(name)
        if name not in self.data:
            return None
        try:
            return bounds.check(self.data[name])
        except ValueError as error:
            raise ConfigError(f"{self.key(name)}: {error}") from None

    def whole(self, name: str, bounds: WholeRange, default: int | None = None) -> int:
        """A whole number within `bounds` (`default` when absent; without one the key is required)."""
        value = self.get(name, int, default)
        try:
            return bounds.check(value)
        except ValueError as error:
            raise ConfigError(f"{self.key(name)}: {error}") from None

    def optional_whole(self, name: str, bounds: WholeRange) -> int | None:
        """A whole number within `bounds`, or None when the key is absent."""
        self.read.add(name)
        return self.whole(name, bounds) if name in self.data else None

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
    # The id and description are signed into every bill of the segment: the protocol's bounds (BillFacts).
    programme_id = t.get("id", str)
    if not 1 <= len(programme_id) <= MAX_ID_CHARS:
        raise ConfigError(f"{t.key('id')}: {programme_id!r} must be 1 to {MAX_ID_CHARS} characters")
    description = t.get("description", str)
    if len(description) > MAX_TEXT_CHARS:
        raise ConfigError(f"{t.key('description')}: {len(description)} characters; at most {MAX_TEXT_CHARS}")
    return Hardship(
        programme_id=programme_id,
        description=description,
        fees_waived=t.get("fees_waived", bool),
        max_deferral_days=t.whole("max_deferral_days", ADVERTISED_DAYS),
        max_instalments=t.whole("max_instalments", HARDSHIP_INSTALMENTS),
        min_instalment_amount=t.money("min_instalment_amount", currency),
        max_interval_days=t.whole("max_interval_days", ADVERTISED_DAYS),
        max_first_delay_days=t.whole("max_first_delay_days", ADVERTISED_DAYS),
        requires_disclosure=t.get("requires_disclosure", bool),
    )


def _segment(name: str, t: _Table, currency: Currency) -> Segment:
    segment = Segment(
        name=name,
        deferral_max_days=t.whole("deferral_max_days", ADVERTISED_DAYS),
        deferral_fee=t.money("deferral_fee", currency, "0"),
        instalment_max_count=t.whole("instalment_max_count", ADVERTISED_INSTALMENTS),
        instalment_min_amount=t.money("instalment_min_amount", currency),
        instalment_min_interval_days=t.whole("instalment_min_interval_days", ADVERTISED_INTERVAL_DAYS),
        instalment_max_interval_days=t.whole("instalment_max_interval_days", ADVERTISED_INTERVAL_DAYS),
        instalment_max_first_delay_days=t.whole("instalment_max_first_delay_days", ADVERTISED_DAYS),
        instalment_fee=t.money("instalment_fee", currency, "0"),
        early_payment_days_before_due=t.whole("early_payment_days_before_due", BILLER_DAYS, 0),
        early_payment_discount=t.money("early_payment_discount", currency, "0"),
        settlement_floor_percent=t.whole("settlement_floor_percent", PERCENT, 100),
        hardship=tuple(_each(h, lambda h: _hardship(h, currency)) for h in t.tables("hardship")),
    )
    if segment.instalment_min_interval_days > segment.instalment_max_interval_days:
        raise ConfigError(f"{t.key('instalment_min_interval_days')}: larger than instalment_max_interval_days")
    ids = [programme.programme_id for programme in segment.hardship]
    for index, programme_id in enumerate(ids):
        if programme_id in ids[:index]:  # a bill names each programme once (BillFacts)
            raise ConfigError(f"{t.key('hardship')}[{index}].id: {programme_id!r} is listed twice: each programme once")
    if segment.early_payment_discount > segment.instalment_min_amount:
        raise ConfigError(
            f"{t.key('early_payment_discount')}: {segment.early_payment_discount} is more than the segment's "
            f"smallest instalment ({segment.instalment_min_amount}); an early-payment discount is a small nudge"
        )
    return segment


def _server(t: _Table) -> ServerSettings:
    return ServerSettings(
        listen=t.address("listen"),
        state_dir=t.optional("state_dir", str),  # an empty one: refused where it is resolved (settings)
        store=t.store("store"),
        metrics_listen=t.address("metrics_listen"),
        log_format=t.choice("log_format", LOG_FORMATS),
        log_level=t.choice("log_level", LOG_LEVELS),
        shutdown_grace_seconds=t.seconds("shutdown_grace_seconds", SHUTDOWN_GRACE),
        tls_cert=t.optional_text("tls_cert"),
        tls_key=t.optional_text("tls_key"),
        tls_client_ca=t.optional_text("tls_client_ca"),
        otel=t.optional("otel", bool),
        max_connections=t.optional_whole("max_connections", CONNECTIONS),
        max_connections_per_address=t.optional_whole("max_connections_per_address", CONNECTIONS_PER_ADDRESS),
        # above 0: a connection idle for 0 s would be closed as it opens
        idle_timeout_seconds=t.seconds("idle_timeout_seconds", CONNECTION_TIMEOUT),
        handshake_timeout_seconds=t.seconds("handshake_timeout_seconds", CONNECTION_TIMEOUT),
    )


def _simulation(t: _Table) -> Simulation:
    interval = t.seconds("upkeep_interval_seconds", UPKEEP_INTERVAL)
    return Simulation(
        sample_bills=t.get("sample_bills", bool, False),
        upkeep_interval=DEFAULT_UPKEEP_INTERVAL if interval is None else timedelta(seconds=interval),
    )


def _account(t: _Table) -> Account:
    account_id = t.get("id", str)
    if not ID_PATTERN.fullmatch(account_id):  # what `parley biller accounts add` refuses, refused here too
        raise ConfigError(f"{t.key('id')}: {account_id!r} is not usable: {ID_RULE}")
    try:
        holder = holder_name(t.get("holder", str))
    except ValueError as error:
        raise ConfigError(f"{t.key('holder')}: {error}") from None
    return Account(account_id, holder, t.get("segment", str, "standard"))


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
    name = biller.text("name")
    biller.done()

    payments = _each(
        root.table("payments"),
        lambda t: Payments(
            payee_name=t.text("payee_name"),
            payee_account=t.text("payee_account"),
            rail=t.get("rail", str, "simulated"),
            reference_prefix=t.text("reference_prefix", "PAY"),
            settlement_delay=timedelta(hours=t.whole("settlement_delay_hours", SETTLEMENT_DELAY_HOURS, 24)),
        ),
    )
    if payments.rail not in RAILS:
        raise ConfigError(
            f"payments.rail: {payments.rail!r} is not a rail this biller has: use one of {', '.join(RAILS)}"
        )
    reminders = _each(
        root.table("reminders"),
        lambda t: Reminders(
            before_due_days=t.whole("before_due_days", BILLER_DAYS, 3),
            after_due_days=tuple(t.get("after_due_days", list, [1, 7, 14])),
            grace_days=t.whole("grace_days", BILLER_DAYS, 3),
        ),
    )
    if len(reminders.after_due_days) != 3:
        raise ConfigError("reminders.after_due_days: expected three positive day counts (courteous, firm, final)")
    for index, days in enumerate(reminders.after_due_days):
        try:
            REMINDER_DAYS.check(days)
        except ValueError as error:
            raise ConfigError(f"reminders.after_due_days[{index}]: {error}") from None

    segments_table = root.table("segments")
    segments = {
        name: _each(segments_table.table(name), partial(_segment, name, currency=currency))
        for name in list(segments_table.data)
    }
    segments_table.done()
    if not segments:
        raise ConfigError("segments: at least one segment is needed")
    accounts = tuple(_each(t, _account) for t in root.tables("accounts"))
    first_index: dict[str, int] = {}
    for index, account in enumerate(accounts):
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
