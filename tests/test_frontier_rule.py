"""The frontier's default-choice rule on hand-made rows (the benchmark run itself is in test_benchmarks.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

FRONTIER = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"


def load_frontier():
    sys.path.insert(0, str(FRONTIER.parent))  # frontier.py imports frontier_records beside it, as when run
    spec = importlib.util.spec_from_file_location("frontier", FRONTIER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["frontier"] = module  # as an import would: its dataclass looks its module up there
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


def load_records_module():
    spec = importlib.util.spec_from_file_location("frontier_records", FRONTIER.parent / "frontier_records.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETTINGS = dict(num_train=16, num_test=4, size_range=[64, 72], budget=[2, 4, 2])


def test_a_record_is_written_once_and_read_back_only_for_the_same_settings_and_data(tmp_path):
    records = load_records_module()
    rows = [dict(spec="s", use_mirroring=False, dice_mean=0.5)]
    record = records.make_record(SETTINGS, "abc", "EquiFlexTrainerTiny", "s", rows, 12.0)
    path = records.write_record(tmp_path, record)
    assert records.write_record(tmp_path, record) == path  # the same record again: nothing changes
    with pytest.raises(SystemExit, match="already holds another record of EquiFlexTrainerTiny; delete it"):
        records.write_record(tmp_path, {**record, "train_s_per_epoch_log": 13.0})
    assert records.load_records(tmp_path, SETTINGS, "abc")["EquiFlexTrainerTiny"]["compare_rows"] == rows
    with pytest.raises(SystemExit, match=r"other settings \(budget\); use the same --epochs"):
        records.load_records(tmp_path, {**SETTINGS, "budget": [12, 50, 5]}, "abc")
    with pytest.raises(SystemExit, match="trained on other data"):
        records.load_records(tmp_path, SETTINGS, "other")
    assert records.load_records(tmp_path / "none", SETTINGS, "abc") == {}


def test_the_data_digest_sees_one_changed_voxel(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    records = load_records_module()
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    image = np.zeros((1, 8, 8), np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "imagesTr" / "a_0000.nii.gz"))
    before = records.data_digest(tmp_path)
    assert records.data_digest(tmp_path) == before
    image[0, 3, 4] = 1.0
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "imagesTr" / "a_0000.nii.gz"))
    assert records.data_digest(tmp_path) != before


@pytest.mark.parametrize("folder,epochs", [("frontier_cpu", 12), ("frontier_cpu_long", 36)])
def test_committed_records_fit_the_frontier_data_and_the_table_rule(tmp_path, folder, epochs):
    """The README's tables come from these records: they must load for the data the frontier writes today (a
    change of the generator would leave them describing other data) and name the profile's trainers, and the
    table's own rule must still read them as the README reports (no preset within 1 point; the fallback is the
    default)."""
    frontier = load_frontier()
    records = load_records_module()
    profile = frontier.PROFILE_2D
    settings = dict(profile.settings["default"])
    profile.generate(str(tmp_path), settings)
    saved = {k: v for k, v in settings.items() if k != "repeats"}
    saved["budget"] = [epochs, *saved["budget"][1:]]
    loaded = records.load_records(FRONTIER.parent / folder / "records", saved, records.data_digest(
        tmp_path / profile.dataset_name))  # fmt: skip
    assert "nnUNetTrainer" in loaded and "EquiFlexTrainerTiny" in loaded
    assert set(loaded) <= {t for _, t, _ in profile.networks}
    table = [dict(trainer=trainer, use_mirroring=row["use_mirroring"], dice_mean=row["dice_mean"], seconds_per_case=1.0)
             for trainer, record in loaded.items() for row in record["compare_rows"]]  # fmt: skip
    assert frontier.choose_default(table) is None
    if folder == "frontier_cpu":  # DEFAULT_PRESET is the rule's fallback over these records: the highest mean Dice
        from nnunet_equiflex.network import DEFAULT_PRESET

        assert frontier.PRESET_OF_TRAINER[frontier.closest_preset(table)["trainer"]] == DEFAULT_PRESET


def test_case_columns_count_missed_cases_and_read_older_records_as_unknown():
    """A mean pulled down by a few missed cases shows as a high median with failed cases; records written
    before per-case Dice show "-" rather than a made-up number."""
    frontier = load_frontier()
    cases = {"fold_0/a.nii.gz": 0.9, "fold_0/b.nii.gz": 0.8, "fold_0/c.nii.gz": 0.0, "fold_0/d.nii.gz": float("nan")}
    assert frontier.case_cells({"dice_per_case": cases}) == ["0.8000", "1/3"]
    assert frontier.case_cells({"dice_per_case": {}}) == ["-", "-"]
    assert frontier.case_cells({}) == ["-", "-"]
    table = [dict(row("nnUNetTrainer", 0.86, 1.0, tta=True), row="CNN", dice_per_class={"RV": 0.8}, params=1,
                  gflops_per_tile=1.0, train_s_per_iteration=1.0, train_s_per_epoch_log=1.0, flip_consistency=1.0,
                  dice_per_case=cases)]  # fmt: skip
    text = frontier.markdown(table)
    assert "| median case Dice | cases < 0.5 |" in text and "| 0.8000 | 1/3 |" in text
