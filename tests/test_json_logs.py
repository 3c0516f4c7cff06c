"""A JSON log stream stays JSON lines (issue 18): gRPC's C core writes its own text lines to stderr.

The real `parley biller serve --log-format json` is started and made to meet what gRPC's core reports on
its own (a plaintext client at a TLS port: "I… ssl_transport_security.cc] Handshake failed…"; a busy port:
"E… add_port.cc] Failed to add port…"); every line of its stderr must parse as JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.cli import main as parley_main
from agent.logs import configure_logging, quiet_grpc_core
from agent.tools.certs import SERVER_CHAIN_FILE, SERVER_KEY_FILE
from reference_biller import preflight
from reference_biller.config import SAMPLE
from reference_biller.settings import CONFIG_ENV, OPTIONS
from tests.helpers.process import serving_process

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def clean_environment() -> dict[str, str]:
    """This process's environment without the variables that make gRPC's core speak on purpose."""
    return {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE", "PARLEY_LOG_FORMAT")}


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of `text` as JSON; fails naming the first line that is not."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a line of the JSON log stream is not JSON: {line!r}")
    return records


@contextmanager
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def knock(port: int, data: bytes) -> None:
    """Open a connection to 127.0.0.1:port, send `data`, and hang up after a moment."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(data)
        connection.settimeout(1.0)
        with contextlib.suppress(OSError):  # a timeout, or the server hanging up: either is what we came for
            connection.recv(64)


@pytest.mark.slow
def test_failed_tls_handshakes_keep_the_json_log_stream_json(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert parley_main(["certs", "--out", str(certs), "--ip", "127.0.0.1"]) == 0
    arguments = ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"), "--log-format", "json"]
    arguments += ["--tls-cert", str(certs / SERVER_CHAIN_FILE), "--tls-key", str(certs / SERVER_KEY_FILE)]
    log = tmp_path / "stderr.log"
    with serving_process(arguments, log=log, env=clean_environment()) as (process, printed):
        port = int(printed["listening"].split()[0].rpartition(":")[2])
        knock(port, HTTP2_PREFACE + bytes(30))  # a plaintext gRPC client at a TLS port
        knock(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a browser
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    records = json_lines(log.read_text(encoding="utf-8"))
    assert any(record.get("step") == "stopped" for record in records), records[-3:]


@pytest.mark.slow
def test_a_busy_port_with_json_logs_from_the_config_file_keeps_the_stream_json(tmp_path: Path) -> None:
    config = tmp_path / "biller.toml"
    config.write_text(SAMPLE.read_text(encoding="utf-8") + '\n[server]\nlog_format = "json"\n', encoding="utf-8")
    with busy_port() as port:
        serve = [sys.executable, "-m", "agent.cli", "biller", "serve", "--config", str(config), "--insecure"]
        serve += ["--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}"]
        failed = subprocess.run(serve, capture_output=True, text=True, timeout=60, env=clean_environment(), check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in failed.stdout
    assert json_lines(failed.stderr)


@pytest.mark.parametrize(
    ("arguments", "environ", "expected"),
    [
        (["biller", "serve", "--log-format", "json"], {}, True),
        (["biller", "serve", "--log-format=JSON"], {}, True),
        (["biller", "serve", "--log-f", "json"], {}, True),  # argparse accepts the abbreviation
        (["biller", "serve", "--log-format", "text"], {"PARLEY_LOG_FORMAT": "json"}, False),  # the flag wins
        (["biller", "serve"], {"PARLEY_LOG_FORMAT": "json"}, True),
        (["biller", "serve", "--log-level", "json"], {}, False),
        (["biller", "backoffice", "--log-format", "json"], {}, True),
        (["biller", "backoffice"], {"PARLEY_LOG_FORMAT": "json"}, False),  # the back office has the flag only
        (["conformance", "biller", "--log-format", "json"], {}, False),
        (["biller", "serve", "--config", "absent.toml"], {}, False),
    ],
)
def test_the_json_decision_is_read_from_the_raw_arguments(
    arguments: list[str], environ: dict[str, str], expected: bool
) -> None:
    assert preflight.logs_json(arguments, environ) is expected


def test_the_json_decision_reads_the_config_file_named_by_flag_or_variable(tmp_path: Path) -> None:
    json_config, text_config, broken = tmp_path / "json.toml", tmp_path / "text.toml", tmp_path / "broken.toml"
    json_config.write_text('[server]\nlog_format = "json"\n', encoding="utf-8")
    text_config.write_text('[server]\nlog_format = "text"\n', encoding="utf-8")
    broken.write_bytes(b"[server\n\xff")
    assert preflight.logs_json(["biller", "serve", "--config", str(json_config)], {})
    assert preflight.logs_json(["biller", "serve"], {"PARLEY_CONFIG": str(json_config)})
    flag_wins = ["biller", "serve", "--config", str(text_config)]
    assert not preflight.logs_json(flag_wins, {"PARLEY_CONFIG": str(json_config)})
    assert not preflight.logs_json(["biller", "serve", "--config", str(broken)], {})
    option = OPTIONS["log_format"]  # the names preflight reads are the ones serve resolves
    assert (option.flag, option.env, option.key, CONFIG_ENV) == (
        preflight.LOG_FORMAT_FLAG,
        preflight.LOG_FORMAT_ENV,
        f"server.{preflight.LOG_FORMAT_KEY}",
        preflight.CONFIG_ENV,
    )


def test_gRPC_core_is_quieted_only_when_the_user_did_not_ask_for_its_lines() -> None:
    assert "grpc" in sys.modules  # imported by this test module: too late to quiet anything here
    environ: dict[str, str] = {}
    assert not quiet_grpc_core(environ)
    assert environ == {}
    saved = sys.modules.pop("grpc")
    try:
        assert quiet_grpc_core(environ)
        assert environ == {"GRPC_VERBOSITY": "NONE"}
        for chosen in ({"GRPC_VERBOSITY": "ERROR"}, {"GRPC_TRACE": "http"}):
            assert not quiet_grpc_core(chosen)
            assert len(chosen) == 1
    finally:
        sys.modules["grpc"] = saved


def test_json_logs_say_when_the_user_lets_gRPC_core_write_text(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        monkeypatch.setenv("GRPC_TRACE", "http")
        configure_logging("json", stream=stream)
        monkeypatch.delenv("GRPC_TRACE")
        monkeypatch.setenv("GRPC_VERBOSITY", "NONE")
        configure_logging("json", stream=stream)  # quiet: nothing to say
        logging.getLogger("test").warning("a plain record")
        configure_logging("text", stream=io.StringIO())
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
    records = json_lines(stream.getvalue())
    assert [record["logger"] for record in records] == ["parley.logs", "test"]
    assert "GRPC_TRACE=http is set" in str(records[0]["message"])
