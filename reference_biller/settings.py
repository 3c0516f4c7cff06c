"""How `parley biller serve` is run: each option from a flag, a PARLEY_* variable, the config file or a default.

Precedence, highest first: the command-line flag, then the environment variable,
then the configuration file's `[server]` table, then the default. The
configuration file itself comes from `--config`, else `PARLEY_CONFIG`, else the
built-in sample. An empty variable counts as unset; an empty `--state-dir` is
refused (it would mean the working directory).

| option | flag | variable | [server] key | default |
| --- | --- | --- | --- | --- |
| gRPC address | `--listen` | `PARLEY_LISTEN` | `listen` | none: required |
| state directory | `--state-dir` | `PARLEY_STATE_DIR` | `state_dir` | `parley-biller` |
| store | `--store` | `PARLEY_STORE` | `store` | `biller.sqlite` in the state directory |
| metrics address | `--metrics-listen` | `PARLEY_METRICS_LISTEN` | `metrics_listen` | off |
| log format | `--log-format` | `PARLEY_LOG_FORMAT` | `log_format` | `text` |
| log level | `--log-level` | `PARLEY_LOG_LEVEL` | `log_level` | `info` |
| shutdown grace (s) | `--shutdown-grace` | `PARLEY_SHUTDOWN_GRACE` | `shutdown_grace_seconds` | `10` |
| TLS certificate chain | `--tls-cert` | `PARLEY_TLS_CERT` | `tls_cert` | none |
| TLS private key | `--tls-key` | `PARLEY_TLS_KEY` | `tls_key` | none |
| client CA (mutual TLS) | `--tls-client-ca` | `PARLEY_TLS_CLIENT_CA` | `tls_client_ca` | none: no client certificates |
| OpenTelemetry tracing | `--otel` | `PARLEY_OTEL` (1/0, true/false) | `otel` | off |
| connections in all | `--max-connections` | `PARLEY_MAX_CONNECTIONS` | (same) | `800` |
| connections per address | `--max-connections-per-address` | `PARLEY_MAX_CONNECTIONS_PER_ADDRESS` | (same) | `64` |
| idle connection timeout (s) | `--idle-timeout` | `PARLEY_IDLE_TIMEOUT` | `idle_timeout_seconds` | `300` |
| handshake deadline (s) | `--handshake-timeout` | `PARLEY_HANDSHAKE_TIMEOUT` | `handshake_timeout_seconds` | `10` |

`--insecure` (plaintext on loopback) is a flag only, so that turning TLS off is
always a visible choice. An invalid value is a `SettingsError` that names where
it came from (`PARLEY_SHUTDOWN_GRACE: expected a number of seconds…`). A number
must be within its range wherever it comes from: the ranges are the
configuration's (`reference_biller.config`: `SHUTDOWN_GRACE`, `CONNECTIONS`,
`CONNECTIONS_PER_ADDRESS`, `CONNECTION_TIMEOUT`), so a flag, a variable and the file are held to one rule.
`check_server_table` runs the checks that combine options (the TLS files go
together) on the [server] table alone: what `parley biller check-config` adds to
loading the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from agent.identity import IdentityError, state_dir_path
from agent.logs import LOG_FORMATS, LOG_LEVELS, LogFormat
from agent.stores import check_store_location
from agent.transport.server import DEFAULT_CONNECTION_LIMITS
from reference_biller.config import (
    CONNECTION_TIMEOUT,
    CONNECTIONS,
    CONNECTIONS_PER_ADDRESS,
    SHUTDOWN_GRACE,
    SecondsRange,
    ServerSettings,
    WholeRange,
    check_listen,
)

T = TypeVar("T")

CONFIG_ENV = "PARLEY_CONFIG"
DEFAULT_STATE_DIR = "parley-biller"
DEFAULT_SHUTDOWN_GRACE = 10.0


class SettingsError(ValueError):
    """A serve option is invalid or missing; the message names the flag, variable or key it came from."""


@dataclass(frozen=True)
class Option:
    """One serve option: its flag, its environment variable and its key in the [server] table."""

    name: str
    flag: str
    env: str
    key: str


OPTIONS = {
    option.name: option
    for option in (
        Option("listen", "--listen", "PARLEY_LISTEN", "server.listen"),
        Option("state_dir", "--state-dir", "PARLEY_STATE_DIR", "server.state_dir"),
        Option("store", "--store", "PARLEY_STORE", "server.store"),
        Option("metrics_listen", "--metrics-listen", "PARLEY_METRICS_LISTEN", "server.metrics_listen"),
        Option("log_format", "--log-format", "PARLEY_LOG_FORMAT", "server.log_format"),
        Option("log_level", "--log-level", "PARLEY_LOG_LEVEL", "server.log_level"),
        Option("shutdown_grace", "--shutdown-grace", "PARLEY_SHUTDOWN_GRACE", "server.shutdown_grace_seconds"),
        Option("tls_cert", "--tls-cert", "PARLEY_TLS_CERT", "server.tls_cert"),
        Option("tls_key", "--tls-key", "PARLEY_TLS_KEY", "server.tls_key"),
        Option("tls_client_ca", "--tls-client-ca", "PARLEY_TLS_CLIENT_CA", "server.tls_client_ca"),
        Option("otel", "--otel", "PARLEY_OTEL", "server.otel"),
        Option("max_connections", "--max-connections", "PARLEY_MAX_CONNECTIONS", "server.max_connections"),
        Option(
            "max_connections_per_address",
            "--max-connections-per-address",
            "PARLEY_MAX_CONNECTIONS_PER_ADDRESS",
            "server.max_connections_per_address",
        ),
        Option("idle_timeout", "--idle-timeout", "PARLEY_IDLE_TIMEOUT", "server.idle_timeout_seconds"),
        Option(
            "handshake_timeout", "--handshake-timeout", "PARLEY_HANDSHAKE_TIMEOUT", "server.handshake_timeout_seconds"
        ),
    )
}


@dataclass(frozen=True)
class ServeSettings:
    """The resolved serve options; `sources` says where each came from ("--listen", "PARLEY_LISTEN"…)."""

    listen: str
    state_dir: Path
    store: str | None  # a path or URL for `open_biller_store`; None: biller.sqlite in state_dir
    metrics_listen: str | None
    log_format: LogFormat
    log_level: str
    shutdown_grace: float
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None
    otel: bool
    max_connections: int  # connections the process holds in all (TRN-10)
    max_connections_per_address: int
    idle_timeout: float  # seconds without a call in flight before a connection is closed (TRN-10)
    handshake_timeout: float  # seconds a new connection has for its TLS and HTTP/2 handshakes (TRN-10)
    sources: Mapping[str, str]


def config_file(flag: str | None, env: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """The configuration file (None: the built-in sample) and where that came from."""
    env = os.environ if env is None else env
    if flag:
        return Path(flag), "--config"
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), CONFIG_ENV
    return None, "default"


# --- Parsing one value (the source names itself in the error) ------------------------------------------------


def _address(text: str) -> str:
    return check_listen(text)


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text.lower()

    return parse


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


_RANGES: dict[str, WholeRange | SecondsRange] = {
    "shutdown_grace": SHUTDOWN_GRACE,
    "max_connections": CONNECTIONS,
    "max_connections_per_address": CONNECTIONS_PER_ADDRESS,
    "idle_timeout": CONNECTION_TIMEOUT,
    "handshake_timeout": CONNECTION_TIMEOUT,
}
"""The numeric options and their ranges: a flag or variable is parsed into its range, and a [server] value is
checked against it again (a ServerSettings need not come from a loaded file)."""
_PARSERS: dict[str, Callable[[str], object]] = {
    **{name: bounds.parse for name, bounds in _RANGES.items()},
    "listen": _address,
    "state_dir": str,
    "store": check_store_location,
    "metrics_listen": _address,
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
    "tls_cert": str,
    "tls_key": str,
    "tls_client_ca": str,
    "otel": _boolean,
}
_CONFIG_FIELDS = {
    "shutdown_grace": "shutdown_grace_seconds",
    "idle_timeout": "idle_timeout_seconds",
    "handshake_timeout": "handshake_timeout_seconds",
}


def _pick(name: str, flags: Mapping[str, object], env: Mapping[str, str], server: ServerSettings) -> tuple[object, str]:
    """(value, source) for one option by precedence; (None, "default") when nothing sets it."""
    option, parse = OPTIONS[name], _PARSERS[name]
    flag = flags.get(name)
    if flag is not None and flag is not False:
        try:
            return (parse(flag) if isinstance(flag, str) else flag), option.flag
        except ValueError as error:
            raise SettingsError(f"{option.flag}: {error}") from error
    text = env.get(option.env, "")
    if text:
        try:
            return parse(text), option.env
        except ValueError as error:
            raise SettingsError(f"{option.env}: {error}") from error
    configured = getattr(server, _CONFIG_FIELDS.get(name, name))
    if configured is not None:
        if name in _RANGES:
            try:
                _RANGES[name].check(configured)
            except ValueError as error:
                raise SettingsError(f"{option.key}: {error}") from error
        return configured, option.key  # otherwise validated when the file was loaded
    return None, "default"


def _check_together(values: Mapping[str, object], sources: Mapping[str, str]) -> None:
    """SettingsError for options that are each valid but not together (`values`: None where nothing sets one)."""
    cert, key = values["tls_cert"], values["tls_key"]
    if (cert is None) != (key is None):
        given = "tls_cert" if cert is not None else "tls_key"
        raise SettingsError(f"{sources[given]}: the TLS certificate and key go together; the other is missing")
    if values["tls_client_ca"] is not None and cert is None:
        raise SettingsError(f"{sources['tls_client_ca']}: mutual TLS needs the TLS certificate and key too")


def check_server_table(server: ServerSettings) -> None:
    """SettingsError for what `serve` would refuse in the [server] table when no flag or variable overrides it:
    for `parley biller check-config`, which checks a file on its own (its numbers were checked as it loaded;
    a listen address may still come from --listen)."""
    names = ("tls_cert", "tls_key", "tls_client_ca")
    _check_together({name: getattr(server, name) for name in names}, {name: OPTIONS[name].key for name in names})


def resolve_serve(
    flags: Mapping[str, object], server: ServerSettings, env: Mapping[str, str] | None = None
) -> ServeSettings:
    """The serve options from the flags (None or False: not given), the environment and the [server] table."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name in OPTIONS:
        values[name], sources[name] = _pick(name, flags, env, server)

    def value(name: str, default: T) -> T:
        chosen = values[name]
        return default if chosen is None else cast(T, chosen)

    listen = values["listen"]
    if listen is None:
        raise SettingsError(
            "no listen address: give --listen HOST:PORT, set PARLEY_LISTEN, or set listen in the [server] table"
        )
    _check_together(values, sources)
    cert, key, client_ca = values["tls_cert"], values["tls_key"], values["tls_client_ca"]
    return ServeSettings(
        listen=str(listen),
        state_dir=_state_dir(value("state_dir", DEFAULT_STATE_DIR), sources["state_dir"]),
        store=value("store", cast(str | None, None)),
        metrics_listen=value("metrics_listen", cast(str | None, None)),
        log_format=cast(LogFormat, value("log_format", "text")),
        log_level=value("log_level", "info"),
        shutdown_grace=float(value("shutdown_grace", DEFAULT_SHUTDOWN_GRACE)),
        tls_cert=None if cert is None else Path(str(cert)),
        tls_key=None if key is None else Path(str(key)),
        tls_client_ca=None if client_ca is None else Path(str(client_ca)),
        otel=bool(value("otel", False)),
        max_connections=int(value("max_connections", DEFAULT_CONNECTION_LIMITS.max_connections)),
        max_connections_per_address=int(
            value("max_connections_per_address", DEFAULT_CONNECTION_LIMITS.max_connections_per_address)
        ),
        idle_timeout=float(value("idle_timeout", DEFAULT_CONNECTION_LIMITS.idle_timeout.total_seconds())),
        handshake_timeout=float(
            value("handshake_timeout", DEFAULT_CONNECTION_LIMITS.handshake_timeout.total_seconds())
        ),
        sources=sources,
    )


def resolve_state_dir(flag: str | None, server: ServerSettings, env: Mapping[str, str] | None = None) -> Path:
    """The state directory for commands other than serve (no default: they must not make a new identity)."""
    chosen, source = _pick("state_dir", {"state_dir": flag}, os.environ if env is None else env, server)
    if chosen is None:
        raise SettingsError("no state directory: give --state-dir, set PARLEY_STATE_DIR, or set state_dir in [server]")
    return _state_dir(str(chosen), source)


def _state_dir(text: str, source: str) -> Path:
    """The state directory `source` names; SettingsError for an empty one (the rule both agents share)."""
    try:
        return state_dir_path(text, named_by=source)
    except IdentityError as error:
        raise SettingsError(str(error)) from error


def resolve_store(flag: str | None, server: ServerSettings, env: Mapping[str, str] | None = None) -> str | None:
    """The store for commands other than serve, by the same precedence; None: the state directory's."""
    chosen, _ = _pick("store", {"store": flag}, os.environ if env is None else env, server)
    return None if chosen is None else str(chosen)


__all__ = [
    "CONFIG_ENV",
    "OPTIONS",
    "ServeSettings",
    "SettingsError",
    "check_server_table",
    "config_file",
    "resolve_serve",
    "resolve_state_dir",
    "resolve_store",
]
