"""The pretrained trainers: encoder weights from EQUIFLEX_PRETRAINED, in-process and through nnUNetv2_train.

The checkpoint is a small random timm ViT in the tiny shape (token size 4, 64-dim, 4 blocks, 4 heads,
mlp ratio 2, 8x8 position grid, RGB), written by the test itself; the toy dataset is 1-channel.
"""

import functools
import math

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from nnunet_env import run

pytestmark = pytest.mark.slow

TRAINER = "EquiFlexTrainerPretrainedTiny_smoke"
ENV = "EQUIFLEX_PRETRAINED"


def tiny_timm_state_dict() -> dict[str, torch.Tensor]:
    model = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        qkv_bias=True,
        num_classes=0,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
    )
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # far from any fresh initialisation, LayerNorm scales included
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    state_dict = tiny_timm_state_dict()
    path = tmp_path_factory.mktemp("pretrained") / "vit_tiny_timm.pth"
    torch.save(state_dict, path)
    return path, state_dict


@pytest.fixture
def toy_env(trained_toy, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, trained_toy["env"][key])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # single-threaded data loading inside the test process
    monkeypatch.delenv(ENV, raising=False)
    return trained_toy


def make_trainer(fold: int, trainer: str = TRAINER):
    from nnunetv2.run.run_training import get_trainer_from_args

    return get_trainer_from_args("901", "2d", fold, trainer, "EquiFlexPlans", device=torch.device("cpu"))


def expected_encoder(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint as the 1-channel encoder holds it: RGB patch filters summed, the rest as is."""
    expected = dict(checkpoint)
    expected["patch_embed.proj.weight"] = checkpoint["patch_embed.proj.weight"].sum(1, keepdim=True)
    return expected


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_initialize_loads_encoder_and_training_starts_from_it(toy_env, tiny_checkpoint, monkeypatch):
    path, checkpoint = tiny_checkpoint
    monkeypatch.setenv(ENV, str(path))
    trainer = make_trainer(1)
    assert trainer.initial_lr == 1e-4 and trainer.layer_decay == 0.75
    torch.manual_seed(123)
    trainer.initialize()
    # The same seed rebuilds the network exactly as initialize() built it, before loading.
    torch.manual_seed(123)
    fresh = type(trainer).build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads, False
    )
    report = trainer.pretrained_report
    assert report.complete and len(report.loaded) == len(checkpoint) and str(path) == report.source
    with open(trainer.log_file) as f:
        log = f.read()
    assert f"from {path}" in log and "3 -> 1 input channels" in log

    expected = expected_encoder(checkpoint)
    encoder = {k: v.detach().clone() for k, v in trainer.network.encoder.state_dict().items()}
    assert max_abs_diff(encoder, expected) == 0.0
    init_gap = max_abs_diff(fresh.encoder.state_dict(), expected)
    assert init_gap > 0.2
    decoder = {k: v for k, v in trainer.network.state_dict().items() if not k.startswith("encoder.")}
    fresh_decoder = {k: v for k, v in fresh.state_dict().items() if not k.startswith("encoder.")}
    assert decoder and max_abs_diff(decoder, fresh_decoder) == 0.0

    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        out = trainer.train_step(next(trainer.dataloader_train))
    finally:
        trainer.on_train_end()
    assert math.isfinite(float(out["loss"]))
    moved = max_abs_diff({k: v.detach() for k, v in trainer.network.encoder.state_dict().items()}, expected)
    # One AdamW step at lr <= 1e-4: the weights left the checkpoint, but only by about the step size.
    assert 0.0 < moved < 1e-3 < init_gap / 100


def test_missing_variable_fails_with_the_fix_but_building_the_network_does_not_need_it(toy_env):
    trainer = make_trainer(2)
    message = rf"(?s){ENV} is not set.*export {ENV}=/path/to/dino_deitsmall8_pretrain.pth.*export {ENV}=dino_vits8"
    with pytest.raises(RuntimeError, match=message):
        trainer.initialize()
    assert not trainer.was_initialized and trainer.network is None
    # The predictor only calls build_network_architecture on the class.
    net = type(trainer).build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, False)
    assert len(net.encoder.blocks) == 4


def test_cached_names_resolve_without_download(toy_env, tiny_checkpoint, tmp_path, monkeypatch):
    from nnunet_equiflex.trainers.equiflex_trainers import pretrained_checkpoint_from_env

    path, _ = tiny_checkpoint
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(ENV, "dino_vits8")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download facebook/dino-vits8"):
        pretrained_checkpoint_from_env()
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        pretrained_checkpoint_from_env()

    snapshot = tmp_path / "hf" / "hub" / "models--facebook--dino-vits8" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_model.bin").write_bytes(path.read_bytes())
    monkeypatch.setenv(ENV, "facebook/dino-vits8")
    assert pretrained_checkpoint_from_env() == snapshot / "pytorch_model.bin"

    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth"
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(path.read_bytes())
    monkeypatch.setenv(ENV, "dino_vits8")
    assert pretrained_checkpoint_from_env() == hub_file  # the torch hub file first
    trainer = make_trainer(2)
    trainer.initialize()
    assert trainer.pretrained_report.source == str(hub_file) and trainer.pretrained_report.complete


def test_nnunet_pretrained_weights_flag_loads_our_checkpoints(toy_env, tiny_checkpoint, monkeypatch):
    """What nnUNetv2_train does with -pretrained_weights: initialize() (ours loads first), then nnU-Net's
    loader overwrites every tensor with the nnU-Net checkpoint's."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    monkeypatch.setenv(ENV, str(tiny_checkpoint[0]))
    source = toy_env["model_dir"] / "fold_0" / "checkpoint_final.pth"
    trainer = make_trainer(2)
    maybe_load_checkpoint(trainer, False, False, str(source))
    weights = torch.load(source, map_location="cpu", weights_only=False)["network_weights"]
    assert max_abs_diff(trainer.network.state_dict(), weights) == 0.0


def test_console_training_loads_the_checkpoint_and_val_runs_without_it(toy_env, tiny_checkpoint):
    path, _ = tiny_checkpoint
    toy = toy_env
    args = ["nnUNetv2_train", "901", "2d", "0", "-tr", TRAINER, "-p", "EquiFlexPlans", "-device", "cpu"]
    env = {k: v for k, v in toy["env"].items() if k != ENV}
    output = run(args, {**env, ENV: str(path)}, toy["logs"] / "train_pretrained.txt")
    assert f"pretrained encoder weights from {path}" in output
    fold = toy["root"] / "results" / toy["raw"].name / f"{TRAINER}__EquiFlexPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    logs = sorted(fold.glob("training_log_*.txt"))
    assert logs and f"pretrained encoder weights from {path}" in logs[0].read_text()
    # Validation only restores the checkpoint and does not need the variable.
    run([*args, "--val"], env, toy["logs"] / "val_pretrained.txt")
    assert (fold / "validation" / "summary.json").is_file()


def test_console_pretrained_weights_flag_with_our_checkpoint(toy_env):
    """nnU-Net's -pretrained_weights with an nnU-Net checkpoint of ours, end to end (every tensor's
    key and shape is checked by nnU-Net's loader)."""
    toy = toy_env
    source = toy["model_dir"] / "fold_0" / "checkpoint_final.pth"
    args = ["nnUNetv2_train", "901", "2d", "4", "-tr", toy["trainer"], "-p", "EquiFlexPlans", "-device", "cpu"]
    env = {k: v for k, v in toy["env"].items() if k != ENV}
    output = run([*args, "-pretrained_weights", str(source)], env, toy["logs"] / "train_pretrained_weights.txt")
    assert f"Loading pretrained weights from file  {source}" in output
    assert (toy["model_dir"] / "fold_4" / "checkpoint_final.pth").is_file()
