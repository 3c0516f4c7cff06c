"""`parley bench`: a tiny real run (spawned biller workers and load generators over gRPC on 127.0.0.1, a real
SQLite store) whose report must be complete and consistent. Never a performance threshold: figures are the
bench's to print, not the tests' to judge."""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import sqlite3
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from rich.console import Console

from agent.cli import main
from agent.conformance.peers import PeerIdentity
from agent.protocol.limits import Limits
from agent.tools.bench import (
    BILLER_ID,
    REQUESTS_PER_CYCLE,
    SIGNED_PER_BASELINE_CALL,
    SIGNED_PER_CYCLE,
    WORKER_PID_METHOD,
    BenchError,
    BenchOptions,
    LoadSpec,
    WorkerSpec,
    balanced_channels,
    consumers_per_slot,
    percentile,
    reserve_port,
    run_bench,
    started_workers,
)

TINY = BenchOptions(
    seconds=1.0,
    warmup=0.3,
    concurrency=2,
    workers=1,
    load_generators=1,
    channels=2,
    half_load=False,
    max_rate=400.0,  # bills for up to 400 cycles/s: more than two slots can run
    disk_probe_seconds=0.2,
)


def _check_phase(phase: dict[str, Any], signed_per_cycle: int) -> None:
    assert phase["cycles"] > 0
    assert phase["cycles_verified"] == phase["cycles"], phase["errors"]  # every cycle verified end to end
    assert phase["errors"] == {}
    assert phase["bills_exhausted"] == 0
    assert phase["signed_messages"] == signed_per_cycle * phase["cycles_verified"]
    assert phase["cycles_per_second"] == pytest.approx(phase["cycles_verified"] / phase["seconds"])
    latency = phase["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert phase["server_cpu_seconds"] > 0
    assert phase["server_cpu_seconds"] == pytest.approx(sum(phase["worker_cpu_seconds"]))
    assert phase["server_cpu_us_per_signed_message"] == pytest.approx(
        phase["server_cpu_seconds"] / phase["signed_messages"] * 1e6
    )
    assert phase["worker_peak_rss_mib"] > 0
    assert phase["mean_request_payload_bytes"] > 0
    assert phase["mean_response_payload_bytes"] > 0


def test_a_tiny_bench_reports_verified_cycles_the_baseline_and_their_ratios(tmp_path: Path) -> None:
    state = tmp_path / "state"
    report_path = tmp_path / "report.json"
    options = BenchOptions(**{**TINY.__dict__, "state_dir": state, "prefill": 2_000})
    report = run_bench(options, Console(file=None, quiet=True), json_path=report_path, show_progress=False)

    assert json.loads(report_path.read_text()) == report
    parley, baseline, ratio = report["parley"], report["baseline"], report["ratio"]
    _check_phase(parley, SIGNED_PER_CYCLE)
    _check_phase(baseline, SIGNED_PER_BASELINE_CALL)
    # The baseline signs and verifies payloads of the sizes the Parley phase measured.
    assert baseline["mean_request_payload_bytes"] == round(parley["mean_request_payload_bytes"])
    assert baseline["mean_response_payload_bytes"] == round(parley["mean_response_payload_bytes"])
    assert ratio["throughput"] == parley["signed_messages_per_second"] / baseline["signed_messages_per_second"]
    assert (
        ratio["cpu_per_message"]
        == parley["server_cpu_us_per_signed_message"] / baseline["server_cpu_us_per_signed_message"]
    )
    assert "synchronous=FULL" in report["config"]["durability"]
    disk = report["config"]["state_dir_fdatasync_ms"]  # the disk that bounds every durable step
    assert disk["syncs"] > 0
    assert 0 < disk["p50"] <= disk["p99"] <= disk["max"]
    assert sorted(path.name for path in state.iterdir() if "probe" in path.name) == []  # the probe cleans up

    db = sqlite3.connect(state / "biller.db")
    try:
        bench = "account_id LIKE 'bench-%'"
        (agreed,) = db.execute(f"SELECT COUNT(*) FROM threads WHERE {bench} AND outcome = 'agreed'").fetchone()
        (not_agreed,) = db.execute(f"SELECT COUNT(*) FROM threads WHERE {bench} AND outcome != 'agreed'").fetchone()
        (settled,) = db.execute(f"SELECT COUNT(*) FROM settlements WHERE {bench}").fetchone()
        (prefilled,) = db.execute("SELECT COUNT(*) FROM threads WHERE account_id LIKE 'prefill-%'").fetchone()
        (prefilled_messages,) = db.execute("SELECT COUNT(*) FROM messages WHERE account_id LIKE 'prefill-%'").fetchone()
        (violations,) = db.execute("SELECT COUNT(*) FROM pragma_foreign_key_check").fetchone()
        (wrong_lengths,) = db.execute(  # every log's length kept beside it, the prefilled ones' too
            """SELECT COUNT(*) FROM (SELECT account_id, party_id, MAX(sequence) + 1 AS length FROM binding_events
                                     GROUP BY account_id, party_id) e
               LEFT JOIN event_log_lengths l ON l.account_id = e.account_id AND l.party_id = e.party_id
               WHERE l.length IS NULL OR l.length != e.length"""
        ).fetchone()
    finally:
        db.close()
    # What the biller stored agrees: every agreement reached was paid and receipted, at least one per cycle.
    assert agreed >= parley["cycles"]
    assert settled == agreed
    assert not_agreed == 0
    # --prefill loaded agreed negotiations beside the bench's own accounts, with consistent references.
    assert prefilled == 2_000
    assert prefilled_messages == 3 * 2_000
    assert violations == 0
    assert wrong_lengths == 0


def test_the_store_is_chosen_by_url_and_a_postgresql_database_serves_the_bench(postgres_dsn: str) -> None:
    options = BenchOptions(**{**TINY.__dict__, "store": postgres_dsn, "baseline": False})
    report = run_bench(options, Console(file=None, quiet=True), show_progress=False)

    parley = report["parley"]
    _check_phase(parley, SIGNED_PER_CYCLE)
    assert report["config"]["store"] == "postgresql://…"  # never the URL itself: it may carry a password
    assert report["config"]["state_dir_fdatasync_ms"]["syncs"] > 0
    assert "as durable as that server" in report["config"]["durability"]
    with psycopg.connect(postgres_dsn) as db:
        agreed = db.execute("SELECT COUNT(*) FROM threads WHERE outcome = 'agreed'").fetchone()
        settled = db.execute("SELECT COUNT(*) FROM settlements").fetchone()
    assert agreed is not None
    assert settled is not None
    assert agreed[0] >= parley["cycles"]
    assert settled[0] == agreed[0]


def test_load_generators_spread_their_connections_evenly_over_the_workers() -> None:
    """SO_REUSEPORT spreads connections at random (16 over 2 workers split 8-8 in only about 20 % of tries)."""
    holder = reserve_port()
    port = holder.getsockname()[1]
    identity = PeerIdentity.create(BILLER_ID, datetime.now(UTC))
    try:
        with started_workers(multiprocessing.get_context("spawn"), [WorkerSpec(port, "", identity)] * 2) as workers:
            pids = workers.pids()
            spec = LoadSpec(f"127.0.0.1:{port}", True, (), (), channels=16, workers=2, rate_per_slot=None)

            async def landed() -> Counter[int]:
                channels = await balanced_channels(spec)
                try:
                    ask: Any
                    answers = Counter[int]()
                    for channel in channels:
                        ask = channel.unary_unary(WORKER_PID_METHOD)
                        answers[int(await ask(b"", timeout=10))] += 1
                    return answers
                finally:
                    for channel in channels:
                        await channel.close()

            assert asyncio.run(landed()) == {pid: 8 for pid in pids}
    finally:
        holder.close()


@pytest.mark.parametrize("concurrency", [1, 2, 4, 16, 64])
def test_no_key_of_the_crowd_exceeds_its_rate_limit_at_the_prepared_rate(concurrency: int) -> None:
    """A bench of one slot once had 391 cycles refused by LIM-8: 16 keys cannot carry one fast slot."""
    per_slot = consumers_per_slot(500.0, concurrency)
    requests_per_key_per_second = 500.0 / concurrency * REQUESTS_PER_CYCLE / per_slot
    assert requests_per_key_per_second <= Limits().rate_limit_per_second / 2
    assert per_slot >= 16


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"workers": 0}, "--workers"),
        ({"seconds": 0.0}, "--seconds"),
        ({"load_generators": 3}, "--load-generators"),
        ({"rate": -1.0}, "--rate"),
        ({"prefill": -5}, "--prefill"),
        ({"store": "postgres", "prefill": 10}, "--prefill"),
        ({"store": "mysql"}, "--store"),
        ({"disk_probe_seconds": -1.0}, "--disk-probe"),
        # Each upper bound: a typo there would start that many processes, connections or rows.
        ({"workers": 99_999}, "--workers: expected a whole number from 1 to 64, got 99999"),
        ({"load_generators": 65, "concurrency": 100}, "--load-generators: expected a whole number from 1 to 64"),
        ({"concurrency": 5_000}, "--concurrency"),
        ({"channels": 1_000}, "--channels"),
        ({"prefill": 10**9}, "--prefill"),
        ({"max_rate": 1e9}, "--max-rate"),
        ({"max_rate": 9_000.0, "seconds": 3_000.0}, "would issue .* bills beforehand"),
        # nan passes every `<= 0` test, and inf never ends.
        ({"seconds": math.nan}, "--seconds: expected a number above 0 and at most 3,600, got nan"),
        ({"warmup": math.inf}, "--warmup"),
        ({"rate": math.nan}, "--rate"),
    ],
)
def test_unusable_options_are_refused_before_anything_starts(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BenchError, match=message):
        BenchOptions(**{**TINY.__dict__, **change}).check()


def test_the_command_exits_2_on_unusable_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().out
