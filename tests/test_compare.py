"""The comparison tool on short real trainings, and the main job end to end (``--quick``)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nnunet_equiflex.compare import CompareError, compare

pytestmark = pytest.mark.slow

EQUIFLEX = "EquiFlexTrainerTiny_smoke__EquiFlexPlans__2d"
CNN = "nnUNetTrainer_equiflexSmoke__nnUNetPlans__2d"
ROWS = ("EquiFlex (1 pass)", "nnU-Net CNN + TTA (4 passes)", "nnU-Net CNN (1 pass)")


@pytest.fixture(scope="module")
def comparison(trained_toy, trained_toy_cnn):
    from nnunet_env import run

    raw = trained_toy["raw"]
    out = trained_toy["root"] / "compare"
    args = ["nnunet-equiflex", "compare", "-d", "901", "-r", EQUIFLEX, CNN]
    args += ["-i", str(raw / "imagesTs"), "-l", str(raw / "labelsTs"), "-o", str(out)]
    printed = run(args, trained_toy["env"], trained_toy["logs"] / "compare.txt")
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    return dict(out=out, printed=printed, rows=rows, args=args)


@pytest.fixture
def nnunet_paths(trained_toy, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, trained_toy["env"][key])
    return trained_toy


def test_table_has_every_row(comparison):
    assert set(comparison["rows"]) == set(ROWS)
    table = (comparison["out"] / "results.md").read_text()
    for method in ROWS:
        assert f"| {method} |" in table
        assert f"| {method} |" in comparison["printed"]  # the CLI prints the table
    with open(comparison["out"] / "results.csv") as handle:
        assert sorted(r["method"] for r in csv.DictReader(handle)) == sorted(ROWS)
    for name in ("dice.png", "overlays.png"):
        assert (comparison["out"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dice_equals_nnunet_evaluation_of_the_written_predictions(comparison, trained_toy, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    labels = trained_toy["raw"] / "labelsTs"
    for method, row in comparison["rows"].items():
        (pred_dir,) = row["prediction_dirs"]  # one fold
        summary = tmp_path / f"{method.replace(' ', '_')}.json"
        compute_metrics_on_folder_simple(str(labels), pred_dir, [1, 2], str(summary), num_processes=1)
        metrics = json.loads(summary.read_text())
        assert row["dice_mean"] == pytest.approx(metrics["foreground_mean"]["Dice"], abs=1e-12), method
        assert row["dice_per_class"]["disk"] == pytest.approx(metrics["mean"]["1"]["Dice"], abs=1e-12)
        assert row["dice_per_class"]["square"] == pytest.approx(metrics["mean"]["2"]["Dice"], abs=1e-12)
        assert row["dice_std"] == 0.0 and row["folds"] == [0]
        assert 0.5 < row["dice_mean"] <= 1.0  # a short training, but a real one
        per_case = {Path(c["reference_file"]).name: c["metrics"] for c in metrics["metric_per_case"]}
        assert set(row["dice_per_case"]) == {f"fold_0/{name}" for name in per_case}
        for name, case in per_case.items():
            expected = np.nanmean([case["1"]["Dice"], case["2"]["Dice"]])
            assert row["dice_per_case"][f"fold_0/{name}"] == pytest.approx(expected, abs=1e-12), (method, name)


def test_cost_columns(comparison):
    rows = comparison["rows"]
    equiflex, tta, single = (rows[m] for m in ROWS)
    for row in rows.values():
        assert row["params"] > 0 and row["gflops_per_pass"] > 0 and row["seconds_per_case"] > 0
    assert tta["params"] == single["params"]
    assert (tta["passes"], single["passes"], equiflex["passes"]) == (4, 1, 1)
    assert tta["gflops_per_tile"] == pytest.approx(4 * single["gflops_per_tile"])
    assert equiflex["gflops_per_tile"] < tta["gflops_per_tile"]


def test_flip_consistency_ordering(comparison):
    rows = comparison["rows"]
    equiflex, tta, single = (rows[m] for m in ROWS)
    # nnU-Net's predictor runs the mirror-symmetric window for EquiFlex (nnunet_patch): every flipped case is
    # exactly the flipped prediction. The CNN goes through nnU-Net's own window: without TTA it is not consistent.
    assert equiflex["flip_consistency"] == 1.0
    done, total = equiflex["flip_consistent_cases"].split("/")
    assert done == total and int(total) > 0
    assert single["flip_consistency"] < 1.0
    assert tta["flip_consistency"] >= single["flip_consistency"]
    exact = {m: int(r["flip_consistent_cases"].split("/")[0]) for m, r in rows.items()}
    assert exact[ROWS[1]] >= exact[ROWS[2]]


def test_switched_off_row_reports_nnunets_window(nnunet_paths, monkeypatch, tmp_path):
    """With EQUIFLEX_SYMMETRIC_PREDICTOR=0 the EquiFlex row says so, and measures nnU-Net's own window."""
    from nnunet_equiflex.nnunet_patch import SWITCH_ENV

    monkeypatch.setenv(SWITCH_ENV, "0")
    raw = nnunet_paths["raw"]
    test_set = dict(test_images=raw / "imagesTs", test_labels=raw / "labelsTs")
    (row,) = compare(901, [EQUIFLEX], tmp_path / "out", **test_set, log=lambda _: None)
    assert row.method == "EquiFlex (1 pass, nnU-Net's window)"
    assert row.flip_consistency < 1.0  # odd padding differences and float16 sums, as without our patch


def test_refuses_to_overwrite_earlier_output(comparison, trained_toy):
    from nnunet_env import BIN

    done = subprocess.run(
        [str(BIN / comparison["args"][0]), *comparison["args"][1:]],
        env=trained_toy["env"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "--overwrite" in done.stderr and "results.md" in done.stderr


def test_missing_fold(nnunet_paths, tmp_path):
    # fold 1 is there too when tests/test_nnunet_integration.py ran first in the same session
    with pytest.raises(CompareError, match=r"fold\(s\) \[3\] missing .*available folds: \[0(, 1)?\]"):
        compare(901, [EQUIFLEX], tmp_path / "out", folds=[3])


def test_missing_results_folder(nnunet_paths, tmp_path):
    spec = "EquiFlexTrainerTiny_smoke__NoSuchPlans__2d"
    expected = Path(nnunet_paths["env"]["nnUNet_results"]) / "Dataset901_Toy" / spec
    with pytest.raises(
        CompareError, match="nnUNetv2_train 901 2d FOLD -tr EquiFlexTrainerTiny_smoke -p NoSuchPlans"
    ) as e:
        compare(901, [EQUIFLEX, spec], tmp_path / "out")
    assert str(expected) in str(e.value)


def test_test_folder_not_in_raw_format(nnunet_paths, tmp_path):
    labels = nnunet_paths["raw"] / "labelsTs"
    with pytest.raises(CompareError, match="not in nnU-Net raw format: no files named CASE_0000.nii.gz"):
        compare(901, [EQUIFLEX], tmp_path / "out", test_images=labels, test_labels=labels)
    assert not (tmp_path / "out").exists()


def test_dataset_not_found(nnunet_paths, tmp_path):
    with pytest.raises(CompareError, match="dataset 977 not found"):
        compare(977, [EQUIFLEX], tmp_path / "out")


def test_main_job_quick(tmp_path):
    """What CI runs: the whole main job (synthetic data, planning, two trainings, compare) in --quick mode."""
    from nnunet_env import BIN

    work = tmp_path / "demo"
    done = subprocess.run(
        [str(BIN / "nnunet-equiflex"), "main", str(work), "--quick"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for method in ROWS:
        assert f"| {method} |" in done.stdout
        assert f"| {method} |" in (work / "compare" / "results.md").read_text()
    # a rerun resumes: every step is skipped and the table is printed again
    again = subprocess.run(
        [str(BIN / "nnunet-equiflex"), "main", str(work), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and again.stdout.count("done in an earlier run, skipped") == 6
    assert f"| {ROWS[0]} |" in again.stdout
    # a different run in the same folder is refused
    other = subprocess.run([str(BIN / "nnunet-equiflex"), "main", str(work)], capture_output=True, text=True)
    assert other.returncode == 2 and "holds a different run" in other.stderr and "--overwrite" in other.stderr
