"""A conforming consumer that defers: it pays on the agreed date, not on the day the bill arrives.

The reference consumer (`parley consumer run --from-env --once --approve-all`) for a household with
nothing in the bank until its next pay day, ten days from today: its strategy asks for a deferral
to the day after pay day (inside the bill's advertised options, so the biller accepts at once,
NEG-12), and a pass pays each agreed payment once its date has come — so on the day the bill
arrives it pays nothing, because nothing is due that day (docs/CONFORMANCE.md, "The client
contract"). The consumer suite runs it as it runs the reference consumer:

    python tests/deferring_consumer.py consumer run --from-env --once --approve-all
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSUMER_ARGS = ("consumer", "run", "--from-env", "--once", "--approve-all")
PAY_DAY_IN = timedelta(days=10)  # well inside the suite's 30-day deferral option, whatever today is


def command() -> str:
    """The deferring consumer, as the suite runs it."""
    return shlex.join([sys.executable, str(Path(__file__).resolve()), *CONSUMER_ARGS])


def deferring_household() -> None:
    """`--from-env` builds a household with no money until a pay day ten days from now."""
    from reference_consumer import runner  # noqa: PLC0415 - patched in this program only
    from reference_consumer.profile import Income, Profile  # noqa: PLC0415

    comfortable = runner.profile_from_env

    def short_until_pay_day(environ: object) -> Profile:
        profile = comfortable(environ)  # type: ignore[arg-type]
        pay_day = (datetime.now(UTC) + PAY_DAY_IN).day
        return dataclasses.replace(
            profile,
            balance=profile.balance - profile.balance,
            income=Income(profile.income.amount, pay_day),
        )

    runner.profile_from_env = short_until_pay_day


def main(argv: list[str]) -> int:
    deferring_household()
    from agent.cli import main as parley  # noqa: PLC0415

    return parley(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
