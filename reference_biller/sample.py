"""Sample data for the reference biller: its configured accounts, enrolment codes and monthly bills.

- `ensure_accounts` creates the accounts listed in the configuration (once).
- `issue_codes` issues a fresh one-time enrolment code per account (ENR-7) —
  what would be printed on a paper bill with the biller's party id and identity
  fingerprint; `enrolment_uri` is the QR code form of that material (ENR-8).
- `bill_enrolled_accounts` issues, once per calendar month, a bill to every
  configured account that has enrolled (a Parley bill is addressed to the
  enrolled consumer, so billing waits for enrolment). Amounts are realistic
  household bills and deterministic: the same seed, account and month
  always give the same amount, and the bill id (`<account>-<YYYY-MM>`) makes
  issuing idempotent. The serving biller calls it each upkeep round only with
  `[simulation] sample_bills = true` (the sample configurations: demo and
  conformance runs); real bills come from reference_biller/intake.py.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from datetime import date, timedelta
from urllib.parse import quote

from agent.biller import BillerAgent
from agent.protocol.terms import Money
from agent.stores.base import AlreadyExists, BillerStore
from reference_biller.config import BillerConfig

logger = logging.getLogger("parley.reference_biller.sample")

DEFAULT_SEED = 2026
PAYMENT_TERM = timedelta(days=21)  # due date = issue date + 21 days: room for the early-payment discount
_MIN_MAJOR, _MAX_MAJOR = 38, 240  # a household's monthly energy bill, in major units


async def ensure_accounts(agent: BillerAgent, config: BillerConfig) -> list[str]:
    """Create the configured accounts that do not exist yet; returns their ids."""
    created = []
    for account in config.accounts:
        if await agent.account(account.account_id) is None:
            try:
                await agent.create_account(account.account_id, account.holder)
            except AlreadyExists:
                continue  # another process created it meanwhile
            created.append(account.account_id)
            logger.info("account created %s (%s)", account.account_id, account.segment)
    return created


async def issue_codes(
    agent: BillerAgent, config: BillerConfig, accounts: Iterable[str] | None = None
) -> dict[str, str]:
    """A fresh enrolment code for each account (default: every configured one), by account id.

    Earlier codes stay valid until used or expired; a new code lifts an enrolment
    lock (ENR-5). LookupError for an account that does not exist.
    """
    ids = list(accounts) if accounts is not None else [a.account_id for a in config.accounts]
    return {account_id: await agent.issue_enrolment_code(account_id) for account_id in ids}


def enrolment_uri(endpoint: str, biller_party_id: str, fingerprint: bytes, account_id: str, code: str) -> str:
    """The `parley:enrol?...` URI a QR code on the paper bill carries (ENR-8)."""
    fields = {
        "endpoint": endpoint,
        "biller": biller_party_id,
        "fingerprint": fingerprint.hex(),
        "account": account_id,
        "code": code,
    }
    return "parley:enrol?" + "&".join(f"{name}={quote(value, safe='')}" for name, value in fields.items())


def sample_amount(config: BillerConfig, account_id: str, period: str, seed: int = DEFAULT_SEED) -> Money:
    """A realistic monthly amount, the same for the same seed, account and period ("YYYY-MM")."""
    rng = random.Random(f"{seed}/{account_id}/{period}")  # noqa: S311 - sample data, not a secret
    scale = 10**config.currency.exponent
    minor = rng.randint(_MIN_MAJOR, _MAX_MAJOR) * scale + rng.randrange(scale)
    return Money(config.currency, minor)


def bill_id_for(account_id: str, today: date) -> str:
    return f"{account_id}-{today:%Y-%m}"


async def bill_enrolled_accounts(
    agent: BillerAgent, store: BillerStore, config: BillerConfig, today: date, *, seed: int = DEFAULT_SEED
) -> list[str]:
    """Issue this month's bill to every enrolled configured account that has none yet; returns the bill ids."""
    issued = []
    for account in config.accounts:
        record = await agent.account(account.account_id)
        bill_id = bill_id_for(account.account_id, today)
        if record is None or record.consumer_party_id is None or await store.get_bill(bill_id) is not None:
            continue
        amount = sample_amount(config, account.account_id, f"{today:%Y-%m}", seed)
        description = f"{config.name}: sample bill, {today:%B %Y}"  # not "energy": any kind of biller runs it
        try:
            await agent.issue_bill(account.account_id, amount, today + PAYMENT_TERM, description, bill_id=bill_id)
        except AlreadyExists:
            continue  # issued by another process meanwhile
        issued.append(bill_id)
    return issued


__all__ = [
    "DEFAULT_SEED",
    "PAYMENT_TERM",
    "bill_enrolled_accounts",
    "bill_id_for",
    "enrolment_uri",
    "ensure_accounts",
    "issue_codes",
    "sample_amount",
]
