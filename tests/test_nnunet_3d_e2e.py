"""3d_fullres end to end through nnU-Net's console commands, on the embedded 3D demo data (synthetic_volumes):
plan and preprocess, `nnunet-equiflex plan -c 3d_fullres`, `nnUNetv2_train` of tiny3d and of nnU-Net's CNN on
the same short budget, `nnUNetv2_predict` (NIfTI out with the input's geometry), and `nnunet-equiflex compare`:
Dice, the CNN with its 8-pass TTA and without, flip consistency over all 7 non-identity flips of a volume."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_env import nnunet_env, run

pytestmark = pytest.mark.slow

DATASET = "905"
EQUIFLEX = "EquiFlexTrainerTiny3D_smoke"
CNN = "nnUNetTrainer_budget"


@pytest.fixture(scope="module")
def trained_3d(tmp_path_factory):
    from nnunet_equiflex.dataset_conversion.synthetic_volumes import generate_synthetic_volumes

    root = tmp_path_factory.mktemp("e2e3d")
    env = nnunet_env(root)
    env["EQUIFLEX_BUDGET"] = "2,10,2"  # the CNN: 2 epochs x 10 iterations
    raw = generate_synthetic_volumes(env["nnUNet_raw"], num_train=6, num_test=2)
    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "3d_fullres", "-np", "1"], env)
    run(["nnunet-equiflex", "plan", "-d", DATASET, "-c", "3d_fullres", "--preset", "tiny3d"], env)
    for trainer, plans in ((EQUIFLEX, "EquiFlexPlans"), (CNN, "nnUNetPlans")):
        run(["nnUNetv2_train", DATASET, "3d_fullres", "0", "-tr", trainer, "-p", plans, "-device", "cpu"], env)
    return {"root": root, "env": env, "raw": raw}


def test_equiflex_trains_and_predicts_3d_fullres_niftis_with_the_input_geometry(trained_3d):
    env, raw = trained_3d["env"], trained_3d["raw"]
    out = trained_3d["root"] / "predicted"
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", DATASET, "-c", "3d_fullres",
         "-tr", EQUIFLEX, "-p", "EquiFlexPlans", "-f", "0", "-device", "cpu"], env)  # fmt: skip
    for case in ("vol_test_0000", "vol_test_0001"):
        image = sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000.nii.gz"))
        seg = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert seg.GetSize() == image.GetSize() and seg.GetSpacing() == image.GetSpacing()
        assert seg.GetOrigin() == image.GetOrigin() and seg.GetDirection() == image.GetDirection()
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2, 3}
    checkpoint = (
        trained_3d["root"] / "results" / "Dataset905_SyntheticVolumes" / f"{EQUIFLEX}__EquiFlexPlans__3d_fullres"
    )
    plans = json.loads((checkpoint / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["patch_size"] == [2, 4, 4]


def test_compare_in_3d_checks_all_7_flips_against_the_cnn_with_8_pass_tta(trained_3d):
    env, raw = trained_3d["env"], trained_3d["raw"]
    out = trained_3d["root"] / "compare"
    specs = [f"{EQUIFLEX}__EquiFlexPlans__3d_fullres", f"{CNN}__nnUNetPlans__3d_fullres"]
    run(["nnunet-equiflex", "compare", "-d", DATASET, "-r", *specs, "-f", "0", "-i", str(raw / "imagesTs"),
         "-l", str(raw / "labelsTs"), "-o", str(out), "--device", "cpu"], env)  # fmt: skip
    rows = {r["method"].split(" [")[0]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    equiflex, tta, single = (
        rows["EquiFlex (1 pass)"],
        rows["nnU-Net CNN + TTA (8 passes)"],
        rows["nnU-Net CNN (1 pass)"],
    )
    assert equiflex["passes"] == 1 and tta["passes"] == 8 and single["passes"] == 1
    assert equiflex["flip_consistent_cases"] == "14/14" and equiflex["flip_consistency"] == 1.0  # 2 cases x 7 flips
    assert single["flip_consistent_cases"].endswith("/14") and tta["flip_consistent_cases"].endswith("/14")
    assert tta["gflops_per_tile"] == pytest.approx(8 * single["gflops_per_tile"])
    for row in (equiflex, tta, single):
        assert set(row["dice_per_class"]) == {"core", "shell", "tube"} and 0.0 <= row["dice_mean"] <= 1.0
