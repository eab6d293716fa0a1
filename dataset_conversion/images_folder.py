"""A folder of 2D images + masks (PNG, TIFF, ...) to nnU-Net raw, as (1, H, W) NIfTI.

Why NIfTI and not PNG: nnU-Net can read PNG itself (NaturalImage2DIO), but writing every dataset of this project
as NIfTI keeps one reader, one geometry convention and one evaluation path for all of them.

Layout: ``images/<stem>.<ext>`` pairs with ``masks/<stem><mask_suffix>.<ext>`` (same stem; ``--mask-suffix _mask``
for ``xxx_mask.png``). The stem becomes the case id. Images may be grayscale (one channel) or RGB (three
channels ``_0000.._0002``; ``--grayscale`` converts them to one luminance channel). Masks are either integer
label maps (``--mask-mode labels``, the default; palette PNGs give their palette indices) whose values must be
0..N, or binary masks (``--mask-mode binary``: every non-zero value, e.g. 255, becomes 1). Everything is checked
before anything is written: unmatched names, mask values that are not whole numbers, image/mask size
mismatches and images whose channel counts differ are errors naming the files.

Each slice is written as a 3D image with a singleton z axis and spacing (pixel spacing, 999) - 999 marks the
axis as "not a real slice distance", as nnU-Net's own 2D converters do.

    python -m nnunet_equiflex.dataset_conversion.images_folder -i /data/nuclei -d 910 --name Nuclei \\
        --label-names nucleus --pixel-spacing 0.5 0.5
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from nnunet_equiflex.dataset_conversion.common import (
    FILE_ENDING,
    Progress,
    add_common_arguments,
    as_integer_labels,
    errors_as_messages,
    image_from_2d,
    label_dtype,
    prepare_dataset_folder,
    removed_on_error,
    write_dataset_json,
    write_image,
)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")  # lossless only: JPEG blurs label boundaries into new values
MASK_MODES = ("labels", "binary")


@dataclass(frozen=True)
class _Case:
    image: Path
    mask: Path | None


def read_image_2d(path: Path, grayscale: bool = False) -> np.ndarray:
    """An image as (channels, H, W): 1 channel for grayscale, 3 for colour (alpha dropped if opaque)."""
    array = _read(path, as_mask=False)
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 2D image, got an array of shape {array.shape}")
    channels = array.shape[-1]
    if channels in (2, 4):  # gray+alpha, RGB+alpha
        alpha = array[..., -1]
        if alpha.min() != alpha.max():
            raise ValueError(f"{path}: the alpha channel is not constant; flatten the image onto a background first")
        array = array[..., :-1]
        channels -= 1
    if channels == 1:
        return np.moveaxis(array, -1, 0)
    if channels != 3:
        raise ValueError(f"{path}: {channels} channels; expected grayscale or RGB")
    if grayscale:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL's 'L'
        return (array.astype(np.float32) @ weights)[None]
    return np.moveaxis(array, -1, 0)


def read_mask_2d(path: Path, mode: str = "labels") -> np.ndarray:
    """A mask as an (H, W) int64 label map; 'binary' maps every non-zero value to 1."""
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; use one of {MASK_MODES}")
    array = _read(path, as_mask=True)
    if array.ndim == 3:
        if all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[-1])):
            array = array[..., 0]  # a gray mask saved as RGB
        else:
            raise ValueError(
                f"{path}: mask is a colour image; save masks as integer or palette (indexed) images, one value per "
                "class (colour-coded masks are not supported)"
            )
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a 2D mask, got shape {array.shape}")
    labels = as_integer_labels(array, str(path))
    return (labels > 0).astype(np.int64) if mode == "binary" else labels


def _read(path: Path, as_mask: bool) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        array = tifffile.imread(path)
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
            array = np.moveaxis(array, 0, -1)  # planar (C, H, W) TIFF
        return array
    with Image.open(path) as image:
        if image.mode == "P" and not as_mask:
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode == "CMYK":
            image = image.convert("RGB")
        array = np.asarray(image)
    return array.astype(np.uint8) if array.dtype == bool else array


def _index(folder: Path, suffixes: Sequence[str], strip: str = "") -> dict[str, Path]:
    """stem -> file for the supported files in ``folder``; a stem present twice is an error."""
    index: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        stem = path.stem
        if strip:
            if not stem.endswith(strip):
                continue
            stem = stem[: -len(strip)]
        if stem in index:
            raise ValueError(f"{index[stem].name} and {path.name} in {folder} share the case name {stem!r}; keep one")
        index[stem] = path
    return index


def _pair(images_dir: Path, masks_dir: Path, mask_suffix: str) -> dict[str, _Case]:
    for folder, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    images = _index(images_dir, IMAGE_SUFFIXES)
    masks = _index(masks_dir, MASK_SUFFIXES + (".jpg", ".jpeg"), strip=mask_suffix)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    lossy = sorted(p.name for p in masks.values() if p.suffix.lower() in (".jpg", ".jpeg"))
    if lossy:
        raise ValueError(f"JPEG masks ({', '.join(lossy[:3])}) are lossy and change label values; use PNG or TIFF")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        raise ValueError(
            f"images and masks do not pair up by file name ({len(no_mask)} images without a mask, "
            f"{len(no_image)} masks without an image). Images without a mask: {_few(no_mask)}; masks without an "
            f"image: {_few(no_image)}. Masks must be named <image stem>{mask_suffix}.<ext> "
            "(use --mask-suffix if they carry one, e.g. _mask)"
        )
    return {stem: _Case(images[stem], masks[stem]) for stem in images}


def _few(names: list[str], n: int = 5) -> str:
    return "none" if not names else ", ".join(names[:n]) + (f" ... (+{len(names) - n})" if len(names) > n else "")


def convert_images_folder(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    dataset_id: int,
    name: str,
    nnunet_raw: str | os.PathLike | None = None,
    overwrite: bool = False,
    test_images_dir: str | os.PathLike | None = None,
    grayscale: bool = False,
    mask_mode: str = "labels",
    mask_suffix: str = "",
    label_names: Sequence[str] | None = None,
    channel_names: Sequence[str] | None = None,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
) -> Path:
    """Convert 2D image/mask pairs to ``$nnUNet_raw/Dataset{id}_{name}``; returns that folder.

    ``label_names`` names the foreground labels 1..N (default label_1..label_N); ``channel_names`` the image
    channels (default R, G, B or gray; nnU-Net picks the normalisation by these names). ``pixel_spacing`` is
    (row, column) in mm.
    """
    if len(pixel_spacing) != 2 or min(pixel_spacing) <= 0:
        raise ValueError(f"pixel_spacing must be two positive numbers (row, column), got {pixel_spacing}")
    cases = _pair(Path(images_dir).expanduser(), Path(masks_dir).expanduser(), mask_suffix)
    test_images = _index(Path(test_images_dir).expanduser(), IMAGE_SUFFIXES) if test_images_dir else {}
    if test_images_dir and not test_images:
        raise FileNotFoundError(f"no images in the test folder {test_images_dir}")
    test_cases = {stem: _Case(path, None) for stem, path in test_images.items()}
    clashes = sorted(set(cases) & set(test_cases))
    if clashes:
        raise ValueError(f"case names used for training and test alike: {_few(clashes)}; rename the test images")

    # Pass 1: read everything and check it, so a bad file fails before the output folder is touched.
    num_channels, values = _check(cases, test_cases, grayscale, mask_mode)
    labels = _label_dict(values, label_names, mask_mode)
    channels = _channel_dict(num_channels, channel_names)

    folder = prepare_dataset_folder(
        nnunet_raw, dataset_id, name, overwrite, ("imagesTr", "labelsTr") + (("imagesTs",) if test_cases else ())
    )
    with removed_on_error(folder):
        dtype = label_dtype(max(labels.values()))
        for split, items, images_sub in (("train", cases, "imagesTr"), ("test", test_cases, "imagesTs")):
            progress = Progress(f"{folder.name} {split}", len(items))
            for done, (stem, case) in enumerate(items.items(), start=1):
                for c, channel in enumerate(read_image_2d(case.image, grayscale)):
                    write_image(
                        image_from_2d(channel, pixel_spacing), folder / images_sub / f"{stem}_{c:04d}{FILE_ENDING}"
                    )
                if case.mask is not None:
                    mask = read_mask_2d(case.mask, mask_mode).astype(dtype)
                    write_image(image_from_2d(mask, pixel_spacing), folder / "labelsTr" / f"{stem}{FILE_ENDING}")
                progress.update(done)
        write_dataset_json(
            folder,
            channel_names=channels,
            labels=labels,
            num_training_cases=len(cases),
            dataset_name=folder.name,
            description=f"2D images converted from {images_dir} (masks: {masks_dir}, mode {mask_mode})",
        )
    return folder


def _check(
    cases: dict[str, _Case], test_cases: dict[str, _Case], grayscale: bool, mask_mode: str
) -> tuple[int, set[int]]:
    channel_counts: dict[int, list[str]] = {}
    values: set[int] = set()
    for stem, case in {**cases, **test_cases}.items():
        image = read_image_2d(case.image, grayscale)
        channel_counts.setdefault(image.shape[0], []).append(case.image.name)
        if case.mask is None:
            continue
        mask = read_mask_2d(case.mask, mask_mode)
        if mask.shape != image.shape[1:]:
            raise ValueError(
                f"size mismatch for case {stem!r}: image {case.image.name} is {image.shape[1]}x{image.shape[2]} "
                f"(HxW), mask {case.mask.name} is {mask.shape[0]}x{mask.shape[1]}; masks must match their image"
            )
        values.update(int(v) for v in np.unique(mask))
    if len(channel_counts) > 1:
        summary = "; ".join(f"{n} channel(s): {_few(names, 3)}" for n, names in sorted(channel_counts.items()))
        raise ValueError(
            f"images have different numbers of channels ({summary}); pass --grayscale to convert all to one channel"
        )
    return next(iter(channel_counts)), values


def _label_dict(values: set[int], label_names: Sequence[str] | None, mask_mode: str) -> dict[str, int]:
    highest = max(values | {1})
    if label_names is not None:
        names = list(label_names)
        if "background" in names:
            raise ValueError("label names are for the foreground labels 1..N; 'background' (0) is added for you")
        if len(names) < highest:
            raise ValueError(f"masks hold labels up to {highest} but only {len(names)} label names were given")
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be unique, got {names}")
    else:
        names = [f"label_{v}" for v in range(1, highest + 1)]
    gaps = sorted(set(range(highest + 1)) - values - {0})
    if gaps and label_names is None and mask_mode != "binary":
        hint = " (looks like 0/255 binary masks: pass --mask-mode binary)" if values <= {0, 255} else ""
        raise ValueError(
            f"mask values {sorted(values)[:12]} are not consecutive (missing {_few([str(g) for g in gaps], 8)})"
            f"{hint}; nnU-Net needs labels 0..N. Remap the masks, or give --label-names for all of 1..{highest} if "
            "some labels are simply absent"
        )
    return {"background": 0} | {name: v for v, name in enumerate(names, start=1)}


def _channel_dict(num_channels: int, channel_names: Sequence[str] | None) -> dict[int, str]:
    if channel_names is None:
        channel_names = ["R", "G", "B"] if num_channels == 3 else ["gray"] if num_channels == 1 else None
    if channel_names is None or len(channel_names) != num_channels:
        raise ValueError(f"the images have {num_channels} channel(s); give exactly that many channel names")
    return dict(enumerate(channel_names))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_equiflex.dataset_conversion.images_folder",
        description="Convert a folder of 2D images and masks (PNG/TIFF) to nnU-Net raw format as NIfTI.",
    )
    parser.add_argument("-i", "--input", default=None, help="folder holding images/ and masks/ (sets the defaults)")
    parser.add_argument("--images", default=None, help="image folder (default: <input>/images)")
    parser.add_argument("--masks", default=None, help="mask folder (default: <input>/masks)")
    parser.add_argument("--test-images", default=None, help="optional folder of unlabelled images for imagesTs")
    add_common_arguments(parser, None, None)
    parser.add_argument("--grayscale", action="store_true", help="convert colour images to one luminance channel")
    parser.add_argument(
        "--mask-mode",
        choices=MASK_MODES,
        default="labels",
        help="labels: mask values are the labels 0..N (default); binary: every non-zero value becomes 1",
    )
    parser.add_argument("--mask-suffix", default="", help="mask stem = image stem + this (e.g. _mask); default none")
    parser.add_argument("--label-names", nargs="+", default=None, help="names of labels 1..N (default label_1...)")
    parser.add_argument("--channel-names", nargs="+", default=None, help="names of the channels (default R G B/gray)")
    parser.add_argument(
        "--pixel-spacing",
        type=float,
        nargs=2,
        default=(1.0, 1.0),
        metavar=("ROW", "COL"),
        help="pixel size in mm (default: 1 1)",
    )
    args = parser.parse_args(argv)
    if args.input is None and (args.images is None or args.masks is None):
        parser.error("give --input (holding images/ and masks/) or both --images and --masks")
    with errors_as_messages(parser):
        folder = convert_images_folder(
            args.images or Path(args.input) / "images",
            args.masks or Path(args.input) / "masks",
            dataset_id=args.dataset_id,
            name=args.name,
            nnunet_raw=args.nnunet_raw,
            overwrite=args.overwrite,
            test_images_dir=args.test_images,
            grayscale=args.grayscale,
            mask_mode=args.mask_mode,
            mask_suffix=args.mask_suffix,
            label_names=args.label_names,
            channel_names=args.channel_names,
            pixel_spacing=tuple(args.pixel_spacing),
        )
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
