"""The reference's FlipModel variants, the folded linear lifting, and equivariance of every preset."""

import pytest
import torch
import torch.nn.functional as F

from helpers import max_equivariance_error, tiny_network
from nnunet_equiflex.groups import group_elements
from nnunet_equiflex.network import PRESETS, EquiFlexFormer

BOUND = 1e-4
FLIPS = [(), (-2,), (-1,), (-2, -1)]  # D2 on images; on a token grid (B, h, w, D) the same flips of dims 1, 2


def reference_attention(x, block, mask):
    """Multi-head attention written out: softmax(q k^T / sqrt(d)) v, keys outside ``mask`` removed."""
    b, n, d = x.shape
    heads = block.attn.num_heads
    q, k, v = block.attn.qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return block.attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


def reference_block(x, block, mask):
    x = x + reference_attention(block.norm1(x), block, mask)
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))


def window_5x5(h, w):
    """CLS sees and is seen by all; a patch token sees the patch tokens at most 2 rows and columns away."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    mask = torch.ones(1 + h * w, 1 + h * w, dtype=torch.bool)
    mask[1:, 1:] = ((ys[:, None] - ys[None]).abs() <= 2) & ((xs[:, None] - xs[None]).abs() <= 2)
    return mask


def reference_flip_model(net, x, n_flip):
    """FlipModel-K of the reference, from its description (with FlipModel4's loop bug fixed): for each of
    the 4 flips, patch embedding + CLS + bicubic position embedding and blocks 0..K-1 on the flipped image,
    the token grid flipped back; mean over the flips for K = 0, max otherwise; blocks K..11; blocks 0-1
    attend globally, 2-11 in the 5x5 window; final norm, 1x1 head, bilinear upsampling by 8."""
    enc, p = net.encoder, net.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    local = window_5x5(h, w)
    pos = enc.pos_embed[:, 1:].reshape(1, 28, 28, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    pos = torch.cat([enc.pos_embed[:, :1], pos], dim=1)
    copies = []
    for dims in FLIPS:
        image = x.flip(dims) if dims else x
        patches = F.conv2d(image, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=p)
        tokens = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)], 1) + pos
        for i in range(n_flip):
            tokens = reference_block(tokens, enc.blocks[i], None if i < 2 else local)
        grid = tokens[:, 1:].reshape(x.shape[0], h, w, -1)
        grid = grid.flip([d + 4 - 1 for d in dims]) if dims else grid  # image dim -2/-1 -> token dim 1/2
        copies.append(torch.cat([tokens[:, :1], grid.flatten(1, 2)], dim=1))
    stacked = torch.stack(copies)
    tokens = stacked.mean(0) if n_flip == 0 else stacked.amax(0)
    for i in range(n_flip, 12):
        tokens = reference_block(tokens, enc.blocks[i], None if i < 2 else local)
    tokens = enc.norm(tokens)
    logits = net.decoder.head(tokens[:, 1:]).transpose(1, 2).reshape(x.shape[0], -1, h, w)
    return F.interpolate(logits, scale_factor=p, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("preset,n_flip", [("vit_s8_flip0", 0), ("vit_s8_flip2", 2), ("vit_s8_flip4", 4)])
@pytest.mark.parametrize("folded", [True, False])
def test_presets_reproduce_the_reference_flip_models(preset, n_flip, folded):
    net = EquiFlexFormer.from_preset(preset, in_channels=1, num_classes=3).double().eval()
    net.encoder.fold_linear_lifting = folded
    x = torch.randn(2, 1, 48, 40, dtype=torch.float64)  # 6 x 5 tokens: border windows are cut
    with torch.no_grad():
        error = (net(x) - reference_flip_model(net, x, n_flip)).abs().max().item()
    assert error < 1e-5


def test_flip_model_one_is_two_settings_away():
    net = (
        EquiFlexFormer.from_preset("vit_s8", in_channels=1, num_classes=3, n_lifted_blocks=1, n_global_blocks=2)
        .double()
        .eval()
    )
    x = torch.randn(1, 1, 40, 48, dtype=torch.float64)
    with torch.no_grad():
        assert (net(x) - reference_flip_model(net, x, 1)).abs().max().item() < 1e-5


def test_global_and_lifted_blocks_are_independent():
    enc = EquiFlexFormer.from_preset("vit_s8_flip0", 1, 2).encoder
    assert (enc.n_lifted_blocks, enc.n_global_blocks) == (0, 2)
    assert EquiFlexFormer.from_preset("vit_s8", 1, 2).encoder.n_global_blocks == 4  # default: the lifted ones
    assert enc.local_dilations() == [1] * 10


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(num_register_tokens=2),
        dict(patch_embed="gmr", gmr_kernel_sizes=[3, 4], gmr_strides=[1, 4]),
        dict(group="d4"),
        dict(n_global_blocks=2),
    ],
)
def test_folded_lifting_equals_the_explicit_copies(overrides):
    net = tiny_network(n_lifted_blocks=0, group_pooling="mean", **overrides)
    assert net.encoder.lifting_is_linear
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        folded = net(x)
        net.encoder.fold_linear_lifting = False
        explicit = net(x)
    assert (folded - explicit).abs().max().item() < 1e-5


def test_folded_lifting_embeds_once():
    net = tiny_network(n_lifted_blocks=0, group_pooling="mean")
    calls = []
    net.encoder.patch_embed.proj.register_forward_hook(lambda *a: calls.append("explicit"))
    with torch.no_grad():
        net(torch.randn(3, 2, 16, 16))
    assert calls == []  # the folded path convolves once with the averaged filter, not through proj on 4 copies
    net.encoder.fold_linear_lifting = False
    with torch.no_grad():
        net(torch.randn(3, 2, 16, 16))
    assert calls == ["explicit"]  # one call on the batch of 4 x 3 copies


def test_max_pooling_or_lifted_blocks_are_not_folded():
    assert not tiny_network(n_lifted_blocks=0, group_pooling="max").encoder.lifting_is_linear
    assert not tiny_network(n_lifted_blocks=1, group_pooling="mean").encoder.lifting_is_linear
    assert not tiny_network(n_lifted_blocks=0, group_pooling="mean", group="none").encoder.lifting_is_linear


def preset_network(name, **overrides):
    """The preset with a random refinement output layer, pixel head and relative position bias (their zero init
    would hide them)."""
    net = EquiFlexFormer.from_preset(name, in_channels=1, num_classes=3, **overrides)
    with torch.no_grad():
        if net.decoder.refinement is not None:
            torch.nn.init.normal_(net.decoder.refinement.conv2.weight, std=0.2)
        if net.decoder.pixel_head is not None:
            torch.nn.init.normal_(net.decoder.pixel_head.weight, std=0.2)
        for name, param in net.named_parameters():
            if name.endswith("rel_pos_bias"):
                param.normal_(0.0, 1.0)
    return net.eval()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_equivariant(preset):
    net = preset_network(preset)
    x = torch.randn(2, 1, 48, 40)
    errors = max_equivariance_error(net, x, group_elements(net.encoder.group))
    assert len(errors) == 4
    assert max(errors.values()) < BOUND, errors


@pytest.mark.parametrize(
    "preset",
    [
        "vit_s8_flip0",
        "vit_ti8",
        "mini4",
        "tiny_liftref",
        "tiny_lifthead",
        "tiny_lift4_rpb",
        "tiny_conv",
        "tiny_conv_cn",
    ],
)
def test_cheapest_presets_without_the_group_are_not_equivariant(preset):
    net = preset_network(preset, group="none")
    errors = max_equivariance_error(net, torch.randn(2, 1, 48, 40), group_elements("d2"))
    assert min(v for k, v in errors.items() if k != "identity") > 100 * BOUND, errors
