"""AMOS 2022, MR part (15 abdominal organs) to nnU-Net raw.

Why this dataset: it is one of the reference paper's public benchmarks. AMOS mixes CT and MR; only the MR scans
are converted (case numbers >= 500: ``amos_0507`` ...), because the two modalities need different intensity
normalisation and nnU-Net takes one channel definition per dataset. (nnunetv2's own AMOS converters,
Dataset218/219/223, keep CT or everything.)

Getting the data: https://amos22.grand-challenge.org, download the post-challenge release from Zenodo
(https://zenodo.org/record/7262581, the record nnunetv2 cites). It extracts to ``amos22/`` with ``imagesTr``,
``labelsTr``, ``imagesVa``, ``labelsVa``, ``imagesTs`` and ``dataset.json``; files are ``amos_XXXX.nii.gz``.

Labels come from AMOS's ``dataset.json`` (``"labels": {"0": "background", "1": "spleen", ...}``, 15 organs), kept
with their values. The validation cases (imagesVa/labelsVa) join the training set by default, as nnunetv2's
AMOS converters do: nnU-Net's 5-fold cross-validation makes better use of them than a fixed split. MR test scans
go to imagesTs. Images are copied unchanged; labels are re-written as uint8 on the image's grid.

    python -m nnunet_equiflex.dataset_conversion.amos_mr -i /data/amos22 --nnunet-raw $nnUNet_raw
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from nnunet_equiflex.dataset_conversion.common import (
    FILE_ENDING,
    add_common_arguments,
    errors_as_messages,
    prepare_dataset_folder,
    removed_on_error,
    write_dataset_json,
    write_volume_cases,
)

DEFAULT_ID = 903
DEFAULT_NAME = "AMOS_MR"
FIRST_MR_CASE = 500
_FILE = re.compile(r"^amos_(\d{4})\.nii\.gz$")


def read_amos_labels(dataset_json: Path) -> dict[str, int]:
    """nnU-Net-style ``{name: value}`` from AMOS's ``{"value": "name"}`` (either orientation is accepted)."""
    if not dataset_json.is_file():
        raise FileNotFoundError(f"{dataset_json} is missing; AMOS's dataset.json defines the label values")
    raw = json.loads(dataset_json.read_text()).get("labels")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{dataset_json} has no 'labels' mapping; is this AMOS's own dataset.json?")
    if all(str(k).isdigit() for k in raw):
        labels = {str(name): int(value) for value, name in raw.items()}
    else:
        labels = {str(name): int(value) for name, value in raw.items()}
    values = sorted(labels.values())
    if len(values) != len(set(values)) or values != list(range(len(values))):
        raise ValueError(f"{dataset_json}: label values {values} are not 0..N without repeats, as nnU-Net needs")
    return dict(sorted(labels.items(), key=lambda item: item[1]))


def mr_cases(folder: Path) -> dict[str, Path]:
    """``amos_XXXX`` -> path for the MR scans (XXXX >= 500) in ``folder``."""
    if not folder.is_dir():
        return {}
    cases = {}
    for path in folder.iterdir():
        match = _FILE.match(path.name)
        if match and int(match.group(1)) >= FIRST_MR_CASE:
            cases[path.name[: -len(FILE_ENDING)]] = path
    return dict(sorted(cases.items()))


def find_amos_mr(
    input_folder: str | os.PathLike, include_validation: bool = True
) -> tuple[dict[str, tuple[Path, Path]], dict[str, Path], dict[str, int]]:
    """(training pairs, test images, labels) for the MR part of an AMOS download."""
    root = Path(input_folder).expanduser()
    if not (root / "imagesTr").is_dir() or not (root / "labelsTr").is_dir():
        nested = [p.parent for p in root.glob("*/imagesTr") if (p.parent / "dataset.json").is_file()]
        hint = f"; pass {nested[0]} instead" if nested else ""
        raise FileNotFoundError(f"{root} is not the AMOS folder: expected imagesTr/, labelsTr/, dataset.json{hint}")
    labels = read_amos_labels(root / "dataset.json")
    pairs: dict[str, tuple[Path, Path]] = {}
    splits = [("imagesTr", "labelsTr")] + ([("imagesVa", "labelsVa")] if include_validation else [])
    for images_dir, labels_dir in splits:
        images = mr_cases(root / images_dir)
        if images and not (root / labels_dir).is_dir():
            if images_dir == "imagesVa":
                continue  # the challenge-time release had no validation labels
            raise FileNotFoundError(f"{root / labels_dir} is missing")
        segmentations = mr_cases(root / labels_dir)
        missing = sorted(set(images) - set(segmentations))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} MR scans in {root / images_dir} have no label in {root / labels_dir}: "
                f"{', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}"
            )
        pairs |= {case: (images[case], segmentations[case]) for case in images}
    if not pairs:
        raise FileNotFoundError(
            f"no MR scans (amos_{FIRST_MR_CASE:04d} and above) in {root / 'imagesTr'}; the MR cases are in the "
            "full AMOS22 release, not in the CT-only task 1 subset"
        )
    return dict(sorted(pairs.items())), mr_cases(root / "imagesTs"), labels


def convert_amos_mr(
    input_folder: str | os.PathLike,
    nnunet_raw: str | os.PathLike | None = None,
    dataset_id: int = DEFAULT_ID,
    name: str = DEFAULT_NAME,
    overwrite: bool = False,
    include_validation: bool = True,
    include_test: bool = True,
) -> Path:
    """Write AMOS's MR scans to ``$nnUNet_raw/Dataset{id}_{name}`` (labelled Tr+Va as training, Ts as imagesTs)."""
    pairs, test_images, labels = find_amos_mr(input_folder, include_validation)
    with_test = include_test and bool(test_images)
    folder = prepare_dataset_folder(
        nnunet_raw, dataset_id, name, overwrite, ("imagesTr", "labelsTr") + (("imagesTs",) if with_test else ())
    )
    with removed_on_error(folder):
        identity = {value: value for value in labels.values()}
        write_volume_cases(folder, pairs, identity, "training", test_images if with_test else None)
        write_dataset_json(
            folder,
            channel_names={0: "MRI"},
            labels=labels,
            num_training_cases=len(pairs),
            dataset_name=folder.name,
            reference="https://amos22.grand-challenge.org",
            release="https://zenodo.org/record/7262581",
            description="AMOS 2022 MR scans (case numbers >= 500)"
            + (", training + validation" if include_validation else ", training only"),
        )
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_equiflex.dataset_conversion.amos_mr",
        description="Convert the MR part of AMOS 2022 (15 abdominal organs) to nnU-Net raw format.",
    )
    parser.add_argument("-i", "--input", required=True, help="extracted amos22 folder (imagesTr, labelsTr, ...)")
    add_common_arguments(parser, DEFAULT_ID, DEFAULT_NAME)
    parser.add_argument("--no-validation", action="store_true", help="leave imagesVa/labelsVa out of the training set")
    parser.add_argument("--no-test", action="store_true", help="do not copy the MR test scans to imagesTs")
    args = parser.parse_args(argv)
    with errors_as_messages(parser):
        folder = convert_amos_mr(
            args.input,
            nnunet_raw=args.nnunet_raw,
            dataset_id=args.dataset_id,
            name=args.name,
            overwrite=args.overwrite,
            include_validation=not args.no_validation,
            include_test=not args.no_test,
        )
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
