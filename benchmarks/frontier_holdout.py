"""A second, larger test set for the networks the frontier trained: same generator and difficulty, another seed.

The frontier (``frontier.py``) chooses the default on 30 test slices, where one hard slice moves a mean by two to
three points. This draws ``--num-test`` new slices with another seed (``synthetic_cardiac --difficulty hard``, the
frontier's size range; never used to choose anything) and evaluates every network trained in the frontier's work
folder on them with ``nnunet-equiflex compare`` (nnU-Net's CNN with and without TTA). It prints mean Dice, the
paired difference to the CNN with TTA with a 95% interval (mean of the per-case differences +- 1.96 standard
errors), the median and worst case and the cases below 0.5, then applies the frontier's default rule with the s/case
of the frontier table in WORK (timed there, every row together); ``WORK/holdout_seedS/holdout.{md,json}`` keep them.

    python benchmarks/frontier.py WORK --networks nnUNetTrainer EquiFlexTrainerTinyConv   # trains
    python benchmarks/frontier_holdout.py WORK                                             # 200 new slices, seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from frontier import FAILED_CASE_DICE, PROFILE_2D, machine_line, rule_line, run_compare, run_env

CNN_TTA = ("nnUNetTrainer", True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", help="a 2D frontier work folder (benchmarks/frontier.py) with trained networks")
    parser.add_argument("--num-test", type=int, default=200, help="new test slices (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="their seed (the frontier's data uses 0; default 1)")
    parser.add_argument("--networks", nargs="+", help="trainers to evaluate (default: every one trained in WORK)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--table-only", action="store_true", help="redo only the table from this seed's predictions")
    return parser.parse_args(argv)


def trained_networks(results: Path, wanted: list[str] | None) -> list[tuple[str, str, str]]:
    """The frontier's networks with a final checkpoint in ``results`` (in the frontier's order), the CNN first."""
    final = [results / PROFILE_2D.spec(t, p) / "fold_0" / "checkpoint_final.pth" for _, t, p in PROFILE_2D.networks]
    found = [n for n, checkpoint in zip(PROFILE_2D.networks, final) if checkpoint.is_file()]
    if wanted:
        missing = sorted(set(wanted) - {t for _, t, _ in found})
        if missing:
            raise SystemExit(f"not trained in {results}: {missing}; train them with benchmarks/frontier.py first")
        found = [n for n in found if n[1] in wanted]
    if not found or found[0][1] != "nnUNetTrainer":
        raise SystemExit(f"nnU-Net's CNN (nnUNetTrainer) is not trained in {results}: it is the baseline")
    return found


def generate(raw: Path, settings: dict, num_test: int, seed: int) -> Path:
    from nnunet_equiflex.dataset_conversion.synthetic_cardiac import generate_synthetic_cardiac

    return generate_synthetic_cardiac(
        raw, PROFILE_2D.dataset_id, 1, num_test, seed=seed, size_range=tuple(settings["size_range"]),
        overwrite=True, name="SyntheticCardiacHoldout", difficulty="hard",
    )  # fmt: skip


def trainer_of(row: dict) -> str:
    return row["spec"].split("__")[0].removesuffix("_budget")


def paired(row: dict, baseline: dict) -> dict:
    """Mean Dice, per-case statistics and the paired difference to ``baseline`` (points, with a 95% interval).
    A case without a Dice (NaN: no structure in it or its prediction) is left out of both."""
    cases, reference = row["dice_per_case"], baseline["dice_per_case"]
    both = [c for c in cases if not (math.isnan(cases[c]) or math.isnan(reference[c]))]
    diffs = [100 * (cases[c] - reference[c]) for c in both]
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    values = sorted(cases[c] for c in both)
    return {
        "method": row["method"], "trainer": trainer_of(row), "use_mirroring": row["use_mirroring"],
        "dice_mean": row["dice_mean"], "dice_per_class": row["dice_per_class"],
        "vs_cnn_tta": statistics.fmean(diffs), "interval": half, "median_case": statistics.median(values),
        "worst_case": values[0], "below_half": sum(v < FAILED_CASE_DICE for v in values), "cases": len(values),
    }  # fmt: skip


def summary(rows: list[dict]) -> list[dict]:
    by_key = {(trainer_of(r), r["use_mirroring"]): r for r in rows}
    baseline = by_key[CNN_TTA]
    return [paired(r, baseline) for r in rows]


def markdown(table: list[dict], header: list[str]) -> str:
    columns = ["method", "trainer", "mean Dice", "vs CNN+TTA (points, 95% interval)", "median case", "worst case"]
    columns.append("cases < 0.5")
    lines = [*header, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for t in table:
        cells = [t["method"].split(" [")[0], t["trainer"], f"{t['dice_mean']:.4f}"]
        cells += [f"{t['vs_cnn_tta']:+.2f} +- {t['interval']:.2f}", f"{t['median_case']:.4f}", f"{t['worst_case']:.4f}"]
        lines.append("| " + " | ".join([*cells, f"{t['below_half']}/{t['cases']}"]) + " |")
    return "\n".join(lines) + "\n"


def rule_rows(table: list[dict], frontier_json: Path) -> tuple[list[dict], list[str]]:
    """The holdout's Dice with the s/case of the frontier's table in the same work folder (every row timed together
    there), as rows for the frontier's default rule; and the trainers the table did not time (left out of the rule)."""
    if not frontier_json.is_file():
        return [], [t["trainer"] for t in table]
    timed = {(r["trainer"], r["use_mirroring"]): r for r in json.loads(frontier_json.read_text())["rows"]}
    rows, untimed = [], []
    for t in table:
        cost = timed.get((t["trainer"], t["use_mirroring"]))
        if cost is None:
            untimed.append(t["trainer"])
            continue
        rows.append(dict(trainer=t["trainer"], use_mirroring=t["use_mirroring"], dice_mean=t["dice_mean"],
                         dice_vs_cnn_tta_points=t["vs_cnn_tta"], seconds_per_case=cost["seconds_per_case"],
                         speedup_vs_cnn_tta=cost["speedup_vs_cnn_tta"]))  # fmt: skip
    return rows, untimed


def rule_text(rows: list[dict], untimed: list[str]) -> str:
    if not any((r["trainer"], r["use_mirroring"]) == CNN_TTA for r in rows):
        return "default rule: not applied (no timed frontier table in the work folder; run frontier.py to build it)"
    line = rule_line(rows) + " (s/case from the frontier table)"
    return line + (f"; not timed there, left out: {', '.join(untimed)}" if untimed else "")


def header_lines(args: argparse.Namespace, settings: dict, work: Path) -> list[str]:
    epochs, iterations, _ = settings["budget"]
    low, high = settings["size_range"]
    return [
        "# Frontier on a second test set (benchmarks/frontier_holdout.py)",
        f"command: {' '.join([Path(sys.executable).name, *sys.argv])}",
        machine_line(torch.device(args.device)),
        f"data: {args.num_test} new slices of {low}-{high} px, seed {args.seed} (synthetic_cardiac --difficulty "
        f"hard); networks trained by frontier.py in {work} ({epochs} x {iterations} iterations, fold 0 of "
        f"{PROFILE_2D.dataset_name})",
        "Dice: nnU-Net's evaluation; vs CNN+TTA: mean of the per-case Dice differences, +- 1.96 standard errors",
    ]


def load_work(work: Path) -> tuple[dict, dict]:
    settings_file = work / "settings.json"
    if not settings_file.is_file():
        raise SystemExit(f"{work} is not a frontier work folder (no settings.json); run benchmarks/frontier.py first")
    settings = json.loads(settings_file.read_text())
    return settings, run_env(work, settings)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    settings, env = load_work(work)
    out = work / f"holdout_seed{args.seed}"
    results = out / "compare" / "results.json"
    if args.table_only and not results.is_file():
        raise SystemExit(f"no predictions for seed {args.seed} in {out}; run without --table-only first")
    if not args.table_only:
        networks = trained_networks(Path(env["nnUNet_results"]) / PROFILE_2D.dataset_name, args.networks)
        data = generate(out / "raw", settings, args.num_test, args.seed)
        print(f"{args.num_test} new test slices (seed {args.seed}) in {data}; evaluating {len(networks)} networks")
        log = work / "logs" / f"{out.name}_compare.txt"
        run_compare(PROFILE_2D, networks, data, out / "compare", env, args.device, log, flip_check=False)
    table = summary(json.loads(results.read_text())["rows"])
    rules, untimed = rule_rows(table, work / "frontier" / "frontier.json")
    header = header_lines(args, settings, work)
    if args.table_only:
        header.insert(2, f"(the table redone from the predictions in {results.parent})")
    text = markdown(table, header) + "\n" + rule_text(rules, untimed) + "\n"
    (out / "holdout.md").write_text(text)
    (out / "holdout.json").write_text(json.dumps({"header": header, "rows": table, "rule_rows": rules}, indent=2))
    print(text)
    print(f"outputs: {out / 'holdout.md'}, {out / 'holdout.json'}")


if __name__ == "__main__":
    main()
