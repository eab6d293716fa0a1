"""Learning-rate sweep of one frontier trainer: is its recipe's learning rate what holds its Dice back?

Same data, fold and budget as ``frontier.py`` (it prepares the work folder the same way, so a frontier
work folder is reused as it is). For each learning rate, through nnU-Net's real commands:

1. ``nnUNetv2_train D 2d 0 -tr <trainer>_budget`` with ``EQUIFLEX_LR=<lr>`` into its own results
   folder (``WORK/lr_sweep/<trainer>/lr_<lr>``; a rerun resumes and skips what is done);
2. ``nnUNetv2_predict`` of the held-out test slices (one pass; the CNN keeps nnU-Net's mirroring TTA);
3. nnU-Net's evaluation (``nnUNetv2_evaluate_simple``).

Prints one table (also ``WORK/lr_sweep/<trainer>/sweep.md``): Dice per class and mean, the median
per-case Dice and the cases below 0.5 (missed structures rather than loose boundaries), and the
training log's seconds per epoch. Two runs of the same learning rate differ too (nnU-Net does not
seed its training), so repeat a learning rate to read the spread.

    python benchmarks/lr_sweep.py WORK --trainer EquiFlexTrainerTiny --lrs 1e-3 2e-3 4e-3 8e-3
    python benchmarks/lr_sweep.py WORK --trainer EquiFlexTrainerTiny --lrs 2e-3 --repeat 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from frontier import (
    FAILED_CASE_DICE,
    PROFILE_2D,
    machine_line,
    open_work_folder,
    prepare,
    run_env,
    training_log_seconds_per_epoch,
)

from nnunet_equiflex.main_job import TRAINING_PROGRESS, Steps, run_logged


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir", help="work folder (a frontier.py work folder is reused); a rerun resumes")
    parser.add_argument("--trainer", required=True, help="a frontier trainer, e.g. EquiFlexTrainerTiny")
    parser.add_argument("--lrs", nargs="+", type=float, required=True, help="initial learning rates to train")
    parser.add_argument("--repeat", type=int, default=1, help="trainings per learning rate (the spread of a run)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the frontier's, 12)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the frontier's tiny data and budget")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def sweep_settings(args: argparse.Namespace) -> dict:
    """The frontier's settings for the work folder (data and budget), so the folders are interchangeable."""
    settings = dict(PROFILE_2D.settings["quick" if args.quick else "default"])
    settings["budget"] = [args.epochs or settings["budget"][0], *settings["budget"][1:]]
    settings["profile"] = PROFILE_2D
    plans_of = {t: p for _, t, p in PROFILE_2D.networks}
    if args.trainer not in plans_of:
        raise SystemExit(f"unknown trainer {args.trainer}; choose from {sorted(plans_of)}")
    if min(args.lrs) <= 0 or args.repeat < 1:
        raise SystemExit("learning rates must be positive and --repeat at least 1")
    return settings


def run_name(lr: float, repeat: int) -> str:
    return f"lr_{lr:g}" + (f"_run{repeat + 1}" if repeat else "")


def train_predict_evaluate(work: Path, env: dict, steps: Steps, trainer: str, lr: float, repeat: int, device: str):
    """One learning rate's run: its own nnUNet_results folder, predictions and nnU-Net's summary.json."""
    profile, logs = PROFILE_2D, work / "logs"
    plans = {t: p for _, t, p in profile.networks}[trainer]
    dataset, name = str(profile.dataset_id), run_name(lr, repeat)
    folder = work / "lr_sweep" / trainer / name
    sweep_env = {**env, "nnUNet_results": str(folder / "nnUNet_results"), "EQUIFLEX_LR": repr(lr)}
    fold_dir = folder / "nnUNet_results" / profile.dataset_name / profile.spec(trainer, plans) / "fold_0"
    raw = Path(env["nnUNet_raw"]) / profile.dataset_name

    def train() -> None:
        args = ["nnUNetv2_train", dataset, "2d", "0", "-tr", f"{trainer}_budget", "-p", plans, "-device", device]
        if (fold_dir / "checkpoint_latest.pth").is_file():
            args.append("--c")
        show = lambda line: bool(TRAINING_PROGRESS.search(line))  # noqa: E731
        run_logged(args, sweep_env, logs / f"lr_sweep_{trainer}_{name}.txt", show=show)

    def predict() -> None:
        args = ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(folder / "predictions"), "-d", dataset,
                "-c", "2d", "-tr", f"{trainer}_budget", "-p", plans, "-f", "0", "-device", device, "-npp", "1",
                "-nps", "1"]  # fmt: skip
        if trainer != "nnUNetTrainer":
            args.append("--disable_tta")  # one pass: the frontier's EquiFlex rows
        run_logged(args, sweep_env, logs / f"lr_sweep_{trainer}_{name}_predict.txt", show=lambda line: False)
        labels = [str(v) for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items() if v != 0]
        evaluate = ["nnUNetv2_evaluate_simple", str(raw / "labelsTs"), str(folder / "predictions"), "-l", *labels]
        run_logged(evaluate, sweep_env, logs / f"lr_sweep_{trainer}_{name}_evaluate.txt", show=lambda line: False)

    steps.run(f"lr_sweep_{trainer}_{name}_train", train)
    steps.run(f"lr_sweep_{trainer}_{name}_predict", predict)
    return json.loads((folder / "predictions" / "summary.json").read_text()), fold_dir.parent


def summary_row(lr: float, repeat: int, summary: dict, class_names: dict[str, str], epoch_s: float) -> dict:
    """One table row from nnU-Net's summary.json: class Dice, mean, per-case median and failed cases."""
    per_case = []
    for case in summary["metric_per_case"]:
        values = [v["Dice"] for v in case["metrics"].values() if not np.isnan(v["Dice"])]
        per_case.append(float(np.mean(values)) if values else float("nan"))
    valid = [v for v in per_case if not np.isnan(v)]
    return {
        "lr": lr,
        "run": repeat + 1,
        "dice_per_class": {name: float(summary["mean"][key]["Dice"]) for key, name in class_names.items()},
        "dice_mean": float(summary["foreground_mean"]["Dice"]),
        "median_case_dice": float(np.median(valid)) if valid else float("nan"),
        "failed_cases": f"{sum(v < FAILED_CASE_DICE for v in valid)}/{len(valid)}",
        "train_s_per_epoch_log": epoch_s,
    }


def markdown(rows: list[dict]) -> str:
    classes = list(rows[0]["dice_per_class"])
    header = ["initial lr", "run", *(f"Dice {c}" for c in classes), "mean Dice", "median case Dice",
              f"cases < {FAILED_CASE_DICE}", "train s/epoch (log)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{r['lr']:g}", str(r["run"]), *(f"{r['dice_per_class'][c]:.4f}" for c in classes),
                 f"{r['dice_mean']:.4f}", f"{r['median_case_dice']:.4f}", r["failed_cases"],
                 f"{r['train_s_per_epoch_log']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    settings = sweep_settings(args)
    work = Path(args.work_dir).resolve()
    open_work_folder(work, settings)
    env = run_env(work, settings)
    steps = Steps(work)
    prepare(work, settings, env, steps)
    raw = Path(env["nnUNet_raw"]) / PROFILE_2D.dataset_name
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    class_names = {str(v): k for k, v in labels.items() if v != 0}
    rows = []
    for lr in args.lrs:
        for repeat in range(args.repeat):
            summary, model_dir = train_predict_evaluate(work, env, steps, args.trainer, lr, repeat, args.device)
            rows.append(summary_row(lr, repeat, summary, class_names, training_log_seconds_per_epoch(model_dir)))
    epochs, iterations, _ = settings["budget"]
    text = "\n".join([
        f"# Learning-rate sweep of {args.trainer} (benchmarks/lr_sweep.py)",
        f"command: python benchmarks/lr_sweep.py WORK --trainer {args.trainer} --lrs "
        + " ".join(f"{lr:g}" for lr in args.lrs) + (f" --repeat {args.repeat}" if args.repeat > 1 else ""),
        machine_line(torch.device(args.device)),
        f"data: the frontier's {PROFILE_2D.dataset_name}, fold 0, {settings['num_test']} test slices; budget "
        f"{epochs} epochs x {iterations} iterations = {epochs * iterations} iterations",
        "Dice: nnU-Net's evaluation of one pass per test slice (the CNN: nnU-Net's mirroring TTA)",
        "", markdown(rows), "",
    ])  # fmt: skip
    out = work / "lr_sweep" / args.trainer / "sweep.md"
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=2))
    print(text, flush=True)


if __name__ == "__main__":
    main()
