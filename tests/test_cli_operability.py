"""The operator's side of the CLI: --help everywhere, --json, serve options from flags, PARLEY_* variables and
the config file, configuration errors that name the key, and `parley biller serve` as a process (docs/OPERATIONS.md)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import tracing
from agent.cli import build_parser
from agent.cli import main as parley_main
from reference_biller.config import SAMPLE, ConfigError, ServerSettings, load_config
from reference_biller.settings import (
    OPTIONS,
    SettingsError,
    check_server_table,
    resolve_serve,
    resolve_state_dir,
)
from tests.helpers.process import lines_of

# --- --help on every command -------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of the parser tree: (), ("demo",), ("biller",), ("biller", "serve")…"""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _commands(subparser, (*path, name))


def test_help_works_on_every_command_and_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    paths = list(_commands(build_parser()))
    assert {("biller", "serve"), ("biller", "codes"), ("biller", "check-config"), ("consumer", "run")} <= set(paths)
    for path in paths:
        assert parley_main([*path, "--help"]) == 0, path
        shown = capsys.readouterr().out
        assert shown.startswith("usage: parley"), path
    serve_help = (parley_main(["biller", "serve", "--help"]), capsys.readouterr().out)[1]
    for option in OPTIONS.values():
        assert option.flag in serve_help
        assert option.env in serve_help


# --- Serve options: flag > environment > config file > default ---------------------------------------------


def test_serve_options_take_the_flag_then_the_variable_then_the_file_then_the_default() -> None:
    file = ServerSettings(listen="127.0.0.1:7000", state_dir="from-file", log_format="json", shutdown_grace_seconds=3)
    env = {"PARLEY_LISTEN": "127.0.0.1:7001", "PARLEY_LOG_FORMAT": "text", "PARLEY_METRICS_LISTEN": ""}
    flags: dict[str, object] = {"listen": "127.0.0.1:7002", "state_dir": None, "otel": False}
    settings = resolve_serve(flags, file, env)
    assert settings.listen == "127.0.0.1:7002"
    assert settings.log_format == "text"  # the variable beats the file
    assert settings.state_dir == Path("from-file")
    assert settings.shutdown_grace == 3.0
    assert settings.metrics_listen is None  # an empty variable is unset; nothing else sets it
    assert (settings.log_level, settings.otel, settings.tls_cert) == ("info", False, None)  # defaults
    assert settings.sources["listen"] == "--listen"
    assert settings.sources["log_format"] == "PARLEY_LOG_FORMAT"
    assert settings.sources["state_dir"] == "server.state_dir"
    assert settings.sources["log_level"] == "default"
    defaults = resolve_serve({"listen": "127.0.0.1:0"}, ServerSettings(), {})
    assert (defaults.state_dir, defaults.shutdown_grace, defaults.log_format) == (Path("parley-biller"), 10.0, "text")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PARLEY_SHUTDOWN_GRACE": "soon"}, "PARLEY_SHUTDOWN_GRACE: expected a number of seconds"),
        ({"PARLEY_SHUTDOWN_GRACE": "-1"}, "PARLEY_SHUTDOWN_GRACE: expected a number of seconds"),
        ({"PARLEY_LOG_FORMAT": "xml"}, "PARLEY_LOG_FORMAT: expected one of json, text, got 'xml'"),
        ({"PARLEY_METRICS_LISTEN": "9464"}, "PARLEY_METRICS_LISTEN: expected HOST:PORT, got '9464'"),
        ({"PARLEY_OTEL": "maybe"}, "PARLEY_OTEL: expected 1/0"),
        ({"PARLEY_TLS_CERT": "cert.pem"}, "PARLEY_TLS_CERT: the TLS certificate and key go together"),
        ({}, "no listen address: give --listen HOST:PORT, set PARLEY_LISTEN"),
    ],
)
def test_a_bad_serve_option_names_where_it_came_from(env: dict[str, str], message: str) -> None:
    flags = {} if not env else {"listen": "127.0.0.1:0"}
    with pytest.raises(SettingsError) as error:
        resolve_serve(flags, ServerSettings(), env)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (ServerSettings(tls_cert="cert.pem"), "server.tls_cert: the TLS certificate and key go together"),
        (ServerSettings(tls_key="key.pem"), "server.tls_key: the TLS certificate and key go together"),
        (ServerSettings(tls_client_ca="ca.pem"), "server.tls_client_ca: mutual TLS needs the TLS certificate and key"),
    ],
)
def test_the_server_table_alone_is_checked_as_serve_checks_it(server: ServerSettings, message: str) -> None:
    """`check_server_table`, for check-config: the [server] table refused with the words `serve` uses when no
    flag or variable completes it (one rule, `resolve_serve`'s)."""
    with pytest.raises(SettingsError) as alone:
        check_server_table(server)
    assert message in str(alone.value)
    with pytest.raises(SettingsError) as served:
        resolve_serve({"listen": "127.0.0.1:0"}, server, {})
    assert str(served.value) == str(alone.value)
    check_server_table(ServerSettings(tls_cert="cert.pem", tls_key="key.pem", tls_client_ca="ca.pem"))
    check_server_table(ServerSettings())


def test_serve_reports_a_bad_variable_and_exits_2_before_creating_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("PARLEY_STATE_DIR", str(state))
    monkeypatch.setenv("PARLEY_SHUTDOWN_GRACE", "soon")
    assert parley_main(["biller", "serve", "--insecure", "--listen", "127.0.0.1:0"]) == 2
    assert "PARLEY_SHUTDOWN_GRACE" in capsys.readouterr().out
    monkeypatch.delenv("PARLEY_SHUTDOWN_GRACE")
    monkeypatch.setitem(sys.modules, tracing.OTEL_MODULE, None)  # the otel extra is not installed
    assert parley_main(["biller", "serve", "--insecure", "--listen", "127.0.0.1:0", "--otel"]) == 2
    assert 'pip install "parley[otel]"' in capsys.readouterr().out
    assert not state.exists()


# --- Configuration errors name the key and the problem ----------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("party_id = ", "partyid = "), "biller.party_id: missing"),
        (('name = "Example Energy"', 'name = "Example Energy"\nnmae = 1'), "biller.nmae: unknown key"),
        (('currency = "EUR"', 'currency = "EURO"'), "biller.currency: 'EURO' is not an ISO 4217 currency"),
        (("deferral_max_days = 30", 'deferral_max_days = "30"'), "segments.standard.deferral_max_days: expected int"),
        (
            ('deferral_fee = "5.00"', 'deferral_fee = "5.001"'),
            "deferral_fee: '5.001' is not an amount in EUR (has more than 2 decimals",
        ),
        (("grace_days = 3 ", "grace_days = -3 "), "reminders.grace_days: expected a whole number of days from 0 to"),
        (("\n[payments]", '\n[server]\nlisten = "7443"\n\n[payments]'), "server.listen: expected HOST:PORT"),
        (("\n[payments]", '\n[server]\nlog_format = "xml"\n\n[payments]'), "server.log_format: expected one of"),
        (("\n[payments]", "\n[server]\nshutdown_grace_seconds = -2\n\n[payments]"), "server.shutdown_grace_seconds"),
        (("\n[payments]", '\n[server]\nlisen = "127.0.0.1:1"\n\n[payments]'), "server.lisen: unknown key"),
        (("[biller]", "[biller\n"), "not valid TOML"),
    ],
)
def test_check_config_names_the_key_and_the_problem(
    tmp_path: Path, edit: tuple[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = SAMPLE.read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    assert message in str(error.value)
    assert parley_main(["biller", "check-config", str(bad)]) == 1
    assert message in capsys.readouterr().out


def test_a_server_table_sets_serve_options_and_check_config_accepts_it(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    server = '[server]\nlisten = "127.0.0.1:7443"\nmetrics_listen = "[::1]:9464"\nshutdown_grace_seconds = 2.5\n'
    good.write_text(SAMPLE.read_text() + "\n" + server)
    config = load_config(good)
    assert config.server == ServerSettings(
        listen="127.0.0.1:7443", metrics_listen="[::1]:9464", shutdown_grace_seconds=2.5
    )
    assert parley_main(["biller", "check-config", str(good)]) == 0
    assert resolve_state_dir(None, ServerSettings(state_dir="s"), {"PARLEY_STATE_DIR": "e"}) == Path("e")
    with pytest.raises(SettingsError, match="no state directory"):
        resolve_state_dir(None, ServerSettings(), {})


# --- --json where a person might script it -----------------------------------------------------------------


def test_biller_codes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_STATE_DIR", str(tmp_path / "state"))  # the state directory from the environment
    assert parley_main(["biller", "init"]) == 0  # codes never makes an identity: serve or init does
    capsys.readouterr()
    assert parley_main(["biller", "codes", "--json", "--endpoint", "biller.example:7443"]) == 0
    document = json.loads(capsys.readouterr().out)
    config = load_config(SAMPLE)
    assert document["biller"] == config.party_id
    assert len(bytes.fromhex(document["fingerprint"])) == 32
    assert [a["account_id"] for a in document["accounts"]] == [a.account_id for a in config.accounts]
    assert all(len(a["code"]) == 14 and a["enrolment_uri"].startswith("parley:enrol?") for a in document["accounts"])


# --- parley biller serve as a process: environment, health, metrics, JSON logs, SIGTERM ----------------------


def _health(channel: grpc.Channel) -> int:
    stub: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health's stubs type no methods on HealthStub
    return int(stub.Check(health_pb2.HealthCheckRequest(service="parley.v1.BillerService"), timeout=5).status)


@pytest.mark.slow
def test_serve_takes_its_options_from_the_environment_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {
        **os.environ,
        "PARLEY_LISTEN": "127.0.0.1:0",
        "PARLEY_STATE_DIR": str(state),
        "PARLEY_METRICS_LISTEN": "127.0.0.1:0",
        "PARLEY_LOG_FORMAT": "json",
        "PARLEY_SHUTDOWN_GRACE": "5",
    }
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "biller", "serve", "--insecure"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    try:
        lines, printed = lines_of(process.stdout), {}
        while "listening" not in printed:
            name, _, value = lines.get(timeout=30).partition(" ")
            printed[name] = value.strip()
        assert printed["state"] == str(state)
        port = int(printed["listening"].split()[0].rpartition(":")[2])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            deadline = time.monotonic() + 20
            while _health(channel) != health_pb2.HealthCheckResponse.SERVING:  # after the first upkeep round
                assert time.monotonic() < deadline, "never SERVING"
                time.sleep(0.1)
        with urllib.request.urlopen(printed["metrics"], timeout=5) as response:
            metrics = response.read().decode()
        check = 'grpc_method="Check",grpc_service="grpc.health.v1.Health"'
        assert f'parley_grpc_server_handled_total{{grpc_code="OK",{check}}}' in metrics
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    logged = [json.loads(line) for line in stderr_path.read_text().splitlines()]  # every line is JSON
    steps = [entry.get("step") for entry in logged]
    assert "stopping" in steps
    assert "stopped" in steps
    assert next(e for e in logged if e.get("step") == "stopping")["grace_seconds"] == 5.0
    wal = state / "biller.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
