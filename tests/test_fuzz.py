"""`parley fuzz` (agent/tools/fuzz.py): the quick run over every RPC, and the oracle against billers broken on purpose.

Every run serves a real biller on 127.0.0.1 over gRPC with a real SQLite file
and shuts it down. The quick run is CI's fuzzing budget (a few hundred inputs);
`parley fuzz --seconds N` is the long run.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from rich.console import Console

from agent.biller import BillerAgent
from agent.biller.negotiation import NegotiationPhase
from agent.biller.receive import Inbound, ReplayCache
from agent.cli import main
from agent.protocol.dsse import sign_envelope
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.moves import NegotiationPayload
from agent.protocol.negotiation import Negotiation
from agent.stores.base import MessageRecord, ReplayRecord, ThreadRecord
from agent.tools.fuzz import LAYERS, Fuzzer, FuzzInput, FuzzReport, print_report, run_fuzz
from agent.tools.fuzz_command import RPCS
from agent.transport.status import error_from_rpc
from parley.v1 import account_pb2, biller_service_pb2, enrolment_pb2, envelope_pb2, negotiation_pb2
from tests.helpers.peer import running_biller

M = TypeVar("M", bound=Message)

# Reasons that only a properly signed body can reach: the signature, form and parse checks all passed.
DEEP_REASONS = {
    "UNKNOWN_CURRENCY",
    "AMOUNT_OUT_OF_RANGE",
    "INVALID_DATE",
    "INVALID_TERMS",
    "CURRENCY_MISMATCH",
    "TOTAL_MISMATCH",
    "SCHEDULE_SUM_MISMATCH",
    "PAYMENT_AMOUNT_MISMATCH",
    "ACCOUNT_ACCESS_DENIED",
    "SEQUENCE_MISMATCH",
    "WRONG_RECIPIENT",
    "WRONG_SENDER",
    "LIFETIME_TOO_LONG",
    "UNKNOWN_FIELD",
    "NOT_FOUND",
}


def test_quick_run_over_every_rpc_finds_nothing() -> None:
    report = run_fuzz(max_inputs=300, seed=0)

    assert report.inputs == 300
    assert report.findings == [], "\n".join(f"{f.problem}: {f.input.describe()}" for f in report.findings)
    assert set(report.tallies) == set(RPCS)
    for rpc, tally in report.tallies.items():
        assert tally.tried > 0, rpc
        assert tally.tried == sum(tally.outcomes.values()) == sum(tally.layers.values())
    layers = {layer for tally in report.tallies.values() for layer in tally.layers}
    assert layers == set(LAYERS)
    reasons = {label.split()[-1] for tally in report.tallies.values() for label in tally.outcomes}
    assert len(reasons & DEEP_REASONS) >= 5, reasons
    assert "OK" in reasons  # some mutations stay valid, and are counted apart


def test_cli_prints_inputs_per_rpc_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_file = tmp_path / "fuzz.json"
    level = logging.getLogger("parley").level

    status = main(["fuzz", "--seconds", "2", "--seed", "5", "--rpc", "GetBill", "--json", str(report_file)])

    assert status == 0
    assert logging.getLogger("parley").level == level  # quietened for the run only: an embedding keeps its logs
    printed = capsys.readouterr().out
    assert "GetBill" in printed
    assert "no findings" in printed
    report = json.loads(report_file.read_text())
    assert report["seed"] == 5
    assert list(report["rpcs"]) == ["GetBill"]
    assert report["rpcs"]["GetBill"]["tried"] == report["inputs"] > 0
    assert report["findings"] == []


def test_undecodable_requests_are_malformed_envelope_not_unknown(tmp_path: Path) -> None:
    """Regression (found by the fuzzer): gRPC's own deserializer answered UNKNOWN, with the parser's exception text."""

    async def scenario() -> None:
        async with running_biller(tmp_path) as biller, grpc.aio.insecure_channel(biller.target) as channel:
            for rpc in RPCS:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _call_raw(channel, rpc, b"\x0a\x05abc")
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, rpc
                assert error_from_rpc(refused.value).reason is Reason.MALFORMED_ENVELOPE, rpc
                assert "DecodeError" not in (refused.value.details() or "")

    asyncio.run(scenario())


def test_a_violation_may_record_its_evidence_and_the_fixture_is_rebuilt(tmp_path: Path) -> None:
    """NEG-15: a well-signed in-sequence Accept of the wrong offer is stored as evidence; that is not a finding."""

    def wrong_offer(accept: Message) -> None:
        assert isinstance(accept, negotiation_pb2.Accept)
        accept.offer_digest = bytes(32)

    report = _send_one_signed(tmp_path, "Negotiate", "accept", wrong_offer)

    assert report.tallies["Negotiate"].outcomes == {"FAILED_PRECONDITION ACCEPT_DIGEST_MISMATCH": 1}
    assert report.findings == []
    assert report.fixtures_built == 2  # the thread ended PROTOCOL_ERROR, so a fresh fixture was made


def test_a_query_for_another_account_changes_nothing(tmp_path: Path) -> None:
    """The store oracle on its own: a refused signed read leaves every table as it was (no finding, no rebuild)."""

    def other_account(query: Message) -> None:
        assert isinstance(query, account_pb2.AccountQuery)
        query.account_id = "acct-someone-else"

    report = _send_one_signed(tmp_path, "ListBills", "all", other_account)

    assert report.tallies["ListBills"].outcomes == {"PERMISSION_DENIED ACCOUNT_ACCESS_DENIED": 1}
    assert report.findings == []
    assert report.fixtures_built == 1


def test_a_move_past_the_deadline_may_expire_the_thread(tmp_path: Path) -> None:
    """NEG-15 check 5b: a well-formed move after the thread's deadline is refused and the thread ends EXPIRED."""
    late = timedelta(days=3)  # the fixture's thread has a 2-day deadline

    def sent_late(withdraw: Message) -> None:
        assert isinstance(withdraw, negotiation_pb2.Withdraw)
        for stamp in (withdraw.header.create_time, withdraw.header.expire_time):
            stamp.FromDatetime(stamp.ToDatetime(tzinfo=UTC) + late)

    report = _send_one_signed(tmp_path, "Negotiate", "withdraw", sent_late, clock_ahead=late)

    assert report.tallies["Negotiate"].outcomes == {"FAILED_PRECONDITION NEGOTIATION_DEADLINE_PASSED": 1}
    assert report.findings == []
    assert report.fixtures_built == 2


def test_a_wrong_enrolment_code_may_be_counted(tmp_path: Path) -> None:
    """ENR-5: a wrong code counts against the account; the only change a refused enrolment may make."""

    def wrong_code(request: Message) -> None:
        assert isinstance(request, enrolment_pb2.EnrolmentRequest)
        request.code = "WRONG-CODE-0000"

    report = _send_one_signed(tmp_path, "Enrol", "spare", wrong_code)

    assert report.tallies["Enrol"].outcomes == {"PERMISSION_DENIED ENROLMENT_CODE_INVALID": 1}
    assert report.findings == []
    assert report.fixtures_built == 2


def test_a_wrong_code_for_an_unknown_account_may_be_counted_against_its_id(tmp_path: Path) -> None:
    """ENR-3: a wrong code for an account id the biller does not know is counted against the id's hash, a new
    `enrolment_guesses` row. `parley fuzz --seconds 120` reported exactly this as a finding (an account id of
    'consumer:Ünicode') before the oracle knew it."""

    def unknown_account(request: Message) -> None:
        assert isinstance(request, enrolment_pb2.EnrolmentRequest)
        request.account_id = "consumer:Ünicode"
        request.code = "WRONG-CODE-0000"

    report = _send_one_signed(tmp_path, "Enrol", "spare", unknown_account)

    assert report.tallies["Enrol"].outcomes == {"PERMISSION_DENIED ENROLMENT_CODE_INVALID": 1}
    assert report.findings == []


def _send_one_signed(
    tmp_path: Path,
    rpc: str,
    template_name: str,
    mutate: Callable[[Message], None],
    *,
    clock_ahead: timedelta = timedelta(0),
) -> FuzzReport:
    """One input through a live Fuzzer: the named template's body changed by `mutate`, properly signed.

    `clock_ahead` moves the biller's clock forward once the fixture is built.
    """

    async def scenario() -> FuzzReport:
        fuzzer = Fuzzer(tmp_path, rpcs=(rpc,))
        await fuzzer.start()
        try:
            fuzzer.clock.advance(clock_ahead)
            [template] = [t for t in fuzzer.fixture.templates[rpc] if t.name == template_name]
            assert template.payload is not None
            assert template.signer is not None
            body = type(template.payload)()
            body.CopyFrom(template.payload)
            mutate(body)
            envelope = sign_envelope(template.signer, body.DESCRIPTOR.full_name, body.SerializeToString())
            request = template.with_envelope(envelope).SerializeToString()
            await fuzzer.try_input(FuzzInput(rpc, "signed", template_name, (mutate.__name__,), request))
            return fuzzer.report
        finally:
            await fuzzer.stop()

    return asyncio.run(scenario())


# --- The oracle catches broken billers --------------------------------------------------------------------


def get_bill_without_a_lookup_check(agent: BillerAgent) -> None:
    """GetBill dereferences the looked-up bill before checking it exists: an unknown bill id is an INTERNAL error."""

    async def get_bill(envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetBillResponse:
        query = await agent.party.receive.query(envelope, "GetBill")
        bill = await agent.party.store.get_bill(query.bill_id)
        if bill.account_id != query.account_id:  # type: ignore[union-attr]
            raise RemoteProtocolError(Reason.NOT_FOUND, "not on the account")
        return biller_service_pb2.GetBillResponse(bill=envelope_pb2.Envelope.FromString(bill.envelope))  # type: ignore[union-attr]

    agent.get_bill = get_bill  # type: ignore[method-assign]


class _RefusalEndsTheThread(NegotiationPhase):
    """Reads NEG-15 wrongly: every refused move on a thread expires it, not only one past the deadline."""

    async def record_refusal(
        self,
        negotiation: Negotiation,
        thread: ThreadRecord | None,
        inbound: Inbound[NegotiationPayload],
        record: MessageRecord,
        *,
        error: RemoteProtocolError,
        now: datetime,
    ) -> None:
        if thread is not None:
            await self.party.store.mark_thread_expired(thread.thread_id)
        await super().record_refusal(negotiation, thread, inbound, record, error=error, now=now)


def refusal_ends_the_thread(agent: BillerAgent) -> None:
    agent.party.negotiation = _RefusalEndsTheThread(agent.party)


class _NoReplayCache(ReplayCache):
    """No replay cache lookup (HDR-12): a retry of an applied move is judged afresh against the moved-on thread."""

    def answer(self, inbound: Inbound[M], entry: ReplayRecord | None) -> bytes | None:
        return None


def forgets_replays(agent: BillerAgent) -> None:
    agent.party.replays = _NoReplayCache(agent.party)


def test_oracle_reports_an_internal_error() -> None:
    report = run_fuzz(
        max_inputs=300, seed=0, rpcs=("GetBill",), defect=get_bill_without_a_lookup_check, stop_on_finding=True
    )

    [finding] = report.findings
    assert finding.problem == "INTERNAL for a client's input (ERR-2)"
    assert finding.input.rpc == "GetBill"
    assert finding.input.layer == "signed"
    assert report.inputs < 300
    printed = io.StringIO()
    print_report(report, Console(file=printed, width=100))
    assert "FINDING" in printed.getvalue()
    assert "reproduce: send these" in printed.getvalue()
    assert base64.b64encode(finding.input.request).decode()[:60] in printed.getvalue().replace("\n", "")
    assert finding.to_json()["request_base64"] == base64.b64encode(finding.input.request).decode()


def test_oracle_reports_a_state_change_on_refusal() -> None:
    report = run_fuzz(max_inputs=300, seed=0, rpcs=("Negotiate",), defect=refusal_ends_the_thread, stop_on_finding=True)

    [finding] = report.findings
    assert "but changed the store:" in finding.problem
    assert "threads +1 -1" in finding.problem
    assert finding.input.rpc == "Negotiate"
    assert report.inputs < 300


async def _call_raw(channel: grpc.aio.Channel, rpc: str, request: bytes) -> None:
    """Send request bytes as they are (WatchEvents: read the stream to its end)."""
    path = f"/parley.v1.BillerService/{rpc}"
    if rpc == "WatchEvents":
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            path, request_serializer=None, response_deserializer=None
        )
        async for _ in stream(request, timeout=5):
            pass
    else:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            path, request_serializer=None, response_deserializer=None
        )
        await unary(request, timeout=5)


def test_oracle_reports_a_retry_answered_differently() -> None:
    report = run_fuzz(max_inputs=300, seed=0, rpcs=("Negotiate",), defect=forgets_replays, stop_on_finding=True)

    [finding] = report.findings
    assert finding.problem.startswith("a retry was answered ")
    assert finding.problem.endswith("not as the original OK (HDR-12)")
    assert report.retries >= 1
