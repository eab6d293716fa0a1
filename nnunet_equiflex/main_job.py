"""The main job: EquiFlex against nnU-Net's CNN on an embedded synthetic cardiac dataset, on a CPU.

Steps, each through nnU-Net's real console scripts (so this is what a user would type):

1. write the synthetic short-axis cardiac dataset (no download) to ``WORK/nnUNet_raw``;
2. ``nnUNetv2_plan_and_preprocess -d 900 -c 2d -np 2`` and ``nnunet-equiflex plan -d 900 --preset tiny``;
3. ``nnUNetv2_train 900 2d 0`` for tiny EquiFlex (``-p EquiFlexPlans``) and for nnU-Net's CNN
   (``-p nnUNetPlans``) with the same budget, ``-device cpu``;
4. ``nnunet-equiflex compare`` on the held-out test slices; prints the Markdown table.

Every step leaves a marker in ``WORK/.steps``; a rerun skips the finished steps. ``WORK/run.json`` records the
run's settings; a work folder of a different run is only replaced with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 900
DATASET_NAME = "Dataset900_SyntheticCardiac"
SUBFOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "compare", "logs", ".steps")

SETTINGS = {
    "quick": {
        "num_train": 24,
        "num_test": 6,
        "size_range": [64, 80],
        "equiflex_trainer": "EquiFlexTrainerTiny_smoke",
        "cnn_trainer": "nnUNetTrainer_equiflexSmoke",
    },
    "default": {
        "num_train": 80,
        "num_test": 16,
        "size_range": [80, 112],
        "equiflex_trainer": "EquiFlexTrainerTiny_demo",
        "cnn_trainer": "nnUNetTrainer_equiflexDemo",
    },
}
# training lines worth showing while a network trains (the full output goes to WORK/logs)
TRAINING_PROGRESS = re.compile(
    r"Epoch \d|train_loss|val_loss|Pseudo dice|Epoch time|Mean Validation Dice|Training done"
)


class MainJobError(Exception):
    """A problem the user can fix (e.g. a work folder of another run); explained in the message."""


def _settings(quick: bool, device: str) -> dict:
    return {"mode": "quick" if quick else "default", "dataset_id": DATASET_ID, "seed": 0, "fold": 0,
            "device": device, **SETTINGS["quick" if quick else "default"]}  # fmt: skip


def _prepare_work_dir(work: Path, settings: dict, overwrite: bool) -> None:
    record = work / "run.json"
    if work.exists() and any(work.iterdir()):
        if record.is_file():
            previous = json.loads(record.read_text())
            if previous != settings:
                if not overwrite:
                    changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                    raise MainJobError(
                        f"{work} holds a different run (differs in {', '.join(changed)}); pass --overwrite to "
                        "replace it, or choose another work folder"
                    )
                _clear(work)
        elif not overwrite:
            raise MainJobError(
                f"{work} exists and is not a work folder of `nnunet-equiflex main` (no run.json); pass --overwrite "
                "to use it anyway (its nnU-Net subfolders are replaced), or choose another work folder"
            )
        else:
            _clear(work)
    for sub in SUBFOLDERS:
        (work / sub).mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2))


def _clear(work: Path) -> None:
    """Remove only what this job writes."""
    for sub in SUBFOLDERS:
        if (work / sub).exists():
            shutil.rmtree(work / sub)
    (work / "run.json").unlink(missing_ok=True)


def job_env(work: Path) -> dict[str, str]:
    from nnunet_equiflex.discovery import trainers_dir

    env = dict(os.environ)
    ours = str(trainers_dir())
    ext = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    env.update(
        nnUNet_raw=str(work / "nnUNet_raw"),
        nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
        nnUNet_results=str(work / "nnUNet_results"),
        nnUNet_extTrainer=os.pathsep.join(ext if ours in ext else [*ext, ours]),
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("nnUNet_n_proc_DA", "1")  # 2-core machines: the main process trains, one worker augments
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    return env


def _script(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise MainJobError(f"console script {name} not found next to {sys.executable} or on PATH")
    return found


def run_logged(args: list[str], env: dict[str, str], log: Path, show=lambda line: True, prefix: str = "  ") -> None:
    """Run a console script, stream the interesting lines, keep the full output in ``log``."""
    print(f"$ {' '.join(args)}", flush=True)
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [_script(args[0]), *args[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        tail: list[str] = []
        for line in proc.stdout:
            handle.write(line)
            tail = (tail + [line])[-40:]
            if line.strip() and show(line):
                print(prefix + line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        raise MainJobError(f"`{' '.join(args)}` failed with exit code {code}; full output in {log}:\n{''.join(tail)}")


class Steps:
    """Named steps that leave a marker when done, so a rerun skips them."""

    def __init__(self, work: Path) -> None:
        self.folder = work / ".steps"
        self.times: dict[str, float] = {}

    def run(self, name: str, action) -> None:
        marker = self.folder / f"{name}.done"
        if marker.is_file():
            print(f"== {name}: done in an earlier run, skipped ({marker})", flush=True)
            return
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        action()
        self.times[name] = time.perf_counter() - start
        marker.write_text(f"{self.times[name]:.1f} s\n")
        print(f"== {name}: {self.times[name]:.1f} s", flush=True)


def run_main_job(
    work_dir: str | os.PathLike = "equiflex_demo", quick: bool = False, overwrite: bool = False, device: str = "cpu"
) -> str:
    """Run (or resume) the main job in ``work_dir``; returns the comparison's Markdown table."""
    work = Path(work_dir).resolve()
    settings = _settings(quick, device)
    _prepare_work_dir(work, settings, overwrite)
    env = job_env(work)
    logs = work / "logs"
    steps = Steps(work)
    start = time.perf_counter()
    print(f"main job ({settings['mode']}) in {work}", flush=True)
    dataset = str(DATASET_ID)

    def generate() -> None:
        from nnunet_equiflex.dataset_conversion.synthetic_cardiac import generate_synthetic_cardiac

        folder = generate_synthetic_cardiac(
            env["nnUNet_raw"],
            dataset_id=DATASET_ID,
            num_train=settings["num_train"],
            num_test=settings["num_test"],
            seed=settings["seed"],
            size_range=tuple(settings["size_range"]),
            overwrite=True,  # a folder left by an interrupted run; a finished one is skipped by its marker
        )
        print(f"  {settings['num_train']} training and {settings['num_test']} test slices in {folder}", flush=True)

    steps.run("dataset", generate)
    steps.run(
        "plan_and_preprocess",
        lambda: run_logged(
            ["nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", "2d", "-np", "2"],
            env,
            logs / "plan_and_preprocess.txt",
            show=lambda line: len(line) < 200 and ("%|" not in line or "100%" in line),
        ),
    )
    steps.run(
        "plan_equiflex",
        lambda: run_logged(
            ["nnunet-equiflex", "plan", "-d", dataset, "--preset", "tiny", "--overwrite"], env, logs / "plan.txt"
        ),
    )
    results = Path(env["nnUNet_results"]) / DATASET_NAME
    specs = []
    for key, plans in (("equiflex_trainer", "EquiFlexPlans"), ("cnn_trainer", "nnUNetPlans")):
        trainer = settings[key]
        specs.append(f"{trainer}__{plans}__2d")
        fold_dir = results / specs[-1] / f"fold_{settings['fold']}"

        def train(trainer=trainer, plans=plans, fold_dir=fold_dir) -> None:
            args = ["nnUNetv2_train", dataset, "2d", str(settings["fold"]), "-tr", trainer, "-p", plans]
            args += ["-device", device]
            if (fold_dir / "checkpoint_latest.pth").is_file():
                args.append("--c")  # resume an interrupted training
            run_logged(args, env, logs / f"train_{trainer}.txt", show=lambda line: bool(TRAINING_PROGRESS.search(line)))

        steps.run(f"train_{trainer}", train)

    raw = Path(env["nnUNet_raw"]) / DATASET_NAME
    out = work / "compare"

    def compare_step() -> None:
        args = ["nnunet-equiflex", "compare", "-d", dataset, "-r", *specs, "-f", str(settings["fold"])]
        args += ["-i", str(raw / "imagesTs"), "-l", str(raw / "labelsTs"), "-o", str(out), "--overwrite"]
        args += ["--device", device]
        run_logged(args, env, logs / "compare.txt", show=lambda line: not line.startswith("|"))

    steps.run("compare", compare_step)
    table = (out / "results.md").read_text()
    total = time.perf_counter() - start
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}
    timings.update({k: round(v, 1) for k, v in steps.times.items()})
    (work / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"\nEquiFlex vs nnU-Net's CNN, {settings['mode']} budget ({settings['equiflex_trainer']} vs "
          f"{settings['cnn_trainer']}), fold 0, {settings['num_test']} test slices:\n")  # fmt: skip
    print(table, flush=True)
    print(f"outputs: {out} (results.md, results.csv, dice.png, overlays.png); this run took {total:.0f} s")
    return table
