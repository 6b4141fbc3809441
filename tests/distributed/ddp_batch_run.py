"""Several 2-process CPU DDP runs in one launch; run as a script.

Usage: python tests/distributed/ddp_batch_run.py OUT_DIR SCRIPT:MODE [SCRIPT:MODE ...]
Runs ``tests/distributed/SCRIPT.py``'s ``main(OUT_DIR/SCRIPT/MODE, MODE)`` for each pair, in
order, in this process and in the rank-1 process Lightning's launcher starts at the first fit
(it re-runs this script with the same arguments). Most of a DDP test's time is starting two
Python processes and importing torch and Lightning; the runs themselves take about a second.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(out: str, scenarios: list[str]) -> None:
    for scenario in scenarios:
        script, mode = scenario.split(":", 1)
        run_dir = Path(out, script, mode)
        run_dir.mkdir(parents=True, exist_ok=True)
        importlib.import_module(f"tests.distributed.{script}").main(str(run_dir), mode)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
