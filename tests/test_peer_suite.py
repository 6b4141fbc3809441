"""benchmarks/lightning_peer_suite.py: offline without Lightning's tests, the comparison, and
(slow, with LIGHTNING_TESTS_DIR set) a real run on a few of Lightning's tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lightning_peer_suite.py"


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("lightning_peer_suite", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_the_tests_dir_it_says_so_and_exits_0() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_TESTS_DIR"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0
    assert "LIGHTNING_TESTS_DIR is not set" in proc.stdout


def test_differences_are_listed_and_classified(tmp_path: Path) -> None:
    peer = _module()

    def junit(name: str, cases: str) -> Path:
        path = tmp_path / name
        path.write_text(f'<testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
        return path

    plain = junit(
        "plain.xml",
        '<testcase classname="a" name="t_list"/><testcase classname="a" name="t_mock"/>'
        '<testcase classname="a" name="t_bug"/><testcase classname="a" name="t_same"/>'
        '<testcase classname="a" name="t_fixed"><failure message="boom"/></testcase>',
    )
    audited = junit(
        "audited.xml",
        '<testcase classname="a" name="t_list"><failure message="assert [ModelCheckpoint, '
        'GradientAudit] == [ModelCheckpoint]"/></testcase>'
        '<testcase classname="a" name="t_mock"><failure message="AssertionError: Expected '
        "'log_metrics' to have been called once. Called 3 times.\"/></testcase>"
        '<testcase classname="a" name="t_bug"><failure message="assert 11 == 10"/></testcase>'
        '<testcase classname="a" name="t_same"/><testcase classname="a" name="t_fixed"/>',
    )
    rows = peer.compare(peer.outcomes(plain), peer.outcomes(audited))
    reasons = {r["test"]: r["reason"] for r in rows}
    assert reasons == {
        "a::t_list": "asserts the exact callback list",
        "a::t_mock": "mocks a logger and counts its calls",
        "a::t_bug": "unexplained",
        "a::t_fixed": "passes only with the audit",
    }


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LIGHTNING_TESTS_DIR"), reason="needs Lightning's tests")
def test_pickle_tests_of_lightning_pass_with_the_audit(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "trainer/test_trainer.py", "-k", "pickle", "--out",
         str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "audit attached to" in proc.stdout
