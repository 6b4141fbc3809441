"""Batch mixing: does a sample's output depend on another sample's input?

Pure torch (no Lightning). :func:`find_batch_mixing` runs a forward pass on inputs that require
gradients and, for a few chosen samples ``i``, takes the vector-Jacobian product of
``output[i].sum()`` with respect to the inputs (``torch.autograd.grad`` with explicit ``inputs=``,
never ``.backward()``, so no ``.grad`` is written). A correct model gives an input gradient that is
exactly zero on every other sample ``j != i``; a non-zero gradient there means the model mixes
samples (a ``view``/``reshape``/``transpose`` across the batch axis, a reduction over dim 0,
attention run over the batch axis, ...). This is the test of Lightning Bolts'
``BatchGradientVerification``, extended to several inputs and outputs, integer token inputs and
per-module localisation.

* **Inputs** may be any nesting of tuples, lists, dicts, namedtuples and dataclasses. Every
  floating tensor whose dimension ``input_dim`` has the batch size (the size of the first tensor
  with that dimension) is replaced by a detached clone that requires grad: the caller's tensors are
  never modified.
* **Integer inputs** (token ids) cannot be differentiated. When ``module`` is given, a forward hook
  on every ``nn.Embedding`` replaces the output of a lookup of such an input (the index tensor
  shares the input's storage, e.g. a slice of it, or has its shape) by a leaf that requires grad,
  and gradients are taken with respect to those outputs. A lookup of anything else (positional
  ids from ``torch.arange``) is left alone.
* **Outputs** may be nested the same way; every floating tensor whose dimension ``output_dim`` has
  the batch size is tested and named by its path (``output``, ``output[1]``, ``output['logits']``).
* **Localisation**: for each mixing output, the first module (in the order modules finish their
  forward) whose output holds an element that depends on both sample ``i`` and sample ``j`` and
  that feeds ``output[i]``. Element dependencies are measured by perturbing the input of sample
  ``i`` (then ``j``) and comparing every module output with the unperturbed run, which needs no
  knowledge of where an intermediate tensor keeps its batch axis. It runs only when mixing is found.

Non-invasive when ``module`` is given: BatchNorm layers (``_BatchNorm``) run in eval mode (their
batch statistics mix samples by design; train-mode BatchNorm is not reported; one without running
statistics normalises with detached statistics of its first input instead), every buffer is
restored afterwards, the global RNG is forked (dropout consumes it), ``torch.compile``d code runs
eagerly (inputs that require grad, eval-mode BatchNorm and the localisation hooks would each
recompile it), and no ``requires_grad`` or ``.grad`` of a parameter is touched. Dropout keeps
the module's mode: it acts per element and cannot mix samples.

Gradients that are NaN are not evidence (``0 * inf`` from a sample that does not feed the output
gives NaN), so they count as zero.

Example:
    >>> import torch
    >>> class Folds(torch.nn.Module):  # folds pairs of samples into one row: mixes 0 with 1
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.mixer = torch.nn.Linear(4, 4)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return self.mixer(x.reshape(-1, 4)).reshape(x.shape)
    >>> model = Folds()
    >>> (m,) = find_batch_mixing(model, torch.randn(4, 2), sample_indices=[0], module=model)
    >>> m.output, m.sample, m.sources, m.module
    ('output', 0, (1,), 'mixer')
    >>> find_batch_mixing(torch.nn.Linear(2, 3), torch.randn(4, 2), sample_indices=[0, 3])
    []
"""

from __future__ import annotations

from grad_callbacks.core.batch_mixing.call import ModelCall
from grad_callbacks.core.batch_mixing.find import find_batch_mixing
from grad_callbacks.core.batch_mixing.forward import isolated
from grad_callbacks.core.batch_mixing.leaves import batch_size_of, default_sample_indices
from grad_callbacks.core.batch_mixing.result import CannotCheckMixing, Mixing

__all__ = [
    "CannotCheckMixing",
    "Mixing",
    "ModelCall",
    "batch_size_of",
    "default_sample_indices",
    "find_batch_mixing",
    "isolated",
]
