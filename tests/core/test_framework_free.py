"""The core is plain torch: no module under grad_callbacks/core (sub-packages included) imports
Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "grad_callbacks" / "core"


def test_no_core_module_imports_lightning() -> None:
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(CORE)}: {n}"
                for n in names
                if n.split(".")[0] in ("lightning", "pytorch_lightning")
                or n.startswith("grad_callbacks.callbacks")
            ]
    assert offenders == []
