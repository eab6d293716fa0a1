"""Translating between nnU-Net plans and EquiFlexFormer kwargs; the ViT memory model; label-name checks.

Nothing here imports nnunetv2: trainers and planners pass plain dicts and tuples in.
"""

from __future__ import annotations

import math
import re
from typing import Any

from nnunet_equiflex.blocks import ConvStem
from nnunet_equiflex.groups import group_elements
from nnunet_equiflex.network import preset_kwargs

NETWORK_CLASS_NAME = "nnunet_equiflex.network.EquiFlexFormer"


def describes_equiflex(architecture: dict[str, Any] | None) -> bool:
    return bool(architecture) and architecture.get("network_class_name") == NETWORK_CLASS_NAME


def network_kwargs(
    architecture: dict[str, Any] | None,
    default_preset: str,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Network kwargs (without channels/classes) for a configuration.

    Taken from the plans' architecture block when it names our network, else from
    ``default_preset``; then ``overrides`` (what a trainer variant is about) win.
    """
    if describes_equiflex(architecture):
        kwargs = dict(architecture["arch_kwargs"])
        kwargs.pop("in_channels", None)
        kwargs.pop("num_classes", None)
    else:
        kwargs = preset_kwargs(default_preset)
    kwargs.update(overrides or {})
    return kwargs


def _per_axis(token_size: int | tuple[int, ...] | list[int], n: int) -> tuple[int, ...]:
    return tuple(token_size) if isinstance(token_size, (list, tuple)) else (int(token_size),) * n


def fit_patch_size(
    patch_size: tuple[int, ...] | list[int], token_size: int | tuple[int, ...] | list[int]
) -> tuple[int, ...]:
    """Round each axis up to a multiple of its token size (one integer or one per axis; nnU-Net pads smaller
    images)."""
    tokens = _per_axis(token_size, len(patch_size))
    return tuple(int(math.ceil(s / t) * t) for s, t in zip(patch_size, tokens))


# An axis whose spacing is at least this many times the finest one gets half the token size along it.
ANISOTROPY_RATIO = 2.0


def token_size_for_spacing(
    token_size: int | tuple[int, ...] | list[int], spacing: tuple[float, ...] | list[float]
) -> int | list[int]:
    """The planner's token size for a 3D configuration.

    A preset's single token size ``t`` becomes ``t // 2`` (at least 1) along every axis whose spacing is
    ``>= ANISOTROPY_RATIO`` times the finest spacing, so that a token covers about the same physical extent on
    every axis (tiny3d's 4 becomes 2x4x4 on 3 mm slices of 1 mm pixels). Isotropic data keep the one integer; a
    per-axis token size given by the preset or the user is kept as it is.
    """
    if isinstance(token_size, (list, tuple)):
        return list(token_size)
    finest = min(spacing)
    tokens = [max(1, token_size // 2) if s >= ANISOTROPY_RATIO * finest else token_size for s in spacing]
    return token_size if len(set(tokens)) == 1 else tokens


def estimate_training_vram_gb(
    patch_size: tuple[int, ...], batch_size: int, in_channels: int, num_classes: int, kwargs: dict[str, Any]
) -> float:
    """Rough peak GPU memory of one training step under mixed precision, in GB.

    Activations kept for backward dominate. Per block, token and sample a pre-norm block keeps
    ``9 * embed_dim + 2 * mlp_hidden`` 16-bit values (both LayerNorm outputs, q, k and v, the
    attention output, its projection, the residual, the MLP's hidden layer before and after GELU
    and its output), counted once per group element for the lifted blocks; attention adds no
    ``tokens**2`` term (FlexAttention and flash/memory-efficient SDPA do not store the score
    matrix, whether the block is global or local). The full-resolution head stores a few maps per
    class and refinement channel (per group element for a lifted refinement or head). Parameters, gradients
    and AdamW state take 16 bytes per parameter; 1.5 GB covers the CUDA context and allocator
    slack. In 3D the same holds with tokens and voxels counted over the three axes and the 8 flips
    of a volume as the lifted copies.
    """
    d, depth = kwargs["embed_dim"], kwargs["depth"]
    n = len(patch_size)
    token = _per_axis(kwargs["patch_size"], n)
    n_lifted = kwargs.get("n_lifted_blocks", 0)
    copies = len(group_elements(kwargs.get("group", "d2"), n))
    mlp_hidden = int(d * kwargs.get("mlp_ratio", 4.0))
    tokens = math.prod(s // t for s, t in zip(patch_size, token)) + 1
    block_evals = n_lifted * copies + (depth - n_lifted)
    per_sample = 2 * (9 * d + 2 * mlp_hidden) * tokens * block_evals
    pixels = math.prod(patch_size)
    refine_maps = 2 * kwargs.get("refine_dim", 32) if kwargs.get("refine") else 0
    extra_copies = copies - 1 if refine_maps and kwargs.get("refine_mode") == "lifted" else 0
    # a lifted refinement keeps every transformed copy of its input (image and features) and of its hidden maps
    maps = num_classes + in_channels + refine_maps + extra_copies * (refine_maps + in_channels)
    if kwargs.get("lifted_head"):  # every copy's upsampled and pixel maps (classes and refinement features)
        maps += copies * 2 * (num_classes + refine_maps // 2)
    per_sample += 4 * pixels * maps * 3
    if kwargs.get("patch_embed") == "conv":  # each stem stage keeps its convolution, norm and GELU outputs, per copy
        stem_values = sum(math.prod(size) for size in ConvStem.stage_sizes(tuple(patch_size), token))
        per_sample += 2 * 3 * ConvStem.hidden_channels(d) * stem_values * copies
    params = depth * (4 * d * d + 2 * mlp_hidden * d) + in_channels * math.prod(token) * d
    return (batch_size * per_sample + 16 * params) / 1e9 + 1.5


def batch_size_for_memory(
    patch_size: tuple[int, ...],
    in_channels: int,
    num_classes: int,
    kwargs: dict[str, Any],
    vram_target_gb: float,
    max_batch_size: int,
    min_batch_size: int = 2,
) -> int:
    """Largest batch that fits ``vram_target_gb`` by the model above, clipped to [min, max]."""
    batch = min_batch_size
    while (
        batch < max_batch_size
        and estimate_training_vram_gb(patch_size, batch + 1, in_channels, num_classes, kwargs) <= vram_target_gb
    ):
        batch += 1
    return max(min_batch_size, min(batch, max_batch_size))


# Words that mark a label as one side of a left/right pair, matched as whole words of the label name.
LATERAL_WORDS = frozenset({"left", "right", "l", "r", "lt", "rt"})
_CAMEL_CASE = re.compile(r"(?<=[a-z])(?=[A-Z])")


def label_words(name: str) -> list[str]:
    """Lower-case words of a label name: split at non-alphanumerics and lower-to-upper case changes
    ("kidney_left", "LeftKidney", "L_kidney", "kidneyL"); letter-digit runs stay one word ("L1" vertebra)."""
    return [word.lower() for word in re.split(r"[^A-Za-z0-9]+", _CAMEL_CASE.sub(" ", name)) if word]


def lateralised_labels(label_names: list[str]) -> list[str]:
    """The label names that name a side (left/right, _l/_r, lt/rt). "LV cavity" or "lateral ventricle" do not:
    an abbreviation like LV is one word, and "lateral" names no side."""
    return [name for name in label_names if LATERAL_WORDS.intersection(label_words(name))]


def lateralised_label_warning(trainer_name: str, label_names: list[str]) -> str | None:
    """The start-of-training warning for an exactly reflection-equivariant trainer on lateralised labels."""
    sided = lateralised_labels(label_names)
    if not sided:
        return None
    return (
        f"WARNING: label(s) {', '.join(sided)} in dataset.json look lateralised (left/right). {trainer_name} is "
        "exactly reflection-equivariant (the mirrored image gets the mirrored prediction), so it tells a left/right "
        "pair apart only through asymmetric context such as an organ on one side, never by the side of the image. "
        "If left and right get confused, train the same ViT without the lifting: -tr FlexTrainer (not equivariant), "
        "or -tr FlexTrainerNoMirroring where only the side of the image tells them apart (mirroring augmentation "
        "teaches any network to ignore the side); see 'Lateralised labels' in the README."
    )
