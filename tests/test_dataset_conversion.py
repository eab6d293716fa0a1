"""Dataset converters: every one on a tiny fake copy of its source layout, written here into tmp_path.

What a user relies on: the files nnU-Net reads (names, geometry, label values, dataset.json), nnU-Net's own
integrity check passing, no silent overwrite, and errors that say what is wrong with the input.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image
from scipy.ndimage import binary_dilation, gaussian_filter

from nnunet_equiflex.dataset_conversion import acdc, amos_mr, crossmoda, images_folder, spider, synthetic_cardiac
from nnunet_equiflex.dataset_conversion.synthetic_cardiac import case_rng, generate_synthetic_cardiac, synthesize_slice

MODULES = [synthetic_cardiac, acdc, crossmoda, spider, amos_mr, images_folder]
# A non-identity direction (x and y swapped and all axes flipped; det +1), so geometry bugs show.
DIRECTION = (0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


# ---------------------------------------------------------------------------------------------------- helpers


def write_volume(path: Path, array: np.ndarray, spacing=(0.4, 0.45, 1.5), origin=(-12.5, 30.25, 7.0)) -> Path:
    """A tiny 3D volume with non-trivial geometry (array order z, y, x)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def random_volume(rng, shape=(8, 16, 16)) -> np.ndarray:
    return rng.integers(0, 1000, size=shape).astype(np.int16)


def random_labels(rng, values, shape=(8, 16, 16), dtype=np.int16) -> np.ndarray:
    labels = rng.choice(np.asarray(values), size=shape).astype(dtype)
    labels.flat[: len(values)] = values  # every value present
    return labels


def read(path: Path) -> sitk.Image:
    assert path.is_file(), f"missing {path}"
    return sitk.ReadImage(str(path))


def assert_same_geometry(written: sitk.Image, source: sitk.Image) -> None:
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)


def dataset_json(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def verify_with_nnunet(folder: Path, capfd) -> None:
    """nnU-Net's own integrity check; it raises on errors and only prints geometry warnings, so check both."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)
    output = capfd.readouterr().out
    assert "Warning:" not in output and "Error:" not in output, output
    assert "verify_dataset_integrity Done" in output


# ------------------------------------------------------------------------------------------------------ CLIs


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_converter_has_a_cli_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--overwrite" in capsys.readouterr().out


def test_converter_runs_as_a_module_script():
    result = subprocess.run(
        [sys.executable, "-m", "nnunet_equiflex.dataset_conversion.synthetic_cardiac", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--num-train" in result.stdout


def test_cli_input_errors_are_messages_not_tracebacks(tmp_path, capsys):
    args = ["-o", str(tmp_path), "--num-train", "1", "--num-test", "0"]
    synthetic_cardiac.main(args)
    with pytest.raises(SystemExit) as exit_info:
        synthetic_cardiac.main(args)
    assert exit_info.value.code == 1
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    synthetic_cardiac.main(args + ["--overwrite"])
    with pytest.raises(SystemExit):
        spider.main(["-i", str(tmp_path), "-o", str(tmp_path)])
    assert "is not the SPIDER folder" in capsys.readouterr().err


def test_missing_nnunet_raw_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(ValueError, match="nnUNet_raw"):
        generate_synthetic_cardiac(None, num_train=1, num_test=0)


def test_nnunet_raw_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    folder = synthetic_cardiac.main(["--num-train", "2", "--num-test", "0", "-d", "950", "--name", "Env"])
    assert folder == tmp_path / "Dataset950_Env"
    assert dataset_json(folder)["numTraining"] == 2


def test_a_dataset_id_used_by_another_dataset_is_refused(tmp_path):
    (tmp_path / "Dataset900_Other" / "imagesTr").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="already used by Dataset900_Other"):
        generate_synthetic_cardiac(tmp_path, num_train=1, num_test=0)


# ------------------------------------------------------------------------------------------ synthetic cardiac


@pytest.fixture(scope="module")
def slices():
    return [synthesize_slice(case_rng(0, "train", i)) for i in range(100)]


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    return generate_synthetic_cardiac(raw, num_train=12, num_test=3, seed=0)


def test_synthetic_files_dataset_json_and_geometry(synthetic_dataset):
    folder = synthetic_dataset
    assert folder.name == "Dataset900_SyntheticCardiac"
    assert names(folder / "imagesTr") == [f"synth_{i:04d}_0000.nii.gz" for i in range(12)]
    assert names(folder / "labelsTr") == [f"synth_{i:04d}.nii.gz" for i in range(12)]
    assert names(folder / "imagesTs") == [f"synth_test_{i:04d}_0000.nii.gz" for i in range(3)]
    assert names(folder / "labelsTs") == [f"synth_test_{i:04d}.nii.gz" for i in range(3)]
    meta = dataset_json(folder)
    assert meta["channel_names"] == {"0": "cineMRI"}
    assert meta["labels"] == {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}  # Dataset027_ACDC's convention
    assert meta["numTraining"] == 12 and meta["file_ending"] == ".nii.gz"

    record = json.loads((folder / "generation.json").read_text())["cases"]
    for case in ("synth_0000", "synth_0007"):
        image, label = read(folder / "imagesTr" / f"{case}_0000.nii.gz"), read(folder / "labelsTr" / f"{case}.nii.gz")
        height, width = record[case]["shape"]
        assert image.GetSize() == (width, height, 1)  # a 2D slice as nnU-Net wants it: array (1, H, W)
        spacing = record[case]["pixel_spacing"]
        assert 1.25 <= spacing <= 1.6
        np.testing.assert_allclose(image.GetSpacing(), (spacing, spacing, record[case]["slice_thickness"]), rtol=1e-6)
        assert np.abs(image.GetOrigin()).max() > 1.0
        assert_same_geometry(label, image)
        assert sitk.GetArrayFromImage(label).dtype == np.uint8
        assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1, 2, 3}


def test_synthetic_files_equal_the_in_memory_generator(synthetic_dataset):
    # case i depends only on (seed, split, i): a bigger or smaller dataset keeps the same cases
    sample = synthesize_slice(case_rng(0, "test", 2))
    image = sitk.GetArrayFromImage(read(synthetic_dataset / "imagesTs" / "synth_test_0002_0000.nii.gz"))
    label = sitk.GetArrayFromImage(read(synthetic_dataset / "labelsTs" / "synth_test_0002.nii.gz"))
    np.testing.assert_array_equal(image[0], sample.image)
    np.testing.assert_array_equal(label[0], sample.label)


def test_synthetic_is_deterministic_by_seed(tmp_path):
    def arrays(folder):
        return [sitk.GetArrayFromImage(read(p)) for p in sorted((folder / "imagesTr").iterdir())] + [
            sitk.GetArrayFromImage(read(p)) for p in sorted((folder / "labelsTr").iterdir())
        ]

    first = arrays(generate_synthetic_cardiac(tmp_path / "a", num_train=4, num_test=0, seed=5))
    again = arrays(generate_synthetic_cardiac(tmp_path / "b", num_train=4, num_test=0, seed=5))
    other = arrays(generate_synthetic_cardiac(tmp_path / "c", num_train=4, num_test=0, seed=6))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not any(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(first, other))


def test_synthetic_anatomy_is_plausible(slices):
    for sample in slices:
        label = sample.label
        assert set(np.unique(label)) == {0, 1, 2, 3}
        # the myocardium closes around the LV cavity: no LV pixel touches background or RV (4-neighbourhood)
        around_lv = binary_dilation(label == 3) & (label != 3)
        assert np.all(label[around_lv] == 2)
        assert sample.image.dtype == np.int16 and sample.image.min() >= 0


def test_synthetic_varies_size_orientation_and_chirality(slices):
    shapes = {s.image.shape for s in slices}
    heights, widths = zip(*shapes)
    assert len(shapes) > 50 and min(heights + widths) >= 96 and max(heights + widths) <= 160
    assert {h % 2 for h in heights} == {0, 1} and {w % 2 for w in widths} == {0, 1}
    assert len({s.pixel_spacing for s in slices}) > 50

    rv_side = []
    for sample in slices:
        lv_centre = np.argwhere(sample.label == 3).mean(0)
        rv_centre = np.argwhere(sample.label == 1).mean(0)
        rv_side.append(np.sign(rv_centre[1] - lv_centre[1]))
        # The RV is drawn thick at one end and tapering at the other, so its angular profile around the LV is
        # skewed; the skew's sign is the configuration's handedness and flips exactly when the case is mirrored.
        assert _handedness(sample.label) == (1 if sample.mirrored else -1)
    assert set(rv_side) == {-1.0, 1.0}  # RV left of the LV in some images, right in others
    mirrored = sum(s.mirrored for s in slices)
    assert 25 <= mirrored <= 75  # both mirror-image configurations, in about equal numbers


def _handedness(label: np.ndarray) -> int:
    lv = np.argwhere(label == 3).mean(0)
    rv = np.argwhere(label == 1).astype(float) - lv
    axis = rv.mean(0) / np.linalg.norm(rv.mean(0))
    angle = np.arctan2(rv @ np.array([-axis[1], axis[0]]), rv @ axis)
    return int(np.sign(np.mean(angle**3)))


def test_hard_difficulty_keeps_the_geometry_with_thinner_structures_and_more_noise():
    standard = [synthesize_slice(case_rng(0, "train", i)) for i in range(30)]
    hard = [synthesize_slice(case_rng(0, "train", i), difficulty="hard") for i in range(30)]
    for a, b in zip(standard, hard):
        assert a.metadata() == b.metadata()  # size, spacing, rotation, mirroring: the same case
        assert set(np.unique(b.label)) == {0, 1, 2, 3}
        around_lv = binary_dilation(b.label == 3) & (b.label != 3)
        assert np.all(b.label[around_lv] == 2)  # still a closed myocardial ring

    def myocardium_to_cavity(samples):
        return np.mean([np.sum(s.label == 2) / np.sum(s.label == 3) for s in samples])

    def background_noise(samples):  # relative spread of the image far from the heart, after removing shading
        ratios = []
        for s in samples:
            corner = s.image[:16, :16].astype(float)
            ratios.append(np.std(corner - gaussian_filter(corner, 3)) / (np.mean(s.image[s.label == 3]) + 1e-6))
        return np.median(ratios)

    assert myocardium_to_cavity(hard) < 0.7 * myocardium_to_cavity(standard)
    assert background_noise(hard) > 1.5 * background_noise(standard)
    with pytest.raises(ValueError, match="unknown difficulty 'extreme'; choose one of standard, hard"):
        synthesize_slice(case_rng(0, "train", 0), difficulty="extreme")


def test_synthetic_overwrite_protection(tmp_path):
    generate_synthetic_cardiac(tmp_path, num_train=3, num_test=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_synthetic_cardiac(tmp_path, num_train=2, num_test=0)
    folder = generate_synthetic_cardiac(tmp_path, num_train=2, num_test=0, overwrite=True)
    assert len(names(folder / "imagesTr")) == 2  # stale cases of the first run are gone
    assert not (folder / "imagesTs").exists()


def test_synthetic_passes_nnunet_integrity_check(synthetic_dataset, capfd):
    verify_with_nnunet(synthetic_dataset, capfd)


# ------------------------------------------------------------------------------------------- synthetic volumes


def test_synthetic_volumes_are_3d_thick_slice_cases_with_every_label(tmp_path, capfd):
    from nnunet_equiflex.dataset_conversion.synthetic_volumes import generate_synthetic_volumes

    folder = generate_synthetic_volumes(tmp_path, num_train=4, num_test=1)
    assert folder.name == "Dataset905_SyntheticVolumes"
    assert names(folder / "imagesTr") == [f"vol_{i:04d}_0000.nii.gz" for i in range(4)]
    assert names(folder / "labelsTs") == ["vol_test_0000.nii.gz"]
    flipped = set()
    for case in ("vol_0000", "vol_0001", "vol_0002", "vol_0003"):
        image = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        assert image.GetSpacing() == (1.0, 1.0, 3.0) and label.GetOrigin() == image.GetOrigin()
        array = sitk.GetArrayFromImage(label)
        assert array.ndim == 3 and 16 <= array.shape[0] <= 20 and set(np.unique(array)) == {0, 1, 2, 3}
        # the chiral shell: its thick side tells which axes the case was mirrored along
        core = np.argwhere(array == 1).mean(0)
        shell = np.argwhere(array == 2).mean(0)
        flipped.add(tuple(np.sign(shell - core)[1:]))
    assert len(flipped) > 1  # mirrored and unmirrored cases both occur
    again = generate_synthetic_volumes(tmp_path / "again", num_train=2, num_test=0)
    for case in ("vol_0000", "vol_0001"):  # case i depends only on (seed, split, i)
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(again / "imagesTr" / f"{case}_0000.nii.gz")))
        assert np.array_equal(a, b)
    verify_with_nnunet(folder, capfd)


# ------------------------------------------------------------------------------------------------------- ACDC


def make_fake_acdc(root: Path, rng, train=("patient001", "patient002", "patient003"), test=("patient101",)) -> Path:
    for split, patients in (("training", train), ("testing", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for patient in patients:
            folder = root / split / patient
            for frame in ("frame01", "frame12"):
                write_volume(folder / f"{patient}_{frame}.nii.gz", random_volume(rng, (4, 12, 10)))
                write_volume(folder / f"{patient}_{frame}_gt.nii.gz", random_labels(rng, [0, 1, 2, 3], (4, 12, 10)))
            write_volume(folder / f"{patient}_4d.nii.gz", random_volume(rng, (4, 12, 10)))  # ignored by nnunetv2
            (folder / "Info.cfg").write_text("ED: 1\nES: 12\n")
    return root


def test_acdc_wraps_nnunets_converter_and_writes_patient_splits(tmp_path):
    source = make_fake_acdc(tmp_path / "ACDC" / "database", np.random.default_rng(0))
    previous = acdc.nnunet_acdc.nnUNet_raw
    folder = acdc.convert_acdc(source, nnunet_raw=tmp_path / "raw", nnunet_preprocessed=tmp_path / "pre")
    assert acdc.nnunet_acdc.nnUNet_raw is previous  # nnunetv2's module is left as it was

    assert folder == tmp_path / "raw" / "Dataset027_ACDC"
    cases = [f"patient00{p}_frame{f}" for p in (1, 2, 3) for f in ("01", "12")]
    assert names(folder / "imagesTr") == [f"{c}_0000.nii.gz" for c in cases]
    assert names(folder / "labelsTr") == [f"{c}.nii.gz" for c in cases]
    assert names(folder / "imagesTs") == ["patient101_frame01_0000.nii.gz", "patient101_frame12_0000.nii.gz"]
    meta = dataset_json(folder)
    assert meta["labels"] == {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}
    assert meta["channel_names"] == {"0": "cineMRI"} and meta["numTraining"] == 6 and meta["file_ending"] == ".nii.gz"
    source_label = read(source / "training" / "patient002" / "patient002_frame12_gt.nii.gz")
    written_label = read(folder / "labelsTr" / "patient002_frame12.nii.gz")
    assert_same_geometry(written_label, source_label)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written_label), sitk.GetArrayFromImage(source_label))

    splits = json.loads((tmp_path / "pre" / "Dataset027_ACDC" / "splits_final.json").read_text())
    assert len(splits) == 5
    for fold in splits:
        train_patients = {c[: len("patient000")] for c in fold["train"]}
        val_patients = {c[: len("patient000")] for c in fold["val"]}
        assert not train_patients & val_patients  # both frames of a patient stay on one side
        assert sorted(fold["train"] + fold["val"]) == cases
    assert sorted(c for fold in splits for c in fold["val"]) == cases


def test_acdc_overwrite_protection(tmp_path):
    source = make_fake_acdc(tmp_path / "database", np.random.default_rng(1), train=("patient001",), test=())
    kwargs = dict(nnunet_raw=tmp_path / "raw", nnunet_preprocessed=tmp_path / "pre")
    acdc.convert_acdc(source, **kwargs)
    with pytest.raises(FileExistsError, match="--overwrite"):
        acdc.convert_acdc(source, **kwargs)
    acdc.convert_acdc(source, overwrite=True, **kwargs)


def test_acdc_needs_a_place_for_the_split(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    source = make_fake_acdc(tmp_path / "database", np.random.default_rng(2), train=("patient001",), test=())
    with pytest.raises(ValueError, match="--no-split"):
        acdc.convert_acdc(source, nnunet_raw=tmp_path / "raw")
    folder = acdc.convert_acdc(source, nnunet_raw=tmp_path / "raw", write_split=False)
    assert dataset_json(folder)["numTraining"] == 2


def test_acdc_wrong_folders_are_explained(tmp_path):
    source = make_fake_acdc(tmp_path / "ACDC" / "database", np.random.default_rng(3), train=("patient001",), test=())
    with pytest.raises(FileNotFoundError, match="pass .*database instead"):
        acdc.validate_acdc_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="one split of ACDC"):
        acdc.validate_acdc_folder(source / "training")
    with pytest.raises(FileNotFoundError, match="single patient"):
        acdc.validate_acdc_folder(source / "training" / "patient001")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        acdc.validate_acdc_folder(tmp_path / "nowhere")
    (source / "testing").rmdir()
    with pytest.raises(FileNotFoundError, match="no testing folder.*create an empty 'testing' folder"):
        acdc.validate_acdc_folder(source)
    (source / "testing").mkdir()
    (source / "training" / "patient001" / "patient001_frame12_gt.nii.gz").unlink()
    with pytest.raises(ValueError, match="no _gt label for patient001_frame12"):
        acdc.validate_acdc_folder(source)
    write_volume(
        source / "training" / "patient001" / "patient001_frame12_gt.nii", random_volume(np.random.default_rng(0))
    )
    with pytest.raises(ValueError, match="gzip"):
        acdc.validate_acdc_folder(source)


# --------------------------------------------------------------------------------------------------- CrossMoDA


def test_crossmoda_2023_names_labels_geometry_and_hrt2(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "crossmoda2023"
    cases = ["crossmoda2023_etz_2", "crossmoda2023_ldn_1"]
    for case in cases:
        write_volume(root / "source_training" / f"{case}_ceT1.nii.gz", random_volume(rng))
        write_volume(
            root / "source_training" / f"{case}_Label.nii.gz", random_labels(rng, [0, 1, 2, 3], dtype=np.float32)
        )
    write_volume(root / "target_training" / "crossmoda2023_ldn_10_hrT2.nii.gz", random_volume(rng))

    folder = crossmoda.convert_crossmoda(root, nnunet_raw=tmp_path / "raw", hrt2_as_test=True)
    assert folder.name == "Dataset901_CrossMoDA"
    assert names(folder / "imagesTr") == [f"{c}_0000.nii.gz" for c in cases]
    assert names(folder / "imagesTs") == ["crossmoda2023_ldn_10_0000.nii.gz"]
    meta = dataset_json(folder)
    assert meta["labels"] == {"background": 0, "VS_intrameatal": 1, "VS_extrameatal": 2, "cochlea": 3}
    assert meta["channel_names"] == {"0": "ceT1"} and meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    for case in cases:
        source_image = root / "source_training" / f"{case}_ceT1.nii.gz"
        assert (folder / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == source_image.read_bytes()
        source_label = read(root / "source_training" / f"{case}_Label.nii.gz")
        label = read(folder / "labelsTr" / f"{case}.nii.gz")
        assert_same_geometry(label, read(source_image))
        assert label.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(source_label))


def test_crossmoda_2021_names_use_the_two_class_labels(tmp_path):
    rng = np.random.default_rng(1)
    for i in (1, 2, 3):
        write_volume(tmp_path / "src" / f"crossmoda_{i}_ceT1.nii.gz", random_volume(rng))
        write_volume(tmp_path / "src" / f"crossmoda_{i}_Label.nii.gz", random_labels(rng, [0, 1, 2]))
    folder = crossmoda.convert_crossmoda(tmp_path / "src", nnunet_raw=tmp_path / "raw")
    assert dataset_json(folder)["labels"] == {"background": 0, "VS": 1, "cochlea": 2}
    assert names(folder / "labelsTr") == ["crossmoda_1.nii.gz", "crossmoda_2.nii.gz", "crossmoda_3.nii.gz"]
    assert not (folder / "imagesTs").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        crossmoda.convert_crossmoda(tmp_path / "src", nnunet_raw=tmp_path / "raw")


def test_crossmoda_bad_inputs(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    write_volume(src / "crossmoda_1_ceT1.nii.gz", random_volume(rng))
    write_volume(src / "crossmoda_1_Label.nii.gz", random_labels(rng, [0, 1, 3]))  # 3 is not a 2021 label
    with pytest.raises(ValueError, match=r"label values \[3\]"):
        crossmoda.convert_crossmoda(src, nnunet_raw=tmp_path / "raw1")
    write_volume(src / "crossmoda_2_ceT1.nii.gz", random_volume(rng))
    with pytest.raises(ValueError, match=r"ceT1 without _Label: \['crossmoda_2'\]"):
        crossmoda.find_crossmoda_files(src)
    write_volume(src / "crossmoda_2_Label.nii.gz", random_labels(rng, [0, 1]), spacing=(0.5, 0.45, 1.5))
    write_volume(src / "crossmoda_1_Label.nii.gz", random_labels(rng, [0, 1]))
    with pytest.raises(ValueError, match="not on the same grid"):
        crossmoda.convert_crossmoda(src, nnunet_raw=tmp_path / "raw2")
    write_volume(src / "crossmoda2023_ldn_5_ceT1.nii.gz", random_volume(rng))
    write_volume(src / "crossmoda2023_ldn_5_Label.nii.gz", random_labels(rng, [0, 1]))
    with pytest.raises(ValueError, match="mixes CrossMoDA editions"):
        crossmoda.find_crossmoda_files(src)
    with pytest.raises(FileNotFoundError, match="no CrossMoDA ceT1"):
        crossmoda.find_crossmoda_files(tmp_path / "raw2")


# ------------------------------------------------------------------------------------------------------ SPIDER

SPIDER_VALUES = [0, 1, 2, 3, 100, 201, 202]


def make_fake_spider(root: Path, rng) -> Path:
    for study, sequence in ((1, "t1"), (1, "t2"), (2, "t2"), (12, "t2"), (3, "t2_SPACE")):
        spacing = (3.3, 0.6875, 0.6875)  # sagittal: thick slices along x
        write_volume(root / "images" / f"{study}_{sequence}.mha", random_volume(rng), spacing=spacing)
        write_volume(root / "masks" / f"{study}_{sequence}.mha", random_labels(rng, SPIDER_VALUES), spacing=spacing)
    return root


def test_spider_reduced_labels_and_geometry(tmp_path):
    root = make_fake_spider(tmp_path / "SPIDER", np.random.default_rng(0))
    folder = spider.convert_spider(root, nnunet_raw=tmp_path / "raw")
    assert folder.name == "Dataset902_SPIDER"
    assert names(folder / "imagesTr") == ["spider_001_0000.nii.gz", "spider_002_0000.nii.gz", "spider_012_0000.nii.gz"]
    meta = dataset_json(folder)
    assert meta["labels"] == {"background": 0, "vertebra": 1, "spinal_canal": 2, "disc": 3}
    assert meta["channel_names"] == {"0": "t2"} and meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"

    source_image, source_mask = read(root / "images" / "2_t2.mha"), read(root / "masks" / "2_t2.mha")
    image, label = read(folder / "imagesTr" / "spider_002_0000.nii.gz"), read(folder / "labelsTr" / "spider_002.nii.gz")
    assert_same_geometry(image, source_image)
    assert_same_geometry(label, source_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source_image))
    values = sitk.GetArrayFromImage(source_mask)
    expected = np.select([values == 0, values < 100, values == 100], [0, 1, 2], default=3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected)
    assert label.GetPixelID() == sitk.sitkUInt8


def test_spider_full_labels_and_sequence_choice(tmp_path):
    root = make_fake_spider(tmp_path / "SPIDER", np.random.default_rng(1))
    folder = spider.convert_spider(root, nnunet_raw=tmp_path / "raw", sequence="t2_SPACE", label_scheme="full")
    assert names(folder / "labelsTr") == ["spider_003.nii.gz"]  # t2 and t2_SPACE are told apart
    meta = dataset_json(folder)
    assert len(meta["labels"]) == 52 and meta["labels"]["spinal_canal"] == 26 and meta["labels"]["disc_2"] == 28
    assert sorted(meta["labels"].values()) == list(range(52))
    written = set(np.unique(sitk.GetArrayFromImage(read(folder / "labelsTr" / "spider_003.nii.gz"))))
    assert written == {0, 1, 2, 3, 26, 27, 28}


def test_spider_bad_inputs(tmp_path):
    root = make_fake_spider(tmp_path / "SPIDER", np.random.default_rng(2))
    with pytest.raises(FileNotFoundError, match="pass .*SPIDER instead"):
        spider.find_spider_cases(tmp_path)
    with pytest.raises(ValueError, match="unknown SPIDER sequence"):
        spider.find_spider_cases(root, "flair")
    (root / "masks" / "12_t2.mha").unlink()
    with pytest.raises(FileNotFoundError, match="12_t2.mha"):
        spider.find_spider_cases(root)
    unknown = random_labels(np.random.default_rng(0), [0, 1, 50])
    write_volume(root / "masks" / "12_t2.mha", unknown, spacing=(3.3, 0.6875, 0.6875))
    with pytest.raises(ValueError, match=r"label values \[50\]"):
        spider.convert_spider(root, nnunet_raw=tmp_path / "raw")


# -------------------------------------------------------------------------------------------------------- AMOS

AMOS_ORGANS = [
    "spleen",
    "right kidney",
    "left kidney",
    "gall bladder",
    "esophagus",
    "liver",
    "stomach",
    "arota",
    "postcava",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
    "duodenum",
    "bladder",
    "prostate/uterus",
]


def make_fake_amos(root: Path, rng) -> Path:
    layout = {"imagesTr": [1, 507, 508], "imagesVa": [2, 520], "imagesTs": [3, 600]}
    for images_dir, numbers in layout.items():
        for number in numbers:
            write_volume(root / images_dir / f"amos_{number:04d}.nii.gz", random_volume(rng))
            if images_dir != "imagesTs":
                labels_dir = images_dir.replace("images", "labels")
                write_volume(root / labels_dir / f"amos_{number:04d}.nii.gz", random_labels(rng, [0, 1, 6, 13, 15]))
    labels = {"0": "background"} | {str(i): organ for i, organ in enumerate(AMOS_ORGANS, start=1)}
    (root / "dataset.json").write_text(json.dumps({"name": "AMOS", "labels": labels, "modality": {"0": "CT"}}))
    return root


@pytest.fixture(scope="module")
def amos_dataset(tmp_path_factory):
    root = make_fake_amos(tmp_path_factory.mktemp("amos") / "amos22", np.random.default_rng(0))
    return root, amos_mr.convert_amos_mr(root, nnunet_raw=root.parent / "raw")


def test_amos_keeps_mr_cases_and_organ_labels(amos_dataset):
    root, folder = amos_dataset
    assert folder.name == "Dataset903_AMOS_MR"
    assert names(folder / "imagesTr") == ["amos_0507_0000.nii.gz", "amos_0508_0000.nii.gz", "amos_0520_0000.nii.gz"]
    assert names(folder / "imagesTs") == ["amos_0600_0000.nii.gz"]
    meta = dataset_json(folder)
    assert meta["labels"] == {"background": 0} | {organ: i for i, organ in enumerate(AMOS_ORGANS, start=1)}
    assert meta["channel_names"] == {"0": "MRI"} and meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    source = read(root / "labelsVa" / "amos_0520.nii.gz")
    label = read(folder / "labelsTr" / "amos_0520.nii.gz")
    assert_same_geometry(label, read(root / "imagesVa" / "amos_0520.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(source))
    assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1, 6, 13, 15}


def test_amos_passes_nnunet_integrity_check(amos_dataset, capfd):
    verify_with_nnunet(amos_dataset[1], capfd)


def test_amos_options_and_bad_inputs(tmp_path):
    root = make_fake_amos(tmp_path / "amos22", np.random.default_rng(1))
    folder = amos_mr.convert_amos_mr(root, nnunet_raw=tmp_path / "raw", include_validation=False, include_test=False)
    assert dataset_json(folder)["numTraining"] == 2 and not (folder / "imagesTs").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        amos_mr.convert_amos_mr(root, nnunet_raw=tmp_path / "raw")

    with pytest.raises(FileNotFoundError, match="pass .*amos22 instead"):
        amos_mr.find_amos_mr(tmp_path)
    (root / "labelsTr" / "amos_0508.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="amos_0508"):
        amos_mr.find_amos_mr(root)
    for folder_name in ("imagesTr", "labelsTr", "imagesVa", "labelsVa"):
        for path in (root / folder_name).glob("amos_05*"):
            path.unlink()
    with pytest.raises(FileNotFoundError, match="no MR scans"):
        amos_mr.find_amos_mr(root)


# --------------------------------------------------------------------------------------------- images folder


def make_fake_images(root: Path, rng) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
    tifffile.imwrite(root / "images" / "c.tif", rng.integers(0, 256, (16, 20, 3), dtype=np.uint8))
    palette = Image.frombytes("P", (20, 16), random_labels(rng, [0, 1, 2], (16, 20), np.uint8).tobytes())
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # shown red/green, stored as indices 1, 2
    palette.save(root / "masks" / "a.png")
    Image.fromarray(random_labels(rng, [0, 1], (16, 20), np.uint8)).save(root / "masks" / "b.png")
    tifffile.imwrite(root / "masks" / "c.tif", random_labels(rng, [0, 2], (16, 20), np.uint16))
    (root / "images" / "notes.txt").write_text("ignored")
    return root


def test_images_folder_rgb_labels_and_geometry(tmp_path):
    root = make_fake_images(tmp_path / "src", np.random.default_rng(0))
    folder = images_folder.main(
        ["-i", str(root), "-o", str(tmp_path / "raw"), "-d", "910", "--name", "Toy", "--pixel-spacing", "0.5", "0.25"]
    )
    assert folder.name == "Dataset910_Toy"
    assert names(folder / "imagesTr") == [f"{s}_{c:04d}.nii.gz" for s in "abc" for c in range(3)]
    assert names(folder / "labelsTr") == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    meta = dataset_json(folder)
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert meta["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"

    rgb = np.asarray(Image.open(root / "images" / "a.png"))
    for channel in range(3):
        image = read(folder / "imagesTr" / f"a_{channel:04d}.nii.gz")
        assert image.GetSize() == (20, 16, 1)
        assert image.GetSpacing() == (0.25, 0.5, 999.0)  # (column, row, z) in SimpleITK order
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[0], rgb[..., channel])
    label = read(folder / "labelsTr" / "a.nii.gz")
    assert_same_geometry(label, read(folder / "imagesTr" / "a_0000.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label)[0], np.asarray(Image.open(root / "masks" / "a.png")))
    assert set(np.unique(sitk.GetArrayFromImage(read(folder / "labelsTr" / "c.nii.gz")))) == {0, 2}


def test_images_folder_grayscale_binary_suffix_and_test_images(tmp_path):
    rng = np.random.default_rng(1)
    for sub in ("images", "masks", "test"):
        (tmp_path / sub).mkdir()
    for stem in ("x1", "x2"):
        Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        mask = random_labels(rng, [0, 255], (12, 9), np.uint8)
        Image.fromarray(mask).save(tmp_path / "masks" / f"{stem}_mask.png")
    Image.fromarray(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)).save(tmp_path / "test" / "t1.png")
    kwargs = dict(dataset_id=911, name="Gray", nnunet_raw=tmp_path / "raw", mask_suffix="_mask", grayscale=True)
    with pytest.raises(ValueError, match="--mask-mode binary"):
        images_folder.convert_images_folder(tmp_path / "images", tmp_path / "masks", **kwargs)
    assert not (tmp_path / "raw").exists()  # nothing is written before the input checks pass

    folder = images_folder.convert_images_folder(
        tmp_path / "images",
        tmp_path / "masks",
        mask_mode="binary",
        label_names=["foreground"],
        test_images_dir=tmp_path / "test",
        **kwargs,
    )
    assert names(folder / "imagesTr") == ["x1_0000.nii.gz", "x2_0000.nii.gz"]
    assert names(folder / "imagesTs") == ["t1_0000.nii.gz"]
    meta = dataset_json(folder)
    assert meta["channel_names"] == {"0": "gray"} and meta["labels"] == {"background": 0, "foreground": 1}
    rgb = np.asarray(Image.open(tmp_path / "images" / "x1.png")).astype(np.float32)
    gray = sitk.GetArrayFromImage(read(folder / "imagesTr" / "x1_0000.nii.gz"))[0]
    np.testing.assert_allclose(gray, rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32), rtol=1e-6)
    label = sitk.GetArrayFromImage(read(folder / "labelsTr" / "x1.nii.gz"))[0]
    np.testing.assert_array_equal(label, np.asarray(Image.open(tmp_path / "masks" / "x1_mask.png")) > 0)


def test_images_folder_bad_inputs(tmp_path):
    rng = np.random.default_rng(2)
    root = make_fake_images(tmp_path / "src", rng)
    convert = lambda **kw: images_folder.convert_images_folder(  # noqa: E731
        root / "images", root / "masks", dataset_id=912, name="Bad", nnunet_raw=tmp_path / "raw", **kw
    )

    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(root / "images" / "lonely.png")
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(root / "masks" / "orphan.png")
    with pytest.raises(ValueError, match="Images without a mask: lonely.*masks without an image: orphan"):
        convert()
    (root / "images" / "lonely.png").unlink()
    (root / "masks" / "orphan.png").unlink()

    tifffile.imwrite(root / "masks" / "c.tif", np.full((16, 20), 0.5, np.float32))
    with pytest.raises(ValueError, match="non-integer values"):
        convert()
    tifffile.imwrite(root / "masks" / "c.tif", np.zeros((15, 20), np.uint8))
    with pytest.raises(ValueError, match="size mismatch for case 'c'.*16x20.*15x20"):
        convert()
    tifffile.imwrite(root / "masks" / "c.tif", np.zeros((16, 20), np.uint8))

    Image.fromarray(rng.integers(0, 256, (16, 20), dtype=np.uint8)).save(root / "images" / "b.png")
    with pytest.raises(ValueError, match="different numbers of channels.*--grayscale"):
        convert()
    folder = convert(grayscale=True)
    assert dataset_json(folder)["channel_names"] == {"0": "gray"}
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(grayscale=True)
