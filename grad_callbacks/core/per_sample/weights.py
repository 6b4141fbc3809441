"""Per-sample weights of a batch loss, and the weighted fit ``batch ~ sum_i w_i g_i``.

Pure torch. ``g_i`` is the gradient of the loss of sample ``i`` alone (the same loss on a batch
of one), ``G`` the gradient of the loss of the batch. Under each common reduction the batch
gradient is a weighted sum of the per-sample gradients:

| the loss of a batch of `n` samples | loss of sample i alone | weights `w_i` in `G` |
|---|---|---|
| mean over samples (`F.cross_entropy`) | `l_i` | `1 / n` |
| sum over samples (`reduction="sum"`) | `l_i` | `1` |
| mean over tokens (padding, -100 labels, mask) | `S_i / T_i` | `T_i / sum_j T_j` |
| token sum / a count `N` from the batch | `S_i / N` | `1` (see below) |
| `sum_i v_i l_i / sum_i v_i` (weights `v`) | `l_i` | `v_i / sum_j v_j` |
| `F.cross_entropy(weight=class_weights)` | `l_i` | `c(y_i) / sum_j c(y_j)` |

(``S_i`` is the sum of sample ``i``'s token losses and ``T_i`` its number of counted tokens. A
token sum divided by a count the batch carries, the accumulation window's as in the
``num_items_in_batch`` recipe, is a sum over this batch but a mean over ``N`` tokens per optimizer
step: :func:`count_leaves` finds such counts.) So fitting ``G`` on the per-sample gradients
themselves recovers the weights, and what they follow (a token count, a mask, a weight tensor
found in the batch) says which reduction it is. What no weighting explains (train-mode
BatchNorm, a reshape that mixes samples) stays in the residual.

The fit is least squares over all parameters jointly, from per-parameter Gram matrices of the
per-sample gradients (``n x n``, float64, on their device): with ``P`` parameters far more than
``n`` samples, the Gram matrix is the cheap way, and per-parameter residuals come for free.
Nothing here changes a module or a gradient.

Example:
    >>> import torch
    >>> g = {"w": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}   # two samples
    >>> gram = gram_of(g, {"w": torch.tensor([0.25, 0.75, 0.0])})
    >>> fit = fit_weights(gram)
    >>> [round(v, 6) for v in fit.weights.tolist()], float(fit.residual) < 1e-12
    ([0.25, 0.75], True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from grad_callbacks.core.batch import Path, named_leaves, path_name, replace_leaf

IGNORE_INDEX = -100
#: The free fit of ``n`` weights only means something when the gradients have many more
#: coordinates than there are samples (otherwise any batch gradient fits).
MIN_PARAMS_PER_SAMPLE = 4

__all__ = [
    "Gram",
    "Reduction",
    "WeightFit",
    "Weighting",
    "batch_weightings",
    "count_leaves",
    "fit_weights",
    "gram_of",
    "judge_reduction",
    "scaled_leaf",
]


@dataclass
class Gram:
    """Inner products of the per-sample gradients and the batch gradient, per parameter.

    Attributes:
        gram: name -> ``[n, n]`` float64, ``<g_i, g_j>`` over that parameter.
        dots: name -> ``[n]`` float64, ``<g_i, G>``.
        batch_sq: name -> 0-dim float64, ``||G||^2``.
        numel: the number of gradient coordinates in all.
    """

    gram: dict[str, Tensor]
    dots: dict[str, Tensor]
    batch_sq: dict[str, Tensor]
    numel: int

    @property
    def n(self) -> int:
        return next(iter(self.gram.values())).shape[0]


def gram_of(grads: Mapping[str, Tensor], batch_grad: Mapping[str, Tensor]) -> Gram:
    """The :class:`Gram` of per-sample gradients ``grads`` (name -> ``[n, ...]``) and
    ``batch_grad`` (name -> the parameter's shape), one float64 matrix product per parameter."""
    gram, dots, batch_sq, numel = {}, {}, {}, 0
    for k, g in grads.items():
        f = g.reshape(g.shape[0], -1).double()
        b = batch_grad[k].detach().reshape(-1).to(f)
        gram[k] = f @ f.T
        dots[k] = f @ b
        batch_sq[k] = b @ b
        numel += f.shape[1]
    return Gram(gram, dots, batch_sq, numel)


@dataclass
class WeightFit:
    """The least-squares fit ``G ~ sum_i w_i g_i``.

    Attributes:
        weights: ``[n]`` float64, the fitted weights.
        residual: ``||G - sum_i w_i g_i|| / ||G||`` over all parameters (0-dim).
        param_residual: per parameter, ``||G_p - sum_i w_i g_ip|| / ||G||``; their squares sum to
            ``residual ** 2``.
        batch_norm: ``||G||``.
    """

    weights: Tensor
    residual: Tensor
    param_residual: dict[str, Tensor]
    batch_norm: Tensor


def _solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """Minimum-norm least-squares solution of the symmetric system ``matrix x = rhs``."""
    scale = matrix.diagonal().abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
    return torch.linalg.pinv(matrix / scale, hermitian=True, rtol=1e-12) @ (rhs / scale)


def fit_weights(gram: Gram, basis: Tensor | None = None) -> WeightFit:
    """Fit the batch gradient on the per-sample gradients.

    Args:
        gram: from :func:`gram_of`.
        basis: ``[n]`` or ``[n, r]``: restrict the weights to ``w = basis @ a`` (a count times
            one scale, one weight per class, ...); None fits ``n`` free weights.

    Returns:
        A :class:`WeightFit` of tensors (no host-device synchronisation).

    Example:
        >>> import torch
        >>> g = {"w": torch.eye(3)}
        >>> gram = gram_of(g, {"w": torch.tensor([2.0, 4.0, 1.0])})
        >>> fit = fit_weights(gram, basis=torch.tensor([1.0, 2.0, 0.0]))  # w = a * (1, 2, 0)
        >>> fit.weights.tolist(), round(float(fit.residual), 4)  # (2, 4, 0): off by the 1
        ([2.0, 4.0, 0.0], 0.2182)
    """
    keys = list(gram.gram)
    k_all = torch.stack([gram.gram[k] for k in keys]).sum(0)
    b_all = torch.stack([gram.dots[k] for k in keys]).sum(0)
    if basis is None:
        weights = _solve(k_all, b_all)
    else:
        m = basis.to(k_all).reshape(k_all.shape[0], -1)
        weights = m @ _solve(m.T @ k_all @ m, m.T @ b_all)
    gg = torch.stack([gram.batch_sq[k] for k in keys]).sum()
    norm = gg.sqrt()
    denom = gg.clamp_min(torch.finfo(gg.dtype).tiny)
    param_sq = {
        k: (gram.batch_sq[k] - 2 * weights @ gram.dots[k] + weights @ gram.gram[k] @ weights)
        .clamp_min(0)
        for k in keys
    }
    residual = (torch.stack(list(param_sq.values())).sum() / denom).sqrt()
    return WeightFit(
        weights=weights,
        residual=residual,
        param_residual={k: (v / denom).sqrt() for k, v in param_sq.items()},
        batch_norm=norm,
    )


def free_fit_possible(gram: Gram) -> bool:
    """Whether the gradients have enough coordinates for ``n`` free weights to mean anything."""
    return gram.numel >= MIN_PARAMS_PER_SAMPLE * gram.n


# ------------------------------------------------------------------ what weights can follow
Rule = Literal["non-ignored", "mask", "weights", "class"]
_RULES: tuple[str, ...] = ("non-ignored", "mask", "weights", "class")


@dataclass(frozen=True)
class Weighting:
    """A per-sample weighting read from a batch: what a loss's weights could follow.

    Attributes:
        path: where the tensor is in the batch (see
            :func:`~grad_callbacks.core.batch.named_leaves`).
        rule: ``"non-ignored"`` (entries other than -100 of an integer tensor), ``"mask"``
            (non-zero entries of a 0/1 tensor), ``"weights"`` (a float tensor, summed per sample),
            ``"class"`` (one free weight per value of an integer label vector).
        shift: count from the second position on (a causal LM predicts tokens 1..T-1).
    """

    path: Path
    rule: Rule
    shift: bool = False

    @property
    def is_count(self) -> bool:
        """Whether the weights count tokens (a mean over tokens), as opposed to weights."""
        return self.rule in ("non-ignored", "mask")

    def noun(self) -> str:
        """What is counted or weighed, in words: ``non-ignored tokens in `labels```."""
        name = f"`{path_name(self.path)}`"
        shifted = " from the second position on (the causal-LM shift)" if self.shift else ""
        if self.rule == "non-ignored":
            return f"non-ignored tokens in {name} (entries other than -100{shifted})"
        if self.rule == "mask":
            return f"tokens in the mask {name}{shifted}"
        if self.rule == "weights":
            return f"per-sample weights {name}"
        return f"class in {name} (one weight per class: class weights)"

    def describe(self) -> str:
        """What the weights follow, in words."""
        return f"each sample's {self.noun()}"

    def basis(self, batch: Any, n: int) -> Tensor | None:
        """``[n]`` counts or weights (``[n, classes]`` indicators for ``"class"``) of the first
        ``n`` samples of ``batch``, float64; None when the leaf is missing or does not fit."""
        leaf = dict(named_leaves(batch)).get(self.path)
        if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] < n:
            return None
        t = leaf[:n]
        if self.rule == "class":
            values, inverse = torch.unique(t, return_inverse=True)
            return torch.nn.functional.one_hot(inverse, len(values)).double()
        if self.shift:
            if t.dim() < 2 or t.shape[1] < 2:
                return None
            t = t[:, 1:]
        if self.rule == "non-ignored":
            kept = t != IGNORE_INDEX
        elif self.rule == "mask":
            kept = t != 0
        else:
            return t.double().reshape(n, -1).sum(1)
        return kept.reshape(n, -1).sum(1).double()


def _is_mask(t: Tensor) -> bool:
    if t.dtype == torch.bool:
        return True
    return bool(((t == 0) | (t == 1)).all())


def batch_weightings(batch: Any, n: int) -> list[Weighting]:
    """The weightings a loss over the first ``n`` samples of ``batch`` could follow, most
    specific first: -100 labels (as is, and shifted by one), masks (likewise), float per-sample
    weights, and the classes of an integer label vector.

    Only weightings that are not equal for all ``n`` samples are returned: equal weights are the
    plain mean.

    Example:
        >>> import torch
        >>> labels = torch.tensor([[5, 6, -100], [7, -100, -100]])
        >>> [w.describe()[:40] for w in batch_weightings({"labels": labels}, 2)]
        ["each sample's non-ignored tokens in `lab", "each sample's non-ignored tokens in `lab"]
    """
    found: list[Weighting] = []
    for path, leaf in named_leaves(batch):
        if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] < n:
            continue
        t = leaf[:n]
        candidates: list[Weighting] = []
        if t.is_floating_point():
            if t.dim() == 1 and bool((t >= 0).all()):
                candidates.append(Weighting(path, "weights"))
            elif t.dim() >= 2 and _is_mask(t):
                candidates += [Weighting(path, "mask"), Weighting(path, "mask", shift=True)]
        elif t.dim() >= 2:
            if bool((t == IGNORE_INDEX).any()):
                candidates += [
                    Weighting(path, "non-ignored"),
                    Weighting(path, "non-ignored", shift=True),
                ]
            elif _is_mask(t):
                candidates += [Weighting(path, "mask"), Weighting(path, "mask", shift=True)]
        elif t.dtype != torch.bool and 1 < len(torch.unique(t)) < n:
            candidates.append(Weighting(path, "class"))
        for c in candidates:
            basis = c.basis(batch, n)
            if basis is None:
                continue
            if basis.dim() == 1 and bool((basis == basis[0]).all()):
                continue
            found.append(c)
    return found


# ------------------------------------------------------------------ counts the loss divides by
def count_leaves(batch: Any, n: int) -> list[Path]:
    """Leaves of ``batch`` that may hold a count the loss divides by (the ``num_items_in_batch``
    recipe): positive Python numbers, 0-dim numeric tensors, and ``[n]`` tensors holding one
    positive value repeated.

    Example:
        >>> import torch
        >>> count_leaves({"x": torch.ones(2, 3), "num_items": torch.tensor([40, 40]), "k": 3}, 2)
        [('num_items',), ('k',)]
    """
    found: list[Path] = []
    for path, leaf in named_leaves(batch):
        if isinstance(leaf, bool):
            continue
        if isinstance(leaf, (int, float)):
            if leaf > 0:
                found.append(path)
        elif isinstance(leaf, Tensor) and leaf.numel() > 0 and leaf.dtype != torch.bool:
            if leaf.dim() == 0 or (leaf.dim() == 1 and leaf.shape[0] == n):
                flat = leaf.reshape(-1)
                if bool((flat > 0).all()) and bool((flat == flat[0]).all()):
                    found.append(path)
    return found


def scaled_leaf(batch: Any, path: Path, factor: int = 2) -> Any:
    """``batch`` with the leaf at ``path`` multiplied by ``factor`` (its type and dtype kept)."""
    leaf = dict(named_leaves(batch))[path]
    return replace_leaf(batch, path, leaf * factor)


def describe_range(weights: Sequence[float]) -> str:
    """``"0.05 to 0.2, ratio 4"`` for a list of weights.

    Example:
        >>> describe_range([0.05, 0.2, 0.1])
        '0.05 to 0.2, ratio 4'
    """
    lo, hi = min(weights), max(weights)
    ratio = f", ratio {hi / lo:.3g}" if lo > 0 else ""
    return f"{lo:.3g} to {hi:.3g}{ratio}"


# ------------------------------------------------------------------ the verdict
@dataclass
class Reduction:
    """How a batch loss reduces its samples, as judged from the gradients.

    Attributes:
        verdict: ``"mean"``, ``"sum"``, ``"scale"`` (equal weights, see
            :func:`~grad_callbacks.core.diagnosis.classify_scale`), ``"weighted"`` (unequal
            weights fit) or ``"coupled"`` (no per-sample weighting fits).
        scale: the equal-weights scale ``c`` (``G ~ c * mean_i g_i``); NaN when undefined.
        residual: the relative residual of the fit that decided: the equal-weights fit for
            ``"mean"``, ``"sum"`` and ``"scale"``, the weighted fit otherwise.
        param_residual: per parameter, the same residual's share.
        weights: the fitted weights (``"weighted"``, and ``"coupled"`` when fitted), else None.
        follows: the batch weighting the weights follow (``"weighted"``), else None.
        basis: that weighting's counts or weights for the compared samples.
        weighted: whether the weighted fit ran (the equal-weights fit did not fit).
    """

    verdict: str
    scale: float
    residual: float
    param_residual: dict[str, Tensor]
    weights: list[float] | None = None
    follows: Weighting | None = None
    basis: list[float] | None = None
    weighted: bool = False

    @property
    def own_count(self) -> bool:
        """Whether the weights are a count divided by the compared samples' total count: the
        loss is a mean over its own batch's tokens."""
        if self.follows is None or not self.follows.is_count or not self.weights:
            return False
        total = sum(self.basis or ())
        return total > 0 and abs(sum(self.weights) - 1.0) <= 1e-2


def judge_reduction(
    scale_fit: Any,
    gram: Gram | None,
    weightings: Sequence[tuple[Weighting, Tensor]],
    n: int,
    tol: float,
) -> Reduction:
    """Judge a batch loss's reduction: equal weights first (today's ``mean``/``sum``/``scale``),
    then a weighted fit on the per-sample gradients, whose residual decides coupling.

    Args:
        scale_fit: the equal-weights :class:`~grad_callbacks.core.per_sample.fit.ScaleFit`.
        gram: the Gram matrices (None: no weighted fit, the equal-weights residual decides).
        weightings: what the weights could follow, each with its basis for the ``n`` samples.
        n: the number of samples compared.
        tol: the relative residual above which a fit does not fit.

    Example:
        >>> import torch
        >>> from grad_callbacks.core.per_sample.fit import fit_scale
        >>> g = {"w": torch.eye(8)[:4]}  # four samples, orthogonal gradients
        >>> batch = {"w": torch.tensor([1.0, 2, 3, 4, 0, 0, 0, 0]) / 10}
        >>> mean = {"w": g["w"].mean(0)}
        >>> labels = torch.tensor([[1, -100, -100, -100], [1, 1, -100, -100],
        ...                        [1, 1, 1, -100], [1, 1, 1, 1]])
        >>> found = [(w, w.basis({"labels": labels}, 4)) for w in
        ...          batch_weightings({"labels": labels}, 4)]
        >>> r = judge_reduction(fit_scale(batch, mean), gram_of(g, batch), found, 4, 1e-3)
        >>> r.verdict, r.follows.describe()[:44], r.own_count
        ('weighted', "each sample's non-ignored tokens in `labels`", True)
    """
    from grad_callbacks.core.diagnosis import classify_scale

    scale, residual = float(scale_fit.scale), float(scale_fit.residual)
    verdict = classify_scale(scale, residual, n, coupling_tol=tol)
    if verdict != "coupled" or gram is None:
        return Reduction(verdict, scale, residual, dict(scale_fit.param_residual))
    tried = [(w, basis, fit_weights(gram, basis)) for w, basis in weightings]
    # Of the weightings that fit, the most specific kind (labels before masks before weights
    # before classes: a mask often counts the same tokens as the labels), then the closest.
    fitting = [t for t in tried if float(t[2].residual) <= tol]
    best = min(fitting, key=lambda t: (_RULES.index(t[0].rule), float(t[2].residual)), default=None)
    if best is not None:
        w, basis, fit = best
        return Reduction(
            "weighted",
            scale,
            float(fit.residual),
            fit.param_residual,
            weights=fit.weights.tolist(),
            follows=w,
            basis=basis.tolist() if basis.dim() == 1 else None,
            weighted=True,
        )
    if not free_fit_possible(gram):
        return Reduction("coupled", scale, residual, dict(scale_fit.param_residual))
    free = fit_weights(gram)
    free_residual = float(free.residual)
    return Reduction(
        "weighted" if free_residual <= tol else "coupled",
        scale,
        free_residual,
        free.param_residual,
        weights=free.weights.tolist(),
        weighted=True,
    )
