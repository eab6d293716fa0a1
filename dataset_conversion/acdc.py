"""ACDC (cardiac cine MRI) to nnU-Net raw, through nnunetv2's own converter.

Why a wrapper and not a converter: nnU-Net's ``nnunetv2/dataset_conversion/Dataset027_ACDC.py`` defines the
reference conversion (labels background 0, RV 1, MLV 2, LVC 3; channel "cineMRI") and the patient-level
5-fold split (``create_ACDC_split``, seed 1234) that nnU-Net's CNN results use. Using exactly that code keeps our
folds identical to nnU-Net's, so CNN and ViT numbers compare fold by fold. This module only adds what the
script lacks: a check of the input layout with errors that say what is wrong, the overwrite guard, an explicit
nnUNet_raw, and writing ``splits_final.json`` (nnunetv2 does that only when the script runs as ``__main__``).
nnunetv2 2.8.1's ``make_out_dirs`` calls ``.replace`` on ``nnunetv2.paths.nnUNet_raw``, which 2.8 turned into a
lazy path object without that method, so the stock script fails there; the wrapper hands it a plain string.

Getting ACDC: the data is distributed by CREATIS (https://www.creatis.insa-lyon.fr/Challenge/acdc/, download
through the "Human Heart Project" database linked there; free, terms of use apply). The zip extracts to
``ACDC/database/training/patient001 ... patient100`` and ``ACDC/database/testing/patient101 ... patient150``;
each patient folder holds ``patientXXX_frameYY.nii.gz`` (end-diastole and end-systole),
``patientXXX_frameYY_gt.nii.gz``, ``patientXXX_4d.nii.gz`` and ``Info.cfg``. Then:

    export nnUNet_raw=/data/nnUNet_raw nnUNet_preprocessed=/data/nnUNet_preprocessed
    unzip ACDC.zip
    python -m nnunet_equiflex.dataset_conversion.acdc -i ACDC/database
    nnUNetv2_plan_and_preprocess -d 27 -c 2d --verify_dataset_integrity

This writes ``$nnUNet_raw/Dataset027_ACDC`` (200 training frames from 100 patients; 100 test frames in imagesTs)
and ``$nnUNet_preprocessed/Dataset027_ACDC/splits_final.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.dataset_conversion import Dataset027_ACDC as nnunet_acdc

from nnunet_equiflex.dataset_conversion.common import (
    add_common_arguments,
    errors_as_messages,
    prepare_dataset_folder,
    removed_on_error,
    resolve_nnunet_raw,
)

DEFAULT_ID = 27
NAME = "ACDC"  # fixed by nnunetv2's converter
_PATIENT = re.compile(r"^patient\d{3}$")
_FRAME = re.compile(r"^(patient\d{3})_frame\d{2}\.nii\.gz$")
_GT = re.compile(r"^(patient\d{3}_frame\d{2})_gt\.nii\.gz$")
_4D = re.compile(r"^patient\d{3}_4d\.nii\.gz$")


def validate_acdc_folder(input_folder: str | os.PathLike) -> tuple[Path, int]:
    """Check the ACDC layout (training/ and testing/ with patientXXX folders); return the folder and #frames.

    nnunetv2's converter copies whatever ``.gz`` files it finds, so a wrong folder would silently give an empty
    or inconsistent dataset; here every problem is an error that names the fix.
    """
    root = Path(input_folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ACDC folder {root} does not exist (pass the 'database' folder of the ACDC zip)")
    expected = "expected <folder>/training/patientNNN/ and <folder>/testing/patientNNN/"
    if not (root / "training").is_dir() or not (root / "testing").is_dir():
        for candidate in (root / "database", root / "ACDC" / "database"):
            if (candidate / "training").is_dir():
                raise FileNotFoundError(f"{root} is not the ACDC data folder; pass {candidate} instead ({expected})")
        if root.name in ("training", "testing"):
            raise FileNotFoundError(f"{root} is one split of ACDC; pass its parent {root.parent} ({expected})")
        if _PATIENT.match(root.name):
            raise FileNotFoundError(f"{root} is a single patient; pass {root.parent.parent} ({expected})")
        missing = [name for name in ("training", "testing") if not (root / name).is_dir()]
        raise FileNotFoundError(
            f"{root} has no {' and no '.join(missing)} folder; {expected}. If you only have the training data, "
            "create an empty 'testing' folder (nnunetv2's converter lists it)."
        )

    num_frames = 0
    for split in ("training", "testing"):
        patients = sorted(p for p in (root / split).iterdir() if p.is_dir() and _PATIENT.match(p.name))
        if split == "training" and not patients:
            raise FileNotFoundError(f"{root / 'training'} holds no patientNNN folders; {expected}")
        for patient in patients:
            frames, labels, problems = _scan_patient(patient)
            if not frames:
                problems.append("no patientNNN_frameYY.nii.gz image")
            if split == "training":
                unlabelled = sorted(frames - labels)
                orphans = sorted(labels - frames)
                if unlabelled:
                    problems.append(f"no _gt label for {', '.join(unlabelled[:5])}")
                if orphans:
                    problems.append(f"labels without image: {', '.join(orphans[:5])}")
                num_frames += len(frames)
            if problems:
                raise ValueError(f"{patient}: {'; '.join(problems)}")
    return root, num_frames


def _scan_patient(patient: Path) -> tuple[set[str], set[str], list[str]]:
    frames, labels, problems = set(), set(), []
    for file in patient.iterdir():
        name = file.name
        if match := _GT.match(name):
            labels.add(match.group(1))
        elif match := _FRAME.match(name):
            if match.group(1) != patient.name:
                problems.append(f"{name} does not belong to {patient.name}")
            frames.add(name[: -len(".nii.gz")])
        elif name.endswith(".nii"):
            problems.append(f"{name} is not gzipped; run 'gzip {file}' (nnunetv2's converter only copies .nii.gz)")
        elif name.endswith(".gz") and not _4D.match(name):
            problems.append(f"unexpected file {name} (nnunetv2's converter would copy it as an image); move it away")
    return frames, labels, problems


@contextmanager
def _nnunet_raw_for_nnunetv2(raw: Path) -> Iterator[None]:
    """Point nnunetv2's converter at ``raw``: it reads the module-level ``nnUNet_raw`` it imported."""
    previous = nnunet_acdc.nnUNet_raw
    nnunet_acdc.nnUNet_raw = str(raw)  # a plain str also sidesteps 2.8.1's _EnvPath.replace AttributeError
    try:
        yield
    finally:
        nnunet_acdc.nnUNet_raw = previous


def convert_acdc(
    input_folder: str | os.PathLike,
    nnunet_raw: str | os.PathLike | None = None,
    nnunet_preprocessed: str | os.PathLike | None = None,
    dataset_id: int = DEFAULT_ID,
    overwrite: bool = False,
    write_split: bool = True,
) -> Path:
    """Convert ACDC with nnunetv2's Dataset027_ACDC code; write its patient-level splits_final.json.

    Returns ``$nnUNet_raw/Dataset{id}_ACDC``. The split goes to ``$nnUNet_preprocessed/Dataset{id}_ACDC``
    (``nnunet_preprocessed`` argument, else the environment variable); ``write_split=False`` skips it, and then
    nnU-Net would make its own random case-level split, which puts frames of one patient in train and validation.
    """
    source, num_frames = validate_acdc_folder(input_folder)
    split_file = None
    if write_split:
        preprocessed = nnunet_preprocessed or os.environ.get("nnUNet_preprocessed")
        if not preprocessed:
            raise ValueError(
                "no nnU-Net preprocessed folder for splits_final.json: pass --nnunet-preprocessed "
                "(nnunet_preprocessed=...) or set nnUNet_preprocessed; or pass --no-split to let nnU-Net split by "
                "frame, not by patient"
            )
        split_file = Path(preprocessed).expanduser() / f"Dataset{dataset_id:03d}_{NAME}" / "splits_final.json"
        if split_file.exists() and not overwrite:
            raise FileExistsError(f"{split_file} already exists; pass --overwrite to replace it")

    raw = resolve_nnunet_raw(nnunet_raw)
    folder = prepare_dataset_folder(raw, dataset_id, NAME, overwrite, subfolders=())
    with removed_on_error(folder):
        print(f"converting {source} with nnunetv2's Dataset027_ACDC into {folder}", flush=True)
        with _nnunet_raw_for_nnunetv2(raw):
            nnunet_acdc.convert_acdc(str(source), dataset_id)

        written = json.loads((folder / "dataset.json").read_text())["numTraining"]
        if written != num_frames:
            raise RuntimeError(f"nnunetv2 wrote {written} training cases, the input holds {num_frames}; check {source}")
        if split_file is not None:
            split_file.parent.mkdir(parents=True, exist_ok=True)
            save_json(nnunet_acdc.create_ACDC_split(str(folder / "labelsTr")), str(split_file), sort_keys=False)
            print(f"wrote patient-level 5-fold split {split_file}", flush=True)
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_equiflex.dataset_conversion.acdc",
        description="Convert ACDC to nnU-Net raw (Dataset027_ACDC) with nnunetv2's own converter, plus its "
        "patient-level splits_final.json.",
    )
    parser.add_argument("-i", "--input", required=True, help="ACDC 'database' folder holding training/ and testing/")
    add_common_arguments(parser, DEFAULT_ID, None, with_name=False)
    parser.add_argument(
        "-p",
        "--nnunet-preprocessed",
        default=None,
        help="where splits_final.json goes (default: $nnUNet_preprocessed)",
    )
    parser.add_argument("--no-split", action="store_true", help="do not write the patient-level splits_final.json")
    args = parser.parse_args(argv)
    with errors_as_messages(parser):
        folder = convert_acdc(
            args.input,
            nnunet_raw=args.nnunet_raw,
            nnunet_preprocessed=args.nnunet_preprocessed,
            dataset_id=args.dataset_id,
            overwrite=args.overwrite,
            write_split=not args.no_split,
        )
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
