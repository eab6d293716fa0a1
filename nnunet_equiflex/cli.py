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

    plan_dataset(
        args.dataset,
        preset=args.preset,
        gpu_memory_target_in_gb=args.gpu_memory_gb,
        plans_name=args.plans_name,
        overwrite=args.overwrite,
        preprocess=args.preprocess,
        num_processes=args.num_processes,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    plan.add_argument("--preset", default="vit_s8", help="network preset (default vit_s8)")
    plan.add_argument("--gpu-memory-gb", type=float, default=8, help="GPU memory target for the batch size")
    plan.add_argument("--plans-name", default="EquiFlexPlans", help="plans identifier (use with -p when training)")
    plan.add_argument("--overwrite", action="store_true", help="replace existing plans with different content")
    plan.add_argument("--preprocess", action="store_true", help="run nnU-Net's 2d preprocessing if it is missing")
    plan.add_argument("-np", "--num-processes", type=int, default=4)
    plan.set_defaults(func=_plan)
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
