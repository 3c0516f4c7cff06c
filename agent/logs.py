"""Structured logs: one line per protocol step, as text or as JSON.

The agents log each protocol step with `log_step`: a step name and a few
fields — thread and message ids, account, sequence, outcome — never keys,
enrolment codes, disclosures or other personal circumstances (PRV-7):

    log_step(logger, "negotiate", thread_id=header.thread_id, message_id=header.message_id, outcome="agreed")

As text that is `negotiate thread_id=3f0c… message_id=9a1b… outcome=agreed`; with the
JSON formatter (`configure_logging("json")`) every record is one JSON object
whose keys are the step's fields:

    {"time": "2026-03-05T09:00:00.123456+00:00", "level": "INFO", "logger": "parley.biller",
     "message": "negotiate thread_id=… outcome=agreed", "step": "negotiate", "thread_id": "3f0c…", …}

Bytes are written as hex. `request_ids()` gives the thread and message id of the
request being handled (set by the agent once a request's header is verified),
so the transport can name them when it logs a refusal.

gRPC's C core writes its own lines straight to stderr, as text ("I1206 19:54:50.8 6204
ssl_transport_security.cc:2563] Handshake failed…" for every failed TLS handshake, "E… add_port.cc…"
for a port it cannot bind), which would break a JSON stream. It reads `GRPC_VERBOSITY` once, when
gRPC is imported, so a program that will log JSON calls `quiet_grpc_core()` before importing gRPC
(`parley` does, agent/cli.py); every failure that matters reaches Python as an exception anyway. A
user who sets `GRPC_VERBOSITY` or `GRPC_TRACE` gets gRPC's own lines, and `configure_logging("json")`
then says in one JSON record that they are not JSON. Python warnings become JSON records too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Final, Literal, TextIO

LogFormat = Literal["json", "text"]
LOG_FORMATS: Final = ("json", "text")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FIELDS = "parley_fields"
GRPC_VERBOSITY, GRPC_TRACE = "GRPC_VERBOSITY", "GRPC_TRACE"
GRPC_QUIET = "NONE"

_request_ids: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("parley_request_ids")


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def log_step(logger: logging.Logger, step: str, level: int = logging.INFO, /, **fields: object) -> None:
    """Log one protocol step: `step k=v k=v…` as text, the fields as keys in JSON (bytes as hex)."""
    if not logger.isEnabledFor(level):
        return
    values = {name: _plain(value) for name, value in fields.items()}
    text = " ".join(f"{name}={'-' if value is None else value}" for name, value in values.items())
    logger.log(level, "%s %s", step, text, extra={_FIELDS: {"step": step, **values}}, stacklevel=2)


def set_request_ids(thread_id: bytes, message_id: bytes) -> None:
    """Remember the verified thread and message id of the request this task is handling."""
    _request_ids.set((thread_id.hex(), message_id.hex()))


def request_ids() -> tuple[str | None, str | None]:
    """(thread id, message id) in hex of the request this task is handling, (None, None) before verification."""
    ids = _request_ids.get(None)
    return (None, None) if ids is None else ids


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the step's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, _FIELDS, None)
        if isinstance(fields, Mapping):
            entry.update({key: value for key, value in fields.items() if key not in entry})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def quiet_grpc_core(environ: MutableMapping[str, str] | None = None) -> bool:
    """Silence gRPC's C core (GRPC_VERBOSITY=NONE) for a JSON log stream; call it before gRPC is imported.

    Leaves the environment alone, and returns False, when the user set GRPC_VERBOSITY or GRPC_TRACE (they
    want gRPC's own lines) or when gRPC is already imported (too late: the core has read the variable).
    """
    environ = os.environ if environ is None else environ
    if environ.get(GRPC_VERBOSITY) or environ.get(GRPC_TRACE) or "grpc" in sys.modules:
        return False
    environ[GRPC_VERBOSITY] = GRPC_QUIET
    return True


def grpc_core_speaks(environ: Mapping[str, str] | None = None) -> str | None:
    """Which variable lets gRPC's C core write its own text lines to stderr ("GRPC_TRACE=…"), None if neither."""
    environ = os.environ if environ is None else environ
    verbosity, trace = environ.get(GRPC_VERBOSITY, ""), environ.get(GRPC_TRACE, "")
    if trace:
        return f"{GRPC_TRACE}={trace}"
    if verbosity and verbosity.upper() != GRPC_QUIET:
        return f"{GRPC_VERBOSITY}={verbosity}"
    return None


def configure_logging(log_format: LogFormat = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record at `level` and above to `stream` (stderr) as text or JSON lines.

    Replaces the root logger's handlers, so calling it again switches format. With JSON, Python
    warnings are logged (as JSON) rather than printed, and one WARNING record says so when the
    environment lets gRPC's core write its own text lines (see `quiet_grpc_core`).
    ValueError for an unknown format or level.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(log_format == "json")
    speaking = grpc_core_speaks() if log_format == "json" else None
    if speaking is not None:
        logging.getLogger("parley.logs").warning(
            "%s is set: gRPC's core writes its own lines to stderr as text, between these JSON lines "
            "(unset it for a stream of JSON only)",
            speaking,
        )


__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "LogFormat",
    "configure_logging",
    "grpc_core_speaks",
    "log_step",
    "quiet_grpc_core",
    "request_ids",
    "set_request_ids",
]
