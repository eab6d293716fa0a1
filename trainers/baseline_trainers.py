"""nnU-Net CNN baselines with the same short budgets as our EquiFlex smoke/demo trainers.

Comparisons are only fair when both networks get the same number of epochs and iterations. These trainers
change nothing but the budget: the CNN keeps nnU-Net's default recipe, ``nnUNetPlans``, mirroring augmentation
and test-time mirroring. nnU-Net imports every module in this folder as a top-level module when it looks up
a trainer through ``nnUNet_extTrainer``, so this file uses absolute imports only.

    nnUNetv2_train 900 2d 0 -tr nnUNetTrainer_equiflexSmoke -p nnUNetPlans -device cpu
    nnUNetv2_train 900 2d 0 -tr EquiFlexTrainerTiny_smoke -p EquiFlexPlans -device cpu
"""

from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring,
)

from nnunet_equiflex.trainers.equiflex_trainers import (
    SMOKE_BUDGET,
    EquiFlexTrainerFlip0,
    EquiFlexTrainerFlip2,
    EquiFlexTrainerFlip4,
    EquiFlexTrainerMicro4,
    EquiFlexTrainerMini4,
    EquiFlexTrainerSmallLift4,
    EquiFlexTrainerSmallLift4Conv,
    EquiFlexTrainerTiny,
    EquiFlexTrainerTiny3D,
    EquiFlexTrainerTinyConv,
    EquiFlexTrainerTinyConvCN,
    EquiFlexTrainerTinyLift4,
    EquiFlexTrainerTinyLift4Conv,
    EquiFlexTrainerTinyLift4RPB,
    EquiFlexTrainerTinyLiftHead,
    EquiFlexTrainerTinyLiftRef,
    EquiFlexTrainerViTS8,
    EquiFlexTrainerViTS8_3D,
    EquiFlexTrainerViTTi8,
    EquiFlexTrainerViTTi8_3D,
    FlexTrainerFlip0,
    FlexTrainerTiny,
    FlexTrainerTinyNoMirroring,
)

__all__ = [
    "SMOKE_BUDGET",
    "DEMO_BUDGET",
    "nnUNetTrainer_equiflexSmoke",
    "nnUNetTrainer_equiflexDemo",
    "EquiFlexTrainerTiny_demo",
    "BUDGET_ENV",
    "LR_ENV",
    "budget_variant",
    "nnUNetTrainer_budget",
    "nnUNetTrainerNoMirroring_budget",
    "EquiFlexTrainerViTS8_budget",
    "EquiFlexTrainerFlip0_budget",
    "EquiFlexTrainerFlip2_budget",
    "EquiFlexTrainerFlip4_budget",
    "EquiFlexTrainerViTTi8_budget",
    "EquiFlexTrainerMini4_budget",
    "EquiFlexTrainerMicro4_budget",
    "EquiFlexTrainerTinyLiftRef_budget",
    "EquiFlexTrainerTinyLift4_budget",
    "EquiFlexTrainerSmallLift4_budget",
    "EquiFlexTrainerTinyLiftHead_budget",
    "EquiFlexTrainerTinyLift4RPB_budget",
    "EquiFlexTrainerTinyLift4Conv_budget",
    "EquiFlexTrainerSmallLift4Conv_budget",
    "EquiFlexTrainerTinyConv_budget",
    "EquiFlexTrainerTinyConvCN_budget",
    "EquiFlexTrainerTiny_budget",
    "FlexTrainerFlip0_budget",
    "FlexTrainerTiny_budget",
    "FlexTrainerTinyNoMirroring_budget",
    "EquiFlexTrainerViTS8_3D_budget",
    "EquiFlexTrainerViTTi8_3D_budget",
    "EquiFlexTrainerTiny3D_budget",
]

# (epochs, training iterations per epoch, validation iterations per epoch)
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


BUDGET_ENV = "EQUIFLEX_BUDGET"


def budget_from_env() -> tuple[int, int, int]:
    """``EQUIFLEX_BUDGET=EPOCHS,ITERATIONS,VAL_ITERATIONS``: the budget of the ``*_budget`` trainers."""
    value = os.environ.get(BUDGET_ENV, "")
    try:
        budget = tuple(int(v) for v in value.split(","))
    except ValueError:
        budget = ()
    if len(budget) != 3 or min(budget) < 1:
        raise RuntimeError(
            f"{BUDGET_ENV}={value!r}: the *_budget trainers take their budget from this variable, as three positive "
            f"integers EPOCHS,ITERATIONS_PER_EPOCH,VALIDATION_ITERATIONS, e.g. export {BUDGET_ENV}=10,50,5"
        )
    return budget


LR_ENV = "EQUIFLEX_LR"


def lr_from_env() -> float | None:
    """``EQUIFLEX_LR=0.004``: the ``*_budget`` trainers' initial learning rate (``benchmarks/lr_sweep.py``);
    None (unset or empty) keeps the trainer's own."""
    value = os.environ.get(LR_ENV, "").strip()
    if not value:
        return None
    try:
        lr = float(value)
    except ValueError:
        lr = float("nan")
    if not lr > 0 or lr == float("inf"):
        raise RuntimeError(
            f"{LR_ENV}={value!r}: the *_budget trainers take their initial learning rate from this variable, as one "
            f"positive number, e.g. export {LR_ENV}=0.002; unset it to keep the trainer's own"
        )
    return lr


def budget_variant(base: type) -> type:
    """``<base>_budget``: ``base`` with the budget of ``EQUIFLEX_BUDGET`` (benchmarks train every network the same)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        _set_budget(self, budget_from_env())
        lr = lr_from_env()
        if lr is not None:
            self.initial_lr = lr
        self.save_every = 1  # a benchmark's training of hours resumes from the last epoch (`--c`), not from epoch 0

    doc = f"{base.__name__} with the training budget of ${BUDGET_ENV} (EPOCHS,ITERATIONS,VALIDATION_ITERATIONS)."
    return type(f"{base.__name__}_budget", (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


nnUNetTrainer_budget = budget_variant(nnUNetTrainer)
nnUNetTrainerNoMirroring_budget = budget_variant(nnUNetTrainerNoMirroring)  # no mirroring augmentation, no TTA
EquiFlexTrainerViTS8_budget = budget_variant(EquiFlexTrainerViTS8)
EquiFlexTrainerFlip0_budget = budget_variant(EquiFlexTrainerFlip0)
EquiFlexTrainerFlip2_budget = budget_variant(EquiFlexTrainerFlip2)
EquiFlexTrainerFlip4_budget = budget_variant(EquiFlexTrainerFlip4)
EquiFlexTrainerViTTi8_budget = budget_variant(EquiFlexTrainerViTTi8)
EquiFlexTrainerTiny_budget = budget_variant(EquiFlexTrainerTiny)
EquiFlexTrainerMini4_budget = budget_variant(EquiFlexTrainerMini4)
EquiFlexTrainerMicro4_budget = budget_variant(EquiFlexTrainerMicro4)
EquiFlexTrainerTinyLiftRef_budget = budget_variant(EquiFlexTrainerTinyLiftRef)
EquiFlexTrainerTinyLift4_budget = budget_variant(EquiFlexTrainerTinyLift4)
EquiFlexTrainerSmallLift4_budget = budget_variant(EquiFlexTrainerSmallLift4)
EquiFlexTrainerTinyLiftHead_budget = budget_variant(EquiFlexTrainerTinyLiftHead)
EquiFlexTrainerTinyLift4RPB_budget = budget_variant(EquiFlexTrainerTinyLift4RPB)
EquiFlexTrainerTinyLift4Conv_budget = budget_variant(EquiFlexTrainerTinyLift4Conv)
EquiFlexTrainerSmallLift4Conv_budget = budget_variant(EquiFlexTrainerSmallLift4Conv)
EquiFlexTrainerTinyConv_budget = budget_variant(EquiFlexTrainerTinyConv)
EquiFlexTrainerTinyConvCN_budget = budget_variant(EquiFlexTrainerTinyConvCN)
FlexTrainerFlip0_budget = budget_variant(FlexTrainerFlip0)
FlexTrainerTiny_budget = budget_variant(FlexTrainerTiny)
FlexTrainerTinyNoMirroring_budget = budget_variant(FlexTrainerTinyNoMirroring)
EquiFlexTrainerViTS8_3D_budget = budget_variant(EquiFlexTrainerViTS8_3D)  # 3d_fullres (benchmarks/frontier.py --3d)
EquiFlexTrainerViTTi8_3D_budget = budget_variant(EquiFlexTrainerViTTi8_3D)
EquiFlexTrainerTiny3D_budget = budget_variant(EquiFlexTrainerTiny3D)


class EquiFlexTrainerTiny_demo(EquiFlexTrainerTiny):
    """Tiny EquiFlex with the main job's default budget (same as nnUNetTrainer_equiflexDemo)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _set_budget(self, DEMO_BUDGET)
        self.warmup_epochs = 0
