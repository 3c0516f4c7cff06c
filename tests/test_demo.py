"""`parley demo` runs end to end and leaves a bundle that `parley verify` accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_writes_a_verifiable_agreement(tmp_path: Path) -> None:
    demo = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "PIN_MISMATCH" in demo.stdout  # the phishing bill is refused
    [bundle] = tmp_path.glob("agreement-*.json")
    verify = subprocess.run(
        [sys.executable, "-m", "agent.cli", "verify", "--json", str(bundle)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert '"verdict": "valid"' in verify.stdout
