"""A 2-process CPU DDP run (gloo) with BatchMixingCheck; run as a script.

Usage: python tests/distributed/ddp_mixing_run.py OUT_DIR [mixing|clean]
``mixing`` trains a model whose forward takes a mean over the batch axis (every rank sees the
mixing in its own batch); ``clean`` a model with train-mode BatchNorm and dropout. Rank 0 writes
the report to OUT_DIR (the run's default_root_dir); every rank writes
``warnings_rank{R}.json``: the audit warnings it raised.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from grad_callbacks.callbacks.batch_mixing import BatchMixingCheck
from grad_callbacks.sinks.warnings import GradientAuditWarning
from tests import zoo, zoo_mixing
from tests.distributed.ddp import close_process_group, ddp_trainer

warnings.filterwarnings("ignore")


def main(out: str, mode: str) -> None:
    torch.manual_seed(0)
    module = zoo_mixing.MeanOverDim0() if mode == "mixing" else zoo_mixing.BatchNormNet()
    trainer = ddp_trainer(out, [BatchMixingCheck(every_n_steps=2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradientAuditWarning)
        trainer.fit(module, zoo.regression_data(n=32))
    audit = [str(w.message) for w in caught if issubclass(w.category, GradientAuditWarning)]
    Path(out, f"warnings_rank{trainer.global_rank}.json").write_text(json.dumps(audit))
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
