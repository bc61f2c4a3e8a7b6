"""A 2-layer character-level transformer trained with kfac_ddp (or, as a control, ``--strategy ddp``:
the same run without K-FAC); writes rank R's training losses and final parameters to
``<out>/rank<R>.pt``."""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_kfac

TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
    "Rough winds do shake the darling buds of May, And summer's lease hath all too short a date; "
    "Sometime too hot the eye of heaven shines, And often is his gold complexion dimm'd; "
) * 4
CONTEXT = 16


class CharTransformer(pl.LightningModule):
    def __init__(self, vocab: int, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(CONTEXT, dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)
        self.losses: list[float] = []

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.position, mask=self.mask, is_causal=True)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).reshape(-1, self.head.out_features), y.reshape(-1))
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--strategy", choices=("kfac_ddp", "ddp"), default="kfac_ddp")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    chars = sorted(set(TEXT))
    ids = torch.tensor([chars.index(c) for c in TEXT])
    starts = torch.arange(0, len(ids) - CONTEXT - 1, 3)
    x = torch.stack([ids[s : s + CONTEXT] for s in starts])
    y = torch.stack([ids[s + 1 : s + CONTEXT + 1] for s in starts])
    model = CharTransformer(len(chars))
    trainer = pl.Trainer(
        strategy=args.strategy,
        callbacks=[lightning_kfac.KFACCallback(damping=0.03, inv_update_freq=5)] if args.strategy == "kfac_ddp" else [],
        accelerator="cpu",
        devices=args.devices,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, drop_last=True))
    torch.save(
        {"losses": model.losses, "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])},
        os.path.join(args.out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
