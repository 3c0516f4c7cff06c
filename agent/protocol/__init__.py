"""Every rule of docs/PROTOCOL.md, sans I/O: no sockets, no database, no clock reads (time is passed in).

One module per subject, each the one place its rules are written:

- `errors` — the error hierarchy (`ParleyError` at the root) and the table of reasons (§13);
- `limits` — every number the protocol fixes, and `Limits`, the ones a biller may tune (§14);
- `keys`, `dsse` — Ed25519 keys and key ids; DSSE envelopes, PAE and digests (§3, §4.1);
- `keysets` — signed key set chains: rotation N→N+1, revocation, pinning (§4);
- `messages` — payload types, headers and `open_envelope`, the one receive path (§3.8, §5);
- `terms` — exact money (ISO 4217 minor units), dates, terms, schedules, bills and options (§7, §8);
- `negotiation`, `moves`, `answers` — the negotiation state machine with its transition table, the
  wire ↔ move codec, and the one vocabulary plugins answer in (§9);
- `enrolment`, `events` — enrolment codes; the event log's thread id and reminder levels (§6, §5.2);
- `agreement` — agreement bundles (`parley-bundle/1`) and their offline verification (§17).

An offline verifier needs nothing but this package and the generated wire code (`parley.v1`);
tests/test_architecture.py holds the package to that.
"""
