"""The mistakes people make on the command line (issue 18), run through the real CLI (`python -m agent.cli`).

Each bad input must get one clear message naming what is wrong, a non-zero exit (2: unusable input or bad
usage, 1: refused or failed) and no Python traceback, and must leave every file as it was: nothing created,
nothing changed. Each row of `MISTAKES` is one such input: how to prepare the directory, the arguments, the
exit status and a phrase the message must contain.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from agent import cli, vectors
from agent.identity import IdentityDir
from agent.stores import SqliteConsumerStore
from agent.tools.certs import write_dev_certs
from agent.tools.json_output import emit_json, json_on_stdout
from reference_biller.config import SAMPLE
from reference_consumer.profile import PLACEHOLDER_FINGERPRINT
from tests.helpers.process import serving_process

CONSUMER_SAMPLE = Path(__file__).parents[1] / "reference_consumer" / "sample.toml"

BILLER_ID = "biller:energy.example"  # the sample configuration's party
DOCUMENT = vectors.load()
GOOD_BUNDLE = next(c["bundle"] for c in DOCUMENT["tests"] if c["id"] == "bundle-agreed-after-counter")
CONSUMER_ID = next(p for p in GOOD_BUNDLE["keySets"] if p.startswith("consumer"))
TRACEBACK = "Traceback (most recent call last)"


def parley(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with a digest of its content (directories: "dir")."""
    return {
        str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
    }


# --- What a row prepares ----------------------------------------------------------------------------------------


def config_with(old: str, new: str) -> Callable[[Path], None]:
    """bad.toml: the sample configuration with `old` replaced by `new`."""

    def prepare(root: Path) -> None:
        text = SAMPLE.read_text(encoding="utf-8")
        assert old in text, old
        (root / "bad.toml").write_text(text.replace(old, new, 1), encoding="utf-8")

    return prepare


def not_utf8(root: Path) -> None:
    (root / "bad.toml").write_bytes(
        SAMPLE.read_text(encoding="utf-8").replace("Household", "M\xfcller").encode("latin-1")
    )


def identity(root: Path) -> None:
    """state/: a biller identity, as `parley biller init` or `serve` leave it."""
    IdentityDir(root / "state", "biller").load(BILLER_ID, datetime.now(UTC))


def corrupt_key_set(root: Path) -> None:
    identity(root)
    (root / "state" / "biller-keyset-v1.pb").write_bytes(b"this is not a key set")


def corrupt_key(root: Path) -> None:
    identity(root)
    key = root / "state" / "biller.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)


def a_file(root: Path) -> None:
    (root / "state").write_text("not a directory")


def garbage_tls(root: Path) -> None:
    (root / "cert.pem").write_text("garbage")
    (root / "key.pem").write_text("garbage")
    (root / "key.pem").chmod(0o600)  # a private key file as it should be kept: the certificate is what is wrong


def corrupt_store(root: Path) -> None:
    identity(root)
    (root / "state" / "biller.sqlite").write_text("this is not a database")


def two_certificates(root: Path) -> None:
    """a/ and b/: two development CAs with their server certificates and keys; a's certificate, b's key."""
    write_dev_certs(root / "a")
    write_dev_certs(root / "b")


def readable_tls_key(root: Path) -> None:
    """a/: a development CA, its server certificate, and a key file the group and others may read."""
    write_dev_certs(root / "a")
    (root / "a" / "server.key").chmod(0o644)


def readable_tls_key_in_config(root: Path) -> None:
    """bad.toml naming a/'s certificate and its key, which the group and others may read."""
    readable_tls_key(root)
    config_with("\n[payments]", '\n[server]\ntls_cert = "a/server.pem"\ntls_key = "a/server.key"\n\n[payments]')(root)


def bundle(root: Path) -> None:
    (root / "bundle.json").write_text(json.dumps(GOOD_BUNDLE))


def nothing(root: Path) -> None:
    pass


def profile_with(*changes: tuple[str, str]) -> Callable[[Path], None]:
    """p.toml: the sample household profile with each `old` replaced by `new` (the fingerprint made real first)."""

    def prepare(root: Path) -> None:
        text = CONSUMER_SAMPLE.read_text(encoding="utf-8")
        for old, new in changes:
            assert old in text, old
            text = text.replace(old, new, 1)
        (root / "p.toml").write_text(text, encoding="utf-8")

    return prepare


REAL_PIN = (f'fingerprint = "{PLACEHOLDER_FINGERPRINT.hex()}"', f'fingerprint = "{"ab" * 32}"')


def household_state(root: Path) -> None:
    """p.toml (a usable profile) and state/: a household identity, as a first `parley consumer run` leaves it."""
    profile_with(REAL_PIN)(root)
    IdentityDir(root / "state", "consumer").load("consumer:household-1", datetime.now(UTC))

    async def make_store() -> None:
        await (await SqliteConsumerStore.open(root / "state" / "consumer.sqlite")).close()

    asyncio.run(make_store())


def corrupt_consumer_key(root: Path) -> None:
    household_state(root)
    key = root / "state" / "consumer.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)


def corrupt_consumer_store(root: Path) -> None:
    household_state(root)
    (root / "state" / "consumer.sqlite").write_text("this is not a database")


@dataclass(frozen=True)
class Mistake:
    args: tuple[str, ...]
    status: int
    says: tuple[str, ...]
    prepare: Callable[[Path], None] = nothing
    absent: tuple[str, ...] = field(default=())  # paths that must still not exist


CHECK = ("biller", "check-config", "bad.toml")
MISMATCHED_TLS = ("--tls-cert", "a/server.pem", "--tls-key", "b/server.key")
GARBAGE_TLS = ("--tls-cert", "cert.pem", "--tls-key", "key.pem")
READABLE_KEY_TLS = ("--tls-cert", "a/server.pem", "--tls-key", "a/server.key")
FULL_PIN = "ab" * 32
SERVE_PLAINTEXT = ("--listen", "127.0.0.1:0", "--insecure")
CLIENT_CERTIFICATE = ("--tls-client-cert", "c.pem", "--tls-client-key", "c.key")
RUN = ("consumer", "run", "--profile", "p.toml", "--state-dir", "state", "--once")
STATUS = ("consumer", "status", "--profile", "p.toml", "--state-dir", "state")

MISTAKES: dict[str, Mistake] = {
    # check-config refuses everything serve would refuse or misread
    "config not UTF-8": Mistake(CHECK, 1, ("not UTF-8",), not_utf8),
    "duplicate account id": Mistake(
        CHECK, 1, ("accounts[1].id", "already accounts[0]"), config_with('id = "acct-1002"', 'id = "acct-1001"')
    ),
    "empty account id": Mistake(CHECK, 1, ("accounts[0].id", "1 to 64"), config_with('id = "acct-1001"', 'id = ""')),
    "over-long account id": Mistake(
        CHECK, 1, ("accounts[0].id", "1 to 64"), config_with('id = "acct-1001"', f'id = "{"a" * 65}"')
    ),
    "unknown rail": Mistake(
        CHECK, 1, ("payments.rail", "'swift'"), config_with('rail = "simulated"', 'rail = "swift"')
    ),
    "absurd early-payment discount": Mistake(
        CHECK,
        1,
        ("early_payment_discount", "EUR 3000.00", "smallest instalment"),
        config_with('early_payment_discount = "3.00"', 'early_payment_discount = "3000.00"'),
    ),
    "money as a TOML number": Mistake(
        CHECK, 1, ("deferral_fee", "quoted decimal text"), config_with('deferral_fee = "5.00"', "deferral_fee = 5.0")
    ),
    "money with too many decimals": Mistake(
        CHECK,
        1,
        ("deferral_fee", "more than 2 decimals"),
        config_with('deferral_fee = "5.00"', 'deferral_fee = "5.005"'),
    ),
    "listen port out of range in the config": Mistake(
        CHECK,
        1,
        ("server.listen", "0-65535"),
        config_with("\n[payments]", '\n[server]\nlisten = "127.0.0.1:99999"\n\n[payments]'),
    ),
    "an unknown store URL in the config": Mistake(
        CHECK,
        1,
        ("server.store", "'mysql'"),
        config_with("\n[payments]", '\n[server]\nstore = "mysql://db"\n\n[payments]'),
    ),
    "a missing TLS file in the config": Mistake(
        CHECK,
        1,
        ("cannot read absent.pem",),
        config_with("\n[payments]", '\n[server]\ntls_cert = "absent.pem"\ntls_key = "absent.key"\n\n[payments]'),
    ),
    # What serve refuses in the [server] table alone (resolve_serve's rules, the key file's mode).
    "a TLS certificate without its key in the config": Mistake(
        CHECK,
        1,
        ("server.tls_cert", "the TLS certificate and key go together"),
        config_with("\n[payments]", '\n[server]\ntls_cert = "cert.pem"\n\n[payments]'),
    ),
    "a client CA without a certificate in the config": Mistake(
        CHECK,
        1,
        ("server.tls_client_ca", "mutual TLS needs the TLS certificate and key"),
        config_with("\n[payments]", '\n[server]\ntls_client_ca = "ca.pem"\n\n[payments]'),
    ),
    "a TLS key others may read, named in the config": Mistake(
        CHECK, 1, ("server.tls_key", "a/server.key", "open to group or others", "chmod 600"), readable_tls_key_in_config
    ),
    # Every number in the file has a finite range: these were "unexpected error: OverflowError" (or "cannot convert
    # float NaN to integer") from every command that loads the file, or passed only to break serve or every bill.
    "a settlement delay past a timedelta": Mistake(
        CHECK,
        1,
        ("payments.settlement_delay_hours", "from 0 to 8,784", "9999999999999"),
        config_with("settlement_delay_hours = 24", "settlement_delay_hours = 9999999999999"),
    ),
    "an endless upkeep interval": Mistake(
        CHECK,
        1,
        ("simulation.upkeep_interval_seconds", "at most 86,400", "got inf"),
        config_with("upkeep_interval_seconds = 5", "upkeep_interval_seconds = inf"),
    ),
    "an upkeep interval that is not a number": Mistake(
        CHECK,
        1,
        ("simulation.upkeep_interval_seconds", "got nan"),
        config_with("upkeep_interval_seconds = 5", "upkeep_interval_seconds = nan"),
    ),
    "a shutdown grace that is not a number": Mistake(
        CHECK,
        1,
        ("server.shutdown_grace_seconds", "got nan"),
        config_with("\n[payments]", "\n[server]\nshutdown_grace_seconds = nan\n\n[payments]"),
    ),
    "more connections than serve takes": Mistake(
        CHECK,
        1,
        ("server.max_connections", "from 1 to 1,000,000"),
        config_with("\n[payments]", "\n[server]\nmax_connections = 99999999999\n\n[payments]"),
    ),
    "a deferral longer than a bill can carry": Mistake(
        CHECK,
        1,
        ("segments.standard.deferral_max_days", "from 0 to 4,294,967,295"),
        config_with("deferral_max_days = 30", "deferral_max_days = 99999999999999"),
    ),
    "an account id accounts add refuses": Mistake(
        CHECK,
        1,
        ("accounts[0].id", "'acct 1001'", "A-Z a-z 0-9 . _ : -"),
        config_with('id = "acct-1001"', 'id = "acct 1001"'),
    ),
    "an empty payee account": Mistake(
        CHECK,
        1,
        ("payments.payee_account", "must not be empty"),
        config_with('payee_account = "DE89370400440532013000"', 'payee_account = ""'),
    ),
    "init with a settlement delay past a timedelta": Mistake(
        ("biller", "init", "--state-dir", "fresh", "--config", "bad.toml"),
        2,
        ("payments.settlement_delay_hours",),
        config_with("settlement_delay_hours = 24", "settlement_delay_hours = 9999999999999"),
        absent=("fresh",),
    ),
    "serve with an endless idle timeout in the config": Mistake(
        ("biller", "serve", "--state-dir", "fresh", "--config", "bad.toml", *SERVE_PLAINTEXT),
        2,
        ("server.idle_timeout_seconds", "at most 2,147,483", "got inf"),
        config_with("\n[payments]", "\n[server]\nidle_timeout_seconds = inf\n\n[payments]"),
        absent=("fresh",),
    ),
    # gRPC takes the connection timeouts as a C int of milliseconds: from 2147484 s, serve crashed as it started.
    "serve with an idle timeout gRPC cannot take": Mistake(
        ("biller", "serve", "--state-dir", "fresh", *SERVE_PLAINTEXT, "--idle-timeout", "2147484"),
        2,
        ("--idle-timeout", "at most 2,147,483", "'2147484'"),
        absent=("fresh",),
    ),
    "serve with a handshake timeout gRPC cannot take": Mistake(
        ("biller", "serve", "--state-dir", "fresh", *SERVE_PLAINTEXT, "--handshake-timeout", "1e300"),
        2,
        ("--handshake-timeout", "at most 2,147,483", "'1e300'"),
        absent=("fresh",),
    ),
    # offline biller commands never make an identity
    "codes in a mistyped state directory": Mistake(
        ("biller", "codes", "--state-dir", "stat"), 2, ("no biller identity", "biller init"), absent=("stat",)
    ),
    "rotate-key in a missing state directory": Mistake(
        ("biller", "rotate-key", "--state-dir", "missing"), 2, ("no biller identity",), absent=("missing",)
    ),
    "codes with a state directory that is a file": Mistake(
        ("biller", "codes", "--state-dir", "state"), 2, ("is a file",), a_file
    ),
    "serve with a state directory that is a file": Mistake(
        ("biller", "serve", "--state-dir", "state", "--listen", "127.0.0.1:0", "--insecure"), 2, ("is a file",), a_file
    ),
    # tracebacks that are one line now
    "a corrupt key set file": Mistake(
        ("biller", "codes", "--state-dir", "state"), 1, ("key sets in state are not a usable chain",), corrupt_key_set
    ),
    "a corrupt biller.key": Mistake(
        ("biller", "codes", "--state-dir", "state"), 1, ("biller.key is not a usable Ed25519 private key",), corrupt_key
    ),
    "PostgreSQL unreachable": Mistake(
        ("biller", "codes", "--state-dir", "state", "--store", "postgresql://parley:s3cret@127.0.0.1:1/parley"),
        1,
        ("cannot open the PostgreSQL store postgresql://parley:***@127.0.0.1:1/parley",),
        identity,
    ),
    "a corrupt biller.sqlite": Mistake(
        ("biller", "codes", "--state-dir", "state"),
        1,
        ("cannot open the SQLite store", "not a database"),
        corrupt_store,
    ),
    "keygen into a missing directory": Mistake(
        ("keygen", "--out", "nowhere/biller.key"), 2, ("directory nowhere does not exist",), absent=("nowhere",)
    ),
    # misleading messages
    "listen port out of range": Mistake(
        ("biller", "serve", "--state-dir", "fresh", "--listen", "127.0.0.1:99999", "--insecure"),
        2,
        ("port 99999", "0-65535"),
        absent=("fresh",),
    ),
    "a garbage TLS certificate": Mistake(
        ("biller", "serve", "--state-dir", "fresh", "--listen", "127.0.0.1:0", *GARBAGE_TLS),
        2,
        ("cert.pem is not a readable certificate",),
        garbage_tls,
        absent=("fresh",),
    ),
    "conformance --insecure to a remote target": Mistake(
        ("conformance", "biller", "--target", "192.0.2.7:7443", "--insecure"), 2, ("loopback target (TRN-3)",)
    ),
    "conformance with a client certificate but no key": Mistake(
        ("conformance", "biller", "--target", "127.0.0.1:7443", "--tls-client-cert", "client.pem"),
        2,
        ("--tls-client-cert and --tls-client-key go together",),
    ),
    "conformance with a client certificate in plaintext": Mistake(
        ("conformance", "biller", "--target", "127.0.0.1:7443", "--insecure", *CLIENT_CERTIFICATE),
        2,
        ("a client certificate needs TLS",),
    ),
    "a TLS key others may read": Mistake(
        ("biller", "serve", "--state-dir", "fresh", "--listen", "127.0.0.1:0", *READABLE_KEY_TLS),
        2,
        ("a/server.key", "open to group or others", "chmod 600"),
        readable_tls_key,
        absent=("fresh",),
    ),
    "a TLS key that is not the certificate's": Mistake(
        ("biller", "serve", "--state-dir", "fresh", "--listen", "127.0.0.1:0", *MISMATCHED_TLS),
        2,
        ("b/server.key is not the key of the certificate in a/server.pem",),
        two_certificates,
        absent=("fresh",),
    ),
    # verify says what it checked; a typo in a pin is a usage error
    "verify without a pin": Mistake(("verify", "bundle.json"), 0, ("identity NOT checked", CONSUMER_ID), bundle),
    "a pin without =": Mistake(("verify", "bundle.json", "--pin", FULL_PIN), 2, ("PARTY=FINGERPRINT",), bundle),
    "a shortened pin": Mistake(
        ("verify", "bundle.json", "--pin", f"{CONSUMER_ID}={FULL_PIN[:16]}"), 2, ("16 hex digits, not 64",), bundle
    ),
    "a pin of odd length": Mistake(
        ("verify", "bundle.json", "--pin", f"{CONSUMER_ID}={FULL_PIN}a"), 2, ("not hex",), bundle
    ),
    "a pin that does not match": Mistake(
        ("verify", "bundle.json", "--pin", f"{CONSUMER_ID}={FULL_PIN}"),
        1,
        ("PIN_MISMATCH", f"expected {FULL_PIN}"),
        bundle,
    ),
    "the all-zero placeholder pin": Mistake(
        ("verify", "bundle.json", "--pin", f"{CONSUMER_ID}={'00' * 32}"), 1, ("placeholder",), bundle
    ),
    # the household's profile and state directory
    "the sample profile's placeholder fingerprint": Mistake(
        RUN,
        2,
        ('billers."biller:energy.example".fingerprint', "all-zero placeholder", "parley biller codes"),
        profile_with(),
        absent=("state",),
    ),
    "household money as a TOML number": Mistake(
        RUN,
        2,
        ("mandate.max_fee", "TOML number", 'quoted decimal text, e.g. "10.00"'),
        profile_with(REAL_PIN, ('max_fee = "10.00"', "max_fee = 10.0")),
        absent=("state",),
    ),
    "household money with too many decimals": Mistake(
        RUN,
        2,
        ("mandate.max_fee", "more than 2 decimals for EUR"),
        profile_with(REAL_PIN, ('max_fee = "10.00"', 'max_fee = "10.005"')),
        absent=("state",),
    ),
    "a corrupt consumer.key (run)": Mistake(
        RUN, 2, ("state/consumer.key is not a usable Ed25519 private key", "backup"), corrupt_consumer_key
    ),
    "a corrupt consumer.key (status)": Mistake(
        STATUS, 2, ("state/consumer.key is not a usable Ed25519 private key", "backup"), corrupt_consumer_key
    ),
    "a corrupt consumer.sqlite (run)": Mistake(
        RUN, 2, ("state/consumer.sqlite", "not a database", "backup"), corrupt_consumer_store
    ),
    "a corrupt consumer.sqlite (status)": Mistake(
        STATUS, 2, ("state/consumer.sqlite", "not a database", "backup"), corrupt_consumer_store
    ),
    "a corrupt consumer.sqlite (approve)": Mistake(
        ("consumer", "approve", "abcd", "--state-dir", "state"),
        2,
        ("state/consumer.sqlite", "not a database", "backup"),
        corrupt_consumer_store,
    ),
    # The tools' counts and durations: a typo in a count started that many processes (`parley bench
    # --workers 99999` brought a 2-core machine to a load average of 93 before anything said no), and
    # nan passes any `<= 0` test.
    "bench: a worker count far too large": Mistake(
        ("bench", "--workers", "99999"), 2, ("--workers", "from 1 to 64", "99999")
    ),
    "bench: seconds that are not a number": Mistake(("bench", "--seconds", "nan"), 2, ("--seconds", "got nan")),
    "chaos: a client count far too large": Mistake(
        ("chaos", "--clients", "100000"), 2, ("--clients", "from 1 to 256", "100000")
    ),
    "fuzz: seconds that never end": Mistake(("fuzz", "--seconds", "inf"), 2, ("--seconds", "at most 86,400")),
    "mutate: no mutant at a time": Mistake(("mutate", "--jobs", "0"), 2, ("--jobs", "from 1 to 32")),
    "conformance: scenarios at once far too many": Mistake(
        ("conformance", "consumer", "--client-cmd", "true", "--jobs", "100000"), 2, ("--jobs", "from 1 to 64")
    ),
    "conformance: a case timeout that is not a number": Mistake(
        ("conformance", "consumer", "--client-cmd", "true", "--timeout", "nan"), 2, ("--timeout", "got nan")
    ),
    "consumer: passes at an interval that is not a number": Mistake(
        ("consumer", "run", "--profile", "p.toml", "--interval", "nan"), 2, ("--interval", "got 'nan'")
    ),
    "consumer: passes a year apart": Mistake(
        ("consumer", "serve", "--profile", "p.toml", "--interval", "31536000"), 2, ("--interval", "at most 86,400")
    ),
    "conformance: an idle timeout that never ends": Mistake(
        ("conformance", "biller", "--target", "127.0.0.1:1", "--insecure", "--idle-timeout", "inf"),
        2,
        ("--idle-timeout", "at most 3,600"),
    ),
}


@pytest.mark.parametrize("name", MISTAKES)
def test_a_mistake_gets_one_clear_message_an_exit_status_and_changes_nothing(tmp_path: Path, name: str) -> None:
    mistake = MISTAKES[name]
    mistake.prepare(tmp_path)
    before = snapshot(tmp_path)
    result = parley(*mistake.args, cwd=tmp_path)
    said = result.stdout + result.stderr
    assert result.returncode == mistake.status, said
    for phrase in mistake.says:
        assert phrase in said, said
    assert TRACEBACK not in said
    assert snapshot(tmp_path) == before, said
    for path in mistake.absent:
        assert not (tmp_path / path).exists()


def test_a_pin_mismatch_shows_the_actual_fingerprint_in_full(tmp_path: Path) -> None:
    bundle(tmp_path)
    result = parley("verify", "bundle.json", "--pin", f"{CONSUMER_ID}={FULL_PIN}", cwd=tmp_path)
    actual = next(line.split()[-1] for line in result.stdout.splitlines() if line.strip().startswith("actual"))
    assert len(actual) == 64
    pinned = parley("verify", "bundle.json", "--pin", f"{CONSUMER_ID}={actual}", cwd=tmp_path)
    assert pinned.returncode == 0, pinned.stdout
    assert f"identity of {CONSUMER_ID}: checked" in pinned.stdout


# --- The user's own paths and targets: refused before any work, in process ---------------------------------------
# A report written at the end of a run into a directory that does not exist, or a state directory that is a
# regular file, failed only after the work ("unexpected error: FileNotFoundError" after the twelve seconds of
# the demo, FileExistsError from chaos); a target port beyond 65535 was wrapped by gRPC (99999 is 34463).


def regular_file(root: Path) -> None:
    (root / "afile").write_text("not a directory")


EARLY_MISTAKES: dict[str, Mistake] = {
    "conformance: a target port beyond 65535": Mistake(
        ("conformance", "biller", "--target", "127.0.0.1:99999", "--insecure", "--only", "ENV-3"),
        2,
        ("argument --target: '127.0.0.1:99999' is not HOST:PORT with a port from 1 to 65535",),
    ),
    "conformance: a target that is not HOST:PORT": Mistake(
        ("conformance", "biller", "--target", "nonsense", "--insecure"), 2, ("'nonsense' is not HOST:PORT",)
    ),
    "demo: a JSON report into a missing directory": Mistake(
        ("demo", "--out", "d", "--json-out", "missing/x.json"),
        2,
        ("argument --json-out: cannot write missing/x.json: the directory missing does not exist",),
        absent=("d", "missing"),
    ),
    "chaos: a state directory that is a file": Mistake(
        ("chaos", "--state-dir", "afile"), 2, ("argument --state-dir: afile is not a directory",), regular_file
    ),
    "conformance: a work directory that is a file": Mistake(
        ("conformance", "consumer", "--client-cmd", "true", "--work-dir", "afile", "--only", "PAY-8"),
        2,
        ("argument --work-dir: afile is not a directory",),
        regular_file,
    ),
    "conformance: a JUnit report under a file": Mistake(
        ("conformance", "consumer", "--client-cmd", "true", "--junit", "afile/r.xml"),
        2,
        ("argument --junit: cannot write afile/r.xml: afile is not a directory",),
        regular_file,
    ),
    "keygen under a regular file": Mistake(
        ("keygen", "--out", "afile/k"), 2, ("cannot write afile/k: afile is not a directory",), regular_file
    ),
    "vectors: --json with --out, which judges nothing": Mistake(
        ("vectors", "--out", "v.json", "--json"), 2, ("leave out --json",), absent=("v.json",)
    ),
    "vectors: an empty --out": Mistake(("vectors", "--out", ""), 2, ("argument --out: expected a file name, got ''",)),
}


def said_once(mistake: Mistake, status: int, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What an in-process command printed, without argparse's usage lines: one message with the mistake's phrases,
    and the mistake's exit status."""
    printed = capsys.readouterr()
    said = [line for line in (printed.out + printed.err).splitlines() if not line.startswith(("usage:", " "))]
    assert status == mistake.status, said
    assert len(said) == 1, said  # one message (after argparse's usage, when it is argparse's)
    for phrase in mistake.says:
        assert phrase in said[0], said
    return said


@pytest.mark.parametrize("name", EARLY_MISTAKES)
def test_a_mistake_in_a_path_or_target_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    mistake = EARLY_MISTAKES[name]
    mistake.prepare(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    started = time.monotonic()
    status = cli.main(list(mistake.args))
    said_once(mistake, status, capsys)
    assert time.monotonic() - started < 5  # refused, not run
    assert snapshot(tmp_path) == before
    for path in mistake.absent:
        assert not (tmp_path / path).exists()


JSON_COMMANDS = {
    "demo": ("demo",),
    "bench": ("bench",),
    "chaos": ("chaos",),
    "fuzz": ("fuzz",),
    "mutate": ("mutate",),
    "conformance biller": ("conformance", "biller", "--target", "127.0.0.1:7443"),
    "conformance consumer": ("conformance", "consumer", "--client-cmd", "true"),
}
UNWRITABLE = {
    "missing/r.json": "cannot write missing/r.json: the directory missing does not exist (create it first)",
    "afile/r.json": "cannot write afile/r.json: afile is not a directory",
    ".": ". is a directory: name a file",
}


@pytest.mark.parametrize("option", ["--json-out", "--json"])
@pytest.mark.parametrize("command", JSON_COMMANDS)
def test_every_json_destination_is_checked_when_the_arguments_are_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str, option: str
) -> None:
    """Parsed only, never run: a bench or a chaos run with a bad destination went the whole way before failing."""
    regular_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    parser = cli.build_parser()
    for destination, says in UNWRITABLE.items():
        with pytest.raises(SystemExit) as refused:
            parser.parse_args([*JSON_COMMANDS[command], option, destination])
        assert refused.value.code == 2
        assert f"argument {option}: {says}" in capsys.readouterr().err
    parser.parse_args([*JSON_COMMANDS[command], option, "r.json"])  # a new file in a writable directory


@pytest.mark.parametrize(
    "arguments",
    [
        ("bench", "--state-dir"),
        ("chaos", "--state-dir"),
        ("demo", "--out"),
        ("certs", "--out"),
        ("conformance", "consumer", "--client-cmd", "true", "--work-dir"),
    ],
    ids=" ".join,
)
def test_every_work_directory_is_checked_when_the_arguments_are_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], arguments: tuple[str, ...]
) -> None:
    regular_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    parser = cli.build_parser()
    for directory, says in {
        "afile": "afile is not a directory",
        "afile/sub": "cannot make the directory afile/sub: afile is not a directory",
        "": "expected a directory name, got ''",
    }.items():
        with pytest.raises(SystemExit) as refused:
            parser.parse_args([*arguments, directory])
        assert refused.value.code == 2
        assert f"argument {arguments[-1]}: {says}" in capsys.readouterr().err
    parser.parse_args([*arguments, "new/state"])  # made later, with its parents, by the command
    assert not (tmp_path / "new").exists()


# --- With a biller serving -----------------------------------------------------------------------------------


@contextmanager
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@contextmanager
def serving(root: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *("biller", "serve", "--state-dir", "state"), *SERVE_PLAINTEXT],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.stdout.readline().startswith("listening"):
                break
        else:
            pytest.fail("the biller did not start")
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_busy_ports_are_named_and_a_failed_start_leaves_no_state_behind(tmp_path: Path) -> None:
    with busy_port() as port:
        grpc_busy = parley(
            "biller", "serve", "--state-dir", "fresh", "--listen", f"127.0.0.1:{port}", "--insecure", cwd=tmp_path
        )
        metrics_busy = parley(
            "biller", "serve", "--state-dir", "fresh", "--listen", "127.0.0.1:0", "--insecure",
            "--metrics-listen", f"127.0.0.1:{port}", cwd=tmp_path,
        )  # fmt: skip
    assert grpc_busy.returncode == 1, grpc_busy.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in grpc_busy.stdout
    assert metrics_busy.returncode == 1, metrics_busy.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in metrics_busy.stdout
    assert TRACEBACK not in grpc_busy.stderr + metrics_busy.stderr
    assert not (tmp_path / "fresh").exists()


def test_rotate_key_is_refused_while_a_biller_serves_the_state_directory(tmp_path: Path) -> None:
    identity(tmp_path)
    with serving(tmp_path):
        before = snapshot(tmp_path / "state")
        refused = parley("biller", "rotate-key", "--state-dir", "state", cwd=tmp_path)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "a biller is serving state" in refused.stdout
        assert {p: d for p, d in snapshot(tmp_path / "state").items() if "keyset" in p or p.endswith(".key")} == {
            p: d for p, d in before.items() if "keyset" in p or p.endswith(".key")
        }
    rotated = parley("biller", "rotate-key", "--state-dir", "state", cwd=tmp_path)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert (tmp_path / "state" / "biller-keyset-v2.pb").exists()


# --- TLS against plaintext, and a missing client certificate: the cause and the flag, not "Socket closed" ---------


def port_of(banner: dict[str, str]) -> str:
    return banner["listening"].split()[0].rpartition(":")[2]


@contextmanager
def two_billers(root: Path) -> Iterator[tuple[str, str]]:
    """A plaintext and a mutual-TLS `parley biller serve` on free loopback ports (certs/ holds the CA and alice's
    client certificate); yields their ports."""
    write_dev_certs(root / "certs", clients=["alice"])
    mutual = ["--tls-cert", str(root / "certs" / "server.pem"), "--tls-key", str(root / "certs" / "server.key")]
    mutual += ["--tls-client-ca", str(root / "certs" / "ca.pem")]
    with (
        serving_process(
            ["--listen", "127.0.0.1:0", "--insecure", "--state-dir", str(root / "plain")], log=root / "plain.log"
        ) as (_, plain),
        serving_process(
            ["--listen", "127.0.0.1:0", *mutual, "--state-dir", str(root / "mtls")], log=root / "mtls.log"
        ) as (_, mtls),
    ):
        assert mtls["listening"].endswith("(mutual TLS)"), mtls
        yield port_of(plain), port_of(mtls)


def test_tls_mismatches_and_a_missing_client_certificate_name_the_cause_and_the_flag(tmp_path: Path) -> None:
    ca = ("--tls-ca", "certs/ca.pem")
    alice = ("--tls-client-cert", "certs/client-alice.pem", "--tls-client-key", "certs/client-alice.key")
    with two_billers(tmp_path) as (plain, mtls):
        hello = ("--only", "VER-2/hello")
        plaintext_to_tls = parley("conformance", "biller", "--target", f"127.0.0.1:{mtls}", "--insecure", cwd=tmp_path)
        tls_to_plaintext = parley("conformance", "biller", "--target", f"127.0.0.1:{plain}", *ca, cwd=tmp_path)
        no_certificate = parley("conformance", "biller", "--target", f"127.0.0.1:{mtls}", *ca, *hello, cwd=tmp_path)
        with_certificate = parley(
            "conformance", "biller", "--target", f"127.0.0.1:{mtls}", *ca, *alice, *hello, cwd=tmp_path
        )
        profile_with(REAL_PIN, ('target = "127.0.0.1:7443"', f'target = "127.0.0.1:{mtls}"'))(tmp_path)
        household_plaintext_to_tls = parley(*RUN, cwd=tmp_path)
        profile_with(
            REAL_PIN,
            ('target = "127.0.0.1:7443"', f'target = "127.0.0.1:{mtls}"'),
            ("insecure = true", 'ca_file = "certs/ca.pem"'),
        )(tmp_path)
        household_without_certificate = parley(*RUN, cwd=tmp_path)
        link = (
            f"parley:enrol?endpoint=127.0.0.1%3A{mtls}&biller=biller%3Aenergy.example&fingerprint={'ab' * 32}"
            "&account=acct-1&code=ABCDEFGHJKMN"
        )
        enrol_plaintext_to_tls = parley(
            "consumer", "enrol", link, "--profile", "p.toml", "--state-dir", "enrol-state", cwd=tmp_path
        )
    expected = {
        "conformance --insecure at a TLS biller": (
            plaintext_to_tls,
            (f"hint: 127.0.0.1:{mtls} speaks TLS, not plaintext: leave out --insecure", "--tls-ca FILE"),
        ),
        "conformance --tls-ca at a plaintext biller": (
            tls_to_plaintext,
            (f"hint: 127.0.0.1:{plain} speaks plaintext, not TLS: use --insecure",),
        ),
        "conformance without a client certificate at a mutual-TLS biller": (
            no_certificate,
            (f"hint: 127.0.0.1:{mtls} asks for a client certificate", "--tls-client-cert FILE and --tls-client-key"),
        ),
        "a household with insecure = true at a TLS biller": (
            household_plaintext_to_tls,
            ('speaks TLS, not plaintext: remove insecure = true from [billers."biller:energy.example"]',),
        ),
        "an enrolment link to a TLS biller on loopback, without --ca-file": (
            enrol_plaintext_to_tls,
            (f"hint: 127.0.0.1:{mtls} speaks TLS, not plaintext", "--ca-file FILE"),
        ),
        "a household without a client certificate at a mutual-TLS biller": (
            household_without_certificate,
            ("asks for a client certificate", "household.client_certificate and household.client_key"),
        ),
    }
    for name, (done, phrases) in expected.items():
        output = done.stdout + done.stderr
        assert done.returncode == 2, f"{name}: exit {done.returncode}\n{output}"
        for phrase in phrases:
            assert phrase in output, f"{name}: {phrase!r} not in\n{output}"
        assert TRACEBACK not in output, name
    assert with_certificate.returncode == 0, with_certificate.stdout + with_certificate.stderr  # the flags work


# --- The last line of defence ------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _explode(*_: object) -> None:
    raise Boom("something nobody expected")


def test_an_unexpected_error_is_one_line_naming_the_file_with_its_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("agent.tools.keygen.SigningKey.generate", _explode)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert cli.main(["keygen", "--out", str(tmp_path / "k")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert TRACEBACK not in err
    assert "unexpected error: Boom: something nobody expected" in err
    trace_file = Path(err.split("the full trace is in ")[1].split(";")[0])
    assert trace_file.parent == tmp_path
    trace = trace_file.read_text()
    assert TRACEBACK in trace
    assert "_explode" in trace
    assert cli.main(["keygen", "--out", str(tmp_path / "k"), "--debug"]) == 1  # --debug: the trace itself
    assert TRACEBACK in capsys.readouterr().err


# --- --json means the same everywhere ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["demo", "bench", "chaos", "fuzz", "mutate"])
def test_json_prints_on_stdout_and_json_out_writes_a_file(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = cli.build_parser()
    to_stdout = parser.parse_args([command, "--json"])
    assert json_on_stdout(to_stdout)  # the console moves to stderr
    emit_json(to_stdout, {"ok": True}, Console(file=io.StringIO()))
    assert json.loads(capsys.readouterr().out) == {"ok": True}
    to_file = parser.parse_args([command, "--json-out", str(tmp_path / "report.json")])
    assert not json_on_stdout(to_file)
    emit_json(to_file, {"ok": True}, Console(file=io.StringIO()))
    assert json.loads((tmp_path / "report.json").read_text()) == {"ok": True}
    assert capsys.readouterr().out == ""
    old_form = parser.parse_args([command, "--json", str(tmp_path / "old.json")])  # still works, with a note
    said = io.StringIO()
    emit_json(old_form, {"ok": True}, Console(file=said))
    assert json.loads((tmp_path / "old.json").read_text()) == {"ok": True}
    assert "deprecated" in said.getvalue()


# --- State directories and `biller codes`: refused before anything is written, in process -------------------------
# A biller's key without its key set version 1 was given a new version 1 (a new fingerprint, codes printed under
# it); each agent made its files in the other's state directory; an empty --state-dir meant the working directory
# (or, for the household, the default); `codes` issued a code (superseding the last one) before it found its QR
# file could not be written, printed links no consumer could read, and made a new empty store for a mistyped one.


def without_key_set(root: Path) -> None:
    """state/: a biller's key whose key set version 1 is lost."""
    identity(root)
    (root / "state" / "biller-keyset-v1.pb").unlink()


def rotated_without_key_set(root: Path) -> None:
    """state/: a biller's key and key set version 2 (after rotate-key), version 1 lost."""
    identity(root)
    IdentityDir(root / "state", "biller").rotate(BILLER_ID, datetime.now(UTC))
    (root / "state" / "biller-keyset-v1.pb").unlink()


def household_without_key_set(root: Path) -> None:
    household_state(root)
    (root / "state" / "consumer-keyset-v1.pb").unlink()


def biller_state_and_profile(root: Path) -> None:
    """state/: a biller's identity; p.toml: a usable household profile."""
    identity(root)
    profile_with(REAL_PIN)(root)


def file_and_profile(root: Path) -> None:
    a_file(root)
    profile_with(REAL_PIN)(root)


CODES = ("biller", "codes", "--state-dir", "state", "--account", "acct-1001")
LOST_VERSION_1 = ("key set version 1 is missing from state", "restore it from your backup", "nothing was changed")
HOUSEHOLDS = ("state holds a consumer's state: use another --state-dir",)
BILLERS = ("state holds a biller's state: use another --state-dir",)
EMPTY = ("--state-dir is empty: name a directory",)

STATE_MISTAKES: dict[str, Mistake] = {
    "codes when key set version 1 is lost": Mistake(CODES, 1, LOST_VERSION_1, without_key_set),
    "init when key set version 1 is lost": Mistake(
        ("biller", "init", "--state-dir", "state"), 1, LOST_VERSION_1, without_key_set
    ),
    "codes when version 1 is lost after a rotation": Mistake(CODES, 1, LOST_VERSION_1, rotated_without_key_set),
    "rotate-key when version 1 is lost": Mistake(
        ("biller", "rotate-key", "--state-dir", "state"), 1, LOST_VERSION_1, rotated_without_key_set
    ),
    "run when the household's key set version 1 is lost": Mistake(
        RUN, 2, ("key set version 1 is missing from state",), household_without_key_set
    ),
    "biller init in a household's state directory": Mistake(
        ("biller", "init", "--state-dir", "state"), 2, HOUSEHOLDS, household_state
    ),
    "biller codes in a household's state directory": Mistake(CODES, 2, HOUSEHOLDS, household_state),
    "biller rotate-key in a household's state directory": Mistake(
        ("biller", "rotate-key", "--state-dir", "state"), 2, HOUSEHOLDS, household_state
    ),
    "consumer run in a biller's state directory": Mistake(RUN, 2, BILLERS, biller_state_and_profile),
    "consumer status of a biller's state directory": Mistake(STATUS, 2, BILLERS, biller_state_and_profile),
    "consumer status of a state directory that is a file": Mistake(
        STATUS, 2, ("the state directory state is a file, not a directory",), file_and_profile
    ),
    "biller init with an empty --state-dir": Mistake(("biller", "init", "--state-dir", ""), 2, EMPTY),
    "biller codes with an empty --state-dir": Mistake(("biller", "codes", "--state-dir", ""), 2, EMPTY),
    "consumer run with an empty --state-dir": Mistake(
        ("consumer", "run", "--profile", "p.toml", "--state-dir", "", "--once"),
        2,
        EMPTY,
        profile_with(REAL_PIN),
        absent=("parley-consumer",),
    ),
    "consumer status with an empty --state-dir": Mistake(
        ("consumer", "status", "--profile", "p.toml", "--state-dir", ""), 2, EMPTY, profile_with(REAL_PIN)
    ),
    "approve a request that does not exist": Mistake(
        ("consumer", "approve", "nope", "--state-dir", "state"), 1, ("no approval request 'nope'",), household_state
    ),
    "codes: a QR file in a directory that does not exist": Mistake(
        (*CODES, "--endpoint", "127.0.0.1:7443", "--qr-svg", "missing/qr.svg"),
        2,
        ("argument --qr-svg: cannot write missing/qr.svg: the directory missing does not exist",),
        identity,
    ),
    "codes: an account that does not exist": Mistake(
        ("biller", "codes", "--state-dir", "state", "--account", "nope"),
        2,
        ("no account 'nope'", "acct-1001", "nothing was issued"),
        identity,
    ),
    "codes: a store that does not exist": Mistake(
        (*CODES, "--store", "typo.sqlite"), 2, ("the store typo.sqlite does not exist",), identity, ("typo.sqlite",)
    ),
    **{
        f"codes: the endpoint {endpoint!r}": Mistake(
            (*CODES, "--endpoint", endpoint), 2, (f"--endpoint {endpoint!r} is not HOST:PORT",), identity
        )
        for endpoint in ("nonsense", "host:99999", "a b:1", "127.0.0.1:0", "")
    },
}


@pytest.mark.parametrize("name", STATE_MISTAKES)
def test_a_state_directory_or_codes_mistake_is_one_line_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    mistake = STATE_MISTAKES[name]
    mistake.prepare(tmp_path)
    monkeypatch.chdir(tmp_path)  # an empty --state-dir would be this directory
    before = snapshot(tmp_path)
    status = cli.main(list(mistake.args))
    said = said_once(mistake, status, capsys)
    assert snapshot(tmp_path) == before, said
    for path in mistake.absent:
        assert not (tmp_path / path).exists()


SERVE_STATE_MISTAKES: dict[str, Mistake] = {  # run as processes: a `serve` that is not refused serves until killed
    "biller serve in a household's state directory": Mistake(
        ("biller", "serve", "--state-dir", "state", *SERVE_PLAINTEXT), 2, HOUSEHOLDS, household_state
    ),
    "biller serve with an empty --state-dir": Mistake(
        ("biller", "serve", "--state-dir", "", *SERVE_PLAINTEXT), 2, EMPTY
    ),
}


@pytest.mark.parametrize("name", SERVE_STATE_MISTAKES)
def test_serve_refuses_a_state_directory_that_is_not_a_biller_s(tmp_path: Path, name: str) -> None:
    mistake = SERVE_STATE_MISTAKES[name]
    mistake.prepare(tmp_path)
    before = snapshot(tmp_path)
    result = parley(*mistake.args, cwd=tmp_path, timeout=30)
    said = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == mistake.status, said
    assert len(said) == 1, said
    for phrase in mistake.says:
        assert phrase in said[0], said
    assert snapshot(tmp_path) == before, said
