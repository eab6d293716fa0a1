"""Shared pieces for tests that drive nnU-Net through its real console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_equiflex.discovery import trainers_dir

BIN = Path(sys.executable).parent
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # not the identity, so geometry is really checked


def toy_case(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright disk (label 1) and a dimmer square (label 2) on a noisy background."""
    ys, xs = np.mgrid[:height, :width]
    label = np.zeros((height, width), np.uint8)
    sy, sx = rng.integers(2, height - 14), rng.integers(2, width - 14)
    label[sy : sy + 12, sx : sx + 12] = 2
    cy, cx, r = rng.integers(10, height - 10), rng.integers(10, width - 10), rng.integers(5, 9)
    label[(ys - cy) ** 2 + (xs - cx) ** 2 <= r * r] = 1
    image = np.where(label == 1, 2.0, np.where(label == 2, 1.0, 0.0)) + 0.3 * rng.standard_normal((height, width))
    return image.astype(np.float32), label


def write_2d_nifti(array: np.ndarray, path: Path, spacing: tuple[float, float], origin: tuple[float, float, float]):
    image = sitk.GetImageFromArray(array[None])  # (1, H, W): nnU-Net's 2D-in-NIfTI layout
    image.SetSpacing((spacing[1], spacing[0], 8.0))
    image.SetOrigin(origin)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path))


def write_toy_dataset(raw: Path, dataset_id: int, num_train: int = 16, num_test: int = 4, seed: int = 0) -> Path:
    """A 2D dataset in nnU-Net raw format with odd and even image sizes."""
    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_Toy"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(num_train + num_test):
        height, width = (int(v) for v in rng.integers(40, 57, size=2))
        image, label = toy_case(rng, height, width)
        spacing = (float(rng.uniform(1.2, 1.6)),) * 2
        origin = tuple(float(v) for v in rng.uniform(-50, 50, size=3))
        split = "Tr" if i < num_train else "Ts"
        write_2d_nifti(image, folder / f"images{split}" / f"toy_{i:03d}_0000.nii.gz", spacing, origin)
        write_2d_nifti(label, folder / f"labels{split}" / f"toy_{i:03d}.nii.gz", spacing, origin)
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "disk": 1, "square": 2},
        "numTraining": num_train,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def nnunet_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_extTrainer=str(trainers_dir()),
        nnUNet_n_proc_DA="1",
        nnUNet_def_n_proc="1",
        OMP_NUM_THREADS="2",
        PYTHONUNBUFFERED="1",
    )
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def run(args: list[str], env: dict[str, str], log: Path | None = None) -> str:
    """Run a console script from this environment; fail with its output if it fails."""
    cmd = [str(BIN / args[0]), *args[1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if log is not None:
        log.write_text(output)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed with exit code {done.returncode}:\n{output[-6000:]}")
    return output
