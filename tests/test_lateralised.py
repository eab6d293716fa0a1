"""Lateralised labels: which names count as one side of a left/right pair, and the equivariant trainers' warning."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from nnunet_equiflex.planning import lateralised_label_warning, lateralised_labels

SIDED = ["kidney_left", "left kidney", "L_kidney", "kidney_L", "lung_r", "Lung-R", "LeftKidney", "kidneyRight",
         "adrenal gland (R)", "rt. lung", "Lt_adrenal", "RIGHT_LUNG"]  # fmt: skip
# Cardiac abbreviations are one word (the RV and LV are told apart by shape, not by side); "lateral" names no side;
# a letter-digit run is one word (the L1 vertebra); judgement call: "lateral ventricle" covers both sides.
NOT_SIDED = ["background", "liver", "LV cavity", "LV", "RV", "MLV", "LVC", "myocardium", "lateral ventricle",
             "L1", "vertebra_L5", "lumbar spine", "rectum", "Lr", "spleen", "IVC"]  # fmt: skip


@pytest.mark.parametrize("name", SIDED)
def test_sided_names_are_found(name):
    assert lateralised_labels(["background", name, "liver"]) == [name]


@pytest.mark.parametrize("name", NOT_SIDED)
def test_other_names_are_not(name):
    assert lateralised_labels([name]) == []
    assert lateralised_label_warning("EquiFlexTrainer", ["background", name]) is None


def test_warning_names_the_labels_and_the_non_equivariant_trainer():
    warning = lateralised_label_warning("EquiFlexTrainer", ["background", "kidney_left", "kidney_right", "liver"])
    assert warning.startswith("WARNING: label(s) kidney_left, kidney_right in dataset.json look lateralised")
    assert "EquiFlexTrainer is exactly reflection-equivariant" in warning
    assert "-tr FlexTrainer (not equivariant" in warning and "'Lateralised labels' in the README" in warning


@pytest.fixture
def toy_env(trained_toy, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, trained_toy["env"][key])
    return trained_toy


def _trainer(toy, trainer_cls, labels: dict | None = None):
    folder = toy["root"] / "preprocessed" / toy["raw"].name
    plans = {**json.loads((folder / "EquiFlexPlans.json").read_text()), "continue_training": False}
    dataset_json = json.loads((folder / "dataset.json").read_text())
    if labels is not None:
        dataset_json = {**copy.deepcopy(dataset_json), "labels": labels}
    return trainer_cls(plans, "2d", 3, dataset_json, torch.device("cpu"))


def _start_message(toy, trainer_cls, labels: dict | None, capsys) -> str:
    """What the trainer's start check prints (nnU-Net's print_to_log_file: console and training log)."""
    trainer = _trainer(toy, trainer_cls, labels)
    capsys.readouterr()
    trainer._warn_if_lateralised()
    return capsys.readouterr().out


@pytest.mark.slow
def test_equivariant_trainers_warn_at_start_and_flex_trainer_does_not(toy_env, capsys):
    from nnunet_equiflex.trainers.equiflex_trainers import EquiFlexTrainerTiny_smoke, FlexTrainerTiny_smoke

    sided = {"background": 0, "kidney_left": 1, "kidney_right": 2}
    log = _start_message(toy_env, EquiFlexTrainerTiny_smoke, sided, capsys)
    assert "label(s) kidney_left, kidney_right in dataset.json look lateralised" in log
    assert "EquiFlexTrainerTiny_smoke is exactly reflection-equivariant" in log and "-tr FlexTrainer " in log
    assert "-tr FlexTrainerNoMirroring where only the side of the image tells them apart" in log
    assert "lateralised" not in _start_message(toy_env, FlexTrainerTiny_smoke, sided, capsys)
    assert "lateralised" not in _start_message(toy_env, EquiFlexTrainerTiny_smoke, None, capsys)  # disk, square


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,augmented_axes,tta_axes",
    [
        ("FlexTrainerTiny", (0, 1), (0, 1)),
        ("FlexTrainerTinyNoMirroring", None, None),
        ("EquiFlexTrainerTiny", None, None),
    ],
)
def test_mirroring_of_the_flex_trainers(toy_env, name, augmented_axes, tta_axes):
    """FlexTrainer keeps nnU-Net's mirroring (augmentation and the axes the checkpoint allows for TTA); its
    NoMirroring variant has neither, like the equivariant trainers."""
    from nnunet_equiflex.trainers import equiflex_trainers

    trainer = _trainer(toy_env, getattr(equiflex_trainers, name))
    *_, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes == augmented_axes and trainer.inference_allowed_mirroring_axes == tta_axes


def _centroid_x(label, value) -> float:
    return float(np.nonzero(label == value)[1].mean())


def test_generated_kidneys_are_told_apart_only_by_the_liver(tmp_path):
    import SimpleITK as sitk

    from nnunet_equiflex.dataset_conversion.synthetic_lateral import LABELS, generate_synthetic_lateral

    folder = generate_synthetic_lateral(tmp_path, num_train=12, num_test=2, size=48)
    record = json.loads((folder / "generation.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == LABELS
    assert lateralised_labels(list(LABELS)) == ["kidney_right", "kidney_left"]  # the trainers will warn
    mirrored = []
    for case, info in record["cases"].items():
        split = "Tr" if info["split"] == "train" else "Ts"
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"images{split}" / f"{case}_0000.nii.gz")))[0]
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"labels{split}" / f"{case}.nii.gz")))[0]
        assert image.shape == label.shape == (48, 48) and image.dtype == np.float32
        assert set(np.unique(label)) == {0, 1, 2, 3}
        right, left, liver = (_centroid_x(label, LABELS[k]) for k in ("kidney_right", "kidney_left", "liver"))
        # the right kidney is the one on the liver's side, in either orientation
        assert (right < left) == (liver < 24) == (not info["mirrored"])
        kidney_means = [image[label == LABELS[k]].mean() for k in ("kidney_right", "kidney_left")]
        assert abs(kidney_means[0] - kidney_means[1]) < 0.05  # same intensity: nothing local tells them apart
        mirrored.append(info["mirrored"])
    assert 0 < sum(mirrored) < len(mirrored)  # both orientations occur


def test_generator_options_and_reproducibility(tmp_path):
    import SimpleITK as sitk

    from nnunet_equiflex.dataset_conversion.synthetic_lateral import main

    first = main(["-o", str(tmp_path / "a"), "--num-train", "3", "--num-test", "0", "--mirror-probability", "0"])
    second = main(["-o", str(tmp_path / "b"), "--num-train", "3", "--num-test", "0", "--mirror-probability", "0"])
    for case in ("lateral_train_0000", "lateral_train_0002"):
        a, b = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(f / "imagesTr" / f"{case}_0000.nii.gz"))) for f in (first, second)
        )
        assert np.array_equal(a, b)
    record = json.loads((first / "generation.json").read_text())
    assert not any(c["mirrored"] for c in record["cases"].values())
    bare = main(["-o", str(tmp_path / "c"), "--num-train", "2", "--num-test", "0", "--no-landmark"])
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(bare / "labelsTr" / "lateral_train_0000.nii.gz")))
    assert set(np.unique(label)) == {0, 1, 2}
    with pytest.raises(SystemExit):  # a non-empty dataset folder is not replaced without --overwrite
        main(["-o", str(tmp_path / "a"), "--num-train", "3", "--num-test", "0"])
    with pytest.raises(SystemExit):
        main(["-o", str(tmp_path / "d"), "--mirror-probability", "1.5"])


@pytest.mark.slow
def test_lateralised_benchmark_runs_and_prints_its_table(tmp_path):
    """The smallest run of benchmarks/lateralised.py: every row trained and evaluated through nnU-Net's commands."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lateralised.py"
    args = [sys.executable, str(script), str(tmp_path / "work"), "--num-train", "8", "--num-test", "2"]
    args += ["--size", "48", "--budget", "1", "2", "1", "--conditions", "landmark"]  # one condition: half the CI time
    done = subprocess.run(args, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "## condition landmark" in done.stdout and "budget (every network): 1 epochs x 2 iterations" in done.stdout
    for row in (
        "EquiFlex tiny (equivariant, 1 pass)",
        "nnU-Net CNN (mirroring aug + TTA)",
        "nnU-Net CNN (no mirroring)",
    ):
        assert f"| {row} |" in done.stdout
    assert "EquiFlex's start-of-training warning about lateralised labels: printed" in done.stdout
    rows = json.loads((tmp_path / "work" / "landmark" / "lateralised.json").read_text())["rows"]
    assert len(rows) == 7 and all(0.0 <= r["dice_right"] <= 1.0 and 0.0 <= r["right_as_left"] <= 1.0 for r in rows)
