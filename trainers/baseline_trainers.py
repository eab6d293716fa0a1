"""nnU-Net CNN baselines with the same short budgets as our EquiFlex smoke/demo trainers.

Comparisons are only fair when both networks get the same number of epochs and iterations. These trainers
change nothing but the budget: the CNN keeps nnU-Net's default recipe, ``nnUNetPlans``, mirroring augmentation
and test-time mirroring. nnU-Net imports every module in this folder as a top-level module when it looks up
a trainer through ``nnUNet_extTrainer``, so this file uses absolute imports only.

    nnUNetv2_train 900 2d 0 -tr nnUNetTrainer_equiflexSmoke -p nnUNetPlans -device cpu
    nnUNetv2_train 900 2d 0 -tr EquiFlexTrainerTiny_smoke -p EquiFlexPlans -device cpu
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_equiflex.trainers.equiflex_trainers import EquiFlexTrainerTiny

__all__ = [
    "SMOKE_BUDGET",
    "DEMO_BUDGET",
    "nnUNetTrainer_equiflexSmoke",
    "nnUNetTrainer_equiflexDemo",
    "EquiFlexTrainerTiny_demo",
]

# (epochs, training iterations per epoch, validation iterations per epoch)
SMOKE_BUDGET = (4, 25, 5)  # the budget of EquiFlexTrainerTiny_smoke
DEMO_BUDGET = (5, 40, 5)  # the main job's default: twice the smoke iterations, ~5 min per network on 2 CPU cores


def _set_budget(trainer: nnUNetTrainer, budget: tuple[int, int, int]) -> None:
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = budget


class nnUNetTrainer_equiflexSmoke(nnUNetTrainer):
    """nnU-Net's default CNN trainer with EquiFlexTrainerTiny_smoke's budget (4 epochs x 25 iterations)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _set_budget(self, SMOKE_BUDGET)


class nnUNetTrainer_equiflexDemo(nnUNetTrainer):
    """nnU-Net's default CNN trainer with EquiFlexTrainerTiny_demo's budget."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _set_budget(self, DEMO_BUDGET)


class EquiFlexTrainerTiny_demo(EquiFlexTrainerTiny):
    """Tiny EquiFlex with the main job's default budget (same as nnUNetTrainer_equiflexDemo)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _set_budget(self, DEMO_BUDGET)
        self.warmup_epochs = 0
