"""A synthetic dataset with a left/right pair that only an asymmetric landmark tells apart, in nnU-Net v2 raw format.

Why: an exactly reflection-equivariant network gives a mirrored image the mirrored prediction, so it can tell a
left/right pair apart only through context that is not mirror-symmetric (in the abdomen: the liver on the right).
This dataset isolates that situation. Each case is one 2D slice of a body (a textured ellipse) with two kidneys of
the same size distribution, intensity and texture, placed about mirror-symmetrically about the body's vertical
axis, and a liver (the landmark, also labelled) on one side. The kidney next to the liver is ``kidney_right``,
the other ``kidney_left`` (the patient's sides, as in AMOS).

By default each case is also mirrored left-right with probability 1/2, labels following the anatomy (the kidney
next to the liver stays ``kidney_right``, as in situs inversus). Then the side of the image says nothing, and the
landmark is the only cue for every network; ``--mirror-probability 0`` keeps every case in one orientation (the
liver always on the image's left, the radiological convention), where the side of the image is a second cue for
a network that is not mirror-equivariant. ``--no-landmark`` draws no liver: then nothing but the side of the
image tells the pair apart (with mirroring, nothing at all).

    python -m nnunet_equiflex.dataset_conversion.synthetic_lateral --nnunet-raw $nnUNet_raw
    nnUNetv2_plan_and_preprocess -d 904 -c 2d

``benchmarks/lateralised.py`` trains EquiFlex and nnU-Net's CNN on it and reports left and right Dice.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from nnunet_equiflex.dataset_conversion.common import (
    FILE_ENDING,
    Progress,
    add_common_arguments,
    add_split_arguments,
    case_rng,
    errors_as_messages,
    image_from_2d,
    prepare_dataset_folder,
    removed_on_error,
    write_dataset_json,
    write_image,
)

LABELS = {"background": 0, "kidney_right": 1, "kidney_left": 2, "liver": 3}
DEFAULT_ID = 904
DEFAULT_NAME = "SyntheticLateral"


@dataclass(frozen=True)
class LateralSlice:
    image: np.ndarray  # (H, W) float32
    label: np.ndarray  # (H, W) uint8
    mirrored: bool
    liver_on_image_left: bool | None  # None without a landmark


def _ellipse(ys: np.ndarray, xs: np.ndarray, centre, axes, tilt: float = 0.0) -> np.ndarray:
    dy, dx = ys - centre[0], xs - centre[1]
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = -dx * np.sin(tilt) + dy * np.cos(tilt)
    return (u / axes[1]) ** 2 + (v / axes[0]) ** 2 <= 1.0


def synthesize_lateral_slice(
    rng: np.random.Generator, size: int = 64, mirror_probability: float = 0.5, landmark: bool = True
) -> LateralSlice:
    """One slice: body, two kidneys drawn from the same distribution, optionally the liver next to the right one."""
    ys, xs = np.mgrid[:size, :size].astype(np.float64)
    centre = (size / 2 - 0.5 + rng.uniform(-2, 2), size / 2 - 0.5 + rng.uniform(-2, 2))
    scale = size / 64
    texture = gaussian_filter(rng.standard_normal((size, size)), 1.5)
    image = np.zeros((size, size))
    body = _ellipse(ys, xs, centre, (rng.uniform(25, 29) * scale, rng.uniform(27, 30) * scale), rng.uniform(-0.1, 0.1))
    image[body] = 0.3 + 0.08 * texture[body]
    label = np.zeros((size, size), np.uint8)
    # Drawn in the liver-on-the-image's-left orientation; the case may be mirrored below.
    spread, height = rng.uniform(12, 15) * scale, rng.uniform(4, 8) * scale
    for value, side in ((LABELS["kidney_right"], -1), (LABELS["kidney_left"], 1)):
        kidney_centre = (
            centre[0] + height + rng.uniform(-1.5, 1.5),
            centre[1] + side * spread + rng.uniform(-1.5, 1.5),
        )
        axes = (rng.uniform(7.0, 9.0) * scale, rng.uniform(5.0, 6.5) * scale)
        kidney = _ellipse(ys, xs, kidney_centre, axes, side * rng.uniform(0.1, 0.5))
        label[kidney] = value
    if landmark:
        liver_centre = (centre[0] - rng.uniform(7, 10) * scale, centre[1] - rng.uniform(9, 13) * scale)
        liver_axes = (rng.uniform(8, 10) * scale, rng.uniform(10, 13) * scale)
        liver = _ellipse(ys, xs, liver_centre, liver_axes, rng.uniform(-0.4, 0.0)) & body & (label == 0)
        label[liver] = LABELS["liver"]
    kidneys = (label == LABELS["kidney_right"]) | (label == LABELS["kidney_left"])
    image[kidneys] = 0.65 + 0.08 * texture[kidneys]
    image[label == LABELS["liver"]] = 0.95 + 0.05 * texture[label == LABELS["liver"]]
    image = gaussian_filter(image, 0.6) + rng.normal(0, 0.05, (size, size))
    mirrored = bool(rng.random() < mirror_probability)
    if mirrored:
        image, label = image[:, ::-1], label[:, ::-1]
    liver_on_image_left = (not mirrored) if landmark else None
    return LateralSlice(
        np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label), mirrored, liver_on_image_left
    )


def generate_synthetic_lateral(
    nnunet_raw: str | os.PathLike | None = None,
    dataset_id: int = DEFAULT_ID,
    num_train: int = 60,
    num_test: int = 20,
    seed: int = 0,
    size: int = 64,
    mirror_probability: float = 0.5,
    landmark: bool = True,
    overwrite: bool = False,
    name: str = DEFAULT_NAME,
) -> Path:
    """Write the dataset to ``$nnUNet_raw/Dataset{id}_{name}`` (imagesTs/labelsTs: held-out cases); returns it.

    ``generation.json`` records the settings and, per case, whether it was mirrored."""
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels (the body, kidneys and liver need the room), got {size}")
    if not 0.0 <= mirror_probability <= 1.0:
        raise ValueError(f"mirror_probability must lie in [0, 1], got {mirror_probability}")
    subfolders = ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test else ())
    folder = prepare_dataset_folder(nnunet_raw, dataset_id, name, overwrite, subfolders=subfolders)
    settings = {"seed": seed, "size": size, "mirror_probability": mirror_probability, "landmark": landmark}
    with removed_on_error(folder):
        record: dict = {**settings, "cases": {}}
        for split, count, images_dir, labels_dir in (
            ("train", num_train, "imagesTr", "labelsTr"),
            ("test", num_test, "imagesTs", "labelsTs"),
        ):
            progress = Progress(f"{folder.name} {split}", count)
            for index in range(count):
                case = f"lateral_{split}_{index:04d}"
                sample = synthesize_lateral_slice(case_rng(seed, split, index), size, mirror_probability, landmark)
                write_image(
                    image_from_2d(sample.image, (1.0, 1.0), 5.0), folder / images_dir / f"{case}_0000{FILE_ENDING}"
                )
                write_image(image_from_2d(sample.label, (1.0, 1.0), 5.0), folder / labels_dir / f"{case}{FILE_ENDING}")
                record["cases"][case] = {"split": split, "mirrored": sample.mirrored}
                progress.update(index + 1)
        landmark_text = "a liver next to the right kidney" if landmark else "no landmark"
        write_dataset_json(
            folder,
            channel_names={0: "CT"},
            labels=LABELS,
            num_training_cases=num_train,
            dataset_name=folder.name,
            description=f"Synthetic 2D abdominal slices with a left/right kidney pair and {landmark_text}; each case "
            f"mirrored with probability {mirror_probability} (labels follow the anatomy).",
            reference="generated by nnunet_equiflex.dataset_conversion.synthetic_lateral",
        )
        (folder / "generation.json").write_text(json.dumps(record, indent=1))
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_equiflex.dataset_conversion.synthetic_lateral",
        description="Generate 2D slices with a left/right kidney pair that only a landmark (the liver) tells apart.",
    )
    add_common_arguments(parser, DEFAULT_ID, DEFAULT_NAME)
    add_split_arguments(parser, 60, 20, "slices")
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels (default: 64)")
    parser.add_argument(
        "--mirror-probability",
        type=float,
        default=0.5,
        help="probability that a case is mirrored left-right, labels following the anatomy (default: 0.5; "
        "0: every case in the radiological orientation, the liver on the image's left)",
    )
    parser.add_argument("--no-landmark", action="store_true", help="draw no liver: only the image side is left")
    args = parser.parse_args(argv)
    with errors_as_messages(parser):
        folder = generate_synthetic_lateral(
            args.nnunet_raw,
            dataset_id=args.dataset_id,
            num_train=args.num_train,
            num_test=args.num_test,
            seed=args.seed,
            size=args.size,
            mirror_probability=args.mirror_probability,
            landmark=not args.no_landmark,
            overwrite=args.overwrite,
            name=args.name,
        )
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
