"""Learning-rate schedule for ViT training inside nnU-Net's epoch loop."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler


def warmup_poly_factor(epoch: int, num_epochs: int, warmup_epochs: int, exponent: float = 0.9) -> float:
    """Linear warmup over ``warmup_epochs`` (from 1/(w+1) of the peak), then polynomial decay to 0."""
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    decay_epochs = max(1, num_epochs - warmup_epochs)
    return max(0.0, 1 - (epoch - warmup_epochs) / decay_epochs) ** exponent


class WarmupPolyLRScheduler(LRScheduler):
    """A pure function of the epoch, like nnU-Net's ``PolyLRScheduler``: ``step(epoch)`` sets
    every group's lr to ``base_lr * factor(epoch)``. Being stateless, it resumes exactly from a
    checkpoint's epoch counter. Per-group ``lr_scale`` (layer-wise decay) is honoured."""

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, warmup_epochs: int, exponent: float = 0.9):
        self.num_epochs = num_epochs
        self.warmup_epochs = warmup_epochs
        self.exponent = exponent
        super().__init__(optimizer, last_epoch=-1)

    def get_lr(self) -> list[float]:
        factor = warmup_poly_factor(max(self.last_epoch, 0), self.num_epochs, self.warmup_epochs, self.exponent)
        return [
            base * group.get("lr_scale", 1.0) * factor
            for base, group in zip(self.base_lrs, self.optimizer.param_groups)
        ]

    def step(self, epoch: int | None = None) -> None:
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
