"""The household's status: every bill from every biller, read from the state directory alone.

`household_status(profile, state_dir)` builds the document that `parley consumer status` prints
(and `--json` writes), and that a web page renders: it reads the consumer store, the agreement
files and the identity files, and never contacts a biller (nothing here opens a channel: the agent
built to read the store is given no endpoint to call, and no method that calls one is used).

The document (`STATUS_FORMAT`, stable: keys are only ever added) — money is always
`{"minor": int, "currency": "EUR", "text": "EUR 12.00"}`, never a float; dates are ISO 8601:

- `format`, `generated_at`, `household` (`party_id`, `state_dir`), `state` ("ready" or "empty");
- `billers`: `party_id`, `name`, `account_id`, `target`, `fingerprint` (the pinned identity, hex),
  `enrolled`;
- `bills`: `biller`, `biller_name`, `bill_id`, `account_id`, `amount`, `issue_date`, `due_date`,
  `description`, `state` (a word: new, awaiting_approval, negotiating, agreed, paid, ended, declined,
  no_arrangement) and `state_text` (plain words);
- `negotiations`: `biller`, `biller_name`, `bill_id`, `thread_id`, `outcome`, `outcome_text`,
  `opened_at`, `deadline`, `awaiting_answer`;
- `agreements`: `biller`, `biller_name`, `bill_id`, `thread_id`, `terms` (`kind`, `text`, `total`,
  `schedule`: [{`due_date`, `amount`}]), `file` (the `parley-bundle/1` file, or null), `verifies`
  (checked offline against the pinned fingerprint) and `problem` (why not, or null);
- `payments`: `biller`, `biller_name`, `bill_id`, `intent_id`, `instalment` (1-based), `of`,
  `amount`, `state`, `state_text`, `next_step` (what the household can do about a payment in
  doubt or refused instructions, or ""), `next_command` (the command that does it, or ""),
  `bank_reference`, `payee`, `receipt` (`amount_received`, `received_at`, `disputed`, `dispute`,
  or null);
- `upcoming`: the instalments of standing agreements not paid yet: `biller`, `biller_name`,
  `bill_id`, `instalment`, `of`, `due_date`, `amount`, `overdue`;
- `events`: everything the billers told (reminders, thanks...), kept: `biller`, `biller_name`,
  `account_id`, `sequence`, `kind` (e.g. "reminder"), `text`, `bill_id`, `amount` (or null),
  `date` (or null), `reminder_level`, `message`;
- `approvals`: every request for the person's approval: `id`, `state`, `state_text`, `action`,
  `action_text`, `biller`, `biller_name`, `bill_id`, `terms` (as in agreements), `terms_digest`
  (hex SHA-256 of the exact terms), `why` (list), `deadline`, `created_at`, `answered_at`, `note`;
- `notifications`: `waiting` (not delivered yet), `failing` (of those, tried and failed);
- `problems`: list of plain-language strings (a bundle that no longer verifies, unreadable state).

It never holds a private key, an enrolment code, a disclosure or another household's data: only
what this state directory's store holds for its own party.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from agent.clock import Clock, SystemClock
from agent.consumer import BillerLink, ConsumerAgent, Payment
from agent.consumer.events import MAX_STORED_EVENTS, event_view
from agent.identity import IdentityDir, IdentityError, OtherPartyError
from agent.protocol.agreement import Bundle, UnusableBundleError, verify_bundle
from agent.protocol.errors import ProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.terms import BillFacts, Money, Terms
from agent.stores import open_consumer_store
from agent.stores.base import ApprovalRecord, ApprovalState, ConsumerThreadRecord, IntentState, ThreadOutcome
from agent.stores.consumer_sqlite import SqliteConsumerStore
from parley.v1 import bill_pb2, envelope_pb2, event_pb2, terms_pb2
from reference_consumer.agent_strategy import ReferenceStrategy, agent_mandate
from reference_consumer.profile import Profile
from reference_consumer.runner import STORE_FILE, agreement_file
from reference_consumer.words import (
    ACTION_WORDS,
    approval_words,
    describe_terms,
    event_words,
    money_document,
    outcome_words,
    payment_next_command,
    payment_next_step,
    payment_words,
)

STATUS_FORMAT = "parley-household-status/1"


class UnreadableState(Exception):
    """The state directory exists but cannot be read (no key set, a key of another party...)."""


def _identity(state_dir: Path, party_id: str) -> tuple[SigningKey, KeyChain]:
    """The household's key and chain as stored; nothing is created or renewed (UnreadableState otherwise)."""
    try:
        identity = IdentityDir(state_dir, "consumer").read(party_id)
    except OtherPartyError as error:
        raise UnreadableState(f"{state_dir} holds the state of another household, not {party_id}") from error
    except (OSError, IdentityError) as error:
        raise UnreadableState(f"the identity in {state_dir} cannot be read: {error}") from error
    return identity.key, identity.chain


def _terms_document(terms: Terms) -> dict[str, object]:
    return {
        "kind": terms.kind.name.lower(),
        "text": describe_terms(terms),
        "total": money_document(terms.total),
        "schedule": [
            {"due_date": instalment.due_date.isoformat(), "amount": money_document(instalment.amount)}
            for instalment in terms.schedule
        ],
    }


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


def empty_status(profile: Profile, state_dir: Path, now: datetime, state: str = "empty") -> dict[str, object]:
    """The document of a household whose bot has not run yet (or whose state cannot be read)."""
    return {
        "format": STATUS_FORMAT,
        "generated_at": _time(now),
        "household": {"party_id": profile.party_id, "state_dir": str(state_dir)},
        "state": state,
        "billers": [
            {
                "party_id": preference.biller_id,
                "name": profile.biller_name(preference.biller_id),
                "account_id": None if preference.connection is None else preference.connection.account_id,
                "target": None if preference.connection is None else preference.connection.target,
                "fingerprint": None if preference.connection is None else preference.connection.fingerprint.hex(),
                "enrolled": False,
            }
            for preference in profile.billers
        ],
        "bills": [],
        "negotiations": [],
        "agreements": [],
        "payments": [],
        "upcoming": [],
        "events": [],
        "approvals": [],
        "notifications": {"waiting": 0, "failing": 0},
        "problems": [],
    }


async def household_status(profile: Profile, state_dir: Path, *, clock: Clock | None = None) -> dict[str, object]:
    """The status document (see the module docstring) of the household whose state is in `state_dir`.

    Reads only; a missing state directory gives an empty document. UnreadableState when the state
    belongs to another household or its identity files are damaged.
    """
    clock = clock or SystemClock()
    now = clock.now()
    if not (state_dir / STORE_FILE).exists():
        return empty_status(profile, state_dir, now)
    async with reading_household(profile, state_dir, clock) as (agent, store):
        return await _build(profile, state_dir, agent, store, now)


@contextlib.asynccontextmanager
async def reading_household(
    profile: Profile, state_dir: Path, clock: Clock
) -> AsyncIterator[tuple[ConsumerAgent, SqliteConsumerStore]]:
    """The household's agent and store, to read what is stored: nothing is created, no biller is called
    (only the agent's store-reading methods may be used). UnreadableState if there is no state."""
    if not (state_dir / STORE_FILE).exists():
        raise UnreadableState(f"{state_dir} holds no household state yet: run `parley consumer run` first")
    key, chain = await asyncio.to_thread(_identity, state_dir, profile.party_id)
    store = await open_consumer_store(state_dir / STORE_FILE)
    try:
        agent = ConsumerAgent(
            party_id=profile.party_id,
            signing_key=key,
            key_sets=chain,
            store=store,
            strategy=ReferenceStrategy(profile),
            mandate=agent_mandate(profile),
            clock=clock,
        )
        try:
            yield agent, store
        finally:
            await agent.close()
    finally:
        await store.close()


async def _build(
    profile: Profile, state_dir: Path, agent: ConsumerAgent, store: SqliteConsumerStore, now: datetime
) -> dict[str, object]:
    document = empty_status(profile, state_dir, now, state="ready")
    name = profile.biller_name
    problems: list[str] = []
    links = {link.biller_party_id: link for link in await agent.links()}
    billers: list[dict[str, object]] = []
    for preference in profile.billers:
        connection, link = preference.connection, links.get(preference.biller_id)
        billers.append(
            {
                "party_id": preference.biller_id,
                "name": name(preference.biller_id),
                "account_id": connection.account_id if connection else ", ".join(link.accounts if link else ()),
                "target": link.target if link else connection.target if connection else None,
                "fingerprint": link.fingerprint.hex() if link else connection.fingerprint.hex() if connection else None,
                "enrolled": link is not None,
            }
        )
    for biller, link in links.items():
        if all(b.biller_id != biller for b in profile.billers):
            billers.append(
                {
                    "party_id": biller,
                    "name": name(biller),
                    "account_id": ", ".join(link.accounts),
                    "target": link.target,
                    "fingerprint": link.fingerprint.hex(),
                    "enrolled": True,
                }
            )
    document["billers"] = billers

    document["events"], ended = await _events(store, links, name)
    approvals = await store.approvals()
    document["approvals"] = [_approval_document(record, name, now) for record in approvals]
    payments = await agent.payments()
    bills_part = await _bills(_Reading(profile, state_dir, agent, store, now, links, approvals, payments, ended))
    document.update(bills_part.documents)
    problems.extend(bills_part.problems)
    document["payments"] = await _payments(agent, store, payments, name)
    waiting = await store.notifications(undelivered_only=True)
    document["notifications"] = {"waiting": len(waiting), "failing": sum(1 for n in waiting if n.attempts)}
    document["problems"] = problems
    return document


async def _events(
    store: SqliteConsumerStore, links: Mapping[str, BillerLink], name: Callable[[str], str]
) -> tuple[list[dict[str, object]], set[tuple[str, bytes]]]:
    """Every stored event, and the (biller, thread) of the arrangements the billers ended."""
    events: list[dict[str, object]] = []
    ended: set[tuple[str, bytes]] = set()
    for biller, link in links.items():
        for account in link.accounts:
            for record in await store.stored_events(biller, account, 0, limit=MAX_STORED_EVENTS):
                event = event_view(record)
                if event.kind == event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN and event.thread_id:
                    ended.add((biller, event.thread_id))
                events.append(
                    {
                        "biller": biller,
                        "biller_name": name(biller),
                        "account_id": account,
                        "sequence": event.sequence,
                        "kind": event_pb2.EventKind.Name(event.kind).removeprefix("EVENT_KIND_").lower(),
                        "text": event_words(event.kind),
                        "bill_id": event.bill_id,
                        "amount": None if event.amount is None else money_document(event.amount),
                        "date": None if event.date is None else event.date.isoformat(),
                        "reminder_level": event.reminder_level,
                        "message": event.message,
                        "received_at": _time(record.received_at),
                    }
                )
    return events, ended


def _approval_document(record: ApprovalRecord, name: Callable[[str], str], now: datetime) -> dict[str, object]:
    state, note = record.state, record.note
    if state is ApprovalState.PENDING and record.deadline is not None and record.deadline <= now:
        state, note = (
            ApprovalState.LAPSED,
            "the negotiation's deadline passed",
        )  # shown as it is; stored on the next pass
    return {
        "id": record.request_id,
        "state": state.value,
        "state_text": approval_words(state),
        "action": record.action,
        "action_text": ACTION_WORDS.get(record.action, record.action),
        "biller": record.biller_party_id,
        "biller_name": name(record.biller_party_id),
        "bill_id": record.bill_id,
        "terms": _terms_document(Terms.from_proto(terms_pb2.Terms.FromString(record.terms))),
        "terms_digest": record.terms_digest.hex(),
        "why": [*record.violations, *([record.reason] if record.reason else [])],
        "deadline": _time(record.deadline),
        "created_at": _time(record.created_at),
        "answered_at": _time(record.answered_at),
        "note": note,
    }


@dataclass
class _BillsPart:
    documents: dict[str, object]
    problems: list[str]


@dataclass(frozen=True)
class _Reading:
    """What `_bills` reads from, gathered once."""

    profile: Profile
    state_dir: Path
    agent: ConsumerAgent
    store: SqliteConsumerStore
    now: datetime
    links: Mapping[str, BillerLink]
    approvals: Sequence[ApprovalRecord]
    payments: Sequence[Payment]
    ended: set[tuple[str, bytes]]


def _negotiation_document(
    biller: str, biller_name: str, bill_id: str, thread: ConsumerThreadRecord
) -> dict[str, object]:
    return {
        "biller": biller,
        "biller_name": biller_name,
        "bill_id": bill_id,
        "thread_id": thread.thread_id.hex(),
        "outcome": thread.outcome.value,
        "outcome_text": outcome_words(thread.outcome),
        "opened_at": _time(thread.opened_at),
        "deadline": _time(thread.deadline),
        "awaiting_answer": thread.awaiting_answer,
    }


def _state_before_agreement(
    latest: ConsumerThreadRecord | None, pending: bool, declined_opening: bool
) -> tuple[str, str]:
    """A bill's state word and text from its latest thread and its requests for approval."""
    if pending:
        return "awaiting_approval", "waiting for your approval"
    if latest is None:
        if declined_opening:
            return "declined", "you declined what the bot would propose"
        return "new", "new: not negotiated yet"
    if latest.outcome is ThreadOutcome.OPEN or latest.awaiting_answer:
        return "negotiating", "negotiating with the biller"
    return "no_arrangement", outcome_words(latest.outcome)  # AGREED is decided by the caller


def _bill_document(biller: str, biller_name: str, facts: BillFacts, state: str, text: str) -> dict[str, object]:
    return {
        "biller": biller,
        "biller_name": biller_name,
        "bill_id": facts.bill_id,
        "account_id": facts.account_id,
        "amount": money_document(facts.amount_due),
        "issue_date": facts.issue_date.isoformat(),
        "due_date": facts.due_date.isoformat(),
        "description": facts.description,
        "state": state,
        "state_text": text,
    }


def _upcoming_document(
    biller: str, biller_name: str, bill_id: str, index: int, terms: Terms, *, today: date
) -> dict[str, object]:
    instalment = terms.schedule[index]
    return {
        "biller": biller,
        "biller_name": biller_name,
        "bill_id": bill_id,
        "instalment": index + 1,
        "of": len(terms.schedule),
        "due_date": instalment.due_date.isoformat(),
        "amount": money_document(instalment.amount),
        "overdue": instalment.due_date < today,
    }


async def _bills(reading: _Reading) -> _BillsPart:
    """Bills with their state in words, negotiations, agreements (checked offline) and upcoming instalments."""
    profile, state_dir, agent, store, now = (
        reading.profile,
        reading.state_dir,
        reading.agent,
        reading.store,
        reading.now,
    )
    links, approvals, payments, ended = reading.links, reading.approvals, reading.payments, reading.ended
    name = profile.biller_name
    problems: list[str] = []
    pending_bills = {(r.biller_party_id, r.bill_id) for r in approvals if r.state is ApprovalState.PENDING}
    declined_openings = {
        (r.biller_party_id, r.bill_id) for r in approvals if r.state is ApprovalState.DECLINED and r.action == "open"
    }

    paid = {(p.agreement_digest, p.instalment_index) for p in payments if p.state is IntentState.PAID}
    bills: list[dict[str, object]] = []
    negotiations: list[dict[str, object]] = []
    agreements: list[dict[str, object]] = []
    upcoming: list[dict[str, object]] = []
    for biller, link in links.items():
        seen: set[str] = set()
        for record in await store.list_bills(biller):
            if record.bill_id in seen:
                continue
            seen.add(record.bill_id)
            latest_copy = await store.get_bill(biller, record.bill_id)
            facts = _bill_facts((latest_copy or record).envelope)
            threads = [t for t in await store.threads(biller, record.bill_id) if t.messages]
            negotiations.extend(_negotiation_document(biller, name(biller), record.bill_id, t) for t in threads)
            latest = threads[-1] if threads else None
            key = (biller, record.bill_id)
            state, text = _state_before_agreement(latest, key in pending_bills, key in declined_openings)
            for thread in threads:
                if thread.outcome is not ThreadOutcome.AGREED or thread.awaiting_answer:
                    continue
                result = await agent.negotiation(thread.thread_id)
                assert result.agreement is not None
                terms, digest = result.agreement.terms, result.agreement.accept.digest
                path = agreement_file(state_dir, biller, record.bill_id, thread.thread_id)
                verifies, problem = await asyncio.to_thread(_check_bundle, path, biller, link.fingerprint)
                if problem is not None:
                    problems.append(f"agreement on bill {record.bill_id} with {name(biller)}: {problem}")
                agreements.append(
                    {
                        "biller": biller,
                        "biller_name": name(biller),
                        "bill_id": record.bill_id,
                        "thread_id": thread.thread_id.hex(),
                        "terms": _terms_document(terms),
                        "file": str(path) if path.exists() else None,
                        "verifies": verifies,
                        "problem": problem,
                    }
                )
                if thread is not latest:
                    continue
                count = len(terms.schedule)
                done = sum(1 for index in range(count) if (digest, index) in paid)
                if (biller, thread.thread_id) in ended:
                    state, text = "ended", "arrangement ended by the biller"
                    continue
                if done == count:
                    state, text = "paid", "paid"
                else:
                    state, text = "agreed", f"agreed: {describe_terms(terms)}; {done} of {count} paid"
                for index in range(count):
                    if (digest, index) in paid:
                        continue
                    upcoming.append(
                        _upcoming_document(biller, name(biller), record.bill_id, index, terms, today=now.date())
                    )
            bills.append(_bill_document(biller, name(biller), facts, state, text))
    upcoming.sort(key=lambda item: str(item["due_date"]))
    documents: dict[str, object] = {
        "bills": bills,
        "negotiations": negotiations,
        "agreements": agreements,
        "upcoming": upcoming,
    }
    return _BillsPart(documents, problems)


async def _payments(
    agent: ConsumerAgent, store: SqliteConsumerStore, payments: Sequence[Payment], name: Callable[[str], str]
) -> list[dict[str, object]]:
    payment_documents: list[dict[str, object]] = []
    for payment in payments:
        receipt = await store.get_receipt(payment.biller_party_id, payment.intent_id)
        count = await _instalment_count(
            agent, store, payment.biller_party_id, payment.bill_id, payment.agreement_digest
        )
        payment_documents.append(
            {
                "biller": payment.biller_party_id,
                "biller_name": name(payment.biller_party_id),
                "bill_id": payment.bill_id,
                "intent_id": payment.intent_id,
                "instalment": payment.instalment_index + 1,
                "of": count,
                "amount": money_document(payment.amount),
                "state": payment.state.value,
                "state_text": payment_words(payment.state, held=payment.holds_payment),
                "next_step": payment_next_step(payment.state, held=payment.holds_payment),
                "next_command": payment_next_command(payment.state, payment.intent_id, held=payment.holds_payment),
                "bank_reference": payment.proof,
                "payee": None if payment.order is None else payment.order.payee_name,
                "receipt": None
                if receipt is None
                else {
                    "amount_received": money_document(Money(payment.amount.currency, receipt.amount_minor)),
                    "received_at": _time(receipt.received_at),
                    "disputed": receipt.dispute is not None,
                    "dispute": receipt.dispute,
                },
            }
        )
    return payment_documents


def _bill_facts(envelope: bytes) -> BillFacts:
    """The facts of a stored bill (verified when it was stored, BIL-3)."""
    return BillFacts.from_proto(bill_pb2.Bill.FromString(envelope_pb2.Envelope.FromString(envelope).payload))


async def _instalment_count(
    agent: ConsumerAgent, store: SqliteConsumerStore, biller: str, bill_id: str, agreement_digest: bytes
) -> int:
    """How many instalments the agreement a payment belongs to has (1 for a bill paid without one)."""
    for thread in await store.threads(biller, bill_id, ThreadOutcome.AGREED):
        result = await agent.negotiation(thread.thread_id)
        if result.agreement is not None and result.agreement.accept.digest == agreement_digest:
            return len(result.agreement.terms.schedule)
    return 1


def _check_bundle(path: Path, biller: str, fingerprint: bytes) -> tuple[bool, str | None]:
    """Whether the agreement file verifies offline against the pinned biller; never raises."""
    if not path.exists():
        return False, "its agreement file is missing (the next run writes it)"
    try:
        verify_bundle(Bundle.load(path), pins={biller: fingerprint})
    except (UnusableBundleError, ProtocolError, ValueError) as error:
        return False, f"{path.name} does not verify: {error}"
    return True, None


def status_json(document: dict[str, object]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


__all__ = [
    "STATUS_FORMAT",
    "UnreadableState",
    "empty_status",
    "household_status",
    "reading_household",
    "status_json",
]
