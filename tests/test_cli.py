"""`parley verify`, `parley keygen` and `parley --version`, run as the console script users run; the command
line only composes commands defined beside what they run."""

from __future__ import annotations

import base64
import copy
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from agent import vectors
from agent.biller import SERVER_NAME
from agent.cli import main
from agent.protocol import agreement
from agent.protocol.keys import SigningKey
from agent.transport.client import CLIENT_NAME
from agent.version import __version__

DOCUMENT = vectors.load()
GOOD = next(c["bundle"] for c in DOCUMENT["tests"] if c["id"] == "bundle-agreed-after-counter")


def parley(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, check=False, timeout=60
    )


def write(tmp_path: Path, bundle: object) -> str:
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    return str(path)


def test_verify_accepts_a_good_bundle_and_prints_the_agreement(tmp_path: Path) -> None:
    result = parley("verify", write(tmp_path, GOOD))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VALID" in result.stdout
    assert "INSTALMENT_PLAN" in result.stdout
    assert "bill-2026-03" in result.stdout
    assert result.stdout.count("EUR 20.00") >= 6  # the six-instalment schedule table


def test_verify_json_output(tmp_path: Path) -> None:
    result = parley("verify", "--json", write(tmp_path, GOOD))
    assert result.returncode == 0
    assert json.loads(result.stdout.strip().splitlines()[-1])["verdict"] == "valid"


def _flip_sig(bundle: dict[str, Any]) -> None:
    sig = bytearray(base64.b64decode(bundle["thread"][1]["signatures"][0]["sig"]))
    sig[5] ^= 0x10
    bundle["thread"][1]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()


def _edit_payload(bundle: dict[str, Any]) -> None:
    payload = bytearray(base64.b64decode(bundle["thread"][1]["payload"]))
    payload[-1] ^= 0x01
    bundle["thread"][1]["payload"] = base64.b64encode(bytes(payload)).decode()


def _swap_type(bundle: dict[str, Any]) -> None:
    bundle["thread"][1]["payloadType"] = "parley.v1.Accept"


def _drop_counter_offer(bundle: dict[str, Any]) -> None:
    del bundle["thread"][1]


def _reorder(bundle: dict[str, Any]) -> None:
    bundle["thread"][0], bundle["thread"][1] = bundle["thread"][1], bundle["thread"][0]


def _truncate_thread(bundle: dict[str, Any]) -> None:
    bundle["thread"].pop()


def _other_bill(bundle: dict[str, Any]) -> None:
    bundle["bill"] = bundle["thread"][0]


def _forge_key_set(bundle: dict[str, Any]) -> None:
    party = next(p for p in bundle["keySets"] if p.startswith("biller"))
    bundle["keySets"][party] = bundle["keySets"][party][1:]


TAMPERING: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "flipped signature bit": (_flip_sig, "BAD_SIGNATURE"),
    "edited payload": (_edit_payload, "BAD_SIGNATURE"),
    "swapped payloadType": (_swap_type, "BAD_SIGNATURE"),
    "dropped counter-offer": (_drop_counter_offer, "UNKNOWN_KEY"),
    "reordered messages": (_reorder, "UNKNOWN_KEY"),
    "missing acceptance": (_truncate_thread, "NOT_AGREED"),
    "bill replaced": (_other_bill, "WRONG_PAYLOAD_TYPE"),
    "key set chain without its root": (_forge_key_set, "KEYSET_VERSION_SKIPPED"),
}


@pytest.mark.parametrize("name", TAMPERING)
def test_verify_rejects_tampering_with_exit_1(tmp_path: Path, name: str) -> None:
    tamper, reason = TAMPERING[name]
    bundle = copy.deepcopy(GOOD)
    tamper(bundle)
    result = parley("verify", "--json", write(tmp_path, bundle))
    assert result.returncode == 1, result.stdout + result.stderr
    assert json.loads(result.stdout)["reason"] == reason


def test_verify_rejects_a_pin_that_does_not_match(tmp_path: Path) -> None:
    party = next(p for p in GOOD["keySets"] if p.startswith("consumer"))
    result = parley("verify", "--pin", f"{party}={'00' * 32}", write(tmp_path, GOOD))
    assert result.returncode == 1
    assert "PIN_MISMATCH" in result.stdout


@pytest.mark.parametrize(
    "content",
    ["not json at all", json.dumps({"format": "something-else/1"}), json.dumps({"format": "parley-bundle/1"})],
)
def test_verify_unusable_input_exits_2(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(content)
    result = parley("verify", "--json", str(path))
    assert result.returncode == 2
    assert json.loads(result.stdout)["verdict"] == "unusable"
    assert "UNUSABLE" in result.stderr


def _deeply_nested(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)  # was "unexpected error: RecursionError", exit 1


def _padded_past_the_bound(path: Path) -> None:
    # A good bundle, padded past the most any bundle can hold: refused unread, where `parley verify /dev/zero`
    # read until memory ran out.
    text = json.dumps(GOOD)
    path.write_text(text + " " * (agreement.MAX_BUNDLE_BYTES + 1 - len(text)))


UNUSABLE_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "deeply nested JSON": (_deeply_nested, "its JSON is nested too deeply to be a bundle"),
    "larger than any bundle": (_padded_past_the_bound, "far more than any bundle holds"),
}


@pytest.mark.parametrize("name", UNUSABLE_FILES)
def test_verify_input_no_bundle_can_be_is_unusable_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    make, says = UNUSABLE_FILES[name]
    make(tmp_path / "bundle.json")
    assert main(["verify", str(tmp_path / "bundle.json")]) == 2
    printed = capsys.readouterr()
    assert printed.err == ""
    assert printed.out.count("\n") == 1
    assert printed.out.startswith("UNUSABLE")
    assert says in printed.out
    assert main(["verify", "--json", str(tmp_path / "bundle.json")]) == 2
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["verdict"] == "unusable"
    assert says in verdict["detail"]


def test_verify_a_pin_whose_party_is_no_party_id_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in the party can never match the bundle: exit 2 naming it, as for a malformed fingerprint, where it
    was "INVALID PIN_MISMATCH" (exit 1)."""
    bundle = write(tmp_path, GOOD)
    assert main(["verify", bundle, "--pin", f"bad party={'ab' * 32}"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "'bad party' is not a party id" in out
    assert "PIN_MISMATCH" not in out


def test_verify_missing_file_exits_2(tmp_path: Path) -> None:
    assert parley("verify", str(tmp_path / "absent.json")).returncode == 2


def test_keygen_writes_an_owner_only_key_that_loads(tmp_path: Path) -> None:
    out = tmp_path / "biller.key"
    result = parley("keygen", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    key = SigningKey.load(out)
    assert key.keyid in result.stdout
    assert parley("keygen", "--out", str(out)).returncode == 2  # never overwrites a key


def test_the_cli_starts_without_importing_the_fuzzer() -> None:
    """hypothesis (a tenth of a second to import) is loaded by `parley fuzz` only, not by every command."""
    probe = "import sys, agent.cli; print(sorted(m for m in ('hypothesis', 'agent.tools.fuzz') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_one_version_everywhere() -> None:
    """agent/version.py is the one place: the package metadata, `parley --version` and the names on the wire."""
    assert metadata.version("parley") == __version__
    result = parley("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"parley {__version__}")
    assert f"parley-biller/{__version__}" == SERVER_NAME
    assert f"parley-consumer/{__version__}" == CLIENT_NAME


def test_vectors_are_judged_as_expected_and_can_be_written_out(tmp_path: Path) -> None:
    result = parley("vectors", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = json.loads(result.stdout)
    assert counts == {"cases": len(DOCUMENT["tests"]), "agreed": len(DOCUMENT["tests"]), "disagreed": []}
    out = tmp_path / "vectors.json"
    assert parley("vectors", "--out", str(out)).returncode == 0
    assert json.loads(out.read_text()) == DOCUMENT
    assert parley("vectors", "--out", str(out)).returncode == 2  # never overwrites
