"""End to end through nnU-Net's real console scripts, on CPU, with a tiny EquiFlex."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytestmark = pytest.mark.slow


def test_training_writes_final_checkpoint_and_beats_chance(trained_toy):
    fold = trained_toy["model_dir"] / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert not (fold / "checkpoint_latest.pth").exists()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    dice = {int(k): v["Dice"] for k, v in summary["mean"].items()}
    # Chance level: a prediction that draws each pixel's label from the class frequencies scores
    # about the class frequency as Dice; the objects cover well under 15% of the image each.
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (trained_toy["raw"] / "labelsTr").iterdir()]
    frequencies = {c: float(np.mean([np.mean(lab == c) for lab in labels])) for c in (1, 2)}
    for c in (1, 2):
        assert dice[c] > max(0.5, 3 * frequencies[c]), (c, dice, frequencies)


def test_checkpoint_disables_mirroring_for_the_equivariant_network(trained_toy):
    checkpoint = torch.load(trained_toy["model_dir"] / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["inference_allowed_mirroring_axes"] is None
    assert checkpoint["trainer_name"] == trained_toy["trainer"]


def test_predictions_keep_the_input_geometry(trained_toy):
    inputs = sorted((trained_toy["raw"] / "imagesTs").glob("*.nii.gz"))
    assert inputs
    for image_file in inputs:
        case = image_file.name.replace("_0000.nii.gz", "")
        pred = sitk.ReadImage(str(trained_toy["predictions"] / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(image_file))
        assert pred.GetSize() == image.GetSize()
        assert np.allclose(pred.GetSpacing(), image.GetSpacing())
        assert np.allclose(pred.GetOrigin(), image.GetOrigin())
        assert np.allclose(pred.GetDirection(), image.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


def test_plans_name_our_network_with_token_multiple_patch(trained_toy):
    plans = json.loads(
        (trained_toy["root"] / "preprocessed" / trained_toy["raw"].name / "EquiFlexPlans.json").read_text()
    )
    cfg = plans["configurations"]["2d"]
    assert cfg["architecture"]["network_class_name"] == "nnunet_equiflex.network.EquiFlexFormer"
    token = cfg["architecture"]["arch_kwargs"]["patch_size"]
    assert all(s % token == 0 for s in cfg["patch_size"])
    assert cfg["data_identifier"] == "nnUNetPlans_2d"  # nnU-Net's preprocessed data are reused
