"""Injectable time: every component that needs "now" asks a `Clock`.

The protocol core never reads the clock (time is passed in); the agents and the
stores get it from here, so tests and the demo can move through months of due
dates in seconds with a `ManualClock`. Times are always timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """A source of the current time."""

    def now(self) -> datetime:
        """The current instant, timezone-aware, in UTC."""
        ...


class SystemClock:
    """The real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return moment.astimezone(UTC)


class ManualClock:
    """A clock that moves only when told to, and never backwards."""

    def __init__(self, start: datetime) -> None:
        self._now = _utc(start)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        """Move forward by `delta` (ValueError if negative); returns the new time."""
        if delta < timedelta(0):
            raise ValueError(f"a clock does not go backwards (advance by {delta})")
        self._now += delta
        return self._now

    def set(self, moment: datetime) -> datetime:
        """Move to `moment` (ValueError if it is before the current time); returns it."""
        moment = _utc(moment)
        if moment < self._now:
            raise ValueError(f"a clock does not go backwards ({moment} is before {self._now})")
        self._now = moment
        return self._now
