"""The household's private space as web pages, on the web kit (`agent.web`, docs/WEB.md).

    app = create_space_app({"": StateDirSource(profile, state_dir)}, WebConfig(title="Your bills", ...))

Pages (under each household's prefix): bills (`/`), one tracker per bill (`/bill/KEY`), approvals with Approve /
Decline (`/approvals`), agreements with their files (`/agreements`), payments and receipts (`/payments`, where a
payment in doubt or refused instructions are decided on as `parley consumer resolve-payment` / `retry-payment` do), the
cash-flow chart (`/cash-flow`), the status document (`/status.json`) and the live stream (`/events`). Every page
is drawn from the status document alone (`reference_consumer.status`), so it shows what `parley consumer status`
shows, in the same words; a person's answer goes through the same `ApprovalBook` as `parley consumer approve`.

Several households (the demo) share one app, one token and one session: each under `/h/KEY/`, with an index at
`/` linking them. One household is served at `/` itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import jinja2
from aiohttp import web

from agent.clock import Clock, SystemClock
from agent.consumer import ApprovalBook, ApprovalClosed, UnknownApproval
from agent.stores.consumer_sqlite import SqliteConsumerStore
from agent.web import EventHub, ServerSentEvent, WebConfig, create_web_app, render, stream_events
from parley.v1 import envelope_pb2
from reference_consumer.profile import Profile
from reference_consumer.runner import AGREEMENTS_DIR, STORE_FILE
from reference_consumer.status import (
    UnreadableState,
    empty_status,
    household_status,
    reading_household,
    status_json,
)
from reference_consumer.stuck_payments import (
    PAYMENT_DECISIONS,
    PaymentDecision,
    PaymentDecisionRefused,
    payment_decision,
    resolve_in_doubt,
    retry_refused,
)
from reference_consumer.web.views import (
    bill_key,
    cash_flow_chart,
    negotiation_moves,
    rows,
    short_fingerprint,
    superseded,
    tracker,
)

__all__ = [
    "LIVE_EVENT",
    "HouseholdSource",
    "StateDirSource",
    "create_space_app",
    "space_config",
]

LIVE_EVENT = "household"  # every page's live section listens to it: "something changed, re-read me"
_PACKAGE = "reference_consumer.web"


class HouseholdSource(Protocol):
    """What the pages need of one household: its status document, a way to answer a request, and a hub the
    pages listen to (publish `LIVE_EVENT` on it whenever the bot has done something)."""

    @property
    def name(self) -> str: ...

    @property
    def profile(self) -> Profile: ...

    @property
    def hub(self) -> EventHub: ...

    def today(self) -> date: ...

    async def status(self) -> dict[str, object]: ...

    async def answer(self, request_id: str, approved: bool, note: str) -> None:
        """Answer one request by id; UnknownApproval / ApprovalClosed as `ApprovalBook.answer` raises them."""
        ...

    async def decide_payment(self, intent_id: str, decision: PaymentDecision, bank_reference: str) -> None:
        """Retry refused instructions, or say what the bank did with a payment in doubt
        (`reference_consumer.stuck_payments`); PaymentDecisionRefused when that payment cannot take it."""
        ...

    async def agreement_file(self, thread_id: str) -> tuple[str, bytes] | None:
        """The `parley-bundle/1` file of the agreement reached in that thread (name, bytes), if it is kept."""
        ...

    async def negotiation_messages(self, thread_id: str) -> Sequence[envelope_pb2.Envelope]:
        """The signed messages of one negotiation thread (hex id), as stored; none for an unknown thread."""
        ...


class StateDirSource:
    """A household whose bot keeps its state in a directory (`parley consumer run`/`serve`)."""

    def __init__(
        self,
        profile: Profile,
        state_dir: Path,
        *,
        clock: Clock | None = None,
        wake: Callable[[], None] | None = None,
        hub: EventHub | None = None,
        name: str | None = None,
    ) -> None:
        self._profile = profile
        self._name = name or profile.party_id
        self.state_dir = state_dir
        self.clock = clock or SystemClock()
        self._wake = wake  # the bot's next pass, now: a person who approved wants to see it sent
        self._hub = hub or EventHub()

    @property
    def name(self) -> str:
        return self._name

    @property
    def profile(self) -> Profile:
        return self._profile

    @property
    def hub(self) -> EventHub:
        return self._hub

    def today(self) -> date:
        return self.clock.now().date()

    def changed(self, *_: object) -> None:
        """Tell every open page to re-read itself: `run_household(on_report=source.changed)` after each pass."""
        self._hub.publish(ServerSentEvent(LIVE_EVENT))

    async def status(self) -> dict[str, object]:
        try:
            return await household_status(self._profile, self.state_dir, clock=self.clock)
        except UnreadableState as error:
            document = empty_status(self._profile, self.state_dir, self.clock.now(), state="unreadable")
            document["problems"] = [str(error)]
            return document

    async def answer(self, request_id: str, approved: bool, note: str) -> None:
        if not (self.state_dir / STORE_FILE).exists():
            raise UnknownApproval(f"no approval request {request_id!r}")
        store = await SqliteConsumerStore.open(self.state_dir / STORE_FILE)
        try:
            await ApprovalBook(store, self.clock).answer(request_id, approved, note=note)
        finally:
            await store.close()
        self.changed()
        if self._wake is not None and approved:
            self._wake()

    async def decide_payment(self, intent_id: str, decision: PaymentDecision, bank_reference: str) -> None:
        if not (self.state_dir / STORE_FILE).exists():
            raise PaymentDecisionRefused(f"no payment {intent_id!r} in this household")
        now = self.clock.now()
        store = await SqliteConsumerStore.open(self.state_dir / STORE_FILE)
        try:
            if decision == "retry":
                await retry_refused(store, intent_id, now)
            else:
                paid = decision == "paid"
                await resolve_in_doubt(store, intent_id, paid=paid, bank_reference=bank_reference, now=now)
        finally:
            await store.close()
        self.changed()
        if self._wake is not None and decision != "paid":  # the bot has a payment to make again
            self._wake()

    async def negotiation_messages(self, thread_id: str) -> Sequence[envelope_pb2.Envelope]:
        try:
            async with reading_household(self._profile, self.state_dir, self.clock) as (agent, _):
                return (await agent.negotiation(bytes.fromhex(thread_id))).messages
        except (UnreadableState, ValueError, LookupError):
            return ()

    async def agreement_file(self, thread_id: str) -> tuple[str, bytes] | None:
        document = await self.status()
        folder = (self.state_dir / AGREEMENTS_DIR).resolve()
        for agreement in rows(document, "agreements"):
            if agreement.get("thread_id") == thread_id and agreement.get("file"):
                path = Path(str(agreement["file"])).resolve()
                if path.parent == folder and path.is_file():  # only the bot's own agreement files, ever
                    return path.name, await asyncio.to_thread(path.read_bytes)
        return None


HEARTBEAT_SECONDS = 5.0  # a closed tab's stream is noticed at the next write: free its place among the streams soon


def space_config(title: str = "Your bills", **settings: Any) -> WebConfig:
    """The kit's configuration with this face's templates and static files (`host`, `token`, TLS in `settings`)."""
    settings.setdefault("heartbeat_seconds", HEARTBEAT_SECONDS)
    return WebConfig(
        title=title, templates=jinja2.PackageLoader(_PACKAGE, "templates"), static_package=_PACKAGE, **settings
    )


def create_space_app(
    sources: Mapping[str, HouseholdSource], config: WebConfig, *, live: bool = True
) -> web.Application:
    """The pages of each household in `sources` (key → source). One household under the key "" is served at
    `/`; otherwise each is under `/h/KEY/`, with an index of them at `/`. `live=False` for households no bot
    moves any more (the demo's, after the simulation): the pages open no event stream."""
    if not sources:
        raise ValueError("a household space needs at least one household")
    app = create_web_app(config)
    single = "" in sources
    if single and len(sources) > 1:
        raise ValueError('the key "" (served at /) is for a single household')
    for key, source in sources.items():
        _add_household(app, "" if single else f"/h/{key}", source, live=live)
    if not single:

        async def index(request: web.Request) -> web.Response:
            households = []
            for key, source in sources.items():
                document = await source.status()
                households.append(
                    {
                        "base": f"/h/{key}",
                        "name": source.name,
                        "bills": len(rows(document, "bills")),
                        "pending": _pending(document),
                        "billers": [row["name"] for row in rows(document, "billers")],
                    }
                )
            return render(request, "index.html", households=households)

        app.router.add_get("/", index)
    return app


def _pending(document: Mapping[str, object]) -> int:
    return sum(1 for row in rows(document, "approvals") if row.get("state") == "pending")


async def _threads(
    source: HouseholdSource, document: Mapping[str, object], bill: Mapping[str, Any]
) -> list[tuple[str, ...]]:
    """Each negotiation on the bill, move by move in words."""
    return [
        negotiation_moves(await source.negotiation_messages(str(row["thread_id"])), str(bill["biller_name"]))
        for row in rows(document, "negotiations")
        if row["biller"] == bill["biller"] and row["bill_id"] == bill["bill_id"]
    ]


def _money_facts(profile: Profile) -> dict[str, object]:
    """What the cash-flow projection starts from, in words."""
    return {
        "balance": str(profile.balance),
        "buffer": str(profile.buffer),
        "income": f"{profile.income.amount} on day {profile.income.pay_day} of each month",
        "outgoings": [f"{expense.name}: {expense.amount} on day {expense.day}" for expense in profile.expenses],
    }


def _add_household(app: web.Application, base: str, source: HouseholdSource, *, live: bool) -> None:
    """Routes of one household's pages under `base` ("" or "/h/KEY")."""

    async def page(request: web.Request, template: str, current: str, **context: Any) -> web.Response:
        document = context.pop("document", None) or await source.status()
        billers = {row["party_id"]: row for row in rows(document, "billers")}
        return render(
            request,
            template,
            base=base,
            current=current,
            household=source.name,
            document=document,
            billers=billers,
            pending_count=_pending(document),
            rows=lambda key: rows(document, key),
            bill_key=bill_key,
            short_fingerprint=short_fingerprint,
            live_url=f"{base}/events" if live else "",
            **context,
        )

    async def bills(request: web.Request) -> web.Response:
        return await page(request, "bills.html", "bills")

    async def bill(request: web.Request) -> web.Response:
        document = await source.status()
        found = tracker(document, request.match_info["key"])
        if found is None:
            return await page(request, "missing.html", "bills", document=document)
        threads = await _threads(source, document, found.bill)
        return await page(request, "bill.html", "bills", document=document, tracker=found, threads=threads)

    async def approvals(request: web.Request) -> web.Response:
        answered = request.query.get("answered", "")
        return await page(request, "approvals.html", "approvals", answered=answered, refused="")

    async def answer(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        choice, note = form.get("answer"), form.get("note")
        request_id = request.match_info["request_id"]
        if choice not in ("approve", "decline"):
            raise web.HTTPBadRequest(text="answer must be approve or decline\n")
        try:
            await source.answer(request_id, choice == "approve", note if isinstance(note, str) else "")
        except (UnknownApproval, ApprovalClosed) as error:
            refused = str(error).strip("'\"")
            response = await page(request, "approvals.html", "approvals", answered="", refused=refused)
            response.set_status(409)
            return response
        raise web.HTTPSeeOther(f"{base}/approvals?answered={choice}")

    async def agreements(request: web.Request) -> web.Response:
        document = await source.status()
        replaced = superseded(document)
        return await page(request, "agreements.html", "agreements", document=document, superseded=replaced)

    async def download(request: web.Request) -> web.Response:
        found = await source.agreement_file(request.match_info["thread_id"])
        if found is None:
            raise web.HTTPNotFound(text="no agreement file for that thread\n")
        name, body = found
        return web.Response(
            body=body,
            content_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    async def cash_flow(request: web.Request) -> web.Response:
        document = await source.status()
        chart = cash_flow_chart(source.profile, document, source.today())
        facts = _money_facts(source.profile)
        return await page(request, "cash_flow.html", "cash-flow", document=document, chart=chart, facts=facts)

    async def status(request: web.Request) -> web.Response:
        return web.Response(text=status_json(await source.status()), content_type="application/json")

    async def events(request: web.Request) -> web.StreamResponse:
        return await stream_events(request, source.hub.subscribe())

    app.router.add_get(f"{base}/", bills)
    app.router.add_get(f"{base}/bill/{{key}}", bill)
    app.router.add_get(f"{base}/approvals", approvals)
    app.router.add_post(f"{base}/approvals/{{request_id}}", answer)
    app.router.add_get(f"{base}/agreements", agreements)
    app.router.add_get(f"{base}/agreements/{{thread_id}}", download)
    app.router.add_get(f"{base}/cash-flow", cash_flow)
    app.router.add_get(f"{base}/status.json", status)
    app.router.add_get(f"{base}/events", events)
    _add_payment_pages(app, base, source, page)


Page = Callable[..., Awaitable[web.Response]]


def _add_payment_pages(app: web.Application, base: str, source: HouseholdSource, page: Page) -> None:
    """The payments page, and the decisions the bot leaves to the household (a payment in doubt, refused
    instructions) posted from it."""

    async def payments(request: web.Request) -> web.Response:
        done = request.query.get("done", "")
        return await page(
            request, "payments.html", "payments", done=done if done in PAYMENT_DECISIONS else "", refused=""
        )

    async def decide(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        decision, reference = payment_decision(form.get("decision")), form.get("bank_reference")
        if decision is None:
            raise web.HTTPBadRequest(text=f"decision must be one of {', '.join(PAYMENT_DECISIONS)}\n")
        try:
            await source.decide_payment(
                request.match_info["intent_id"], decision, reference if isinstance(reference, str) else ""
            )
        except PaymentDecisionRefused as error:
            response = await page(request, "payments.html", "payments", done="", refused=str(error))
            response.set_status(409)
            return response
        raise web.HTTPSeeOther(f"{base}/payments?done={decision}")

    app.router.add_get(f"{base}/payments", payments)
    app.router.add_post(f"{base}/payments/{{intent_id}}", decide)
