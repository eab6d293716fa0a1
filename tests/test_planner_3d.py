"""`nnunet-equiflex plan -c 3d_fullres`: the 3D configuration next to the 2d one, from nnU-Net's fingerprint.

The dataset here is only what planning reads (dataset.json, one image for the reader, a fingerprint), written in
the test, so planning runs in-process in a second."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_equiflex import cli
from nnunet_equiflex.planners.equiflex_planner import plan_dataset
from nnunet_equiflex.planning import NETWORK_CLASS_NAME, token_size_for_spacing

NAME = "Dataset951_Planning3D"


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """A fingerprinted dataset of 8 volumes; returns a function that writes it with given spacing and shape."""
    import nnunetv2.experiment_planning.experiment_planners.default_experiment_planner as planner_module
    import nnunetv2.paths

    raw, preprocessed = tmp_path / "raw", tmp_path / "preprocessed"
    for module in (nnunetv2.paths, planner_module):
        monkeypatch.setattr(module, "nnUNet_raw", str(raw), raising=False)
        monkeypatch.setattr(module, "nnUNet_preprocessed", str(preprocessed), raising=False)

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

    plan_dataset(NAME, configuration="3d_fullres")  # default 3D preset: tiny3d
    plans = _plans(folder)
    assert plans["configurations"]["2d"] == before["configurations"]["2d"]
    cfg = plans["configurations"]["3d_fullres"]
    kwargs = cfg["architecture"]["arch_kwargs"]
    assert cfg["architecture"]["network_class_name"] == NETWORK_CLASS_NAME
    assert kwargs["spatial_dims"] == 3 and kwargs["group"] == "flips"
    assert kwargs["patch_size"] == [2, 4, 4]  # tokens halved along the coarse z axis
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
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["patch_size"] == 4


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
    assert "needs a 3D one; pass a 3D preset (--preset tiny3d)" in capsys.readouterr().err
