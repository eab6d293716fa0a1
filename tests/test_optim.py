"""Parameter groups of the ViT recipe: which tensors get weight decay, and layer-wise lr scales."""

import pytest

from helpers import tiny_network
from nnunet_equiflex.optim import vit_param_groups

EMBEDDINGS = ("encoder.cls_token", "encoder.pos_embed", "encoder.reg_token")


def groups_by_name(net, **kwargs):
    names = {id(p): n for n, p in net.named_parameters()}
    groups = vit_param_groups(net, 0.05, **kwargs)
    placed = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(names.values())  # every parameter in exactly one group
    return {names[id(p)]: g for g in groups for p in g["params"]}


@pytest.mark.parametrize("patch_embed", ["linear", "gmr"])
def test_weight_decay_only_on_weight_tensors(patch_embed):
    net = tiny_network(patch_embed=patch_embed, num_register_tokens=2, refine=True)
    by_name = groups_by_name(net)
    for name, param in net.named_parameters():
        expected = 0.0 if param.ndim <= 1 or name in EMBEDDINGS else 0.05
        assert by_name[name]["weight_decay"] == expected, name
    decayed = [n for n, g in by_name.items() if g["weight_decay"]]
    assert any(n.endswith("qkv.weight") for n in decayed)
    assert any(n.startswith("encoder.patch_embed") for n in decayed)  # the projection or the GMR ring weights


def test_layer_decay_scales():
    net = tiny_network(num_register_tokens=1)
    depth = len(net.encoder.blocks)
    by_name = groups_by_name(net, layer_decay=0.5, depth=depth)
    for name in (*EMBEDDINGS, "encoder.patch_embed.proj.weight"):
        assert by_name[name]["lr_scale"] == 0.5 ** (depth + 1), name
    for i in range(depth):
        assert by_name[f"encoder.blocks.{i}.attn.qkv.weight"]["lr_scale"] == 0.5 ** (depth - i)
    assert by_name["encoder.norm.weight"]["lr_scale"] == 1.0
    assert by_name["decoder.head.weight"]["lr_scale"] == 1.0


def test_layer_decay_needs_the_depth():
    with pytest.raises(ValueError, match="layer_decay needs the encoder depth"):
        vit_param_groups(tiny_network(), 0.05, layer_decay=0.75)
