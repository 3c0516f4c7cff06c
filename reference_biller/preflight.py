"""What the biller's commands must know before gRPC is imported: whether their logs will be JSON.

gRPC's C core reads `GRPC_VERBOSITY` once, when gRPC is imported, and writes its own text lines to
stderr; in a JSON log stream they are not JSON (agent/logs.py, `quiet_grpc_core`). `parley` imports
gRPC with its commands, so it asks `logs_json(arguments)` first, from the raw command line, with the
precedence `parley biller serve` resolves its options with (reference_biller/settings.py): the
`--log-format` flag, then `PARLEY_LOG_FORMAT`, then the configuration file's `[server] log_format`
(`--config`, else `PARLEY_CONFIG`). `parley biller backoffice` has the flag only.

A best guess, never an error: a value the command will refuse, or a configuration file that cannot
be read, counts as "not JSON", and the command itself then says what is wrong. Only the standard
library here, so that asking imports nothing heavy.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

LOG_FORMAT_FLAG, LOG_FORMAT_ENV, LOG_FORMAT_KEY = "--log-format", "PARLEY_LOG_FORMAT", "log_format"
CONFIG_FLAG, CONFIG_ENV = "--config", "PARLEY_CONFIG"
SERVE, BACKOFFICE = ("biller", "serve"), ("biller", "backoffice")
_SHORTEST = {LOG_FORMAT_FLAG: len("--log-f"), CONFIG_FLAG: len("--confi")}  # unambiguous argparse abbreviations


def _flag(arguments: Sequence[str], flag: str) -> str | None:
    """The last value given to `flag` (`--flag VALUE`, `--flag=VALUE`, or an abbreviation argparse accepts)."""
    value = None
    for index, argument in enumerate(arguments):
        name, equals, inline = argument.partition("=")
        if len(name) < _SHORTEST[flag] or not flag.startswith(name):
            continue
        if equals:
            value = inline
        elif index + 1 < len(arguments):
            value = arguments[index + 1]
    return value


def _configured_format(path: str) -> str | None:
    """`[server] log_format` in the configuration file, None if absent or unreadable."""
    try:
        with Path(path).open("rb") as file:
            server = tomllib.load(file).get("server")
    except (OSError, ValueError):  # tomllib.TOMLDecodeError and UnicodeDecodeError are ValueErrors
        return None
    value = server.get(LOG_FORMAT_KEY) if isinstance(server, dict) else None
    return value if isinstance(value, str) else None


def logs_json(arguments: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether `parley ARGUMENTS` will write its log lines as JSON (a best guess; see the module docstring)."""
    command = tuple(arguments[:2])
    if command not in (SERVE, BACKOFFICE):
        return False
    chosen = _flag(arguments, LOG_FORMAT_FLAG)
    if chosen is None and command == SERVE:
        chosen = environ.get(LOG_FORMAT_ENV) or None
        if chosen is None:
            config = _flag(arguments, CONFIG_FLAG) or environ.get(CONFIG_ENV)
            chosen = _configured_format(config) if config else None
    return chosen is not None and chosen.lower() == "json"


__all__ = ["logs_json"]
