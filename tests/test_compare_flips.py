"""compare's flip check on files: every non-identity flip of the mirror axes (3 in 2D, 7 in 3D), written with the
input's geometry, and the consistency of predictions under them (fast: no network, predictions made by hand)."""

import numpy as np
import SimpleITK as sitk

from nnunet_equiflex.compare import flip_consistency, flip_sets, in_plane_axes, write_flipped_inputs


def test_the_flips_are_every_combination_of_the_mirror_axes():
    assert flip_sets((1, 2)) == [(1,), (2,), (1, 2)]
    assert len(flip_sets((0, 1, 2))) == 7 and (0, 1, 2) in flip_sets((0, 1, 2))


def _write(array: np.ndarray, path, spacing=(1.0, 1.0, 3.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((5.0, -2.0, 7.0))
    sitk.WriteImage(image, str(path))
    return path


def test_a_volume_is_checked_under_all_7_flips(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((5, 6, 7)).astype(np.float32)
    source = _write(volume, tmp_path / "case_0000.nii.gz")
    axes = in_plane_axes(source)
    assert axes == (0, 1, 2)
    flipped = write_flipped_inputs({"case": [source]}, tmp_path / "flipped", axes, ".nii.gz")
    assert len(flipped) == 7
    written = sitk.ReadImage(str(flipped["case__flip02"][0]))
    assert written.GetSpacing() == (1.0, 1.0, 3.0) and written.GetOrigin() == (5.0, -2.0, 7.0)
    assert np.array_equal(sitk.GetArrayFromImage(written), volume[::-1, :, ::-1])

    # An equivariant "segmentation" (a voxel-wise threshold) is consistent under every flip; one that reads a
    # fixed corner of the volume is not.
    predictions = tmp_path / "pred"
    predictions.mkdir()
    for name, paths in {"case": [source], **flipped}.items():
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[0])))
        _write((array > 0).astype(np.uint8), predictions / f"{name}.nii.gz")
    assert flip_consistency(predictions, predictions, ["case"], axes, ".nii.gz") == (1.0, 7, 7)
    for name, paths in flipped.items():
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[0])))
        _write((array > array.flat[0]).astype(np.uint8), predictions / f"{name}.nii.gz")
    fraction, exact, total = flip_consistency(predictions, predictions, ["case"], axes, ".nii.gz")
    assert total == 7 and fraction < 1.0 and exact < 7


def test_a_2d_slice_stored_as_a_volume_is_flipped_in_plane_only(tmp_path):
    source = _write(np.zeros((1, 6, 7), np.float32), tmp_path / "slice_0000.nii.gz")
    assert in_plane_axes(source) == (1, 2)
    assert sorted(write_flipped_inputs({"s": [source]}, tmp_path / "f", (1, 2), ".nii.gz")) == [
        "s__flip1", "s__flip12", "s__flip2"
    ]  # fmt: skip
