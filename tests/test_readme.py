"""The README's embedding example is a real program: run it as users would copy it."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

from agent import vectors

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_embedding_example_runs_both_agents_to_an_agreement_and_a_payment(tmp_path: Path) -> None:
    [example] = [block for block in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "BillerAgent(" in block]
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "agreed ['EUR 40.00', 'EUR 40.00', 'EUR 40.00']" in result.stdout
    assert result.stdout.count("paying EUR 40.00 to Example Energy") == 1


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def run_block(block: str, directory: Path) -> subprocess.CompletedProcess[str]:
    script = directory / "snippet.py"
    script.write_text(block, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script)], cwd=directory, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_sans_io_snippet_reaches_an_agreement(tmp_path: Path) -> None:
    [block] = [block for block in python_blocks() if "Negotiation(" in block]
    result = run_block(block, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "agreed ['EUR 40.00', 'EUR 40.00', 'EUR 40.00']" in result.stdout


def test_the_offline_verification_snippet_reads_a_real_bundle(tmp_path: Path) -> None:
    """The snippet reads `agreement.json`: a valid bundle from the shipped vectors, then a tampered one."""
    [block] = [block for block in python_blocks() if "verify_bundle(" in block]
    document = vectors.load()
    bundle = next(case for case in document["tests"] if case["kind"] == "bundle" and case["expected"] == "valid")
    (tmp_path / "agreement.json").write_text(json.dumps(bundle["bundle"]), encoding="utf-8")
    valid = run_block(block, tmp_path)
    assert valid.returncode == 0, valid.stderr
    assert "invalid" not in valid.stdout
    assert "EUR" in valid.stdout
    tampered = copy.deepcopy(bundle["bundle"])
    tampered["thread"][-1]["signatures"][0]["sig"] = tampered["thread"][0]["signatures"][0]["sig"]
    (tmp_path / "agreement.json").write_text(json.dumps(tampered), encoding="utf-8")
    invalid = run_block(block, tmp_path)
    assert invalid.returncode == 0, invalid.stderr
    assert invalid.stdout.startswith("invalid:")


def test_every_python_block_is_run_by_a_test() -> None:
    """A new Python snippet in the README needs a test above that runs it."""
    markers = ("BillerAgent(", "Negotiation(", "verify_bundle(")
    assert all(any(marker in block for marker in markers) for block in python_blocks())


def test_every_test_the_docs_cite_exists() -> None:
    """docs/*.md and README.md cite tests as `tests/test_x.py::test_y`: each must still be defined there."""
    root = Path(__file__).resolve().parent.parent
    cited = {
        (match.group(1), match.group(2))
        for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
        for match in re.finditer(r"(tests/test_\w+\.py)::(test_\w+)", doc.read_text(encoding="utf-8"))
    }
    assert cited, "no citations found: the pattern no longer matches the docs"
    missing = sorted(
        f"{path}::{name}" for path, name in cited if f"def {name}(" not in (root / path).read_text(encoding="utf-8")
    )
    assert missing == []
