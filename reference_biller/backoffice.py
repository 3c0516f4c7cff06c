"""The biller's back office for billing systems: `parley.backoffice.v1.BackOfficeService` on a listener of its own.

    server = await serve_backoffice(agent, store, "127.0.0.1:7444", token=read_token_file(path), insecure=True)
    ...
    await server.stop(grace=5)

A billing system in any language (generated from proto/parley/backoffice/v1/)
creates accounts, issues enrolment codes and bills, records settlements, and
reads arrangements, awaited payments and a resumable event stream. Every call is
a thin translation to `BillerAgent`'s embedding API; the rules stay in the agent.
docs/BACKOFFICE.md documents the API field by field.

The listener is never open: a bearer token (read from a file, compared in
constant time, never logged) or mutual TLS (a client CA) is required, or the
server refuses to start; plaintext only on a loopback address, as for the
consumer-facing listener (TRN-2). Health (`grpc.health.v1`, unauthenticated, so
that probes need no secret) and reflection (authenticated) are served beside it.

Errors are `google.rpc.Status` with one `ErrorInfo`: the back office's own
refusals have domain "backoffice.parley.v1" and a `BackOfficeReason`; a bill the
protocol refuses keeps its protocol reason (domain "parley.v1", via
`agent.transport.status`).

Idempotency: a write repeated with the same `request_id` and content gets the
first answer (an in-process, bounded memory: concurrent duplicates wait for the
first); the same id with other content is REQUEST_ID_REUSED. Across restarts and
processes the natural keys hold instead: account id, bill id (same content:
created=false), intent + rail reference (the agent returns the same receipt).

Reads: accounts, arrangements and awaited payments through the embedding API;
a bill by id and the events of an account straight from the store's public
interface (`BillerStore.get_bill`, `event_logs`, `events`, `event_count`), which
the embedding API does not offer yet. WatchEvents polls the store, so events
appended by another process sharing it (the serving biller) arrive within
`watch_poll_interval`. An account has a log per holder (each party bound to it,
ENR-12): WatchEvents streams every log of a watched account, names each event's
holder, and resumes from a position per (account, holder).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from agent.biller import ENROLMENT_CODE_VALIDITY, AwaitedPayment, BillerAgent
from agent.biller import Arrangement as AgreedArrangement
from agent.listen import is_loopback
from agent.lru import Lru
from agent.protocol.errors import ProtocolError
from agent.protocol.messages import to_timestamp
from agent.protocol.terms import Money, parse_date
from agent.stores import AlreadyExists, BillerStore
from agent.stores.base import AccountRecord, EventRecord
from agent.transport.server import HEALTH_SERVICE_NAME, NOT_SERVING, OVERALL, SERVING
from agent.transport.status import Context
from agent.transport.status import abort as abort_with_protocol_error
from parley.backoffice.v1 import backoffice_service_pb2 as pb
from parley.backoffice.v1 import backoffice_service_pb2_grpc as pb_grpc
from parley.v1 import bill_pb2, envelope_pb2, event_pb2
from reference_biller.intake import check_issue_date
from reference_biller.statements import awaited_payment_by_reference

logger = logging.getLogger("parley.backoffice")

T = TypeVar("T")

ERROR_DOMAIN = "backoffice.parley.v1"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BackOfficeService"].full_name  # "parley.backoffice.v1.BackOfficeService"
MIN_TOKEN_CHARS = 32  # a token shorter than this is refused: it must not be guessable
MAX_REQUEST_ID_CHARS = 64
MAX_WATCHED_ACCOUNTS = 1000
MAX_WATCHED_LOGS = 10 * MAX_WATCHED_ACCOUNTS  # cursors in one request: a log per holder, after re-bindings
DEFAULT_WATCH_POLL = timedelta(seconds=1)
_REMEMBERED_REQUESTS = 10_000  # request ids kept for retries, per process
_WATCH_BATCH = 100


class BackOfficeReason(enum.Enum):
    """Why the back office refused a call: (gRPC code, meaning). The name is the ErrorInfo reason."""

    UNAUTHENTICATED = ("UNAUTHENTICATED", "No valid bearer token: send 'authorization: Bearer <token>'.")
    INVALID_REQUEST = ("INVALID_ARGUMENT", "A field is missing or malformed; the detail names it.")
    REQUEST_ID_REUSED = ("ALREADY_EXISTS", "The request_id was used before for a different request.")
    ACCOUNT_EXISTS = ("ALREADY_EXISTS", "The account id is taken by an account with another holder name.")
    ACCOUNT_NOT_FOUND = ("NOT_FOUND", "No account with that id.")
    ACCOUNT_NOT_ENROLLED = ("FAILED_PRECONDITION", "No consumer enrolled on the account yet: bills need one.")
    BILL_EXISTS = ("ALREADY_EXISTS", "The bill id is taken by a bill with other content.")
    PAYMENT_NOT_FOUND = ("NOT_FOUND", "No awaited payment with that intent or payment reference.")
    SETTLEMENT_REFUSED = (
        "FAILED_PRECONDITION",
        "The amount is not the instructed one, or the intent was settled under another rail reference.",
    )
    CURSOR_OUT_OF_RANGE = ("OUT_OF_RANGE", "A cursor is beyond the end of its (account, holder) event log.")
    INTERNAL_ERROR = ("INTERNAL", "The back office failed; retry with the same request_id.")

    def __init__(self, grpc_code: str, meaning: str) -> None:
        self.grpc_code = grpc_code
        self.meaning = meaning


class BackOfficeError(Exception):
    """A back-office refusal with its reason and a detail written for the caller (no secrets in it)."""

    def __init__(self, reason: BackOfficeReason, detail: str = "") -> None:
        super().__init__(f"{reason.name}: {detail or reason.meaning}")
        self.reason = reason
        self.detail = detail or reason.meaning


def status_of(error: BackOfficeError) -> status_pb2.Status:
    """The google.rpc.Status carrying a back-office refusal: one ErrorInfo, domain "backoffice.parley.v1"."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason.name, domain=ERROR_DOMAIN))
    code: grpc.StatusCode = grpc.StatusCode[error.reason.grpc_code]
    return status_pb2.Status(code=code.value[0], message=error.detail, details=[detail])


async def _abort(context: Context, error: BackOfficeError) -> NoReturn:
    await context.abort_with_status(rpc_status.to_status(status_of(error)))
    raise AssertionError("abort_with_status returned")  # it raises; this line tells the type checker


async def _answer(context: Context, call: Awaitable[T]) -> T:
    """Await a handler's work, turning every failure into a Status with one ErrorInfo (never UNKNOWN)."""
    try:
        return await call
    except BackOfficeError as error:
        logger.info("back office refused a call: %s", error.reason.name)
        await _abort(context, error)
    except ProtocolError as error:  # the protocol's own rules (a bill's dates, amounts, currency)
        await abort_with_protocol_error(context, error)
    except Exception:
        logger.exception("internal error in the back office")
        await _abort(context, BackOfficeError(BackOfficeReason.INTERNAL_ERROR))


# --- Authentication ---------------------------------------------------------------------------------


def read_token_file(path: Path) -> bytes:
    """The bearer token in `path` (surrounding whitespace dropped); ValueError if shorter than 32 characters."""
    token = path.read_bytes().strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token in {path} is shorter than {MIN_TOKEN_CHARS} characters")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call only with 'authorization: Bearer <token>'; health checks pass without one.

    Both sides are hashed before the constant-time comparison, so neither the
    token's bytes nor its length leak through timing. The token is never logged.
    """

    def __init__(self, token: bytes) -> None:
        self._expected = hashlib.sha256(token).digest()
        self._refuse: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(self._refused)

    def admits(self, authorization: str | bytes | None) -> bool:
        if authorization is None:
            return False
        text = authorization.decode("latin-1") if isinstance(authorization, bytes) else authorization
        scheme, _, presented = text.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(hashlib.sha256(presented.strip().encode("latin-1")).digest(), self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler_call_details.method.startswith(f"/{HEALTH_SERVICE_NAME}/"):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.admits(metadata.get("authorization")):
            return await continuation(handler_call_details)
        return self._refuse

    @staticmethod
    async def _refused(request: bytes, context: Context) -> None:
        logger.warning("back office call refused: no valid bearer token")
        await _abort(context, BackOfficeError(BackOfficeReason.UNAUTHENTICATED))


# --- Conversions ------------------------------------------------------------------------------------


def _money(pb_money: pb.Money, field: str) -> Money:
    """A request's amount: exact minor units of an ISO 4217 currency, positive."""
    if not pb_money.currency_code:
        raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, f"{field} needs a currency_code")
    if pb_money.amount_minor <= 0:
        raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, f"{field} must be positive")
    return Money.of(pb_money.amount_minor, pb_money.currency_code)


def money_to_proto(money: Money) -> pb.Money:
    return pb.Money(currency_code=money.currency.code, amount_minor=money.minor)


def _require(value: str, field: str, maximum: int = MAX_REQUEST_ID_CHARS) -> str:
    if not 0 < len(value) <= maximum:
        raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, f"{field} must be 1 to {maximum} characters")
    return value


def _date(text: str, field: str) -> date:
    try:
        return parse_date(text)
    except ProtocolError:
        raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, f"{field} is not a YYYY-MM-DD date") from None


def arrangement_to_proto(arrangement: AgreedArrangement) -> pb.Arrangement:
    paid = arrangement.paid_instalments
    return pb.Arrangement(
        account_id=arrangement.account_id,
        bill_id=arrangement.bill_id,
        thread_id=arrangement.thread_id.hex(),
        agreement_digest=arrangement.agreement_digest.hex(),
        terms_kind=arrangement.terms.kind.name,
        total=money_to_proto(arrangement.terms.total),
        schedule=[
            pb.ScheduledPayment(
                index=index,
                due_date=instalment.due_date.isoformat(),
                amount=money_to_proto(instalment.amount),
                paid=index in paid,
            )
            for index, instalment in enumerate(arrangement.terms.schedule)
        ],
        agree_time=to_timestamp(arrangement.agreed_at),
        active=arrangement.active,
    )


def awaited_to_proto(awaited: AwaitedPayment) -> pb.AwaitedPayment:
    return pb.AwaitedPayment(
        intent=pb.IntentKey(account_id=awaited.account_id, intent_id=awaited.intent_id),
        amount=money_to_proto(awaited.amount),
        payment_reference=awaited.payment_reference,
    )


def event_to_proto(record: EventRecord) -> pb.Event:
    """The back office's view of one stored, signed event (its own signed bytes included), in its holder's log."""
    signed = record.envelope
    event = event_pb2.Event.FromString(envelope_pb2.Envelope.FromString(signed).payload)
    return pb.Event(
        account_id=record.account_id,
        holder=record.party_id,
        sequence=record.sequence,
        kind=pb.EventKind.ValueType(event.kind),  # the same numbers as parley.v1.EventKind (tested)
        bill_id=event.bill_id,
        amount=pb.Money(currency_code=event.amount.currency_code, amount_minor=event.amount.amount_minor)
        if event.HasField("amount")
        else None,
        date=event.date,
        reminder_level=event.reminder_level,
        message=event.message,
        create_time=event.header.create_time,
        signed_event=signed,
    )


async def _converted(record: EventRecord) -> pb.Event:
    return event_to_proto(record)


# --- The service ------------------------------------------------------------------------------------


class BackOfficeServicer(pb_grpc.BackOfficeServiceServicer):
    """BackOfficeService over a `BillerAgent` (writes, reads) and its store (bills by id, events)."""

    def __init__(
        self, agent: BillerAgent, store: BillerStore, *, watch_poll_interval: timedelta = DEFAULT_WATCH_POLL
    ) -> None:
        self._agent = agent
        self._store = store
        self._poll = watch_poll_interval.total_seconds()
        self._closing = asyncio.Event()
        self._requests: Lru[tuple[str, str], tuple[bytes, asyncio.Future[Any]]] = Lru(_REMEMBERED_REQUESTS)

    def end_watches(self) -> None:
        """End every WatchEvents stream with OK (a graceful stop): callers resume from their cursors."""
        self._closing.set()

    async def _once(self, rpc: str, request_id: str, request: Message, work: Callable[[], Awaitable[T]]) -> T:
        """Run a write once per request id: a retry with the same content gets the first answer."""
        _require(request_id, "request_id")
        content = request.SerializeToString(deterministic=True)
        key = (rpc, request_id)
        remembered = self._requests.get(key)
        if remembered is not None:
            first_content, first = remembered
            if first_content != content:
                raise BackOfficeError(BackOfficeReason.REQUEST_ID_REUSED, f"request_id {request_id!r} was used before")
            answer: T = await asyncio.shield(first)
            return answer
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._requests.put(key, (content, future))
        try:
            result = await work()
        except BaseException as error:
            self._requests.pop(key)  # a refusal may not hold later (say, once enrolled): a retry runs again
            if isinstance(error, asyncio.CancelledError):
                future.cancel()  # the first caller went away: duplicates waiting on it end too, and retry
            else:
                future.set_exception(error)
                future.exception()  # retrieved, so an unawaited failure is not reported as lost
            raise
        future.set_result(result)
        return result

    async def CreateAccount(self, request: pb.CreateAccountRequest, context: Context) -> pb.CreateAccountResponse:
        return await _answer(
            context, self._once("CreateAccount", request.request_id, request, lambda: self._create_account(request))
        )

    async def _create_account(self, request: pb.CreateAccountRequest) -> pb.CreateAccountResponse:
        account_id = _require(request.account_id, "account_id")
        holder = _require(request.holder_name, "holder_name", 200)
        created = True
        try:
            await self._agent.create_account(account_id, holder)
        except AlreadyExists:
            created = False
        account = await self._agent.account(account_id)
        if account is None:
            raise RuntimeError(f"account {account_id!r} missing right after it was created")
        if account.holder_name != holder:
            raise BackOfficeError(BackOfficeReason.ACCOUNT_EXISTS, f"account {account_id!r} exists for another holder")
        return pb.CreateAccountResponse(
            account=pb.Account(
                account_id=account.account_id,
                holder_name=account.holder_name,
                enrolled=account.consumer_party_id is not None,
                consumer_party_id=account.consumer_party_id or "",
            ),
            created=created,
        )

    async def IssueEnrolmentCode(
        self, request: pb.IssueEnrolmentCodeRequest, context: Context
    ) -> pb.IssueEnrolmentCodeResponse:
        return await _answer(
            context, self._once("IssueEnrolmentCode", request.request_id, request, lambda: self._issue_code(request))
        )

    async def _issue_code(self, request: pb.IssueEnrolmentCodeRequest) -> pb.IssueEnrolmentCodeResponse:
        account_id = _require(request.account_id, "account_id")
        await self._existing_account(account_id)
        valid_for = timedelta(days=request.valid_for_days) if request.valid_for_days else ENROLMENT_CODE_VALIDITY
        if valid_for > timedelta(days=366):
            raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, "valid_for_days is at most 366")
        now = self._agent.clock.now()
        # As `parley biller codes --account`: a new code supersedes the account's earlier unspent ones, so a
        # reissued letter leaves one live code, never two (issue 17, item 1).
        await self._store.revoke_enrolment_codes(account_id, now)
        code = await self._agent.issue_enrolment_code(account_id, valid_for)
        return pb.IssueEnrolmentCodeResponse(
            account_id=account_id,
            enrolment_code=code,
            expire_time=to_timestamp(now + valid_for),
            biller_party_id=self._agent.party_id,
            biller_fingerprint=self._agent.key_chain.fingerprint.hex(),
        )

    async def IssueBill(self, request: pb.IssueBillRequest, context: Context) -> pb.IssueBillResponse:
        return await _answer(
            context, self._once("IssueBill", request.request_id, request, lambda: self._issue_bill(request))
        )

    async def _issue_bill(self, request: pb.IssueBillRequest) -> pb.IssueBillResponse:
        bill_id = _require(request.bill_id, "bill_id")
        account_id = _require(request.account_id, "account_id")
        if not request.HasField("amount_due"):
            raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, "amount_due is required")
        amount = _money(request.amount_due, "amount_due")
        due = _date(request.due_date, "due_date")
        issued = _date(request.issue_date, "issue_date") if request.issue_date else None
        description = _require(request.description, "description", 500)
        if (await self._existing_account(account_id)).consumer_party_id is None:
            raise BackOfficeError(
                BackOfficeReason.ACCOUNT_NOT_ENROLLED, f"account {account_id!r} has no enrolled consumer yet"
            )
        existing = await self._store.get_bill(bill_id)
        if existing is None:
            if issued is not None:  # a new bill only: a retry of an old one is still answered as before
                try:
                    check_issue_date(issued, self._agent.clock.now().date())
                except ValueError as error:
                    raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, str(error)) from None
            try:
                await self._agent.issue_bill(
                    account_id,
                    amount,
                    due,
                    description,
                    issue_date=None if issued is None else issued,
                    bill_id=bill_id,
                )
            except AlreadyExists:  # issued meanwhile, by a concurrent call: compared below like any repeat
                pass
            else:
                stored = await self._store.get_bill(bill_id)
                digest = b"" if stored is None else stored.digest
                return pb.IssueBillResponse(bill_id=bill_id, created=True, bill_digest=digest.hex())
            existing = await self._store.get_bill(bill_id)
            if existing is None:
                raise RuntimeError(f"bill {bill_id!r} is taken but cannot be read")
        bill = bill_pb2.Bill.FromString(envelope_pb2.Envelope.FromString(existing.envelope).payload)
        same = (
            existing.account_id == account_id
            and existing.amount_minor == amount.minor
            and existing.currency == amount.currency.code
            and existing.due_date == due
            and bill.description == description
            and (issued is None or bill.issue_date == issued.isoformat())
        )
        if not same:
            raise BackOfficeError(BackOfficeReason.BILL_EXISTS, f"bill {bill_id!r} was issued with other content")
        return pb.IssueBillResponse(bill_id=bill_id, created=False, bill_digest=existing.digest.hex())

    async def RecordSettlement(
        self, request: pb.RecordSettlementRequest, context: Context
    ) -> pb.RecordSettlementResponse:
        return await _answer(
            context, self._once("RecordSettlement", request.request_id, request, lambda: self._settle(request))
        )

    async def _settle(self, request: pb.RecordSettlementRequest) -> pb.RecordSettlementResponse:
        if not request.HasField("amount"):
            raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, "amount is required")
        amount = _money(request.amount, "amount")
        rail_reference = _require(request.rail_reference, "rail_reference", 140)
        which = request.WhichOneof("payment")
        if which == "intent":
            account_id = _require(request.intent.account_id, "intent.account_id")
            intent_id = _require(request.intent.intent_id, "intent.intent_id", 128)
        elif which == "payment_reference":
            awaited = await awaited_payment_by_reference(self._agent, request.payment_reference)
            if awaited is None:
                raise BackOfficeError(
                    BackOfficeReason.PAYMENT_NOT_FOUND,
                    f"no awaited payment has reference {request.payment_reference!r} (unknown, or already settled)",
                )
            account_id, intent_id = awaited.account_id, awaited.intent_id
        else:
            raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, "name the payment: intent or payment_reference")
        settle_time = request.settle_time.ToDatetime(UTC) if request.HasField("settle_time") else None
        try:
            receipt = await self._agent.record_settlement(
                account_id, intent_id, amount, rail_reference, settle_time=settle_time
            )
        except LookupError:
            raise BackOfficeError(
                BackOfficeReason.PAYMENT_NOT_FOUND, f"no payment intent {intent_id!r} on account {account_id!r}"
            ) from None
        except ValueError as error:  # PAY-6 amount, PAY-7 second rail reference: the agent's words
            raise BackOfficeError(BackOfficeReason.SETTLEMENT_REFUSED, str(error)) from None
        return pb.RecordSettlementResponse(
            intent=pb.IntentKey(account_id=account_id, intent_id=intent_id), receipt=receipt.SerializeToString()
        )

    async def ListArrangements(
        self, request: pb.ListArrangementsRequest, context: Context
    ) -> pb.ListArrangementsResponse:
        return await _answer(context, self._arrangements(request))

    async def _arrangements(self, request: pb.ListArrangementsRequest) -> pb.ListArrangementsResponse:
        if request.account_id:
            await self._existing_account(request.account_id)
        arrangements = await self._agent.arrangements(
            request.account_id or None, active_only=not request.include_inactive
        )
        return pb.ListArrangementsResponse(arrangements=[arrangement_to_proto(a) for a in arrangements])

    async def ListAwaitedPayments(
        self, request: pb.ListAwaitedPaymentsRequest, context: Context
    ) -> pb.ListAwaitedPaymentsResponse:
        return await _answer(context, self._awaited())

    async def _awaited(self) -> pb.ListAwaitedPaymentsResponse:
        return pb.ListAwaitedPaymentsResponse(
            payments=[awaited_to_proto(a) for a in await self._agent.awaited_payments()]
        )

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        accounts, positions = await _answer(context, self._checked_cursors(request))
        while not self._closing.is_set():
            batches = await _answer(context, self._next_batches(accounts, positions))
            for batch in batches:
                for record in batch:
                    event = await _answer(context, _converted(record))
                    yield pb.WatchEventsResponse(event=event)
                    positions[record.account_id, record.party_id] = record.sequence + 1
            if not batches:
                closing = asyncio.ensure_future(self._closing.wait())
                try:
                    await asyncio.wait((closing,), timeout=self._poll)
                finally:
                    closing.cancel()

    async def _next_batches(
        self, accounts: Sequence[str], positions: dict[tuple[str, str], int]
    ) -> list[list[EventRecord]]:
        """The events past each position (a batch per log at most), in every log of each watched account —
        earlier holders' and any that a re-binding started meanwhile, from 0 — for logs that have any."""
        batches = []
        for account_id in accounts:
            for log in await self._store.event_logs(account_id):
                start = positions.get((account_id, log.party_id), 0)
                if start < log.length:
                    batches.append(await self._store.events(account_id, start, _WATCH_BATCH, log.party_id))
        return [batch for batch in batches if batch]

    async def _checked_cursors(self, request: pb.WatchEventsRequest) -> tuple[list[str], dict[tuple[str, str], int]]:
        """The watched accounts, in the request's order, and where to resume their logs, by (account, holder):
        a log without a position is streamed from 0."""
        if not 0 < len(request.cursors) <= MAX_WATCHED_LOGS:
            raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, f"give 1 to {MAX_WATCHED_LOGS} cursors")
        named: dict[str, set[str]] = {}  # account -> the holders its cursors name ("": none)
        for cursor in request.cursors:
            holders = named.setdefault(_require(cursor.account_id, "cursors.account_id"), set())
            if cursor.holder in holders:
                raise BackOfficeError(
                    BackOfficeReason.INVALID_REQUEST, f"two cursors for {cursor.account_id!r} {cursor.holder!r}"
                )
            if holders and ("" in holders or not cursor.holder):
                raise BackOfficeError(
                    BackOfficeReason.INVALID_REQUEST,
                    f"{cursor.account_id!r}: a cursor without a holder is the account's only cursor",
                )
            holders.add(cursor.holder)
        if len(named) > MAX_WATCHED_ACCOUNTS:
            raise BackOfficeError(BackOfficeReason.INVALID_REQUEST, f"watch 1 to {MAX_WATCHED_ACCOUNTS} accounts")
        positions: dict[tuple[str, str], int] = {}
        for cursor in request.cursors:
            account_id, holder, start = cursor.account_id, cursor.holder, cursor.next_sequence
            await self._existing_account(account_id)
            if not holder:  # the account from 0, or a position in its only log (before holders were named)
                logs = await self._store.event_logs(account_id)
                if start == 0 or len(logs) > 1:  # several: which one it meant is unknown, so each from 0
                    continue
                holder = logs[0].party_id if logs else ""
            length = await self._store.event_count(account_id, holder) if holder else 0
            if start > length:
                raise BackOfficeError(
                    BackOfficeReason.CURSOR_OUT_OF_RANGE,
                    f"{account_id!r} holder {holder!r}: next_sequence {start} is beyond the log's end {length}",
                )
            positions[account_id, holder] = start
        return list(named), positions

    async def _existing_account(self, account_id: str) -> AccountRecord:
        account = await self._agent.account(account_id)
        if account is None:
            raise BackOfficeError(BackOfficeReason.ACCOUNT_NOT_FOUND, f"no account {account_id!r}")
        return account


# --- The server -------------------------------------------------------------------------------------


@dataclass
class BackOfficeServer:
    """A running back-office server: the grpc.aio server, its port, its health service and its servicer."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    servicer: BackOfficeServicer

    async def stop(self, grace: float | None = 5.0) -> None:
        """Graceful stop: NOT_SERVING, event streams ended, in-flight calls given `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        self.servicer.end_watches()
        await self.server.stop(grace)


async def serve_backoffice(
    agent: BillerAgent,
    store: BillerStore,
    listen: str,
    *,
    token: bytes | None = None,
    tls: tuple[bytes, bytes] | None = None,
    tls_client_ca: bytes | None = None,
    insecure: bool = False,
    watch_poll_interval: timedelta = DEFAULT_WATCH_POLL,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> BackOfficeServer:
    """Serve BackOfficeService on `listen` ("host:port", port 0: any), with health and reflection.

    Authentication is required: `token` (bearer, from `read_token_file`) and/or
    `tls_client_ca` (mutual TLS); ValueError with neither. `tls` is (certificate
    chain PEM, private key PEM); plaintext needs `insecure=True` and a loopback host.
    """
    if token is None and tls_client_ca is None:
        raise ValueError("the back office is never open: give a bearer token file or a client CA (mutual TLS)")
    if (tls is None) == (not insecure):
        raise ValueError("choose either TLS (certificate and key) or insecure (plaintext on loopback)")
    if tls_client_ca is not None and tls is None:
        raise ValueError("mutual TLS (a client CA) needs TLS: give a certificate and key too")
    host = listen.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if insecure and not is_loopback(host):
        raise ValueError(f"plaintext is allowed only on a loopback address, not {host!r}: use TLS")
    guards = (BearerTokenInterceptor(token),) if token is not None else ()
    server = grpc.aio.server(interceptors=(*guards, *interceptors))
    servicer = BackOfficeServicer(agent, store, watch_poll_interval=watch_poll_interval)
    pb_grpc.add_BackOfficeServiceServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    for service in (OVERALL, SERVICE_NAME):
        await health.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls is not None:
        certificate_chain, private_key = tls
        credentials = grpc.ssl_server_credentials(
            [(private_key, certificate_chain)],
            root_certificates=tls_client_ca,
            require_client_auth=tls_client_ca is not None,
        )
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    await server.start()
    for service in (OVERALL, SERVICE_NAME):
        await health.set(service, SERVING)
    auth = " + ".join(name for name, on in (("bearer token", token), ("mutual TLS", tls_client_ca)) if on)
    logger.info("back office serving on %s port %d (%s)", host, port, auth)
    return BackOfficeServer(server, port, health, servicer)


__all__ = [
    "ERROR_DOMAIN",
    "SERVICE_NAME",
    "BackOfficeError",
    "BackOfficeReason",
    "BackOfficeServer",
    "BackOfficeServicer",
    "BearerTokenInterceptor",
    "read_token_file",
    "serve_backoffice",
    "status_of",
]
