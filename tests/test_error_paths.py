"""Error paths of `nnunet-equiflex compare` and `nnunet-equiflex plan`: each stops with the problem and the fix.

The comparison's checks run before any model is loaded, so a results folder with empty checkpoint files and a
raw folder with a few empty image files are enough to reach each of them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nnunet_equiflex.cli import main
from nnunet_equiflex.compare import CompareError, compare

DATASET = "Dataset950_Errors"
EQUIFLEX = "EquiFlexTrainerTiny_smoke__EquiFlexPlans__2d"
CNN = "nnUNetTrainer_equiflexSmoke__nnUNetPlans__2d"


@pytest.fixture
def results(tmp_path, monkeypatch):
    """nnU-Net folders with result folders for EQUIFLEX (folds 0, 1) and CNN (fold 2) of a 2-channel dataset."""
    for key in ("raw", "preprocessed", "results"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(f"nnUNet_{key}", str(tmp_path / key))
    monkeypatch.setenv("nnUNet_extTrainer", "")  # compare adds ours; monkeypatch restores the variable
    dataset_json = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "a": 1},
        "file_ending": ".nii.gz",
    }
    for spec, folds in ((EQUIFLEX, (0, 1)), (CNN, (2,))):
        folder = tmp_path / "results" / DATASET / spec
        for fold in folds:
            (folder / f"fold_{fold}").mkdir(parents=True)
            (folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir()
    labels.mkdir()
    for case in ("case_a", "case_b"):
        for channel in (0, 1):
            (images / f"{case}_{channel:04d}.nii.gz").write_bytes(b"")
        (labels / f"{case}.nii.gz").write_bytes(b"")
    return tmp_path


def test_test_images_without_labels_through_the_cli(results, capsys):
    code = main(["compare", "-d", DATASET, "-r", EQUIFLEX, "-i", str(results / "imagesTs"), "-o", str(results / "o")])
    assert code == 2
    assert "error: give both --test-images and --test-labels, or neither" in capsys.readouterr().err
    assert not (results / "o").exists()


@pytest.mark.parametrize(
    "spec", ["EquiFlexTrainer__2d", "EquiFlexTrainer__EquiFlexPlans__2d__x", "__EquiFlexPlans__2d"]
)
def test_malformed_result_spec(results, spec, tmp_path):
    with pytest.raises(CompareError, match=rf"result spec '{spec}' is not TRAINER__PLANS__CONFIGURATION \(e\.g\. "):
        compare(DATASET, [spec], tmp_path / "out")


def test_no_fold_shared_by_the_results(results, tmp_path):
    message = rf"no fold with checkpoint_final.pth is shared by all results \({EQUIFLEX}: \[0, 1\]; {CNN}: \[2\]\)"
    with pytest.raises(CompareError, match=message):
        compare(DATASET, [EQUIFLEX, CNN], tmp_path / "out", folds=None)
    (results / "results" / DATASET / CNN / "fold_2" / "checkpoint_final.pth").unlink()
    with pytest.raises(CompareError, match=rf"{CNN}: none\)"):
        compare(DATASET, [EQUIFLEX, CNN], tmp_path / "out")


def test_cross_validation_without_splits(results, tmp_path):
    with pytest.raises(CompareError, match=r"no test folder given and no .*splits_final.json for the cross-validation"):
        compare(DATASET, [EQUIFLEX], tmp_path / "out")


def test_missing_channel_file(results, tmp_path):
    (results / "imagesTs" / "case_b_0001.nii.gz").unlink()
    with pytest.raises(
        CompareError, match=r"case case_b in .*imagesTs lacks channel file\(s\) \['case_b_0001.nii.gz'\]"
    ):
        compare(
            DATASET, [EQUIFLEX], tmp_path / "out", test_images=results / "imagesTs", test_labels=results / "labelsTs"
        )
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are complete


def test_missing_label_files(results, tmp_path):
    images = results / "imagesTs"
    (results / "labelsTs" / "case_a.nii.gz").unlink()
    with pytest.raises(CompareError, match=r"labelsTs has no ground truth for 1 case\(s\), e.g. case_a.nii.gz"):
        compare(DATASET, [EQUIFLEX], tmp_path / "out", test_images=images, test_labels=results / "labelsTs")
    with pytest.raises(CompareError, match=r"ground-truth labels folder .*nowhere does not exist"):
        compare(DATASET, [EQUIFLEX], tmp_path / "out", test_images=images, test_labels=results / "nowhere")


def test_results_variable_unset(results, monkeypatch, tmp_path):
    monkeypatch.delenv("nnUNet_results")
    with pytest.raises(CompareError, match="nnUNet_results is not set; export it"):
        compare(DATASET, [EQUIFLEX], tmp_path / "out")


def test_plan_without_fingerprint(results, monkeypatch, capsys):
    assert main(["plan", "-d", DATASET]) == 2
    err = capsys.readouterr().err
    assert f"no dataset fingerprint in {results / 'preprocessed' / DATASET}" in err
    assert f"run `nnUNetv2_plan_and_preprocess -d {DATASET} -c 2d`" in err
    monkeypatch.delenv("nnUNet_preprocessed")
    assert main(["plan", "-d", DATASET]) == 2
    assert "nnUNet_preprocessed is not set; export it" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_refuses_to_replace_different_plans(trained_toy):
    """The toy's EquiFlexPlans were planned with --preset tiny; planning vit_s8 under that name needs --overwrite."""
    from nnunet_env import BIN

    plans_file = Path(trained_toy["env"]["nnUNet_preprocessed"]) / trained_toy["raw"].name / "EquiFlexPlans.json"
    before = plans_file.read_text()
    done = subprocess.run(
        [str(BIN / "nnunet-equiflex"), "plan", "-d", "901", "--preset", "vit_s8"],
        env=trained_toy["env"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{plans_file} exists with different content; pass --overwrite to replace it" in done.stderr
    assert "Traceback" not in done.stderr
    assert plans_file.read_text() == before
