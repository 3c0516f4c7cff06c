"""Parley's test vectors (docs/VECTORS.md): load them and judge a case with this library.

The vectors are JSON shipped in the package (agent/data/vectors.json), made
deterministically by scripts/gen_vectors.py. Each case is one of three kinds,
judged by the same code paths the agents use:

- "message": one envelope opened with `open_envelope` against the sender's key
  set chain, the recipient, the payload types accepted and a reception time;
- "keyset":  a chain of key set envelopes verified with an optional pin;
- "bundle":  a parley-bundle/1 document verified offline.

`parley vectors --out FILE` publishes the document, `--schema` its JSON Schema
(agent/data/vectors.schema.json), for implementers who do not read Python.
"""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from typing import Any

from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.dsse import envelope_from_json
from agent.protocol.errors import ProtocolError
from agent.protocol.keysets import KeyChain
from agent.protocol.messages import PAYLOAD_TYPES, open_envelope

SCHEMA = "parley-vectors/1"
Verdict = tuple[str, str | None]


def _data_text(name: str) -> str:
    return resources.files("agent").joinpath(f"data/{name}").read_text(encoding="utf-8")


def document_text() -> str:
    """The vector document shipped with this package, byte for byte as generated."""
    return _data_text("vectors.json")


def schema_text() -> str:
    """The JSON Schema (draft 2020-12) of the vector document."""
    return _data_text("vectors.schema.json")


def load() -> dict[str, Any]:
    """The vector document shipped with this package."""
    document: dict[str, Any] = json.loads(document_text())
    if document.get("schema") != SCHEMA:
        raise ValueError(f"vectors.json is not {SCHEMA}")
    return document


def _chain(document: dict[str, Any], party: str) -> KeyChain:
    return KeyChain.verify([envelope_from_json(e) for e in document["keySets"][party]])


def _pins(case: dict[str, Any]) -> dict[str, bytes]:
    return {party: bytes.fromhex(pin) for party, pin in case.get("pins", {}).items()}


def judge(case: dict[str, Any], document: dict[str, Any]) -> Verdict:
    """("valid", None) or ("invalid", REASON) for one case, as this library sees it."""
    try:
        if case["kind"] == "message":
            context = case["context"]
            open_envelope(
                envelope_from_json(case["envelope"]),
                tuple(PAYLOAD_TYPES[name] for name in context["accept"]),
                sender_keys=_chain(document, context["sender"]),
                recipient=context["recipient"],
                now=datetime.fromisoformat(context["now"]),
            )
        elif case["kind"] == "keyset":
            now = case.get("now")
            pin = case.get("pin")
            KeyChain.verify(
                [envelope_from_json(e) for e in case["envelopes"]],
                pin=None if pin is None else bytes.fromhex(pin),
                now=None if now is None else datetime.fromisoformat(now),
            )
        elif case["kind"] == "bundle":
            verify_bundle(Bundle.from_json(case["bundle"]), pins=_pins(case))
        else:
            raise ValueError(f"unknown vector kind {case['kind']!r}")
    except ProtocolError as error:
        return "invalid", error.reason.name
    return "valid", None


__all__ = ["SCHEMA", "Verdict", "document_text", "judge", "load", "schema_text"]
