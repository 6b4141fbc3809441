"""``strategy="ddp_spawn"`` on 2 CPU processes, rank 1 forgetting zero_grad; run as a script.

Usage: python tests/distributed/ddp_spawn_run.py OUT_DIR [broken|clean]
The spawn launcher pickles the trainer with its callbacks to start the processes. Rank 0 writes
the report to OUT_DIR; the launching process writes what its own ``GradientAudit`` holds after
fit to OUT_DIR/launcher.json (the findings, carried back from the spawned rank 0).
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))

from grad_callbacks import GradientAudit
from tests import zoo
from tests.distributed.ddp import ddp_trainer
from tests.distributed.ddp_zero_grad_run import ForgetsZeroGradOnRank1

warnings.filterwarnings("ignore")


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    audit = GradientAudit(on_finding="log")
    trainer = ddp_trainer(out, [audit], strategy="ddp_spawn", accumulate_grad_batches=2)
    trainer.fit(ForgetsZeroGradOnRank1(broken=mode == "broken"), zoo.regression_data(n=32))
    seen = {
        "findings": [f.to_dict() for f in audit.findings],
        "steps_checked": {c.check_name: c.steps_checked for c in audit.checks},
        "report_path": audit.report_path,
    }
    with open(f"{out}/launcher.json", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
