"""Optimizer parameter groups for ViTs: no weight decay on norms, biases and embeddings;
optional layer-wise learning-rate decay for fine-tuning pretrained encoders."""

from __future__ import annotations

import torch.nn as nn

NO_DECAY_NAMES = ("cls_token", "pos_embed", "reg_token", "rel_pos_bias")  # embeddings, as in timm (plus registers)


def _layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for encoder block i, depth + 1 for everything after."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if any(key in parts for key in ("patch_embed",) + NO_DECAY_NAMES):
        return 0
    return depth + 1


def vit_param_groups(
    network: nn.Module, weight_decay: float, layer_decay: float | None = None, depth: int | None = None
) -> list[dict]:
    """Parameter groups with ``weight_decay`` only on weight matrices; with ``layer_decay``,
    each group carries ``lr_scale = layer_decay ** (depth + 1 - layer_id)`` (read by the schedule)."""
    if layer_decay is not None and depth is None:
        raise ValueError("layer_decay needs the encoder depth")
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES
        layer = _layer_id(name, depth) if layer_decay is not None else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(param)
    return list(groups.values())
