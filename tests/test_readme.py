"""The README's embedding example is a real program: run it as users would copy it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_embedding_example_runs_both_agents_to_an_agreement_and_a_payment(tmp_path: Path) -> None:
    [example] = [block for block in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "BillerAgent(" in block]
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "agreed ['EUR 40.00', 'EUR 40.00', 'EUR 40.00']" in result.stdout
    assert result.stdout.count("paying EUR 40.00 to Example Energy") == 1


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
