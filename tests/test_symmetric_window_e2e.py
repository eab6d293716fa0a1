"""Flip consistency on the commands users type: ``nnUNetv2_predict`` and ``nnUNetv2_train --val``.

Our trainer module patches nnU-Net's predictor (``nnunet_equiflex/nnunet_patch.py``) when nnU-Net imports it;
these tests run nnU-Net's real console scripts on the tiny model of the ``trained_toy`` fixture and check that
the prediction of every flipped image is exactly the flipped prediction, that nnU-Net's CNN is untouched, and
that ``EQUIFLEX_SYMMETRIC_PREDICTOR=0`` gives nnU-Net's own behaviour back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_env import run, toy_case, write_2d_nifti
from nnunet_equiflex.nnunet_patch import SWITCH_ENV
from nnunet_equiflex.predictor import symmetric_steps

pytestmark = pytest.mark.slow

FLIPS = {"h": (0,), "w": (1,), "hw": (0, 1)}  # array axes of a (H, W) slice
DATASET_FLIPS = 902


def _sizes(patch: tuple[int, int]) -> list[tuple[int, int, float]]:
    """(height, width, spacing factor): odd and even sizes smaller and larger than the patch, up to 4 tiles
    per axis, at the plan's spacing (the window sees these sizes) and at another one (nnU-Net resamples)."""
    ph, pw = patch
    return [
        (ph - 7, pw - 2, 1.0),
        (ph - 4, pw - 6, 1.0),
        (ph + 5, pw - 1, 1.0),
        (ph, pw, 1.0),
        (ph + 16, pw + 22, 1.0),
        (2 * ph - 15, pw + 17, 1.0),
        (2 * ph + 1, pw + 2, 1.0),
        (ph - 3, pw + 9, 1.13),
    ]


def _flip_key(case: str, flip: str) -> str:
    return f"{case}_{flip}"


@pytest.fixture(scope="module")
def flip_set(trained_toy):
    """Raw cases (nnU-Net format) and their flips along each in-plane axis, with labels."""
    plans = json.loads((trained_toy["model_dir"] / "plans.json").read_text())
    cfg = plans["configurations"]["2d"]
    patch, spacing = tuple(cfg["patch_size"]), tuple(cfg["spacing"])
    folder = trained_toy["root"] / "flip_set"
    images, labels = folder / "imagesTr", folder / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    rng = np.random.default_rng(7)
    cases, shapes = [], {}
    for i, (height, width, factor) in enumerate(_sizes(patch)):
        image, label = toy_case(rng, height, width)
        case = f"flip{i:02d}"
        cases.append(case)
        case_spacing = (spacing[0] * factor, spacing[1] * factor)
        for flip, axes in {"id": (), **FLIPS}.items():
            key = _flip_key(case, flip)
            write_2d_nifti(np.flip(image, axes).copy(), images / f"{key}_0000.nii.gz", case_spacing, (1.0, 2.0, 3.0))
            write_2d_nifti(np.flip(label, axes).copy(), labels / f"{key}.nii.gz", case_spacing, (1.0, 2.0, 3.0))
        shapes[case] = (height, width)
    return dict(images=images, labels=labels, cases=cases, shapes=shapes, patch=patch, plans=plans)


def test_flip_set_covers_odd_even_small_large_and_several_tiles(flip_set):
    patch, shapes = flip_set["patch"], list(flip_set["shapes"].values())
    assert any(h < patch[0] and w < patch[1] for h, w in shapes)
    assert any(h > patch[0] and w > patch[1] for h, w in shapes)
    assert any(h % 2 == 1 for h, _ in shapes) and any(w % 2 == 0 for _, w in shapes)
    tiles = [len(symmetric_steps(h, patch[0], 0.5)) * len(symmetric_steps(w, patch[1], 0.5)) for h, w in shapes]
    assert max(tiles) >= 6


def _predict(trained_toy, images: Path, out: Path, trainer: str, plans: str, env: dict, log: str) -> str:
    args = ["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "901", "-c", "2d", "-tr", trainer]
    args += ["-p", plans, "-f", "0", "-device", "cpu"]
    return run(args, env, trained_toy["logs"] / log)


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0]


def flip_agreement(pred_dir: Path, cases: list[str]) -> dict[tuple[str, str], float]:
    """(case, flip) -> fraction of pixels where pred(flip(x)) == flip(pred(x))."""
    agreement = {}
    for case in cases:
        reference = _read(pred_dir / f"{_flip_key(case, 'id')}.nii.gz")
        for flip, axes in FLIPS.items():
            flipped = _read(pred_dir / f"{_flip_key(case, flip)}.nii.gz")
            agreement[case, flip] = float(np.mean(flipped == np.flip(reference, axes)))
    return agreement


def _report(name: str, agreement: dict) -> str:
    exact = sum(v == 1.0 for v in agreement.values())
    line = f"{name}: {exact}/{len(agreement)} pairs exact, {np.mean(list(agreement.values())):.5%} of pixels"
    print(line)
    return line


@pytest.fixture(scope="module")
def equiflex_predictions(trained_toy, flip_set):
    out = trained_toy["root"] / "flip_set_predictions"
    log = _predict(
        trained_toy, flip_set["images"], out, trained_toy["trainer"], "EquiFlexPlans", trained_toy["env"], "flip.txt"
    )
    return dict(out=out, log=log)


def test_nnunetv2_predict_is_flip_exact_for_every_size(equiflex_predictions, flip_set):
    agreement = flip_agreement(equiflex_predictions["out"], flip_set["cases"])
    _report("nnUNetv2_predict, EquiFlex", agreement)
    assert len(agreement) == 3 * len(flip_set["cases"])
    assert all(v == 1.0 for v in agreement.values()), {k: v for k, v in agreement.items() if v < 1}
    for case in flip_set["cases"]:  # real segmentations, not an all-background map that is trivially symmetric
        assert len(np.unique(_read(equiflex_predictions["out"] / f"{_flip_key(case, 'id')}.nii.gz"))) == 3


NNUNET_WITHOUT_PATCH = (
    "import sys, types\n"
    "sys.modules['nnunet_equiflex.nnunet_patch'] = types.ModuleType('nnunet_equiflex.nnunet_patch')\n"
    "from nnunetv2.inference.predict_from_raw_data import predict_entry_point\n"
    "sys.argv = ['nnUNetv2_predict', *sys.argv[1:]]\n"
    "predict_entry_point()\n"
)


def test_switch_off_restores_nnunets_predictions_which_are_not_flip_exact(trained_toy, flip_set, tmp_path):
    """EQUIFLEX_SYMMETRIC_PREDICTOR=0 writes the files nnU-Net writes when our patch module is never loaded."""
    off = tmp_path / "switched_off"
    env_off = {**trained_toy["env"], SWITCH_ENV: "0"}
    _predict(trained_toy, flip_set["images"], off, trained_toy["trainer"], "EquiFlexPlans", env_off, "flip_off.txt")
    unpatched = tmp_path / "without_patch"
    args = ["-i", str(flip_set["images"]), "-o", str(unpatched), "-d", "901", "-c", "2d"]
    args += ["-tr", trained_toy["trainer"], "-p", "EquiFlexPlans", "-f", "0", "-device", "cpu"]
    done = subprocess.run(
        [sys.executable, "-c", NNUNET_WITHOUT_PATCH, *args], env=trained_toy["env"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in off.glob("*.nii.gz"))
    assert len(files) == 4 * len(flip_set["cases"])
    for name in files:
        assert (off / name).read_bytes() == (unpatched / name).read_bytes(), name
    # nnU-Net's own window is not mirror-symmetric: some pair differs (odd padding differences, float16 sums).
    agreement = flip_agreement(off, flip_set["cases"])
    _report("nnUNetv2_predict, EquiFlex, switched off", agreement)
    assert min(agreement.values()) < 1.0


def test_cnn_predictions_are_byte_identical_with_and_without_our_trainer_module(
    trained_toy, trained_toy_cnn, flip_set, tmp_path
):
    """nnUNetTrainer_equiflexSmoke lives in our trainers folder, so predicting with it imports our module (and
    the patch); the same weights under nnU-Net's own trainer name, without nnUNet_extTrainer, never do."""
    with_ours = tmp_path / "with_our_module"
    log = _predict(
        trained_toy, flip_set["images"], with_ours, trained_toy_cnn["trainer"], "nnUNetPlans", trained_toy["env"],
        "flip_cnn.txt",
    )  # fmt: skip
    assert f"Using trainer '{trained_toy_cnn['trainer']}' from" in log

    results = tmp_path / "results"
    plain = results / trained_toy["raw"].name / "nnUNetTrainer__nnUNetPlans__2d"
    (plain / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(trained_toy_cnn["model_dir"] / name, plain / name)
    checkpoint = torch.load(trained_toy_cnn["model_dir"] / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer"
    torch.save(checkpoint, plain / "fold_0" / "checkpoint_final.pth")
    env = {k: v for k, v in trained_toy["env"].items() if k != "nnUNet_extTrainer"}
    env["nnUNet_results"] = str(results)
    without = tmp_path / "without_our_module"
    log = _predict(trained_toy, flip_set["images"], without, "nnUNetTrainer", "nnUNetPlans", env, "flip_cnn_plain.txt")
    assert "external trainer paths" not in log

    files = sorted(p.name for p in with_ours.glob("*.nii.gz"))
    assert len(files) == 4 * len(flip_set["cases"])
    for name in files:
        assert (with_ours / name).read_bytes() == (without / name).read_bytes(), name
    _report("nnUNetv2_predict, nnU-Net CNN + TTA", flip_agreement(with_ours, flip_set["cases"]))


@pytest.fixture(scope="module")
def flip_dataset(trained_toy, flip_set):
    """Dataset 902: the flip set as training cases, preprocessed with the trained model's plans; fold 0
    validates on every case. The trained fold-0 checkpoint is placed in its results folder."""
    name = f"Dataset{DATASET_FLIPS}_ToyFlips"
    env = trained_toy["env"]
    raw = Path(env["nnUNet_raw"]) / name
    shutil.copytree(flip_set["images"], raw / "imagesTr")
    shutil.copytree(flip_set["labels"], raw / "labelsTr")
    keys = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    dataset_json = json.loads((trained_toy["raw"] / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": len(keys)}, indent=2))

    preprocessed = Path(env["nnUNet_preprocessed"]) / name
    preprocessed.mkdir(parents=True)
    (preprocessed / "dataset.json").write_text((raw / "dataset.json").read_text())
    plans = {**flip_set["plans"], "dataset_name": name}
    (preprocessed / "EquiFlexPlans.json").write_text(json.dumps(plans, indent=2))
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": keys, "val": keys}]))
    run(
        ["nnUNetv2_preprocess", "-d", str(DATASET_FLIPS), "-plans_name", "EquiFlexPlans", "-c", "2d", "-np", "1"],
        env,
        trained_toy["logs"] / "preprocess_flips.txt",
    )
    fold = Path(env["nnUNet_results"]) / name / f"{trained_toy['trainer']}__EquiFlexPlans__2d" / "fold_0"
    fold.mkdir(parents=True)
    shutil.copy(trained_toy["model_dir"] / "fold_0" / "checkpoint_final.pth", fold / "checkpoint_final.pth")
    return dict(fold=fold, keys=keys)


def test_train_val_validation_outputs_are_flip_exact(trained_toy, flip_set, flip_dataset):
    """nnUNetv2_train --val runs nnU-Net's perform_actual_validation, as the end of every training does."""
    run(
        [
            "nnUNetv2_train", str(DATASET_FLIPS), "2d", "0", "-tr", trained_toy["trainer"], "-p", "EquiFlexPlans",
            "-device", "cpu", "--val",
        ],
        trained_toy["env"],
        trained_toy["logs"] / "train_val_flips.txt",
    )  # fmt: skip
    validation = flip_dataset["fold"] / "validation"
    assert sorted(p.name[: -len(".nii.gz")] for p in validation.glob("*.nii.gz")) == flip_dataset["keys"]
    assert (validation / "summary.json").is_file()
    agreement = flip_agreement(validation, flip_set["cases"])
    _report("nnUNetv2_train --val, EquiFlex", agreement)
    assert all(v == 1.0 for v in agreement.values()), {k: v for k, v in agreement.items() if v < 1}
