"""The ``nnunet-equiflex`` console command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from nnunet_equiflex.groups import group_elements
    from nnunet_equiflex.network import EquiFlexFormer

    torch.manual_seed(args.seed)
    x = torch.randn(1, 1, 64, 48)
    print(f"input {tuple(x.shape)}; max |f(g x) - g f(x)| per element of D2 (fp32, eval mode):")
    for group in ("d2", "none"):
        net = EquiFlexFormer.from_preset("tiny", in_channels=1, num_classes=3, group=group).eval()
        with torch.no_grad():
            fx = net(x)
            errors = {g.name: (net(g.apply(x)) - g.apply(fx)).abs().max().item() for g in group_elements("d2")}
        print(f"  group={group:5s} " + "  ".join(f"{k}: {v:.2e}" for k, v in errors.items()))
    return 0


def _env(args: argparse.Namespace) -> int:
    from nnunet_equiflex.discovery import export_line

    print(export_line())
    return 0


def _install_trainers(args: argparse.Namespace) -> int:
    from nnunet_equiflex.discovery import install_shim

    path = install_shim()
    print(f"installed {path}; nnU-Net now finds the EquiFlex trainers without nnUNet_extTrainer")
    print("undo with: nnunet-equiflex uninstall-trainers")
    return 0


def _uninstall_trainers(args: argparse.Namespace) -> int:
    from nnunet_equiflex.discovery import uninstall_shim

    removed = uninstall_shim()
    print("\n".join(f"removed {p}" for p in removed) if removed else "nothing to remove: no shim installed")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from nnunet_equiflex.planners.equiflex_planner import plan_dataset

    try:
        plan_dataset(
            args.dataset,
            preset=args.preset,
            gpu_memory_target_in_gb=args.gpu_memory_gb,
            plans_name=args.plans_name,
            network_overrides={"group": args.group} if args.group else None,
            overwrite=args.overwrite,
            preprocess=args.preprocess,
            num_processes=args.num_processes,
            batch_size=args.batch_size,
            configuration=args.configuration,
        )
    except (
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as error:  # missing fingerprint, different plans: the fix is said
        print(f"nnunet-equiflex plan: error: {error}", file=sys.stderr)
        return 2
    return 0


def _compare(args: argparse.Namespace) -> int:
    from nnunet_equiflex.compare import CompareError, compare, markdown_table

    try:
        rows = compare(
            args.dataset,
            args.results,
            args.output,
            folds=args.folds,
            test_images=args.test_images,
            test_labels=args.test_labels,
            overwrite=args.overwrite,
            device=args.device,
            flip_check=not args.no_flip_check,
        )
    except CompareError as error:
        print(f"nnunet-equiflex compare: error: {error}", file=sys.stderr)
        return 2
    classes = list(rows[0].dice_per_class) if rows else []
    print(markdown_table(rows, classes))
    return 0


def _main_job(args: argparse.Namespace) -> int:
    from nnunet_equiflex.main_job import MainJobError, run_main_job

    try:
        run_main_job(args.work_dir, quick=args.quick, overwrite=args.overwrite, device=args.device)
    except MainJobError as error:
        print(f"nnunet-equiflex main: error: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nnunet_equiflex.network import DEFAULT_PRESET, DEFAULT_PRESET_3D, PRESETS, PRESETS_3D

    parser = argparse.ArgumentParser(prog="nnunet-equiflex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="forward a tiny network and print its equivariance error")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    sub.add_parser(
        "predict",
        help="nnUNetv2_predict with a mirror-symmetric sliding window (same flags; see --help)",
        add_help=False,
    )
    sub.add_parser("env", help="print the line that lets nnU-Net find the EquiFlex trainers").set_defaults(func=_env)
    sub.add_parser(
        "install-trainers",
        help="put a guarded shim into nnunetv2's trainer folder (for when nnUNet_extTrainer "
        "cannot be set or nnunetv2 < 2.8)",
    ).set_defaults(func=_install_trainers)
    sub.add_parser("uninstall-trainers", help="remove that shim").set_defaults(func=_uninstall_trainers)

    plan = sub.add_parser("plan", help="write EquiFlex plans for a dataset (nnU-Net's -pl cannot find our planner)")
    plan.add_argument("-d", "--dataset", required=True, help="dataset id or name, as for nnUNetv2_train")
    plan.add_argument(
        "-c",
        "--configuration",
        default="2d",
        choices=("2d", "3d_fullres"),
        help="nnU-Net configuration to plan (default 2d); the plans' other configurations are kept",
    )
    plan.add_argument(
        "--preset",
        default=None,
        choices=[*PRESETS, *PRESETS_3D],
        help=f"network preset (default {DEFAULT_PRESET} for 2d, {DEFAULT_PRESET_3D} for 3d_fullres; 3D presets: "
        f"{', '.join(PRESETS_3D)})",
    )
    plan.add_argument(
        "--group",
        choices=("none", "d2", "d4", "flips"),
        default=None,
        help="symmetry group of the planned network (d4 plans square 2D patches; flips = d2 in 2D, the 8 flips "
        "in 3D; default: the preset's)",
    )
    plan.add_argument("--gpu-memory-gb", type=float, default=8, help="GPU memory target for the batch size")
    plan.add_argument(
        "--batch-size", type=int, default=None, help="use this batch size instead of the memory model's choice"
    )
    plan.add_argument("--plans-name", default="EquiFlexPlans", help="plans identifier (use with -p when training)")
    plan.add_argument("--overwrite", action="store_true", help="replace existing plans with different content")
    plan.add_argument(
        "--preprocess", action="store_true", help="run nnU-Net's preprocessing of the configuration if it is missing"
    )
    plan.add_argument("-np", "--num-processes", type=int, default=4)
    plan.set_defaults(func=_plan)

    comp = sub.add_parser(
        "compare",
        help="compare trained results (EquiFlex vs nnU-Net's CNN with and without TTA): Dice, time, FLOPs, "
        "flip consistency; writes a Markdown table, CSV and PNGs",
    )
    comp.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    comp.add_argument(
        "-r",
        "--results",
        nargs="+",
        required=True,
        metavar="TRAINER__PLANS__CONFIGURATION",
        help="result folders in $nnUNet_results/DATASET, e.g. EquiFlexTrainerTiny_smoke__EquiFlexPlans__2d",
    )
    comp.add_argument("-f", "--folds", nargs="+", type=int, default=None, help="folds (default: all found)")
    comp.add_argument("-i", "--test-images", default=None, help="test images in nnU-Net raw format (CASE_0000...)")
    comp.add_argument(
        "-l",
        "--test-labels",
        default=None,
        help="ground truth for the test images; without -i/-l each fold predicts its validation cases",
    )
    comp.add_argument("-o", "--output", required=True, help="output folder")
    comp.add_argument("--overwrite", action="store_true", help="replace the output of an earlier comparison")
    comp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    comp.add_argument("--no-flip-check", action="store_true", help="skip the flip-consistency predictions")
    comp.set_defaults(func=_compare)

    job = sub.add_parser(
        "main",
        help="the main job: synthetic cardiac dataset, nnU-Net planning, train EquiFlex and nnU-Net's CNN "
        "with the same budget on CPU, then compare",
    )
    job.add_argument("work_dir", nargs="?", default="equiflex_demo", help="work folder (default ./equiflex_demo)")
    job.add_argument("--quick", action="store_true", help="smaller dataset and the smoke budget (for CI)")
    job.add_argument("--overwrite", action="store_true", help="start over in a work folder of a different run")
    job.add_argument("--device", default="cpu", help="training/inference device (default cpu)")
    job.set_defaults(func=_main_job)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        # nnUNetv2_predict's own argument parser, so every flag works exactly as there.
        from nnunet_equiflex.predictor import predict_entry_point

        sys.argv = ["nnunet-equiflex predict", *argv[1:]]
        predict_entry_point()
        return 0
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
