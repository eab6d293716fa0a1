"""3d_fullres through nnU-Net: `nnunet-equiflex plan -c 3d_fullres` next to the 2d configuration, the trainers
on it, and nnU-Net's predictor (with our patch) exactly flip-consistent on volumes.

The dataset here is only what planning reads (dataset.json, the images for the reader, a fingerprint), written in
the test, so planning and trainer set-up run in-process in seconds; nothing is trained."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_equiflex import cli
from nnunet_equiflex.planners.equiflex_planner import plan_dataset
from nnunet_equiflex.planning import NETWORK_CLASS_NAME, token_size_for_spacing

NAME = "Dataset951_Planning3D"


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """A fingerprinted dataset of 8 volumes; returns a function that writes it with given spacing and shape."""
    raw, preprocessed = tmp_path / "raw", tmp_path / "preprocessed"
    for key, folder in (
        ("nnUNet_raw", raw),
        ("nnUNet_preprocessed", preprocessed),
        ("nnUNet_results", tmp_path / "results"),
    ):
        monkeypatch.setenv(key, str(folder))  # nnU-Net reads its paths from the environment when used

    def write(spacing_zyx: tuple[float, float, float], shape_zyx: tuple[int, int, int]):
        folder = raw / NAME
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(exist_ok=True)
        dataset_json = {
            "channel_names": {"0": "MRI"},
            "labels": {"background": 0, "organ": 1},
            "numTraining": 8,
            "file_ending": ".nii.gz",
        }
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
        image = sitk.GetImageFromArray(np.zeros(shape_zyx, dtype=np.float32))
        image.SetSpacing(tuple(reversed(spacing_zyx)))
        for i in range(8):
            sitk.WriteImage(image, str(folder / "imagesTr" / f"case{i}_0000.nii.gz"))
            sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt8), str(folder / "labelsTr" / f"case{i}.nii.gz"))
        fingerprint = {
            "spacings": [list(spacing_zyx)] * 8,
            "shapes_after_crop": [list(shape_zyx)] * 8,
            "median_relative_size_after_cropping": 1.0,
            "foreground_intensity_properties_per_channel": {
                "0": {
                    "mean": 0.0,
                    "median": 0.0,
                    "std": 1.0,
                    "min": -3.0,
                    "max": 3.0,
                    "percentile_99_5": 3.0,
                    "percentile_00_5": -3.0,
                }  # fmt: skip
            },
        }
        (preprocessed / NAME).mkdir(parents=True, exist_ok=True)
        (preprocessed / NAME / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
        return preprocessed / NAME

    return write


def _plans(folder):
    return json.loads((folder / "EquiFlexPlans.json").read_text())


def test_3d_fullres_is_planned_next_to_the_2d_configuration(dataset):
    folder = dataset((3.0, 1.0, 1.0), (24, 96, 96))  # 3 mm slices of 1 mm pixels
    plan_dataset(NAME, preset="tiny")
    before = _plans(folder)
    nnunet_3d = before["configurations"]["3d_fullres"]  # -c 2d leaves nnU-Net's CNN configuration as it is
    assert nnunet_3d["architecture"]["network_class_name"] != NETWORK_CLASS_NAME

    plan_dataset(NAME, configuration="3d_fullres")  # default 3D preset: vit_s8_3d
    plans = _plans(folder)
    assert plans["configurations"]["2d"] == before["configurations"]["2d"]
    cfg = plans["configurations"]["3d_fullres"]
    kwargs = cfg["architecture"]["arch_kwargs"]
    assert cfg["architecture"]["network_class_name"] == NETWORK_CLASS_NAME
    assert kwargs["spatial_dims"] == 3 and kwargs["group"] == "flips"
    assert kwargs["patch_size"] == [4, 8, 8] and kwargs["embed_dim"] == 384  # tokens halved along the coarse z axis
    assert cfg["data_identifier"] == "nnUNetPlans_3d_fullres"  # nnU-Net's preprocessed 3d_fullres data
    assert cfg["spacing"] == nnunet_3d["spacing"]
    for ours, cnn, token in zip(cfg["patch_size"], nnunet_3d["patch_size"], kwargs["patch_size"]):
        assert ours % token == 0 and cnn <= ours < cnn + token
    assert cfg["batch_size"] >= 2

    # Planning 2d again over these plans keeps the 3D configuration and writes the same 2d one.
    plan_dataset(NAME, preset="tiny")
    assert _plans(folder) == plans


def test_isotropic_volumes_keep_one_token_size(dataset):
    dataset((1.0, 1.0, 1.0), (64, 64, 64))
    plans = plan_dataset(NAME, configuration="3d_fullres")
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["patch_size"] == 8


def test_token_rule():
    assert token_size_for_spacing(4, [3.0, 1.0, 1.0]) == [2, 4, 4]
    assert token_size_for_spacing(8, [5.0, 0.8, 0.8]) == [4, 8, 8]
    assert token_size_for_spacing(4, [1.5, 1.0, 1.0]) == 4  # below twice the finest spacing: isotropic tokens
    assert token_size_for_spacing([4, 8, 8], [1.0, 1.0, 1.0]) == [4, 8, 8]  # a per-axis choice is kept


def test_2d_images_have_no_3d_fullres_to_plan(dataset, capsys):
    dataset((1.0, 1.0, 1.0), (1, 64, 64))  # one slice deep: nnU-Net plans 2d only
    assert cli.main(["plan", "-d", NAME, "-c", "3d_fullres"]) == 2
    error = capsys.readouterr().err
    assert "no 3d_fullres configuration" in error and "nnUNetv2_plan_and_preprocess -d" in error
    assert "-c 3d_fullres" in error


def test_a_2d_preset_for_3d_fullres_is_refused_with_the_fix(dataset, capsys):
    dataset((3.0, 1.0, 1.0), (24, 96, 96))
    assert cli.main(["plan", "-d", NAME, "-c", "3d_fullres", "--preset", "tiny"]) == 2
    assert "needs a 3D one; pass a 3D preset (--preset vit_s8_3d; tiny3d for CPU tests)" in capsys.readouterr().err


SMALL = ((3.0, 1.0, 1.0), (16, 32, 32))  # a patch of 8x8x8 tokens of 2x4x4: a forward pass takes milliseconds


def _trainer(trainer_name: str, plans: dict, configuration: str = "3d_fullres"):
    from nnunet_equiflex.trainers import equiflex_trainers

    dataset_json = {"labels": {"background": 0, "organ": 1}, "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"}
    cls = getattr(equiflex_trainers, trainer_name)
    return cls({**plans, "continue_training": False}, configuration, 0, dataset_json, torch.device("cpu"))


@pytest.mark.parametrize("trainer_name", ["EquiFlexTrainer", "EquiFlexTrainerTiny3D", "EquiFlexTrainerTiny3D_smoke"])
def test_equivariant_trainers_take_the_planned_3d_configuration_with_one_pass_per_tile(dataset, trainer_name):
    dataset(*SMALL)
    plans = plan_dataset(NAME, configuration="3d_fullres", preset="tiny3d")
    trainer = _trainer(trainer_name, plans)
    patch = tuple(trainer.configuration_manager.patch_size)
    assert patch == tuple(plans["configurations"]["3d_fullres"]["patch_size"])
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 2, False)
    assert net.spatial_dims == 3 and net.encoder.group == "flips" and len(net.encoder.elements) == 8
    assert net.encoder.token_size == (2, 4, 4)  # the plans' anisotropic tokens, also for the tiny3d trainers
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, *patch)).shape == (1, 2, *patch)
    mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3]
    assert mirror_axes is None and trainer.inference_allowed_mirroring_axes is None  # no mirroring, no 8-fold TTA
    if trainer_name.endswith("_smoke"):
        assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (4, 25)


@pytest.mark.parametrize("trainer_name", ["EquiFlexTrainerViTS8_3D", "EquiFlexTrainerViTTi8_3D"])
def test_the_vit_3d_trainers_build_their_preset_on_the_plans_tokens(dataset, trainer_name):
    dataset(*SMALL)
    plans = plan_dataset(NAME, configuration="3d_fullres", preset="vit_s8_3d")
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kwargs["patch_size"] == [4, 8, 8]  # 8 px tokens in-plane, halved along the 3 mm axis
    trainer = _trainer(trainer_name, plans)
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 2, False)
    assert net.encoder.token_size == (4, 8, 8) and net.encoder.embed_dim == (384 if "S8" in trainer_name else 192)
    assert net.encoder.lifting_is_linear and len(net.encoder.elements) == 8
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] is None


def test_the_pretrained_3d_trainer_inflates_a_2d_vit_s8_checkpoint_and_logs_it(dataset, tmp_path, monkeypatch):
    import functools

    import torch.nn as nn
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=224, patch_size=8, embed_dim=384, depth=12, num_heads=6, qkv_bias=True,
                            num_classes=0, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))  # fmt: skip
    path = tmp_path / "vit_s8_timm.pth"
    torch.save(vit.state_dict(), path)
    monkeypatch.setenv("EQUIFLEX_PRETRAINED", str(path))
    dataset(*SMALL)
    trainer = _trainer(
        "EquiFlexTrainerPretrained3D", plan_dataset(NAME, configuration="3d_fullres", preset="vit_s8_3d")
    )
    data = tmp_path / "preprocessed" / NAME / "nnUNetPlans_3d_fullres"
    data.mkdir()
    (data / "case0.b2nd").touch()  # initialize() reads the data format from the file endings, not the data
    trainer.initialize()
    assert trainer.pretrained_report.complete
    weight = trainer.network.encoder.patch_embed.proj.weight.detach()
    assert weight.shape == (384, 1, 4, 8, 8)
    assert torch.allclose(weight.sum(2), vit.patch_embed.proj.weight.detach().sum(1, keepdim=True), atol=1e-5)
    log = open(trainer.log_file).read()
    assert "2D filters inflated to 3D, spread evenly over 4 slices" in log
    assert "pos_embed resampled bicubically from 28x28 to 16x16" in log and "repeated along depth (8 slices)" in log


def test_flex_trainer_keeps_nnunets_3d_mirroring(dataset):
    dataset(*SMALL)
    trainer = _trainer("FlexTrainer", plan_dataset(NAME, configuration="3d_fullres"))
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] == (0, 1, 2)
    assert trainer.inference_allowed_mirroring_axes == (0, 1, 2)


@pytest.mark.parametrize(
    "trainer_name,planned,configuration,message",
    [
        # a 2D preset's whole shape (its spatial_dims included) over the planned 3D network
        ("EquiFlexTrainerTiny", "3d_fullres", "3d_fullres", r"builds a 2D network; configuration '3d_fullres' has"),
        # nnU-Net's CNN 3d_fullres (only 2d planned for EquiFlex): the default vit_s8 preset is 2D
        ("EquiFlexTrainer", "2d", "3d_fullres", r"builds a 2D network; configuration '3d_fullres' has a 3D patch"),
        (
            "EquiFlexTrainerD4",
            "3d_fullres",
            "3d_fullres",
            r"cannot build a 3D network from its settings \(group 'd4' .* is 2D-only",
        ),
        ("EquiFlexTrainerTiny3D", "2d", "2d", r"builds a 3D network; configuration '2d' has a 2D patch"),
    ],
)
def test_a_network_that_does_not_fit_the_configuration_stops_before_setup(
    dataset, tmp_path, trainer_name, planned, configuration, message
):
    dataset(*SMALL)
    plans = plan_dataset(NAME, configuration=planned, preset="tiny" if planned == "2d" else None)
    fix = "nnunet-equiflex plan -d DATASET -c 3d_fullres" if configuration == "3d_fullres" else "2D trainer"
    with pytest.raises(ValueError, match=f"{trainer_name} {message}.*{fix}"):
        _trainer(trainer_name, plans, configuration)
    assert not (tmp_path / "results").exists()  # nothing set up for a run that cannot work


FLIP_AXES = [axes for r in (1, 2, 3) for axes in itertools.combinations((1, 2, 3), r)]  # the 7 non-identity flips
TINY = ((3.0, 1.0, 1.0), (8, 16, 16))  # an 8x16x16 patch of 4x4x4 tokens: many tiles stay cheap on a CPU
# Odd-sized volumes smaller than the patch (padded by an odd amount: 2 tiles per axis) and larger (2-4 tiles).
VOLUMES = [(5, 11, 13), (11, 27, 19)]


@pytest.fixture
def predictor_3d(dataset):
    """nnU-Net's own predictor, set up as nnU-Net's validation does it (manual_initialization), around a
    random-weight tiny3d network of the planned 3d_fullres configuration."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    dataset(*TINY)
    trainer = _trainer("EquiFlexTrainerTiny3D", plan_dataset(NAME, configuration="3d_fullres", preset="tiny3d"))
    torch.manual_seed(0)
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 2, False)
    with torch.no_grad():
        torch.nn.init.normal_(net.decoder.refinement.conv2.weight, std=0.2)  # its zero init would hide it
    net.set_attention_backend("sdpa")  # the same function (tests/test_3d.py), uncompiled flex is slow on CPU
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_mirroring=True, perform_everything_on_device=False, device=torch.device("cpu")
    )
    predictor.allow_tqdm = False
    predictor.manual_initialization(
        net.eval(),
        trainer.plans_manager,
        trainer.configuration_manager,
        None,
        trainer.dataset_json,
        "EquiFlexTrainerTiny3D",
        trainer.inference_allowed_mirroring_axes,
    )
    return predictor


def _flip_errors_3d(predictor, size, flips=FLIP_AXES) -> list[float]:
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(sum(size)))
    logits = predictor.predict_sliding_window_return_logits(x)
    assert logits.shape == (2, *size)
    return [
        (predictor.predict_sliding_window_return_logits(x.flip(a)) - logits.flip(a)).abs().max().item()
        for a in FLIP_AXES
    ]


@pytest.mark.parametrize("size", VOLUMES)
def test_nnunet_predictor_is_exact_for_every_flip_of_a_volume(predictor_3d, size):
    from nnunet_equiflex import nnunet_patch

    assert tuple(predictor_3d.configuration_manager.patch_size) == (8, 16, 16)
    assert nnunet_patch.uses_symmetric_window(predictor_3d)
    assert max(_flip_errors_3d(predictor_3d, size)) < 1e-5  # float rounding of the network itself


def test_nnunets_own_window_is_not_flip_exact_on_volumes(predictor_3d, monkeypatch):
    from nnunet_equiflex import nnunet_patch

    monkeypatch.setenv(nnunet_patch.SWITCH_ENV, "0")
    assert not nnunet_patch.uses_symmetric_window(predictor_3d)
    single_axis_flips = FLIP_AXES[:3]
    assert max(_flip_errors_3d(predictor_3d, VOLUMES[0], single_axis_flips)) > 1e-2  # uneven padding, float16 sums
