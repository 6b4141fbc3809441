"""Lightning's own tests, run plainly and with ``GradientAudit`` in every Trainer, compared.

Usage:
    LIGHTNING_TESTS_DIR=/path/to/lightning/tests \\
        python benchmarks/lightning_peer_suite.py [TEST_PATH ...] [-k EXPR] [--out DIR]

Lightning's tests describe what users do with a ``Trainer``; the audit promises to be invisible
there. ``LIGHTNING_TESTS_DIR`` is the ``tests/`` directory of a Lightning source tree at the
installed version's tag (it holds ``tests_pytorch/``); the tests are not in Lightning's wheel::

    git clone https://github.com/Lightning-AI/pytorch-lightning lt
    git -C lt archive 2.6.5 tests/tests_pytorch | tar -x -C /tmp/lightning
    export LIGHTNING_TESTS_DIR=/tmp/lightning/tests

Without the variable the script says so and exits 0 (CI stays offline). TEST_PATHs are relative
to ``tests_pytorch/`` (default: :data:`DEFAULT_SUBSET`). The suite runs twice in subprocesses:
plainly, and with this file loaded as a pytest plugin (``-p lightning_peer_suite``) that
appends ``GradientAudit(on_finding="log")`` to the callbacks of every ``Trainer`` built. Every
test whose outcome differs is listed, each classified:

* ``audit present``: the test only shows that a callback was added: it asserts the exact
  callback list, or mocks a logger or a timer and counts its calls (:data:`KNOWN`);
* ``unexplained``: anything else: a bug to fix (the audit crashed, changed the run, or made a
  call the user can observe).

The audited run also lists the tests where the audit reported a warning or an error, and those
where a check failed inside its own code (``check-skipped`` "... failed: ..."). Exit status 1
when an unexplained difference remains. Results are written to ``--out`` (JSON and the two
JUnit XML files).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENV = "LIGHTNING_TESTS_DIR"
#: Test paths (under tests_pytorch/) run when none are given.
DEFAULT_SUBSET = (
    "trainer/test_trainer.py",
    "callbacks",
    "loops",
    "models/test_hooks.py",
    "checkpointing",
)
#: Failure texts that only show that a callback was added, by reason.
KNOWN: dict[str, tuple[str, ...]] = {
    "asserts the exact callback list": (
        r"GradientAudit",  # the audit object appears in an assertion's operands
        r"len\(trainer\.callbacks\)",
        r"trainer\.callbacks\b.*==",
    ),
    "mocks a logger and counts its calls": (
        r"log_metrics",
        r"Expected '[\w.]*' to (have been|be) called",
        r"call_count",
        r"assert_called(_once)?(_with)?",
        r"mock_calls",
    ),
    "mocks a timer and counts its calls": (r"perf_counter", r"time\.monotonic", r"StopIteration"),
}
# Where the plugin writes what the audit reported per test (set by the runner).
_FINDINGS_ENV = "GRAD_AUDIT_PEER_FINDINGS"


# ---------------------------------------------------------------------------- plugin
_audits: list[Any] = []


def pytest_configure(config: Any) -> None:
    """Append ``GradientAudit(on_finding="log")`` to the callbacks of every Trainer built."""
    import lightning.pytorch as pl

    from grad_callbacks import GradientAudit

    original = pl.Trainer.__init__
    if getattr(original, "__grad_audit_peer__", False):
        return

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        callbacks = kwargs.get("callbacks")
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, list):
            callbacks = [callbacks]
        audit = GradientAudit(on_finding="log")
        _audits.append(audit)
        kwargs["callbacks"] = [*callbacks, audit]
        original(self, *args, **kwargs)

    init.__grad_audit_peer__ = True  # type: ignore[attr-defined]
    pl.Trainer.__init__ = init  # type: ignore[method-assign]


def pytest_runtest_logreport(report: Any) -> None:
    """Record, per test, what the audits built in it reported (warnings, errors, own crashes)."""
    path = os.environ.get(_FINDINGS_ENV)
    if report.when != "teardown" or not path:
        return
    alarms, crashes = set(), []
    for audit in _audits:
        for f in audit.findings:
            if f.severity != "info":
                alarms.add(f.code)
            elif f.code == "check-skipped" and " failed: " in f.message:
                crashes.append(f.message)
    with open(path, "a") as out:
        out.write(
            json.dumps(
                {"test": report.nodeid, "trainers": len(_audits), "alarms": sorted(alarms),
                 "crashes": crashes}
            )
            + "\n"
        )
    _audits.clear()


# ---------------------------------------------------------------------------- runner
def classify(message: str) -> str:
    """Why a test that passes plainly fails with the audit: a :data:`KNOWN` reason, or
    ``"unexplained"``.

    Example:
        >>> classify("AssertionError: assert [ModelCheckpoint, GradientAudit] == [ModelCheckpoint]")
        'asserts the exact callback list'
        >>> classify("RuntimeError: element 0 of tensors does not require grad")
        'unexplained'
    """
    for reason, patterns in KNOWN.items():
        if any(re.search(p, message) for p in patterns):
            return reason
    return "unexplained"


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Test id -> (outcome, failure text) from a pytest JUnit XML file."""
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, text = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "failed" if tag == "failure" else tag
                text = f"{node.get('message', '')}\n{node.text or ''}"
                break
        if name in results and results[name][0] != "passed":
            continue  # an error at teardown after a pass: keep the first problem
        results[name] = (outcome, text)
    return results


def compare(
    plain: dict[str, tuple[str, str]], audited: dict[str, tuple[str, str]]
) -> list[dict[str, str]]:
    """Every test whose outcome differs between the runs, with its classification."""
    rows = []
    for test in sorted(set(plain) | set(audited)):
        before, _ = plain.get(test, ("missing", ""))
        after, text = audited.get(test, ("missing", ""))
        if before == after:
            continue
        reason = classify(text) if before == "passed" else "passes only with the audit"
        first = next((line for line in text.splitlines() if line.strip()), "")
        rows.append(
            {"test": test, "plain": before, "audited": after, "reason": reason,
             "message": first[:300]}
        )
    return rows


def _pytest(tests_dir: Path, paths: Iterable[str], junit: Path, extra: list[str],
            env: dict[str, str]) -> int:
    # A module that cannot be imported here (test_legacy_checkpoints.py reads files outside
    # tests_pytorch/) fails alike in both runs; it must not stop the others.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}", *extra,
               *[f"tests_pytorch/{p}" for p in paths]]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=tests_dir, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_SUBSET))
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--out", default=None, help="directory for the results")
    args = parser.parse_args(argv)

    tests_dir = os.environ.get(ENV)
    if not tests_dir:
        print(f"{ENV} is not set: no Lightning tests to run (see the module docstring). Skipped.")
        return 0
    root = Path(tests_dir)
    if (root / "tests_pytorch").is_dir():
        pass
    elif root.name == "tests_pytorch":
        root = root.parent
    else:
        print(f"{ENV}={tests_dir} holds no tests_pytorch/ directory", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="peer_suite_"))
    out.mkdir(parents=True, exist_ok=True)
    extra = ["-k", args.keyword] if args.keyword else []

    here = str(Path(__file__).resolve().parent)
    package = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package, here, env.get("PYTHONPATH", "")])
    findings_file = out / "audit_findings.jsonl"
    findings_file.unlink(missing_ok=True)

    _pytest(root, args.paths, out / "plain.xml", extra, env)
    audited_env = {**env, _FINDINGS_ENV: str(findings_file)}
    _pytest(root, args.paths, out / "audited.xml", [*extra, "-p", "lightning_peer_suite"],
            audited_env)

    plain, audited = outcomes(out / "plain.xml"), outcomes(out / "audited.xml")
    rows = compare(plain, audited)
    per_test = [json.loads(line) for line in findings_file.read_text().splitlines()] \
        if findings_file.exists() else []
    trainers = sum(r["trainers"] for r in per_test)
    alarms = [r for r in per_test if r["alarms"]]
    crashes = [r for r in per_test if r["crashes"]]
    passed = sum(1 for o, _ in plain.values() if o == "passed")
    print(f"\n{len(plain)} tests; {passed} pass plainly; audit attached to {trainers} Trainers")
    for reason in [*KNOWN, "passes only with the audit", "unexplained"]:
        mine = [r for r in rows if r["reason"] == reason]
        if mine:
            print(f"\n{reason} ({len(mine)}):")
            for r in mine:
                print(f"  {r['test']}: {r['plain']} -> {r['audited']}: {r['message']}")
    if alarms:
        print(f"\naudit warnings/errors in {len(alarms)} tests (check each is right):")
        for r in alarms:
            print(f"  {r['test']}: {', '.join(r['alarms'])}")
    if crashes:
        print(f"\na check failed in its own code in {len(crashes)} tests (bugs):")
        for r in crashes:
            print(f"  {r['test']}: {r['crashes'][0][:200]}")
    (out / "differences.json").write_text(
        json.dumps({"differences": rows, "audit": per_test}, indent=2)
    )
    print(f"\nresults in {out}")
    return 1 if any(r["reason"] == "unexplained" for r in rows) or crashes else 0


if __name__ == "__main__":
    sys.exit(main())
