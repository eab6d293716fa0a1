"""Lateralised labels: which names count as one side of a left/right pair, and the equivariant trainers' warning."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nnunet_equiflex.planning import lateralised_label_warning, lateralised_labels

SIDED = ["kidney_left", "left kidney", "L_kidney", "kidney_L", "lung_r", "Lung-R", "LeftKidney", "kidneyRight",
         "adrenal gland (R)", "rt. lung", "Lt_adrenal", "RIGHT_LUNG"]  # fmt: skip
# Cardiac abbreviations are one word (the RV and LV are told apart by shape, not by side); "lateral" names no side;
# a letter-digit run is one word (the L1 vertebra); judgement call: "lateral ventricle" covers both sides.
NOT_SIDED = ["background", "liver", "LV cavity", "LV", "RV", "MLV", "LVC", "myocardium", "lateral ventricle",
             "L1", "vertebra_L5", "lumbar spine", "rectum", "Lr", "spleen", "IVC"]  # fmt: skip


@pytest.mark.parametrize("name", SIDED)
def test_sided_names_are_found(name):
    assert lateralised_labels(["background", name, "liver"]) == [name]


@pytest.mark.parametrize("name", NOT_SIDED)
def test_other_names_are_not(name):
    assert lateralised_labels([name]) == []
    assert lateralised_label_warning("EquiFlexTrainer", ["background", name]) is None


def test_warning_names_the_labels_and_the_non_equivariant_trainer():
    warning = lateralised_label_warning("EquiFlexTrainer", ["background", "kidney_left", "kidney_right", "liver"])
    assert warning.startswith("WARNING: label(s) kidney_left, kidney_right in dataset.json look lateralised")
    assert "EquiFlexTrainer is exactly reflection-equivariant" in warning
    assert "-tr FlexTrainer (not equivariant" in warning and "'Lateralised labels' in the README" in warning


@pytest.fixture
def toy_env(trained_toy, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, trained_toy["env"][key])
    return trained_toy


def _start_message(toy, trainer_cls, labels: dict | None, capsys) -> str:
    """What the trainer's start check prints (nnU-Net's print_to_log_file: console and training log)."""
    folder = toy["root"] / "preprocessed" / toy["raw"].name
    plans = json.loads((folder / "EquiFlexPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    if labels is not None:
        dataset_json = {**copy.deepcopy(dataset_json), "labels": labels}
    trainer = trainer_cls(plans, "2d", 3, dataset_json, torch.device("cpu"))
    capsys.readouterr()
    trainer._warn_if_lateralised()
    return capsys.readouterr().out


@pytest.mark.slow
def test_equivariant_trainers_warn_at_start_and_flex_trainer_does_not(toy_env, capsys):
    from nnunet_equiflex.trainers.equiflex_trainers import EquiFlexTrainerTiny_smoke, FlexTrainerTiny_smoke

    sided = {"background": 0, "kidney_left": 1, "kidney_right": 2}
    log = _start_message(toy_env, EquiFlexTrainerTiny_smoke, sided, capsys)
    assert "label(s) kidney_left, kidney_right in dataset.json look lateralised" in log
    assert "EquiFlexTrainerTiny_smoke is exactly reflection-equivariant" in log and "-tr FlexTrainer" in log
    assert "lateralised" not in _start_message(toy_env, FlexTrainerTiny_smoke, sided, capsys)
    assert "lateralised" not in _start_message(toy_env, EquiFlexTrainerTiny_smoke, None, capsys)  # disk, square
