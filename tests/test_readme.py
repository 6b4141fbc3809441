"""The README's two set-up commands exist, and CI runs the test command it gives."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_COMMAND = "pip install torch==2.13.0 -e . && grad-audit demo"
TEST_COMMAND = 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q'


def test_readme_gives_the_install_and_demo_command() -> None:
    assert DEMO_COMMAND in (ROOT / "README.md").read_text()


def test_readme_gives_the_test_command_and_ci_runs_it() -> None:
    assert TEST_COMMAND in (ROOT / "README.md").read_text()
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()


def test_every_finding_code_is_in_the_findings_reference_and_the_readme() -> None:
    from grad_callbacks.findings import CODES

    reference = (ROOT / "docs" / "findings.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for code in CODES:
        assert f"## `{code}`" in reference or f"## {code}" in reference, code
        assert f"docs/findings.md#{code}" in readme, code
