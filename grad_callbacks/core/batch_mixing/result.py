"""What the batch-mixing test finds: :class:`Mixing`, and :class:`CannotCheckMixing` when it
cannot run."""

from __future__ import annotations

from dataclasses import dataclass


class CannotCheckMixing(ValueError):
    """The inputs or outputs do not allow the test (no batch axis, one sample, nothing to
    differentiate); the message says why."""


@dataclass(frozen=True)
class Mixing:
    """Samples whose inputs reach the output of sample ``sample``.

    Attributes:
        output: the output's path (``"output"``, ``"output[1]"``, ``"output['logits']"``).
        sample: the sample ``i`` whose output was differentiated.
        sources: the other samples ``j`` whose inputs get a non-zero gradient.
        inputs: the inputs through which they do (paths, or ``"<embedding> output for <path>"``).
        magnitude: the largest absolute input gradient on those other samples.
        own_magnitude: the largest absolute input gradient on sample ``i`` itself.
        module: the qualified name of the first module whose output mixes, or of the module in
            whose own code samples mix (see ``next_module``); the top-level module is named by
            its class; None when not localised.
        module_type: that module's class name.
        previous_module: the last module before it, on the data path, whose output does not mix.
        next_module: when the mixing is in the code of ``module`` itself: the first module it
            calls with inputs that already mix (the mixing is before that call).
        rows: rows of the output per sample (1; k for an output of k x B rows, see
            ``interleaved``).
        interleaved: with ``rows`` k > 1, sample ``i`` holds rows ``i, i+B, ...`` (a flattened
            sequence-first tensor) rather than rows ``i*k .. i*k+k-1``.
    """

    output: str
    sample: int
    sources: tuple[int, ...]
    inputs: tuple[str, ...]
    magnitude: float
    own_magnitude: float
    module: str | None = None
    module_type: str | None = None
    previous_module: str | None = None
    next_module: str | None = None
    rows: int = 1
    interleaved: bool = False

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """``(i, j)`` for every source ``j``."""
        return [(self.sample, j) for j in self.sources]

