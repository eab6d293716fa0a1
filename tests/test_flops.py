"""Analytic FLOPs agree with torch's FlopCounterMode where it sees every product (SDPA on its math path)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nnunet_equiflex.flops import equiflex_forward_flops, network_forward_flops, preset_forward_flops
from nnunet_equiflex.network import EquiFlexFormer


def counted_flops(net, x) -> int:
    net.set_attention_backend("sdpa")  # dense-masked SDPA: the math path computes every (q, k) pair as matmuls
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("vit_s8", {}),
        ("vit_s8_flip0", {}),
        ("vit_s8_flip2", {"num_register_tokens": 2}),
        ("vit_ti8", {"window_dilation": 2, "alternate_dilation": True}),
        ("tiny", {}),  # refinement head
        ("tiny_liftref", {}),  # the refinement on 4 copies
        ("tiny_liftref", {"group": "d4"}),  # on 8 copies
        ("tiny", {"group": "d4", "n_lifted_blocks": 2, "n_global_blocks": 1}),
        ("tiny_lifthead", {}),  # the head and its pixel outputs on 4 copies
        ("tiny_lifthead", {"group": "d4", "refine_mode": "lifted"}),
        ("tiny_lift4", {"patch_embed": "conv"}),  # the conv stem on 4 copies
        ("vit_s8_flip0", {"patch_embed": "conv"}),  # not linear: no folding, 3 stride-2 stages
        ("tiny_lift4", {"relative_position_bias": True}),  # an addition per score: no products
    ],
)
@pytest.mark.parametrize("folded", [True, False])
def test_analytic_flops_equal_the_counted_ones(preset, overrides, folded):
    net = EquiFlexFormer.from_preset(preset, in_channels=2, num_classes=3, **overrides).eval()
    net.encoder.fold_linear_lifting = folded
    patch = (48, 48)
    analytic = network_forward_flops(net, patch, local_attention="dense")
    assert analytic["total"] == counted_flops(net, torch.zeros(1, 2, *patch))


def test_window_counts_only_the_window_pairs():
    kwargs = EquiFlexFormer.from_preset("vit_s8_flip0", 1, 4).arch_kwargs
    windowed = equiflex_forward_flops(kwargs, 1, 4, (256, 224))
    assert windowed == preset_forward_flops("vit_s8_flip0", 1, 4, (256, 224))  # the preset's kwargs, built or not
    dense = equiflex_forward_flops(kwargs, 1, 4, (256, 224), local_attention="dense")
    seq = 1 + 32 * 28
    # 10 local blocks: all S x S pairs vs at most 25 + 1 keys per grid query (plus the CLS row)
    assert dense["attention"] - windowed["attention"] > 10 * 4 * 384 * (seq * seq - seq * 26 - seq)
    assert dense["linear layers"] == windowed["linear layers"]


def test_folding_removes_the_copies_of_the_embedding():
    folded = preset_forward_flops("vit_s8_flip0", 1, 4, (64, 64))
    explicit = equiflex_forward_flops(
        EquiFlexFormer.from_preset("vit_s8_flip0", 1, 4).arch_kwargs, 1, 4, (64, 64), folded_lifting=False
    )
    assert explicit["embedding"] == 4 * folded["embedding"]


def test_gmr_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match="count GMR with FlopCounterMode"):
        preset_forward_flops("tiny", 1, 2, (32, 32), patch_embed="gmr")
