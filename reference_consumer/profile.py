"""A household's profile: money, pay day, outgoings, mandate limits and billers, from TOML.

The profile is everything the reference consumer's strategy knows about the household
it works for. It is read from a TOML file (see `sample.toml` beside this module) with
`load_profile`, or built from an already parsed mapping with `parse_profile`. Both
refuse anything doubtful with a `ProfileError` naming the exact key, in the form
`mandate.max_fee: "ten" is not an amount in EUR`:

- every amount is an exact decimal *string* in the household's currency ("850.00"),
  read with `Money.parse`; TOML numbers are refused for amounts, so no binary float
  ever touches money (TRM-15);
- unknown keys are errors, so a typo (`max_fees`) cannot silently drop a limit;
- required keys must be present; `household.hardship`, `[[expenses]]`,
  `mandate.latest_date` and `[billers]` are optional.

A biller's table may also say how to reach it, for `parley consumer run`
(`reference_consumer.runner`): `target` ("host:port"), `fingerprint` (the
biller's identity fingerprint, hex, pinned at enrolment, KEY-12), `account_id`,
`code` (the one-time enrolment code, used on the first run only), and either
`ca_file` (the PEM trust anchors for the biller's TLS certificate; a relative
path is read from the profile's directory) or `insecure = true` (plaintext,
loopback targets only, TRN-3); with neither, TLS is verified against the
system's roots. `server_name` overrides the name checked against the
certificate. `target`, `fingerprint` and `account_id` go together: a biller
with none of them is only ranked, not contacted.

Instead of `target`, `fingerprint`, `account_id` and `code`, a biller's table may
carry `uri`, the `parley:enrol?...` link the biller printed (ENR-8); its `biller`
must be the table's party id. `name` is how the household calls the biller in
what it reads (default: the party id without its `biller:` prefix).

`[notifications]` (optional) is how the person wants to hear news: `command`
(an argument list run with the notification's JSON on its standard input)
and/or `webhook` (a URL the JSON is POSTed to, https unless on loopback, signed
with the shared secret in `secret_file`), for the `kinds` chosen (default all:
see `NOTIFICATION_KINDS`).

For billers that require mutual TLS (TRN-9), `household.client_certificate`
and `household.client_key` (both or neither; PEM files, relative paths read
from the profile's directory) are the household's TLS client certificate,
presented to every biller that asks for one. The key file must not be
readable by group or others.

Parsing does no I/O beyond `load_profile` reading the one file (the CA file is
read by the runner), and never reads the clock.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from agent.consumer.enrolment import InvalidEnrolmentLink, parse_enrolment_uri
from agent.consumer.mandate import Mandate as Mandate  # noqa: PLC0414 - re-exported: the profile holds the agent's one mandate (NEG-20)
from agent.listen import is_endpoint, is_loopback
from agent.protocol.enrolment import ENROLMENT_CODE_ALPHABET, normalize_enrolment_code
from agent.protocol.errors import LocalProtocolError
from agent.protocol.limits import DIGEST_BYTES, MAX_ID_CHARS
from agent.protocol.messages import is_party_id
from agent.protocol.terms import Currency, Money, parse_date

_T = TypeVar("_T")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_CODE = re.compile(f"[{ENROLMENT_CODE_ALPHABET}]{{4}}(?:-[{ENROLMENT_CODE_ALPHABET}]{{4}}){{2}}")
_CONNECTION_KEYS = ("target", "fingerprint", "account_id", "code", "ca_file", "insecure", "server_name", "uri")
NOTIFICATION_KINDS = ("new_bill", "approval_needed", "agreement", "payment", "reminder", "missed_instalment")
"""What the person can be notified of: a new bill, a request for approval, an agreement reached, a payment
made, a reminder from a biller, a missed instalment."""
PLACEHOLDER_FINGERPRINT = bytes(DIGEST_BYTES)
"""The all-zero fingerprint of the sample profile (sample.toml), to be replaced by the biller's real one."""


class ProfileError(ValueError):
    """An invalid profile; `key` is the dotted path of the offending key ("" for the whole file)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Income:
    """Net pay of `amount`, arriving every month on `pay_day` (clamped to the month's last day)."""

    amount: Money
    pay_day: int


@dataclass(frozen=True)
class Expense:
    """A recurring monthly outgoing of `amount` on `day` of the month (clamped to the month's last day)."""

    name: str
    amount: Money
    day: int


@dataclass(frozen=True)
class BillerConnection:
    """How to reach one biller and which account to enrol (see the module docstring).

    `code` is None once it is no longer needed (after the first enrolment);
    `ca_file` is None for the system's TLS roots or with `insecure`.
    """

    target: str
    fingerprint: bytes
    account_id: str
    code: str | None = None
    ca_file: Path | None = None
    insecure: bool = False
    server_name: str | None = None


@dataclass(frozen=True)
class BillerPreference:
    """How the household ranks one biller: a lower `priority` is paid first when money is short.

    `connection` is set when the profile also says how to reach the biller.
    """

    biller_id: str
    priority: int
    connection: BillerConnection | None = None
    name: str = ""
    """How the household calls the biller; empty: `Profile.biller_name` makes one from the party id."""


@dataclass(frozen=True)
class Notifications:
    """Where the person wants news: a command (argument list) and/or a signed webhook."""

    command: tuple[str, ...] = ()
    webhook: str | None = None
    secret_file: Path | None = None
    kinds: tuple[str, ...] = NOTIFICATION_KINDS

    @property
    def enabled(self) -> bool:
        return bool(self.command) or self.webhook is not None


@dataclass(frozen=True)
class ClientCertificateFiles:
    """Where the household's TLS client certificate and its private key are (PEM), for mutual-TLS billers."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class Profile:
    """A household: its party id, money now, buffer, income, outgoings, mandate and billers."""

    party_id: str
    currency: str
    balance: Money
    buffer: Money
    income: Income
    expenses: tuple[Expense, ...]
    mandate: Mandate
    billers: tuple[BillerPreference, ...] = ()
    hardship: bool = False
    client_certificate: ClientCertificateFiles | None = None
    notifications: Notifications = Notifications()
    pay_as_billed: bool = False
    """Pay a bill the budget plan pays in full by its due date, inside the mandate, without negotiating
    (no agreement: the bill itself is paid). False: every bill is negotiated, so each payment rests on a
    signed agreement."""

    def priority_of(self, biller_id: str) -> int | None:
        """The priority the household gives this biller, or None when the profile does not rank it."""
        return next((b.priority for b in self.billers if b.biller_id == biller_id), None)

    def biller_name(self, biller_id: str) -> str:
        """What the household calls this biller: its `name`, else the party id without `biller:`."""
        named = next((b.name for b in self.billers if b.biller_id == biller_id and b.name), None)
        return named or default_biller_name(biller_id)

    def connected(self) -> tuple[BillerPreference, ...]:
        """The billers the profile says how to reach, in the profile's order."""
        return tuple(b for b in self.billers if b.connection is not None)


def default_biller_name(biller_id: str) -> str:
    """A party id as a name: "biller:energy.example" → "energy.example"."""
    return biller_id.removeprefix("biller:") or biller_id


# --- parsing -----------------------------------------------------------------------------------


def _key(parent: str, name: str) -> str:
    """The dotted path of `name` under `parent`, quoting names that are not TOML bare keys."""
    part = name if _BARE_KEY.fullmatch(name) else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{parent}.{part}" if parent else part


def _show(value: object) -> str:
    """A value as the user wrote it in TOML, roughly: strings quoted, the rest as Python prints it."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


class _Table:
    """One TOML table being read: refuses unknown keys at once, then hands out the known ones."""

    def __init__(self, path: str, value: object, known: Sequence[str] | None) -> None:
        if not isinstance(value, Mapping):
            raise ProfileError(path, f"expected a table, got {_show(value)}")
        self.path = path
        self.items: dict[str, object] = {str(name): item for name, item in value.items()}
        for name in self.items:
            if known is not None and name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f"; known keys: {', '.join(known)}"
                raise ProfileError(_key(path, name), "unknown key" + hint)

    def get(self, name: str, convert: Callable[[str, object], _T]) -> _T:
        """The required key `name`, converted; ProfileError naming it if it is missing."""
        if name not in self.items:
            raise ProfileError(_key(self.path, name), "missing")
        return convert(_key(self.path, name), self.items[name])

    def optional(self, name: str, convert: Callable[[str, object], _T], default: _T) -> _T:
        """The optional key `name`, converted, or `default` when absent."""
        if name not in self.items:
            return default
        return self.get(name, convert)


def _table(*known: str) -> Callable[[str, object], _Table]:
    """A converter to a table whose only keys are `known` (any keys when none are given)."""
    return lambda key, value: _Table(key, value, known or None)


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(key, f"expected a non-empty string, got {_show(value)}")
    return value


def _party_id(key: str, value: object) -> str:
    if not isinstance(value, str) or not is_party_id(value):
        raise ProfileError(key, f"{_show(value)} is not a party id (1 to 128 characters of A-Z a-z 0-9 . _ : -)")
    return value


def _currency(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ProfileError(key, f'expected an ISO 4217 currency code such as "EUR", got {_show(value)}')
    try:
        return Currency.of(value).code
    except LocalProtocolError:
        raise ProfileError(key, f"{_show(value)} is not an ISO 4217 currency code with minor units") from None


def _amount(code: str) -> Callable[[str, object], Money]:
    def convert(key: str, value: object) -> Money:
        if isinstance(value, int | float) and not isinstance(value, bool):
            example = f"{value:.{Currency.of(code).exponent}f}" if abs(value) < 10**15 else "12.50"
            raise ProfileError(
                key,
                f"{_show(value)} is a TOML number{', which can round' if isinstance(value, float) else ''}: write "
                f'the amount in {code} as quoted decimal text, e.g. "{example}"',
            )
        if not isinstance(value, str):
            raise ProfileError(
                key, f'{_show(value)} is not an amount in {code}; write amounts as exact decimal strings, e.g. "12.50"'
            )
        try:
            return Money.parse(value, code)
        except LocalProtocolError as error:  # the parser's own reason: decimals, sign, range...
            raise ProfileError(key, f"{_show(value)} is not an amount in {code}: {error.detail}") from None

    return convert


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str, object], int]:
    def convert(key: str, value: object) -> int:
        allowed = f"{minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
        if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
            raise ProfileError(key, f"expected a whole number {allowed}, got {_show(value)}")
        return value

    return convert


def _boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ProfileError(key, f"expected true or false, got {_show(value)}")
    return value


def _date(key: str, value: object) -> date:
    """A TOML local date (2026-12-31) or the same as a string ("2026-12-31")."""
    if type(value) is date:
        return value
    if isinstance(value, str):
        try:
            return parse_date(value)
        except LocalProtocolError:
            pass
    raise ProfileError(key, f"{_show(value)} is not a date YYYY-MM-DD")


def _target(key: str, value: object) -> str:
    """A gRPC target "host:port" ("[::1]:port" for IPv6: here an IPv6 host must be bracketed)."""
    if isinstance(value, str) and is_endpoint(value):
        host = value.rpartition(":")[0]
        if (host.startswith("[") and host.endswith("]")) or ":" not in host:
            return value
    raise ProfileError(key, f'{_show(value)} is not a target "host:port"')


def _fingerprint(key: str, value: object) -> bytes:
    if isinstance(value, str) and len(value) == 2 * DIGEST_BYTES:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise ProfileError(key, f"{_show(value)} is not an identity fingerprint ({2 * DIGEST_BYTES} hex characters)")


def check_fingerprints(profile: Profile) -> None:
    """ProfileError naming the first biller whose fingerprint is still the sample's all-zero placeholder.

    Checked before a run contacts anyone: with the placeholder pinned, enrolment could only end in PIN_MISMATCH.
    """
    for preference in profile.connected():
        connection = preference.connection
        if connection is not None and connection.fingerprint == PLACEHOLDER_FINGERPRINT:
            raise ProfileError(
                _key(_key("billers", preference.biller_id), "fingerprint"),
                "is still the sample's all-zero placeholder: replace it with the biller's identity fingerprint "
                "(64 hex digits, given with your account; the reference biller prints it: `parley biller codes`), "
                "or use the biller's enrolment link: `parley consumer enrol LINK --profile FILE`",
            )


def _account_id(key: str, value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ProfileError(key, f"expected an account id of 1 to {MAX_ID_CHARS} characters, got {_show(value)}")
    return value


def _enrolment_code(key: str, value: object) -> str:
    if isinstance(value, str) and _CODE.fullmatch(normalize_enrolment_code(value)):
        return value
    raise ProfileError(
        key, f"{_show(value)} is not an enrolment code (12 characters of Crockford base32, e.g. 7KQ2-M9XD-4RTB)"
    )


def _file(text: str, base_dir: Path | None) -> Path:
    """A path from the profile: `~` expanded, a relative one taken from `base_dir` when given."""
    path = Path(text).expanduser()
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def _client_certificate(table: _Table, base_dir: Path | None) -> ClientCertificateFiles | None:
    certificate = table.optional("client_certificate", _text, None)
    key = table.optional("client_key", _text, None)
    if (certificate is None) != (key is None):
        missing = "client_key" if key is None else "client_certificate"
        raise ProfileError(_key(table.path, missing), "missing: client_certificate and client_key go together")
    if certificate is None or key is None:
        return None
    return ClientCertificateFiles(_file(certificate, base_dir), _file(key, base_dir))


def _connection(table: _Table, base_dir: Path | None, biller_id: str) -> BillerConnection | None:
    """The connection keys of one biller's table, or None when it has none."""
    if not any(name in table.items for name in _CONNECTION_KEYS):
        return None
    if "uri" in table.items:
        both = [name for name in ("target", "fingerprint", "account_id", "code") if name in table.items]
        if both:
            raise ProfileError(_key(table.path, both[0]), "give uri or the values it carries, not both")
        uri = table.get("uri", _text)
        try:
            link = parse_enrolment_uri(uri)
        except InvalidEnrolmentLink as error:
            raise ProfileError(_key(table.path, "uri"), f"not a usable enrolment link: {error}") from None
        if link.biller_party_id != biller_id:
            raise ProfileError(_key(table.path, "uri"), f"the link is for {link.biller_party_id!r}, not {biller_id!r}")
        target, fingerprint, account_id = link.target, link.fingerprint, link.account_id
        code: str | None = link.code
        _target(_key(table.path, "uri"), target)
    else:
        target = table.get("target", _target)
        fingerprint = table.get("fingerprint", _fingerprint)
        account_id = table.get("account_id", _account_id)
        code = table.optional("code", _enrolment_code, None)
    insecure = table.optional("insecure", _boolean, False)
    ca_text = table.optional("ca_file", _text, None)
    server_name = table.optional("server_name", _text, None)
    if insecure:
        if ca_text is not None:
            raise ProfileError(_key(table.path, "insecure"), "choose ca_file (TLS) or insecure = true, not both")
        host = target.rpartition(":")[0].removeprefix("[").removesuffix("]")
        if not is_loopback(host):
            raise ProfileError(
                _key(table.path, "insecure"), f"plaintext is allowed only to a loopback address (TRN-3), not {host!r}"
            )
    ca_file = None if ca_text is None else _file(ca_text, base_dir)
    return BillerConnection(target, fingerprint, account_id, code, ca_file, insecure, server_name)


def parse_profile(document: Mapping[str, object], *, base_dir: Path | None = None) -> Profile:
    """The profile described by a parsed TOML document; ProfileError naming the first bad key.

    `base_dir` is where a relative `ca_file`, `client_certificate` or `client_key` is found (None: left
    relative, to the working directory).
    """
    root = _Table("", document, ("household", "income", "expenses", "mandate", "billers", "notifications"))
    household = root.get(
        "household",
        _table(
            "party_id", "currency", "balance", "buffer", "hardship", "pay_as_billed", "client_certificate", "client_key"
        ),
    )
    party_id = household.get("party_id", _party_id)
    code = household.get("currency", _currency)
    amount = _amount(code)
    balance = household.get("balance", amount)
    buffer = household.get("buffer", amount)
    hardship = household.optional("hardship", _boolean, False)
    pay_as_billed = household.optional("pay_as_billed", _boolean, False)
    client_certificate = _client_certificate(household, base_dir)

    income_table = root.get("income", _table("amount", "pay_day"))
    income = Income(income_table.get("amount", amount), income_table.get("pay_day", _integer(1, 31)))

    def expenses_of(key: str, value: object) -> tuple[Expense, ...]:
        if not isinstance(value, list):
            raise ProfileError(key, "expected an array of tables ([[expenses]])")
        expenses = []
        for index, item in enumerate(value):
            table = _Table(f"{key}[{index}]", item, ("name", "amount", "day"))
            expenses.append(
                Expense(table.get("name", _text), table.get("amount", amount), table.get("day", _integer(1, 31)))
            )
        return tuple(expenses)

    no_expenses: tuple[Expense, ...] = ()
    expenses = root.optional("expenses", expenses_of, no_expenses)

    mandate_table = root.get("mandate", _table("max_fee", "max_instalments", "max_total_over_bill", "latest_date"))
    mandate = Mandate(
        max_fee=mandate_table.get("max_fee", amount),
        max_instalments=mandate_table.get("max_instalments", _integer(0)),
        max_total_over_bill=mandate_table.get("max_total_over_bill", amount),
        latest_date=mandate_table.optional("latest_date", _date, None),
    )

    def billers_of(key: str, value: object) -> tuple[BillerPreference, ...]:
        table = _Table(key, value, None)
        preferences = []
        for biller_id in list(table.items):
            path = _key(key, biller_id)
            _party_id(path, biller_id)
            entry = table.get(biller_id, _table("priority", "name", *_CONNECTION_KEYS))
            priority = entry.get("priority", _integer(0))
            name = entry.optional("name", _text, "")
            preferences.append(BillerPreference(biller_id, priority, _connection(entry, base_dir, biller_id), name))
        return tuple(preferences)

    no_billers: tuple[BillerPreference, ...] = ()
    billers = root.optional("billers", billers_of, no_billers)
    notifications = root.optional(
        "notifications", lambda key, value: _notifications(key, value, base_dir), Notifications()
    )
    return Profile(
        party_id=party_id,
        currency=code,
        balance=balance,
        buffer=buffer,
        income=income,
        expenses=expenses,
        mandate=mandate,
        billers=billers,
        hardship=hardship,
        client_certificate=client_certificate,
        notifications=notifications,
        pay_as_billed=pay_as_billed,
    )


def _notifications(key: str, value: object, base_dir: Path | None) -> Notifications:
    table = _Table(key, value, ("command", "webhook", "secret_file", "kinds"))

    def strings(path: str, item: object) -> tuple[str, ...]:
        if not isinstance(item, list) or not item or not all(isinstance(part, str) and part for part in item):
            raise ProfileError(path, f"expected a non-empty array of strings, got {_show(item)}")
        return tuple(item)

    no_command: tuple[str, ...] = ()
    command = table.optional("command", strings, no_command)
    webhook = table.optional("webhook", _webhook_url, None)
    secret_text = table.optional("secret_file", _text, None)
    if webhook is not None and secret_text is None:
        raise ProfileError(_key(key, "secret_file"), "missing: a webhook is signed with the secret in this file")
    all_kinds: tuple[str, ...] = NOTIFICATION_KINDS
    kinds = table.optional("kinds", strings, all_kinds)
    unknown = [kind for kind in kinds if kind not in NOTIFICATION_KINDS]
    if unknown:
        raise ProfileError(_key(key, "kinds"), f"unknown kind {unknown[0]!r}; known: {', '.join(NOTIFICATION_KINDS)}")
    secret_file = None if secret_text is None else _file(secret_text, base_dir)
    return Notifications(command, webhook, secret_file, kinds)


def _webhook_url(key: str, value: object) -> str:
    """An https URL, or http to a loopback address (the body tells what the household owes)."""
    if isinstance(value, str):
        parts = urlsplit(value)
        if parts.scheme == "https" and parts.hostname:
            return value
        if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
            return value
    raise ProfileError(key, f"{_show(value)} is not an https URL (http only to a loopback address)")


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """The profile in the TOML file at `path`; ProfileError for bad TOML or a bad key, OSError if unreadable."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ProfileError("", f"{os.fspath(path)}: not valid TOML: {error}") from None
    return parse_profile(document, base_dir=Path(path).parent)
