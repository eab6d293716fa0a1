"""The frontier's default-choice rule on hand-made rows (the benchmark run itself is in test_benchmarks.py)."""

import importlib.util
import json
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


def load_holdout():
    load_frontier()  # frontier_holdout.py imports frontier, as when run beside it
    spec = importlib.util.spec_from_file_location("frontier_holdout", FRONTIER.parent / "frontier_holdout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["frontier_holdout"] = module
    spec.loader.exec_module(module)
    return module


def compare_row(spec: str, tta: bool, cases: list[float]) -> dict:
    per_case = {f"fold_0/case_{i}.nii.gz": v for i, v in enumerate(cases)}
    return dict(method=spec, spec=f"{spec}_budget__P__2d", use_mirroring=tta, dice_per_class={},
                dice_mean=sum(cases) / len(cases), dice_per_case=per_case)  # fmt: skip


def test_the_holdout_pairs_each_case_with_the_cnn_with_tta():
    holdout = load_holdout()
    rows = [compare_row("EquiFlexTrainerTiny", False, [0.9, 0.0, 0.8, 0.9]),
            compare_row("nnUNetTrainer", True, [0.8, 0.7, 0.8, 0.8])]  # fmt: skip
    tiny, cnn = holdout.summary(rows)
    assert cnn["vs_cnn_tta"] == 0.0 and cnn["interval"] == 0.0
    # differences 10, -70, 0, 10 points: mean -12.5, sample sd 38.622, 1.96 * sd / sqrt(4) = 37.85
    assert tiny["vs_cnn_tta"] == pytest.approx(-12.5)
    assert tiny["interval"] == pytest.approx(37.850, abs=1e-3)
    assert (tiny["worst_case"], tiny["below_half"], tiny["median_case"]) == (0.0, 1, pytest.approx(0.85))
    line = "| EquiFlexTrainerTiny | EquiFlexTrainerTiny | 0.6500 | -12.50 +- 37.85 | 0.8500 | 0.0000 | 1/4 |"
    assert line in holdout.markdown([tiny], [])


def test_the_holdout_needs_the_cnn_trained(tmp_path):
    holdout = load_holdout()
    model = tmp_path / "EquiFlexTrainerTiny_budget__EquiFlexPlans__2d" / "fold_0"
    model.mkdir(parents=True)
    (model / "checkpoint_final.pth").write_bytes(b"")
    with pytest.raises(SystemExit, match="nnUNetTrainer.*baseline"):
        holdout.trained_networks(tmp_path, None)
    with pytest.raises(SystemExit, match="not trained.*EquiFlexTrainerFlip0"):
        holdout.trained_networks(tmp_path, ["EquiFlexTrainerFlip0"])


def test_the_holdout_rule_takes_the_frontier_tables_timing_and_names_what_it_did_not_time(tmp_path):
    holdout = load_holdout()
    rows = [compare_row("EquiFlexTrainerTiny", False, [0.85, 0.86]),
            compare_row("EquiFlexTrainerFlip0", False, [0.9, 0.9]),
            compare_row("nnUNetTrainer", True, [0.86, 0.86])]  # fmt: skip
    table = holdout.summary(rows)
    timed = tmp_path / "frontier.json"
    timed.write_text(json.dumps({"rows": [
        dict(trainer="nnUNetTrainer", use_mirroring=True, seconds_per_case=1.0, speedup_vs_cnn_tta=1.0),
        dict(trainer="EquiFlexTrainerTiny", use_mirroring=False, seconds_per_case=0.25, speedup_vs_cnn_tta=4.0),
    ]}))  # fmt: skip
    rule_rows, untimed = holdout.rule_rows(table, timed)
    assert untimed == ["EquiFlexTrainerFlip0"]
    text = holdout.rule_text(rule_rows, untimed)
    assert "EquiFlexTrainerTiny (tiny), 4.00x faster per case, -0.50 points" in text
    assert text.endswith("left out: EquiFlexTrainerFlip0")
    assert "not applied" in holdout.rule_text(*holdout.rule_rows(table, tmp_path / "none.json"))


@pytest.mark.parametrize("seed", [1, 2])
def test_committed_holdouts_name_the_default_by_the_rule(seed):
    """benchmarks/frontier_cpu/holdout_seedS: the frontier's networks on 200 new slices. There the rule needs no
    fallback: DEFAULT_PRESET is the fastest evaluated preset within 1 point of the CNN with TTA."""
    from nnunet_equiflex.network import DEFAULT_PRESET

    frontier = load_frontier()
    folder = FRONTIER.parent / "frontier_cpu" / f"holdout_seed{seed}"
    saved = json.loads((folder / "holdout.json").read_text())
    assert all(r["cases"] == 200 for r in saved["rows"])
    compare_rows = json.loads((folder / "compare_results.json").read_text())["rows"]
    load_holdout()
    recomputed = sys.modules["frontier_holdout"].summary(compare_rows)
    assert [r["dice_mean"] for r in recomputed] == [r["dice_mean"] for r in saved["rows"]]
    assert frontier.PRESET_OF_TRAINER[frontier.choose_default(saved["rule_rows"])["trainer"]] == DEFAULT_PRESET


def test_a_case_without_a_dice_is_left_out_of_the_pairing():
    holdout = load_holdout()
    tiny = compare_row("EquiFlexTrainerTiny", False, [0.9, 0.7])
    tiny["dice_per_case"]["fold_0/case_2.nii.gz"] = float("nan")
    cnn = compare_row("nnUNetTrainer", True, [0.8, 0.8, 0.8])
    row = holdout.paired(tiny, cnn)
    assert row["cases"] == 2 and row["vs_cnn_tta"] == pytest.approx(0.0) and row["below_half"] == 0
