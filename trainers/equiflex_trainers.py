"""nnU-Net trainers for EquiFlexFormer.

nnU-Net finds these through ``nnUNet_extTrainer`` (``nnunet-equiflex env`` prints the export
line) or through the shim that ``nnunet-equiflex install-trainers`` places in nnunetv2's
trainer folder. Variants are tiny subclasses that change one thing, as in nnU-Net.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

import nnunet_equiflex.nnunet_patch  # noqa: F401  nnU-Net's predictor: mirror-symmetric window for our networks
from nnunet_equiflex.atomic import atomic_write, remove_stale_partials
from nnunet_equiflex.fault_injection import checkpoint_stream
from nnunet_equiflex.network import (
    DEFAULT_PRESET,
    EquiFlexFormer,
    preset_kwargs,
    preset_shape_kwargs,
    unwrap_network,
)
from nnunet_equiflex.optim import vit_param_groups
from nnunet_equiflex.planning import (
    fit_patch_size,
    lateralised_label_warning,
    network_kwargs,
)
from nnunet_equiflex.resume import choose_checkpoint
from nnunet_equiflex.schedules import WarmupPolyLRScheduler

VIT_S8_SHAPE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "norm_eps")
# What a variant of the reference (FlipModelK) changes; the pretrained trainers take these from the plans.
LIFTING_KEYS = ("group", "n_lifted_blocks", "group_pooling", "n_global_blocks")

__all__ = [
    "EquiFlexTrainer",
    "EquiFlexTrainer_5epochs",
    "EquiFlexTrainer_50epochs",
    "EquiFlexTrainer_100epochs",
    "EquiFlexTrainer_250epochs",
    "EquiFlexTrainer_500epochs",
    "FlexTrainer",
    "FlexTrainerNoMirroring",
    "EquiFlexTrainerViTS8",
    "EquiFlexTrainerFlip0",
    "EquiFlexTrainerFlip2",
    "EquiFlexTrainerFlip4",
    "EquiFlexTrainerViTTi8",
    "FlexTrainerFlip0",
    "EquiFlexTrainerTiny",
    "EquiFlexTrainerMini4",
    "EquiFlexTrainerMicro4",
    "EquiFlexTrainerTinyLiftRef",
    "EquiFlexTrainerTinyLift4",
    "EquiFlexTrainerSmallLift4",
    "EquiFlexTrainerTinyLiftHead",
    "EquiFlexTrainerTinyLift4RPB",
    "EquiFlexTrainerTinyLift4Conv",
    "EquiFlexTrainerSmallLift4Conv",
    "EquiFlexTrainerTinyConv",
    "EquiFlexTrainerTinyConvCN",
    "FlexTrainerTiny",
    "FlexTrainerTinyNoMirroring",
    "EquiFlexTrainerTiny_smoke",
    "FlexTrainerTiny_smoke",
    "EquiFlexTrainerTiny3D",
    "EquiFlexTrainerTiny3D_smoke",
    "EquiFlexTrainerViTS8_3D",
    "EquiFlexTrainerViTTi8_3D",
    "EquiFlexTrainerPretrained3D",
    "EquiFlexTrainerPretrained",
    "EquiFlexTrainerPretrainedTiny_smoke",
    "EquiFlexTrainerD4",
    "EquiFlexTrainerGMR",
    "EquiFlexTrainerDilated",
    "EquiFlexTrainerD4Tiny_smoke",
    "EquiFlexTrainerGMRTiny_smoke",
    "EquiFlexTrainerDilatedTiny_smoke",
    "check_patch_fits_group",
    "check_network_fits_configuration",
    "PRETRAINED_ENV",
    "pretrained_checkpoint_from_env",
]


@dataclass(frozen=True)
class Recipe:
    """How a network trains: AdamW's initial learning rate and weight decay, and the stochastic depth of the
    last block (linear from 0 over the blocks). Part of the trainer, so the same with any plans."""

    lr: float
    weight_decay: float
    drop_path_rate: float


# The ViT recipe, for the 12-block shapes (vit_s8 and its FlipModel variants, vit_ti8, the 3D ViT-S/8).
VIT_RECIPE = Recipe(lr=3e-4, weight_decay=5e-2, drop_path_rate=0.1)
# Networks of up to SHORT_DEPTH blocks (tiny, tiny_lift4, small_lift4, small_lift4_conv: the default): the recipe
# their frontier records were trained with. Stochastic depth over 4 blocks only slows them down; tiny's mean Dice
# moves within 1.4 points over learning rates 2e-3 to 8e-3 (benchmarks/lr_sweep_cpu: 4e-3 best, run-to-run spread
# about 0.4).
SHORT_RECIPE = Recipe(lr=2e-3, weight_decay=1e-4, drop_path_rate=0.0)
SHORT_DEPTH = 4


def trainer_recipe(trainer_cls: type, kwargs: dict[str, Any]) -> Recipe:
    """The trainer's own recipe, or by the depth of the network it builds (``EquiFlexTrainer`` trains the plans'
    network: the default's short recipe, the ViT recipe over plans of a 12-block preset)."""
    if trainer_cls.recipe is not None:
        return trainer_cls.recipe
    return SHORT_RECIPE if kwargs["depth"] <= SHORT_DEPTH else VIT_RECIPE


def _configured_kwargs(trainer_cls: type, configuration_manager: ConfigurationManager) -> dict[str, Any]:
    """The plans' network (or the trainer's preset when the plans name another), the variant's overrides, and the
    recipe's drop path."""
    architecture = configuration_manager.configuration.get("architecture")
    kwargs = network_kwargs(architecture, trainer_cls.network_preset, trainer_cls.network_overrides)
    kwargs["drop_path_rate"] = trainer_recipe(trainer_cls, kwargs).drop_path_rate
    return kwargs


def _make_builder(trainer_cls: type) -> staticmethod:
    """nnU-Net's predictor calls ``build_network_architecture`` on the class, unbound; a
    staticmethod per class keeps that signature while each variant keeps its own network."""

    def build_network_architecture(
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        kwargs = _configured_kwargs(trainer_cls, configuration_manager)
        return EquiFlexFormer(in_channels=num_input_channels, num_classes=num_output_channels, **kwargs)

    return staticmethod(build_network_architecture)


class EquiFlexTrainer(nnUNetTrainer):
    """EquiFlexFormer (the plans' network; without EquiFlex plans the default preset, ``small_lift4_conv``: a stem of
    stride-2 convolutions to tokens of 4x4 px, 128 wide, 4 blocks, all lifted over the D2 flips, block 0 global,
    1-3 local FlexAttention windows) with AdamW,
    linear warmup then poly decay, gradient clipping at 1, no deep supervision, mixed precision on CUDA (bf16 where
    supported). Learning rate, weight decay and drop path follow the network's depth (``trainer_recipe``).

    Test-time mirroring is off by default: the network is exactly mirror-equivariant,
    ``f(flip(x)) = flip(f(x))``, so nnU-Net's 4 mirrored passes per tile (8 in 3D) would average
    copies of the same prediction. One pass per tile gives the same result at a fraction of the cost.
    3D configurations (``3d_fullres``) work when the configuration's network is 3D: plans written by
    ``nnunet-equiflex plan -c 3d_fullres``, or a 3D trainer such as ``EquiFlexTrainerTiny3D``.
    Mirroring augmentation in training is off for the same reason: DC and CE losses of a
    mirrored sample equal those of the original for an equivariant network.
    """

    network_preset = DEFAULT_PRESET
    network_overrides: dict[str, Any] = {}  # what a variant is about; wins over the plans
    recipe: Recipe | None = None  # None: by the depth of the network built (trainer_recipe)
    mirroring = True  # nnU-Net's mirroring augmentation and TTA for a non-equivariant network (always off otherwise)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.build_network_architecture = _make_builder(cls)

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        self.continuing_training = bool(plans.get("continue_training", False))  # --c; nnUNetTrainer pops the key
        # Fail before nnU-Net creates folders and logs for a run that cannot work.
        check_patch_fits_group(type(self), plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        recipe = trainer_recipe(type(self), _configured_kwargs(type(self), self.configuration_manager))
        self.initial_lr, self.weight_decay = recipe.lr, recipe.weight_decay
        self.layer_decay: float | None = None
        self.warmup_epochs = 50
        self.grad_clip = 1.0
        self.enable_deep_supervision = False
        self.use_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        if self.use_bf16:
            self.grad_scaler = None  # bf16 has fp32's exponent range: no loss scaling needed
        self._fit_patch_size_to_tokens(configuration)

    @property
    def is_equivariant(self) -> bool:
        return _configured_kwargs(type(self), self.configuration_manager).get("group", "d2") != "none"

    def _fit_patch_size_to_tokens(self, configuration: str) -> None:
        token = _configured_kwargs(type(self), self.configuration_manager)["patch_size"]
        patch = tuple(self.configuration_manager.patch_size)
        fitted = fit_patch_size(patch, token)
        if fitted == patch:
            return
        self.print_to_log_file(
            f"Note: patch size {patch} is not a multiple of the token size {token}; training and inference use "
            f"{fitted} instead (nnU-Net pads smaller images). Plan with 'nnunet-equiflex plan' to avoid this note."
        )
        self.plans_manager.plans["configurations"][configuration]["patch_size"] = list(fitted)
        self.plans_manager.get_configuration.cache_clear()
        self.configuration_manager = self.plans_manager.get_configuration(configuration)

    def on_train_start(self):
        self._warn_if_lateralised()
        super().on_train_start()
        if self.local_rank == 0:
            for path in remove_stale_partials(self.output_folder):
                self.print_to_log_file(f"removed {path.name}: a checkpoint write cut off by a kill")

    def _warn_if_lateralised(self) -> None:
        if self.is_equivariant:
            warning = lateralised_label_warning(type(self).__name__, list(self.dataset_json.get("labels", {})))
            if warning:
                self.print_to_log_file(warning)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = (
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        if self.is_equivariant or not self.mirroring:
            self.inference_allowed_mirroring_axes = None
            mirror_axes = None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def configure_optimizers(self):
        depth = len(self.network.encoder.blocks) if self.layer_decay is not None else None
        groups = vit_param_groups(self.network, self.weight_decay, self.layer_decay, depth)
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=(0.9, 0.999), fused=self.device.type == "cuda")
        warmup = min(self.warmup_epochs, self.num_epochs // 10)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.num_epochs, warmup)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """The network has a single output; there is nothing to switch."""

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = target[0] if isinstance(target, list) else target
        target = target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            autocast = torch.autocast("cuda", dtype=torch.bfloat16 if self.use_bf16 else torch.float16)
        else:
            autocast = dummy_context()  # CPU autocast is slow; train in fp32
        with autocast:
            loss = self.loss(self.network(data), target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically (see ``nnunet_equiflex.atomic``): a kill during the write
        leaves the previous file of that name intact, never a truncated one."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)  # nothing is written there
        with atomic_write(filename) as f:
            # nnU-Net builds the checkpoint and hands its target to torch.save, which also takes a file object.
            super().save_checkpoint(checkpoint_stream(f, os.path.basename(filename)))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """For --c, an unreadable checkpoint is skipped for the next readable one (final, latest, best) with one
        log line; with --val, or when none is readable, the run stops with a message saying what to do."""
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            chosen = choose_checkpoint(filename_or_checkpoint, self.continuing_training, self.print_to_log_file)
            filename_or_checkpoint = str(chosen)
        super().load_checkpoint(filename_or_checkpoint)


EquiFlexTrainer.build_network_architecture = _make_builder(EquiFlexTrainer)


def _epochs_variant(base: type, epochs: int) -> type:
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs

    return type(f"{base.__name__}_{epochs}epochs", (base,), {"__init__": __init__, "__module__": __name__})


EquiFlexTrainer_5epochs = _epochs_variant(EquiFlexTrainer, 5)
EquiFlexTrainer_50epochs = _epochs_variant(EquiFlexTrainer, 50)
EquiFlexTrainer_100epochs = _epochs_variant(EquiFlexTrainer, 100)
EquiFlexTrainer_250epochs = _epochs_variant(EquiFlexTrainer, 250)
EquiFlexTrainer_500epochs = _epochs_variant(EquiFlexTrainer, 500)


class FlexTrainer(EquiFlexTrainer):
    """The same ViT without the lifting (group "none"): the non-equivariant ablation. It is not
    mirror-consistent, so it keeps nnU-Net's mirroring augmentation and test-time mirroring."""

    network_overrides = {"group": "none"}


class FlexTrainerNoMirroring(FlexTrainer):
    """FlexTrainer without mirroring augmentation and TTA, for left/right labels that only the side of the image
    tells apart: mirroring a training sample moves a left structure to the right and keeps its label, which
    teaches any network to ignore the side (README, "Lateralised labels")."""

    mirroring = False


def _preset_variant(base: type, name: str, preset: str, doc: str) -> type:
    """A one-change subclass: the whole network shape of ``preset``, also over plans that name another."""
    overrides = {**preset_shape_kwargs(preset), **base.network_overrides}
    attributes = {"network_preset": preset, "network_overrides": overrides, "__doc__": doc, "__module__": __name__}
    return type(name, (base,), attributes)


EquiFlexTrainerViTS8 = _preset_variant(
    EquiFlexTrainer, "EquiFlexTrainerViTS8", "vit_s8", "ViT-S/8, 4 lifted blocks, all 4 global, max pooling."
)
EquiFlexTrainerFlip0 = _preset_variant(
    EquiFlexTrainer,
    "EquiFlexTrainerFlip0",
    "vit_s8_flip0",
    "ViT-S/8 as the reference's FlipModel0: lifted embedding (mean, folded into one pass), blocks 0-1 global.",
)
EquiFlexTrainerFlip2 = _preset_variant(
    EquiFlexTrainer, "EquiFlexTrainerFlip2", "vit_s8_flip2", "ViT-S/8 as FlipModel2: 2 lifted global blocks, max."
)
EquiFlexTrainerFlip4 = _preset_variant(
    EquiFlexTrainer,
    "EquiFlexTrainerFlip4",
    "vit_s8_flip4",
    "ViT-S/8 as FlipModel4: 4 lifted blocks (0-1 global, 2-3 local), max pooling.",
)
EquiFlexTrainerViTTi8 = _preset_variant(
    EquiFlexTrainer,
    "EquiFlexTrainerViTTi8",
    "vit_ti8",
    "ViT-Ti/8 shape (192 wide, 3 heads, 12 blocks) with FlipModel0's lifting.",
)

FlexTrainerFlip0 = _preset_variant(
    FlexTrainer,
    "FlexTrainerFlip0",
    "vit_s8_flip0",
    "EquiFlexTrainerFlip0's ViT without the lifting (group none): its non-equivariant ablation, with TTA.",
)


class EquiFlexTrainerTiny(EquiFlexTrainer):
    """The tiny preset (64-dim, 4 blocks, token size 4): CPU runs, demos and tests."""

    network_preset = "tiny"
    network_overrides = preset_shape_kwargs("tiny")  # the whole shape, also over plans that name vit_s8
    recipe = SHORT_RECIPE


class EquiFlexTrainerMini4(EquiFlexTrainerTiny):
    """The mini4 preset (192 wide, 6 blocks, token size 4, lifted embedding folded into one pass, 2 global)."""

    network_preset = "mini4"
    network_overrides = preset_shape_kwargs("mini4")
    recipe = replace(SHORT_RECIPE, lr=1e-3)  # wider than tiny: half its learning rate


class EquiFlexTrainerMicro4(EquiFlexTrainerMini4):
    """The micro4 preset: mini4 at 128 wide (4 heads)."""

    network_preset = "micro4"
    network_overrides = preset_shape_kwargs("micro4")


class EquiFlexTrainerTinyLiftRef(EquiFlexTrainerTiny):
    """tiny with the lifted full-resolution refinement (oriented kernels, run per group element)."""

    network_preset = "tiny_liftref"
    network_overrides = preset_shape_kwargs("tiny_liftref")


class EquiFlexTrainerTinyLift4(EquiFlexTrainerTiny):
    """tiny with all 4 blocks lifted (4 copies, max-pooled before the head), block 0 global, 1-3 local."""

    network_preset = "tiny_lift4"
    network_overrides = preset_shape_kwargs("tiny_lift4")


class EquiFlexTrainerSmallLift4(EquiFlexTrainerTiny):
    """tiny_lift4 at twice the width (128, 4 heads): all 4 blocks lifted, block 0 global, 1-3 local."""

    network_preset = "small_lift4"
    network_overrides = preset_shape_kwargs("small_lift4")


class EquiFlexTrainerTinyLiftHead(EquiFlexTrainerTiny):
    """tiny_lift4 with the lifted head: each of the 4 unpooled copies predicts its tokens' pixels too, and the
    copies' full-resolution maps are averaged back before the refinement."""

    network_preset = "tiny_lifthead"
    network_overrides = preset_shape_kwargs("tiny_lifthead")


class EquiFlexTrainerTinyLift4RPB(EquiFlexTrainerTiny):
    """tiny_lift4 with a relative position bias per head and window offset in its local blocks."""

    network_preset = "tiny_lift4_rpb"
    network_overrides = preset_shape_kwargs("tiny_lift4_rpb")


class EquiFlexTrainerTinyLift4Conv(EquiFlexTrainerTiny):
    """tiny_lift4 with the convolutional stem (stride-2 3x3 convolutions) instead of the 4x4 patch projection."""

    network_preset = "tiny_lift4_conv"
    network_overrides = preset_shape_kwargs("tiny_lift4_conv")


class EquiFlexTrainerSmallLift4Conv(EquiFlexTrainerTiny):
    """small_lift4 with the convolutional stem."""

    network_preset = "small_lift4_conv"
    network_overrides = preset_shape_kwargs("small_lift4_conv")


class EquiFlexTrainerTinyConv(EquiFlexTrainerTiny):
    """tiny (1 of 4 blocks lifted) with the convolutional stem."""

    network_preset = "tiny_conv"
    network_overrides = preset_shape_kwargs("tiny_conv")


class EquiFlexTrainerTinyConvCN(EquiFlexTrainerTiny):
    """tiny_conv with the stem's norm per pixel over the channels instead of per image."""

    network_preset = "tiny_conv_cn"
    network_overrides = preset_shape_kwargs("tiny_conv_cn")


class FlexTrainerTiny(EquiFlexTrainerTiny):
    """The tiny network without the lifting (group "none"): FlexTrainer's ablation at CPU size, with mirroring."""

    network_overrides = {**EquiFlexTrainerTiny.network_overrides, "group": "none"}


class FlexTrainerTinyNoMirroring(FlexTrainerTiny):
    mirroring = False


# (epochs, training iterations per epoch, validation iterations per epoch) of the smoke trainers
SMOKE_BUDGET = (4, 25, 5)


def _use_smoke_schedule(trainer: EquiFlexTrainer) -> None:
    """The bounded CPU run of the smoke trainers: SMOKE_BUDGET, no warmup."""
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = SMOKE_BUDGET
    trainer.warmup_epochs = 0


class EquiFlexTrainerTiny_smoke(EquiFlexTrainerTiny):
    """A bounded CPU run (4 epochs x 25 iterations) for smoke tests and CI."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _use_smoke_schedule(self)


class FlexTrainerTiny_smoke(EquiFlexTrainerTiny_smoke):
    network_overrides = {**EquiFlexTrainerTiny.network_overrides, "group": "none"}


class EquiFlexTrainerTiny3D(EquiFlexTrainerTiny):
    """The tiny3d preset (32-dim, 3 blocks, the 8 flips of a volume) for 3d_fullres: CPU runs, demos and tests.

    Its shape wins over the plans' network, except the token size: the planner makes it anisotropic where the
    spacing is (e.g. 2x4x4), and a token the plans chose fits their patch size."""

    network_preset = "tiny3d"
    network_overrides = {k: v for k, v in preset_shape_kwargs("tiny3d").items() if k != "patch_size"}


class EquiFlexTrainerTiny3D_smoke(EquiFlexTrainerTiny3D):
    """A bounded CPU run (4 epochs x 25 iterations), as EquiFlexTrainerTiny_smoke, in 3D."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _use_smoke_schedule(self)


def _preset_variant_3d(name: str, preset: str, doc: str) -> type:
    """As ``_preset_variant`` for a 3D preset, except the token size: the plans' (anisotropic where the spacing
    is, e.g. 4x8x8), so that it fits their patch size."""
    overrides = {k: v for k, v in preset_shape_kwargs(preset).items() if k != "patch_size"}
    attributes = {"network_preset": preset, "network_overrides": overrides, "__doc__": doc, "__module__": __name__}
    return type(name, (EquiFlexTrainer,), attributes)


EquiFlexTrainerViTS8_3D = _preset_variant_3d(
    "EquiFlexTrainerViTS8_3D",
    "vit_s8_3d",
    "ViT-S/8 in 3D (3d_fullres): the 8 flips lifted at the embedding (mean, folded), blocks 0-1 global.",
)
EquiFlexTrainerViTTi8_3D = _preset_variant_3d(
    "EquiFlexTrainerViTTi8_3D", "vit_ti8_3d", "The ViT-Ti/8 shape of EquiFlexTrainerViTS8_3D (192 wide, 3 heads)."
)

PRETRAINED_ENV = "EQUIFLEX_PRETRAINED"


def pretrained_checkpoint_from_env() -> Path:
    """The checkpoint named by ``EQUIFLEX_PRETRAINED``: a file path, or a name known to
    ``find_cached_checkpoint`` (``dino_vits8``, an HF repo id, a torch hub file name) found in the
    local torch hub / HF caches. Never downloads."""
    from nnunet_equiflex.pretrained import (
        KNOWN_CHECKPOINTS,
        find_cached_checkpoint,
        hf_hub_cache_dir,
        is_nnunet_checkpoint,
        nnunet_checkpoint_message,
    )

    names = ", ".join(KNOWN_CHECKPOINTS)
    value = os.environ.get(PRETRAINED_ENV, "").strip()
    if not value:
        raise RuntimeError(
            f"{PRETRAINED_ENV} is not set. The pretrained trainers load their encoder weights from the "
            f"checkpoint it names, e.g.\n    export {PRETRAINED_ENV}=/path/to/dino_deitsmall8_pretrain.pth\n"
            f"or a checkpoint already in the local torch hub / HF caches ({names}):\n"
            f"    export {PRETRAINED_ENV}=dino_vits8\n"
            "To train from scratch use EquiFlexTrainer; to start from an nnU-Net checkpoint of ours, pass "
            "-pretrained_weights FILE to nnUNetv2_train."
        )
    path = Path(value).expanduser()
    if path.is_file():
        if is_nnunet_checkpoint(path):
            raise ValueError(
                f"{PRETRAINED_ENV}={value}: {nnunet_checkpoint_message(path)} with -tr EquiFlexTrainer (or the trainer "
                f"it came from), and unset {PRETRAINED_ENV}, which is for foreign ViT weights (DINO, timm, HF)"
            )
        return path
    weight_file_name = os.sep not in value and path.suffix in (".pth", ".pt", ".bin", ".safetensors")
    repo_id = value.count("/") == 1 and not value.startswith((".", "/", "~")) and not path.suffix
    if value in KNOWN_CHECKPOINTS or weight_file_name or repo_id:
        cached = find_cached_checkpoint(value)
        if cached is not None:
            return cached
        known = KNOWN_CHECKPOINTS.get(value)
        how = f"`huggingface-cli download {known.hf_repos[0]}` or {known.hub_entry}" if known else "its hub client"
        raise FileNotFoundError(
            f"{PRETRAINED_ENV}={value}: not a file, and not in the local caches "
            f"({Path(torch.hub.get_dir()) / 'checkpoints'}, {hf_hub_cache_dir()}). Download it once where there is "
            f"internet ({how}) or set {PRETRAINED_ENV} to the file's path."
        )
    raise FileNotFoundError(f"{PRETRAINED_ENV}={value}: no such file; set it to a checkpoint file or one of {names}")


class EquiFlexTrainerPretrained(EquiFlexTrainer):
    """EquiFlexTrainer fine-tuned from pretrained ViT encoder weights (ViT-S/8 shape: DINO ViT-S/8).

    The encoder is loaded in ``initialize()`` from ``EQUIFLEX_PRETRAINED``: a checkpoint file (DINO /
    torch.hub, timm, HF transformers, DINOv2 layouts) or a known name such as ``dino_vits8`` looked up
    in the local torch hub and HF caches (nothing is downloaded)::

        export EQUIFLEX_PRETRAINED=/path/to/dino_deitsmall8_pretrain.pth   # or: dino_vits8
        nnunet-equiflex plan -d DATASET --preset vit_s8 --plans-name EquiFlexPlansViTS8   # a batch for its memory
        nnUNetv2_train DATASET 2d FOLD -tr EquiFlexTrainerPretrained -p EquiFlexPlansViTS8

    The decoder stays at its initialisation. Fine-tuning recipe: AdamW at lr 1e-4, layer-wise lr decay
    0.75, the base warmup and drop path.

    nnU-Net's own ``-pretrained_weights FILE`` reads nnU-Net checkpoints only (their
    ``network_weights``): use it for checkpoints of our own trainers (e.g. another run's
    ``checkpoint_final.pth``); foreign ViT files (DINO ...) go through ``EQUIFLEX_PRETRAINED``. When both
    are given, nnU-Net loads its file after ours, so it wins.

    Resuming (``--c``), validation only (``--val``) and prediction do not need the variable: a
    restored checkpoint replaces the weights, and the predictor only calls
    ``build_network_architecture``.
    """

    network_preset = "vit_s8"
    # The checkpoint's shape (ViT-S/8, its 28x28 position grid, no refinement) wins over plans that name another
    # preset, such as the default's; the lifting stays the plans' (plan --preset vit_s8_flip0 for FlipModel0).
    network_overrides = {k: v for k, v in preset_shape_kwargs("vit_s8").items() if k not in LIFTING_KEYS}

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.layer_decay = 0.75
        self.pretrained_report = None
        self._restoring_checkpoint = False

    def initialize(self):
        if self.was_initialized:
            return super().initialize()
        # Resolve before building anything: a fresh run without weights fails at once.
        checkpoint = None if self._restoring_checkpoint else pretrained_checkpoint_from_env()
        super().initialize()
        if checkpoint is None:
            return
        from nnunet_equiflex.pretrained import load_pretrained_encoder

        # The optimizer holds these same Parameter objects, so loading in place after it exists is fine.
        self.pretrained_report = load_pretrained_encoder(unwrap_network(self.network), checkpoint)
        self.print_to_log_file(f"{PRETRAINED_ENV}={os.environ.get(PRETRAINED_ENV)}\n{self.pretrained_report}")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # --c, --val and val_with_best: the checkpoint's weights replace any pretrained ones.
        self._restoring_checkpoint = True
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            self._restoring_checkpoint = False


class EquiFlexTrainerPretrained3D(EquiFlexTrainerPretrained):
    """EquiFlexTrainerPretrained on 3d_fullres: a 2D ViT-S/8 checkpoint (DINO ViT-S/8) inflated into vit_s8_3d.

    Each 8x8 patch filter is spread evenly over the token's slices (a token of identical slices embeds as the 2D
    token), the position embedding is resampled in-plane and repeated along depth; the training log lists both
    adaptations. Plan the configuration with the same preset, so that the tokens are 8 px in-plane::

        nnunet-equiflex plan -d DATASET -c 3d_fullres --preset vit_s8_3d
        nnUNetv2_train DATASET 3d_fullres FOLD -tr EquiFlexTrainerPretrained3D -p EquiFlexPlans
    """

    network_preset = "vit_s8_3d"
    network_overrides = {k: preset_kwargs("vit_s8_3d")[k] for k in VIT_S8_SHAPE_KEYS if k != "patch_size"}


class EquiFlexTrainerPretrainedTiny_smoke(EquiFlexTrainerPretrained, EquiFlexTrainerTiny_smoke):
    """The tiny shape (token size 4, 64-dim, 4 blocks, 4 heads, mlp ratio 2, position grid 8x8) with
    the pretrained path and the bounded smoke schedule: tests and CPU runs with small checkpoints."""

    network_preset = EquiFlexTrainerTiny_smoke.network_preset
    network_overrides = EquiFlexTrainerTiny_smoke.network_overrides


# Options from the neighbouring equivariant ViTs (DESIGN.md section 2), one variant each.


def check_network_fits_configuration(
    trainer_cls: type, configuration: str, patch_size: tuple[int, ...] | list[int], kwargs: dict[str, Any]
) -> None:
    """Reject a configuration whose patch has another number of axes than the trainer's network, or whose 3D
    network cannot be built (a 2D preset's settings over 3D plans), naming the fix."""
    n, dims = len(patch_size), kwargs.get("spatial_dims", 2)
    problem = None
    if n != dims:
        problem = f"builds a {dims}D network"
    elif n == 3:
        try:
            with torch.device("meta"):  # the settings' checks only: no memory, no initialisation
                EquiFlexFormer(in_channels=1, num_classes=2, **kwargs)
        except ValueError as error:
            problem = f"cannot build a 3D network from its settings ({error})"
    if problem is None:
        return
    if n == 3:
        fix = (
            "For 3D, plan an EquiFlex 3d_fullres configuration (`nnunet-equiflex plan -d DATASET -c 3d_fullres`) "
            "and train it with -p EquiFlexPlans and EquiFlexTrainer (the plans' network), FlexTrainer or "
            "EquiFlexTrainerTiny3D; or train '-c 2d' (nnU-Net's 2d configuration slices 3D volumes itself)."
        )
    else:
        fix = "Train it with a 2D trainer (EquiFlexTrainer, EquiFlexTrainerTiny) or train '-c 3d_fullres'."
    raise ValueError(
        f"{trainer_cls.__name__} {problem}; configuration '{configuration}' has a {n}D patch size "
        f"{tuple(patch_size)}. {fix}"
    )


def check_patch_fits_group(trainer_cls: type, plans: dict, configuration: str) -> None:
    """Reject, before nnU-Net sets anything up, a configuration the trainer's network does not fit (see
    ``check_network_fits_configuration``), and a rectangular patch for a D4 network (90-degree rotations map
    only squares onto themselves)."""
    configuration_manager = PlansManager(plans).get_configuration(configuration)
    kwargs = _configured_kwargs(trainer_cls, configuration_manager)
    check_network_fits_configuration(trainer_cls, configuration, configuration_manager.patch_size, kwargs)
    if kwargs.get("group") != "d4":
        return
    patch = fit_patch_size(configuration_manager.patch_size, kwargs["patch_size"])
    if patch[0] != patch[1]:
        raise ValueError(
            f"{trainer_cls.__name__} uses group 'd4' (flips and 90-degree rotations), which needs a square patch; "
            f"configuration '{configuration}' of plans '{plans.get('plans_name')}' has patch size {patch}. Plan "
            "square patches with the EquiFlex planner and group d4, e.g. in Python: plan_dataset(DATASET, "
            "plans_name='EquiFlexPlansD4', network_overrides={'group': 'd4'}) from "
            "nnunet_equiflex.planners.equiflex_planner, then train with -p EquiFlexPlansD4; or use a D2 trainer "
            "(EquiFlexTrainer) for rectangular patches."
        )


class EquiFlexTrainerD4(EquiFlexTrainer):
    """D4 lifting: flips and 90-degree rotations (8 copies in the lifted blocks); square patches only."""

    network_overrides = {"group": "d4"}


class EquiFlexTrainerGMR(EquiFlexTrainer):
    """Gaussian-Mixture-Ring convolution patch embedding (Equi-ViT, kernels [6, 11])."""

    network_overrides = {"patch_embed": "gmr"}


class EquiFlexTrainerDilated(EquiFlexTrainer):
    """Local blocks alternate dense and dilated (x2) windows: a wider context at the same cost."""

    network_overrides = {"window_dilation": 2, "alternate_dilation": True}


class EquiFlexTrainerD4Tiny_smoke(EquiFlexTrainerD4, EquiFlexTrainerTiny_smoke):
    network_overrides = {**EquiFlexTrainerTiny_smoke.network_overrides, **EquiFlexTrainerD4.network_overrides}


class EquiFlexTrainerGMRTiny_smoke(EquiFlexTrainerGMR, EquiFlexTrainerTiny_smoke):
    network_overrides = {**EquiFlexTrainerTiny_smoke.network_overrides, **EquiFlexTrainerGMR.network_overrides}


class EquiFlexTrainerDilatedTiny_smoke(EquiFlexTrainerDilated, EquiFlexTrainerTiny_smoke):
    network_overrides = {**EquiFlexTrainerTiny_smoke.network_overrides, **EquiFlexTrainerDilated.network_overrides}
