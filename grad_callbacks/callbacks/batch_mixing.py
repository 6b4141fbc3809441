"""BatchMixingCheck: does a sample's output depend on another sample's input?

A thin adapter over :func:`~grad_callbacks.core.batch_mixing.find_batch_mixing`. During the
training step of the first training batch (and of every scheduled one) it records the calls the
step makes into the LightningModule's ``forward`` and into its direct child modules
(:class:`~grad_callbacks.core.batch_mixing.record.CallRecorder`); at the end of the batch it runs
each recorded call again with its recorded arguments, differentiates the outputs of a few samples
with respect to the batch-axis inputs and reports ``batch-mixing`` when another sample's input
gets a non-zero gradient, naming the call and the first module where samples mix. It extends the
test of Lightning Bolts' ``BatchGradientVerificationCallback``, for Lightning 2.

Example:
    >>> import lightning as L
    >>> check = BatchMixingCheck(input_mapping=lambda batch: batch["image"])
    >>> trainer = L.Trainer(callbacks=[check], logger=False)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from grad_callbacks.callbacks.base import AuditCallback, OnFinding
from grad_callbacks.callbacks.recompute import (
    Recomputations,
    kept_python_state,
    stood_in,
    training_step_compiled,
)
from grad_callbacks.core.batch import batch_size, is_namedtuple
from grad_callbacks.core.batch_mixing import (
    CannotCheckMixing,
    Mixing,
    ModelCall,
    batch_size_of,
    default_sample_indices,
    find_batch_mixing,
)
from grad_callbacks.core.batch_mixing.leaves import _tensors
from grad_callbacks.core.batch_mixing.record import CallRecorder, RecordedCall
from grad_callbacks.findings import CODES, Finding, make_finding

InputMapping = Callable[[Any], Any]
OutputMapping = Callable[[Any], Any]
ForwardFn = Callable[[pl.LightningModule, Any], Any]

_CONFIGURE = (
    "pass BatchMixingCheck(input_mapping=lambda batch: ...) returning what pl_module.forward "
    "takes (a tensor, a tuple of positional arguments or a dict of keyword arguments), and if "
    "needed output_mapping=lambda output: ... returning the per-sample output tensor(s) with the "
    "batch on dim 0, or forward_fn=lambda pl_module, inputs: ... to run the model another way"
)
_MAX_SAMPLES_LISTED = 8


class _ForwardFailed(RuntimeError):
    pass


def _callable_name(fn: Callable[..., Any] | None) -> str | None:
    if fn is None:
        return None
    return getattr(fn, "__qualname__", type(fn).__name__)


def _call(module: nn.Module, inputs: Any) -> Any:
    """``module(*inputs)`` for a tuple, ``module(**inputs)`` for a dict, else ``module(inputs)``
    (the convention of ``example_input_array``)."""
    if isinstance(inputs, tuple) and not is_namedtuple(inputs):
        return module(*inputs)
    if isinstance(inputs, dict):
        return module(**inputs)
    return module(inputs)


def _forward_target(module: pl.LightningModule) -> tuple[nn.Module, str] | None:
    """What runs the inputs: the module itself, or, when it does not implement ``forward``
    (a LightningModule that calls ``self.net`` in ``training_step``), its only child module."""
    if type(module).forward is not pl.LightningModule.forward:
        return module, "pl_module"
    children = list(module.named_children())
    if len(children) == 1:
        return children[0][1], f"pl_module.{children[0][0]}"
    return None


def _samples(indices: Sequence[int]) -> str:
    shown = ", ".join(str(j) for j in indices[:_MAX_SAMPLES_LISTED])
    more = len(indices) - _MAX_SAMPLES_LISTED
    word = "sample" if len(indices) == 1 else "samples"
    return f"{word} {shown}" + (f" and {more} more" if more > 0 else "")


class BatchMixingCheck(AuditCallback):
    """Checks that no sample's output depends on another sample's input.

    For ``sample_count`` samples ``i`` of the batch (first, last and between), it takes the
    gradient of ``output[i].sum()`` with respect to the input (``torch.autograd.grad``; no
    ``.grad`` is written) and reports ``batch-mixing`` (error) when the gradient is non-zero on
    some other sample ``j``: the model mixes samples, e.g. a ``view``/``reshape``/``transpose``
    across the batch axis, a mean over dim 0, or ``nn.MultiheadAttention(batch_first=False)`` fed
    batch-first data. The finding names the pairs ``(i, j)``, the output, and the first module
    whose output mixes samples (its ``params``).

    When it runs: on the first training batch of every ``fit``, and, when ``every_n_steps`` is
    N >= 1, again on the first batch of every optimizer step that is a multiple of N (N=1: every
    step). Each run costs, per tested call, a forward and ``sample_count`` backward passes, at the
    end of the batch. ``every_n_steps=None`` or ``0`` (default): only the first batch.

    What it tests: the calls the training step makes. The first call into ``pl_module`` (its
    ``forward``, whether the step calls ``self(...)`` or ``self.forward(...)``) and the first call
    into each direct child module made from the step itself (``self.generator(z)``,
    ``self.model(input, hidden)``; not those made inside another recorded call) are recorded with
    their positional and keyword arguments (detached copies) and run again: every tensor argument
    with the batch size on dim 0 is a per-sample input (floats directly, token ids through the
    ``nn.Embedding`` that looks them up), anything else (masks of another shape, hidden states
    ``(layers, B, H)``, strings, caches) is passed as recorded. Integer tensors that no embedding
    looks up (attention masks, labels) are passed as recorded too. Outputs with the batch size
    on dim 0, or k times it (per-token logits flattened to ``(B * T, V)``), are tested; embedding
    outputs and outputs without the batch axis are carried as they are. ``output_mapping`` is
    applied to what ``pl_module``'s own forward returns. The calls tested are in
    ``tested_calls``; those it could not test, with the reason, in ``untested_calls``.

    With ``input_mapping`` or ``forward_fn``, when ``training_step`` is compiled (the
    LightningModule passed to ``fit`` compiled: hooks would make dynamo recompile it), or when the
    step makes no call through a module's ``__call__``, it tests one call on the batch's input
    instead, before the training step: ``input_mapping(batch)`` if given; otherwise the batch
    itself if it is a tensor, the first tensor of a tuple/list batch, the first floating tensor
    (else the first tensor) of a dict batch, or ``pl_module.example_input_array`` when the batch
    holds no tensor. The model is then called as ``pl_module(*inputs)`` for a tuple,
    ``pl_module(**inputs)`` for a dict and ``pl_module(inputs)`` otherwise, or as
    ``forward_fn(pl_module, inputs)``; a LightningModule that does not implement ``forward`` but
    has a single child module runs that child.

    It reports ``check-skipped`` (info) and training goes on when it cannot run: no call of the
    step could be tested (each one's reason is given: a batch of one sample, no tensor with a
    batch axis, ...), or, on the batch's input, no input found, forward failing on it or no output
    with the batch axis.

    Non-invasive: the recording only observes (hooks that return nothing, a wrapper in the
    module's instance ``forward`` removed at the end of the batch); no extra training step runs.
    BatchNorm layers run in eval mode during the test (their batch statistics mix samples by
    design and are not reported), every buffer is restored, the RNG is forked, ``self.log`` is
    muted, parameters' ``.grad`` and ``requires_grad`` are never touched and the batch's tensors
    are never modified. Under DDP each rank checks its own batch on the
    unwrapped module (no collective); findings are gathered on rank 0.

    Args:
        every_n_steps: ``None``/``0``: first batch only; N: also every N optimizer steps.
        on_finding: ``"warn"``, ``"raise"`` or ``"log"``.
        sample_count: how many samples ``i`` to differentiate (at most the batch size).
        input_mapping: ``batch -> inputs`` of ``pl_module``'s forward.
        output_mapping: ``forward output -> tensor(s)`` to test (a tensor, tuple, list or dict).
        forward_fn: ``(pl_module, inputs) -> output``, to run something else than
            ``pl_module(inputs)`` (e.g. ``lambda m, x: m.encoder(x)``).
        atol: a cross-sample input gradient must exceed this in absolute value to count.
        recompute: False forbids calling the model again beside the real step: the check then
            reports ``check-skipped`` once and does nothing.

    Example:
        >>> check = BatchMixingCheck(sample_count=2, input_mapping=lambda b: (b["x"], b["mask"]))
        >>> check.settings()["sample_count"]
        2
    """

    check_name = "BatchMixingCheck"
    metric_prefix = "batch_mixing"
    live_attributes = ("_recorder",)  # the hooks on the module of a running fit

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        on_finding: OnFinding = "warn",
        sample_count: int = 3,
        input_mapping: InputMapping | None = None,
        output_mapping: OutputMapping | None = None,
        forward_fn: ForwardFn | None = None,
        atol: float = 0.0,
        recompute: bool = True,
    ) -> None:
        if every_n_steps is not None and (
            not isinstance(every_n_steps, int)
            or isinstance(every_n_steps, bool)
            or every_n_steps < 0
        ):
            raise ValueError(f"every_n_steps must be None or an int >= 0, got {every_n_steps!r}")
        if not isinstance(sample_count, int) or sample_count < 1:
            raise ValueError(f"sample_count must be a positive int, got {sample_count!r}")
        if atol < 0:
            raise ValueError(f"atol must be >= 0, got {atol!r}")
        super().__init__(every_n_steps=every_n_steps or 1, on_finding=on_finding)
        #: 0: only the first training batch of each fit.
        self.every_n_steps = every_n_steps or 0
        self.sample_count = sample_count
        self.input_mapping = input_mapping
        self.output_mapping = output_mapping
        self.forward_fn = forward_fn
        self.atol = float(atol)
        self.recompute = recompute
        self._ran_this_fit = False
        self._last_step: int | None = None
        self._recorder: CallRecorder | None = None
        #: The calls the last run tested (``pl_module.generator(z)``), and those it could not,
        #: with the reason.
        self.tested_calls: list[str] = []
        self.untested_calls: list[tuple[str, str]] = []
        self._all_tested: dict[str, None] = {}  # over the run, in order
        self._all_untested: dict[str, str] = {}
        # What calling forward again changed that could not be put back (the test then stops).
        self._record = Recomputations()
        #: How many batches the test called the model again for (the report's
        #: ``recomputations``).
        self.recomputations = 0

    def settings(self) -> dict[str, Any]:
        return {
            "every_n_steps": self.every_n_steps,
            "on_finding": self.on_finding,
            "sample_count": self.sample_count,
            "input_mapping": _callable_name(self.input_mapping),
            "output_mapping": _callable_name(self.output_mapping),
            "forward_fn": _callable_name(self.forward_fn),
            "atol": self.atol,
            **({"recompute": False} if not self.recompute else {}),
        }

    @property
    def runs_once(self) -> bool:
        return self.every_n_steps == 0

    def report_entry(self) -> dict[str, Any]:
        """The check's report section, with every call it tested in the run (``tested_calls``)
        and those it could not test, with the reason (``untested_calls``)."""
        entry = super().report_entry()
        entry["recomputations"] = self.recomputations
        entry["tested_calls"] = list(self._all_tested)
        if self._all_untested:
            entry["untested_calls"] = [f"{c}: {why}" for c, why in self._all_untested.items()]
        return entry

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._ran_this_fit = False
        self._last_step = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._due(trainer.global_step):
            return
        self._ran_this_fit = True
        self._last_step = trainer.global_step
        if not self.recompute:
            self._skip(
                "recompute=False: the batch-mixing test calls the model again, so it does not run"
            )
            return
        with self.timed(), self.guarded("the batch-mixing test"):
            self.steps_checked += 1
            if self._records(pl_module):
                # The test runs at the end of the batch, on the calls the step makes.
                self._recorder = CallRecorder(pl_module).start()
            else:
                self.recomputations += 1
                with kept_python_state(pl_module, self._record):
                    self._check(trainer, pl_module, batch)
                self._stop_if_lost()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            with self.timed(), self.guarded("the batch-mixing test"):
                calls = recorder.stop()
                self.recomputations += 1
                with kept_python_state(pl_module, self._record):
                    if calls:
                        self._check_calls(trainer, pl_module, calls, batch)
                    else:  # the step called neither forward nor a child module via __call__
                        self._check(trainer, pl_module, batch)
                self._stop_if_lost()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def release(self) -> None:
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None

    def _stop_if_lost(self) -> None:
        """``check-skipped`` naming what calling forward again changed and could not put back;
        the test does not run again (:meth:`_due`)."""
        if self._record.lost:
            self._skip(
                "calling the model again for the batch-mixing test changed "
                + ", ".join(self._record.lost)
                + ", which could not be put back; the test stops (keep such state small, or "
                "leave BatchMixingCheck out)"
            )

    def _skip(self, reason: str) -> None:
        """check-skipped, stamped with the step of the batch checked (the test of recorded calls
        runs at the end of the batch, after the optimizer step)."""
        self.skip(reason, step=self._last_step)

    def _records(self, pl_module: pl.LightningModule) -> bool:
        """Whether to test the calls the step makes (else the guessed or configured input)."""
        explicit = self.input_mapping is not None or self.forward_fn is not None
        # Hooks inside a compiled training_step would make dynamo recompile it.
        return not explicit and not training_step_compiled(pl_module)

    def next_busy_step(self, step: int) -> int | None:
        if not self._ran_this_fit or self._recorder is not None or self._pending_scalars:
            return step
        n = self.every_n_steps
        if n <= 0 or self._record.lost or not self.recompute:
            return None  # ran at the first batch of this fit (or may not call the model again)
        due = -(-step // n) * n  # the first multiple of n from step on, not the step it ran at
        return due + n if due == self._last_step else due

    def _due(self, step: int) -> bool:
        if self._record.lost or (not self.recompute and self._ran_this_fit):
            return False
        if not self._ran_this_fit:
            return True
        n = self.every_n_steps
        return n > 0 and step % n == 0 and step != self._last_step

    # ------------------------------------------------------------------ the check
    def _inputs(self, batch: Any, pl_module: pl.LightningModule) -> tuple[Any, str] | None:
        """The forward inputs and how they were found; None (after a skip) when there are none."""
        if self.input_mapping is not None:
            return self.input_mapping(batch), "input_mapping(batch)"
        if isinstance(batch, Tensor):
            return batch, "the batch"
        if isinstance(batch, (list, tuple)):
            for k, value in enumerate(batch):
                if isinstance(value, Tensor):
                    return value, f"batch[{k}]"
        if isinstance(batch, Mapping):
            tensors = [(k, v) for k, v in batch.items() if isinstance(v, Tensor)]
            for k, v in sorted(tensors, key=lambda kv: not kv[1].is_floating_point()):
                return v, f"batch[{k!r}]"
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            return move_data_to_device(example, pl_module.device), "example_input_array"
        self._skip(
            f"cannot find the model's input in a batch of type {type(batch).__name__} (no tensor, "
            f"and pl_module.example_input_array is not set); {_CONFIGURE}"
        )
        return None

    def _runner(self, pl_module: pl.LightningModule) -> tuple[Callable[[Any], Any], str] | None:
        """``inputs -> output`` and how it is described; None (after a skip) when there is none."""
        if self.forward_fn is not None:
            fn = self.forward_fn
            return (lambda inputs: fn(pl_module, inputs)), "forward_fn(pl_module, inputs)"
        target = _forward_target(pl_module)
        if target is None:
            self._skip(
                f"{type(pl_module).__name__} does not implement forward and has several "
                f"submodules; pass BatchMixingCheck(forward_fn=lambda pl_module, inputs: ...) "
                f"that runs the model on the inputs"
            )
            return None
        module, name = target
        return (lambda inputs: _call(module, inputs)), f"{name}(inputs)"

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """The test on the input found in the batch (or configured), run as configured."""
        self.tested_calls, self.untested_calls = [], []
        runner = self._runner(pl_module)
        if runner is None:
            return
        run_model, how = runner
        found = self._inputs(batch, pl_module)
        if found is None:
            return
        inputs, source = found
        precision = trainer.precision_plugin
        inputs = precision.convert_input(inputs)
        size = batch_size_of(inputs)
        if size is None:
            self._skip(f"{source} holds no tensor with a batch dimension; {_CONFIGURE}")
            return
        if size < 2:
            self._skip(
                f"{source} has batch size {size}: mixing needs at least two samples; train with "
                f"a batch size of 2 or more, or set every_n_steps so that a later batch is checked"
            )
            return

        def forward(prepared: Any) -> Any:
            try:
                with precision.forward_context(), stood_in(pl_module):
                    out = run_model(prepared)
            except Exception as exc:
                raise _ForwardFailed(f"{type(exc).__name__}: {exc}") from exc
            return self.output_mapping(out) if self.output_mapping is not None else out

        try:
            mixings = find_batch_mixing(
                forward,
                inputs,
                sample_indices=default_sample_indices(size, self.sample_count),
                module=pl_module,
                atol=self.atol,
            )
        except CannotCheckMixing as exc:
            self._skip(f"{exc} (inputs from {source}); {_CONFIGURE}")
            return
        except _ForwardFailed as exc:
            self._skip(f"{how} with inputs from {source} failed: {exc}; {_CONFIGURE}")
            return
        self.tested_calls = [how.replace("(inputs)", f"({source})")]
        self._all_tested.update(dict.fromkeys(self.tested_calls))
        self.queue_scalars({"mixing_pairs": sum(len(m.sources) for m in mixings)})
        self._report_mixings(mixings, size, type(pl_module).__name__, None)

    def _check_calls(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        calls: list[RecordedCall],
        batch: Any,
    ) -> None:
        """The test on every call the training step made, with the inputs it made it with."""
        self.tested_calls, self.untested_calls = [], []
        precision = trainer.precision_plugin
        batch_b = batch_size(batch) or batch_size_of(batch)
        pairs = 0
        for recorded in calls:
            target = "pl_module" + (f".{recorded.target}" if recorded.target else "")
            described = recorded.call.describe(target)
            size = _call_batch_size(recorded.call, batch_b)
            if size is None or size < 2:
                why = (
                    "its inputs hold no tensor with a batch dimension"
                    if size is None
                    else f"batch size {size}: mixing needs at least two samples; train with a "
                    f"batch size of 2 or more"
                )
                self.untested_calls.append((described, why))
                continue
            try:
                mixings = find_batch_mixing(
                    self._call_forward(precision, pl_module, recorded),
                    recorded.call,
                    sample_indices=default_sample_indices(size, self.sample_count),
                    module=pl_module,
                    atol=self.atol,
                    batch_size=size,
                )
            except CannotCheckMixing as exc:
                self.untested_calls.append((described, str(exc)))
                continue
            except _ForwardFailed as exc:
                self.untested_calls.append((described, f"running it again failed: {exc}"))
                continue
            self.tested_calls.append(described)
            pairs += sum(len(m.sources) for m in mixings)
            self._report_mixings(mixings, size, type(pl_module).__name__, described)
        self._all_tested.update(dict.fromkeys(self.tested_calls))
        self._all_untested.update(dict(self.untested_calls))
        if not self.tested_calls:
            reasons = "; ".join(f"{call}: {why}" for call, why in self.untested_calls)
            self._skip(
                f"no call training_step made into {type(pl_module).__name__} or its child "
                f"modules could be tested ({reasons}); {_CONFIGURE}"
            )
            return
        self.queue_scalars({"mixing_pairs": pairs})

    def _call_forward(
        self, precision: Any, pl_module: pl.LightningModule, recorded: RecordedCall
    ) -> Callable[[Any], Any]:
        mapping = self.output_mapping if recorded.target == "" else None

        def forward(call: ModelCall) -> Any:
            try:
                with precision.forward_context(), stood_in(pl_module):
                    out = call.run(recorded.module)
            except Exception as exc:
                raise _ForwardFailed(f"{type(exc).__name__}: {exc}") from exc
            return mapping(out) if mapping is not None else out

        return forward

    def _report_mixings(
        self, mixings: list[Mixing], size: int, root: str, call: str | None
    ) -> None:
        by_module: dict[str | None, list[Mixing]] = {}
        for m in mixings:
            by_module.setdefault(m.module, []).append(m)
        for module_name, group in by_module.items():
            self.report(self._finding(group, module_name, size, root, call))

    def _finding(
        self, group: list[Mixing], module_name: str | None, size: int, root: str, call: str | None
    ) -> Finding:
        outputs = list(dict.fromkeys(m.output for m in group))
        inputs = list(dict.fromkeys(name for m in group for name in m.inputs))
        parts = []
        for output in outputs:
            mine = [m for m in group if m.output == output]
            said = "; ".join(
                f"the output of sample {m.sample} depends on the inputs of {_samples(m.sources)}"
                for m in mine
            )
            parts.append(f"{output}: {said}" if len(outputs) > 1 or output != "output" else said)
        biggest = max(group, key=lambda m: m.magnitude)
        first = group[0]
        after = f", after `{first.previous_module}`" if first.previous_module else ""
        if module_name is None:
            where = "The module where samples first mix could not be determined."
        elif first.next_module is not None:
            where = (
                f"Samples mix in the code of `{module_name}` ({first.module_type}).forward"
                f"{after}, before its call of `{first.next_module}`, whose inputs already mix "
                f"while no module output before them does."
            )
        elif module_name == root and first.module_type == root:
            where = (
                f"No submodule's output mixes samples before the output of {root} itself: the "
                f"mixing is in the code of {root}.forward"
                + (f", after `{first.previous_module}`" if first.previous_module else "")
                + "."
            )
        else:
            where = f"The first module whose output mixes samples is `{module_name}` "
            where += f"({first.module_type})"
            if first.previous_module:
                where += (
                    f", after `{first.previous_module}` whose output does not: the mixing is "
                    f"inside `{module_name}` or in the code between the two."
                )
            else:
                where += ": the mixing is inside it or in the code that feeds it."
        rows = f" ({first.rows} rows per sample)" if first.rows > 1 else ""
        own = (
            f"against {biggest.own_magnitude:.3g} on its own input"
            if biggest.own_magnitude > 0
            else "and none on its own input: that output is computed from other samples only"
        )
        message = (
            (f"In the call `{call}` that training_step made: " if call else "")
            + f"Samples of a batch of {size} mix{rows}: {' | '.join(parts)} (largest input "
            f"gradient of sample {biggest.sample}'s output on another sample's input "
            f"{biggest.magnitude:.3g}, {own}; through "
            f"{', '.join(inputs)}). {where} BatchNorm layers were run in eval mode, so batch "
            f"statistics are not the cause. "
            f"Fix: {CODES['batch-mixing'].fix}. If the model compares samples by design "
            f"(contrastive logits, in-batch negatives), point output_mapping at its per-sample "
            f"outputs."
        )
        return make_finding(
            "batch-mixing",
            check=self.check_name,
            step=self._last_step if self._last_step is not None else self.current_step,
            message=message,
            params=(module_name,) if module_name is not None else (),
            data={
                "outputs": outputs,
                "pairs": [list(p) for p in sorted({p for m in group for p in m.pairs})],
                "max_grad": biggest.magnitude,
                "own_grad": biggest.own_magnitude,
                "inputs": inputs,
                "module_type": first.module_type,
                "previous_module": first.previous_module,
                "next_module": first.next_module,
                "batch_size": size,
                "call": call,
                "rows_per_sample": first.rows,
            },
        )


def _call_batch_size(call: ModelCall, batch_b: int | None) -> int | None:
    """The batch size of a recorded call: the training batch's when one of the call's tensors
    has it on dim 0, else the size of dim 0 of the call's first tensor (a step that draws its
    own inputs, a GAN's noise of another size)."""
    sizes = [t.shape[0] for _, t in _tensors(call, "") if t.dim() > 0]
    if batch_b is not None and batch_b in sizes:
        return batch_b
    return int(sizes[0]) if sizes else None
