"""Pieces every converter shares: where nnU-Net raw data lives, the overwrite guard, and NIfTI writing.

Each converter writes nnU-Net v2 raw format (imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, optional
imagesTs, dataset.json from nnunetv2's own ``generate_dataset_json``), so nnU-Net reads every dataset of this
project the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

FILE_ENDING = ".nii.gz"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def resolve_nnunet_raw(nnunet_raw: str | os.PathLike | None) -> Path:
    """The nnU-Net raw folder: the argument if given, else the environment variable ``nnUNet_raw``."""
    if nnunet_raw is None or str(nnunet_raw) == "":
        nnunet_raw = os.environ.get("nnUNet_raw")
    if not nnunet_raw:
        raise ValueError(
            "no nnU-Net raw folder given: pass --nnunet-raw /path/to/nnUNet_raw (nnunet_raw=... in Python) "
            "or set the environment variable nnUNet_raw"
        )
    return Path(str(nnunet_raw).strip('"')).expanduser()


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{id:03d}_{name}``, the folder name nnU-Net looks datasets up by."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int | np.integer) or dataset_id < 1:
        raise ValueError(f"dataset id must be a positive integer, got {dataset_id!r}")
    if not _NAME_PATTERN.match(name):
        raise ValueError(
            f"dataset name {name!r} is not usable in a folder name; use letters, digits, '_' and '-' only "
            "(for example 'SyntheticCardiac')"
        )
    return f"Dataset{int(dataset_id):03d}_{name}"


def prepare_dataset_folder(
    nnunet_raw: str | os.PathLike | None,
    dataset_id: int,
    name: str,
    overwrite: bool,
    subfolders: Iterable[str] = ("imagesTr", "labelsTr"),
) -> Path:
    """Create ``$nnUNet_raw/DatasetXXX_Name`` and its subfolders; refuse to clobber existing data.

    A non-empty target is only removed with ``overwrite=True``: stale cases from an earlier run would otherwise
    mix with the new ones. Another dataset folder with the same id is always an error, because nnU-Net resolves
    datasets by id and would refuse to pick one.
    """
    raw = resolve_nnunet_raw(nnunet_raw)
    folder_name = dataset_folder_name(dataset_id, name)
    target = raw / folder_name
    check_dataset_id_unused(raw, dataset_id, folder_name)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; remove it or pick another dataset id/name")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{target} already exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
                "or pick another --dataset-id"
            )
        shutil.rmtree(target)
    for sub in subfolders:
        (target / sub).mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    return target


@contextmanager
def removed_on_error(folder: Path) -> Iterator[None]:
    """Delete the dataset folder being written if writing fails, so a fixed re-run needs no --overwrite.

    Safe because ``prepare_dataset_folder`` only hands out folders that were empty or replaced on request.
    """
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def check_dataset_id_unused(raw: Path, dataset_id: int, folder_name: str) -> None:
    """Fail if ``raw`` already holds a differently named dataset with the same id."""
    if not raw.is_dir():
        return
    prefix = f"Dataset{int(dataset_id):03d}_"
    clashes = sorted(p.name for p in raw.iterdir() if p.name.startswith(prefix) and p.name != folder_name)
    if clashes:
        raise FileExistsError(
            f"dataset id {dataset_id} is already used by {', '.join(clashes)} in {raw}; nnU-Net identifies datasets "
            "by id, so pick another --dataset-id (or remove the other folder)"
        )


def label_dtype(max_label: int) -> type:
    """uint8 where the labels fit, uint16 otherwise."""
    if max_label < 0 or max_label > np.iinfo(np.uint16).max:
        raise ValueError(f"label value {max_label} does not fit uint16")
    return np.uint8 if max_label <= np.iinfo(np.uint8).max else np.uint16


def as_integer_labels(array: np.ndarray, source: str) -> np.ndarray:
    """Integer label array from whatever dtype a mask was stored in; non-integer or negative values are errors."""
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"{source}: mask holds non-integer values (e.g. {_first_non_integer(array)}); "
                "labels must be whole numbers (a probability map or an interpolated mask is not a label map)"
            )
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise ValueError(f"{source}: mask dtype {array.dtype} is not a label type")
    out = array.astype(np.int64)
    if out.size and out.min() < 0:
        raise ValueError(f"{source}: mask holds negative values (min {out.min()}); labels must be >= 0")
    return out


def _first_non_integer(array: np.ndarray) -> float:
    bad = array[~np.isfinite(array) | (array != np.round(array))]
    return float(bad.flat[0]) if bad.size else float("nan")


def image_from_2d(array: np.ndarray, pixel_spacing: Sequence[float], slice_spacing: float = 999.0) -> sitk.Image:
    """A 2D array (H, W) as the 3D image nnU-Net expects for 2D data in NIfTI: array shape (1, H, W).

    ``pixel_spacing`` is (row, column) in mm; SimpleITK orders spacing as (x=column, y=row, z).
    """
    if array.ndim != 2:
        raise ValueError(f"expected a 2D array, got shape {array.shape}")
    image = sitk.GetImageFromArray(array[None])
    image.SetSpacing((float(pixel_spacing[1]), float(pixel_spacing[0]), float(slice_spacing)))
    return image


def write_image(image: sitk.Image, path: Path) -> None:
    """Write compressed; the folder must exist."""
    sitk.WriteImage(image, str(path), useCompression=True)


@dataclass(frozen=True)
class Geometry:
    """Size and physical placement of an image, in SimpleITK order (x, y, z)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            image.GetSize(),
            image.GetSpacing(),
            image.GetOrigin(),
            image.GetDirection(),
            image.GetNumberOfComponentsPerPixel(),
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> Geometry:
        """From the file header only, without loading the voxels."""
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return cls(
            reader.GetSize(),
            reader.GetSpacing(),
            reader.GetOrigin(),
            reader.GetDirection(),
            reader.GetNumberOfComponents(),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: Geometry, tolerance: float = 1e-4) -> bool:
        """Same grid up to header rounding: size equal; spacing, origin, direction within ``tolerance``."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=0)
            and np.allclose(self.origin, other.origin, rtol=0, atol=tolerance * max(1.0, *self.spacing))
            and np.allclose(self.direction, other.direction, rtol=0, atol=tolerance)
        )

    def __str__(self) -> str:
        return (
            f"size {self.size}, spacing {tuple(round(s, 5) for s in self.spacing)}, "
            f"origin {tuple(round(o, 3) for o in self.origin)}"
        )


def convert_volume_pair(
    image_path: Path,
    label_path: Path,
    image_out: Path,
    label_out: Path,
    label_map: dict[int, int] | None = None,
) -> set[int]:
    """Write one 3D image and its label map to nnU-Net raw, keeping the image's geometry exactly.

    A ``.nii.gz`` image is copied byte for byte (nothing about it can change); other formats are re-written by
    SimpleITK. The label is written on the image's grid: it must be the same grid up to header rounding (anything
    else is an error, since nnU-Net compares spacings and rejects the case), cast to uint8 (uint16 if needed).
    ``label_map`` maps source values to output values; values it lacks are an error. Returns the output label
    values present.
    """
    image = Geometry.read(image_path)
    if image.components != 1:
        raise ValueError(f"{image_path}: expected a single-channel volume, got {image.components} components")
    label = sitk.ReadImage(str(label_path))
    if not image.matches(Geometry.of(label)):
        raise ValueError(
            f"image and label are not on the same grid:\n  {image_path}: {image}\n  {label_path}: "
            f"{Geometry.of(label)}\nresample the label onto the image or leave this case out"
        )
    values = as_integer_labels(sitk.GetArrayFromImage(label), str(label_path))
    if label_map is not None:
        values = remap_labels(values, label_map, str(label_path))
    out = image.apply_to(sitk.GetImageFromArray(values.astype(label_dtype(int(values.max(initial=0))))))
    copy_or_convert_image(image_path, image_out)
    write_image(out, label_out)
    return {int(v) for v in np.unique(values)}


def write_volume_cases(
    folder: Path,
    pairs: dict[str, tuple[Path, Path]],
    label_map: dict[int, int],
    description: str,
    test_images: dict[str, Path] | None = None,
    test_description: str = "imagesTs",
) -> None:
    """Write ``pairs`` (case -> (image, label)) to imagesTr/labelsTr and ``test_images`` to imagesTs,
    with progress lines; labels are remapped with ``label_map`` and checked against the image grid."""
    progress = Progress(f"{folder.name} {description}", len(pairs))
    for done, (case, (image, label)) in enumerate(pairs.items(), start=1):
        convert_volume_pair(
            image,
            label,
            folder / "imagesTr" / f"{case}_0000{FILE_ENDING}",
            folder / "labelsTr" / f"{case}{FILE_ENDING}",
            label_map=label_map,
        )
        progress.update(done)
    if test_images:
        progress = Progress(f"{folder.name} {test_description}", len(test_images))
        for done, (case, image) in enumerate(test_images.items(), start=1):
            copy_or_convert_image(image, folder / "imagesTs" / f"{case}_0000{FILE_ENDING}")
            progress.update(done)


def copy_or_convert_image(source: Path, target: Path) -> None:
    """Copy a .nii.gz unchanged; read and re-write anything else (e.g. .mha, .nii) as compressed NIfTI."""
    if source.name.endswith(FILE_ENDING):
        shutil.copyfile(source, target)
    else:
        write_image(sitk.ReadImage(str(source)), target)


def remap_labels(values: np.ndarray, label_map: dict[int, int], source: str) -> np.ndarray:
    """Apply ``label_map`` (source value -> output value) through a lookup table; unknown values are an error."""
    present = np.unique(values)
    unknown = sorted(int(v) for v in present if int(v) not in label_map)
    if unknown:
        raise ValueError(
            f"{source}: label values {unknown[:10]} are not part of the expected label set "
            f"{sorted(label_map)[:12]}{'...' if len(label_map) > 12 else ''}; is this the right dataset/edition?"
        )
    lut = np.zeros(int(present.max(initial=0)) + 1, dtype=np.int64)
    for source_value, target_value in label_map.items():
        if source_value < lut.size:
            lut[source_value] = target_value
    return lut[values]


def write_dataset_json(
    folder: Path,
    channel_names: dict[int, str],
    labels: dict[str, int],
    num_training_cases: int,
    **extra,
) -> None:
    """dataset.json through nnunetv2's own writer, so the format is whatever the installed nnU-Net expects."""
    generate_dataset_json(
        str(folder),
        channel_names=dict(channel_names),
        labels=dict(labels),
        num_training_cases=num_training_cases,
        file_ending=FILE_ENDING,
        converted_by="nnunet-equiflex dataset_conversion",
        **extra,
    )


class Progress:
    """Prints 'label: i/n' about ``steps`` times over a loop, so long conversions show they are alive."""

    def __init__(self, label: str, total: int, steps: int = 10, stream=None) -> None:
        self.label, self.total = label, total
        self.every = max(1, total // steps)
        self.stream = stream if stream is not None else sys.stdout

    def update(self, done: int) -> None:
        if done == self.total or done % self.every == 0:
            print(f"{self.label}: {done}/{self.total}", file=self.stream, flush=True)


@contextmanager
def errors_as_messages(parser) -> Iterator[None]:
    """In a CLI, input problems end with their message and exit status 1 instead of a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")


def add_common_arguments(parser, default_id: int | None, default_name: str | None, with_name: bool = True) -> None:
    """--nnunet-raw, --dataset-id, --name, --overwrite, shared by every converter's CLI.

    A default of None makes the argument required (the generic converter has no sensible default).
    """
    parser.add_argument(
        "-o",
        "--nnunet-raw",
        default=None,
        help="nnU-Net raw folder to write DatasetXXX_Name into (default: $nnUNet_raw)",
    )
    if default_id is None:
        parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id")
    else:
        parser.add_argument(
            "-d", "--dataset-id", type=int, default=default_id, help=f"nnU-Net dataset id (default: {default_id})"
        )
    if with_name and default_name is None:
        parser.add_argument("--name", required=True, help="dataset name, the part after DatasetXXX_")
    elif with_name:
        parser.add_argument(
            "--name", default=default_name, help=f"dataset name, the part after DatasetXXX_ (default: {default_name})"
        )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty dataset folder")


SPLIT_CODES = {"train": 0, "test": 1}


def case_rng(seed: int, split: str, index: int, *salt: int) -> np.random.Generator:
    """Independent stream per (seed, split, case index[, salt]): a case does not depend on how many are
    generated; ``salt`` separates the streams of different generators."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES[split], int(index), *salt]))


def add_split_arguments(parser, num_train: int, num_test: int, unit: str) -> None:
    """--num-train, --num-test and --seed of the synthetic generators (``unit``: slices or volumes)."""
    parser.add_argument("--num-train", type=int, default=num_train, help=f"training {unit} (default: {num_train})")
    parser.add_argument(
        "--num-test", type=int, default=num_test, help=f"held-out {unit} in imagesTs/labelsTs (default: {num_test})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default: 0)")
