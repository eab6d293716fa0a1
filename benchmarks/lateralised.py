"""Left and right Dice of a lateralised pair: EquiFlex, its non-equivariant ablation and nnU-Net's CNN.

An exactly reflection-equivariant network gives a mirrored image the mirrored prediction, so it can tell a
left/right pair apart only through asymmetric context. This measures what that means, on the synthetic
``synthetic_lateral`` dataset (two kidneys from one distribution, the liver next to the right one), through
nnU-Net's real commands on the CPU:

1. write the dataset; ``nnUNetv2_plan_and_preprocess -d 904 -c 2d``; ``nnunet-equiflex plan -d 904 --preset tiny``;
2. ``nnUNetv2_train 904 2d 0`` with one budget (``EQUIFLEX_BUDGET``) for: tiny EquiFlex
   (``EquiFlexTrainerTiny_budget``), the same network without the lifting, with mirroring augmentation and TTA
   (``FlexTrainerTiny_budget``, as FlexTrainer) and without (``FlexTrainerTinyNoMirroring_budget``), nnU-Net's CNN
   (``nnUNetTrainer_budget``: mirroring augmentation) and the CNN without mirroring
   (``nnUNetTrainerNoMirroring_budget``);
3. ``nnUNetv2_predict`` on the held-out slices (the mirroring networks with and without TTA) and
   ``nnUNetv2_evaluate_simple`` (nnU-Net's Dice); the fraction of each kidney's pixels given the other kidney's
   label is counted from the same prediction files.

Prints one table per dataset condition (also ``lateralised.md`` / ``.json`` in WORK/CONDITION):

- ``landmark``: each case mirrored with probability 1/2, labels following the anatomy, so the side of the image
  says nothing and the liver is the only cue, for every network;
- ``side-only``: every case in one orientation and no liver: only the side of the image tells the kidneys apart;
- ``fixed``: one orientation with the liver (as scans are displayed): both cues.

    python benchmarks/lateralised.py WORK                       # landmark and side-only (the README's run)
    python benchmarks/lateralised.py WORK --conditions fixed    # a further condition; a rerun resumes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from nnunet_equiflex.main_job import TRAINING_PROGRESS, Steps, job_env, run_logged

DATASET_ID = 904
CONDITIONS = {
    "landmark": dict(mirror_probability=0.5, landmark=True),
    "fixed": dict(mirror_probability=0.0, landmark=True),
    "side-only": dict(mirror_probability=0.0, landmark=False),
}
# (row, trainer, plans, use TTA); trainers with mirroring get a row with and without TTA
ROWS = [
    ("EquiFlex tiny (equivariant, 1 pass)", "EquiFlexTrainerTiny_budget", "EquiFlexPlans", False),
    ("Flex tiny (no lifting, mirroring aug + TTA)", "FlexTrainerTiny_budget", "EquiFlexPlans", True),
    ("Flex tiny (no lifting, mirroring aug, no TTA)", "FlexTrainerTiny_budget", "EquiFlexPlans", False),
    ("Flex tiny (no lifting, no mirroring)", "FlexTrainerTinyNoMirroring_budget", "EquiFlexPlans", False),
    ("nnU-Net CNN (mirroring aug + TTA)", "nnUNetTrainer_budget", "nnUNetPlans", True),
    ("nnU-Net CNN (mirroring aug, no TTA)", "nnUNetTrainer_budget", "nnUNetPlans", False),
    ("nnU-Net CNN (no mirroring)", "nnUNetTrainerNoMirroring_budget", "nnUNetPlans", False),
]
RIGHT, LEFT, LIVER = 1, 2, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir", help="work folder (one subfolder per condition); a rerun resumes")
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=["landmark", "side-only"])
    parser.add_argument("--num-train", type=int, default=100, help="training slices (default 100)")
    parser.add_argument("--num-test", type=int, default=20, help="held-out slices (default 20)")
    parser.add_argument("--size", type=int, default=48, help="slice height and width (default 48)")
    parser.add_argument(
        "--budget",
        type=int,
        nargs=3,
        default=[5, 40, 4],
        metavar=("EPOCHS", "ITERATIONS", "VAL_ITERATIONS"),
        help="the same training budget for every network (default 5 40 4)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _check_work(work: Path, settings: dict) -> None:
    record = work / "run.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        raise SystemExit(f"{work} holds a run with other settings ({record}); choose another work folder")
    for sub in ("logs", ".steps", "predictions"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2))


def run_condition(work: Path, condition: str, args: argparse.Namespace) -> list[dict]:
    settings = {
        "condition": condition,
        **CONDITIONS[condition],
        "num_train": args.num_train,
        "num_test": args.num_test,
        "size": args.size,
        "budget": args.budget,
        "seed": args.seed,
    }
    _check_work(work, settings)
    env = job_env(work)
    env["EQUIFLEX_BUDGET"] = ",".join(map(str, args.budget))
    env["EQUIFLEX_WINDOW_COMPILE"] = "0"  # Dice is measured, not speed: no compile waits for each shape
    logs, steps, dataset = work / "logs", Steps(work), str(DATASET_ID)

    def generate() -> None:
        from nnunet_equiflex.dataset_conversion.synthetic_lateral import generate_synthetic_lateral

        generate_synthetic_lateral(
            env["nnUNet_raw"],
            DATASET_ID,
            args.num_train,
            args.num_test,
            seed=args.seed,
            size=args.size,
            overwrite=True,
            **CONDITIONS[condition],
        )

    steps.run("dataset", generate)
    quiet = lambda line: "%|" not in line and len(line) < 200  # noqa: E731
    steps.run(
        "plan_and_preprocess",
        lambda: run_logged(
            ["nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", "2d", "-np", "2"], env, logs / "plan.txt", show=quiet
        ),
    )
    steps.run(
        "plan_equiflex",
        lambda: run_logged(
            ["nnunet-equiflex", "plan", "-d", dataset, "--preset", "tiny", "--overwrite"],
            env,
            logs / "plan_equiflex.txt",
        ),
    )
    for trainer, plans in dict.fromkeys((t, p) for _, t, p, _ in ROWS):
        steps.run(
            f"train_{trainer}",
            lambda t=trainer, p=plans: run_logged(
                ["nnUNetv2_train", dataset, "2d", "0", "-tr", t, "-p", p, "-device", "cpu"],
                env,
                logs / f"train_{t}.txt",
                show=lambda line: bool(TRAINING_PROGRESS.search(line)) or "lateralised" in line,
            ),
        )
    raw = Path(env["nnUNet_raw"]) / f"Dataset{DATASET_ID:03d}_SyntheticLateral"
    rows = []
    for row, trainer, plans, tta in ROWS:
        out = work / "predictions" / f"{trainer}__{'tta' if tta else 'notta'}"
        args_predict = ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", dataset, "-c", "2d"]
        args_predict += ["-tr", trainer, "-p", plans, "-f", "0", "-device", "cpu"] + ([] if tta else ["--disable_tta"])
        steps.run(
            f"predict_{out.name}",
            lambda a=args_predict, o=out: run_logged(a, env, logs / f"{o.name}.txt", show=lambda line: False),
        )
        steps.run(
            f"evaluate_{out.name}",
            lambda o=out: run_logged(
                ["nnUNetv2_evaluate_simple", str(raw / "labelsTs"), str(o), "-l", "1", "2", "3", "-np", "1"],
                env,
                logs / f"evaluate_{o.name}.txt",
            ),
        )
        summary = json.loads((out / "summary.json").read_text())
        dice = {int(k): v["Dice"] for k, v in summary["mean"].items()}
        warned = "look lateralised" in (logs / f"train_{trainer}.txt").read_text()
        rows.append(
            {
                "row": row,
                "trainer": trainer,
                "tta": tta,
                "dice_right": dice[RIGHT],
                "dice_left": dice[LEFT],
                "dice_liver": dice.get(LIVER, float("nan")),
                **swapped_fractions(raw / "labelsTs", out),
                "start_warning": warned,
            }
        )
    return rows


def swapped_fractions(labels: Path, predictions: Path) -> dict[str, float]:
    """Fraction of each kidney's ground-truth pixels that the prediction gives the other kidney's label."""
    import SimpleITK as sitk

    counts = np.zeros((2, 2))  # [true right/left] x [predicted as own side, predicted as the other side]
    for truth_file in sorted(labels.glob("*.nii.gz")):
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_file)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / truth_file.name)))
        for i, (own, other) in enumerate(((RIGHT, LEFT), (LEFT, RIGHT))):
            counts[i] += [np.sum(pred[truth == own] == own), np.sum(pred[truth == own] == other)]
    total = counts.sum(axis=1) + 1e-9
    return {"right_as_left": counts[0, 1] / total[0], "left_as_right": counts[1, 1] / total[1]}


def markdown(rows: list[dict]) -> str:
    header = [
        "method",
        "Dice kidney_right",
        "Dice kidney_left",
        "Dice liver",
        "right kidney labelled left",
        "left kidney labelled right",
    ]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        values = [
            r["row"],
            f"{r['dice_right']:.3f}",
            f"{r['dice_left']:.3f}",
            "n/a" if np.isnan(r["dice_liver"]) else f"{r['dice_liver']:.3f}",
            f"{100 * r['right_as_left']:.1f}%",
            f"{100 * r['left_as_right']:.1f}%",
        ]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    start = time.perf_counter()
    print(f"$ {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores; budget (every network): {args.budget[0]} epochs x "
        f"{args.budget[1]} iterations; {args.num_train} training / {args.num_test} test slices of {args.size} px"
    )
    results = {}
    for condition in args.conditions:
        work = Path(args.work_dir).resolve() / condition
        print(f"\n# condition {condition}: {CONDITIONS[condition]} (work folder {work})", flush=True)
        rows = run_condition(work, condition, args)
        table = markdown(rows)
        warned = next(r["start_warning"] for r in rows if r["trainer"].startswith("EquiFlex"))
        note = f"EquiFlex's start-of-training warning about lateralised labels: {'printed' if warned else 'MISSING'}"
        (work / "lateralised.md").write_text(f"{table}\n\n{note}\n")
        (work / "lateralised.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
        results[condition] = table
        print(f"\n## condition {condition}\n\n{table}\n\n{note}", flush=True)
    print(f"\nall conditions took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
