"""The frontier's default-choice rule on hand-made rows (the benchmark run itself is in test_benchmarks.py)."""

import importlib.util
from pathlib import Path

FRONTIER = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"


def load_frontier():
    spec = importlib.util.spec_from_file_location("frontier", FRONTIER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(trainer: str, dice: float, seconds: float, tta: bool = False) -> dict:
    return dict(trainer=trainer, dice_mean=dice, seconds_per_case=seconds, use_mirroring=tta,
                speedup_vs_cnn_tta=1.0 / seconds, dice_vs_cnn_tta_points=100 * (dice - 0.86))  # fmt: skip


def test_the_fastest_preset_within_one_point_is_chosen():
    frontier = load_frontier()
    table = [row("nnUNetTrainer", 0.86, 1.0, tta=True), row("nnUNetTrainer", 0.855, 0.25),
             row("EquiFlexTrainerViTS8", 0.858, 0.9), row("EquiFlexTrainerFlip0", 0.851, 0.4),
             row("EquiFlexTrainerTiny", 0.80, 0.2), row("FlexTrainerFlip0", 0.87, 0.1)]  # fmt: skip
    assert frontier.choose_default(table)["trainer"] == "EquiFlexTrainerFlip0"  # 0.9 points below, faster than S8
    line = frontier.rule_line(table)
    assert "EquiFlexTrainerFlip0 (vit_s8_flip0)" in line and "fallback" not in line


def test_without_a_qualifying_preset_the_rule_says_so_and_falls_back_to_the_best_dice():
    frontier = load_frontier()
    table = [row("nnUNetTrainer", 0.86, 1.0, tta=True), row("EquiFlexTrainerViTTi8", 0.70, 0.15),
             row("EquiFlexTrainerTiny", 0.84, 0.25), row("EquiFlexTrainerFlip0", 0.84, 0.4)]  # fmt: skip
    assert frontier.choose_default(table) is None
    assert frontier.closest_preset(table)["trainer"] == "EquiFlexTrainerTiny"  # equal Dice: the faster one
    line = frontier.rule_line(table)
    assert "no preset qualifies; fallback (highest mean Dice): EquiFlexTrainerTiny (tiny)" in line
    assert "-2.00 points" in line
    assert frontier.rule_line(table[:1]).endswith("no EquiFlex preset in this run")
