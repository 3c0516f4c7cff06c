"""Server-sent events: named events from an async source to the browser, with heartbeats and a cap on streams.

`stream_events(request, source)` is a handler's whole body: it refuses with 503 past the app's cap on open
streams, writes each event of `source` as it comes, a comment line as heartbeat when nothing came for a while
(so proxies and the browser keep the connection), and ends cleanly when the app shuts down or the browser goes.
`EventHub` fans one publisher's events out to every open page. The page side is `static/live.js`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["RELOAD_EVENT", "EventHub", "ServerSentEvent", "StreamGate", "Subscription", "stream_events"]

RELOAD_EVENT = "reload"  # live.js reloads the whole page on it
RETRY_MILLISECONDS = 3000  # how long EventSource waits before reconnecting after the stream ends
_EVENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # also safe inside live.js's attribute selectors


@dataclass(frozen=True)
class ServerSentEvent:
    """One event: `name` selects the page's listeners (`data-live-text`/`data-live-section`), `data` is text."""

    name: str
    data: str = ""
    id: str | None = None

    def __post_init__(self) -> None:
        if not _EVENT_NAME.fullmatch(self.name):
            raise ValueError(f"event name {self.name!r} must match {_EVENT_NAME.pattern}")
        if self.id is not None and any(character in self.id for character in "\r\n\0"):
            raise ValueError("an event id cannot hold a line break or NUL")

    def encode(self) -> bytes:
        lines = [f"event: {self.name}"]
        if self.id is not None:
            lines.append(f"id: {self.id}")
        # A line break inside data would end the field: each line goes in a data field of its own.
        lines.extend(f"data: {line}" for line in self.data.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
        return ("\n".join(lines) + "\n\n").encode()


class StreamGate:
    """The app's open streams: at most `capacity` at once, all told to end when the app shuts down."""

    def __init__(self, capacity: int, heartbeat_seconds: float) -> None:
        if capacity < 1:
            raise ValueError("the cap on event streams must be at least 1")
        self.capacity = capacity
        self.heartbeat_seconds = heartbeat_seconds
        self.open = 0
        self.closing = asyncio.Event()

    def try_enter(self) -> bool:
        if self.open >= self.capacity or self.closing.is_set():
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1


STREAM_GATE = web.AppKey("parley_web_stream_gate", StreamGate)


async def _next_event(source: AsyncIterator[ServerSentEvent]) -> ServerSentEvent | None:
    """The source's next event, or None when it has ended (a task should not end in StopAsyncIteration)."""
    return await anext(source, None)


async def _close(source: AsyncIterator[ServerSentEvent]) -> None:
    aclose = getattr(source, "aclose", None)  # async generators and EventHub's subscriptions have one
    if aclose is not None:
        await aclose()


async def stream_events(request: web.Request, source: AsyncIterator[ServerSentEvent]) -> web.StreamResponse:
    """Stream `source` to the browser as text/event-stream until it ends, the browser goes or the app stops."""
    gate = request.app[STREAM_GATE]
    if not gate.try_enter():
        await _close(source)
        return web.Response(
            status=503,
            text="Too many live pages are open on this server; close one and reload.\n",
            headers={"Retry-After": "5"},
        )
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    next_event: asyncio.Task[ServerSentEvent | None] | None = None
    closing = asyncio.ensure_future(gate.closing.wait())
    try:
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MILLISECONDS}\n\n".encode())
        next_event = asyncio.ensure_future(_next_event(source))
        while True:
            done, _ = await asyncio.wait(
                {next_event, closing}, timeout=gate.heartbeat_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            if closing in done:
                break
            if next_event not in done:
                await response.write(b": heartbeat\n\n")
                continue
            event = next_event.result()
            if event is None:
                break
            await response.write(event.encode())
            next_event = asyncio.ensure_future(_next_event(source))
    except ConnectionResetError:  # the browser closed the page (aiohttp's ClientConnectionResetError is one)
        pass
    finally:
        gate.leave()
        closing.cancel()
        if next_event is not None and not next_event.done():
            next_event.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await next_event
        await _close(source)
    return response


class Subscription:
    """One page's queue on an `EventHub`, registered from the moment `subscribe()` returns (no event is missed
    between opening the stream and reading it) until `aclose()`."""

    def __init__(self, queues: set[asyncio.Queue[ServerSentEvent]], backlog: int) -> None:
        self._queues = queues
        self._queue: asyncio.Queue[ServerSentEvent] = asyncio.Queue(maxsize=backlog)
        queues.add(self._queue)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ServerSentEvent:
        return await self._queue.get()

    async def aclose(self) -> None:
        self._queues.discard(self._queue)


@dataclass
class EventHub:
    """One publisher, many pages: each subscriber gets its own queue of at most `backlog` events.

    A page that falls that far behind (a sleeping laptop) is not allowed to hold memory: its queue is emptied
    and it gets one `reload` event instead, after which its page re-reads everything from the server.
    Use it from the event loop's thread (`loop.call_soon_threadsafe(hub.publish, event)` from any other).
    """

    backlog: int = 64
    _queues: set[asyncio.Queue[ServerSentEvent]] = field(default_factory=set)

    @property
    def subscribers(self) -> int:
        return len(self._queues)

    def publish(self, event: ServerSentEvent) -> None:
        for queue in self._queues:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(ServerSentEvent(RELOAD_EVENT))

    def subscribe(self) -> Subscription:
        return Subscription(self._queues, self.backlog)
