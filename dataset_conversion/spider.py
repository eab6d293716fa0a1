"""SPIDER (lumbar spine MRI: vertebrae, intervertebral discs, spinal canal) to nnU-Net raw.

Why this dataset: it is one of the reference paper's public benchmarks (sagittal lumbar spine MR).

Getting the data: the Zenodo record linked from https://spider.grand-challenge.org (paper: van der Graaf et al.,
Scientific Data 2024, https://www.nature.com/articles/s41597-024-03090-w), CC BY 4.0. The download extracts
to ``images/`` and ``masks/`` with one file per study and sequence: ``images/1_t1.mha``, ``images/1_t2.mha``,
``images/1_t2_SPACE.mha`` and the same names in ``masks/``.
T1 and T2 of a study are separate acquisitions on different grids, so one dataset holds one sequence
(``--sequence``, default t2); the case id is ``spider_<study>`` (``spider_001``).

SPIDER mask values: vertebrae 1..25, spinal canal 100, intervertebral discs 201..225. nnU-Net needs consecutive
labels, so they are mapped (``--labels``):

- ``reduced`` (default): background 0, vertebra 1 (all of 1..25), spinal_canal 2 (100), disc 3 (all of 201..225).
  The per-level identity of a vertebra is a counting problem, not a local appearance one; the reduced set keeps
  the segmentation task local.
- ``full``: vertebra_k -> k (1..25), spinal_canal -> 26, disc_k (200 + k) -> 26 + k (27..51).

Images are re-written from .mha to .nii.gz with their spacing, origin and direction; labels as uint8.

    python -m nnunet_equiflex.dataset_conversion.spider -i /data/SPIDER --sequence t2 --nnunet-raw $nnUNet_raw
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from nnunet_equiflex.dataset_conversion.common import (
    add_common_arguments,
    errors_as_messages,
    prepare_dataset_folder,
    removed_on_error,
    write_dataset_json,
    write_volume_cases,
)

DEFAULT_ID = 902
DEFAULT_NAME = "SPIDER"
SEQUENCES = ("t1", "t2", "t2_SPACE")
VERTEBRAE = range(1, 26)
SPINAL_CANAL = 100
DISCS = range(201, 226)
_FILE = re.compile(r"^(\d+)_(t1|t2|t2_SPACE)\.mha$")


def spider_labels(scheme: str = "reduced") -> tuple[dict[str, int], dict[int, int]]:
    """(dataset.json labels, SPIDER value -> output value) for ``scheme`` 'reduced' or 'full'."""
    if scheme == "reduced":
        labels = {"background": 0, "vertebra": 1, "spinal_canal": 2, "disc": 3}
        mapping = {0: 0, SPINAL_CANAL: 2} | {v: 1 for v in VERTEBRAE} | {d: 3 for d in DISCS}
    elif scheme == "full":
        labels = {"background": 0} | {f"vertebra_{v}": v for v in VERTEBRAE} | {"spinal_canal": 26}
        labels |= {f"disc_{d - 200}": 26 + d - 200 for d in DISCS}
        mapping = {0: 0, SPINAL_CANAL: 26} | {v: v for v in VERTEBRAE} | {d: 26 + d - 200 for d in DISCS}
    else:
        raise ValueError(f"unknown SPIDER label scheme {scheme!r}; use 'reduced' or 'full'")
    return labels, mapping


def find_spider_cases(input_folder: str | os.PathLike, sequence: str = "t2") -> dict[str, tuple[Path, Path]]:
    """``spider_<study>`` -> (image, mask) for one sequence; errors name what is missing."""
    if sequence not in SEQUENCES:
        raise ValueError(f"unknown SPIDER sequence {sequence!r}; choose one of {SEQUENCES}")
    root = Path(input_folder).expanduser()
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        nested = [p.parent for p in root.glob("*/images") if (p.parent / "masks").is_dir()]
        hint = f"; pass {nested[0]} instead" if nested else ""
        raise FileNotFoundError(
            f"{root} is not the SPIDER folder: expected {images_dir} and {masks_dir} holding <study>_<sequence>.mha "
            f"files{hint}"
        )
    images = _index(images_dir)
    masks = _index(masks_dir)
    selected = {study: path for (study, seq), path in images.items() if seq == sequence}
    if not selected:
        available = sorted({seq for _, seq in images})
        raise FileNotFoundError(
            f"no {sequence} images in {images_dir} (files like 1_{sequence}.mha); sequences present: {available}"
        )
    missing = sorted((s for s in selected if (s, sequence) not in masks), key=int)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} {sequence} images have no mask in {masks_dir}: "
            f"{', '.join(f'{s}_{sequence}.mha' for s in missing[:5])}{'...' if len(missing) > 5 else ''}"
        )
    return {
        f"spider_{int(study):03d}": (selected[study], masks[(study, sequence)]) for study in sorted(selected, key=int)
    }


def _index(folder: Path) -> dict[tuple[str, str], Path]:
    index = {}
    for path in folder.iterdir():
        if match := _FILE.match(path.name):
            index[(str(int(match.group(1))), match.group(2))] = path
    return index


def convert_spider(
    input_folder: str | os.PathLike,
    nnunet_raw: str | os.PathLike | None = None,
    dataset_id: int = DEFAULT_ID,
    name: str = DEFAULT_NAME,
    overwrite: bool = False,
    sequence: str = "t2",
    label_scheme: str = "reduced",
) -> Path:
    """Write one SPIDER sequence to ``$nnUNet_raw/Dataset{id}_{name}`` with the chosen label scheme."""
    labels, mapping = spider_labels(label_scheme)
    cases = find_spider_cases(input_folder, sequence)
    folder = prepare_dataset_folder(nnunet_raw, dataset_id, name, overwrite)
    with removed_on_error(folder):
        write_volume_cases(folder, cases, mapping, sequence)
        write_dataset_json(
            folder,
            channel_names={0: sequence},
            labels=labels,
            num_training_cases=len(cases),
            dataset_name=folder.name,
            reference="https://spider.grand-challenge.org",
            description=f"SPIDER lumbar spine MRI, {sequence} series, '{label_scheme}' labels",
        )
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_equiflex.dataset_conversion.spider",
        description="Convert SPIDER lumbar spine MRI (one sequence) to nnU-Net raw format.",
    )
    parser.add_argument("-i", "--input", required=True, help="SPIDER folder holding images/ and masks/")
    add_common_arguments(parser, DEFAULT_ID, DEFAULT_NAME)
    parser.add_argument("--sequence", choices=SEQUENCES, default="t2", help="which series to convert (default: t2)")
    parser.add_argument(
        "--labels",
        choices=("reduced", "full"),
        default="reduced",
        help="reduced: vertebra 1, spinal canal 2, disc 3 (default); full: every vertebra and disc level its own "
        "label (vertebra_k -> k, canal -> 26, disc_k -> 26 + k)",
    )
    args = parser.parse_args(argv)
    with errors_as_messages(parser):
        folder = convert_spider(
            args.input,
            nnunet_raw=args.nnunet_raw,
            dataset_id=args.dataset_id,
            name=args.name,
            overwrite=args.overwrite,
            sequence=args.sequence,
            label_scheme=args.labels,
        )
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
