"""Foreign ViT checkpoints load into the encoder and reproduce the source model's tokens.

Every checkpoint is written by the test itself in a real key layout (no downloads): a small
timm VisionTransformer (embed 64, depth 2, heads 4, patch 8, 4x4 tokens) is the reference,
and the other layouts are its weights renamed the way DINOv2's torch.hub and HF transformers
name them.
"""

import argparse
import functools
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from helpers import max_equivariance_error
from nnunet_equiflex.encoder import EquiFlexEncoder
from nnunet_equiflex.groups import group_elements
from nnunet_equiflex.network import EquiFlexFormer
from nnunet_equiflex.pretrained import (
    convert_state_dict,
    find_cached_checkpoint,
    is_nnunet_checkpoint,
    load_pretrained_encoder,
)

EMBED, DEPTH, HEADS, PATCH, GRID = 64, 2, 4, 8, 4
IMAGE = PATCH * GRID
TOL = 1e-5
DINOV2_REG = dict(init_values=0.5, reg_tokens=4, no_embed_class=True)  # timm's DINOv2-with-registers setup


def timm_vit(embed_dim: int = EMBED, patch_size: int = PATCH, depth: int = DEPTH, **kwargs) -> VisionTransformer:
    """A small timm ViT with every parameter random (LayerScale and registers included)."""
    model = VisionTransformer(
        img_size=IMAGE,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=HEADS,
        qkv_bias=True,
        num_classes=0,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        **kwargs,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def our_encoder(in_channels: int = 3, **overrides) -> EquiFlexEncoder:
    kwargs = dict(
        patch_size=PATCH,
        embed_dim=EMBED,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=4.0,
        group="none",
        n_lifted_blocks=DEPTH,
        pos_embed_grid=(GRID, GRID),
    )
    kwargs.update(overrides)
    return EquiFlexEncoder(in_channels=in_channels, **kwargs).eval()


def timm_tokens(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """timm's normalised tokens without the register tokens (ours drops them from the output)."""
    with torch.no_grad():
        tokens = model.forward_features(x)
    return torch.cat([tokens[:, :1], tokens[:, model.num_prefix_tokens :]], dim=1)


def our_tokens(encoder: EquiFlexEncoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(x)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# Hand-written renamings into the foreign layouts (the inverse of what the loader does).
HF_VIT_NAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
HF_DINOV2_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "ls1": "layer_scale1",
    "ls2": "layer_scale2",
}
HF_TOP_NAMES = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "mask_token": "embeddings.mask_token",
}


def to_hf(state_dict: dict, layer_names: dict, prefix: str = "") -> dict:
    """timm / DINOv2-hub names -> HF transformers names, with qkv split into query/key/value."""
    out = {}
    for key, value in state_dict.items():
        if key in HF_TOP_NAMES:
            out[HF_TOP_NAMES[key]] = value
        elif key.startswith("patch_embed.proj."):
            out[key.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.")] = value
        elif key.startswith("norm."):
            out[key.replace("norm.", "layernorm.")] = value
        else:
            block, module, param = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", key).groups()
            if module == "attn.qkv":
                for name, part in zip(("query", "key", "value"), value.chunk(3)):
                    out[f"encoder.layer.{block}.attention.attention.{name}.{param}"] = part
            elif param == "gamma":
                out[f"encoder.layer.{block}.{layer_names[module]}.lambda1"] = value
            else:
                out[f"encoder.layer.{block}.{layer_names[module]}.{param}"] = value
    return {prefix + k: v for k, v in out.items()}


def to_dinov2_hub(timm_state: dict, chunked: bool = False) -> dict:
    """timm's DINOv2-with-registers layout -> the torch.hub release's.

    The hub's position embedding has a class entry and its cls_token excludes it; a random split
    makes sure the loader adds them back together.
    """
    class_pos = torch.randn(1, 1, EMBED)
    out = {
        "cls_token": timm_state["cls_token"] - class_pos,
        "pos_embed": torch.cat([class_pos, timm_state["pos_embed"]], dim=1),
        "register_tokens": timm_state["reg_token"],
        "mask_token": torch.zeros(1, EMBED),
    }
    for key, value in timm_state.items():
        if key.startswith("blocks.") and chunked:  # one chunk holding every block, global indices
            out[key.replace("blocks.", "blocks.0.", 1)] = value
        elif key.startswith(("blocks.", "patch_embed.", "norm.")):
            out[key] = value
    return out


@pytest.fixture
def vit():
    return timm_vit()


@pytest.fixture
def image():
    return torch.randn(2, 3, IMAGE, IMAGE)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize(
    "layout",
    [dict(), dict(n_lifted_blocks=0, window_radius=GRID - 1, attention_backend="sdpa")],
    ids=["global", "local-window-covering-grid"],
)
def test_timm_layout_reproduces_timm(vit, image, tmp_path, suffix, layout):
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(vit.state_dict(), str(path))
    else:
        torch.save(vit.state_dict(), path)
    encoder = our_encoder(**layout)
    report = load_pretrained_encoder(encoder, path)
    assert report.detected_format == "timm / DINO torch.hub"
    assert report.complete and report.loaded == list(encoder.state_dict())
    assert max_diff(our_tokens(encoder, image), timm_tokens(vit, image)) < TOL


@pytest.mark.parametrize("prefix,head", [("", "pooler.dense"), ("vit.", "classifier")])
def test_hf_vit_layout_reproduces_timm(vit, image, prefix, head):
    hf = to_hf(vit.state_dict(), HF_VIT_NAMES, prefix)
    hf[f"{head}.weight"], hf[f"{head}.bias"] = torch.randn(10, EMBED), torch.randn(10)
    encoder = our_encoder()
    report = load_pretrained_encoder(encoder, hf)
    assert report.detected_format == "HF transformers ViTModel"
    assert report.complete
    assert sorted(report.dropped) == [f"{head}.bias", f"{head}.weight"]
    assert max_diff(our_tokens(encoder, image), timm_tokens(vit, image)) < TOL


@pytest.mark.parametrize("timm_kwargs", [dict(init_values=0.5), DINOV2_REG], ids=["layerscale", "registers"])
@pytest.mark.parametrize("layer_scale_init", [1e-5, None], ids=["ours-layerscale", "ours-folded"])
def test_dinov2_timm_layout_reproduces_timm(image, timm_kwargs, layer_scale_init):
    reference = timm_vit(**timm_kwargs)
    encoder = our_encoder(num_register_tokens=timm_kwargs.get("reg_tokens", 0), layer_scale_init=layer_scale_init)
    report = load_pretrained_encoder(encoder, reference.state_dict())
    assert report.complete, report
    assert any("LayerScale folded" in a for a in report.adaptations) == (layer_scale_init is None)
    assert max_diff(our_tokens(encoder, image), timm_tokens(reference, image)) < TOL


@pytest.mark.parametrize("layout", ["hub", "hub-chunked", "hf"])
def test_dinov2_hub_and_hf_layouts_reproduce_timm(image, layout):
    reference = timm_vit(**DINOV2_REG)
    hub = to_dinov2_hub(reference.state_dict(), chunked=layout == "hub-chunked")
    checkpoint = to_hf(hub, HF_DINOV2_NAMES) if layout == "hf" else hub
    encoder = our_encoder(num_register_tokens=4, layer_scale_init=1e-5)
    report = load_pretrained_encoder(encoder, checkpoint)
    expected = "HF transformers Dinov2Model with registers" if layout == "hf" else "DINOv2 torch.hub with registers"
    assert report.detected_format == expected
    assert report.complete and len(report.dropped) == 1  # the mask token
    assert max_diff(our_tokens(encoder, image), timm_tokens(reference, image)) < TOL


def test_dino_full_checkpoint_uses_teacher_backbone(vit, image, tmp_path):
    """DINO's training checkpoint: {'teacher': {'backbone.*', 'head.*'}, 'student': {'module.backbone.*'}}."""
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    teacher["head.last_layer.weight_g"] = torch.ones(100, 1)
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in vit.state_dict().items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 100}, tmp_path / "full.pth")
    encoder = our_encoder()
    report = load_pretrained_encoder(encoder, tmp_path / "full.pth")
    assert report.complete and report.dropped == ["head.last_layer.weight_g"]
    assert max_diff(our_tokens(encoder, image), timm_tokens(vit, image)) < TOL


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"model": {f"module.backbone.{k}": v for k, v in sd.items()}},
        lambda sd: {
            "network_weights": {**{f"encoder.{k}": v for k, v in sd.items()}, "decoder.head.bias": sd["norm.bias"]}
        },
    ],
    ids=["ddp", "ddp-backbone", "nnunet-equiflex"],
)
def test_wrapped_checkpoints(vit, image, wrap):
    encoder = our_encoder()
    report = load_pretrained_encoder(encoder, wrap(vit.state_dict()))
    assert report.complete
    assert max_diff(our_tokens(encoder, image), timm_tokens(vit, image)) < TOL


def test_pos_embed_identity_on_native_grid_and_resampled_elsewhere(vit):
    checkpoint_pos = vit.state_dict()["pos_embed"]
    native = our_encoder()
    report = load_pretrained_encoder(native, vit.state_dict())
    assert torch.equal(native.pos_embed.data, checkpoint_pos)
    assert not any("resampled" in a for a in report.adaptations)

    other = our_encoder(pos_embed_grid=(6, 5))
    report = load_pretrained_encoder(other, vit.state_dict())
    assert other.pos_embed.shape == (1, 1 + 6 * 5, EMBED)
    assert torch.equal(other.pos_embed.data[:, 0], checkpoint_pos[:, 0])  # class entry kept
    assert "pos_embed resampled bicubically from 4x4 to 6x5 tokens" in report.adaptations


def test_pos_embed_real_dino_sizes():
    """DINO ViT-S/8 at 224 px: 28x28 + 1 = 785 entries; DINOv2 at 518 px: 37x37 + 1 = 1370."""
    for length, grid in ((785, (28, 28)), (1370, (37, 37))):
        state = {"cls_token": torch.randn(1, 1, EMBED), "pos_embed": torch.randn(1, length, EMBED)}
        converted, _ = convert_state_dict(state, our_encoder(pos_embed_grid=grid))
        assert torch.equal(converted["pos_embed"], state["pos_embed"])
        converted, report = convert_state_dict(state, our_encoder(pos_embed_grid=(GRID, GRID)))
        assert converted["pos_embed"].shape == (1, 1 + GRID * GRID, EMBED)
        assert f"pos_embed resampled bicubically from {grid[0]}x{grid[1]} to 4x4 tokens" in report.adaptations


@pytest.mark.parametrize("in_channels", [1, 2, 4])
def test_channel_adaptation_keeps_gray_response(vit, in_channels):
    gray = torch.randn(2, 1, IMAGE, IMAGE)
    encoder = our_encoder(in_channels=in_channels)
    report = load_pretrained_encoder(encoder, vit.state_dict())
    assert any(f"3 -> {in_channels} input channels" in a for a in report.adaptations)
    ours = our_tokens(encoder, gray.repeat(1, in_channels, 1, 1))
    assert max_diff(ours, timm_tokens(vit, gray.repeat(1, 3, 1, 1))) < TOL


@pytest.mark.parametrize(
    "reference,overrides,message",
    [
        (
            dict(embed_dim=96),
            {},
            "embed_dim 96 in the checkpoint vs 64 in the network; build the network with embed_dim=96",
        ),
        (dict(depth=3), {}, r"depth 3 in the checkpoint vs 2 in the network; build the network with depth=3"),
        (dict(patch_size=4), {}, r"patch size 4x4 in the checkpoint vs 8x8 in the network.*patch_size=4"),
        (DINOV2_REG, {}, r"the checkpoint has 4 register tokens, the network 0.*num_register_tokens=4"),
        (dict(mlp_ratio=2.0), {}, r"mlp\.fc1\.weight: MLP width 128 in the checkpoint vs 256.*mlp_ratio=2"),
    ],
    ids=["embed-dim", "depth", "patch-size", "registers", "mlp-width"],
)
def test_unadaptable_shapes_raise_with_the_fix(reference, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_pretrained_encoder(our_encoder(**overrides), timm_vit(**reference).state_dict())


def test_non_strict_loads_what_fits_and_reports_the_rest(image):
    deeper = timm_vit(depth=3)
    encoder = our_encoder()
    report = load_pretrained_encoder(encoder, deeper.state_dict(), strict_shapes=False)
    assert report.missing == [] and all(k.startswith("blocks.2.") for k in report.unexpected)
    narrower = timm_vit(mlp_ratio=2.0).state_dict()
    report = load_pretrained_encoder(encoder, narrower, strict_shapes=False)
    assert report.missing == [f"blocks.{i}.mlp.{p}" for i in (0, 1) for p in ("fc1.weight", "fc1.bias", "fc2.weight")]
    assert len(report.skipped) == 6 and "mlp_ratio=2" in report.skipped[0]


def test_missing_and_unexpected_keys_are_reported(vit):
    state = vit.state_dict()
    del state["norm.weight"]
    state["blocks.0.attn.q_norm.weight"] = torch.ones(EMBED // HEADS)
    report = load_pretrained_encoder(our_encoder(), state)
    assert report.missing == ["norm.weight"]
    assert report.unexpected == ["blocks.0.attn.q_norm.weight"]
    assert not report.complete
    text = str(report)
    assert "missing (left at their initial values):\n    norm.weight" in text
    assert "unexpected (ignored):\n    blocks.0.attn.q_norm.weight" in text


def test_unreadable_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="no encoder weights recognised"):
        load_pretrained_encoder(our_encoder(), {"conv1.weight": torch.zeros(3)})
    torch.save({"args": argparse.Namespace(lr=0.1), "teacher": {}}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"weights_only=True\) refused .*load it yourself"):
        load_pretrained_encoder(our_encoder(), tmp_path / "pickled.pth")


def _written(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _cut(path, keep: float):
    return _written(path, path.read_bytes()[: int(path.stat().st_size * keep)])


def _truncated_pth(folder):
    torch.save({"w": torch.zeros(64)}, folder / "t.pth")
    return _cut(folder / "t.pth", 0.5)


def _truncated_safetensors(folder):
    save_file({"w": torch.zeros(64)}, folder / "t.safetensors")
    return _cut(folder / "t.safetensors", 0.9)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: _written(d / "model" / "model.safetensors", b"x").parent,
         r"model is a folder; pass the weight file inside it \(it holds model.safetensors\), not the folder"),
        (lambda d: _written(d / "e.pth", b""), r"e.pth is empty \(0 bytes\), expected a weight file"),
        (lambda d: _written(d / "e.safetensors", b""), r"e.safetensors is empty"),
        (_truncated_pth,
         r"cannot read .*t.pth as a PyTorch checkpoint \(torch.save\) \(PytorchStreamReader.*\); the file is "
         r"truncated or not a checkpoint: copy or download it again"),
        (lambda d: _written(d / "page.pth", b"<html>404 not found</html>"),
         r"cannot read .*page.pth as a PyTorch checkpoint.*truncated or not a checkpoint"),
        (_truncated_safetensors, r"cannot read .*t.safetensors as a safetensors file \(.*\); the file is truncated"),
        (lambda d: _written(d / "g.safetensors", bytes(range(200))), r"cannot read .*g.safetensors as a safetensors"),
    ],
    ids=["folder", "empty-pth", "empty-safetensors", "truncated-pth", "html-page", "truncated-safetensors", "garbage"],
)  # fmt: skip
def test_unreadable_files_give_one_line_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        load_pretrained_encoder(our_encoder(), path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert error.value.__context__ is None or error.value.__suppress_context__  # no torch traceback under ours


def nnunet_like_checkpoint(path, with_numpy: bool):
    """The keys nnU-Net's save_checkpoint writes; its logging holds numpy floats, which weights_only refuses."""
    logging = {"mean_fg_dice": [np.float64(0.5)] if with_numpy else [0.5]}
    torch.save(
        {"network_weights": {"encoder.cls_token": torch.zeros(1, 1, EMBED)}, "optimizer_state": {}, "logging": logging,
         "current_epoch": 4, "init_args": {"fold": 0}, "trainer_name": "EquiFlexTrainer"},
        path,
    )  # fmt: skip
    return path


def test_nnunet_checkpoint_points_to_pretrained_weights(tmp_path):
    path = nnunet_like_checkpoint(tmp_path / "checkpoint_final.pth", with_numpy=True)
    with pytest.raises(ValueError, match=r"is an nnU-Net training checkpoint .*-pretrained_weights .*checkpoint_final"):
        load_pretrained_encoder(our_encoder(), path)
    assert is_nnunet_checkpoint(path)
    assert is_nnunet_checkpoint(nnunet_like_checkpoint(tmp_path / "plain.pth", with_numpy=False))
    torch.save(timm_vit().state_dict(), tmp_path / "vit.pth")
    assert not is_nnunet_checkpoint(tmp_path / "vit.pth")
    (tmp_path / "text.pth").write_text("network_weights trainer_name init_args")
    assert not is_nnunet_checkpoint(tmp_path / "text.pth")  # not a torch zip archive


def test_equiflex_pretrained_rejects_nnunet_checkpoints(tmp_path, monkeypatch):
    from nnunet_equiflex.trainers.equiflex_trainers import pretrained_checkpoint_from_env

    for with_numpy in (True, False):  # refused by weights_only, or loadable: both are nnU-Net's, not a ViT's
        path = nnunet_like_checkpoint(tmp_path / f"checkpoint_final_{with_numpy}.pth", with_numpy)
        monkeypatch.setenv("EQUIFLEX_PRETRAINED", str(path))
        with pytest.raises(ValueError, match=r"EQUIFLEX_PRETRAINED=.*nnUNetv2_train ... -pretrained_weights .*unset"):
            pretrained_checkpoint_from_env()


def test_mapping_without_tensors_and_unreadable_position_grid():
    with pytest.raises(ValueError, match=r"no tensors found in the checkpoint \(top-level keys: epoch, args\); pass"):
        load_pretrained_encoder(our_encoder(), {"epoch": 3, "args": {"lr": 0.1}})
    state = timm_vit().state_dict()
    state["pos_embed"] = torch.zeros(1, 15, EMBED)  # 14 or 15 grid entries: no square grid, not 4x4
    with pytest.raises(ValueError, match=r"cannot read a token grid from a position embedding of length 15 .*square"):
        load_pretrained_encoder(our_encoder(), state)
    report = load_pretrained_encoder(our_encoder(), state, strict_shapes=False)
    assert "pos_embed" in report.missing and any(s.startswith("pos_embed: shape (1, 15, 64)") for s in report.skipped)


def test_find_cached_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert find_cached_checkpoint("dinov2_vits14") is None
    assert find_cached_checkpoint("facebook/dino-vits8") is None

    snapshot = tmp_path / "hf" / "hub" / "models--facebook--dinov2-small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert find_cached_checkpoint("dinov2_vits14") == snapshot / "model.safetensors"

    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth"
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"")
    assert find_cached_checkpoint("dino_vits8") == hub_file
    with pytest.raises(ValueError, match="unknown checkpoint name 'vit_huge'"):
        find_cached_checkpoint("vit_huge")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download facebook/dino-vits16"):
        load_pretrained_encoder(our_encoder(), "dino_vits16")


@pytest.mark.parametrize("timm_kwargs", [dict(), DINOV2_REG], ids=["dino", "dinov2-registers"])
def test_d2_equivariance_holds_after_loading(timm_kwargs):
    reference = timm_vit(**timm_kwargs)
    net = EquiFlexFormer(
        in_channels=1,
        num_classes=3,
        patch_size=PATCH,
        embed_dim=EMBED,
        depth=DEPTH,
        num_heads=HEADS,
        n_lifted_blocks=1,
        window_radius=1,
        group="d2",
        attention_backend="sdpa",
        pos_embed_grid=(GRID, GRID),
        num_register_tokens=timm_kwargs.get("reg_tokens", 0),
    ).eval()
    report = load_pretrained_encoder(net, reference.state_dict())
    assert report.complete
    assert torch.equal(net.encoder.blocks[1].norm2.weight.data, reference.blocks[1].norm2.weight.data)
    errors = max_equivariance_error(net, torch.randn(2, 1, IMAGE, 3 * PATCH), group_elements("d2"))
    assert max(errors.values()) < 1e-4, errors


# 2D -> 3D: a 2D ViT checkpoint inflated into a 3D encoder (patch filter spread along depth, position grid repeated).
DEPTH_PATCH = 2


def our_encoder_3d(depth_tokens: int, **overrides) -> EquiFlexEncoder:
    kwargs = dict(spatial_dims=3, patch_size=[DEPTH_PATCH, PATCH, PATCH], pos_embed_grid=(depth_tokens, GRID, GRID))
    return our_encoder(**{**kwargs, **overrides})


@pytest.mark.parametrize("layout", [dict(), dict(n_lifted_blocks=0, window_radius=GRID - 1, attention_backend="sdpa")],
                         ids=["global", "local-window-covering-grid"])  # fmt: skip
def test_2d_checkpoint_inflated_to_3d_gives_the_2d_tokens_on_a_volume_of_one_token_slice(vit, image, layout):
    encoder = our_encoder_3d(1, **layout)
    report = load_pretrained_encoder(encoder, vit.state_dict())
    assert report.complete and report.loaded == list(encoder.state_dict())
    assert any("inflated to 3D, spread evenly over 2 slices" in a for a in report.adaptations)
    assert any("pos_embed inflated to 3D" in a for a in report.adaptations)
    volume = image[:, :, None].expand(-1, -1, DEPTH_PATCH, -1, -1)  # every slice the same 2D image
    assert max_diff(our_tokens(encoder, volume), timm_tokens(vit, image)) < TOL


def test_inflation_repeats_the_resampled_in_plane_positions_on_every_slice(vit):
    encoder = our_encoder_3d(3, pos_embed_grid=(3, 2 * GRID, GRID))
    report = load_pretrained_encoder(encoder, vit.state_dict())
    assert any("resampled bicubically from 4x4 to 8x4" in a for a in report.adaptations)
    from nnunet_equiflex.pretrained import resample_patch_pos_embed

    in_plane = resample_patch_pos_embed(vit.pos_embed[:, 1:].detach(), (GRID, GRID), (2 * GRID, GRID))
    grid = encoder.pos_embed.detach()[:, 1:].reshape(1, 3, 2 * GRID * GRID, EMBED)
    for k in range(3):
        assert torch.allclose(grid[:, k], in_plane, atol=1e-6)
    weight = encoder.patch_embed.proj.weight.detach()
    assert torch.allclose(weight.sum(2), vit.patch_embed.proj.weight.detach(), atol=1e-6)
    assert torch.equal(weight[:, :, 0], weight[:, :, 1])


def test_inflation_needs_the_in_plane_patch_size_of_the_checkpoint(vit):
    with pytest.raises(ValueError, match=r"patch size 8x8 in the checkpoint vs 2x4x4 in the network.*"
                       r"patch_size=\[2, 8, 8\]"):  # fmt: skip
        load_pretrained_encoder(our_encoder_3d(1, patch_size=[DEPTH_PATCH, 4, 4], pos_embed_grid=(1, 8, 8)),
                                vit.state_dict())  # fmt: skip


def test_flip_equivariance_in_3d_holds_after_inflating_a_2d_checkpoint(vit):
    net = EquiFlexFormer(
        in_channels=1, num_classes=3, spatial_dims=3, patch_size=[DEPTH_PATCH, PATCH, PATCH], embed_dim=EMBED,
        depth=DEPTH, num_heads=HEADS, n_lifted_blocks=1, window_radius=1, group="flips", attention_backend="sdpa",
        pos_embed_grid=(2, GRID, GRID),
    ).eval()  # fmt: skip
    assert load_pretrained_encoder(net, vit.state_dict()).complete
    errors = max_equivariance_error(
        net, torch.randn(1, 1, 3 * DEPTH_PATCH, 2 * PATCH, 3 * PATCH), group_elements("flips", 3)
    )
    assert len(errors) == 8 and max(errors.values()) < 1e-4, errors
