"""CrossMoDA (vestibular schwannoma and cochlea, MRI) to nnU-Net raw: the labelled ceT1 source domain.

Why this dataset: it is one of the reference paper's public benchmarks. nnU-Net trains on the annotated
contrast-enhanced T1 (ceT1) scans; the unannotated high-resolution T2 (hrT2) scans of the target domain can be
put in imagesTs (``--hrt2-as-test``) to measure the domain shift, which is what the challenge is about.

Getting the data: the challenge pages link each edition's download (registration required):
https://crossmoda.grand-challenge.org (2021), https://crossmoda2022.grand-challenge.org,
https://crossmoda2023.grand-challenge.org.
Point ``--input`` at the extracted folder; files are searched recursively, so the edition's sub-folders
(``source_training`` / ``target_training`` ...) can stay as they are. File names:

- 2021: ``crossmoda_1_ceT1.nii.gz`` + ``crossmoda_1_Label.nii.gz`` (target: ``crossmoda_106_hrT2.nii.gz``)
- 2022/2023: ``crossmoda2023_ldn_1_ceT1.nii.gz`` + ``crossmoda2023_ldn_1_Label.nii.gz`` (site code in the name)

Labels by edition (detected from the names, or ``--edition``):

- 2021 and 2022: 1 VS (vestibular schwannoma), 2 cochlea
- 2023: 1 intra-meatal VS, 2 extra-meatal VS, 3 cochlea

The case id is the file name without ``_ceT1.nii.gz``. Images are copied unchanged; labels are re-written as uint8
on the image's grid (geometry kept exactly).

    python -m nnunet_equiflex.dataset_conversion.crossmoda -i /data/crossmoda2023 --nnunet-raw $nnUNet_raw
"""

from __future__ import annotations

import argparse
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

DEFAULT_ID = 901
DEFAULT_NAME = "CrossMoDA"
EDITION_LABELS = {
    "2021": {"background": 0, "VS": 1, "cochlea": 2},
    "2022": {"background": 0, "VS": 1, "cochlea": 2},
    "2023": {"background": 0, "VS_intrameatal": 1, "VS_extrameatal": 2, "cochlea": 3},
}
_FILE = re.compile(r"^(crossmoda(\d{4})?(?:_[A-Za-z]+)?_\d+)_(ceT1|Label|hrT2)\.nii\.gz$")


def find_crossmoda_files(
    input_folder: str | os.PathLike,
) -> tuple[dict[str, tuple[Path, Path]], dict[str, Path], str | None]:
    """Pair ``<case>_ceT1`` with ``<case>_Label`` below ``input_folder``.

    Returns the pairs, the hrT2 scans, and the edition read from the names (None for a year this module does not
    know; the caller then needs an explicit edition).
    """
    root = Path(input_folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"CrossMoDA folder {root} does not exist")
    found: dict[str, dict[str, Path]] = {"ceT1": {}, "Label": {}, "hrT2": {}}
    years: set[str] = set()
    for path in sorted(root.rglob(f"*{FILE_ENDING}")):
        match = _FILE.match(path.name)
        if not match:
            continue
        case, year, kind = match.group(1), match.group(2) or "2021", match.group(3)
        if case in found[kind]:
            raise ValueError(f"{path.name} occurs twice: {found[kind][case]} and {path}; keep one copy")
        found[kind][case] = path
        years.add(year)
    images, labels = found["ceT1"], found["Label"]
    if not images:
        raise FileNotFoundError(
            f"no CrossMoDA ceT1 scans below {root}: expected files like crossmoda_1_ceT1.nii.gz + "
            "crossmoda_1_Label.nii.gz (2021) or crossmoda2023_ldn_1_ceT1.nii.gz + crossmoda2023_ldn_1_Label.nii.gz"
        )
    unlabelled = sorted(set(images) - set(labels))
    orphans = sorted(set(labels) - set(images))
    if unlabelled or orphans:
        raise ValueError(
            "ceT1 scans and labels do not pair up below "
            f"{root}: ceT1 without _Label: {unlabelled[:5]}{'...' if len(unlabelled) > 5 else ''}; "
            f"_Label without ceT1: {orphans[:5]}{'...' if len(orphans) > 5 else ''}. "
            "Point --input at one edition's download, with the source training files complete"
        )
    label_sets = {tuple(EDITION_LABELS[year].items()) if year in EDITION_LABELS else None for year in years}
    if len(label_sets) > 1:
        raise ValueError(
            f"{root} mixes CrossMoDA editions {sorted(years)} whose label sets differ; convert them separately"
        )
    detected = max(years) if None not in label_sets else None
    pairs = {case: (images[case], labels[case]) for case in sorted(images)}
    return pairs, dict(sorted(found["hrT2"].items())), detected


def convert_crossmoda(
    input_folder: str | os.PathLike,
    nnunet_raw: str | os.PathLike | None = None,
    dataset_id: int = DEFAULT_ID,
    name: str = DEFAULT_NAME,
    overwrite: bool = False,
    edition: str | None = None,
    hrt2_as_test: bool = False,
) -> Path:
    """Write the labelled ceT1 scans (and optionally hrT2 as imagesTs) to ``$nnUNet_raw/Dataset{id}_{name}``.

    ``edition`` ('2021', '2022', '2023') overrides the label set detected from the file names.
    """
    pairs, hrt2, detected = find_crossmoda_files(input_folder)
    edition = edition or detected
    if edition not in EDITION_LABELS:
        raise ValueError(
            f"cannot tell the CrossMoDA edition (label set) of {input_folder} (got {edition!r}); pass --edition, "
            f"one of {sorted(EDITION_LABELS)}"
        )
    labels = EDITION_LABELS[edition]
    if hrt2_as_test and not hrt2:
        raise FileNotFoundError(f"--hrt2-as-test given but no *_hrT2.nii.gz files below {input_folder}")
    folder = prepare_dataset_folder(
        nnunet_raw, dataset_id, name, overwrite, ("imagesTr", "labelsTr") + (("imagesTs",) if hrt2_as_test else ())
    )
    with removed_on_error(folder):
        identity = {value: value for value in labels.values()}
        write_volume_cases(
            folder, pairs, identity, f"ceT1 ({edition} labels)", hrt2 if hrt2_as_test else None, "hrT2 -> imagesTs"
        )
        write_dataset_json(
            folder,
            channel_names={0: "ceT1"},
            labels=labels,
            num_training_cases=len(pairs),
            dataset_name=folder.name,
            reference="https://crossmoda2023.grand-challenge.org",
            description=f"CrossMoDA {edition} source domain (ceT1 with labels)"
            + ("; imagesTs holds the unlabelled hrT2 target domain" if hrt2_as_test else ""),
        )
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_equiflex.dataset_conversion.crossmoda",
        description="Convert CrossMoDA's labelled ceT1 scans to nnU-Net raw format.",
    )
    parser.add_argument("-i", "--input", required=True, help="extracted CrossMoDA download (searched recursively)")
    add_common_arguments(parser, DEFAULT_ID, DEFAULT_NAME)
    parser.add_argument(
        "--edition",
        choices=sorted(EDITION_LABELS),
        default=None,
        help="label set to use (default: detected from file names; 2021/2022: VS, cochlea; 2023: intra-/extra-"
        "meatal VS, cochlea)",
    )
    parser.add_argument(
        "--hrt2-as-test", action="store_true", help="write the unlabelled hrT2 target-domain scans to imagesTs"
    )
    args = parser.parse_args(argv)
    with errors_as_messages(parser):
        folder = convert_crossmoda(
            args.input,
            nnunet_raw=args.nnunet_raw,
            dataset_id=args.dataset_id,
            name=args.name,
            overwrite=args.overwrite,
            edition=args.edition,
            hrt2_as_test=args.hrt2_as_test,
        )
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
