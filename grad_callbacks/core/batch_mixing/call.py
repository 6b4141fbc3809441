"""One call of a module, as the model makes it: positional and keyword arguments, named.

The batch-mixing test runs a recorded call again with its tensors made leaves. Its inputs are
named after the parameters of the module's ``forward`` (``input_ids``, ``hidden``), so that a
finding says through which argument samples mix.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class ModelCall:
    """``module(*args, **kwargs)``, with the names of the positional arguments.

    Attributes:
        args: the positional arguments.
        kwargs: the keyword arguments.
        names: one name per positional argument (the parameter of ``forward`` it binds to, else
            ``args[k]``).

    Example:
        >>> import torch
        >>> call = ModelCall.of(torch.nn.Linear(2, 1), (torch.zeros(3, 2),))
        >>> call.names, call.describe("head")
        (('input',), 'head(input)')
        >>> call.run(torch.nn.Linear(2, 1)).shape
        torch.Size([3, 1])
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    names: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> ModelCall:
        """The call ``module(*args, **kwargs)`` with its positional arguments named."""
        return cls(tuple(args), dict(kwargs or {}), positional_names(module.forward, len(args)))

    def name_of(self, k: int) -> str:
        return self.names[k] if k < len(self.names) else f"args[{k}]"

    def describe(self, target: str) -> str:
        """``target(name, ..., key=...)``: the call as a finding names it."""
        parts = [self.name_of(k) for k in range(len(self.args))]
        parts += [f"{key}=..." for key in self.kwargs]
        return f"{target}({', '.join(parts)})"

    def run(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


def positional_names(fn: Callable[..., Any], count: int) -> tuple[str, ...]:
    """The names of the first ``count`` positional parameters of ``fn`` (a module's bound
    ``forward``; ``args[k]`` past them or under ``*args``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for k in range(count):
        p = params[k] if k < len(params) else None
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names.append(p.name if p is not None and p.kind in positional else f"args[{k}]")
    return tuple(names)
