"""nnunet-equiflex: a reflection-equivariant local-attention ViT for nnU-Net v2."""

from nnunet_equiflex.network import PRESETS, EquiFlexFormer, preset_kwargs

__all__ = ["EquiFlexFormer", "PRESETS", "preset_kwargs"]
__version__ = "0.1.0"
