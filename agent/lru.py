"""A bounded mapping that forgets its least recently used entries: the one shape of every in-process cache.

Process memory must stay bounded whatever the traffic (a biller has as many
consumers as it has customers), so every cache and per-peer table in the agent
is an `Lru` with a fixed capacity; what it forgets is re-read or rebuilt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    """At most `capacity` entries, and with `max_weight` at most that total weight (each entry weighs what `put`
    says, e.g. its bytes: for values whose size a peer chooses, a count alone bounds nothing). A lookup that
    hits makes its entry the most recently used."""

    def __init__(self, capacity: int, *, max_weight: int | None = None) -> None:
        if capacity <= 0 or (max_weight is not None and max_weight <= 0):
            raise ValueError("capacity and max_weight must be positive")
        self._capacity = capacity
        self._max_weight = max_weight
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._weight = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def weight(self) -> int:
        """The total weight of the entries held."""
        return self._weight

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, weight: int = 1) -> None:
        self.pop(key)
        self._entries[key] = (value, weight)
        self._weight += weight
        while len(self._entries) > self._capacity or (self._max_weight is not None and self._weight > self._max_weight):
            _, (_, forgotten) = self._entries.popitem(last=False)
            self._weight -= forgotten

    def pop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._weight -= entry[1]


__all__ = ["Lru"]
