"""Accounts and enrolment codes, as the operator manages them: `parley biller accounts` and `codes --account`.

An account is the biller's customer: an id (1 to MAX_ID_CHARS characters of
`A-Z a-z 0-9 . _ : -`, so it survives a URI, a CSV file and a paper bill), a
holder name and the policy segment whose options its bills advertise. Accounts
listed in the configuration are created at start as before (a convenience for
the demo); those added with `accounts add` keep their segment in the store
(`account_segments`), and `with_stored_segments` gives those segments to the
configuration the policy reads (accounts made through the back-office API get
the default segment), so a serving biller bills them with their segment's
options from its next upkeep round. The scheduler needs no list: it follows
every account with a bill not paid yet.

An account has at most one live enrolment code: `issue_code` first expires the
account's unspent codes (superseded), then issues the new one; `revoke_codes`
only expires them. The two writes are separate transactions (the agent issues
codes; the store only revokes them): a failure between them leaves the account
without a live code, never with two — issue again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from agent.biller import BillerAgent
from agent.stores.base import AccountRecord, AlreadyExists, BillerStore
from reference_biller.config import ID_PATTERN, ID_RULE, BillerConfig, holder_name


class AccountError(ValueError):
    """An account cannot be added or used; the message says why and what to do."""


@dataclass(frozen=True)
class AccountView:
    """An account as the operator sees it: the store's record and its segment."""

    record: AccountRecord
    segment: str
    configured: bool  # listed in the configuration file (else added with `accounts add`)


def check_id(kind: str, value: str) -> str:
    """`value` if it is a usable id; AccountError naming `kind` ("account id", "bill id") otherwise."""
    if not ID_PATTERN.fullmatch(value):
        raise AccountError(f"{kind} {value!r} is not usable: {ID_RULE}")
    return value


async def add_account(
    agent: BillerAgent, store: BillerStore, config: BillerConfig, account_id: str, *, holder: str, segment: str
) -> None:
    """Create the account with its segment; AccountError for a bad id, holder or segment, or a taken id."""
    check_id("account id", account_id)
    try:
        holder = holder_name(holder)
    except ValueError as error:
        raise AccountError(str(error)) from None
    if segment not in config.segments:
        raise AccountError(f"no segment {segment!r} in the configuration: use one of {', '.join(config.segments)}")
    try:
        await agent.create_account(account_id, holder)
    except AlreadyExists:
        existing = await agent.account(account_id)
        holder_now = "" if existing is None else f" (holder {existing.holder_name!r})"
        raise AccountError(f"account {account_id!r} already exists{holder_now}: nothing changed") from None
    await store.set_account_segment(account_id, segment)


async def with_stored_segments(config: BillerConfig, store: BillerStore) -> BillerConfig:
    """The configuration with the segments recorded for accounts added with `accounts add` (in any process
    sharing the store), which the policy then reads through `BillerConfig.segment_of`.

    Only those are read: a configured account keeps the configuration's segment, and any other account (made
    through the back-office API, or whose segment the configuration no longer has) gets the default one, so
    neither needs listing. The scheduler follows the accounts that owe something on its own
    (`BillerStore.accounts_owing`).
    """
    return replace(config, stored_segments=await store.account_segments())


async def account_views(config: BillerConfig, store: BillerStore) -> list[AccountView]:
    """Every account in the store, by id, with its segment."""
    listed = {account.account_id: account.segment for account in config.accounts}  # may include added ones
    added = await store.account_segments()
    views = []
    for record in await store.list_accounts():
        account_id = record.account_id
        segment = added.get(account_id) or listed.get(account_id) or "(default)"
        views.append(AccountView(record, segment, account_id in listed and account_id not in added))
    return views


async def issue_code(agent: BillerAgent, store: BillerStore, account_id: str, now: datetime) -> tuple[str, int]:
    """A new enrolment code for the account and how many unspent earlier codes it superseded."""
    if await agent.account(account_id) is None:
        raise AccountError(f"no account {account_id!r}: add it with `parley biller accounts add` first")
    superseded = await store.revoke_enrolment_codes(account_id, now)
    return await agent.issue_enrolment_code(account_id), superseded


async def revoke_codes(agent: BillerAgent, store: BillerStore, account_id: str, now: datetime) -> int:
    """Expire the account's unspent enrolment codes; returns how many."""
    if await agent.account(account_id) is None:
        raise AccountError(f"no account {account_id!r}")
    return await store.revoke_enrolment_codes(account_id, now)


__all__ = [
    "ID_PATTERN",
    "AccountError",
    "AccountView",
    "account_views",
    "add_account",
    "check_id",
    "issue_code",
    "revoke_codes",
    "with_stored_segments",
]
