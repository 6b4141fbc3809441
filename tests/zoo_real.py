"""Real models as users train them: tiny-config Hugging Face ``transformers`` models, Lightning's
own demos, ``torch.nn`` recurrent models. Random data, no downloads.

Every module here is a *clean* model: the audit must stay quiet on it (no warning or error
finding) with its checks actually run, and training must be bitwise identical with and without
the audit. Tests plant bugs by subclassing or by the constructor flags documented on each class.

``transformers`` is an optional test dependency (pinned in the ``dev`` extra): tests that use the
Hugging Face models call :func:`require_transformers` first and skip cleanly without it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.demos import LightningLSTM, LightningTransformer
from lightning.pytorch.demos.lstm import SimpleLSTM
from lightning.pytorch.demos.transformer import PositionalEncoding, Transformer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

VOCAB = 64
PAD = 0


def require_transformers() -> Any:
    """Import ``transformers`` or skip the calling test."""
    return pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------- data
class TokenBatches(Dataset):
    """Sequences of random token ids with random lengths, padded with ``PAD``.

    Each item is a dict: ``input_ids``, ``attention_mask`` (1 on real tokens), ``labels`` (the ids,
    ``-100`` on padding), and with ``text=True`` a ``text`` string that default_collate keeps as a
    list of strings (as a tokenizer pipeline leaves it in the batch).
    """

    def __init__(
        self,
        n: int = 32,
        length: int = 12,
        min_length: int = 3,
        seed: int = 0,
        text: bool = False,
        num_labels: int | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items: list[dict[str, Any]] = []
        for i in range(n):
            real = int(torch.randint(min_length, length + 1, (), generator=g))
            ids = torch.full((length,), PAD, dtype=torch.long)
            ids[:real] = torch.randint(1, VOCAB, (real,), generator=g)
            mask = (torch.arange(length) < real).long()
            labels = ids.masked_fill(mask == 0, -100)
            item: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            if num_labels is not None:
                item["labels"] = torch.randint(0, num_labels, (), generator=g)
            if text:
                item["text"] = f"sample {i} with {real} tokens"
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def token_loader(batch_size: int = 8, **kwargs: Any) -> DataLoader:
    return DataLoader(TokenBatches(**kwargs), batch_size=batch_size)


def image_loader(n: int = 16, batch_size: int = 4, size: int = 16, classes: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    items = [
        {
            "pixel_values": torch.randn(3, size, size, generator=g),
            "labels": torch.tensor(i % classes),
        }
        for i in range(n)
    ]
    return DataLoader(items, batch_size=batch_size)


def audio_loader(n: int = 32, batch_size: int = 8, length: int = 400) -> DataLoader:
    """Raw audio of random lengths (zero-padded, ``attention_mask``) with CTC labels (``-100``
    padded)."""
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        real = int(torch.randint(length * 3 // 4, length + 1, (), generator=g))
        labels = torch.full((6,), -100)
        k = int(torch.randint(2, 7, (), generator=g))
        labels[:k] = torch.randint(1, 16, (k,), generator=g)
        items.append({
            "input_values": F.pad(torch.randn(real, generator=g), (0, length - real)),
            "attention_mask": (torch.arange(length) < real).long(),
            "labels": labels,
        })
    return DataLoader(items, batch_size=batch_size)


def sequence_loader(
    n: int = 32, length: int = 10, batch_size: int = 8, vocab: int = VOCAB
) -> DataLoader:
    """(input, target) pairs of token ids shifted by one, as Lightning's demos train on."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n, length + 1), generator=g)
    pairs = list(zip(tokens[:, :-1], tokens[:, 1:], strict=True))
    return DataLoader(pairs, batch_size=batch_size)


# ---------------------------------------------------------------------------- HF models
class HFModule(L.LightningModule):
    """A ``transformers`` model trained on dict batches with its own loss (``outputs.loss``).

    Args:
        kind: ``"gpt2"`` (causal LM, tied embeddings), ``"llama"`` (causal LM, RMSNorm, rotary),
            ``"bert"`` (sequence classification), ``"t5"`` / ``"bart"`` (seq2seq with -100 labels),
            ``"vit"`` (image classification), ``"wav2vec2"`` (CTC on padded raw audio, with
            SpecAugment time masks drawn from NumPy's global generator), ``"clip"`` (text and
            image towers, contrastive loss over the batch: coupled in the loss by design).
        gradient_checkpointing: turn on the model's gradient checkpointing.
        lr: SGD learning rate.
        packed_attention: plant a batch-mixing bug: every attention layer runs
            :func:`packed_attention` (registered with ``transformers.AttentionInterface``, as a
            user registers a custom kernel), which packs the batch into one sequence and
            broadcasts the padding mask across it instead of a block-diagonal mask.
    """

    def __init__(
        self,
        kind: str = "gpt2",
        gradient_checkpointing: bool = False,
        lr: float = 0.05,
        packed_attention: bool = False,
    ):
        super().__init__()
        self.kind = kind
        self.lr = lr
        self.model = build_hf_model(kind)
        if packed_attention:
            self.model.set_attn_implementation(register_packed_attention())
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: v for k, v in batch.items() if k != "text"}
        return {**inputs, "return_loss": True} if self.kind == "clip" else inputs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(**self.model_inputs(batch)).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def build_hf_model(kind: str) -> nn.Module:
    """A randomly initialised tiny-config model of ``kind`` (seeded by the caller)."""
    tf = require_transformers()
    small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    if kind == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
            tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return tf.GPT2LMHeadModel(config)
    if kind == "llama":
        config = tf.LlamaConfig(
            vocab_size=VOCAB, max_position_embeddings=32, num_key_value_heads=1, **small
        )
        return tf.LlamaForCausalLM(config)
    if kind == "bert":
        config = tf.BertConfig(
            vocab_size=VOCAB, max_position_embeddings=32, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **small,
        )
        return tf.BertForSequenceClassification(config)
    if kind == "t5":
        config = tf.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
            decoder_start_token_id=PAD, pad_token_id=PAD, dropout_rate=0.0,
        )
        return tf.T5ForConditionalGeneration(config)
    if kind == "bart":
        config = tf.BartConfig(
            vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=PAD,
            decoder_start_token_id=2, bos_token_id=1, eos_token_id=2, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0,
        )
        return tf.BartForConditionalGeneration(config)
    if kind == "vit":
        config = tf.ViTConfig(
            image_size=16, patch_size=8, num_channels=3, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **small,
        )
        return tf.ViTForImageClassification(config)
    if kind == "wav2vec2":
        config = tf.Wav2Vec2Config(
            vocab_size=16, num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), feat_extract_norm="layer",
            do_stable_layer_norm=True, mask_time_prob=0.2, mask_time_length=2, pad_token_id=0,
            ctc_loss_reduction="mean", layerdrop=0.0, **small,
        )
        return tf.Wav2Vec2ForCTC(config)
    if kind == "clip":
        towers = dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        config = tf.CLIPConfig(
            text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, **towers),
            vision_config=dict(image_size=16, patch_size=8, **towers),
            projection_dim=8,
        )
        return tf.CLIPModel(config)
    raise ValueError(f"unknown model kind {kind!r}")


PACKED = "packed_broadcast_mask"


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A sequence-packing attention with a bug: the batch ``(B, heads, T, d)`` is packed into one
    sequence of ``B * T`` tokens and the padding mask is broadcast across it, where a
    block-diagonal mask was needed: every token attends to the other samples' tokens."""
    b, h, tq, d = query.shape
    tk = key.shape[2]
    q = query.transpose(0, 1).reshape(h, b * tq, d)
    k = key.transpose(0, 1).reshape(h, b * tk, d)
    v = value.transpose(0, 1).reshape(h, b * tk, d)
    scores = q @ k.transpose(1, 2) * (scaling if scaling is not None else d**-0.5)
    if attention_mask is not None:  # bool (B, 1, Tq, Tk), True where a query may attend
        keys = attention_mask[:, 0].any(dim=1).reshape(1, 1, b * tk)
        scores = scores.masked_fill(~keys, float("-inf"))
    out = scores.softmax(dim=-1) @ v  # (heads, B * Tq, d)
    return out.reshape(h, b, tq, d).permute(1, 2, 0, 3).contiguous(), None


def register_packed_attention() -> str:
    """Register :func:`packed_attention` (and the SDPA padding mask for it) with
    ``transformers``; returns its name for ``set_attn_implementation``."""
    tf = require_transformers()
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    tf.AttentionInterface.register(PACKED, packed_attention)
    AttentionMaskInterface.register(PACKED, sdpa_mask)
    return PACKED


def hf_loader(kind: str, batch_size: int = 8, n: int = 32) -> DataLoader:
    """Random data in the form ``kind`` trains on."""
    if kind == "vit":
        return image_loader(n=n, batch_size=batch_size)
    if kind == "bert":
        return token_loader(batch_size=batch_size, n=n, text=True, num_labels=3)
    if kind == "wav2vec2":
        return audio_loader(n=n, batch_size=batch_size)
    if kind == "clip":
        images = image_loader(n=n, batch_size=batch_size).dataset
        tokens = TokenBatches(n=n)
        pairs = [
            {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"],
             "pixel_values": i["pixel_values"]}
            for t, i in zip(tokens.items, images, strict=True)
        ]
        return DataLoader(pairs, batch_size=batch_size)
    return token_loader(batch_size=batch_size, n=n)


# ------------------------------------------------------------------- Lightning's demos
class DemoLSTM(LightningLSTM):
    """``lightning.pytorch.demos.LightningLSTM`` (carries ``self.hidden`` across batches) on random
    tokens instead of WikiText2. Its ``training_step`` is Lightning's own, unchanged.

    Args:
        vocab_size: the token vocabulary.
        nhid: when given, the demo's ``SimpleLSTM`` is built with this embedding and hidden size
            and 2 layers (the demo's 512 and 4 layers make per-sample tests slow on a CPU).
        view_bug: plant :class:`SequenceFirstLSTM` (a ``view`` where a ``transpose`` was
            needed) in place of the demo's ``SimpleLSTM``.
    """

    def __init__(
        self, vocab_size: int = VOCAB, nhid: int | None = None, view_bug: bool = False
    ) -> None:
        super().__init__(vocab_size=vocab_size)
        self.vocab_size = vocab_size
        sizes = {"ninp": nhid, "nhid": nhid, "nlayers": 2} if nhid is not None else {}
        if view_bug:
            self.model = SequenceFirstLSTM(vocab_size, **sizes)
        elif nhid is not None:
            self.model = SimpleLSTM(vocab_size=vocab_size, **sizes)

    def prepare_data(self) -> None:  # WikiText2 would download
        pass

    def train_dataloader(self) -> DataLoader:
        return sequence_loader(vocab=self.vocab_size, batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class DemoTransformer(LightningTransformer):
    """``lightning.pytorch.demos.LightningTransformer`` (``forward(inputs, target)``) on random
    tokens. Its ``training_step`` is Lightning's own, unchanged.

    ``small`` builds its ``Transformer`` with width 16 and one layer each side (Lightning's: 200
    and two); ``batch_pool`` plants :class:`BatchPooledEncoding`."""

    def __init__(
        self, vocab_size: int = VOCAB, batch_pool: bool = False, small: bool = False
    ) -> None:
        super().__init__(vocab_size=vocab_size)
        self.vocab_size = vocab_size
        if small:
            self.model = Transformer(vocab_size, ninp=16, nhead=2, nhid=16, nlayers=1)
        if batch_pool:
            self.model.pos_encoder = BatchPooledEncoding(self.model.ninp)

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return sequence_loader(vocab=self.vocab_size, batch_size=8)


class SequenceFirstLSTM(SimpleLSTM):
    """Lightning's ``SimpleLSTM`` moved to a sequence-first LSTM, with a bug: the batch-first
    embeddings ``(B, T, H)`` are put in ``(T, B, H)`` by a ``view`` instead of a ``transpose``,
    which interleaves the samples."""

    def __init__(self, vocab_size: int, **sizes: int) -> None:
        super().__init__(vocab_size=vocab_size, **sizes)
        self.rnn = nn.LSTM(self.rnn.input_size, self.nhid, self.nlayers, dropout=0.2)

    def forward(self, input: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        emb = self.drop(self.encoder(input))
        b, t, h = emb.shape
        output, hidden = self.rnn(emb.view(t, b, h), hidden)  # meant: emb.transpose(0, 1)
        output = self.drop(output.transpose(0, 1))
        decoded = self.decoder(output).reshape(-1, self.vocab_size)
        return F.log_softmax(decoded, dim=1), hidden


class BatchPooledEncoding(PositionalEncoding):
    """Lightning's ``PositionalEncoding`` with a bug: it adds the mean over the batch axis (meant:
    over the sequence) as a global context vector."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + x.mean(dim=0, keepdim=True))


# --------------------------------------------------------------------- recurrent models
class RNNTagger(L.LightningModule):
    """``nn.LSTM`` / ``nn.GRU`` over embedded tokens, a mean of per-token cross-entropy.

    Args:
        cell: ``"lstm"`` or ``"gru"``.
        batch_first: the recurrent layer's layout; with ``False`` the model transposes to
            sequence-first and back (where a ``view`` in place of ``transpose`` mixes samples).
        view_bug: with ``batch_first=False``, plant that bug: ``x.view(T, B, H)`` instead of
            ``x.transpose(0, 1)`` before the recurrent layer.
    """

    def __init__(
        self,
        cell: str = "lstm",
        batch_first: bool = False,
        hidden: int = 16,
        view_bug: bool = False,
    ):
        super().__init__()
        self.batch_first = batch_first
        self.view_bug = view_bug
        self.embed = nn.Embedding(VOCAB, hidden)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(hidden, hidden, batch_first=batch_first)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (B, T, H)
        if self.batch_first:
            out, _ = self.rnn(x)
        else:
            b, t, h = x.shape
            out, _ = self.rnn(x.view(t, b, h) if self.view_bug else x.transpose(0, 1))  # (T, B, H)
            out = out.transpose(0, 1)
        return self.head(out)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        tokens, target = batch
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


# --------------------------------------------------------------- token-level losses
class TokenLM(L.LightningModule):
    """A tiny token model (embedding, one hidden layer, a vocabulary head) trained with a
    token-level cross-entropy over labels padded with -100, written as users write it.

    Args:
        reduction: ``"mean"`` (``F.cross_entropy(..., ignore_index=-100)``: a mean over the
            batch's non-ignored tokens), ``"sum"`` (``reduction="sum"``: a planted bug),
            ``"window"`` (the token sum divided by ``batch["num_items"]``, the count of the whole
            accumulation window: the ``num_items_in_batch`` recipe), ``"per-sample"`` (each
            sample's own token mean, averaged over the samples).
        mix: plant coupling: each sample's hidden states get half of the previous sample's.
        batchnorm: a train-mode ``BatchNorm1d`` over the hidden features (couples samples).
    """

    def __init__(
        self,
        reduction: str = "mean",
        mix: bool = False,
        batchnorm: bool = False,
        hidden: int = 16,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        self.reduction, self.mix, self.lr = reduction, mix, lr
        self.embed = nn.Embedding(VOCAB, hidden)
        self.body = nn.Linear(hidden, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(self.embed(ids)))  # (B, T, H)
        if self.mix:
            h = h + 0.5 * h.roll(1, dims=0)
        h = self.norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        return self.head(h)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, labels = self(batch["input_ids"]), batch["labels"]
        flat_logits, flat_labels = logits.reshape(-1, VOCAB), labels.reshape(-1)
        if self.reduction == "mean":
            return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
        if self.reduction == "sum":
            return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
        if self.reduction == "window":
            total = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
            return total / batch["num_items"][0]
        token = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="none")
        token = token.reshape(labels.shape)
        return (token.sum(1) / (labels != -100).sum(1)).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def token_batch(counts: list[int], length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One batch of ``len(counts)`` sequences of ``length`` tokens whose labels keep ``counts[i]``
    tokens (the rest -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(counts), length), generator=g)
    kept = torch.arange(length) < torch.tensor(counts)[:, None]
    return {
        "input_ids": ids.masked_fill(~kept, PAD),
        "attention_mask": kept.long(),
        "labels": ids.masked_fill(~kept, -100),
    }


def token_windows(
    windows: list[list[list[int]]], length: int, num_items: bool = False
) -> DataLoader:
    """Batches built ahead, one accumulation window after the other: ``windows[w][m]`` is the
    list of per-sample token counts of micro-batch ``m`` of window ``w``. With ``num_items``,
    every batch carries ``num_items`` (``[B]``, repeated): the window's total count."""
    batches = []
    for w, window in enumerate(windows):
        total = sum(sum(counts) for counts in window)
        for m, counts in enumerate(window):
            batch = token_batch(counts, length, seed=100 * w + m)
            if num_items:
                batch["num_items"] = torch.full((len(counts),), total)
            batches.append(batch)
    return DataLoader(batches, batch_size=None)
