"""What one round of the reference biller's reminder scheduler costs, per account that still owes a bill.

    python scripts/upkeep_cost.py                     # 2,000 accounts on SQLite in a temporary directory
    python scripts/upkeep_cost.py --accounts 5000 --store postgres   # a throwaway PostgreSQL (as `parley bench`)

The store is prepared as `parley bench` prepares it (accounts, consumers enrolled through the real Enrol path,
one open bill each, due in a month), so every account owes a bill and none has anything due: the common round,
in which each account is looked at and nothing is appended. Three rounds of `reference_biller.scheduler.tick`
are timed, wall clock and this process' CPU, and how long the event loop went without running anything else
meanwhile (a task that asks to wake every millisecond, as a request waiting for the loop would: its longest
wait). The round runs on a worker's event loop between RPCs, so that wait is how long a request could sit
unanswered behind it. Compare two versions of the code on one machine in one sitting
(docs/PERFORMANCE.md, "Sizing a deployment"), not figures from different days.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from agent.conformance.peers import PeerIdentity
from agent.stores import POSTGRES_SCHEMES, open_biller_store
from agent.tools.bench import BILLER_ID, bench_agent, prepare_store, store_url
from agent.tools.numbers import number_argument
from reference_biller import scheduler
from reference_biller.config import load_config


async def measure(location: str, accounts: int, rounds: int) -> None:
    identity = PeerIdentity.create(BILLER_ID, datetime.now(UTC))
    started = time.monotonic()
    consumers = await prepare_store(location, identity, accounts, 1)
    print(f"prepared {accounts} accounts with one open bill each in {time.monotonic() - started:.1f} s")
    store = await open_biller_store(location)
    try:
        agent = bench_agent(identity, store)
        ids = [consumer.account_id for consumer in consumers]
        config = load_config()
        for _ in range(rounds):
            waits: list[float] = []
            watcher = asyncio.create_task(_loop_waits(waits))
            wall, cpu = time.monotonic(), time.process_time()
            emitted = await scheduler.tick(agent, config, datetime.now(UTC), store=store, accounts=ids)
            wall, cpu = time.monotonic() - wall, time.process_time() - cpu
            watcher.cancel()
            longest = max(waits, default=wall)  # never woken during the round: it waited all of it
            print(
                f"round over {accounts} owing accounts: {wall:.2f} s wall ({wall / accounts * 1e3:.2f} ms each), "
                f"{cpu:.2f} s CPU, {len(emitted)} events appended; the loop left other work waiting up to "
                f"{longest * 1e3:.1f} ms"
            )
    finally:
        await store.close()


async def _loop_waits(waits: list[float]) -> None:
    """Ask to wake every millisecond; record how late each wake-up came (a request waiting for the loop)."""
    while True:
        asked = time.monotonic()
        await asyncio.sleep(0.001)
        waits.append(time.monotonic() - asked - 0.001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=number_argument(int, 1, 100_000), default=2000)
    parser.add_argument("--rounds", type=number_argument(int, 1, 100), default=3)
    parser.add_argument("--store", default="sqlite", help="sqlite (default), postgres (a throwaway server), or a URL")
    args = parser.parse_args()
    if args.store not in ("sqlite", "postgres") and not args.store.startswith(POSTGRES_SCHEMES):
        parser.error(f"--store: expected sqlite, postgres or a postgresql:// URL, got {args.store!r}")
    with ExitStack() as resources, tempfile.TemporaryDirectory(prefix="parley-upkeep-") as scratch:
        location = store_url(args.store, Path(scratch), resources)
        asyncio.run(measure(location, args.accounts, args.rounds))


if __name__ == "__main__":
    main()
