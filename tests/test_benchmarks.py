"""The benchmark scripts still run and print their ratio tables (smallest settings; nothing timed
is asserted: benchmarks report, tests only check that they work)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, script, *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_attention_benchmark_runs_and_checks_its_layouts():
    out = run_benchmark("bench_attention.py", "--quick", "--grids", "8", "--radii", "1", "--repeats", "1")
    assert "## grid 8x8 (+CLS = 65 tokens), radius 1" in out
    for row in ("sdpa, dense bool mask (baseline)", "flex row-major, block 16", "flex tile4, block 16"):
        assert row in out
    assert "reordered vs row-major flex, max abs diff" in out
    assert "WARNING: a reordered layout differs" not in out
    assert "Target at 64x64: not measured in this run" in out
    assert "window (linear cost)" in out and "## forward+backward, grid 8x8 (+CLS = 65 tokens), radius 1" in out
    assert "Target at 40x40 (forward+backward): not measured in this run" in out


def test_attention_benchmark_runs_in_3d_and_names_the_fastest_layout():
    out = run_benchmark("bench_attention.py", "--3d", "--quick", "--grids", "4x6x6", "--radii", "1", "--repeats", "1")
    assert "## grid 4x6x6 (+CLS = 145 tokens), radius 1 (3x3x3)" in out
    for row in ("flex row-major, block 16", "flex tile2, block 8", "flex tile4, block 64", "window (linear cost)"):
        assert row in out
    assert "reordered vs row-major flex, max abs diff" in out and "WARNING: a reordered layout differs" not in out
    assert "flex_token_layout='auto' in 3D on cpu: r=1: row (row-major: blocks of 16)" in out
    assert "## forward+backward, grid 4x6x6 (+CLS = 145 tokens), radius 1" in out


def test_network_benchmark_and_profile_run():
    out = run_benchmark("bench_network.py", "--patch", "64", "64", "--batch", "1", "--repeats", "1", "--layouts")
    assert "## Inference (no grad), per patch" in out and "## Training step" in out
    assert "vit_s8 (4 lifted, 4 global, max), flex layout row" in out
    assert "vit_s8_flip0 (embedding lifted, mean, folded) single pass vs CNN with TTA:" in out
    assert "tiny (64 wide, token 4): training step before/after = " in out
    profile = run_benchmark("profile_network.py", "--patch", "64", "64")
    assert "linear layers (addmm/mm)" in profile and "local attention (compiled window or flex)" in profile


def test_network_benchmark_runs_in_3d_against_the_8_pass_cnn():
    out = run_benchmark(
        "bench_network.py", "--quick3d", "--presets", "vit_s8_3d", "tiny3d", "--no-train", "--repeats", "1"
    )
    assert "patch 32x64x64, batch 1" in out and "| CNN, 8 passes (mirroring TTA)" in out
    assert "TTA rows 8x" in out and "tiny3d (32 wide, token 4, 1 lifted block) single pass vs CNN with TTA:" in out
    assert "Target 'the default 3D preset (vit_s8_3d) >= 3x fewer FLOPs per tile than the CNN with TTA': MET" in out


def test_inference_benchmark_runs():
    out = run_benchmark("bench_inference.py", "--quick", "--repeats", "1")
    assert "## case 1x256x256" in out and "## case 1x300x280" in out
    from nnunet_equiflex.network import DEFAULT_PRESET

    assert f"EquiFlex {DEFAULT_PRESET}, 1 pass" in out and "EquiFlex tiny, 1 pass" in out
    assert f"Target 'the default ({DEFAULT_PRESET}) >= 1.5x faster per case than the CNN with TTA':" in out
    assert "Target 'the smallest preset (tiny) >= 3.0x faster per case than the CNN with TTA':" in out


def test_inference_benchmark_runs_3d_fullres_against_the_8_pass_cnn():
    out = run_benchmark("bench_inference.py", "--3d", "--quick", "--repeats", "1", "--warmup", "2")
    assert "median of 1 after 2 warm-up call(s) per row" in out
    assert "3d_fullres plan: patch 16x64x64, spacing 3.0x1.0x1.0" in out and "TTA 8 passes" in out
    assert "## case 20x72x72" in out and "| EquiFlex vit_s8_3d, 1 pass" in out and "| EquiFlex tiny3d, 1 pass" in out
    assert "x 8 " in out.split("CNN + mirroring TTA (nnU-Net default)")[1].splitlines()[0]  # tiles x 8 passes
    assert "Target 'the default 3D preset (vit_s8_3d) >= 2.0x faster per case than the CNN with TTA':" in out


def test_frontier_quick_run_trains_compares_times_and_applies_the_rule(tmp_path):
    out = run_benchmark("frontier.py", str(tmp_path / "frontier"), "--quick")
    assert "budget (every network): 2 epochs x 4 iterations" in out and "machine: cpu" in out
    for row in ("nnU-Net CNN (1 pass)", "nnU-Net CNN + TTA (4 passes)", "EquiFlex tiny (1 pass)"):
        assert f"| {row} |" in out
    assert "default rule (fastest EquiFlex preset within 1 point of the CNN with TTA):" in out
    folder = tmp_path / "frontier" / "frontier"
    rows = json.loads((folder / "frontier.json").read_text())["rows"]
    cnn_tta = next(r for r in rows if r["row"] == "nnU-Net CNN + TTA (4 passes)")
    tiny = next(r for r in rows if r["row"] == "EquiFlex tiny (1 pass)")
    assert cnn_tta["passes"] == 4 and tiny["passes"] == 1 and cnn_tta["speedup_vs_cnn_tta"] == 1.0
    assert 0.0 <= tiny["dice_mean"] <= 1.0 and tiny["seconds_per_case"] > 0 and tiny["train_s_per_iteration"] > 0
    assert tiny["gflops_per_tile"] < cnn_tta["gflops_per_tile"]
    assert len(tiny["dice_per_case"]) == 4 and "| median case Dice | cases < 0.5 |" in out  # the 4 test slices
    assert (folder / "frontier.png").stat().st_size > 10_000 and (folder / "frontier.csv").is_file()
    # a rerun resumes: every nnU-Net step is skipped, the timing and the table are redone
    again = run_benchmark("frontier.py", str(tmp_path / "frontier"), "--quick")
    assert "== train_EquiFlexTrainerTiny: done in an earlier run, skipped" in again
    # the trained networks on a second, new test set (another seed)
    out = run_benchmark("frontier_holdout.py", str(tmp_path / "frontier"), "--num-test", "3", "--seed", "5")
    assert "3 new slices of 64-72 px, seed 5" in out and "(2 x 4 iterations" in out
    held = json.loads((tmp_path / "frontier" / "holdout_seed5" / "holdout.json").read_text())["rows"]
    assert [(r["trainer"], r["use_mirroring"]) for r in held] == [
        ("nnUNetTrainer", True), ("nnUNetTrainer", False), ("EquiFlexTrainerTiny", False)
    ]  # fmt: skip
    assert all(r["cases"] == 3 for r in held) and held[0]["vs_cnn_tta"] == 0.0
    assert "| nnU-Net CNN + TTA (4 passes) | nnUNetTrainer | " in out
    assert "| EquiFlex (1 pass) | EquiFlexTrainerTiny | " in out
    assert "default rule (fastest EquiFlex preset within 1 point of the CNN with TTA):" in out  # frontier's s/case


def test_frontier_3d_quick_run_compares_tiny3d_with_the_3d_cnn_and_its_8_pass_tta(tmp_path):
    out = run_benchmark("frontier.py", str(tmp_path / "frontier3d"), "--3d", "--quick")
    assert "data: Dataset906_SyntheticVolumesFrontier (3d_fullres)" in out and "test volumes of" in out
    for row in ("nnU-Net CNN (1 pass)", "nnU-Net CNN + TTA (8 passes)", "EquiFlex tiny3d (1 pass)"):
        assert f"| {row} |" in out
    rows = json.loads((tmp_path / "frontier3d" / "frontier" / "frontier.json").read_text())["rows"]
    cnn_tta = next(r for r in rows if r["row"] == "nnU-Net CNN + TTA (8 passes)")
    tiny = next(r for r in rows if r["row"] == "EquiFlex tiny3d (1 pass)")
    assert len(tiny["patch"]) == 3 and tiny["spec"] == "EquiFlexTrainerTiny3D_budget__EquiFlexPlans__3d_fullres"
    assert tiny["flip_consistency"] == 1.0  # exact over the 7 flips of the test volume
    assert tiny["gflops_per_tile"] < cnn_tta["gflops_per_tile"] and tiny["train_s_per_iteration"] > 0


def test_frontier_records_spread_the_training_over_runs(tmp_path):
    """The CNN trained and recorded in one folder; a second folder trains only tiny, times both, builds the table."""
    records = tmp_path / "records"
    first = run_benchmark("frontier.py", str(tmp_path / "a"), "--quick", "--networks", "nnUNetTrainer",
                          "--records", str(records), "--record-only")  # fmt: skip
    assert f"record: {records / 'nnUNetTrainer.json'}" in first and "timing" not in first
    cnn = json.loads((records / "nnUNetTrainer.json").read_text())
    out = run_benchmark("frontier.py", str(tmp_path / "b"), "--quick", "--records", str(records))
    assert "== train_EquiFlexTrainerTiny" in out and "== train_nnUNetTrainer" not in out
    assert "Dice and s/epoch of 1 networks from the records in" in out
    assert (records / "EquiFlexTrainerTiny.json").is_file()
    rows = json.loads((tmp_path / "b" / "frontier" / "frontier.json").read_text())["rows"]
    cnn_tta = next(r for r in rows if r["row"] == "nnU-Net CNN + TTA (4 passes)")
    recorded = next(r for r in cnn["compare_rows"] if r["use_mirroring"])
    assert cnn_tta["dice_mean"] == recorded["dice_mean"] and cnn_tta["seconds_per_case"] > 0
    assert cnn_tta["train_s_per_epoch_log"] == cnn["train_s_per_epoch_log"]
    assert any(r["row"] == "EquiFlex tiny (1 pass)" for r in rows)


def test_lr_sweep_quick_run_trains_with_the_learning_rate_it_names(tmp_path):
    out = run_benchmark("lr_sweep.py", str(tmp_path / "sweep"), "--quick", "--trainer", "EquiFlexTrainerTiny",
                        "--lrs", "0.004")  # fmt: skip
    assert "# Learning-rate sweep of EquiFlexTrainerTiny" in out and "= 8 iterations" in out
    assert "| initial lr | run | Dice RV | Dice MLV | Dice LVC | mean Dice | median case Dice | cases < 0.5 |" in out
    assert "| 0.004 | 1 |" in out
    log = (tmp_path / "sweep" / "logs" / "lr_sweep_EquiFlexTrainerTiny_lr_0.004.txt").read_text()
    assert "Current learning rate: 0.004" in log  # the first epoch (no warmup at 2 epochs) runs at the swept lr
    rows = json.loads((tmp_path / "sweep" / "lr_sweep" / "EquiFlexTrainerTiny" / "sweep.json").read_text())
    assert rows[0]["lr"] == 0.004 and rows[0]["failed_cases"].endswith("/4") and 0 <= rows[0]["dice_mean"] <= 1
    again = run_benchmark("lr_sweep.py", str(tmp_path / "sweep"), "--quick", "--trainer", "EquiFlexTrainerTiny",
                          "--lrs", "0.004")  # fmt: skip
    assert "== lr_sweep_EquiFlexTrainerTiny_lr_0.004_train: done in an earlier run, skipped" in again
