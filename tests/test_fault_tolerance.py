"""Surviving a kill: real nnUNetv2_train and nnunet-equiflex predict processes, SIGKILLed mid-run and continued.

Kills land at chosen points without fixed sleeps: the test waits for a log line, for output files, or for the
line that a test-only switch (``nnunet_equiflex.fault_injection``) prints while it holds a write half-way.
Each test prints its figures (kills survived, checkpoints lost, outputs differing); README "Surviving a kill"
reports them.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_env import BIN, nnunet_env, run, toy_case, write_2d_nifti
from nnunet_equiflex.atomic import is_partial
from nnunet_equiflex.fault_injection import CHECKPOINT_PAUSE_ENV, EXPORT_PAUSE_ENV
from nnunet_equiflex.resume import checkpoint_problem

pytestmark = pytest.mark.slow

HANG_GUARD_S = 900  # only stops a hung run; no assertion depends on how long anything takes
HOLDING = r"^EQUIFLEX_FAULT_TEST: "


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a console script in its own process group, so a kill reaches its worker processes too (as a
    scheduler's kill of a job does)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_until(process: subprocess.Popen, log: Path, ready, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit code {process.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            _kill(process)
            raise AssertionError(f"hung waiting for {what}:\n{log.read_text()[-6000:]}")
        time.sleep(0.05)


def _log_has(log: Path, pattern: str):
    return lambda: re.search(pattern, log.read_text(), re.MULTILINE) is not None


def _kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_partial(p.name))


def _readable(folder: Path) -> dict[str, int]:
    """Checkpoint name -> epoch of the readable checkpoints; unreadable ones are reported separately."""
    epochs = {}
    for path in folder.glob("*.pth"):
        problem, epoch = checkpoint_problem(path)
        if problem is None:
            epochs[path.name] = epoch
    return epochs


def _unreadable(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.pth") if checkpoint_problem(p)[0] is not None)


def _steps(checkpoint: dict) -> set[int]:
    return {int(state["step"]) for state in checkpoint["optimizer_state"]["state"].values()}


@pytest.fixture(scope="module")
def fault_env(trained_toy, tmp_path_factory):
    """trained_toy's preprocessed dataset in a folder of its own, so its model stays untouched."""
    root = tmp_path_factory.mktemp("faults")
    env = nnunet_env(root)
    name = trained_toy["raw"].name
    shutil.copytree(trained_toy["root"] / "preprocessed" / name, root / "preprocessed" / name)
    results = root / "results" / name / f"{trained_toy['trainer']}__EquiFlexPlans__2d"
    return dict(root=root, env=env, results=results)


def test_training_survives_kills_mid_epoch_and_inside_checkpoint_writes(trained_toy, fault_env):
    env, logs = fault_env["env"], fault_env["root"]
    fold = fault_env["results"] / "fold_0"
    train = ["nnUNetv2_train", "901", "2d", "0", "-tr", trained_toy["trainer"], "-p", "EquiFlexPlans", "-device", "cpu"]
    kills = lost = 0

    def killed_run(extra: list[str], hold: str | None, ready: str, log: Path) -> None:
        nonlocal kills, lost
        before = _readable(fold) if fold.is_dir() else {}
        process = _start(train + extra, {**env, CHECKPOINT_PAUSE_ENV: hold} if hold else env, log)
        _wait_until(process, log, _log_has(log, ready), ready)
        _kill(process)
        kills += 1
        after = _readable(fold)
        lost += len(_unreadable(fold)) + sum(name not in after for name in before)

    # 1. mid-epoch: epoch 1 has started, so epoch 0's checkpoint_best.pth is complete
    killed_run([], None, r": Epoch 1$", logs / "train_1.txt")
    assert set(_readable(fold)) == {"checkpoint_best.pth"}
    # 2. inside the first checkpoint write of the resumed run (the best, or the final one)
    killed_run(["--c"], "checkpoint_*.pth", HOLDING + "writing checkpoint_", logs / "train_2.txt")
    assert len(_partials(fold)) == 1, "the kill should have landed inside a checkpoint write"
    # 3. inside the write of checkpoint_final.pth, after the last epoch
    killed_run(["--c"], "checkpoint_final.pth", HOLDING + "writing checkpoint_final.pth", logs / "train_3.txt")
    assert "checkpoint_final.pth" not in _readable(fold) and _partials(fold)
    assert lost == 0 and not _unreadable(fold)

    # A checkpoint_latest.pth cut in half, as a plain torch.save onto the final name leaves it after a kill:
    # nnU-Net picks it; the trainer reports it in one line and continues from checkpoint_best.pth.
    best = (fold / "checkpoint_best.pth").read_bytes()
    (fold / "checkpoint_latest.pth").write_bytes(best[: len(best) // 2])
    output = run([*train, "--c"], env, logs / "train_4.txt")
    reports = [line for line in output.splitlines() if "cannot be read" in line]
    assert len(reports) == 1, output
    assert re.search(
        r"checkpoint_latest\.pth cannot be read \(RuntimeError: .+\), probably cut off by a kill; "
        r"continuing from checkpoint_best\.pth \(epoch \d\)$",
        reports[0],
    )
    assert "Training done." in output

    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    reference = torch.load(
        trained_toy["model_dir"] / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    assert final["current_epoch"] == reference["current_epoch"] == 4  # the smoke schedule's epochs, all trained
    assert _steps(final) == _steps(reference) == {4 * 25}  # optimizer steps: no iteration lost or repeated
    assert len(final["logging"]["train_losses"]) == len(reference["logging"]["train_losses"])
    assert not _unreadable(fold) and not _partials(fold)
    assert set(_readable(fold)) == {"checkpoint_best.pth", "checkpoint_final.pth"}
    print(f"\ntraining: kills survived {kills}, checkpoints lost {lost}, unreadable checkpoints left 0")


def test_resume_with_nothing_readable_stops_with_a_clear_message(trained_toy, fault_env):
    fold = fault_env["results"] / "fold_1"
    fold.mkdir(parents=True)
    source = (trained_toy["model_dir"] / "fold_0" / "checkpoint_best.pth").read_bytes()
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth"):
        (fold / name).write_bytes(source[: len(source) // 3])
    train = ["nnUNetv2_train", "901", "2d", "1", "-tr", trained_toy["trainer"], "-p", "EquiFlexPlans", "-device", "cpu"]
    done = subprocess.run(
        [str(BIN / train[0]), *train[1:], "--c"], env=fault_env["env"], capture_output=True, text=True
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert (
        f"UnreadableCheckpointError: Cannot continue the training in {fold}: no checkpoint there can be read." in output
    )
    assert "checkpoint_latest.pth: unreadable (RuntimeError: PytorchStreamReader" in output
    assert "checkpoint_best.pth: unreadable (" in output
    assert f"mv {fold}/checkpoint_*.pth" in output
    assert "During handling of the above exception" not in output  # no unpickling traceback under ours
    assert "Epoch 0" not in output  # and no new training started over the files


def _write_cases(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    names = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(40, 57, size=2))
        image, _ = toy_case(rng, height, width)
        names.append(f"fault_{i:03d}")
        write_2d_nifti(image, folder / f"{names[-1]}_0000.nii.gz", (1.4, 1.4), (0.0, 0.0, 0.0))
    return names


def test_prediction_survives_kills_and_continues_to_identical_files(trained_toy, tmp_path):
    cases = _write_cases(tmp_path / "images", 16)
    predict = [
        "nnunet-equiflex",
        "predict",
        "-i",
        str(tmp_path / "images"),
        "-d",
        "901",
        "-c",
        "2d",
        "-tr",
        trained_toy["trainer"],
        "-p",
        "EquiFlexPlans",
        "-f",
        "0",
        "-device",
        "cpu",
        "--save_probabilities",
        "-npp",
        "1",
        "-nps",
        "1",
        "--disable_progress_bar",
    ]
    env = trained_toy["env"]
    reference, out = tmp_path / "uninterrupted", tmp_path / "killed"
    run([*predict, "-o", str(reference)], env, tmp_path / "reference.txt")
    endings = (".nii.gz", ".npz", ".pkl")
    files = [case + ending for case in cases for ending in endings]
    assert all((reference / name).is_file() for name in files)

    def segmentations() -> int:
        return sum((out / f"{case}.nii.gz").is_file() for case in cases) if out.is_dir() else 0

    # 1. held inside the export of the sixth case: its files exist under partial names only
    log = tmp_path / "predict_1.txt"
    process = _start([*predict, "-o", str(out)], {**env, EXPORT_PAUSE_ENV: cases[5]}, log)
    _wait_until(process, log, _log_has(log, HOLDING + f"exported {cases[5]}"), f"the held export of {cases[5]}")
    _kill(process)
    assert _partials(out) and not (out / f"{cases[5]}.nii.gz").exists()
    first = segmentations()
    # 2. continued, and killed again as soon as three more cases are out
    log = tmp_path / "predict_2.txt"
    process = _start([*predict, "-o", str(out), "--continue_prediction"], env, log)
    _wait_until(process, log, lambda: segmentations() >= first + 3, "three more cases")
    _kill(process)
    second = segmentations()
    assert first < second < len(cases), "both kills should land mid-folder"
    # 3. continued to the end
    run([*predict, "-o", str(out), "--continue_prediction"], env, tmp_path / "predict_3.txt")

    assert not _partials(out)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".json")) == sorted(files)
    differing = [name for name in files if not filecmp.cmp(reference / name, out / name, shallow=False)]
    assert differing == []
    print(
        f"\nprediction: kills survived 2 (after {first} and {second} of {len(cases)} cases), "
        f"outputs differing from an uninterrupted run {len(differing)} of {len(files)}"
    )
