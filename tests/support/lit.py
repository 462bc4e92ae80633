"""The Lightning module the callback tests train: ``EmbHead`` on a few batches of random tokens.

Imported by tests after their ``pytest.importorskip("lightning.pytorch")``: it imports lightning.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from support.models import EmbHead


class LitEmbHead(pl.LightningModule):
    """``EmbHead`` trained with SGD on ``batches`` batches of two 6-token rows (a fixed seed)."""

    def __init__(self, batches: int = 4):
        super().__init__()
        self.model = EmbHead()
        self.batches = batches

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return nn.functional.cross_entropy(self.model(x).flatten(0, 1), x.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randint(0, 32, (2 * self.batches, 6), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=2)
