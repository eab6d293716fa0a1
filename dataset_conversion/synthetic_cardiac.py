"""A synthetic short-axis cardiac MRI dataset that needs no download, in nnU-Net v2 raw format.

Why: the whole pipeline (conversion, planning, training, mirrored-prediction checks) has to be exercisable on a
machine without ACDC. Each case is one 2D slice with the label convention of nnU-Net's Dataset027_ACDC
(0 background, 1 RV, 2 MLV = myocardium, 3 LVC = LV cavity): an LV blood pool, a myocardial ring around it, and an
RV crescent attached to the septum, plus papillary muscles, an unlabelled RV wall, lungs, liver, chest wall fat,
tissue texture, a smooth bias field, blur and Rician noise.

The anatomy is chiral (the RV sits off-axis and tilted, the papillary muscles are asymmetric), and every case is
drawn with a random in-plane rotation and, with probability 1/2, mirrored. So both mirror-image configurations
occur, with equal probability: the data distribution is invariant under flips, which is the assumption a
reflection-equivariant network builds in.

Images are stored the way nnU-Net expects 2D data in NIfTI: a 3D image with a singleton z axis (array shape
(1, H, W)), with an in-plane spacing of 1.25-1.6 mm, a 5-10 mm slice thickness, a random origin and a random
(proper) direction matrix. Image sizes vary (odd and even) so nnU-Net must pad and crop. Case ``i`` depends only
on (seed, split, i), so asking for more cases keeps the first ones unchanged.

    python -m nnunet_equiflex.dataset_conversion.synthetic_cardiac --nnunet-raw $nnUNet_raw
    nnUNetv2_plan_and_preprocess -d 900 -c 2d
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
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

LABELS = {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}


@dataclass(frozen=True)
class Difficulty:
    """Ranges the generator draws from (uniform unless said otherwise); ``standard`` is the original dataset."""

    wall_mm: tuple[float, float] = (6.0, 10.0)  # myocardial thickness
    lv_harmonics_sd: tuple[float, float] = (0.06, 0.025)  # normal sd of the elliptic / triangular deformation
    wall_harmonic: tuple[float, float] = (0.0, 0.15)  # thickness variation around the ring
    rv_thickness: tuple[float, float] = (0.35, 0.6)  # RV crescent depth, fraction of the epicardial radius
    rv_wall_mm: tuple[float, float] = (2.0, 3.5)
    myocardium_intensity: tuple[float, float] = (0.15, 0.26)
    rv_intensity: tuple[float, float] = (0.75, 0.9)
    lv_intensity: tuple[float, float] = (0.85, 1.0)
    blur_sigma_px: tuple[float, float] = (0.4, 1.1)
    noise_sigma: tuple[float, float] = (0.015, 0.05)
    bias_sd: tuple[float, ...] = (0.2, 0.2, 0.1, 0.1, 0.1)  # normal sd of the bias field's coefficients


DIFFICULTIES = {
    "standard": Difficulty(),
    # Thin myocardium (2-4 px) and RV, more shape variation, blood pools whose brightness overlaps the
    # epicardial fat, a myocardium close to the surrounding tissue, more blur, noise and shading: a dataset on
    # which a short training budget leaves nnU-Net's CNN well below a Dice of 0.9, so presets can be told apart.
    "hard": Difficulty(
        wall_mm=(3.0, 5.5),
        lv_harmonics_sd=(0.12, 0.05),
        wall_harmonic=(0.0, 0.35),
        rv_thickness=(0.15, 0.4),
        rv_wall_mm=(1.2, 2.2),
        myocardium_intensity=(0.2, 0.32),
        rv_intensity=(0.5, 0.9),
        lv_intensity=(0.55, 1.0),
        blur_sigma_px=(0.8, 1.5),
        noise_sigma=(0.05, 0.11),
        bias_sd=(0.35, 0.35, 0.2, 0.2, 0.2),
    ),
}
DEFAULT_ID = 900
DEFAULT_NAME = "SyntheticCardiac"


@dataclass(frozen=True)
class SyntheticSlice:
    """One generated case: image (H, W) int16, label (H, W) uint8 and its geometry."""

    image: np.ndarray
    label: np.ndarray
    pixel_spacing: float  # mm, same along rows and columns
    slice_thickness: float  # mm
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major, SimpleITK order
    rotation_deg: float
    mirrored: bool

    def to_sitk(self) -> tuple[sitk.Image, sitk.Image]:
        """Image and label as (1, H, W) SimpleITK images sharing one geometry."""
        image = sitk.GetImageFromArray(self.image[None])
        image.SetSpacing((self.pixel_spacing, self.pixel_spacing, self.slice_thickness))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        label = sitk.GetImageFromArray(self.label[None])
        label.CopyInformation(image)
        return image, label

    def metadata(self) -> dict:
        return {
            "shape": list(self.image.shape),
            "pixel_spacing": self.pixel_spacing,
            "slice_thickness": self.slice_thickness,
            "rotation_deg": self.rotation_deg,
            "mirrored": self.mirrored,
        }


def synthesize_slice(
    rng: np.random.Generator, size_range: tuple[int, int] = (96, 160), difficulty: str = "standard"
) -> SyntheticSlice:
    """Draw one short-axis slice. All shapes are defined in mm in a heart-centred frame (u towards the RV).

    ``difficulty`` names the ranges of ``DIFFICULTIES``; the random draws happen in the same order for every
    difficulty, so a case's geometry (size, spacing, rotation, mirroring) depends only on its seed."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")
    d = DIFFICULTIES[difficulty]
    low, high = int(size_range[0]), int(size_range[1])
    if not 64 <= low <= high:
        raise ValueError(
            f"size_range must satisfy 64 <= min <= max (smaller fields of view squash the heart), got {size_range}"
        )
    height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
    spacing = round(float(rng.uniform(1.25, 1.6)), 4)
    thickness = float(rng.choice([5.0, 6.0, 6.5, 8.0, 10.0]))
    rotation = float(rng.uniform(0.0, 360.0))
    mirrored = bool(rng.random() < 0.5)

    # Heart shape (mm), before fitting it into the field of view.
    lv_radius = rng.uniform(12.0, 24.0)
    wall = rng.uniform(*d.wall_mm)
    lv_harmonics = rng.normal(0.0, list(d.lv_harmonics_sd), size=2)  # elliptic and triangular deformation
    lv_phases = rng.uniform(0.0, 2 * np.pi, size=2)
    wall_harmonic, wall_phase = rng.uniform(*d.wall_harmonic), rng.uniform(0.0, 2 * np.pi)
    outer = lv_radius + wall
    # RV crescent along the epicardium: thickest near one insertion point, tapering to a long horn at the other.
    # That asymmetry (gamma < 1) makes the configuration chiral.
    rv_span = np.deg2rad(rng.uniform(150.0, 200.0))
    rv_thickness = rng.uniform(*d.rv_thickness) * outer
    rv_gamma = rng.uniform(0.45, 0.65)
    rv_wall = rng.uniform(*d.rv_wall_mm)
    heart_extent = outer * (1 + np.abs(lv_harmonics).sum()) * (1 + wall_harmonic) + rv_thickness + rv_wall
    fov = np.array([height, width]) * spacing
    scale = min(1.0, 0.95 * fov.min() / (2 * heart_extent))
    lv_radius, wall, outer, rv_thickness, rv_wall, heart_extent = (
        v * scale for v in (lv_radius, wall, outer, rv_thickness, rv_wall, heart_extent)
    )
    slack = np.maximum(fov / 2 - heart_extent, 0.0)
    centre = fov / 2 + rng.uniform(-1.0, 1.0, size=2) * slack

    # Pixel centres in the heart frame: rotate, then mirror v.
    rows = (np.arange(height) + 0.5) * spacing - centre[0]
    cols = (np.arange(width) + 0.5) * spacing - centre[1]
    dy, dx = np.meshgrid(rows, cols, indexing="ij")
    cos, sin = np.cos(np.deg2rad(rotation)), np.sin(np.deg2rad(rotation))
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    if mirrored:
        v = -v
    rho, phi = np.hypot(u, v), np.arctan2(v, u)

    endo = lv_radius * (
        1 + lv_harmonics[0] * np.cos(2 * (phi - lv_phases[0])) + lv_harmonics[1] * np.cos(3 * (phi - lv_phases[1]))
    )
    epi = endo + wall * (1 + wall_harmonic * np.cos(phi - wall_phase))
    lv = rho < endo
    myocardium = (rho >= endo) & (rho < epi)
    along = (phi + rv_span / 2) / rv_span  # 0..1 across the RV's angular span, centred on u
    in_span = (along > 0) & (along < 1)
    rv_outer = epi + rv_thickness * np.sin(np.pi * np.clip(along, 0, 1) ** rv_gamma) ** 0.6
    right_ventricle = in_span & (rho >= epi) & (rho < rv_outer)
    rv_free_wall = in_span & (rho >= rv_outer) & (rho < rv_outer + rv_wall)
    label = np.zeros((height, width), dtype=np.uint8)
    label[right_ventricle] = LABELS["RV"]
    label[myocardium] = LABELS["MLV"]
    label[lv] = LABELS["LVC"]

    image = _background(rng, u, v, rho, epi, scale, (height, width), spacing)
    image[rv_free_wall | myocardium] = rng.uniform(*d.myocardium_intensity)
    image[right_ventricle] = rng.uniform(*d.rv_intensity)
    image[lv] = rng.uniform(*d.lv_intensity)
    # Papillary muscles: dark blobs inside the cavity, labelled LVC as in ACDC, at asymmetric angles.
    for angle_deg, size in ((140.0, 0.22), (235.0, 0.17)):
        angle = np.deg2rad(angle_deg + rng.normal(0.0, 10.0))
        centre_pm = 0.72 * lv_radius * np.array([np.cos(angle), np.sin(angle)])
        blob = np.hypot(u - centre_pm[0], v - centre_pm[1]) < size * lv_radius
        image[blob & lv] = rng.uniform(0.25, 0.4)

    image = gaussian_filter(image, sigma=rng.uniform(*d.blur_sigma_px))
    image *= _bias_field(rng, (height, width), d.bias_sd)
    sigma = rng.uniform(*d.noise_sigma)
    noise = rng.normal(0.0, sigma, size=(2, height, width))
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # magnitude of complex Gaussian noise: Rician
    image = np.clip(image * rng.uniform(300.0, 1500.0), 0, np.iinfo(np.int16).max).astype(np.int16)

    origin = tuple(round(float(o), 3) for o in rng.uniform(-200.0, 200.0, size=3))
    return SyntheticSlice(
        image=image,
        label=label,
        pixel_spacing=spacing,
        slice_thickness=thickness,
        origin=origin,
        direction=_random_rotation(rng),
        rotation_deg=round(rotation, 3),
        mirrored=mirrored,
    )


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _ellipse(u: np.ndarray, v: np.ndarray, centre, axes, tilt: float = 0.0) -> np.ndarray:
    a, b = _rotate(u - centre[0], v - centre[1], tilt)
    return (a / axes[0]) ** 2 + (b / axes[1]) ** 2


def _background(rng, u, v, rho, epi, scale, shape, spacing) -> np.ndarray:
    """Thorax around the heart: soft tissue with texture, lungs, liver, subcutaneous and epicardial fat."""
    texture = gaussian_filter(rng.standard_normal(shape), sigma=4.0 / spacing)
    texture /= texture.std() + 1e-8
    tissue = rng.uniform(0.25, 0.4) * (1 + 0.12 * texture)
    body = _ellipse(u, v, (10.0, -25.0), np.array([170.0, 125.0]) * rng.uniform(0.9, 1.1), rng.normal(0, 0.1))
    image = np.where(body < 1.0, tissue, 0.02)
    fat_band = (body < 1.0) & (body > rng.uniform(0.8, 0.88))
    image[fat_band] = rng.uniform(0.65, 0.85)
    lungs = (_ellipse(u, v, (-80.0 * scale, -5.0), (35.0, 75.0), 0.2) < 1.0) | (
        _ellipse(u, v, (100.0 * scale, -25.0), (35.0, 70.0), -0.3) < 1.0
    )
    image[lungs & (body < 1.0)] = rng.uniform(0.03, 0.08) * (1 + 0.3 * np.abs(texture[lungs & (body < 1.0)]))
    liver = _ellipse(u, v, (55.0, 85.0 * max(scale, 0.8)), (70.0, 40.0), 0.3) < 1.0
    image[liver & (body < 1.0)] = rng.uniform(0.35, 0.45)
    epicardial_fat = (rho >= epi) & (rho < epi + rng.uniform(1.5, 3.5)) & (np.cos(np.arctan2(v, u) + 2.0) > 0.3)
    image[epicardial_fat] = rng.uniform(0.6, 0.8)
    return image


def _bias_field(rng: np.random.Generator, shape: tuple[int, int], sd: tuple[float, ...]) -> np.ndarray:
    """Smooth multiplicative coil shading, exp of a random quadratic (roughly 0.6..1.6 for the standard sd)."""
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    c = rng.normal(0.0, list(sd))
    return np.exp(c[0] * x + c[1] * y + c[2] * x * y + c[3] * x**2 + c[4] * y**2)


def _random_rotation(rng: np.random.Generator) -> tuple[float, ...]:
    """A uniformly random proper rotation (det +1) as a row-major 3x3 tuple."""
    w, x, y, z = rng.normal(size=4)
    n = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    m = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    return tuple(float(e) for e in m.ravel())


def generate_synthetic_cardiac(
    nnunet_raw: str | os.PathLike | None = None,
    dataset_id: int = DEFAULT_ID,
    num_train: int = 200,
    num_test: int = 20,
    seed: int = 0,
    size_range: tuple[int, int] = (96, 160),
    overwrite: bool = False,
    name: str = DEFAULT_NAME,
    difficulty: str = "standard",
) -> Path:
    """Write the synthetic dataset to ``$nnUNet_raw/Dataset{id}_{name}``; returns that folder.

    imagesTs/labelsTs hold ``num_test`` held-out cases (nnU-Net ignores labelsTs; evaluation scripts use it).
    ``generation.json`` records the seed and per-case geometry, rotation and mirror flag.
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    folder = prepare_dataset_folder(
        nnunet_raw,
        dataset_id,
        name,
        overwrite,
        subfolders=("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test else ()),
    )
    with removed_on_error(folder):
        record: dict = {"seed": seed, "size_range": list(size_range), "difficulty": difficulty, "cases": {}}
        for split, count, images_dir, labels_dir, prefix in (
            ("train", num_train, "imagesTr", "labelsTr", "synth"),
            ("test", num_test, "imagesTs", "labelsTs", "synth_test"),
        ):
            progress = Progress(f"{folder.name} {split}", count)
            for index in range(count):
                case = f"{prefix}_{index:04d}"
                sample = synthesize_slice(case_rng(seed, split, index), size_range, difficulty)
                image, label = sample.to_sitk()
                write_image(image, folder / images_dir / f"{case}_0000{FILE_ENDING}")
                write_image(label, folder / labels_dir / f"{case}{FILE_ENDING}")
                record["cases"][case] = {"split": split, **sample.metadata()}
                progress.update(index + 1)
        write_dataset_json(
            folder,
            channel_names={0: "cineMRI"},
            labels=LABELS,
            num_training_cases=num_train,
            dataset_name=folder.name,
            description=f"Synthetic 2D short-axis cardiac MRI slices (nnunet-equiflex, difficulty {difficulty}), ACDC "
            "label convention; random rotation and mirroring, varied size and spacing, bias field, blur, Rician noise.",
            reference="generated by nnunet_equiflex.dataset_conversion.synthetic_cardiac",
        )
        (folder / "generation.json").write_text(json.dumps(record, indent=1))
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_equiflex.dataset_conversion.synthetic_cardiac",
        description="Generate a synthetic short-axis cardiac MRI dataset (ACDC labels) in nnU-Net v2 raw format.",
    )
    add_common_arguments(parser, DEFAULT_ID, DEFAULT_NAME)
    add_split_arguments(parser, 200, 20, "slices")
    parser.add_argument(
        "--size-range",
        type=int,
        nargs=2,
        default=(96, 160),
        metavar=("MIN", "MAX"),
        help="image height and width are drawn from [MIN, MAX] (default: 96 160)",
    )
    parser.add_argument(
        "--difficulty",
        choices=sorted(DIFFICULTIES),
        default="standard",
        help="standard, or hard: thinner myocardium and RV, more shape, intensity, noise and shading variation",
    )
    args = parser.parse_args(argv)
    with errors_as_messages(parser):
        folder = generate_synthetic_cardiac(
            args.nnunet_raw,
            dataset_id=args.dataset_id,
            num_train=args.num_train,
            num_test=args.num_test,
            seed=args.seed,
            size_range=tuple(args.size_range),
            overwrite=args.overwrite,
            name=args.name,
            difficulty=args.difficulty,
        )
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
