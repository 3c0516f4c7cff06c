"""`parley demo`: the protocol's story end to end, in one process, with real signatures.

An energy supplier presents a signed bill with advertised options; a household
bot asks for eight monthly instalments (outside the options); the supplier
counters with six; the household accepts. Every message goes through the same
code the agents use (`sign_move` to send, `open_envelope` + the negotiation
core to receive), the agreement is written as a `parley-bundle/1` file and
verified offline, and a phishing bill signed by an unpinned key is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent.crypto import SigningKey, digest
from agent.errors import ParleyError
from agent.keysets import KeyChain, KeyEntry, make_key_set
from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.messages import new_header, new_message_id, open_envelope, seal
from agent.protocol.moves import NEGOTIATION_TYPES, sign_move, thread_message
from agent.protocol.negotiation import Accept, Move, Negotiation, Offer, Open, Role
from agent.terms import (
    AdvertisedOptions,
    BillFacts,
    DeferralOption,
    InstalmentOption,
    Money,
    Terms,
    TermsKind,
    build_terms,
    format_date,
    monthly_dates,
)
from parley.v1 import bill_pb2, envelope_pb2

MESSAGE_LIFETIME = timedelta(hours=1)


@dataclass
class Party:
    party_id: str
    key: SigningKey
    chain: KeyChain

    @classmethod
    def create(cls, party_id: str, now: datetime) -> Party:
        key = SigningKey.generate()
        year = timedelta(days=365)
        envelope = make_key_set(
            party_id=party_id,
            version=1,
            keys=[KeyEntry(key.public_key, now, now + year)],
            signer=key,
            previous=None,
            create_time=now,
            expire_time=now + year,
        )
        return cls(party_id, key, KeyChain.verify([envelope]))


def _present_bill(biller: Party, consumer: Party, facts: BillFacts, now: datetime) -> envelope_pb2.Envelope:
    header = new_header(
        sender=biller.party_id,
        recipient=consumer.party_id,
        thread_id=new_message_id(),
        sequence=0,
        previous_digest=b"",
        now=now,
        lifetime=MESSAGE_LIFETIME,
    )
    bill = bill_pb2.Bill(header=header)
    bill.MergeFrom(facts.to_proto())
    return seal(bill, biller.key)


def _terms_row(terms: Terms) -> str:
    dates = ", ".join(format_date(i.due_date) for i in terms.schedule[:2])
    more = f" … {len(terms.schedule)} payments" if len(terms.schedule) > 2 else ""
    return f"{terms.kind.name} {terms.schedule[0].amount}: {dates}{more}"


def run(out_dir: Path, console: Console | None = None) -> int:
    """Run the story; 0 if everything verified, 1 otherwise."""
    out = console or Console()
    now = datetime(2026, 3, 5, 9, tzinfo=UTC)
    biller, consumer = Party.create("biller:energy.example", now), Party.create("consumer:household-1", now)
    pinned = biller.chain.fingerprint  # given to the household out of band, with its enrolment code
    eur = Money.parse
    facts = BillFacts(
        bill_id="E-2026-03-0001",
        account_id="acct-1001",
        amount_due=eur("120.00", "EUR"),
        issue_date=date(2026, 3, 1),
        due_date=date(2026, 3, 31),
        description="Electricity, March 2026",
        options=AdvertisedOptions(
            deferral=DeferralOption(max_days=30, fee=eur("5.00", "EUR")),
            instalments=InstalmentOption(6, eur("20.00", "EUR"), 14, 35, 30),
        ),
    )
    out.rule("[bold]Parley demo[/bold]: one bill, negotiated by two bots, verified offline")
    bill = _present_bill(biller, consumer, facts, now)
    received = KeyChain.verify(biller.chain.envelopes, pin=pinned)
    open_envelope(bill, (bill_pb2.Bill,), sender_keys=received, recipient=consumer.party_id, now=now)
    out.print(f"Bill {facts.bill_id}: {facts.amount_due} due {format_date(facts.due_date)}, signature verified")

    phisher = Party.create("biller:energy.example", now)
    try:
        KeyChain.verify(phisher.chain.envelopes, pin=pinned)
        out.print("[red]a phishing key set was trusted[/red]")
        return 1
    except ParleyError as error:
        out.print(f"Phishing bill from an unpinned key set refused: {error.reason.name}")

    sides = {
        Role.CONSUMER: (Negotiation(facts, digest(bill), Role.CONSUMER), consumer, biller),
        Role.BILLER: (Negotiation(facts, digest(bill), Role.BILLER), biller, consumer),
    }
    thread_id, thread = new_message_id(), list[envelope_pb2.Envelope]()
    story = Table(title="Negotiation")
    for column in ("#", "from", "move", "terms"):
        story.add_column(column)

    def play(role: Role, move: Move, label: str, terms: Terms | None) -> envelope_pb2.Envelope:
        mine, me, peer = sides[role]
        at = now + timedelta(minutes=len(thread))
        envelope, _ = sign_move(
            mine, move, key=me.key, sender=me.party_id, recipient=peer.party_id,
            thread_id=thread_id, now=at, lifetime=MESSAGE_LIFETIME, bill_id=facts.bill_id,
        )  # fmt: skip
        verified = open_envelope(envelope, NEGOTIATION_TYPES, sender_keys=me.chain, recipient=peer.party_id, now=at)
        sides[role.other][0].receive(thread_message(verified, role), at)
        story.add_row(str(len(thread)), me.party_id, label, "" if terms is None else _terms_row(terms))
        thread.append(envelope)
        return envelope

    asked = build_terms(TermsKind.INSTALMENT_PLAN, facts.amount_due, monthly_dates(date(2026, 4, 15), 8))
    countered = build_terms(TermsKind.INSTALMENT_PLAN, facts.amount_due, monthly_dates(date(2026, 4, 15), 6))
    play(Role.CONSUMER, Open(asked, 4, now + timedelta(days=2), digest(bill)), "open + offer", asked)
    counter = play(Role.BILLER, Offer(countered), "counter-offer", countered)
    play(Role.CONSUMER, Accept(digest(counter)), "accept", None)
    out.print(story)

    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = Bundle(key_sets={p.party_id: p.chain.envelopes for p in (biller, consumer)}, bill=bill, thread=thread)
    path = out_dir / f"agreement-{facts.bill_id}.json"
    path.write_text(json.dumps(bundle.to_json(), indent=1), encoding="utf-8")
    agreement = verify_bundle(Bundle.load(path), pins={biller.party_id: pinned})
    schedule = Table(title="Agreed schedule")
    schedule.add_column("due date")
    schedule.add_column("amount", justify="right")
    for instalment in agreement.terms.schedule:
        schedule.add_row(format_date(instalment.due_date), str(instalment.amount))
    out.print(schedule)
    out.print(f"[bold green]Agreement verified offline[/bold green]: parley verify {path}")
    return 0
