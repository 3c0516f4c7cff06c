"""What a reference biller's upkeep round costs when it has many accounts that owe nothing.

    python scripts/upkeep_many_accounts.py                    # 100,000 accounts, 3 rounds, SQLite in /dev/shm
    python scripts/upkeep_many_accounts.py --accounts 20000 --rounds 5

A reference biller (the built-in sample configuration) is opened on a fresh state directory, then the given
number of accounts is inserted straight into its SQLite store (one in ten with a recorded segment, as
`parley biller accounts add` records it; none with a bill), and `Biller.maintain()` — the upkeep round the
serving biller runs every `upkeep_interval_seconds` on its event loop — is timed, wall clock and this
process' CPU. Then the policy's segment lookup is timed on an account added last. Both once grew with every
account in the store (docs/PERFORMANCE.md, "Sizing a deployment"); compare two versions of the code in one
sitting, not figures from different days.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.clock import ManualClock
from agent.tools.numbers import number_argument
from reference_biller.config import load_config
from reference_biller.service import STORE_FILE, open_biller

LOOKUPS = 20


async def measure(state: Path, accounts: int, rounds: int) -> None:
    clock = ManualClock(datetime(2026, 3, 5, 9, tzinfo=UTC))
    config = load_config()
    biller = await open_biller(config, state, clock)
    await biller.close()
    segment = next(iter(config.segments))
    created = "2026-03-01T00:00:00.000000+00:00"
    with sqlite3.connect(state / STORE_FILE) as db:
        db.executemany(
            "INSERT INTO accounts (account_id, holder_name, created_at) VALUES (?, 'Holder', ?)",
            ((f"acct-many-{i}", created) for i in range(accounts)),
        )
        db.executemany(
            "INSERT INTO account_segments (account_id, segment) VALUES (?, ?)",
            ((f"acct-many-{i}", segment) for i in range(0, accounts, 10)),
        )
    print(f"inserted {accounts} accounts owing nothing")
    biller = await open_biller(config, state, clock)
    try:
        for _ in range(rounds):
            wall, cpu = time.monotonic(), time.process_time()
            await biller.maintain()
            wall, cpu = time.monotonic() - wall, time.process_time() - cpu
            print(f"upkeep round with {accounts} accounts: {wall:.3f} s wall, {cpu:.3f} s CPU")
        assert biller.policy is not None
        policy_config = biller.policy.config
        last = f"acct-many-{accounts - 1}"
        cpu = time.process_time()
        for _ in range(LOOKUPS):
            policy_config.segment_of(last)
        print(f"segment lookup: {(time.process_time() - cpu) / LOOKUPS * 1e6:.1f} µs a call")
    finally:
        await biller.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=number_argument(int, 1, 10_000_000), default=100_000)
    parser.add_argument("--rounds", type=number_argument(int, 1, 100), default=3)
    args = parser.parse_args()
    memory = Path("/dev/shm")  # noqa: S108 - in memory, so the figures are CPU; mkdtemp makes it private (0700)
    state = Path(tempfile.mkdtemp(prefix="parley-upkeep-", dir=memory if memory.is_dir() else None))
    try:
        asyncio.run(measure(state, args.accounts, args.rounds))
    finally:
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
