"""Rate limits on a biller's requests (PROTOCOL.md LIM-8), sans I/O: time is passed in.

Two sets of token buckets:

- **by signer**, refilling at `Limits.rate_limit_per_second` up to
  `Limits.rate_limit_burst` tokens: a request whose signature verified takes a
  token from its signer's bucket (`RateLimiter.admit_signer`), so only the
  holder of a key can spend that budget. The signer is the enrolled *party*
  whose chain verified the signature, never the key (LIM-8): listing sixteen
  keys in a key set, or rotating to new ones, does not multiply the budget.
  Only `Enrol`, whose key vouches for nothing but itself, is charged to its
  key;
- **by peer address**, with `PEER_RATE_LIMIT_FACTOR` times that rate and burst
  (one address may be a NAT in front of many consumers): the unsigned `Hello`
  and `GetKeySets` take a token from their peer's bucket, and so does every
  request refused before its signer was admitted (a bad signature, an unknown
  key, an expired message, a key over its own limit, a refused `Enrol`, whose
  key vouches only for itself). A peer whose bucket is empty is refused before
  anything of its request is verified, which is what bounds the verification
  work one address can cause, valid keys or not.

Both sets forget their least recently used bucket beyond `max_tracked`
entries, so no sender can grow the limiter's memory: a forgotten bucket starts
again full, which only ever lets a request through that a remembered one might
have refused. The buckets live in one process's memory (per replica; see
PROTOCOL.md LIM-8).

Whether the current request's signer has been admitted is kept in a context
variable, set on the request's own task, so the transport can tell a refusal
after verification (charged to the key already) from one before it (charged
to the peer).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

from agent.lru import Lru
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.limits import (
    MAX_KEYSET_PUBLISHES_PER_DAY,
    PEER_RATE_LIMIT_FACTOR,
    RATE_LIMIT_MAX_TRACKED,
    Limits,
)

_SECONDS_PER_DAY = 86_400

_admitted_signer: ContextVar[str | None] = ContextVar("parley_admitted_signer", default=None)


@dataclass
class _Bucket:
    tokens: float
    updated: datetime


class TokenBuckets:
    """Token buckets by name, refilling at `rate_per_second` up to `burst`, at most `max_tracked` remembered."""

    def __init__(self, *, rate_per_second: float, burst: int, max_tracked: int) -> None:
        if rate_per_second <= 0 or burst <= 0 or max_tracked <= 0:
            raise ValueError("rate, burst and max_tracked must be positive")
        self._rate = rate_per_second
        self._burst = burst
        self._buckets: Lru[str, _Bucket] = Lru(max_tracked)

    def __len__(self) -> int:
        return len(self._buckets)

    def available(self, name: str, now: datetime) -> bool:
        """Whether `name`'s bucket holds a token at `now`, without taking it."""
        return self._refilled(name, now).tokens >= 1

    def take(self, name: str, now: datetime) -> bool:
        """Take one token from `name`'s bucket at `now`; False (and nothing taken) when it is empty."""
        bucket = self._refilled(name, now)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def _refilled(self, name: str, now: datetime) -> _Bucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = _Bucket(float(self._burst), now)
            self._buckets.put(name, bucket)
            return bucket
        # A clock that stepped back (NTP) refills nothing rather than draining the bucket.
        elapsed = max((now - bucket.updated).total_seconds(), 0.0)
        bucket.tokens = min(float(self._burst), bucket.tokens + elapsed * self._rate)
        bucket.updated = max(now, bucket.updated)
        return bucket


class RateLimiter:
    """LIM-8 for one biller process: buckets by signer (the enrolled party) and by peer address."""

    def __init__(self, limits: Limits, *, max_tracked: int = RATE_LIMIT_MAX_TRACKED) -> None:
        def buckets(factor: int) -> TokenBuckets:
            return TokenBuckets(
                rate_per_second=limits.rate_limit_per_second * factor,
                burst=limits.rate_limit_burst * factor,
                max_tracked=max_tracked,
            )

        self.keys = buckets(1)
        self.peers = buckets(PEER_RATE_LIMIT_FACTOR)
        # LIM-15: key set versions a party may publish, MAX_KEYSET_PUBLISHES_PER_DAY a day (refilled evenly).
        self.publishes = TokenBuckets(
            rate_per_second=MAX_KEYSET_PUBLISHES_PER_DAY / _SECONDS_PER_DAY,
            burst=MAX_KEYSET_PUBLISHES_PER_DAY,
            max_tracked=max_tracked,
        )

    def admit_signer(self, signer: str, now: datetime, *, authenticates: bool = True) -> None:
        """Take a token for a request whose signature verified; RATE_LIMITED when `signer`'s bucket is empty.

        `signer` is the enrolled party whose chain verified the signature (LIM-8: one budget per party,
        however many keys it lists). `authenticates=False` for a key that vouches only for itself
        (`Enrol`, charged to its keyid): a refusal of it is charged to the peer too, since anyone can
        make fresh keys.
        """
        if not self.keys.take(signer, now):
            raise RemoteProtocolError(Reason.RATE_LIMITED, "this party sent more requests than the rate limit allows")
        if authenticates:
            _admitted_signer.set(signer)

    def check_publish(self, party_id: str, now: datetime) -> None:
        """KEYSET_CHAIN_FULL when `party_id` has published its MAX_KEYSET_PUBLISHES_PER_DAY versions today."""
        if not self.publishes.available(party_id, now):
            raise RemoteProtocolError(
                Reason.KEYSET_CHAIN_FULL,
                f"at most {MAX_KEYSET_PUBLISHES_PER_DAY} key set versions a day; publish this one later",
            )

    def count_publish(self, party_id: str, now: datetime) -> None:
        """A version of `party_id`'s chain was stored: charged only then, so that retries and racing copies
        of one version (HDR-12) cost nothing."""
        self.publishes.take(party_id, now)

    def admit_peer(self, peer: str, now: datetime, *, unsigned: bool) -> None:
        """Before handling a request from `peer`: an unsigned one takes a token, a signed one needs one left.

        RATE_LIMITED when the peer's bucket is empty. Resets the request's signer.
        """
        _admitted_signer.set(None)
        admitted = self.peers.take(peer, now) if unsigned else self.peers.available(peer, now)
        if not admitted:
            raise RemoteProtocolError(
                Reason.RATE_LIMITED, "this address sent more unverified requests than the rate limit allows"
            )

    def refused(self, peer: str, now: datetime) -> None:
        """A request from `peer` was refused: charge the peer unless its signer had been admitted."""
        if _admitted_signer.get() is None:
            self.peers.take(peer, now)


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:10.0.0.7:53211" -> "ipv4:10.0.0.7"), so that opening
    new connections does not give a sender a new bucket; other forms (unix sockets) are kept whole."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer


__all__ = ["RateLimiter", "TokenBuckets", "peer_address"]
