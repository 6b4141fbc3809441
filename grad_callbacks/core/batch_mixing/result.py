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
        module: the qualified name of the first module whose output mixes (the top-level module
            is named by its class), or None when not localised.
        module_type: that module's class name.
        previous_module: the last module before it, on the data path, whose output does not mix.
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

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """``(i, j)`` for every source ``j``."""
        return [(self.sample, j) for j in self.sources]

