"""A shared zoo of small clean and broken LightningModules, and a quick trainer factory."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LitLogger.*")


def regression_data(
    n: int = 28, features: int = 8, batch_size: int = 4, seed: int = 0
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def image_data(n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


_FIT_ROOT: list[str] = []


def _fit_root() -> str:
    """One temporary directory for the runs of this test process, removed when it exits."""
    if not _FIT_ROOT:
        _FIT_ROOT.append(tempfile.mkdtemp(prefix="grad_audit_tests_"))
        atexit.register(shutil.rmtree, _FIT_ROOT[0], ignore_errors=True)
    return _FIT_ROOT[0]


def fit(
    module: L.LightningModule,
    callbacks: Sequence[L.Callback] = (),
    data: DataLoader | None = None,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """Train ``module`` for one epoch on CPU with everything but the callbacks switched off."""
    kwargs: dict[str, Any] = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(dir=_fit_root()),
    )
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(module, data if data is not None else regression_data())
    return trainer


class FirstSeen(L.Callback):
    """Records the batch at whose end each finding code first appears in ``audit.findings``,
    and the optimizer step (``global_step``) there (the latency tests and
    ``benchmarks/latency.py``)."""

    def __init__(self, audit: Any) -> None:
        self.audit = audit
        self.at: dict[str, int] = {}
        self.step_at: dict[str, int] = {}
        self._batch_steps: dict[int, int] = {}  # batch -> global_step at its start

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._batch_steps[trainer.fit_loop.epoch_loop.total_batch_idx] = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        batch = trainer.fit_loop.epoch_loop.total_batch_idx
        for f in self.audit.findings:
            if f.code not in self.at:
                self.at[f.code] = batch
                self.step_at[f.code] = trainer.global_step

    def steps_after(self, code: str, onset_batch: int) -> int | None:
        """Optimizer steps from the start of batch ``onset_batch`` to the end of the batch
        where ``code`` first appeared (None: it never did)."""
        if code not in self.step_at:
            return None
        return self.step_at[code] - self._batch_steps[onset_batch]


class Square(torch.autograd.Function):
    """A custom autograd Function, ``x * x``, with the right backward (``2 x``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * grad * x


class MLP(L.LightningModule):
    """A clean MLP regressor (automatic optimization)."""

    def __init__(self, optimizer: str = "sgd", features: int = 8) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)


class CNN(L.LightningModule):
    """A clean small CNN classifier."""

    def __init__(self, optimizer: str = "adam") -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1e-2)
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class NoZeroGradAutomatic(MLP):
    """Broken: ``optimizer_zero_grad`` overridden to do nothing."""

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass


class SetToNoneFalse(MLP):
    """Clean: zeroes gradients in place instead of setting them to None."""

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        optimizer.zero_grad(set_to_none=False)


class FrozenBackbone(MLP):
    """Clean: the first layer is frozen; the optimizer gets only trainable parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class TwoHeads(L.LightningModule):
    """Automatic optimization; the auxiliary head is used on even batches only.

    ``zero_grad_scope="all"`` is clean. ``"backbone"`` clears only the backbone and main head
    (a broken custom ``optimizer_zero_grad``), so the auxiliary head's old gradient is applied
    again on odd batches (``stale-grad``) and accumulated on even ones (``missing-zero-grad``).
    """

    def __init__(self, zero_grad_scope: str = "all", set_to_none: bool = True) -> None:
        super().__init__()
        self.zero_grad_scope = zero_grad_scope
        self.set_to_none = set_to_none
        self.backbone = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = torch.tanh(self.backbone(x))
        loss = nn.functional.mse_loss(self.head(h), y)
        if batch_idx % 2 == 0:
            loss = loss + 0.1 * self.aux(h).pow(2).mean()
        return loss

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        if self.zero_grad_scope == "all":
            optimizer.zero_grad(set_to_none=self.set_to_none)
        else:
            self.backbone.zero_grad(set_to_none=self.set_to_none)
            self.head.zero_grad(set_to_none=self.set_to_none)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class ManualMLP(L.LightningModule):
    """Manual optimization; ``zero_grad=False`` forgets ``opt.zero_grad()`` (broken).

    ``accumulate`` > 1 accumulates that many micro-batches per step by hand (clean when
    ``zero_grad`` is True). ``raw_backward`` calls ``loss.backward()`` instead of
    ``self.manual_backward``.
    """

    def __init__(self, zero_grad: bool = True, accumulate: int = 1, raw_backward: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.zero_grad_enabled = zero_grad
        self.accumulate = accumulate
        self.raw_backward = raw_backward
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y) / self.accumulate
        if self.raw_backward:
            loss.backward()
        else:
            self.manual_backward(loss)
        if (batch_idx + 1) % self.accumulate == 0:
            opt.step()
            if self.zero_grad_enabled:
                opt.zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class GAN(L.LightningModule):
    """A tiny GAN with manual optimization and two optimizers.

    ``mode``:
        * ``"toggle"``: Lightning's recipe with ``toggle_optimizer`` (clean);
        * ``"zero_first"``: no toggling, each optimizer clears its gradients before its own
          backward pass (clean);
        * ``"alternate"``: the discriminator steps on even batches, the generator on odd ones
          (clean);
        * ``"leak"``: the generator step runs first and the discriminator's gradients are only
          cleared after its step, so the generator loss's gradient reaches the discriminator's
          step (broken: ``gradient-leak``).
    """

    def __init__(self, mode: str = "toggle") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.mode = mode
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def _losses(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(real.shape[0], 4)
        fake = self.generator(z)
        bce = nn.functional.binary_cross_entropy_with_logits
        ones = torch.ones(real.shape[0], 1)
        g_loss = bce(self.discriminator(fake), ones)
        d_loss = bce(self.discriminator(real), ones) + bce(
            self.discriminator(fake.detach()), torch.zeros_like(ones)
        )
        return g_loss, d_loss

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        if self.mode == "toggle":
            g_loss, d_loss = self._losses(real)
            self.toggle_optimizer(opt_d)
            self.manual_backward(d_loss)
            opt_d.step()
            opt_d.zero_grad()
            self.untoggle_optimizer(opt_d)
            self.toggle_optimizer(opt_g)
            g_loss, _ = self._losses(real)
            self.manual_backward(g_loss)
            opt_g.step()
            opt_g.zero_grad()
            self.untoggle_optimizer(opt_g)
        elif self.mode == "zero_first":
            g_loss, d_loss = self._losses(real)
            opt_g.zero_grad()
            self.manual_backward(g_loss, retain_graph=True)
            opt_g.step()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
        elif self.mode == "alternate":
            # the discriminator steps on even batches, the generator on odd ones
            g_loss, d_loss = self._losses(real)
            opt, loss = (opt_d, d_loss) if batch_idx % 2 == 0 else (opt_g, g_loss)
            other = opt_g if opt is opt_d else opt_d
            self.toggle_optimizer(opt)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
            other.zero_grad()
            self.untoggle_optimizer(opt)
        else:  # leak
            g_loss, d_loss = self._losses(real)
            opt_g.zero_grad()
            self.manual_backward(g_loss, retain_graph=True)
            opt_g.step()
            self.manual_backward(d_loss)
            opt_d.step()
            opt_d.zero_grad()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-3),
        ]


def gan_data(n: int = 24, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g)), batch_size=batch_size)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- per-sample zoo
class SummedLoss(MLP):
    """Broken: the loss is summed over the batch (``reduction-sum``)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y, reduction="sum")


class SqrtNormalizedLoss(MLP):
    """A summed loss divided by sqrt(batch size): c = sqrt(B) (``reduction-scale``, info).

    A constant factor would not do: it scales the per-sample losses alike, so c stays 1.
    """

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y, reduction="sum")
        return loss / len(x) ** 0.5


class PerSampleMean(MLP):
    """Clean: ``reduction="none"`` then ``.mean()``; also returns a dict."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        per_sample = nn.functional.mse_loss(self.net(x), y, reduction="none").mean(dim=1)
        return {"loss": per_sample.mean()}


class BatchNormMLP(MLP):
    """Train-mode BatchNorm1d couples samples (``batch-coupling``, info, explained)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


class BatchNormCNN(CNN):
    """Train-mode BatchNorm2d couples samples (``batch-coupling``, info, explained)."""

    def __init__(self) -> None:
        super().__init__("sgd")
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3),
        )


class ReshapeMixesSamples(MLP):
    """Broken: a transpose + reshape folds samples into each other (``batch-coupling``)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = torch.tanh(self.net[0](x))
        h = h.t().reshape(h.shape[0], -1)  # meant h.reshape(...): mixes the batch
        return nn.functional.mse_loss(self.net[2](h), y)


class LogOfInput(MLP):
    """``log`` of the first feature: a sample with a negative feature gets NaN gradients."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = torch.cat([torch.log(x[:, :1]), x[:, 1:]], dim=1)
        return nn.functional.mse_loss(self.net(x), y)


class DoublingHook(MLP):
    """Broken: a gradient hook doubles every gradient (``grad-mismatch``)."""

    def __init__(self) -> None:
        super().__init__()
        for p in self.parameters():
            p.register_hook(lambda g: 2 * g)


class TinyTransformer(L.LightningModule):
    """Embeddings, LayerNorm, self-attention and dropout; clean."""

    def __init__(self, vocab: int = 20, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=32, dropout=0.2, batch_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        h = self.norm(self.encoder(self.embed(tokens)))
        return nn.functional.cross_entropy(self.head(h.mean(dim=1)), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_data(n: int = 32, length: int = 6, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 20, (n, length), generator=g)
    return DataLoader(TensorDataset(tokens, (tokens[:, 0] % 2)), batch_size=batch_size)


class NoisyInputs(MLP):
    """Clean: Gaussian noise augmentation drawn in training_step (not a dropout layer)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x + 0.1 * torch.randn_like(x)), y)


class ItemControlFlow(MLP):
    """Clean, but vmap cannot run it (``.item()`` in training_step): the loop path runs."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        if out.sum().item() > 1e9:  # data-dependent control flow
            out = out * 0
        return nn.functional.mse_loss(out, y)


class ItemControlFlowDoublingHook(ItemControlFlow):
    """Broken: a doubling gradient hook on a model that takes the loop path."""

    def __init__(self) -> None:
        super().__init__()
        for p in self.parameters():
            p.register_hook(lambda g: 2 * g)


class RecordingLogger(Logger):
    """A Lightning logger that keeps the metrics it is given, by step (for tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.setdefault(int(step or 0), {}).update(metrics)

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


# ------------------------------------------------------------------ bugs planted at a step
#: The per-step bugs :func:`plant` can start at a given batch.
PLANTED_BUGS = ("nan", "no_zero_grad", "detach")


def plant(module: L.LightningModule, bug: str, onset: int, layer: nn.Module) -> None:
    """Make ``module`` (automatic optimization) go wrong from its ``onset``-th training batch on.

    ``"nan"``: ``layer``'s output is NaN (as a NaN in the data makes it); ``"no_zero_grad"``:
    ``optimizer_zero_grad`` stops clearing; ``"detach"``: ``layer``'s output is detached, so
    ``layer`` and what comes before it get no gradient. The module's code is not changed: hooks
    and an instance attribute, so any model of the zoos can carry a bug.
    """

    def started() -> bool:
        return module.trainer.fit_loop.epoch_loop.total_batch_idx >= onset

    if bug == "nan":
        layer.register_forward_hook(lambda m, i, out: out * float("nan") if started() else out)
    elif bug == "detach":
        layer.register_forward_hook(lambda m, i, out: out.detach() if started() else out)
    elif bug == "no_zero_grad":
        clear = module.optimizer_zero_grad

        def optimizer_zero_grad(epoch: int, batch_idx: int, optimizer: Any) -> None:
            if not started():
                clear(epoch, batch_idx, optimizer)

        module.optimizer_zero_grad = optimizer_zero_grad  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown bug {bug!r}; one of {PLANTED_BUGS}")


class LeakingGAN(GAN):
    """:class:`GAN` in the clean ``"zero_first"`` mode until batch ``onset``, then ``"leak"``:
    the generator loss's gradient reaches the discriminator's step from there on."""

    def __init__(self, onset: int) -> None:
        super().__init__(mode="zero_first")
        self.onset = onset

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.fit_loop.epoch_loop.total_batch_idx >= self.onset:
            self.mode = "leak"
        super().training_step(batch, batch_idx)
