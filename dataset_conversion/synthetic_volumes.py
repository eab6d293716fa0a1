"""A small synthetic 3D dataset that needs no download, in nnU-Net v2 raw format: the 3d_fullres demo data.

Each case is a volume of thick slices (3 mm along z, 1 mm in-plane, shape about 16-20 x 40-48 x 40-48) holding
three labelled structures: 1 ``core`` (an ellipsoid), 2 ``shell`` (a wall around the core, thicker on one side)
and 3 ``tube`` (a bent tube that passes beside the core), on a textured background with a smooth bias field,
blur and noise. The layout is chiral (the shell's thick side and the tube's bend are off-axis) and every case is
mirrored along each axis with probability 1/2, so the data distribution is invariant under the 8 flips of a
volume: the assumption a flip-equivariant 3D network builds in. Case ``i`` depends only on (seed, split, i).

    python -m nnunet_equiflex.dataset_conversion.synthetic_volumes --nnunet-raw $nnUNet_raw
    nnUNetv2_plan_and_preprocess -d 905 -c 3d_fullres
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from nnunet_equiflex.dataset_conversion.common import (
    FILE_ENDING,
    Progress,
    add_common_arguments,
    add_split_arguments,
    case_rng,
    errors_as_messages,
    prepare_dataset_folder,
    removed_on_error,
    write_dataset_json,
    write_image,
)

LABELS = {"background": 0, "core": 1, "shell": 2, "tube": 3}
DEFAULT_ID = 905
DEFAULT_NAME = "SyntheticVolumes"
SPACING_ZYX = (3.0, 1.0, 1.0)  # mm: thick slices, so the planner makes the tokens anisotropic
_MEANS = {0: 0.0, 1: 2.0, 2: -1.2, 3: 1.1}  # intensity per label before shading and noise


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """Physical coordinates (mm) of every voxel, centred on the volume."""
    return tuple(
        (np.arange(n) - (n - 1) / 2)[tuple(slice(None) if a == i else None for a in range(3))] * s
        for i, (n, s) in enumerate(zip(shape, SPACING_ZYX))
    )


def synthesize_labels(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    z, y, x = _grid(shape)
    centre = rng.uniform(-4, 4, 3)
    radii = rng.uniform((9, 6, 6), (13, 10, 10))
    r = np.sqrt(sum(((c - m) / a) ** 2 for c, m, a in zip((z, y, x), centre, radii)))
    label = np.zeros(shape, np.uint8)
    # The shell is thicker towards +y +x: a chiral wall.
    wall = 0.25 + 0.2 * np.clip((y - centre[1] + x - centre[2]) / (radii[1] + radii[2]), 0, 1)
    label[r < 1 + wall] = 2
    label[r < 1] = 1
    # A tube along z, bent in-plane, passing beside the core.
    offset = rng.uniform(11, 14)
    bend = rng.uniform(0.02, 0.05)
    ty = centre[1] - offset + bend * z**2
    tx = centre[2] + offset * 0.6 + 0.25 * z
    label[((y - ty) ** 2 + (x - tx) ** 2 < rng.uniform(2.2, 3.2) ** 2) & (label == 0)] = 3
    return label


def synthesize_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One case: image (D, H, W) float32 and label (D, H, W) uint8, mirrored along each axis with probability 1/2."""
    label = synthesize_labels(rng, shape)
    image = np.vectorize(_MEANS.get)(label).astype(np.float32)
    image += gaussian_filter(rng.standard_normal(shape), (0.5, 2, 2)).astype(np.float32) * 1.5  # texture
    image = gaussian_filter(image, (0.3, 0.8, 0.8))
    bias = gaussian_filter(rng.standard_normal(shape), (4, 12, 12))
    image *= (1 + 0.6 * bias / (np.abs(bias).max() + 1e-6)).astype(np.float32)  # shading up to +-60%
    image += rng.normal(0, 0.35, shape).astype(np.float32)
    axes = tuple(a for a in range(3) if rng.random() < 0.5)
    return np.flip(image, axes).copy(), np.flip(label, axes).copy()


def _to_sitk(array: np.ndarray, origin: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(SPACING_ZYX)))
    image.SetOrigin(origin)
    return image


def generate_synthetic_volumes(
    nnunet_raw: str | os.PathLike | None = None,
    dataset_id: int = DEFAULT_ID,
    num_train: int = 12,
    num_test: int = 3,
    seed: int = 0,
    overwrite: bool = False,
    name: str = DEFAULT_NAME,
) -> Path:
    """Write the dataset to ``$nnUNet_raw/Dataset{id}_{name}`` (imagesTs/labelsTs hold the held-out cases)."""
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    subfolders = ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test else ())
    folder = prepare_dataset_folder(nnunet_raw, dataset_id, name, overwrite, subfolders=subfolders)
    with removed_on_error(folder):
        record: dict = {"seed": seed, "spacing_zyx": list(SPACING_ZYX), "cases": {}}
        for split, count, images, labels, prefix in (
            ("train", num_train, "imagesTr", "labelsTr", "vol"),
            ("test", num_test, "imagesTs", "labelsTs", "vol_test"),
        ):
            progress = Progress(f"{folder.name} {split}", count)
            for index in range(count):
                rng = case_rng(seed, split, index, 3)  # salt 3: not the 2D generators' streams
                shape = (int(rng.integers(16, 21)), int(rng.integers(40, 49)), int(rng.integers(40, 49)))
                image, label = synthesize_volume(rng, shape)
                origin = tuple(float(v) for v in rng.uniform(-50, 50, 3))
                case = f"{prefix}_{index:04d}"
                write_image(_to_sitk(image, origin), folder / images / f"{case}_0000{FILE_ENDING}")
                write_image(_to_sitk(label, origin), folder / labels / f"{case}{FILE_ENDING}")
                record["cases"][case] = {"split": split, "shape": list(shape)}
                progress.update(index + 1)
        write_dataset_json(
            folder,
            channel_names={0: "MRI"},
            labels=LABELS,
            num_training_cases=num_train,
            dataset_name=folder.name,
            description="Synthetic 3D volumes (nnunet-equiflex): core, shell and tube on 3 mm slices, random flips.",
            reference="generated by nnunet_equiflex.dataset_conversion.synthetic_volumes",
        )
        (folder / "generation.json").write_text(json.dumps(record, indent=1))
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_equiflex.dataset_conversion.synthetic_volumes",
        description="Generate a small synthetic 3D dataset (core, shell, tube) in nnU-Net v2 raw format.",
    )
    add_common_arguments(parser, DEFAULT_ID, DEFAULT_NAME)
    add_split_arguments(parser, 12, 3, "volumes")
    args = parser.parse_args(argv)
    with errors_as_messages(parser):
        folder = generate_synthetic_volumes(
            args.nnunet_raw, args.dataset_id, args.num_train, args.num_test, args.seed, args.overwrite, args.name
        )
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
