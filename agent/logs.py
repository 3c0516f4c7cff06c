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
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final, Literal, TextIO

LogFormat = Literal["json", "text"]
LOG_FORMATS: Final = ("json", "text")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FIELDS = "parley_fields"

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


def configure_logging(log_format: LogFormat = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record at `level` and above to `stream` (stderr) as text or JSON lines.

    Replaces the root logger's handlers, so calling it again switches format.
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


__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "LogFormat",
    "configure_logging",
    "log_step",
    "request_ids",
    "set_request_ids",
]
